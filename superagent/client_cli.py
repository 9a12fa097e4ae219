"""The operator's commands: ``status``, ``cluster``, ``nodes``, ``apps``, node lifecycle
(``scale`` and ``nodes label`` are in ``client_scale``).

Each talks to the coordinator API through ``client.Client``; ``--json`` prints the API's
JSON as it is, otherwise a short table. Every client command, here and in the other
``client_*`` modules, gets its parser from ``command`` (its own arguments, then the
common ``--server``/``--token``/``--json``), and one that only shows a document is
``showing(path, render)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from superagent.client import Client, ClientError, resolve_servers, resolve_token

FOLLOW_TIMEOUT = 30.0  # seconds without a byte of the progress stream (keep-alives come every 5)
FOLLOW_RECONNECTS = 20
URLS_WAIT = 5.0  # seconds for the participants' heartbeats to name their proxy listeners
URLS_POLL = 0.25
DRAIN_POLL = 1.0  # seconds between looks at what still runs on a draining node

Handler = Callable[[argparse.Namespace], int]  # what runs a command: its exit status


def client_of(args: argparse.Namespace) -> Client:
    # nested commands (`nodes label`) leave the options out when not given: see add_common
    token, source = resolve_token(getattr(args, "token", None))
    return Client(resolve_servers(getattr(args, "server", None)), token, token_source=source)


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [["-" if c is None else str(c) for c in r]
                                          for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def emit(args: argparse.Namespace, doc: Any, render: Callable[[Any], str]) -> int:
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0


def showing(path: str, render: Callable[[Any], str]) -> Handler:
    """The command that GETs ``path`` and prints the answer with ``render`` (or as JSON
    with ``--json``); ``{name}`` fields in ``path`` are filled from the arguments."""

    def show(args: argparse.Namespace) -> int:
        return emit(args, client_of(args).get(path.format_map(vars(args))), render)
    return show


def _ago(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s ago"


def render_cluster(doc: dict[str, Any]) -> str:
    head = (f"leader {doc['leader'] or '(none)'}  term {doc['term']}  commit"
            f" {doc['commit_index']}  {'healthy' if doc['healthy'] else 'UNHEALTHY'}")
    rows = [(m["id"], m["raft"], m["api_url"], "yes" if m["connected"] else "no",
             "leader" if m["leader"] else "") for m in doc["members"]]
    if doc.get("artifacts_missing"):
        head += f"\n{doc['artifacts_missing']} artifacts not yet fetched by {doc['id']}"
    return head + "\n" + table(rows, ("ID", "RAFT", "API", "CONNECTED", "ROLE"))


SHOW_CLUSTER = showing("/api/v1/cluster", render_cluster)  # `cluster` and `cluster list`


def render_nodes(doc: dict[str, Any]) -> str:
    """NODE, ADDRESS, GROUPS ("*": labeled by the operator), LIFECYCLE, LIVE, INSTANCES
    (used/capacity; "?" used when the answer is not the leader's), HEARTBEAT."""
    if not doc["nodes"]:
        return "no participants registered"
    rows = [(n["name"], n["address"], ",".join(n["groups"]) + ("*" if n.get("labeled") else ""),
             n["lifecycle"], "up" if n["up"] else "DOWN",
             f"{'?' if n.get('instances_used') is None else n['instances_used']}"
             f"/{n['capacity']}", _ago(n.get("heartbeat_age")))
            for n in doc["nodes"]]
    out = table(rows, ("NODE", "ADDRESS", "GROUPS", "LIFECYCLE", "LIVE", "INSTANCES",
                       "HEARTBEAT"))
    if any(n.get("labeled") for n in doc["nodes"]):
        out += "\n* groups set by `superagent nodes label`"
    return out


def _scale_text(app: dict[str, Any]) -> str | None:
    scale = app.get("scale")
    if not scale:
        return None
    groups = ",".join(scale["groups"])
    auto = scale.get("auto")
    text = (f"{scale['instances']} in {groups}" if scale.get("instances") is not None
            else f"{scale['per_node']}/node in {groups}")
    if auto is not None:
        text += f" (auto {auto['min']}-{auto['max']})"
    return text + (" (scaling)" if app.get("scaling") else "")


def render_apps(doc: dict[str, Any]) -> str:
    if not doc["apps"]:
        return "no apps"
    rows = [(a["name"], a.get("team"), a["current_release"], a["latest_release"],
             a["releases"], _scale_text(a), sum((a.get("placement") or {}).values()),
             a.get("state") or "-",
             time.strftime("%Y-%m-%d %H:%M", time.localtime(a["updated_at"])))
            for a in doc["apps"]]
    out = table(rows, ("APP", "TEAM", "SERVING", "LATEST", "RELEASES", "SCALE", "PLACED",
                       "STATE", "UPDATED"))
    short = [f"{a['name']}: {a['placement_reason']}" for a in doc["apps"]
             if a.get("placement_reason")]
    return "\n".join([out, *short])





def render_audit(doc: dict[str, Any]) -> str:
    rows = [(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])), e["actor"],
             e["type"], e["target"], e["outcome"]) for e in doc["audit"]]
    return table(rows, ("AT", "ACTOR", "COMMAND", "TARGET", "OUTCOME")) if rows else (
        "no audit entries")


