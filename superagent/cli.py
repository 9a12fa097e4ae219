"""The ``superagent`` command.

Subcommands map to roles; each validates its input and exits non-zero with a
one-line message naming what is wrong (never a traceback) when it cannot run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace

from superagent import __version__
from superagent.errors import SuperagentError
from superagent.log import setup_logging

EXIT_USAGE = 2


def _proxy(args: argparse.Namespace) -> int:
    import trio

    from superagent.proxy.config import load_config
    from superagent.proxy.master import ProxyMaster

    file_process, snapshot = load_config(args.config)
    process = file_process
    if args.workers is not None:
        if args.workers < 0:
            raise SuperagentError("--workers must be 0 (one per CPU) or more")
        process = replace(process, workers=args.workers)
    if args.parser is not None:
        process = replace(process, parser=args.parser)
    if args.check:
        summary = {
            "config": args.config, "ok": True, "parser": process.parser,
            "workers": process.worker_count(),
            "listeners": [f"{lst.host}:{lst.port}" + (f" -> {lst.app}" if lst.app else "")
                          for lst in snapshot.listeners],
            "apps": {app.name: len(app.instances) for app in snapshot.apps},
        }
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"{args.config}: ok ({len(snapshot.apps)} apps,"
                  f" {len(snapshot.listeners)} listeners, parser {process.parser},"
                  f" {process.worker_count()} workers)")
        return 0
    master = ProxyMaster(config_path=args.config, process=process, snapshot=snapshot,
                         log_level=args.log_level, file_process=file_process)
    trio.run(master.run)
    return 0


def _participant(args: argparse.Namespace) -> int:
    import os
    import signal
    import socket
    from pathlib import Path

    import trio

    from superagent.participant.service import Agent, AgentConfig
    from superagent.proxy.config import parse_address

    secret = os.environ.get("SUPERAGENT_SECRET", "")
    if args.secret_file:
        try:
            secret = Path(args.secret_file).read_text().strip()
        except OSError as exc:
            raise SuperagentError(f"cannot read --secret-file {args.secret_file}:"
                                  f" {exc.strerror}") from None
    if not secret:
        raise SuperagentError("the cluster secret is required: --secret-file FILE or the"
                              " SUPERAGENT_SECRET environment variable")
    listen = tuple(args.listen or ["0.0.0.0:8080"])
    for address in listen:
        parse_address(address, source="--listen", key=address)
    config = AgentConfig(
        data_dir=Path(args.data_dir).resolve(), secret=secret,
        node=args.node or socket.gethostname(),
        rpc=parse_address(args.rpc, source="--rpc", key=args.rpc), listen=listen,
        proxy_workers=args.proxy_workers or os.cpu_count() or 1, parser=args.parser,
        groups=tuple(args.group or ["default"]))
    agent = Agent(config)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.run)
                async for _ in signals:
                    break
                if args.stop_on_exit:
                    await agent.stop_all()
                nursery.cancel_scope.cancel()

    trio.run(main)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="superagent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"superagent {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    proxy = sub.add_parser("proxy", help="run the reverse proxy standalone from a TOML file")
    proxy.add_argument("--config", "--routes", required=True, metavar="FILE",
                       help="proxy config (see docs/proxy-config.md)")
    proxy.add_argument("--workers", type=int, help="worker processes (default: one per CPU)")
    proxy.add_argument("--parser", choices=("httptools", "h11"),
                       help="HTTP parser (default: httptools)")
    proxy.add_argument("--check", action="store_true", help="validate the config and exit")
    proxy.set_defaults(func=_proxy)

    part = sub.add_parser("participant", help="run the agent of this machine")
    part.add_argument("--data-dir", default=".superagent/participant", metavar="DIR",
                      help="releases, logs and state (default: .superagent/participant)")
    part.add_argument("--rpc", default="127.0.0.1:7001", metavar="HOST:PORT",
                      help="internal RPC address (default 127.0.0.1:7001)")
    part.add_argument("--listen", action="append", metavar="HOST:PORT",
                      help="proxy listener, repeatable (default 0.0.0.0:8080)")
    part.add_argument("--proxy-workers", type=int, metavar="N",
                      help="proxy worker processes (default: one per CPU)")
    part.add_argument("--parser", choices=("httptools", "h11"), default="httptools")
    part.add_argument("--node", help="node id (default: the host name)")
    part.add_argument("--group", action="append", help="machine group, repeatable")
    part.add_argument("--secret-file", metavar="FILE",
                      help="file with the cluster secret (or env SUPERAGENT_SECRET)")
    part.add_argument("--stop-on-exit", action="store_true",
                      help="stop apps and proxy workers when the agent exits (default: they"
                           " keep serving and a restarted agent re-adopts them)")
    part.set_defaults(func=_participant)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    setup_logging(args.log_level)
    try:
        result: int = args.func(args)
    except (SuperagentError, BaseExceptionGroup) as exc:
        error = _our_error(exc)
        if error is None:
            raise
        print(f"superagent {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return result


def _our_error(exc: BaseException) -> SuperagentError | None:
    """The SuperagentError behind ``exc``: trio nurseries wrap errors of their tasks in
    exception groups, and the user wants the one line that says what is wrong."""
    if isinstance(exc, SuperagentError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _our_error(inner)
            if found is not None:
                return found
    return None
