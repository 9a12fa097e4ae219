"""The operator's commands that say where apps run: ``scale`` and ``nodes label``.

``superagent scale APP --per-node K | --instances K [--groups a,b]`` posts the app's new
scale (``POST /api/v1/apps/{app}/scale``) and, unless ``--no-follow``, follows the scaling
by polling the app (``GET /api/v1/apps/{app}``) until the leader has ended it: each
node's ready/desired counts are printed as they change (ready: instances of the serving
release the node reports ready; desired: the placement), then the outcome. The exit status
is 0 when the scaling converged, 1 when it ended otherwise (``short``: the reason is
printed; ``replaced``: a newer scale or a deploy took over), 2 for an error.

Polling rather than a stream: a scaling is a handful of state changes over seconds, and a
poll survives a leader change without reconnect logic (a follower answers too; only the
leader knows what runs, so the counts show ``?`` until the leader answers).

``superagent nodes label NODE --groups a,b`` sets a node's groups
(``POST /api/v1/nodes/{node}/groups``); they win over the groups it registers with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from superagent.client import Client, ClientError
from superagent.client_cli import client_of, command, emit
from superagent.manifest import AUTOSCALE_METRICS, describe_scale
from superagent.names import group_name_problem

SCALE_POLL = 0.5  # seconds between looks at a scaling in progress
POLL_FAILURES = 20  # consecutive failed looks (a leader change takes a few) before giving up


def parse_groups(value: str) -> list[str]:
    """``a,b`` -> ["a", "b"], checked by the rule every role uses; raises ClientError."""
    groups = [g.strip() for g in value.split(",") if g.strip()]
    if not groups:
        raise ClientError("--groups needs at least one group name")
    for group in groups:
        problem = group_name_problem(group)
        if problem is not None:
            raise ClientError(f"--groups: {problem}")
    if len(set(groups)) != len(groups):
        raise ClientError("--groups lists a group twice")
    return groups


def scale_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request body from --per-node / --instances / --auto / --groups; raises
    ClientError."""
    if sum(x is not None for x in (args.per_node, args.instances, args.auto)) != 1:
        raise ClientError("give exactly one of --per-node K (K on every node of the groups),"
                          " --instances K (K in total) and --auto MIN:MAX (autoscaled)")
    if (args.target is not None or args.metric is not None) and args.auto is None:
        raise ClientError("--target and --metric go with --auto MIN:MAX")
    if args.per_node is not None and args.per_node < 0:
        raise ClientError("--per-node must be 0 or more")
    if args.instances is not None and args.instances < 1:
        raise ClientError("--instances must be 1 or more")
    body: dict[str, Any]
    if args.auto is not None:
        body = {"auto": _auto(args.auto, args.target, args.metric)}
    elif args.per_node is not None:
        body = {"per_node": args.per_node}
    else:
        body = {"instances": args.instances}
    if args.groups is not None:
        body["groups"] = parse_groups(args.groups)
    return body


def _auto(bounds: str, target: float | None, metric: str | None) -> dict[str, Any]:
    """``MIN:MAX`` with --target (required) and --metric as the API's ``auto`` object."""
    low, sep, high = bounds.partition(":")
    if not sep or not low.isdigit() or not high.isdigit():
        raise ClientError(f"--auto takes MIN:MAX, e.g. 2:10, not {bounds!r}")
    if int(low) > int(high) or int(low) < 1:
        raise ClientError(f"--auto {bounds}: MIN must be at least 1 and not above MAX")
    if target is None:
        raise ClientError("--auto needs --target N: the in-flight requests (or, with"
                          " --metric cpu, the cores) one instance should carry")
    if not target > 0:
        raise ClientError("--target must be above 0")
    auto: dict[str, Any] = {"min": int(low), "max": int(high), "target": target}
    if metric is not None:
        auto["metric"] = metric
    return auto


def node_counts(view: dict[str, Any]) -> dict[str, str]:
    """Node -> "ready/desired" for an app view ("?" for ready where it is not known)."""
    placement: dict[str, int] = view.get("placement") or {}
    instances: dict[str, list[dict[str, Any]]] | None = view.get("instances")
    release = view.get("current_release")
    counts: dict[str, str] = {}
    for node in sorted({*placement, *(instances or {})}):
        if instances is None:
            ready = "?"
        else:
            # before the first deploy nothing should run: any ready instance counts
            ready = str(sum(1 for i in instances.get(node, []) if i.get("state") == "ready"
                            and (release is None or i.get("release") == release)))
        counts[node] = f"{ready}/{placement.get(node, 0)}"
    return counts


