"""Undo what importing pysyncobj does to the ``socket`` module.

pysyncobj 0.3.x imports a Windows shim (``pysyncobj.win_inet_pton``) that replaces
``socket.inet_ntop`` for the whole process on every platform, with a function that fails on
Linux (``TypeError: not_windows() takes 0 positional arguments``). Anything else in the
process that formats an IPv6 address then breaks — psutil's connection listing among them.
``raft.py`` imports this module first, which keeps the originals, and calls ``restore()``
right after importing pysyncobj.
"""

from __future__ import annotations

import socket

_INET_NTOP = socket.inet_ntop
_INET_PTON = socket.inet_pton


def restore() -> None:
    """Put the standard library's functions back (idempotent)."""
    socket.inet_ntop = _INET_NTOP
    socket.inet_pton = _INET_PTON
