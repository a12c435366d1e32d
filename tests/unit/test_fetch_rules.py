"""The fetcher's source rules (core/fetch.py): order, per-source time, minimum rate, standing."""

from __future__ import annotations

import hashlib

import pytest

from p2pfleet.core import fetch as F

KiB = 1024
BUDGET = 300.0  # a 10-minute lease's fetch time


def until(now: float, last: bool = False) -> float | None:
    return F.source_until(now, last=last, budget_end=BUDGET, budget_s=BUDGET)


def test_a_provider_gets_a_quarter_of_the_budget_and_never_the_publishers_half():
    assert until(0.0) == 75.0
    assert until(100.0) == 150.0          # cut where the last source's half begins
    assert until(150.0) is None           # too late to ask another provider
    assert until(150.0, last=True) == 300.0
    assert until(299.0, last=True) == 300.0
    assert until(300.0, last=True) is None
    # whatever the providers do, the last source is asked with half the budget left
    now = 0.0
    while (end := until(now)) is not None:
        assert end - now <= BUDGET * F.SOURCE_SHARE
        now = end
    assert now == BUDGET * (1 - F.LAST_RESERVE)


def test_a_retry_late_in_the_budget_goes_straight_to_the_last_source():
    # a second attempt 200 s into a 300 s budget: only the publisher, with the 100 s left
    assert F.source_until(200.0, last=False, budget_end=300.0, budget_s=300.0) is None
    assert F.source_until(200.0, last=True, budget_end=300.0, budget_s=300.0) == 300.0


def test_a_trickle_of_one_byte_every_8_s_is_abandoned_after_10_s():
    pace = F.Pace.started(0.0)
    for t in (0.5, 8.5):
        assert not pace.behind(t)
        pace = pace.took(1, t)
    assert not pace.behind(9.9) and pace.behind(10.0 + 2 / F.MIN_RATE_BPS)
    assert pace.received == 2


def test_a_source_at_the_minimum_rate_is_never_behind():
    pace, t = F.Pace.started(0.0), 0.0
    chunk = 256 * KiB
    for _ in range(100):
        t += chunk / F.MIN_RATE_BPS  # 8 s per chunk
        assert not pace.behind(t)
        pace = pace.took(chunk, t)
    assert pace.received == 100 * chunk


def test_fast_bytes_bank_at_most_16_s():
    pace = F.Pace.started(0.0)
    for i in range(64):  # 16 MiB in the first second
        pace = pace.took(256 * KiB, i / 64)
    assert pace.deadline == pytest.approx(63 / 64 + F.BANK_S)
    assert pace.behind(63 / 64 + F.BANK_S)  # then silence: abandoned 16 s later


def test_bytes_after_the_deadline_do_not_revive_a_source():
    pace = F.Pace.started(0.0)
    late = pace.took(10 * 1024 * KiB, 11.0)
    assert late.behind(11.0) and late.deadline == pace.deadline and late.received == 10 * 1024 * KiB
    with pytest.raises(ValueError):
        pace.took(-1, 1.0)


def test_a_slow_provider_is_not_asked_for_an_hour_a_liar_for_two():
    s = F.SourceScores()
    s.mark("slow", "slow", 0.0)
    s.mark("liar", "lied", 0.0)
    peers = ["slow", "liar", "good"]
    assert s.rank(peers, 1.0) == ["good"]
    assert s.rank(peers, 3599.0) == ["good"]
    assert s.rank(peers, 3601.0) == ["good", "slow"]  # back, but after clean peers
    assert s.rank(peers, 7199.0) == ["good", "slow"]
    assert s.rank(peers, 7201.0) == ["good", "slow", "liar"]
    assert s.rank(["slow", "good"], 7201.0) == ["good", "slow"]


def test_refusals_add_up_and_a_whole_delivery_takes_one_demerit_off():
    s = F.SourceScores()
    for _ in range(2):
        s.mark("p", "failed", 0.0)
    assert s.rank(["p"], 1.0) == ["p"]
    s.mark("p", "failed", 1.0)  # a third refusal in a row
    assert s.rank(["p"], 2.0) == []
    assert s.served("p", 2.0) == pytest.approx(0.5, abs=1e-3)
    assert s.rank(["p"], 2.0) == ["p"]
    assert s.served("p", 3.0) == 0.0 and s.demerit("p", 3.0) == 0.0


def test_an_unknown_outcome_changes_nothing():
    s = F.SourceScores()
    s.mark("p", "failed", 0.0)
    with pytest.raises(ValueError, match="unknown source outcome 'late'"):
        s.mark("p", "late", 0.0)
    assert s.demerit("p", 0.0) == 0.5


def test_forget_drops_only_decayed_marks():
    s = F.SourceScores()
    s.mark("old", "lied", 0.0)
    s.mark("new", "failed", 20 * 3600.0)
    s.forget(20 * 3600.0)
    assert s.demerit("old", 20 * 3600.0) == 0.0 and s.demerit("new", 20 * 3600.0) == 0.5
    assert list(s._marks) == ["new"]


def test_the_publisher_is_last_even_when_it_announced_itself_as_a_provider():
    s = F.SourceScores()
    pub = "12D3KooPub"
    providers = [pub, "A", "B", "C", "me"]
    s.mark("A", "slow", 0.0)
    s.mark("B", "failed", 0.0)
    order = F.order_sources(providers, [f"/ip4/10.0.0.1/tcp/4001/p2p/{pub}"], s, 1.0,
                            exclude={"me"})
    assert order == ["C", "B", f"/ip4/10.0.0.1/tcp/4001/p2p/{pub}"]
    # a publisher with demerits is still asked: the last source is never skipped
    s.mark(pub, "lied", 1.0)
    assert F.order_sources(providers, [pub], s, 2.0, exclude={"me"}) == ["C", "B", pub]
    # inputs: the named sources keep their order (the publisher, then its seeders)
    assert F.order_sources([], [pub, "S1", pub], s, 2.0) == [pub, "S1"]


def test_peer_of():
    assert F.peer_of("/ip4/1.2.3.4/tcp/1/p2p/12D3Koo") == "12D3Koo"
    assert F.peer_of("12D3Koo") == "12D3Koo"


def test_the_source_of_bytes_that_differ_from_a_verified_copy_is_disproved():
    blob = hashlib.shake_256(b"model").digest(1000)
    lie = b"x" * 300
    parts = [F.Contribution("H", 0, 300, hashlib.sha256(lie).digest()),
             F.Contribution("P", 300, 1000, hashlib.sha256(blob[300:]).digest()),
             F.Contribution("Q", 900, 1200, hashlib.sha256(b"beyond").digest())]
    assert F.disproved(parts, blob) == ["H", "Q"]
    assert F.disproved(parts[1:2], blob) == []


def test_rules_are_checked():
    with pytest.raises(ValueError):
        F.FetchRules(min_rate_bps=0)
    with pytest.raises(ValueError):
        F.FetchRules(source_share=0)
    with pytest.raises(ValueError):
        F.FetchRules(last_reserve=1.0)
