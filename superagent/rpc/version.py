"""The protocol's version and the rule for which peers interoperate.

Every request and every answer carries ``X-Superagent-Protocol: <major>.<minor>``.

- Peers with the same major version interoperate; a different major is refused
  (``VERSION_MISMATCH``, 400) with both versions named, by whichever side notices first.
- A minor version may only *add* optional fields whose absence keeps the old meaning (and
  new signals or queries, which an older peer answers with ``UNKNOWN_SIGNAL``). So a
  receiver ignores fields it does not know when the sender's minor is newer than its own,
  and refuses them otherwise (from an equal or older peer an unknown field is a bug).
- A request without the header comes from a peer older than the header (or from a tool
  such as curl): it is taken as 1.0, the protocol those peers spoke.

Anything else — removing or renaming a field, changing a type or a meaning — is a new major.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from superagent.rpc.errors import VersionMismatch

HEADER = "X-Superagent-Protocol"
_FORM = re.compile(r"(\d{1,4})\.(\d{1,4})")


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    @classmethod
    def parse(cls, text: str | None) -> Version:
        """The version a header states (None: ``LEGACY``); raises VersionMismatch for a
        header that is not ``<major>.<minor>``."""
        if text is None:
            return LEGACY
        found = _FORM.fullmatch(text.strip())
        if found is None:
            raise VersionMismatch(f"protocol version {text!r} is not <major>.<minor>"
                                  f" (this side speaks {CURRENT})")
        return cls(int(found.group(1)), int(found.group(2)))


# 1.1: Prepare.keep (the releases the coordinator wants kept prepared)
CURRENT = Version(1, 1)
LEGACY = Version(1, 0)  # what a peer that sends no header speaks


def check(peer: Version, *, ours: Version = CURRENT, peer_role: str = "peer") -> None:
    """Raise VersionMismatch unless ``peer`` interoperates with ``ours`` (same major)."""
    if peer.major != ours.major:
        raise VersionMismatch(f"the {peer_role} speaks protocol {peer}, this side speaks"
                              f" {ours}: major versions differ", peer=str(peer), ours=str(ours))


def lenient(peer: Version, *, ours: Version = CURRENT) -> bool:
    """Whether fields unknown to us may be ignored: the peer's minor is newer."""
    return peer.major == ours.major and peer.minor > ours.minor
