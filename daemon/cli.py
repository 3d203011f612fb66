"""The `flywatch` command. Each subcommand appears when its capability exists."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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

    for name, text in (
        ("status", "per app and region: desired, machines, health, last decision"),
        ("explain", "an app's regions and its recent decisions, with their reasons"),
    ):
        view = commands.add_parser(name, help=f"show a running daemon's {text}")
        if name == "explain":
            view.add_argument("app", help="the app to explain")
            view.add_argument("--limit", type=int, default=20, help="how many decisions (default 20)")
        view.add_argument(
            "--url", help="the daemon's address (default: from FLYWATCH_LISTEN, e.g. http://127.0.0.1:9091)"
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
    handlers = {"sim": _run_sim, "run": _run_daemon, "check": _check, "status": _view, "explain": _view}
    return handlers[args.command](args)


def _settings(args: argparse.Namespace) -> Settings:
    from daemon.settings import Settings  # noqa: PLC0415 - pydantic-settings only for the commands that need it

    overrides: dict[str, object] = {}
    if getattr(args, "config", None) is not None:
        overrides["config"] = args.config
    if getattr(args, "dry_run", False):
        overrides["dry_run"] = True
    return Settings(**overrides)  # type: ignore[arg-type]


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
    from daemon.telemetry.logging import configure_logging, register_secret  # noqa: PLC0415

    settings = _settings(args)
    configure_logging(settings.log_format)
    for secret in (settings.fly_api_token, settings.prometheus_token):
        if secret is not None:
            register_secret(secret.get_secret_value())
    try:
        return asyncio.run(Daemon(settings).run())
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except OSError as exc:
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

    from daemon.views import render_explain, render_status  # noqa: PLC0415

    url = _daemon_url(args)
    try:
        with httpx.Client(base_url=url, timeout=5.0) as client:
            status = client.get("/status").raise_for_status().json()
            if args.command == "status":
                print(render_status(status))
                return 0
            decisions = client.get(
                "/decisions", params={"app": args.app, "limit": args.limit}
            ).raise_for_status()
            print(render_explain(args.app, status, decisions.json()))
            return 0
    except httpx.HTTPError as exc:
        print(f"flywatch {args.command}: cannot read {url}: {exc}", file=sys.stderr)
        return 1


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
