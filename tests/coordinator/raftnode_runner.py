"""A RaftNode in its own process, driven by JSON lines on stdin (one reply line on stdout).

``python -m tests.coordinator.raftnode_runner --self 127.0.0.1:P --peers a,b --secret S
--data DIR``. Prints ``{"ready": true}`` once started, then answers requests:
``{"op": "propose", "cmd": {...}, "timeout": 2}``, ``{"op": "status"}``, ``{"op": "digest"}``,
``{"op": "counts"}``, ``{"op": "bench", "n": 200}``. EOF on stdin closes the node and exits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Self

import structlog
import trio

from superagent.coordinator.errors import NotLeader, RaftError, RaftTimeout
from superagent.coordinator.raft import RaftNode


class CounterState:
    """Test state machine: per-key counters; a command id applies at most once."""

    def __init__(self, counts: dict[str, int] | None = None,
                 seen: dict[str, dict[str, Any]] | None = None) -> None:
        self.counts: dict[str, int] = counts or {}
        self.seen: dict[str, dict[str, Any]] = seen or {}

    def __repr__(self) -> str:
        return f"<CounterState keys={len(self.counts)} ids={len(self.seen)}>"

    def apply(self, command_json: str) -> dict[str, Any]:
        cmd = json.loads(command_json)
        if cmd["id"] in self.seen:
            return {**self.seen[cmd["id"]], "duplicate": True}
        self.counts[cmd["key"]] = self.counts.get(cmd["key"], 0) + 1
        result = {"key": cmd["key"], "value": self.counts[cmd["key"]]}
        self.seen[cmd["id"]] = result
        return result

    def to_json(self) -> str:
        return json.dumps({"counts": self.counts, "seen": self.seen}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        doc = json.loads(text)
        return cls(doc["counts"], doc["seen"])

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


async def _handle(node: RaftNode, req: dict[str, Any]) -> dict[str, Any]:
    op = req["op"]
    if op == "status":
        return node.status()
    if op == "digest":
        return {"digest": node.read_state(lambda s: s.digest())}  # type: ignore[attr-defined]
    if op == "counts":
        return {"counts": node.read_state(lambda s: dict(s.counts))}  # type: ignore[attr-defined]
    if op == "propose":
        try:
            result = await node.propose(json.dumps(req["cmd"]), req.get("timeout", 2.0))
        except NotLeader as exc:
            return {"error": "not_leader", "leader": exc.leader}
        except RaftTimeout:
            return {"error": "timeout"}
        except RaftError as exc:
            return {"error": exc.reason}
        return {"result": result}
    if op == "bench":
        latencies = []
        for i in range(req["n"]):
            cmd = json.dumps({"id": f"bench-{os.getpid()}-{i}", "key": f"bench-{i}"})
            t0 = time.perf_counter()
            await node.propose(cmd, 2.0)
            latencies.append(time.perf_counter() - t0)
        return {"latencies": latencies}
    return {"error": f"unknown op {op!r}"}


async def _serve(node: RaftNode) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""
    async with trio.open_nursery() as nursery:
        await nursery.start(node.watch)
        while True:
            data = await stdin.receive_some()
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                reply = await _handle(node, json.loads(line))
                sys.stdout.write(json.dumps(reply) + "\n")
                sys.stdout.flush()
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--self", dest="self_address", required=True)
    parser.add_argument("--peers", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    node = RaftNode(args.self_address, [p for p in args.peers.split(",") if p], secret=args.secret,
                    data_dir=Path(args.data), state=CounterState())
    node.start()
    try:
        sys.stdout.write(json.dumps({"ready": True}) + "\n")
        sys.stdout.flush()
        trio.run(_serve, node)
    finally:
        node.close()


if __name__ == "__main__":
    main()
