"""Tests of ``superagent.participant.nftegress``: the egress table's scripts (pure) and,
as root with nft, the table shared by several agents (a test-only table, removed after).
Whether the rules keep packets in is tested in ``test_permissions``."""

from __future__ import annotations

import grp
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest

from superagent.participant.nftegress import (
    GID_SET,
    RULE_COUNT,
    admit_gids,
    admit_script,
    egress_intact,
    egress_ruleset,
    install_egress_table,
    parse_listing,
    remove_egress_table,
    run_nft,
)
from superagent.participant.permissions import (
    PermissionSupport,
    detect_permissions,
    restore_egress_table,
)

AGENTS = 6  # agents loading the table at once in the concurrency test


def test_the_ruleset_keeps_other_agents_entries() -> None:
    """Loading the table declares, flushes only the chain, and adds elements: nothing in
    the script can drop the set's elements or the table."""
    script = egress_ruleset("t", [7, 5, 7])
    assert "delete" not in script and "flush set" not in script and "flush table" not in script
    assert "flush chain inet t output" in script
    assert script.endswith(f"add element inet t {GID_SET} {{ 5, 7 }}\n")
    assert script.count(f"meta skgid @{GID_SET}") == RULE_COUNT
    assert "th dport 53" in script  # the resolvers' port, on loopback too
    assert admit_script("t", []) == ""
    # the shared group of earlier agents gets the rules they look for, naming it
    legacy = egress_ruleset("t", [7], legacy_gid=7)
    assert legacy.count("meta skgid 7 ") == 2 and legacy.count("@") == RULE_COUNT


LISTING = """table inet t {
	set loopback_gids {
		typeof meta skgid
		elements = { 998, 999,
			1000 }
	}

	chain output {
		type filter hook output priority filter; policy accept;
		meta skgid @loopback_gids meta l4proto { tcp, udp } th dport 53 reject
		meta skgid @loopback_gids ip daddr != 127.0.0.0/8 reject with icmpx admin-prohibited
		meta skgid @loopback_gids ip6 daddr != ::1 reject with icmpx admin-prohibited
		meta skgid 4242 accept
	}
}
"""


def test_the_listing_is_read_defensively() -> None:
    """Rules using the set are counted and the set's gids read (over several lines); a
    table without them reads as empty."""
    assert parse_listing(LISTING) == (RULE_COUNT, frozenset({998, 999, 1000}))
    empty = LISTING.replace("elements = { 998, 999,\n\t\t\t1000 }\n", "")
    assert parse_listing(empty) == (RULE_COUNT, frozenset())
    for garbage in ("", "table inet t {\n}\n", "nonsense { elements = { 1 } }"):
        assert parse_listing(garbage) == (0, frozenset())


@pytest.fixture
def table() -> Iterator[str]:
    """A test-only egress table name; the table is deleted afterwards."""
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nft (nftables) to load an egress table")
    name = "satest_" + "".join(random.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=6))
    try:
        yield name
    finally:
        remove_egress_table(name)


def test_agents_loading_the_table_at_once_keep_each_others_groups(table: str) -> None:
    """Several agents load the table at the same moment, each with its own group, and
    one loads it again later: the chain holds its rules once and the set every group."""
    problems: list[str | None] = []
    threads = [threading.Thread(target=lambda gid=gid: problems.append(
        install_egress_table(table, [gid]))) for gid in range(60001, 60001 + AGENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == [None] * AGENTS
    assert install_egress_table(table, [60100]) is None  # an agent starting later
    code, listed = run_nft("list", "table", "inet", table)
    assert code == 0, listed
    assert parse_listing(listed) == (RULE_COUNT, frozenset(
        {*range(60001, 60001 + AGENTS), 60100}))
    assert admit_gids(table, [60001, 60200]) is None  # present already: no error
    assert egress_intact(table, [60001, 60100, 60200])


def test_the_egress_table_is_restored_only_when_gone(table: str) -> None:
    """``restore_egress_table`` leaves an intact table alone (the agent calls it every few
    seconds), loads a deleted one again with its own groups and the earlier agents' shared
    group, and adds one of its groups that went missing."""
    support = PermissionSupport(network_problem=None, filesystem_problem=None, table=table,
                                legacy_gid=60300)
    assert install_egress_table(table, [60300, 60301]) is None
    assert restore_egress_table(support, [60301]) is False
    remove_egress_table(table)
    assert restore_egress_table(support, [60301]) is True
    assert egress_intact(table, [60300, 60301])
    assert restore_egress_table(support, [60301]) is False
    assert restore_egress_table(support, [60301, 60302]) is True  # one not in the set
    assert egress_intact(table, [60300, 60301, 60302])
    unsupported = PermissionSupport(network_problem="no nft", filesystem_problem=None,
                                    table=table)
    assert restore_egress_table(unsupported, [60303]) is False


def test_the_shared_group_of_earlier_agents_stays_restricted(table: str) -> None:
    """Instances an earlier agent started run with the shared group it used: while that
    group exists, detection puts its gid in the set, so they stay on loopback."""
    group = table.replace("satest_", "sa-lotest-")
    subprocess.run(["groupadd", "--system", group], check=True, capture_output=True)
    try:
        gid = grp.getgrnam(group).gr_gid
        support = detect_permissions(group=group, table=table)
        assert support.network_problem is None, support
        assert support.legacy_gid == gid and egress_intact(table, [gid])
        # what an earlier agent checks before it would reload the table its own way
        code, listed = run_nft("list", "table", "inet", table)
        assert code == 0 and listed.count(f"skgid {gid} ") >= 2, listed
        assert detect_permissions(group=f"{group}-gone", table=table).legacy_gid is None
    finally:
        subprocess.run(["groupdel", group], capture_output=True, check=False)


def test_a_group_is_admitted_into_a_table_a_firewall_reload_deleted(table: str) -> None:
    """A firewall reload deletes the table; an instance that starts before the agent's next
    check must still start restricted: admitting its group loads the whole table again,
    the earlier agents' rules included, rather than failing (which left the instance
    unrestricted for its whole life)."""
    assert install_egress_table(table, [60400]) is None
    remove_egress_table(table)
    assert admit_gids(table, [60401], legacy_gid=60402) is None
    assert egress_intact(table, [60401, 60402])
    code, listed = run_nft("list", "table", "inet", table)
    assert code == 0 and listed.count("skgid 60402 ") == 2, listed
