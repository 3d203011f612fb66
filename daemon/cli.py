"""The `flywatch` command. Each subcommand appears when its capability exists."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from daemon import __version__

if TYPE_CHECKING:
    from daemon.settings import Settings
    from daemon.sim.server import SimServer


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _limit(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"expected a number from 1 to 1000, got {text!r}")
    return int(text)


def _release_version(text: str) -> int:
    digits = text.removeprefix("v")
    if not digits.isascii() or not digits.isdigit() or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"expected a release version such as 41 or v41, got {text!r}")
    return int(digits)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (0-65535), got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywatch", description="Keeps Fly.io apps healthy, region by region."
    )
    parser.add_argument("--version", action="version", version=f"flywatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the daemon: watch, scale and roll back the apps of the policy",
        description="Run flywatch against the Machines API with the policy file (FLYWATCH_CONFIG).",
    )
    run.add_argument(
        "--config", type=Path, help="the policy file (default: FLYWATCH_CONFIG or config/flywatch.yaml)"
    )
    run.add_argument(
        "--dry-run", action="store_true", help="decide and report, change nothing (FLYWATCH_DRY_RUN)"
    )

    check = commands.add_parser("check", help="validate a policy file and summarise it")
    check.add_argument(
        "--config", type=Path, help="the policy file (default: FLYWATCH_CONFIG or config/flywatch.yaml)"
    )

    url_help = "the daemon's address (default: from FLYWATCH_LISTEN, e.g. http://127.0.0.1:9091)"
    for name, text, records in (
        ("status", "a running daemon's apps, per region: desired, machines, health, last decision", ""),
        ("explain", "an app's regions and its recent decisions, with their reasons", "decisions"),
        ("releases", "an app's release watch: verdicts, known-good release, rollbacks", "release events"),
    ):
        view = commands.add_parser(name, help=f"show {text}")
        if records:
            view.add_argument("app", help=f"the app whose {records} to show")
            view.add_argument(
                "--limit", type=_limit, default=20, help=f"how many {records}, 1..1000 (default 20)"
            )
        view.add_argument("--url", help=url_help)

    rollback = commands.add_parser(
        "rollback",
        help="ask a running daemon to roll an app back (its next tick does it)",
        description="Ask the daemon to roll APP back to a known-good release. The daemon records the request "
        "and its next tick of the app carries it out; `flywatch releases APP` shows the progress. Needs the "
        "daemon's own FLY_API_TOKEN in the environment.",
    )
    rollback.add_argument("app", help="the app to roll back")
    rollback.add_argument(
        "--to",
        type=_release_version,
        metavar="VERSION",
        help="the release to go back to (default: the newest known-good one older than the one running)",
    )
    rollback.add_argument("--url", help=url_help)

    demo = commands.add_parser(
        "demo",
        help="the whole product in two minutes: a simulated Fly app scaled, failed over and rolled back",
        description="Start the simulator with the app shop in iad, cdg and nrt, run flywatch on it with "
        "config/demo.yaml, and play a story: steady state, a load spike in cdg, nrt failing and coming "
        "back, a bad release rolled back, the load dropping. Exit 0 when all of it happened.",
    )
    demo.add_argument("--fast", action="store_true", help="shorter transitions and pauses (tests, CI)")
    demo.add_argument(
        "--plain", action="store_true", help="print each step and decision once instead of a live view"
    )

    sim = commands.add_parser(
        "sim",
        help="run the offline simulator of the Fly platform (Machines API, fleet, releases, faults)",
        description="Serve a simulated Fly.io: the Machines API under /v1, the control API under /_sim, and "
        "one HTTP server per started machine on its own loopback address.",
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to serve the API on (default 127.0.0.1)")
    sim.add_argument(
        "--port", type=_port, default=4280, help="port to serve the API on (default 4280; 0 picks one)"
    )
    sim.add_argument("--scenario", type=Path, help="YAML world to build (default: the embedded scenario)")
    sim.add_argument("--delay", type=_positive_float, help="seconds each transient machine state lasts")
    sim.add_argument("--no-rate-limits", action="store_true", help="turn Fly's documented rate limits off")
    sim.add_argument(
        "--seed", type=int, help="seed for machine ids and names (default: the scenario's, or 0)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {
        "sim": _run_sim,
        "run": _run_daemon,
        "check": _check,
        "status": _view,
        "explain": _view,
        "releases": _view,
        "rollback": _rollback,
        "demo": _demo,
    }
    return handlers[args.command](args)


def _demo(args: argparse.Namespace) -> int:
    from daemon.demo import run_demo  # noqa: PLC0415 - the simulator only for the commands that need it

    return run_demo(fast=args.fast, out=sys.stdout, live=sys.stdout.isatty() and not args.plain)


def _settings(args: argparse.Namespace) -> Settings:
    from pydantic import ValidationError  # noqa: PLC0415

    from daemon.settings import Settings  # noqa: PLC0415 - pydantic-settings only for the commands that need it

    overrides: dict[str, object] = {}
    if getattr(args, "config", None) is not None:
        overrides["config"] = args.config
    if getattr(args, "dry_run", False):
        overrides["dry_run"] = True
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        # each bad setting by the variable it came from; never its value (it may be a URL with a password)
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "settings"
            variable = name if name.isupper() else f"FLYWATCH_{name.upper()}"
            print(f"flywatch: {variable}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def _check(args: argparse.Namespace) -> int:
    from daemon.config import PolicyError, load_policy, summary  # noqa: PLC0415

    path = _settings(args).config
    try:
        loaded = load_policy(path)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    print(f"ok: {path}")
    for line in summary(loaded.policy):
        print(f"  {line}")
    return 0


def _run_daemon(args: argparse.Namespace) -> int:
    from daemon.app import Daemon  # noqa: PLC0415
    from daemon.config import PolicyError  # noqa: PLC0415
    from daemon.store import StoreError  # noqa: PLC0415
    from daemon.store.postgres import url_secrets  # noqa: PLC0415
    from daemon.telemetry.logging import configure_logging, register_secret  # noqa: PLC0415

    settings = _settings(args)
    configure_logging(settings.log_format)
    for password in url_secrets(settings.state_url):
        register_secret(password)  # a PostgreSQL state URL's password never appears in a log line
    for secret in (settings.fly_api_token, settings.prometheus_token):
        if secret is not None:
            register_secret(secret.get_secret_value())
            # a FlyV1 token's own part is a credential too (the rollback endpoint takes it bare)
            register_secret(secret.get_secret_value().strip().removeprefix("FlyV1 ").strip())
    try:
        return asyncio.run(Daemon(settings).run())
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except (OSError, StoreError) as exc:  # a StoreError names the store, never its password
        print(f"flywatch run: {exc}", file=sys.stderr)
        return 1


def _daemon_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    listen = _settings(args).listen
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "::", "0.0.0.0"):  # noqa: S104 - reading the daemon's own listen setting
        host = "127.0.0.1"
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}"


def _view(args: argparse.Namespace) -> int:
    import httpx  # noqa: PLC0415

    from daemon.views import render_explain, render_releases, render_status  # noqa: PLC0415

    url = _daemon_url(args)
    try:
        with httpx.Client(base_url=url, timeout=5.0) as client:
            status = client.get("/status").raise_for_status().json()
            if args.command == "status":
                print(render_status(status), end="")
                return 0
            path, render = {
                "explain": ("/decisions", render_explain),
                "releases": ("/releases", render_releases),
            }[args.command]
            records = client.get(path, params={"app": args.app, "limit": args.limit}).raise_for_status()
            print(render(args.app, status, records.json()), end="")  # the views end their lines
            return 0
    except httpx.HTTPError as exc:
        print(f"flywatch {args.command}: cannot read {url}: {exc}", file=sys.stderr)
        return 1
    except ValueError:  # not JSON: not a flywatch daemon, or a proxy's error page
        print(
            f"flywatch {args.command}: {url} did not answer JSON (is it a flywatch daemon?)", file=sys.stderr
        )
        return 1


def _rollback(args: argparse.Namespace) -> int:
    """POST the request with the daemon's own Fly token; the token is never printed, even in an error."""
    import httpx  # noqa: PLC0415

    from daemon.fly.auth import authorization  # noqa: PLC0415
    from daemon.views import render_rollback_request  # noqa: PLC0415

    secret = _settings(args).fly_api_token
    token = secret.get_secret_value().strip() if secret is not None else ""
    if not token:
        print(
            "flywatch rollback: FLY_API_TOKEN is not set (a rollback by hand needs the daemon's own token)",
            file=sys.stderr,
        )
        return 2
    if not token.isprintable():
        print("flywatch rollback: FLY_API_TOKEN holds a control character", file=sys.stderr)
        return 2
    url = _daemon_url(args)
    if not _private(url):
        print(
            f"flywatch rollback: refusing to send the Fly token over plain HTTP to {url}: use https://, "
            "or the daemon's private address (loopback, Fly's 6PN fdaa::/16, or a .internal name)",
            file=sys.stderr,
        )
        return 2
    body: dict[str, object] = {"by": _requester()}
    if args.to is not None:
        body["to"] = args.to
    try:
        with httpx.Client(base_url=url, timeout=10.0) as client:
            response = client.post(
                f"/releases/{quote(args.app, safe='')}/rollback",
                json=body,
                headers={"Authorization": authorization(token)},  # as the daemon sends it to Fly
            )
    except httpx.HTTPError as exc:
        print(f"flywatch rollback: cannot reach {url}: {_scrub(str(exc), token)}", file=sys.stderr)
        return 1
    try:
        answer = response.json()
    except ValueError:
        answer = None
    answer = answer if isinstance(answer, dict) else {}
    if response.status_code == 202:
        print(_scrub(render_rollback_request(args.app, answer), token), end="")
        return 0
    why = str(answer.get("error") or response.reason_phrase or "no reason given")
    if response.status_code == 401:
        why += " (FLY_API_TOKEN here must be the daemon's own)"
    print(f"flywatch rollback: {url} answered {response.status_code}: {_scrub(why, token)}", file=sys.stderr)
    return 1


