"""``superagent backup`` as a user runs it, against what can go wrong on the client's side:
a target it cannot write, and an answer cut off mid-stream. One line, no traceback, no
file left half written."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli import assert_one_line_error, run


@pytest.fixture
def cut_off_server() -> Iterator[str]:
    """A coordinator stand-in on loopback that announces a 1 MB backup, sends 10 bytes and
    closes the connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    data = conn.recv(65536)
                    if not data:
                        break
                    request += data
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-tar\r\n"
                             b"content-length: 1048576\r\n\r\n0123456789")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        listener.close()
        thread.join(timeout=5.0)


def test_a_backup_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "no-such-dir" / "b.tar"
    result = run("backup", str(target), "--server", "http://127.0.0.1:9",
                 "--token", "t")
    assert_one_line_error(result, "no-such-dir")


def test_a_backup_onto_a_directory_is_one_line(tmp_path: Path) -> None:
    result = run("backup", str(tmp_path), "--server", "http://127.0.0.1:9",
                 "--token", "t")
    assert_one_line_error(result, "directory")


def test_a_backup_cut_off_is_one_line_and_leaves_no_file(
        tmp_path: Path, cut_off_server: str) -> None:
    target = tmp_path / "b.tar"
    result = run("backup", str(target), "--server", cut_off_server, "--token", "t")
    assert_one_line_error(result, "cut off")
    assert list(tmp_path.iterdir()) == []
    to_stdout = run("backup", "-", "--server", cut_off_server, "--token", "t")
    assert to_stdout.returncode != 0 and "Traceback" not in to_stdout.stderr
    assert "cut off" in to_stdout.stderr
