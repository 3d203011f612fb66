#!/usr/bin/env bash
# deploy/deploy.sh: deploy flywatch itself the careful way, with flyctl, as a person would by hand.
#
#   1. Preflight: flyctl and python3 are there; the app runs exactly one flywatch machine (two daemons would both
#      act on the same apps), and it is started (a stopped one would make the rolling update time out); the image
#      to come back to is the newest complete release (`flyctl releases`), and the config to come back with is
#      the one the app runs now (`flyctl config save`), not today's fly.toml.
#   2. Build and push the image once (`flyctl deploy --build-only --push`); every later step deploys that image.
#   3. Canary: one extra machine from the new image, in dry run (it reads, decides and reports, and changes
#      nothing, sends no alert) with its state in /tmp, not on the volume. It must start and answer /readyz
#      (policy loaded, token accepted, first tick done). Then it is destroyed (its id is the one
#      `flyctl machine run` printed); if it cannot be, the script stops there.
#      Why not `flyctl deploy --strategy canary`: flyctl refuses it for an app with a volume, and its canary would
#      be a second live daemon next to the first.
#   4. Rolling: `flyctl deploy --image NEW --strategy rolling`, then wait until the machine runs NEW, is started,
#      passes its Fly checks (fly.toml [checks], from `flyctl machine list --json`) and answers /readyz, several
#      polls in a row.
#   5. If 4 fails: when `flyctl deploy` failed and the machine is as it was (same id, version, image and state),
#      nothing changed and nothing is rolled back (exit 1). Otherwise `flyctl deploy --image PREVIOUS` with the
#      config saved in 1, and the same wait.
#
# Usage: deploy/deploy.sh [-a APP] [-c FLY_TOML] [--image IMAGE] [--timeout SECONDS] [--poll SECONDS] [--settle N]
#   -a APP            the Fly app (default: `app` in fly.toml)
#   -c FLY_TOML       the app's fly.toml (default: the repository's)
#   --image IMAGE     deploy this image instead of building one
#   --timeout SECONDS how long each wait may take (default 300)
#   --poll SECONDS    pause between two looks, a positive number (default 10; Fly runs the check every 15 s)
#   --settle N        how many healthy looks in a row count as healthy, at least 1 (default 3)
# FLYCTL names the flyctl binary (default: flyctl on PATH).
#
# Exit codes: 0 deployed and healthy; 1 a flyctl step failed and production is as it was (the build, or a
# `flyctl deploy` that changed nothing: auth, network, config rejected); 2 refused (usage, preflight); 3 the
# canary failed (production untouched); 4 the new release failed and the previous image is back and healthy;
# 5 the rollback failed too: flywatch needs a person (deploy/README.md, "When it misbehaves"); 6 the canary
# could not be destroyed (production untouched, the canary still runs in dry run: destroy it by hand).
set -euo pipefail

FLYCTL=${FLYCTL:-flyctl}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APP=""
CONFIG="$ROOT/fly.toml"
IMAGE=""
TIMEOUT=300
POLL=10
SETTLE=3
CANARY_NAME="flywatch-canary"
CANARY_ID=""
WORK=""    # a private directory for the saved config (made in preflight, removed on exit)
READYZ=""  # the command run inside a machine to ask its daemon's /readyz (set once fly.toml is read)

