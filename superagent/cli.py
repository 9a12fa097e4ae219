"""The ``superagent`` command.

Subcommands map to roles; each validates its input and exits non-zero with a
one-line message naming what is wrong (never a traceback) when it cannot run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from superagent import __version__
from superagent.errors import SuperagentError
from superagent.log import setup_logging
from superagent.names import group_name_problem

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # what a shell reports for a process killed by SIGPIPE
MAX_DRAIN_WAIT = 3600.0  # a drain wait beyond an hour is a typo


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
    import ipaddress
    import os
    import socket
    from pathlib import Path

    from superagent.config import parse_address
    from superagent.participant.joiner import parse_coordinator_urls
    from superagent.participant.service import Agent, AgentConfig

    secret, join_token = _participant_credentials(args)
    listen = tuple(args.listen or ["0.0.0.0:8080"])
    for address in listen:
        parse_address(address, source="--listen", key=address)
    rpc = parse_address(args.rpc, source="--rpc", key=args.rpc)
    groups = tuple(dict.fromkeys(g.strip() for value in args.group or ["default"]
                                 for g in value.split(",") if g.strip()))
    if not groups:
        raise SuperagentError("--group needs a group name")
    for group in groups:  # the coordinator refuses the registration otherwise, much later
        problem = group_name_problem(group)
        if problem is not None:
            raise SuperagentError(f"--group: {problem}")
    if args.capacity < 0:
        raise SuperagentError("--capacity must be 0 or more")
    trusted = tuple(n.strip() for value in args.trusted_proxy or []
                    for n in value.split(",") if n.strip())
    for network in trusted:
        try:
            ipaddress.ip_network(network)
        except ValueError:
            raise SuperagentError(f"--trusted-proxy {network!r} is not an IP network"
                                  " (e.g. 10.0.0.0/8 or 10.0.0.2)") from None
    coordinator: tuple[str, ...] = ()
    advertise = None
    if args.coordinator:
        coordinator = parse_coordinator_urls(args.coordinator)
        if args.advertise:
            host, port = parse_address(args.advertise, source="--advertise",
                                       key=args.advertise)
            if host in ("0.0.0.0", "::"):
                raise SuperagentError(f"--advertise {args.advertise}: give an address"
                                      " coordinators can reach, not a wildcard")
            advertise = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        elif rpc[0] in ("0.0.0.0", "::", ""):
            raise SuperagentError(f"--rpc {args.rpc} is not an address coordinators can"
                                  " reach: give --advertise HOST:PORT")
    tls_listen, tls_cert, tls_key = _participant_tls(args, listen)
    config = AgentConfig(
        data_dir=Path(args.data_dir).resolve(), secret=secret, join_token=join_token,
        node=args.node or socket.gethostname(), rpc=rpc, listen=listen,
        proxy_workers=args.proxy_workers or os.cpu_count() or 1, parser=args.parser,
        groups=groups, coordinator=coordinator, advertise=advertise,
        capacity=args.capacity, trusted_proxies=trusted, tls_listen=tls_listen,
        tls_cert=tls_cert, tls_key=tls_key, agent_cgroup=True)
    agent = Agent(config)
    _serve_until_signal(agent.run, before_exit=agent.stop_all if args.stop_on_exit else None)
    return 0


def _serve_until_signal(run: Callable[..., Awaitable[None]], *,
                        before_exit: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run a service (``await nursery.start(run)``) until SIGTERM or SIGINT."""
    import signal

    import trio

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(run)
                async for _ in signals:
                    break
                if before_exit is not None:
                    await before_exit()
                nursery.cancel_scope.cancel()

    trio.run(main)


def _read_value(path: str | None, option: str, env: str) -> str:
    """The value in file ``path`` (``option``), else in the environment variable ``env``."""
    import os
    from pathlib import Path

    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise SuperagentError(f"cannot read {option} {path}: {exc.strerror}") from None
    return os.environ.get(env, "").strip()


def _coordinator_secrets(args: argparse.Namespace) -> tuple[str, str]:
    """(the coordinators' secret, the legacy participant secret or "").

    With --coordinator-secret-file (or SUPERAGENT_COORDINATOR_SECRET), the old shared
    secret (--secret-file, SUPERAGENT_SECRET), if still given, is only accepted from
    participants that have not been enrolled yet. Without it, the shared secret is both,
    as before machine credentials (docs/coordinator.md, "Migrating")."""
    import structlog

    own = _read_value(args.coordinator_secret_file, "--coordinator-secret-file",
                      "SUPERAGENT_COORDINATOR_SECRET")
    shared = _read_value(args.secret_file, "--secret-file", "SUPERAGENT_SECRET")
    if own:
        if own == shared:
            raise SuperagentError("the coordinators' secret must differ from the shared"
                                  " participant secret")
        return own, shared
    if not shared:
        raise SuperagentError("the coordinators' secret is required:"
                              " --coordinator-secret-file FILE or the"
                              " SUPERAGENT_COORDINATOR_SECRET environment variable")
    structlog.get_logger("superagent.cli").warning(
        "participants share the coordinators' secret (--secret-file alone): any of them"
        " can reach the Raft port; enrol them with join tokens and restart the"
        " coordinators with --coordinator-secret-file (docs/coordinator.md, Migrating)")
    return shared, shared