def render_instances(nodes: dict[str, Any], apps: dict[str, Any]) -> str:
    """Every instance the participants reported (node, port, state, release, routed) and
    each app's URLs."""
    rows = []
    for node in nodes["nodes"]:
        status = node.get("status") or {}
        routed = {i for ids in (status.get("routes") or {}).values() for i in ids}
        rows += [(i["app"], node["name"], i["id"], i["release"], i["state"], i["port"],
                  "yes" if i["id"] in routed else "")
                 for i in status.get("instances", [])]
    out = (table(sorted(rows), ("APP", "NODE", "INSTANCE", "RELEASE", "STATE", "PORT",
                                "ROUTED"))
           if rows else "no instances reported (instances show on the leader)")
    # a permission the manifest asks for that the node cannot enforce (no root, no nft,
    # no mount namespace): the instance runs, and this says it runs without it
    gaps = sorted(f"{i['id']} on {node['name']}: {', '.join(i['unenforced'])}"
                  for node in nodes["nodes"]
                  for i in (node.get("status") or {}).get("instances", [])
                  if i.get("unenforced"))
    if gaps:
        out += "\n\npermissions NOT enforced:\n" + "\n".join(f"  {gap}" for gap in gaps)
    urls = [(a["name"], " ".join(app_urls(a, nodes)) or "-") for a in apps["apps"]]
    return out + ("\n\n" + table(urls, ("APP", "URLS")) if urls else "")


def app_urls(app: dict[str, Any], nodes: dict[str, Any]) -> list[str]:
    """Where the app answers: its route rule on each live node's proxy listeners (the
    node's own address where a listener is on every interface)."""
    routes = app["spec"].get("routes", {})
    prefix, hosts, port = routes.get("prefix"), routes.get("hosts") or [], routes.get("port")
    if not (prefix or hosts or port):
        prefix = f"/{app['name']}"
    urls: list[str] = []
    for node in nodes["nodes"]:
        status = node.get("status") or {}
        if not node.get("up") or not status.get("listen"):
            continue
        node_host = node["address"].rsplit(":", 1)[0]
        for listener in status["listen"]:
            host, _, listen_port = listener.rpartition(":")
            host = node_host if host in ("", "0.0.0.0", "[::]", "::") else host
            if port:
                urls.append(f"http://{host}:{port}/")
            elif prefix:
                urls.append(f"http://{host}:{listen_port}{prefix.rstrip('/')}/")
            urls += [f"http://{name}:{listen_port}/" for name in hosts]
    return list(dict.fromkeys(urls))


def render_hot_paths(doc: dict[str, Any]) -> str:
    """Each node's proxy hot path (compiled or pure Python, and why), from its heartbeat;
    nothing from agents that do not report it."""
    lines = [f"{n['name']}: {(n.get('status') or {}).get('proxy_hot_path')}"
             for n in doc["nodes"] if (n.get("status") or {}).get("proxy_hot_path")]
    return "\n" + "\n".join(["proxy hot path:", *(f"  {line}" for line in lines)]
                             ) if lines else ""