say() { printf 'deploy.sh: %s\n' "$*" >&2; }
die() {
  local code=$1
  shift
  say "error: $*"
  exit "$code"
}
usage() { sed -n '/^# Usage:/,/^# FLYCTL/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; }

# JSON from flyctl is read by one small Python program (python3 is there wherever flywatch is developed),
# so no jq is needed. Its subcommands read flyctl's answer on stdin.
JSON_PY=$(
  cat <<'PY'
import json, re, sys

def fail(message):
    sys.stderr.write("deploy.sh: " + message + "\n")
    sys.exit(1)

def answer():
    text = sys.stdin.read()
    try:
        return json.loads(text)
    except ValueError:
        fail("flyctl did not answer JSON: " + text[:200])

def machines(data):
    # `flyctl machine list --json` answers the Machines API's list; `flyctl status --json` nests it.
    if isinstance(data, dict):
        data = data.get("Machines") or data.get("machines") or []
    return [m for m in data if m.get("state") not in ("destroyed", "destroying")]

def is_canary(machine):
    metadata = (machine.get("config") or {}).get("metadata") or {}
    return metadata.get("flywatch_canary") == "true"

def image_of(machine):
    return (machine.get("config") or {}).get("image") or ""

def same_image(a, b):
    if a == b:
        return True
    digest_a, digest_b = a.partition("@")[2], b.partition("@")[2]
    if digest_a and digest_b:
        return digest_a == digest_b
    return a.partition("@")[0] == b.partition("@")[0]

command, args = sys.argv[1], sys.argv[2:]
if command == "app":  # the app name in fly.toml (no TOML parser needed for one top-level key)
    with open(args[0]) as toml:
        for line in toml:
            found = re.match(r"""\s*app\s*=\s*["']([^"']+)["']""", line)
            if found:
                print(found.group(1))
                sys.exit(0)
    fail("no app = \"...\" in " + args[0])
elif command in ("env", "files"):  # fly.toml's [env] as NAME=VALUE, or its [[files]] as flyctl flags
    try:
        import tomllib
        with open(args[0], "rb") as toml:
            config = tomllib.load(toml)
    except ImportError:  # Python < 3.11: string values of [env] and [[files]] are all this reads
        config, table = {"env": {}, "files": []}, None
        with open(args[0]) as toml:
            for line in toml:
                header = re.match(r"\s*(\[\[?)\s*([^\]]+?)\s*\]", line)
                if header:
                    table = {"[": "env", "[[": "files"}[header.group(1)] if header.group(2) in ("env", "files") else None
                    if table == "files":
                        config["files"].append({})
                    continue
                pair = re.match(r"""\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(["'])(.*?)\2""", line)
                if table and pair:
                    target = config["env"] if table == "env" else config["files"][-1]
                    target[pair.group(1)] = pair.group(3)
    if command == "env":
        for name, value in config.get("env", {}).items():
            print("%s=%s" % (name, value))
    else:  # the same files in the canary as in production (`flyctl machine run` does not read fly.toml)
        flags = {"secret_name": "--file-secret", "local_path": "--file-local", "raw_value": "--file-literal"}
        for entry in config.get("files", []):
            for key, flag in flags.items():
                if key in entry:
                    print(flag)
                    print("%s=%s" % (entry["guest_path"], entry[key]))
elif command == "readyz":  # the command that asks /readyz inside a machine, from FLYWATCH_LISTEN
    host, _, port = args[0].rpartition(":")
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
    url = "http://%s:%s/readyz" % (host, port)
    # urlopen raises, so python exits non-zero, unless /readyz answers 2xx
    print("python -c \"import urllib.request as u; u.urlopen('%s', timeout=5)\"" % url)
elif command == "previous-image":  # the image of the newest release that completed
    releases = [r for r in answer() if str(r.get("Status", "")).lower() == "complete" and r.get("ImageRef")]
    if not releases:
        sys.exit(1)
    print(max(releases, key=lambda r: int(r.get("Version", 0)))["ImageRef"])
elif command == "fingerprint":  # what a deploy changes: id, version (instance_id), image and state of each machine
    for machine in sorted(machines(answer()), key=lambda m: m.get("id", "")):
        if not is_canary(machine):
            print(machine.get("id", ""), machine.get("instance_id", ""), image_of(machine), machine.get("state", ""))
elif command in ("live", "canaries"):  # ids (and region) of flywatch's machines, or of the canaries
    for machine in machines(answer()):
        if is_canary(machine) == (command == "canaries"):
            print(machine["id"], machine.get("region", ""), machine.get("state", ""), image_of(machine))
elif command == "health":  # health IMAGE [ID]: 0 healthy, 1 not yet, 2 will not be
    expected, wanted = args[0], (args[1] if len(args) > 1 else None)
    found = machines(answer())
    if wanted:
        found = [m for m in found if m.get("id") == wanted]
        if not found:
            print("machine " + wanted + " is gone")
            sys.exit(2)
    else:
        found = [m for m in found if not is_canary(m)]
        if not found:
            print("no flywatch machine")
            sys.exit(1)
    verdict = 0
    for machine in found:
        name, state, checks = machine.get("id", "?"), machine.get("state", ""), machine.get("checks") or []
        if state == "failed" or (wanted and state == "stopped"):
            print(name + ": " + state)
            sys.exit(2)
        problems = []
        if state != "started":
            problems.append("state " + state)
        if not same_image(image_of(machine), expected):
            problems.append("runs " + (image_of(machine) or "no image"))
        if not wanted:  # the canary has no Fly checks (it is not a deployed machine); /readyz judges it
            if not checks:
                problems.append("no check result yet")
            problems += ["check %s %s" % (c.get("name"), c.get("status")) for c in checks if c.get("status") != "passing"]
        print(name + ": " + (", ".join(problems) if problems else "started, " + str(len(checks)) + " checks passing"))
        if problems:
            verdict = 1
    sys.exit(verdict)
elif command == "exec-ok":  # `flyctl machine exec --json`: the command's own exit code
    result = answer()
    code = result.get("exit_code", result.get("ExitCode", 1))
    if code != 0:
        output = (result.get("stderr") or result.get("stdout") or "").strip().splitlines()
        print("exit %s%s" % (code, (": " + output[-1]) if output else ""))
    sys.exit(0 if code == 0 else 1)
else:
    fail("unknown JSON query " + command)
PY
)
json() { python3 -c "$JSON_PY" "$@"; }

# value OPTION "$@": the option's value, or exit 2
value() {
  [ $# -ge 2 ] && [ -n "$2" ] || { usage; die 2 "$1 needs a value"; }
  printf '%s' "$2"
}
while [ $# -gt 0 ]; do
  case $1 in
    -a | --app) APP=$(value "$@"); shift 2 ;;
    -c | --config) CONFIG=$(value "$@"); shift 2 ;;
    --image) IMAGE=$(value "$@"); shift 2 ;;
    --timeout) TIMEOUT=$(value "$@"); shift 2 ;;
    --poll) POLL=$(value "$@"); shift 2 ;;
    --settle) SETTLE=$(value "$@"); shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage; die 2 "unknown argument: $1" ;;
  esac
