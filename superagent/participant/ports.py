"""Loopback ports for app instances.

Every instance listens on ``127.0.0.1:$PORT`` with a port the agent hands out from
one range (10000-19999 by default). ``PortAllocator.allocate`` returns a port that
is not one of the proxy's own listener ports (``reserved``), is not held by a live
instance, and that nothing on the machine has bound right now: it binds
``127.0.0.1:port`` without SO_REUSEADDR/SO_REUSEPORT and closes at once, so a
listener on the port (also a ``0.0.0.0`` or dual-stack one) or a socket in
TIME_WAIT makes it skip the port.

The search is round-robin from just after the last port handed out. A released
port is therefore reused only after the whole range has gone round, so a new
instance never gets the port of an instance that just stopped, whose connections
the proxy may still be closing and whose late packets would otherwise reach a
stranger. After an agent restart ``adopt`` records the ports of the re-adopted
instances.

The probe is a check, not a reservation: between ``allocate`` and the app's own
bind another process could take the port, and the app then fails to start. The
default range lies below Linux's ephemeral range (``ip_local_port_range``,
32768-60999 by default), from which the kernel takes the local port of every
outgoing connection: a range inside it would have ports taken between the probe
and the app's bind. ``ephemeral_overlap`` tells the agent to warn when a
configured range overlaps it (``ip_local_reserved_ports`` fixes that for good).
Nothing here is async or shared between threads.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from pathlib import Path

from superagent.participant.errors import PortError, PortsExhaustedError

DEFAULT_LOW = 10000  # below the kernel's ephemeral range (see above)
DEFAULT_HIGH = 19999
PROBE_HOST = "127.0.0.1"  # where apps listen: a port free here is free for them
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class PortAllocator:
    """Hands out loopback ports from ``low..high`` (inclusive) round-robin.

    Owned by the participant's supervisor; ``reserved`` are the proxy's listener ports
    (updated with ``reserve``/``unreserve`` when its config changes).
    """

    def __init__(self, low: int = DEFAULT_LOW, high: int = DEFAULT_HIGH, *,
                 reserved: Iterable[int] = (), start: int | None = None) -> None:
        if not 1 <= low <= high <= 65535:
            raise PortError(f"bad port range {low}-{high}: need 1 <= low <= high <= 65535")
        self.low = low
        self.high = high
        self._reserved = set(reserved)
        self._allocated: set[int] = set()
        # where the next round-robin search starts; agents sharing a machine pass different
        # starts so that two of them rarely probe the same free port at the same moment
        self._next = low if start is None else low + (start - low) % (high - low + 1)

    def __repr__(self) -> str:
        return (f"<PortAllocator {self.low}-{self.high} allocated={len(self._allocated)} "
                f"reserved={len(self._reserved)} next={self._next}>")

    @property
    def allocated(self) -> frozenset[int]:
        """Ports handed out (or adopted) and not yet released."""
        return frozenset(self._allocated)

    @property
    def reserved(self) -> frozenset[int]:
        """Ports never handed out: the proxy's listeners."""
        return frozenset(self._reserved)

    def allocate(self) -> int:
        """A port free right now, recorded as handed out; raises ``PortsExhaustedError``."""
        size = self.high - self.low + 1
        for step in range(size):
            port = self.low + (self._next - self.low + step) % size
            if port in self._reserved or port in self._allocated or not port_is_free(port):
                continue
            self._allocated.add(port)
            self._next = port + 1 if port < self.high else self.low
            return port
        raise PortsExhaustedError(self.low, self.high, len(self._allocated))

    def release(self, port: int) -> None:
        """Give ``port`` back; it comes round again only after the rest of the range.

        Releasing a port that is not handed out is a no-op (a stop may be retried).
        """
        self._allocated.discard(port)

    def adopt(self, port: int) -> None:
        """Record ``port`` as held by a re-adopted instance (it may lie outside the range).

        Raises ``PortError`` when the port is reserved for the proxy or already held.
        """
        if port in self._reserved:
            raise PortError(f"port {port} is a proxy listener port", port=port)
        if port in self._allocated:
            raise PortError(f"port {port} is already held by another instance", port=port)
        self._allocated.add(port)

    def reserve(self, port: int) -> None:
        """Never hand out ``port`` from now on (an instance that holds it keeps it)."""
        self._reserved.add(port)

    def unreserve(self, port: int) -> None:
        """Let ``port`` be handed out again."""
        self._reserved.discard(port)


def port_is_free(port: int, host: str = PROBE_HOST) -> bool:
    """True when ``host:port`` can be bound right now (no SO_REUSEADDR, closed at once).

    Raises ``PortError`` when the probe itself fails (no loopback, out of descriptors).
    """
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError as exc:
        raise PortError(f"cannot probe port {port}: {exc}", port=port) from exc
    try:
        sock.bind((host, port))
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            return False
        raise PortError(f"cannot probe port {port} on {host}: {exc}", port=port) from exc
    finally:
        sock.close()
    return True


def ephemeral_overlap(low: int, high: int, source: Path = EPHEMERAL_RANGE
                      ) -> tuple[int, int] | None:
    """The part of ``low..high`` inside the kernel's ephemeral port range, or None."""
    try:
        first, last = (int(value) for value in source.read_text().split())
    except (OSError, ValueError):
        return None
    start, end = max(low, first), min(high, last)
    return (start, end) if start <= end else None