def _print_progress(view: dict[str, Any], shown: dict[str, str]) -> None:
    reason = view.get("placement_reason") or ""
    if reason and shown.get("") != reason:
        print(f"  {reason}", file=sys.stderr, flush=True)
    shown[""] = reason
    for node, text in node_counts(view).items():
        if shown.get(node) != text:
            shown[node] = text
            print(f"  {node}: {text} ready", file=sys.stderr, flush=True)


def _look(client: Client, app: str) -> dict[str, Any]:
    """The app's view, riding out a few failed looks (a leader election, a restart)."""
    failures = 0
    while True:
        try:
            view: dict[str, Any] = client.get(f"/api/v1/apps/{app}")
            return view
        except ClientError as exc:
            failures += 1
            if exc.status not in (0, 502, 503, 504) or failures >= POLL_FAILURES:
                raise
            time.sleep(SCALE_POLL)


def follow_scale(client: Client, app: str, scale_id: str) -> dict[str, Any]:
    """Poll until scaling ``scale_id`` of ``app`` is over; its ended record (with
    ``outcome`` and ``reason``)."""
    shown: dict[str, str] = {}
    while True:
        view = _look(client, app)
        _print_progress(view, shown)
        scaling = view.get("scaling")
        if scaling is None or scaling.get("id") != scale_id:
            last = view.get("last_scaling") or {}
            if last.get("id") == scale_id:
                return dict(last)
            newer = f"scaling {scaling['id']}" if scaling else "a newer scaling"
            return {"id": scale_id, "outcome": "replaced", "reason": f"replaced by {newer}"}
        time.sleep(SCALE_POLL)


def _scale(args: argparse.Namespace) -> int:
    body = scale_body(args)
    client = client_of(args)
    doc = client.post(f"/api/v1/apps/{args.app}/scale", json=body)
    print(f"{args.app}: scaling {doc['scale_id']} to {describe_scale(doc['scale'])}",
          file=sys.stderr, flush=True)
    if args.no_follow:
        return emit(args, doc, lambda d: d["scale_id"])
    ended = follow_scale(client, args.app, doc["scale_id"])
    if args.json:
        print(json.dumps(ended, indent=2))
    else:
        reason = f": {ended['reason']}" if ended.get("reason") else ""
        print(f"{args.app}: {describe_scale(doc['scale'])} {ended['outcome']}{reason}")
    return 0 if ended["outcome"] == "converged" else 1


def _label(args: argparse.Namespace) -> int:
    groups = parse_groups(args.groups)
    doc = client_of(args).post(f"/api/v1/nodes/{args.node}/groups", json={"groups": groups})
    return emit(args, doc, lambda d: f"{d['node']}: groups {','.join(d['groups'])}"
                + ("" if d.get("changed", True) else " (unchanged)"))


def add_scale_commands(sub: Any, nodes: argparse.ArgumentParser) -> Any:
    """``scale`` on the top level, ``label`` under the ``nodes`` parser; returns the
    ``nodes`` parser's sub-commands, for other modules to add theirs."""
    with command(sub, "scale", "change how many instances of an app run, and where",
                 _scale) as scale:
        scale.add_argument("app")
        scale.add_argument("--per-node", type=int, metavar="K",
                           help="K instances on every eligible node of the groups")
        scale.add_argument("--instances", type=int, metavar="K",
                           help="K instances in total, spread over the eligible nodes")
        scale.add_argument("--auto", metavar="MIN:MAX",
                           help="autoscale between MIN and MAX instances in total")
        scale.add_argument("--target", type=float, metavar="N",
                           help="with --auto: the load one instance should carry")
        scale.add_argument("--metric", choices=AUTOSCALE_METRICS,
                           help="with --auto: in_flight requests (default) or cpu cores")
        scale.add_argument("--groups", metavar="A,B",
                           help="machine groups the app runs in (default: its current ones)")
        scale.add_argument("--no-follow", action="store_true",
                           help="print the scaling id and return without waiting")
    nested = nodes.add_subparsers(dest="nodes_command", metavar="ACTION")
    with command(nested, "label", "set a node's groups (they win over its own --group)",
                 _label, nested=True) as label:
        label.add_argument("node")
        label.add_argument("--groups", required=True, metavar="A,B",
                           help="the node's machine groups, comma-separated")
    return nested