done
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die 2 "--timeout takes a whole number of seconds, not '$TIMEOUT'"
# a positive number of seconds (sleep takes fractions): 0 would poll flyctl without a pause
[[ $POLL =~ ^[0-9]+(\.[0-9]+)?$ && $POLL =~ [1-9] ]] ||
  die 2 "--poll takes a positive number of seconds (10, 0.5), not '$POLL'"
# at least one healthy look: 0 would call any release healthy without looking at it
[[ $SETTLE =~ ^[0-9]+$ && $SETTLE =~ [1-9] ]] || die 2 "--settle takes a whole number, at least 1, not '$SETTLE'"
TIMEOUT=$((10#$TIMEOUT)) SETTLE=$((10#$SETTLE))  # no octal surprise in arithmetic (08, 09)

command -v "$FLYCTL" >/dev/null 2>&1 ||
  die 2 "$FLYCTL not found on PATH: install flyctl (https://fly.io/docs/flyctl/install/) or set FLYCTL"
command -v python3 >/dev/null 2>&1 || die 2 "python3 not found on PATH (it reads flyctl's JSON)"
[ -f "$CONFIG" ] || die 2 "no fly.toml at $CONFIG"
CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"  # absolute: the build runs from the root
[ -n "$APP" ] || APP=$(json app "$CONFIG") || die 2 "no app name: pass -a APP"
# The canary gets fly.toml's [env] and [[files]] (`flyctl machine run` does not read fly.toml), but not its
# state file: in dry run, with its state in /tmp, it can change nothing of production's.
CANARY_ENV=()
LISTEN="[::]:9091"
while IFS= read -r pair; do
  case $pair in
    FLYWATCH_DRY_RUN=* | FLYWATCH_STATE_URL=*) ;;
    FLYWATCH_LISTEN=*) LISTEN=${pair#*=} ;;
    *) CANARY_ENV+=(--env "$pair") ;;
  esac
