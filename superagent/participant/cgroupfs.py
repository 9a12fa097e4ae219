"""Reading and writing cgroup files.

A cgroup file takes a whole value per ``write()`` call (a buffered write split in two
would be two values), and its content ends with a newline the value does not have.
"""

from __future__ import annotations

from pathlib import Path


def write(path: Path, value: str) -> None:
    """One write of ``value``."""
    with open(path, "w") as file:
        file.write(value)


def read(path: Path) -> str:
    """The file's value, without its trailing newline."""
    return path.read_text().strip()