def _participant_tls(args: argparse.Namespace, listen: tuple[str, ...]
                     ) -> tuple[tuple[str, ...], str | None, str | None]:
    """The proxy's TLS listeners and their certificate and key files (absolute) from the
    participant's flags. Usage errors stop the agent (status 2); files that do not load
    (not there yet at boot, mid-renewal) do not: the plain listeners serve and the TLS ones
    wait for the pair (superagent/proxy/tls.py), so a restart policy is never needed."""
    from pathlib import Path

    import structlog

    from superagent.config import parse_address
    from superagent.errors import ConfigError
    from superagent.proxy.tls import CertFiles, listener_problem, load_context

    tls_listen = tuple(args.tls_listen or ())
    plain = [parse_address(a, source="--listen", key=a) for a in listen]
    secure = [parse_address(a, source="--tls-listen", key=a) for a in tls_listen]
    problem = listener_problem(plain, secure, cert=bool(args.tls_cert), key=bool(args.tls_key),
                               name=lambda setting: "--" + setting.replace("_", "-"))
    if problem is not None:
        flag = "--" + problem.setting.replace("_", "-")
        where = "" if problem.address is None else (
            f"{flag} {problem.address[0]}:{problem.address[1]}: ")
        raise SuperagentError(where + problem.message)
    cert = str(Path(args.tls_cert).resolve()) if args.tls_cert else None
    key = str(Path(args.tls_key).resolve()) if args.tls_key else None
    if cert is not None:
        try:
            load_context(CertFiles(cert=cert, key=key))
        except ConfigError as exc:
            structlog.get_logger("superagent.cli").warning(
                "TLS certificate does not load yet; the TLS listeners refuse handshakes"
                " until it does (the plain ones serve)", error=str(exc))
    return tls_listen, cert, key


def _participant_credentials(args: argparse.Namespace) -> tuple[str, str]:
    """(legacy shared secret or "", join token or ""); an enrolled machine needs neither
    (its credential is in its data dir)."""
    from pathlib import Path

    from superagent.rpc.credentials import CREDENTIAL_FILE, JOIN_TOKEN_PREFIX

    token = args.join_token or _read_value(args.join_token_file, "--join-token-file",
                                           "SUPERAGENT_JOIN_TOKEN")
    if token and not token.startswith(JOIN_TOKEN_PREFIX):
        raise SuperagentError(f"the join token must start with {JOIN_TOKEN_PREFIX!r}: make"
                              " one with `superagent nodes join-token`")
    secret = _read_value(args.secret_file, "--secret-file", "SUPERAGENT_SECRET")
    enrolled = (Path(args.data_dir) / CREDENTIAL_FILE).exists()
    if not (token or secret or enrolled):
        raise SuperagentError("this machine has no credential yet: give --join-token TOKEN"
                              " (or --join-token-file FILE, env SUPERAGENT_JOIN_TOKEN);"
                              " an admin makes one with `superagent nodes join-token`")
    return secret, token