def _status(args: argparse.Namespace) -> int:
    client = client_of(args)
    doc = {"cluster": client.get("/api/v1/cluster"), "nodes": client.get("/api/v1/nodes"),
           "apps": client.get("/api/v1/apps")}

    def render(d: dict[str, Any]) -> str:
        nodes = render_nodes(d["nodes"]) + render_hot_paths(d["nodes"])
        return "\n\n".join((render_cluster(d["cluster"]), nodes,
                            render_apps(d["apps"]), render_instances(d["nodes"], d["apps"])))
    return emit(args, doc, render)


def render_releases(doc: dict[str, Any]) -> str:
    if not doc["releases"]:
        return f"{doc['app']}: no releases"
    rows = [(r["name"], r["sha256"][:12], f"{r['size'] / 1024:.1f} KiB", r["actor"],
             time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"])),
             r.get("outcome") or ("succeeded" if r.get("served") else "not deployed"),
             "serving" if r.get("current") else "")
            for r in doc["releases"]]
    return table(rows, ("RELEASE", "SHA256", "SIZE", "BY", "CREATED", "LAST DEPLOY", ""))


def follow_deploy(client: Client, app: str, deploy_id: str, *, as_json: bool) -> int:
    """Print a deploy's progress per node until it is finished; 0 when it succeeded.

    The stream is read again after a lost connection (the deploy goes on without us); the
    server sends a keep-alive comment every few seconds, so silence means trouble."""
    shown: dict[str, str] = {}
    view: dict[str, Any] = {}
    path = f"/api/v1/apps/{app}/deploys/{deploy_id}/events"
    for _ in range(FOLLOW_RECONNECTS):
        try:
            with client.stream("GET", path, timeout=FOLLOW_TIMEOUT) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        view = json.loads(line[len("data: "):])
                        if not as_json:
                            _show_progress(deploy_id, view, shown)
        except httpx.HTTPError as exc:
            print(f"{deploy_id}: progress stream lost ({type(exc).__name__}); reconnecting",
                  file=sys.stderr, flush=True)
            time.sleep(1.0)
            continue
        if view.get("finished"):
            break
    else:
        raise ClientError(f"lost the progress of deploy {deploy_id}; it goes on: see"
                          f" `superagent --json` GET /api/v1/apps/{app}/deploys/{deploy_id}")
    if not view:
        view = client.get(f"/api/v1/apps/{app}/deploys/{deploy_id}")
    if as_json:
        print(json.dumps(view, indent=2))
    else:
        outcome = view["status"] + (f": {view['reason']}" if view["reason"] else "")
        print(f"{app}@{view['release']} {outcome}")
        for key, text in view.get("logs", []):
            print(f"--- {key} log ---\n{text.rstrip()}")
        if view["status"] == "succeeded":
            _print_urls(client, app)
    return 0 if view["status"] == "succeeded" else 1


def _print_urls(client: Client, app: str) -> None:
    """The app's URLs, as soon as a participant's heartbeat has told the coordinator its
    proxy listeners (one a second; waited for at most ``URLS_WAIT``)."""
    deadline = time.monotonic() + URLS_WAIT
    while True:
        try:
            urls = app_urls(client.get(f"/api/v1/apps/{app}"), client.get("/api/v1/nodes"))
        except ClientError:
            return  # the deploy succeeded; where it serves is shown by `superagent status`
        if urls or time.monotonic() >= deadline:
            break
        time.sleep(URLS_POLL)
    for url in urls:
        print(f"  {url}")


def _show_progress(deploy_id: str, view: dict[str, Any], shown: dict[str, str]) -> None:
    if shown.get("") != view["stage"]:
        shown[""] = view["stage"]
        print(f"{deploy_id}: {view['stage']}", file=sys.stderr, flush=True)
    for step in view["steps"]:
        text = step["step"] + (f" ({step['error']})" if step["error"] else "")
        if shown.get(step["node"]) != text:
            shown[step["node"]] = text
            print(f"  {step['node']}: {text}", file=sys.stderr, flush=True)


