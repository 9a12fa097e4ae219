"""The host-wide nftables table that keeps loopback-only instances off the network.

Theory of operation
-------------------
One table, ``inet superagent_egress``, shared by every agent of the host. It holds a set
of group ids, ``loopback_gids``, and one output chain whose rules all start with ``meta
skgid @loopback_gids``: a packet of a socket whose owner's primary group is in the set

1. is rejected when it goes to port 53 (udp or tcp) on any address: the host's stub
   resolver (systemd-resolved on 127.0.0.53, dnsmasq or unbound on 127.0.0.1) forwards
   queries outside, so a name lookup would carry data out of a machine the app may not
   leave; a loopback-only app has nothing to resolve beyond ``localhost``, which the hosts
   file answers;
2. is rejected when its destination is not 127.0.0.0/8 or ::1.

The reject happens in the output hook, before routing sends the packet anywhere: connect
fails at once, a datagram send fails with EPERM, and nothing leaves the machine.

**Why a set of per-app groups.** Each loopback-only app has a group of its own,
``salo-<app>`` (``isolation.ensure_loopback_group``), which its instances get as their
primary group while their uid and their app's group (kept as a supplementary group) stay
the app's. Files an instance creates belong to the app's uid and that group, which no
other app's process has: unlike a group shared by all loopback-only apps, a umask of 002
opens them to no other tenant. The app's builds run with the app's own group, not in the
set, and keep fetching dependencies. A uid match (``meta skuid``) would catch the builds
too, and a cgroup match (``socket cgroupv2``, net_cls classids) needs a cgroup layout
that not every host has; the primary gid is set by the agent between fork and exec and
the app cannot change it (no CAP_SETGID, ``no_new_privs`` stops setgid binaries).

**Several agents, one table.** Every change is one ``nft -f`` transaction, atomic and
serialised by the kernel. The table, set and chain are declared (which keeps what
exists), then the chain is flushed and its rules added again, in the same transaction:
any number of agents may load it at any time and the chain always holds the rules once.
Set elements are only ever added (``add element`` of one present is a no-op), never
flushed: loading the table again does not remove another agent's apps. A firewall reload
(``nft flush ruleset``) deletes the table; each agent checks it every
``EGRESS_CHECK_PERIOD`` and loads it again with the groups of its own instances, so each
agent restores its own entries. (Earlier agents keyed the table on one shared group,
``sa-loopback``; while it exists its gid is in the set and in the two rules they wrote, so
an earlier agent still running beside this one finds its rules and leaves the table be.)

The scripts and the parsing of ``nft list`` are pure; ``run_nft`` is the one blocking
call (async callers use ``trio.to_thread``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable

EGRESS_TABLE = "superagent_egress"  # nftables table (family inet), host-wide
GID_SET = "loopback_gids"  # the set of primary groups whose sockets stay on loopback
DNS_PORT = 53  # the resolvers' port, refused even on loopback (they forward outside)
NFT_TIMEOUT = 10.0
_REJECT = "reject with icmpx admin-prohibited"
_RULES = (f"meta skgid @{GID_SET} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} {_REJECT}",
          f"meta skgid @{GID_SET} ip daddr != 127.0.0.0/8 {_REJECT}",
          f"meta skgid @{GID_SET} ip6 daddr != ::1 {_REJECT}")
RULE_COUNT = len(_RULES)
# the set's elements in ``nft list`` output: "set NAME { ... elements = { 1, 2,\n 3 } ... }"
_ELEMENTS = re.compile(rf"set {GID_SET} {{[^}}]*?elements = {{([^}}]*)}}", re.S)


def egress_ruleset(table: str, gids: Iterable[int] = (), *,
                   legacy_gid: int | None = None) -> str:
    """The nft script that loads ``table`` (one transaction): declares what is missing,
    replaces the chain's rules, and adds ``gids`` to the set, keeping its other elements.

    ``legacy_gid`` (the shared group of earlier agents, also in ``gids``) adds the rules
    those agents wrote, naming it: an earlier agent still running on the host checks for
    them and, not finding them, would delete and reload the whole table, set included."""
    legacy = () if legacy_gid is None else (
        f"meta skgid {legacy_gid} ip daddr != 127.0.0.0/8 {_REJECT}",
        f"meta skgid {legacy_gid} ip6 daddr != ::1 {_REJECT}")
    rules = "".join(f"    {rule}\n" for rule in (*_RULES, *legacy))
    return (f"table inet {table} {{\n"
            f"  set {GID_SET} {{ typeof meta skgid; }}\n"
            f"  chain output {{ type filter hook output priority 0; policy accept; }}\n"
            f"}}\n"
            f"flush chain inet {table} output\n"
            f"table inet {table} {{\n"
            f"  chain output {{\n{rules}  }}\n"
            f"}}\n"
            + admit_script(table, gids))


def admit_script(table: str, gids: Iterable[int]) -> str:
    """The nft script that adds ``gids`` to the table's set (none: empty)."""
    listed = ", ".join(str(gid) for gid in sorted(set(gids)))
    return f"add element inet {table} {GID_SET} {{ {listed} }}\n" if listed else ""


