"""Per-publisher trust: streaks, established identities, single copies, back-off, exclusion."""

from __future__ import annotations

import random

import pytest

from p2pfleet.core import trust as T

S = T.TrustSettings()
W = b"w" * 32
DAY = T.DAY_MS


def streak(n: int, credit: int = 10, start: int = 0) -> T.WorkerTrust:
    t = T.WorkerTrust(W)
    for i in range(n):
        t = T.on_valid(t, credit, start + i)
    return t


def test_established_needs_ten_results_a_day_of_history_and_no_recent_reset():
    assert not T.established(streak(9), S, 2 * DAY)
    assert not T.established(streak(10), S, DAY - 1)
    t = streak(10)
    assert T.established(t, S, DAY)
    assert T.lease_cap(t, S, DAY) == 16
    reset = T.on_disagreement(t, DAY)
    assert not T.established(reset, S, DAY + 1) and T.lease_cap(reset, S, DAY + 1) == 2
    assert T.established(reset, S, 2 * DAY)  # accepted results stay; the reset ages out
    assert T.established(T.WorkerTrust(W), T.TrustSettings(trusted=frozenset({W})), 0)


def test_single_copies_need_a_streak_worth_ten_shards_and_are_drawn():
    rng = random.Random(1)
    t = streak(20, credit=10)
    assert not T.may_take_single(t, S, 21, 2 * DAY, rng)  # streak value 200 < 10 x 21
    draws = [T.may_take_single(t, S, 20, 2 * DAY, rng) for _ in range(2000)]
    assert 0.9 < sum(draws) / len(draws) < 0.99  # 1 - 1/20 = 0.95
    assert not T.may_take_single(T.on_disagreement(t, 2 * DAY), S, 1, 2 * DAY, rng)


def test_failures_back_off_exponentially_and_a_valid_result_clears_them():
    t = T.WorkerTrust(W)
    t = T.on_failure(t, S, 0)
    assert t.backoff_until_ms == 60_000
    t = T.on_failure(t, S, 0)
    assert t.backoff_until_ms == 120_000
    for _ in range(20):
        t = T.on_failure(t, S, 0)
    assert t.backoff_until_ms == S.backoff_max_ms
    assert T.on_valid(t, 1, 5).backoff_until_ms == 0


def test_exclusion_is_final():
    t = T.on_excluded(streak(50), "failed_known_answer")
    assert not T.established(t, S, 10 * DAY)
    assert not T.may_take_single(t, S, 1, 10 * DAY, random.Random(0))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="fresh_cap"):
        T.TrustSettings(fresh_cap=0)
    with pytest.raises(ValueError, match="established_age_ms"):
        T.TrustSettings(established_age_ms=-1)