def _coordinator(args: argparse.Namespace) -> int:
    from pathlib import Path

    from superagent.config import parse_address
    from superagent.coordinator.autoscale import parse_timing
    from superagent.coordinator.commands import NODE_NAME
    from superagent.coordinator.deploy.outcomes import MAX_WATCH_WINDOW, WATCH_WINDOW
    from superagent.coordinator.service import Coordinator, CoordinatorConfig

    if not NODE_NAME.fullmatch(args.id):
        raise SuperagentError(f"--id {args.id!r} must match {NODE_NAME.pattern}")
    peers: dict[str, str] = {}
    for item in (args.peers or "").split(","):
        if not item.strip():
            continue
        cid, sep, address = item.strip().partition("=")
        if not sep or not NODE_NAME.fullmatch(cid):
            raise SuperagentError(f"--peers: {item!r} is not ID=HOST:PORT")
        host, port = parse_address(address, source="--peers", key=cid)
        peers[cid] = f"{host}:{port}"
    if not peers:
        host, port = parse_address(args.raft, source="--raft", key=args.raft)
        peers = {args.id: f"{host}:{port}"}
    if args.id not in peers:
        raise SuperagentError(f"--peers must include this coordinator's own id {args.id!r}")
    if args.api_url and not args.api_url.startswith(("http://", "https://")):
        raise SuperagentError(f"--api-url {args.api_url!r} must start with http:// or https://")
    if args.node_timeout <= 0:
        raise SuperagentError("--node-timeout must be positive")
    if not 0 <= args.drain_wait <= MAX_DRAIN_WAIT:
        raise SuperagentError(f"--drain-wait must be 0..{MAX_DRAIN_WAIT:g} seconds")
    watch_window = WATCH_WINDOW if args.watch_window is None else args.watch_window
    if not 0 <= watch_window <= MAX_WATCH_WINDOW:  # not NaN either
        raise SuperagentError(f"--watch-window must be 0..{MAX_WATCH_WINDOW:g} seconds")
    try:
        timing = parse_timing(args.autoscale_timing or "")
    except ValueError as exc:
        raise SuperagentError(f"--autoscale-timing: {exc}") from None
    secret, shared = _coordinator_secrets(args)
    config = CoordinatorConfig(
        id=args.id, peers=peers, api=parse_address(args.api, source="--api", key=args.api),
        data_dir=Path(args.data_dir).resolve(), secret=secret, participant_secret=shared,
        api_url=args.api_url or "",
        admin_token_file=Path(args.admin_token_file) if args.admin_token_file else None,
        node_timeout=args.node_timeout, drain_wait=args.drain_wait, autoscale=timing,
        watch_window=watch_window)
    _serve_until_signal(Coordinator(config).run)
    return 0


def _up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from superagent.config import parse_address
    from superagent.up import UpConfig, run_up

    parse_address(args.listen, source="--listen", key=args.listen)
    return run_up(UpConfig(state_dir=Path(args.state_dir).resolve(),
                           api=parse_address(args.api, source="--api", key=args.api),
                           raft=parse_address(args.raft, source="--raft", key=args.raft),
                           rpc=parse_address(args.rpc, source="--rpc", key=args.rpc),
                           listen=args.listen, demo=args.demo))


