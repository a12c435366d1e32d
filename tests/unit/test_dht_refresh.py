"""The pure parts of the routing-table refresh (net/dht_refresh.py)."""

from __future__ import annotations

import hashlib
import random

import pytest

from p2pfleet.net.dht_refresh import MAX_REFRESH_CPL, common_prefix_len, key_at_cpl, moved


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
