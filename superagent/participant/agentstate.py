"""The agent's ``<data_dir>/state.json``: what a restarted agent needs.

``persist`` writes it atomically (temp file, fsync, rename) after every change, a
supervisor's restart of an instance included: the signal ledger, the instance sequence,
offline, routes, standbys, apps scaled to zero, debug sessions and each instance's
record (config, pid, start time). ``load_state`` reads it back at the agent's start
(the caller adopts the instances and routes it names).
"""

from __future__ import annotations

import json
import os
from typing import Any

from superagent.participant.agentview import AgentView
from superagent.participant.errors import ParticipantError
from superagent.participant.signals import SignalLedger

STATE_FILE = "state.json"
STATE_VERSION = 1


def load_state(agent: AgentView) -> dict[str, Any]:
    path = agent.config.data_dir / STATE_FILE
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ParticipantError(f"cannot read {path}: {exc}") from None
    agent.ledger = SignalLedger.from_json(doc.get("ledger", {}))
    agent._seq = int(doc.get("seq", 0))
    agent.is_offline = bool(doc.get("offline", False))
    agent.debug_sessions.load(doc.get("debug", {}))
    return doc


def persist(agent: AgentView) -> None:
    """Write state.json atomically (temp file, fsync, rename)."""
    doc = {
        "version": STATE_VERSION, "node": agent.config.node, "seq": agent._seq,
        "offline": agent.is_offline, "routes": agent.routes, "standby": agent.standby,
        "cold": [cold.to_json() for cold in agent.cold.values()],
        "ledger": agent.ledger.to_json(),
        "debug": agent.debug_sessions.to_json(),
        "instances": [inst.to_record() for inst in agent.instances.values()],
    }
    path = agent.config.data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
