"""The pure parts of the routing-table refresh (net/dht_refresh.py)."""

from __future__ import annotations

import hashlib
import random

import pytest

from p2pfleet.net.dht_refresh import (MAX_REFRESH_CPL, RefreshStats, WalkedBuckets, asked_wait,
                                      common_prefix_len, key_at_cpl, moved, next_wait)


def test_common_prefix_len_counts_leading_equal_bits():
    assert common_prefix_len(b"\x00" * 4, b"\x00" * 4) == 32
    assert common_prefix_len(b"\x80\x00", b"\x00\x00") == 0
    assert common_prefix_len(b"\x01\x00", b"\x00\x00") == 7


@pytest.mark.parametrize("cpl", [0, 1, 5, 10])
def test_key_at_cpl_lands_in_the_asked_bucket(cpl):
    own = hashlib.sha256(b"me").digest()
    key = key_at_cpl(own, cpl, random.Random(cpl))
    assert common_prefix_len(hashlib.sha256(key).digest(), own) == cpl


def test_key_at_cpl_refuses_a_prefix_out_of_range():
    with pytest.raises(ValueError, match="outside 0..15"):
        key_at_cpl(b"\x00" * 32, MAX_REFRESH_CPL + 1, random.Random(1))


def test_moved_when_fewer_than_half_of_the_closest_hold_our_copy():
    assert not moved({"a", "b"}, ["a", "b", "c", "d"])
    assert moved({"a"}, ["a", "b", "c", "d"])
    assert not moved(set(), [])


def test_sooner_refresh_only_while_the_table_grows():
    grew = RefreshStats(table_before=3, table_after=9)
    same = RefreshStats(table_before=9, table_after=9)
    # a table smaller than k that grew: sooner, doubling (both rules)
    assert next_wait(grew, k=20, table=9, delay=15, period=600, lean=True) == (15, 30)
    # a fleet of 10 hosts never fills a table of k = 20: fix 18 stops hurrying
    assert next_wait(same, k=20, table=9, delay=30, period=600, lean=True) == (600, 30)
    assert next_wait(same, k=20, table=9, delay=30, period=600, lean=False) == (30, 60)
    assert next_wait(same, k=20, table=25, delay=30, period=600, lean=False) == (600, 30)
    # a refresh that went mostly unanswered (a whole fleet joining at once) tells nothing of
    # the fleet's size: sooner again, doubling (issue 15: tables stayed at the bootstrap peers)
    busy = RefreshStats(table_before=3, table_after=3, rpcs=12, responses=5)
    assert next_wait(busy, k=20, table=3, delay=30, period=600, lean=True) == (30, 60)
    assert next_wait(busy, k=20, table=20, delay=30, period=600, lean=True) == (600, 30)


def test_asked_refresh_backs_off_while_requests_go_unanswered():
    unanswered = RefreshStats(rpcs=10, responses=2)
    answered = RefreshStats(rpcs=10, responses=8)
    assert asked_wait(unanswered, backoff=15, first=15, period=600, lean=True) == (15, 30)
    assert asked_wait(unanswered, backoff=480, first=15, period=600, lean=True) == (480, 600)
    assert asked_wait(answered, backoff=480, first=15, period=600, lean=True) == (15, 15)
    assert asked_wait(unanswered, backoff=480, first=15, period=600, lean=False) == (15, 15)
    assert RefreshStats().answered == 1.0


def test_asked_refresh_backs_off_while_puts_keep_reaching_few_peers():
    """A well answered refresh after a put that reached few peers: the first such put
    gets its refresh soon; puts that stay poor wait longer each time (a saturated 200-host
    fleet refreshed and republished every 15 s, for good)."""
    answered = RefreshStats(rpcs=10, responses=8)
    assert asked_wait(answered, backoff=15, first=15, period=600, lean=True, poor_puts=1) == (15, 15)
    assert asked_wait(answered, backoff=15, first=15, period=600, lean=True, poor_puts=2) == (15, 30)
    assert asked_wait(answered, backoff=30, first=15, period=600, lean=True, poor_puts=3) == (30, 60)
    assert asked_wait(answered, backoff=480, first=15, period=600, lean=True, poor_puts=9) == (480, 600)
    assert asked_wait(answered, backoff=480, first=15, period=600, lean=True, poor_puts=0) == (15, 15)


def test_a_bucket_is_stale_when_no_walk_visited_it_within_the_period():
    walked = WalkedBuckets()
    walked.at = {0: 100.0, 2: 650.0}
    assert walked.stale([0, 1, 2, 3], now=700.0, period=600.0) == [0, 1, 3]
    assert walked.stale([0, 1, 2, 3], now=1250.0, period=600.0) == [0, 1, 2, 3]
