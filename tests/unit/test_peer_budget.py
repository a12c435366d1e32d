"""Per-peer inbound byte budgets (core/peer_budget.py): what counts toward the owner's cap,
and tables that stay bounded when an attacker rotates identities."""

from __future__ import annotations

from p2pfleet.core import peer_budget as PB


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_bytes_of_a_peer_over_budget_are_refused_and_others_count_after_their_window():
    clock = Clock()
    b = PB.PeerBudget(clock, PB.BudgetLimits(per_minute=1000, per_day=5000))
    b.moved("honest", 400)
    assert b.unasked("honest", 400) is None
    b.moved("flood", 900)
    assert b.unasked("flood", 900) is None
    assert "within a minute" in b.unasked("flood", 200)
    b.moved("flood", 10_000)  # after the overrun: never counted
    assert b.not_counted() == 400 + 900 + 10_000  # honest's bytes held until the window ends
    clock.t = 61.0
    assert b.not_counted() == 900 + 10_000  # honest's window ended within budget: it counts


def test_rotating_identities_cannot_grow_the_tables_without_bound():
    clock = Clock()
    b = PB.PeerBudget(clock, PB.BudgetLimits(per_minute=10, per_day=10))
    for i in range(3 * PB.MAX_PEERS):
        clock.t = i * 1e-3
        b.moved(f"p{i}", 5)
        b.unasked(f"p{i}", 20)  # every identity overruns at once
    assert len(b._peers) <= PB.MAX_PEERS and len(b.over) <= PB.MAX_PEERS


def test_a_banned_peer_and_an_offending_peer_spend_nothing_of_their_window():
    clock = Clock()
    b = PB.PeerBudget(clock, PB.BudgetLimits(per_minute=1000, per_day=5000))
    b.moved("banned", 300)
    b.refuse("banned", "banned: protocol-error")
    b.moved("banned", 50)  # later bytes are refused too
    b.moved("offender", 200)
    b.forfeit("offender")
    b.moved("offender", 100)  # the rest of its window goes with it
    b.moved("honest", 70)
    clock.t = 61.0
    assert b.not_counted() == 300 + 50 + 200 + 100 and b.refused == 650
    b.moved("offender", 40)  # a new window without offence counts again
    clock.t = 122.0
    assert b.not_counted() == 650


def test_identities_rotating_behind_one_address_share_its_budget_and_it_cools_down():
    clock = Clock()
    limits = PB.BudgetLimits(per_minute=1000, per_day=5000, source_share=3, source_cooldown_s=600)
    b = PB.PeerBudget(clock, limits)
    for i in range(3):  # three identities, each within its own budget, fill the address's
        b.bind(f"sybil-{i}", "198.51.100.7")
        assert b.unasked(f"sybil-{i}", 1000) is None
    b.bind("sybil-3", "198.51.100.7")
    why = b.unasked("sybil-3", 1)
    assert why and "198.51.100.7" in why and "sybil-3" in b.over
    assert b.source_refused("198.51.100.7")
    b.bind("sybil-4", "198.51.100.7")  # a later identity there is over at its first byte
    assert b.unasked("sybil-4", 1)
    b.bind("neighbour", "198.51.100.8")  # another address is not touched
    assert b.unasked("neighbour", 1000) is None and not b.source_refused("198.51.100.8")
    assert "within a minute" in b.unasked("neighbour", 1)  # over its own budget: refused
    assert "neighbour" in b.over and not b.source_refused("198.51.100.8")
    clock.t = 60 + 600  # window plus cooldown: the address may come back
    assert b.source_refused("198.51.100.7") is None