def _name_of_procfile_app(directory: Path) -> str | None:
    """A Procfile-only app (no superagent.toml) is named after its directory, as piku and
    Heroku name an app after its repository; None when that is no valid app name."""
    from superagent.manifest import MANIFEST, PROCFILE
    from superagent.names import is_app_name

    if (directory / MANIFEST).is_file() or not (directory / PROCFILE).is_file():
        return None
    name = directory.resolve().name.lower().replace("_", "-")
    if not is_app_name(name):
        raise ClientError(f"{directory}: the directory's name {name!r} is no valid app name"
                          " (lower-case letters, digits, '-'): give --app")
    print(f"{directory}: no {MANIFEST}: deploying the Procfile app as {name!r} (the "
          f"directory's name; --app chooses another)", file=sys.stderr)
    return name


def _deploy(args: argparse.Namespace) -> int:
    from superagent.pack import pack

    directory = Path(args.path)
    if not directory.is_dir():
        raise ClientError(f"{args.path}: not a directory")
    client = client_of(args)
    name = args.app or _name_of_procfile_app(directory)
    with tempfile.TemporaryFile() as archive:
        packed = pack(directory, archive, app=name)
        app = name or packed.app_name
        if app is None:
            raise ClientError(f"{args.path}: the manifest does not name the app: give --app")
        print(f"packed {packed.files} files ({packed.size / 1024:.1f} KiB, sha256"
              f" {packed.sha256[:12]}), uploading to {client.servers[0]}", file=sys.stderr)
        archive.seek(0)
        query = f"sha256={packed.sha256}"
        if args.force:
            query += "&force=true"
        if args.max_parallel:
            query += f"&max_parallel={args.max_parallel}"
        if args.team:
            query += f"&team={args.team}"
        doc = client.post(f"/api/v1/apps/{app}/releases?{query}", content=archive,
                          headers={"content-type": "application/gzip"})
    if doc.get("unchanged"):
        print(f"{app}: {doc['detail']}", file=sys.stderr)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            _print_urls(client, app)
        return 0
    print(f"{app}@{doc['release']} recorded; deploy {doc['deploy_id']}", file=sys.stderr)
    if args.no_follow:
        return emit(args, doc, lambda d: d["deploy_id"])
    return follow_deploy(client, app, doc["deploy_id"], as_json=args.json)


def _rollback(args: argparse.Namespace) -> int:
    client = client_of(args)
    body: dict[str, Any] = {"to": args.to} if args.to else {}
    if args.force:
        body["force"] = True
    doc = client.post(f"/api/v1/apps/{args.app}/rollback", json=body)
    print(f"{args.app}: rolling back to {doc['release']}; deploy {doc['deploy_id']}",
          file=sys.stderr)
    return follow_deploy(client, args.app, doc["deploy_id"], as_json=args.json)


