"""Loopback ports for test servers, handed out so that concurrent tests do not collide.

Policy (why each rule):

- **Outside the kernel's ephemeral range.** Binding port 0 and closing hands out a port from
  ``/proc/sys/net/ipv4/ip_local_port_range`` (32768-60999 by default): between the close
  and the test server's bind, any outgoing connection on the machine may take it as its
  local port. Ports outside that range are never picked by the kernel. With the default
  range the pool is 20000-32767; with another range it is the larger stretch of
  20000-65535 left outside it (``pool()``).
- **Not 10000-19999**: the product's instance ports (a participant's port range) live there.
- **Never the same port twice in one process.** A process-wide cursor walks the pool from a
  random offset (so concurrent test processes start far apart) and wraps only after
  handing out the whole pool, which no test run comes near.
- **Checked before it is handed out**: the port must bind on 127.0.0.1 for TCP (and UDP
  when asked) without ``SO_REUSEADDR``, so a port still held by a listener or by a
  connection in TIME_WAIT is skipped.

This narrows the race to another process picking the same port from its own cursor in the
instant between the check and the bind, which the random offsets make unlikely.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default, used when the file cannot be read
LOWEST = 20000  # below: 10000-19999 are the product's instance ports, lower ones services'
HIGHEST = 65535
MIN_POOL = 1000  # fewer ports than this outside the ephemeral range: refuse, do not guess

_lock = threading.Lock()
_cursor: int | None = None  # offset into pool() of the next candidate; random at first use


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range ``(low, high)``, inclusive."""
    try:
        low, high = EPHEMERAL_RANGE_FILE.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def pool(ephemeral: tuple[int, int] | None = None) -> range:
    """The ports tests may use: the larger stretch of ``LOWEST..HIGHEST`` outside
    ``ephemeral`` (default: the kernel's). Raises RuntimeError when it is too small."""
    low, high = ephemeral or ephemeral_range()
    below = range(LOWEST, max(LOWEST, min(low, HIGHEST + 1)))
    above = range(max(LOWEST, high + 1), HIGHEST + 1)
    best = max(below, above, key=len)
    if len(best) < MIN_POOL:
        raise RuntimeError(f"the ephemeral port range {low}-{high} leaves fewer than "
                           f"{MIN_POOL} ports in {LOWEST}-{HIGHEST} for tests")
    return best


def bindable(port: int, *, udp: bool = False) -> bool:
    """Whether 127.0.0.1:``port`` binds right now for TCP (and UDP if ``udp``)."""
    kinds = [socket.SOCK_STREAM] + ([socket.SOCK_DGRAM] if udp else [])
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_ports(n: int, *, udp: bool = False) -> list[int]:
    """``n`` distinct ports that bind on 127.0.0.1 now, never handed out before by this
    process (see the module docstring). Raises RuntimeError when the pool has no ``n``
    bindable ports left."""
    global _cursor
    ports = pool()
    found: list[int] = []
    with _lock:
        if _cursor is None:
            # from the OS, not the random module: a test that seeds it must not make two
            # concurrent test processes start at the same offset
            _cursor = random.SystemRandom().randrange(len(ports))
        for _ in range(len(ports)):
            port = ports[_cursor]
            _cursor = (_cursor + 1) % len(ports)  # a skipped port is not retried either
            if bindable(port, udp=udp):
                found.append(port)
                if len(found) == n:
                    return found
    raise RuntimeError(f"no {n} bindable ports left in {ports} (found {found})")


def free_port(*, udp: bool = False) -> int:
    """One port, as ``free_ports(1)``."""
    return free_ports(1, udp=udp)[0]
