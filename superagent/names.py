"""Name rules every role checks the same way: app and group names, environment keys, sha256s.

An app name travels from the manifest into Raft commands, RPC signals, directory names,
Unix user names and cgroup names, so the coordinator, the participant and the manifest
must accept exactly the same names; a sha256 names a release archive in the artifact
store, in the Raft log and on a participant's disk. A machine group name is written in
an app's manifest (``[scale] groups``), given to ``superagent participant --group``,
sent in a node's registration and set by ``superagent nodes label``: all of them must
agree, or an app could ask for a group no node can ever join. Each rule is one pattern here, used
with ``fullmatch`` (``^...$`` with ``match`` would accept a trailing newline).
"""

from __future__ import annotations

import re
from typing import Final

# The name becomes the suffix of a Unix user name and a cgroup directory name, so it
# stays short and plain. (utmp and older useradd cap user names at 32 characters, so a
# prefixed 40-character name needs shortening by whoever creates the user.)
APP_NAME: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
# Group names are short labels shown in tables and logged in every placement reason.
GROUP_NAME_MAX: Final = 40
GROUP_NAME: Final = re.compile(rf"[a-z0-9][a-z0-9-]{{0,{GROUP_NAME_MAX - 1}}}")
ENV_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a POSIX shell variable name
SHA256: Final = re.compile(r"[0-9a-f]{64}")  # a sha256 as archives are named: lowercase hex


def is_app_name(value: str) -> bool:
    """Whether ``value`` is a valid app name (see ``APP_NAME``)."""
    return APP_NAME.fullmatch(value) is not None


def is_group_name(value: str) -> bool:
    """Whether ``value`` is a valid machine group name (see ``GROUP_NAME``)."""
    return GROUP_NAME.fullmatch(value) is not None


def group_name_problem(value: str) -> str | None:
    """Why ``value`` is not a group name (one sentence), or None when it is one."""
    if is_group_name(value):
        return None
    return (f"{value!r} is not a valid group name: use 1-{GROUP_NAME_MAX} lower-case letters,"
            " digits and '-', starting with a letter or digit")


def is_sha256(value: str) -> bool:
    """Whether ``value`` is a sha256 hex digest as superagent writes them (lowercase)."""
    return SHA256.fullmatch(value) is not None
