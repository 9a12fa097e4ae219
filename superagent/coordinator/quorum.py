"""Safety checks of a change of the coordinators' membership: pure, decided before acting.

Theory of operation. Raft stays available while a majority of its members are live; a
membership change moves the majority. So a change is allowed only when the members that
are live *now* are still a majority of the membership *after* it: adding a member (which
counts as not live until it catches up) or removing one must never leave the cluster
where one more failure, or the change itself, loses the quorum silently. Concretely, with
``live`` the members the leader is connected to (itself included):

- add ``id`` at ``address``: ``id`` not a member yet (the same id at the same address is
  already done: ``noop``), the address not another member's, and
  ``live + joining > (members + 1) / 2``, where ``joining`` is 1 when something already
  answers on the new member's Raft port (it was started first, as documented) and 0
  otherwise. Counting it lets a lone coordinator grow to two (and then three); not
  counting a silent one keeps an add of a member that never comes up from stalling the
  cluster, which could then not even remove it again;
- remove ``id``: ``id`` a member and not the last one, and
  ``live - {id} > (members - 1) / 2``.

One change at a time is the caller's lock plus pysyncobj's own rule (no second change
before the first commits). Errors: ``BadRequest`` (400) for a malformed id or address,
``UnknownCoordinator`` (404), ``MembershipRefused`` (409) naming the numbers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Set
from dataclasses import dataclass

from superagent.coordinator.commands import NODE_NAME, RAFT_ADDRESS
from superagent.coordinator.errors import BadRequest, MembershipRefused, UnknownCoordinator

ADD, REMOVE = "add", "remove"


@dataclass(frozen=True, kw_only=True)
class MemberChange:
    """What to do: ``kind`` of ``coordinator`` at ``address``; ``noop`` when already done."""

    kind: str
    coordinator: str
    address: str
    members_after: tuple[str, ...]  # coordinator ids
    noop: bool = False


def plan_change(*, kind: str, coordinator: str, address: str,
                members: Mapping[str, str], live: Set[str],
                joining_answers: bool = False) -> MemberChange:
    """Check a change of ``members`` (id -> Raft address) given the ``live`` ids (and,
    for an add, whether the new member's Raft port answers).

    ``address`` is needed to add and ignored to remove. Raises BadRequest,
    UnknownCoordinator, MembershipRefused (see the module docstring)."""
    if NODE_NAME.fullmatch(coordinator) is None:
        raise BadRequest(f"coordinator id {coordinator!r} does not match {NODE_NAME.pattern}")
    alive = {m for m in live if m in members}
    if kind == ADD:
        if RAFT_ADDRESS.fullmatch(address) is None:
            raise BadRequest(f"Raft address {address!r} is not host:port")
        host, _, port_text = address.rpartition(":")
        port = int(port_text)
        if not 1 <= port <= 65535:  # the pattern allows 5 digits: such a member is unreachable
            raise BadRequest(f"Raft address {address!r}: port {port} is not 1..65535")
        if not _host_ok(host):  # nor can a host no resolver takes ever answer
            raise BadRequest(f"Raft address {address!r}: {host!r} is not an IP address or"
                             f" a host name")
        if members.get(coordinator) == address:
            return MemberChange(kind=kind, coordinator=coordinator, address=address,
                                members_after=tuple(sorted(members)), noop=True)
        if coordinator in members:
            raise MembershipRefused(f"coordinator {coordinator} is a member at"
                                    f" {members[coordinator]}: remove it first")
        owner = next((m for m, a in members.items() if a == address), None)
        if owner is not None:
            raise MembershipRefused(f"Raft address {address} is coordinator {owner}'s")
        after = (*sorted(members), coordinator)
        _majority(len(alive) + int(joining_answers), len(after), f"adding {coordinator}"
                  + ("" if joining_answers else f" (nothing answers at {address} yet)"))
        return MemberChange(kind=kind, coordinator=coordinator, address=address,
                            members_after=tuple(sorted(after)))
    if kind == REMOVE:
        if coordinator not in members:
            raise UnknownCoordinator(coordinator)
        if len(members) == 1:
            raise MembershipRefused(f"coordinator {coordinator} is the only member")
        after = tuple(sorted(m for m in members if m != coordinator))
        _majority(len(alive - {coordinator}), len(after), f"removing {coordinator}")
        return MemberChange(kind=kind, coordinator=coordinator,
                            address=members[coordinator], members_after=after)
    raise BadRequest(f"unknown membership change {kind!r}: add or remove")


_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _host_ok(host: str) -> bool:
    """An IP address ([bracketed] when IPv6 has a port after it) or a DNS name: labels of
    1..63 characters, 253 in all (what getaddrinfo accepts)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return bare == host and len(host) <= 253 and all(
            _LABEL.fullmatch(label) for label in host.split("."))
    return ip.version == 6 or bare == host  # no brackets round an IPv4 address


def _majority(live: int, size: int, what: str) -> None:
    if not live > size / 2:
        raise MembershipRefused(f"{what} would leave {live} live of {size} members, not a"
                                f" majority: bring the missing members back first")