done < <(json env "$CONFIG")
CANARY_ENV+=(--env "FLYWATCH_LISTEN=$LISTEN" --env FLYWATCH_DRY_RUN=true
  --env FLYWATCH_STATE_URL=sqlite:////tmp/flywatch-canary.db)
while IFS= read -r flag && IFS= read -r value; do
  CANARY_ENV+=("$flag" "$value")
done < <(json files "$CONFIG")
READYZ=$(json readyz "$LISTEN")

fly() { "$FLYCTL" "$@"; }

# destroy_canary: destroys the canary if there is one; 1 if it could not (CANARY_ID stays set)
destroy_canary() {
  [ -n "$CANARY_ID" ] || return 0
  say "destroying the canary $CANARY_ID"
  if ! fly machine destroy --app "$APP" --force "$CANARY_ID" >&2; then
    say "could not destroy the canary: fly machine destroy --app $APP --force $CANARY_ID"
    return 1
  fi
  CANARY_ID=""
}
# shellcheck disable=SC2329  # invoked by the EXIT trap
cleanup() {
  destroy_canary || true
  if [ -n "$WORK" ]; then rm -rf -- "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

MACHINES="[]"
# look IMAGE [ID]: reads the machine list into MACHINES and judges it: 0 healthy, 1 not yet, 2 will not be
look() {
  MACHINES=$(fly machine list --app "$APP" --json) || {
    say "flyctl machine list failed"
    return 1
  }
  printf '%s' "$MACHINES" | json health "$@" >&2
}

# ready ID: the daemon in machine ID answers /readyz with 2xx
ready() {
  local out
  out=$(fly machine exec --app "$APP" --json --timeout 10 "$1" "$READYZ") || return 1
  printf '%s' "$out" | json exec-ok >&2
}

# wait_canary IMAGE: the canary is started on IMAGE and ready
wait_canary() {
  local deadline=$((SECONDS + TIMEOUT)) status
  while :; do
    status=0
    look "$1" "$CANARY_ID" || status=$?
    if [ "$status" = 2 ]; then return 1; fi
    if [ "$status" = 0 ] && ready "$CANARY_ID"; then return 0; fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "the canary was not ready within ${TIMEOUT}s"
      return 1
    fi
    sleep "$POLL"
  done
}

# wait_healthy IMAGE: every flywatch machine runs IMAGE, is started, passes its checks and is ready,
# SETTLE looks in a row
wait_healthy() {
  local deadline=$((SECONDS + TIMEOUT)) good=0 status ids id
  while :; do
    status=0
    look "$1" || status=$?
    if [ "$status" = 2 ]; then return 1; fi
    if [ "$status" = 0 ]; then
      ids=$(printf '%s' "$MACHINES" | json live | cut -d' ' -f1) || ids=""
      [ -n "$ids" ] || status=1
      for id in $ids; do
        ready "$id" || status=1
      done
    fi
    if [ "$status" = 0 ]; then good=$((good + 1)); else good=0; fi
    if [ "$good" -ge "$SETTLE" ]; then return 0; fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "not healthy within ${TIMEOUT}s"
      return 1
    fi
    sleep "$POLL"
  done
}

# rolling IMAGE FLY_TOML
rolling() {
  fly deploy --app "$APP" --config "$2" --image "$1" --strategy rolling --ha=false \
    --wait-timeout "${TIMEOUT}s" --yes >&2
}

# fingerprint: id, version, image and state of the flywatch machine, as flyctl lists it now (1 if it cannot)
fingerprint() {
  local listed
  listed=$(fly machine list --app "$APP" --json) || return 1
  printf '%s' "$listed" | json fingerprint
}

cd "$ROOT"

# 1. preflight
MACHINES=$(fly machine list --app "$APP" --json) || die 2 "could not list the machines of $APP"
LIVE=$(printf '%s' "$MACHINES" | json live) || die 2 "could not read the machines of $APP"
count=$(printf '%s' "$LIVE" | grep -c . || true)
[ "$count" -ge 1 ] || die 2 "$APP has no machine: make the first deploy by hand (deploy/README.md, First deploy)"
[ "$count" -eq 1 ] ||
  die 2 "$APP has $count machines; flywatch runs as exactly one (two would both act): keep the one with the volume (fly machine list -a $APP, fly machine destroy --force ID)"
REGION=$(printf '%s\n' "$LIVE" | cut -d' ' -f2)
LIVE_ID=$(printf '%s\n' "$LIVE" | cut -d' ' -f1)
LIVE_STATE=$(printf '%s\n' "$LIVE" | cut -d' ' -f3)
[ "$LIVE_STATE" = started ] ||
  die 2 "the flywatch machine $LIVE_ID is ${LIVE_STATE:-in no state}, not started (a rolling update would wait for it in vain): start it first (fly machine start -a $APP $LIVE_ID)"
if [ -n "$(printf '%s' "$MACHINES" | json canaries)" ]; then
  die 2 "a canary of $APP is already running (another deploy?); if not, destroy it: fly machine list -a $APP"
fi
PREVIOUS=$(fly releases --app "$APP" --json --image | json previous-image) ||
  die 2 "no complete release of $APP with an image to come back to: make the first deploy by hand (deploy/README.md)"
say "previous image (the way back): $PREVIOUS"
# The config to come back with: the one the app runs now, as Fly has it (`flyctl config save -a APP -c FILE`
# writes the app's current configuration, fetched from Fly, as TOML), so a failure caused by a change in
# today's fly.toml does not come back with the rollback.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/flywatch-deploy.XXXXXX")
PREVIOUS_CONFIG="$WORK/previous.toml"
fly config save --app "$APP" --config "$PREVIOUS_CONFIG" --yes >&2 && [ -s "$PREVIOUS_CONFIG" ] ||
  die 2 "could not save the running config of $APP (flyctl config save -a $APP): no way back without it"
say "previous config (the way back): saved from Fly"
BEFORE=$(printf '%s' "$MACHINES" | json fingerprint) || die 2 "could not read the machines of $APP"

# 2. the image, built and pushed once
if [ -z "$IMAGE" ]; then
  label="flywatch-$(date -u +%Y%m%d%H%M%S)"
  fly deploy --app "$APP" --config "$CONFIG" --build-only --push --image-label "$label" >&2 ||
    die 1 "the build failed; nothing was deployed"
  IMAGE="registry.fly.io/$APP:$label"
fi
say "new image: $IMAGE"

# 3. the canary: dry run, state off the volume, no DNS name
say "canary: one dry-run machine from $IMAGE in $REGION"
# Its id is the one `flyctl machine run` prints (" Machine ID: ..."), even when the run then fails (the machine
# exists but did not start), so that it can always be destroyed. Only if flyctl printed none, the canary is
# looked up by its metadata (preflight made sure there was none before).
run_status=0
run_out=$(fly machine run "$IMAGE" --app "$APP" --region "$REGION" --name "$CANARY_NAME" --detach \
  --restart no --skip-dns-registration --vm-memory 512 \
  --metadata flywatch_canary=true "${CANARY_ENV[@]}") || run_status=$?
printf '%s\n' "$run_out" >&2
CANARY_ID=$(printf '%s\n' "$run_out" | sed -n 's/^[[:space:]]*Machine ID:[[:space:]]*\([^[:space:]]*\).*/\1/p' | head -n 1)
if [ -z "$CANARY_ID" ]; then
  MACHINES=$(fly machine list --app "$APP" --json) || MACHINES="[]"
  CANARY_ID=$(printf '%s' "$MACHINES" | json canaries | cut -d' ' -f1 | head -n 1) || CANARY_ID=""
fi
[ "$run_status" = 0 ] || die 3 "the canary could not be started; nothing was deployed"
[ -n "$CANARY_ID" ] ||
  die 3 "no canary id from flyctl machine run, nor in the machine list (look for $CANARY_NAME: fly machine list -a $APP); nothing was deployed"
if ! wait_canary "$IMAGE"; then
  die 3 "the canary $CANARY_ID failed (its logs: fly logs -a $APP -m $CANARY_ID); nothing was deployed"
fi
say "canary ready"
# A canary left running is a second daemon (in dry run, but reading the same apps, with the same token): stop.
canary=$CANARY_ID
destroy_canary ||
  die 6 "the canary $canary could not be destroyed; nothing was deployed: destroy it (fly machine destroy -a $APP --force $canary), then deploy again"

# 4. rolling, then its health
say "rolling: $IMAGE"
deploy_status=0
rolling "$IMAGE" "$CONFIG" || deploy_status=$?
if [ "$deploy_status" = 0 ] && wait_healthy "$IMAGE"; then
  say "deployed $IMAGE: healthy"
  exit 0
fi

# 5. back to the previous image, unless flyctl deploy failed without changing anything
if [ "$deploy_status" != 0 ]; then
  # flyctl failing before it touched the machine (auth, network, fly.toml rejected) leaves it as it was: same
  # id, same version (instance_id), same image, same state. A machine that cannot be listed counts as changed.
  after=$(fingerprint) || after=""
  if [ -n "$after" ] && [ "$after" = "$BEFORE" ]; then
    die 1 "deploy failed, nothing changed (flyctl deploy exit $deploy_status): $APP still runs its previous release; nothing was rolled back"
  fi
  say "flyctl deploy failed (exit $deploy_status) and the machine changed: rolling back to $PREVIOUS"
else
  say "the new release failed its health check: rolling back to $PREVIOUS"
fi
if rolling "$PREVIOUS" "$PREVIOUS_CONFIG" && wait_healthy "$PREVIOUS"; then
  say "rolled back to $PREVIOUS, with the config it ran with: healthy. The failed image was $IMAGE"
  exit 4
fi
die 5 "the rollback to $PREVIOUS failed too: pause flywatch, keeping it watching (fly secrets set -a $APP FLYWATCH_DRY_RUN=true), and see deploy/README.md, \"When it misbehaves\""