def parse_listing(text: str) -> tuple[int, frozenset[int]]:
    """(rules that use the set, gids in the set) from ``nft list table`` (text: the JSON
    output needs an nft built with it). Only the chain's rules name ``@set``."""
    rules = sum(f"@{GID_SET}" in line for line in text.splitlines())
    block = _ELEMENTS.search(text)
    gids = frozenset(int(n) for n in re.findall(r"\b\d+\b", block[1])) if block else frozenset()
    return rules, gids


def run_nft(*args: str, script: str | None = None) -> tuple[int, str]:
    """Run ``nft ARGS`` (``-f -`` with ``script`` on stdin): (returncode, stdout or the
    reason it failed). Never raises; returncode -1 when nft could not run."""
    nft = shutil.which("nft")
    if nft is None:
        return -1, "nft (nftables) is not installed"
    command = [nft, *args] if script is None else [nft, *args, "-f", "-"]
    try:
        done = subprocess.run(command, input=script, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, f"cannot run nft: {exc}"
    if done.returncode != 0:
        return done.returncode, done.stderr.strip()[:300]
    return 0, done.stdout


def install_egress_table(table: str, gids: Iterable[int] = (), *,
                         legacy_gid: int | None = None) -> str | None:
    """Load the egress table with ``gids`` in its set (see ``egress_ruleset``); None when
    done, else why not."""
    code, output = run_nft(script=egress_ruleset(table, gids, legacy_gid=legacy_gid))
    if code == -1:
        return output
    if code != 0:
        return f"nft refused the egress table: {output}"
    return None


def admit_gids(table: str, gids: Iterable[int], *, legacy_gid: int | None = None
               ) -> str | None:
    """Add ``gids`` to the table's set; None when done, else why not.

    The whole table is loaded with them (``egress_ruleset``), not just ``add element``: a
    firewall reload may have deleted it since the agent last looked, and an instance
    admitted into a missing set would start unrestricted and stay so."""
    gids = set(gids)
    if not gids:
        return None
    if legacy_gid is not None:  # egress_ruleset's rules for it need it in the set
        gids.add(legacy_gid)
    code, output = run_nft(script=egress_ruleset(table, gids, legacy_gid=legacy_gid))
    return None if code == 0 else f"cannot add groups to the egress set: {output}"


def egress_intact(table: str, gids: Iterable[int]) -> bool:
    """True when ``table`` holds all its rules and ``gids`` in its set."""
    code, output = run_nft("list", "table", "inet", table)
    if code != 0:
        return False
    rules, present = parse_listing(output)
    return rules == RULE_COUNT and set(gids) <= present


def remove_egress_table(table: str) -> None:
    """Delete ``table`` (tests; production keeps the host-wide table). Never raises."""
    run_nft("delete", "table", "inet", table)