def _version(args: argparse.Namespace) -> int:
    """The version, and whether this installation's proxy hot path runs compiled."""
    from superagent.compiled import hot_path

    compiled, why = hot_path()
    if args.json:
        print(json.dumps({"version": __version__, "proxy_hot_path":
                          "compiled" if compiled else "pure", "reason": why}))
    else:
        print(f"superagent {__version__}\nproxy hot path: "
              f"{'compiled' if compiled else 'pure Python'} ({why})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="superagent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"superagent {__version__}")
    parser.add_argument("--log-level", default="info",
                        choices=("debug", "info", "warning", "error"))
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    version = sub.add_parser("version", help="the version, and whether the proxy's hot path"
                                             " runs compiled here (and why not)")
    version.set_defaults(func=_version)

    up = sub.add_parser("up", help="run a single-machine cluster here (coordinator +"
                                   " participant + proxy)")
    up.add_argument("--demo", action="store_true", help="also deploy the bundled demo app")
    up.add_argument("--state-dir", default=".superagent", metavar="DIR",
                    help="where the cluster keeps everything (default ./.superagent)")
    up.add_argument("--api", default="127.0.0.1:7100", metavar="HOST:PORT",
                    help="coordinator API address (default 127.0.0.1:7100)")
    up.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                    help="the proxy's address (default 127.0.0.1:8080)")
    up.add_argument("--raft", default="127.0.0.1:7110", metavar="HOST:PORT",
                    help="the coordinator's Raft address (default 127.0.0.1:7110)")
    up.add_argument("--rpc", default="127.0.0.1:7001", metavar="HOST:PORT",
                    help="the participant's RPC address (default 127.0.0.1:7001)")
    up.set_defaults(func=_up)

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
    part.add_argument("--tls-listen", action="append", metavar="HOST:PORT",
                      help="proxy listener that speaks TLS, repeatable (needs --tls-cert)")
    part.add_argument("--tls-cert", metavar="FILE",
                      help="PEM certificate chain of the TLS listeners; re-read when it changes")
    part.add_argument("--tls-key", metavar="FILE",
                      help="PEM private key of --tls-cert (default: in the same file)")
    part.add_argument("--proxy-workers", type=int, metavar="N",
                      help="proxy worker processes (default: one per CPU)")
    part.add_argument("--parser", choices=("httptools", "h11"), default="httptools")
    part.add_argument("--node", help="node id (default: the host name)")
    part.add_argument("--group", action="append",
                      help="machine group, repeatable or comma-separated (default: default)")
    part.add_argument("--coordinator", action="append", metavar="URL[,URL...]",
                      help="coordinator API URLs to join (e.g. http://10.0.0.1:7100);"
                           " without it the agent runs alone")
    part.add_argument("--advertise", metavar="HOST:PORT",
                      help="the RPC address coordinators reach this agent at (default: --rpc)")
    part.add_argument("--capacity", type=int, default=100, metavar="N",
                      help="instances this node offers the cluster (default 100)")
    part.add_argument("--trusted-proxy", action="append", metavar="NETWORK[,NETWORK...]",
                      help="front load balancers (IP or network) whose X-Forwarded-* headers"
                           " the proxy keeps and appends to; others' are replaced")
    part.add_argument("--join-token", metavar="TOKEN",
                      help="enrol this machine with a join token (`superagent nodes"
                           " join-token`); it then keeps its own credential in --data-dir")
    part.add_argument("--join-token-file", metavar="FILE",
                      help="file with the join token (or env SUPERAGENT_JOIN_TOKEN)")
    part.add_argument("--secret-file", metavar="FILE",
                      help="legacy: the secret all participants shared before join tokens"
                           " (or env SUPERAGENT_SECRET)")
    part.add_argument("--stop-on-exit", action="store_true",
                      help="stop apps and proxy workers when the agent exits (default: they"
                           " keep serving and a restarted agent re-adopts them)")
    part.set_defaults(func=_participant)

    coord = sub.add_parser("coordinator", help="run a coordinator (the replicated control plane)")
    coord.add_argument("--id", default="c1", help="this coordinator's id (default c1)")
    coord.add_argument("--peers", metavar="ID=HOST:PORT,...",
                       help="every coordinator's Raft address, this one included"
                            " (default: a single-node cluster on --raft)")
    coord.add_argument("--raft", default="127.0.0.1:7110", metavar="HOST:PORT",
                       help="Raft address of a single-node cluster (default 127.0.0.1:7110)")
    coord.add_argument("--api", default="127.0.0.1:7100", metavar="HOST:PORT",
                       help="HTTP API address (default 127.0.0.1:7100)")
    coord.add_argument("--api-url", metavar="URL",
                       help="the API's URL as peers and participants reach it"
                            " (default http://<--api>)")
    coord.add_argument("--data-dir", default=".superagent/coordinator", metavar="DIR",
                       help="Raft journal, snapshots and artifacts"
                            " (default .superagent/coordinator)")
    coord.add_argument("--coordinator-secret-file", metavar="FILE",
                       help="file with the coordinators' own secret (or env"
                            " SUPERAGENT_COORDINATOR_SECRET): Raft and peer calls;"
                            " participants never get it")
    coord.add_argument("--secret-file", metavar="FILE",
                       help="legacy: the secret participants shared (or env"
                            " SUPERAGENT_SECRET); alone, it is also the coordinators' secret")
    coord.add_argument("--admin-token-file", metavar="FILE",
                       help="where the first leader writes the admin token it creates (0600)")
    coord.add_argument("--node-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="a participant silent this long is marked down (default 10)")
    coord.add_argument("--drain-wait", type=float, default=5.0, metavar="SECONDS",
                       help="a draining node keeps its instances this long, so the front load"
                            " balancer takes it out first (default 5)")
    coord.add_argument("--watch-window", type=float, metavar="SECONDS",
                       help="a deploy's last batch watches its new instances this long after"
                            " their switch before the old ones stop, catching a release that"
                            " dies soon after ready (default 3)")
    coord.add_argument("--autoscale-timing", metavar="NAME=SECONDS,...",
                       help="the autoscalers' window, down_window, up_cooldown and"
                            " down_cooldown (defaults 30, 60, 10, 60); e.g."
                            " window=4,up_cooldown=2 for a test")
    coord.set_defaults(func=_coordinator)

    from superagent.client_cli import add_client_commands
    from superagent.client_cluster import add_cluster_commands
    from superagent.client_logs import add_log_commands
    from superagent.client_scale import add_scale_commands
    from superagent.client_tokens import add_access_commands
    from superagent.client_trust import add_trust_commands

    parsers = add_client_commands(sub)
    add_trust_commands(add_scale_commands(sub, parsers["nodes"]))
    add_access_commands(sub)
    add_log_commands(sub)
    add_cluster_commands(sub, parsers["cluster"])
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
        sys.stdout.flush()  # here, so that a closed pipe is caught below
    except (SuperagentError, BaseExceptionGroup) as exc:
        error = _our_error(exc)
        if error is None:
            raise
        if getattr(args, "json", False):
            print(json.dumps({"error": _error_code(error), "detail": str(error),
                              "command": args.command}), file=sys.stderr)
        else:
            print(f"superagent {args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`superagent status --json | head`): not an error of ours.
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return result


def _error_code(error: SuperagentError) -> str:
    """A stable name for ``--json`` error output: the API's code when the coordinator
    gave one, else the error's class in snake case (``ConfigError`` -> ``config_error``),
    as the API's codes are written."""
    code = getattr(error, "code", "")
    if isinstance(code, str) and code:
        return code
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", type(error).__name__).lower()


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
