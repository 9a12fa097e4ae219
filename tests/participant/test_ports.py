"""Tests of ``superagent.participant.ports``: real binds on loopback, small ranges."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from superagent.participant.errors import PortError, PortsExhaustedError
from superagent.participant.ports import PortAllocator, ephemeral_overlap, port_is_free

SEARCH = range(45000, 49000, 7)  # block starts probed for free test ranges


def free_block(size: int) -> int:
    """The first port of ``size`` consecutive ports that are free right now."""
    for start in SEARCH:
        if all(port_is_free(port) for port in range(start, start + size)):
            return start
    pytest.skip(f"no {size} consecutive free loopback ports in 45000-49000")


@pytest.fixture
def holder() -> Iterator[list[socket.socket]]:
    """Sockets the test binds to occupy ports; closed afterwards."""
    sockets: list[socket.socket] = []
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def occupy(holder: list[socket.socket], port: int, host: str = "127.0.0.1") -> None:
    """Bind and listen on ``host:port`` for the rest of the test."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen()
    holder.append(sock)


def test_allocate_returns_ports_in_range_in_order() -> None:
    """Consecutive allocations walk the range upwards and record each port."""
    low = free_block(4)
    ports = PortAllocator(low, low + 3)
    got = [ports.allocate() for _ in range(3)]
    assert got == [low, low + 1, low + 2]
    assert ports.allocated == frozenset(got)


def test_reserved_port_is_never_returned() -> None:
    """Reserved ports (the proxy's listeners) are skipped, also after unreserve/reserve."""
    low = free_block(3)
    ports = PortAllocator(low, low + 2, reserved=[low, low + 2])
    assert ports.allocate() == low + 1
    with pytest.raises(PortsExhaustedError):
        ports.allocate()
    ports.unreserve(low)
    assert ports.allocate() == low
    ports.release(low)
    ports.release(low + 1)
    ports.reserve(low + 1)
    ports.reserve(low)
    with pytest.raises(PortsExhaustedError):
        ports.allocate()
    assert ports.reserved == frozenset({low, low + 1, low + 2})


def test_port_bound_by_another_socket_is_skipped(holder: list[socket.socket]) -> None:
    """A port another socket listens on (loopback or wildcard) is never handed out."""
    low = free_block(3)
    occupy(holder, low)
    occupy(holder, low + 1, "0.0.0.0")
    ports = PortAllocator(low, low + 2)
    assert ports.allocate() == low + 2
    with pytest.raises(PortsExhaustedError):
        ports.allocate()


def test_released_port_not_reused_at_once() -> None:
    """Round-robin: a released port comes back only after the rest of the range."""
    low = free_block(3)
    ports = PortAllocator(low, low + 2)
    first = ports.allocate()
    ports.release(first)
    assert ports.allocate() == low + 1
    assert ports.allocate() == low + 2
    assert ports.allocate() == first  # wrapped round
    assert ports.allocated == frozenset({low, low + 1, low + 2})


def test_exhaustion_raises_typed_error() -> None:
    """A full range raises PortsExhaustedError naming the range."""
    low = free_block(2)
    ports = PortAllocator(low, low + 1)
    ports.allocate()
    ports.allocate()
    with pytest.raises(PortsExhaustedError) as caught:
        ports.allocate()
    assert (caught.value.low, caught.value.high) == (low, low + 1)
    assert f"{low}-{low + 1}" in str(caught.value)


def test_adopt_and_release() -> None:
    """Adopted ports are skipped; double adoption and reserved ports are refused."""
    low = free_block(3)
    ports = PortAllocator(low, low + 2, reserved=[low + 2])
    ports.adopt(low)
    ports.adopt(50999)  # outside the range: an instance started under an older config
    with pytest.raises(PortError):
        ports.adopt(low)
    with pytest.raises(PortError):
        ports.adopt(low + 2)
    assert ports.allocate() == low + 1
    ports.release(low)
    ports.release(low)  # idempotent
    ports.release(50999)
    assert ports.allocated == frozenset({low + 1})
    assert ports.allocate() == low


def test_repr_and_bad_range() -> None:
    """The repr shows range and counts; an inverted range is refused."""
    ports = PortAllocator(41000, 41009, reserved=[41000])
    assert repr(ports) == "<PortAllocator 41000-41009 allocated=0 reserved=1 next=41000>"
    with pytest.raises(PortError):
        PortAllocator(5000, 4000)


def test_ephemeral_overlap(tmp_path: Path) -> None:
    """The overlap with ip_local_port_range is computed from the proc file."""
    source = tmp_path / "ip_local_port_range"
    source.write_text("32768\t60999\n")
    assert ephemeral_overlap(41000, 48999, source) == (41000, 48999)
    source.write_text("49152 65535\n")
    assert ephemeral_overlap(41000, 48999, source) is None
    assert ephemeral_overlap(41000, 48999, tmp_path / "missing") is None


def test_start_offsets_the_first_search() -> None:
    """Agents sharing a machine start their searches at different points of the range."""
    assert "next=41005" in repr(PortAllocator(41000, 41009, start=41015))
    assert "next=41000" in repr(PortAllocator(41000, 41009))