def _private(url: str) -> bool:
    """Whether the token may go to `url`: over TLS anywhere, or in clear only to this machine or over Fly's
    private network (WireGuard-encrypted 6PN, fdaa::/16, and its .internal names)."""
    import ipaddress  # noqa: PLC0415
    from urllib.parse import urlsplit  # noqa: PLC0415

    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    host = (parts.hostname or "").lower()
    if host == "localhost" or host.endswith((".internal", ".flycast")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address in ipaddress.ip_network("fdaa::/16")


def _requester() -> str:
    """Who asks, for the rollback's reason and the release history."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        return "cli"
    return f"{user}@{socket.gethostname()} via cli"


def _scrub(text: str, token: str) -> str:
    """`text` without the token, also its part after "FlyV1 ", and neither as a repr spells them."""
    for secret in sorted({token, token.removeprefix("FlyV1 ")}, key=len, reverse=True):
        for spelling in (secret, repr(secret)[1:-1], repr(secret.encode())[2:-1]):
            text = text.replace(spelling, "[redacted]")
    return text


def _run_sim(args: argparse.Namespace) -> int:
    from daemon.sim.server import ScenarioError, SimServer, read_scenario, settings_from  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        scenario, source = read_scenario(args.scenario)
        settings = settings_from(
            scenario,
            source,
            transition_delay=args.delay,
            rate_limits=False if args.no_rate_limits else None,
            seed=args.seed,
        )
    except ScenarioError as exc:
        print(f"flywatch sim: {exc}", file=sys.stderr)
        return 2

    async def serve() -> int:
        sim = SimServer(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            try:
                await sim.start(args.host, args.port)
            except OSError as exc:
                print(
                    f"flywatch sim: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr
                )
                return 1
            try:
                await sim.load_scenario(scenario, source)
            except ScenarioError as exc:
                print(f"flywatch sim: {exc}", file=sys.stderr)
                await sim.stop()
                return 2
            _print_banner(sim, source)
            await stop.wait()
            print("flywatch sim: stopping", flush=True)
            await sim.stop()
            return 0
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)

    return asyncio.run(serve())


def _print_banner(sim: SimServer, source: str) -> None:
    token = next(iter(sim.platform.settings.tokens), "any")
    print(f"flywatch sim: serving {source}", flush=True)
    print(f"  Machines API  {sim.api_url}   (Authorization: Bearer {token})")
    print(f"  control API   {sim.url}/_sim/   (apps, load, deploy, images, faults, counters)")
    print("  e.g. curl -H 'Authorization: Bearer " + token + f"' '{sim.api_url}/apps?org_slug=personal'")
    for app in sim.platform.apps.values():
        print(f"  app {app.name}: load {app.load or {}} rps")
        for machine in app.machines.values():
            address = f"http://{machine.private_ip}:{machine.internal_port()}"
            urls = (
                f"{address}{machine.health_path()}  {address}/metrics" if machine.state == "started" else ""
            )
            print(f"    {machine.id}  {machine.region}  {machine.state:<9} {urls}".rstrip())
    print("  Ctrl-C stops it.", flush=True)
