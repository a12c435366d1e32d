"""core.reachability: AutoNAT answers add up to a status, and the DHT mode follows."""

from __future__ import annotations

import pytest

from p2pfleet.core.reachability import Answer, Reach, Reachability, dht_mode


def test_three_agreeing_peers_make_a_verdict_and_one_liar_does_not_flip_it():
    r = Reachability()
    r.record(0, "a", Answer.DIALED)
    r.record(0, "b", Answer.DIALED)
    assert r.update(0, available=5) == Reach.UNKNOWN  # 2 of the 3 needed
    r.record(0, "c", Answer.DIALED)
    assert r.update(0, available=5) == Reach.PUBLIC
    r.record(1, "d", Answer.FAILED)
    assert r.update(1, available=5) == Reach.PUBLIC  # one liar among 4
    for p in "abc":
        r.record(2, p, Answer.REFUSED, "none of our addresses is the IP it sees us from")
    assert r.update(2, available=5) == Reach.PRIVATE
    assert "4 peer(s) could not dial us back" in r.why
    assert "refused: none of our addresses" in r.why


def test_a_node_with_one_peer_trusts_it_and_old_answers_expire():
    r = Reachability(answer_ttl_s=100)
    r.record(0, "only", Answer.FAILED)
    assert r.update(0, available=1) == Reach.PRIVATE
    r.record(1, "other", Answer.NO_ANSWER)  # says nothing
    assert r.update(1, available=2) == Reach.PRIVATE
    r.update(500, available=1)
    assert r.answers == {} and r.status == Reach.PRIVATE  # holds until others agree
    r.record(501, "only", Answer.DIALED)
    assert r.update(501, available=1) == Reach.PUBLIC


def test_dht_mode_auto_serves_only_while_stable():
    assert dht_mode("auto", True) == "server"
    assert dht_mode("auto", False) == "client"
    assert dht_mode("server", False) == "server"
    assert dht_mode("client", True) == "client"
    with pytest.raises(ValueError, match="dht_mode 'sometimes'"):
        dht_mode("sometimes", True)
