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
    if args.command == "sim":
        return _run_sim(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first


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