def _lifecycle(action: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        client = client_of(args)
        doc = client.post(f"/api/v1/nodes/{args.node}/{action}")

        def render(d: dict[str, Any]) -> str:
            return f"{d['node']}: {d['lifecycle']}" + (
                "" if d.get("signalled") else " (participant not reached: it applies the"
                " lifecycle when it is)")
        if action != "drain" or args.no_wait:
            return emit(args, doc, render)
        if not args.json:
            print(render(doc), flush=True)
        left = _follow_drain(client, args.node, quiet=args.json)
        if args.json:
            return emit(args, {**doc, "running": left}, str)
        if left["lifecycle"] != "draining":
            print(f"{args.node}: no longer draining (now {left['lifecycle']})")
            return 1
        print(f"{args.node}: drained, nothing runs there; `superagent offline {args.node}`"
              " takes it out of service")
        return 0
    return run


def _follow_drain(client: Client, node: str, *, quiet: bool) -> dict[str, Any]:
    """Poll what still runs on a draining node until nothing does (or it stops draining);
    print what is left whenever it changes."""
    shown = ""
    while True:
        left: dict[str, Any] = client.get(f"/api/v1/nodes/{node}/running")
        if left["lifecycle"] != "draining" or not (left["instances"] or left["placed"]):
            return left
        line = f"{node}: still running {', '.join(left['instances']) or '-'}; placed " + (
            ", ".join(f"{app} x{n}" for app, n in left["placed"].items()) or "-")
        if line != shown and not quiet:
            print(line, flush=True)
            shown = line
        time.sleep(DRAIN_POLL)


def add_common(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """--server, --token, --json. A nested command's parser (``nodes label``) leaves an
    option out of the namespace when it is not given, or its default would overwrite
    what was given before the action (``nodes --server X label ...``)."""
    default = argparse.SUPPRESS if nested else None
    parser.add_argument("--server", metavar="URL[,URL...]", default=default,
                        help="coordinator API (default: env SUPERAGENT_SERVER or"
                             " http://127.0.0.1:7100)")
    parser.add_argument("--token", default=default,
                        help="API token (default: env SUPERAGENT_TOKEN or"
                             " ./.superagent/admin-token)")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")


@contextmanager
def command(parsers: Any, name: str, help_text: str, func: Handler, *,
            nested: bool = False) -> Iterator[argparse.ArgumentParser]:
    """The parser of command ``name`` under ``parsers``: the block adds the command's own
    arguments, then come the common options (``add_common``, last in its help) and the
    function that runs it."""
    parser = parsers.add_parser(name, help=help_text)
    yield parser
    add_common(parser, nested=nested)
    parser.set_defaults(func=func)


def add_client_commands(sub: Any) -> dict[str, argparse.ArgumentParser]:
    """Add the commands; returns the parsers of those that take nested actions (``nodes``,
    whose ``label`` ``client_scale.add_scale_commands`` adds)."""
    commands: list[tuple[str, str, Handler]] = [
        ("status", "cluster, nodes and apps at a glance", _status),
        ("cluster", "coordinator members, leader, term and health; `cluster add|remove`"
                    " changes them", SHOW_CLUSTER),
        ("nodes", "participants: groups, lifecycle, liveness, instances; `nodes label`"
                  " sets a node's groups", showing("/api/v1/nodes", render_nodes)),
        ("apps", "apps, their latest release and scale", showing("/api/v1/apps", render_apps)),
    ]
    parsers: dict[str, argparse.ArgumentParser] = {}  # those with nested commands
    for name, help_text, func in commands:
        with command(sub, name, help_text, func) as parser:
            parsers[name] = parser
    with command(sub, "audit", "who did what, newest first (deploys, scalings, autoscaler"
                 " decisions with their inputs, ...)",
                 showing("/api/v1/audit?limit={limit}", render_audit)) as audit:
        audit.add_argument("--limit", type=int, default=50, metavar="N",
                           help="entries to show (default 50)")
    with command(sub, "deploy", "pack a directory, upload it as a release and roll it out",
                 _deploy) as deploy:
        deploy.add_argument("path", help="the app's source directory (with superagent.toml"
                                         " or a Procfile)")
        deploy.add_argument("--app", help="app name (default: from the manifest; for a"
                                          " Procfile app, the directory's name)")
        deploy.add_argument("--max-parallel", type=int, metavar="N",
                            help="nodes rolled at once (default 1)")
        deploy.add_argument("--no-follow", action="store_true",
                            help="print the deploy id and return without waiting")
        deploy.add_argument("--force", action="store_true",
                            help="deploy even when the content is what the app already serves")
        deploy.add_argument("--team", help="the team a new app belongs to (default: the"
                                           " token's only team; for an admin, default)")
    with command(sub, "releases", "an app's releases",
                 showing("/api/v1/apps/{app}/releases", render_releases)) as releases:
        releases.add_argument("app")
    with command(sub, "rollback", "deploy an earlier release again", _rollback) as back:
        back.add_argument("app")
        back.add_argument("--to", metavar="rN", help="the release (default: the newest"
                                                     " earlier one that served)")
        back.add_argument("--force", action="store_true",
                          help="roll back to a release that never served")
    for action, help_text in (("drain", "move traffic off a node (its /-/healthz answers 503)"),
                              ("offline", "take a drained node out of service"),
                              ("online", "put a node back in service")):
        with command(sub, action, help_text, _lifecycle(action)) as parser:
            parser.add_argument("node")
            if action == "drain":
                parser.add_argument("--no-wait", action="store_true",
                                    help="return at once instead of following the drain"
                                         " until nothing runs on the node")
    return parsers
