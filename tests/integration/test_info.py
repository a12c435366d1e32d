"""The info protocol and the explorer's crawler against real py-libp2p hosts on loopback."""

from __future__ import annotations

import time

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2pfleet.explorer.crawler import CrawlSettings, Crawler
from p2pfleet.explorer.evidence import check_copies
from p2pfleet.identity import Identity
from p2pfleet.net import dht_lookup
from p2pfleet.net.info import InfoFacts, fetch_node_info, info_handler, node_info_body
from p2pfleet.wire.envelope import seal
from p2pfleet.wire.kinds import Capacity

from fleetkit import NETWORK, fleet


def now_ms() -> int:
    return int(time.time() * 1000)


def capacity(seq: int, **over) -> Capacity:
    fields = dict(seq=seq, exp=now_ms() + 600_000, sw_version="0.1.0", state="available",
                  hw_class=b"\x07" * 32, cores=2, memory_mb=1024, bench=50.0,
                  providers=("CPUExecutionProvider",), ort_version="1.32.0", slots=1, addrs=())
    fields.update(over)
    return Capacity(**fields)


def test_uptime_is_rounded_down_to_hours():
    body = node_info_body(InfoFacts("0.1.0", "available", 7199.9, 3, 2), now_ms=1000, seq=5)
    assert body.uptime_s == 3600 and body.exp == 1000 + 600_000
    assert (body.shards_done, body.results_accepted, body.seq) == (3, 2, 5)


async def test_opted_in_node_answers_a_signed_node_info_and_others_refuse():
    async with fleet(3) as meshes:
        node, silent, asker = meshes
        node.set_handler("info", info_handler(
            node.identity, NETWORK, lambda: InfoFacts("0.1.0", "available", 5000.0, 7, 4)))
        reply = await fetch_node_info(asker, node.identity.peer_id)
        assert reply.error is None, reply.error
        assert reply.opened.signer == node.identity.public_key
        assert reply.info.uptime_s == 3600 and reply.info.shards_done == 7
        assert 0 < reply.rtt_s < 5
        refused = await fetch_node_info(asker, silent.identity.peer_id)
        assert refused.opened is None and "not offered" in refused.error


async def test_a_record_signed_by_another_peer_is_not_believed():
    async with fleet(2) as meshes:
        liar, asker = meshes
        other = Identity.from_seed(b"someone else")
        liar.set_handler("info", info_handler(
            other, NETWORK, lambda: InfoFacts("0.1.0", "available", 1.0)))
        reply = await fetch_node_info(asker, liar.identity.peer_id)
        assert reply.opened is None and f"signed by {other.peer_id}" in reply.error


async def test_crawler_is_a_light_client_that_finds_peers_and_proves_misbehaviour():
    async with fleet(5) as meshes:
        *honest, bad = meshes
        for mesh in honest:
            await mesh.put_capacity(seal(capacity(now_ms()), mesh.identity, NETWORK))
        honest[1].set_handler("info", info_handler(
            honest[1].identity, NETWORK, lambda: InfoFacts("0.1.0", "available", 10.0)))
        # the bad peer: two different records with one seq on different holders (its
        # validators would refuse nothing here: each holder sees only one), and a record
        # signed by another key served for its own key
        seq = now_ms()
        key = bad.names.node_key(bad.identity.peer_id).encode()
        a = seal(capacity(seq, bench=10.0), bad.identity, NETWORK)
        b = seal(capacity(seq, bench=99.0), bad.identity, NETWORK)
        for mesh in honest[1:]:
            await bad.connect(mesh.listen_addrs()[0])
        holders = [ID.from_base58(m.identity.peer_id) for m in honest]
        assert await dht_lookup.store_at(bad.dht, holders[:2], key, a) == 2
        assert await dht_lookup.store_at(bad.dht, holders[2:], key, b) == 2
        forged = seal(capacity(seq + 1), Identity.from_seed(b"not the bad peer"), NETWORK)
        bad.dht.value_store.put(key, forged)  # our validators would refuse it on normal paths

        crawler = Crawler(CrawlSettings(network=NETWORK, bootstrap=(honest[0].listen_addrs()[0],),
                                        timeout_s=20, seed=1))
        async with trio.open_nursery() as nursery:
            await nursery.start(crawler.run)
            snap = await crawler.crawl()
            peers = {p.peer_id: p for p in snap.peers}
            for mesh in honest:
                view = peers[mesh.identity.peer_id]
                assert view.state == "available" and view.bench == 50.0, view
                assert view.rtt_ms is not None and view.rtt_by in ("info", "ping")
            assert peers[honest[1].identity.peer_id].rtt_by == "info"
            assert peers[honest[1].identity.peer_id].info["sw_version"] == "0.1.0"
            kinds = {(f.kind, f.accused) for f in snap.findings}
            assert ("equivocation", bad.identity.peer_id) in kinds
            assert ("wrong_key", bad.identity.peer_id) in kinds
            assert peers[bad.identity.peer_id].flagged
            assert not any(peers[m.identity.peer_id].flagged for m in honest)
            # light client: no Kademlia handler, so nobody can query or store at it
            kad = TProtocol(crawler.names.protocol("kad"))
            assert kad not in crawler.mesh.host.get_mux().handlers
            with pytest.raises(Exception):
                with trio.fail_after(5):
                    await honest[0].host.new_stream(crawler.mesh.host.get_id(), [kad])
            assert crawler.mesh.dht.value_store.size() == 0
            nursery.cancel_scope.cancel()


def test_check_copies_names_wrong_keys_and_equivocation_only():
    owner, other = Identity.from_seed(b"owner"), Identity.from_seed(b"other")
    good = seal(capacity(5), owner, NETWORK)
    newer = seal(capacity(6), owner, NETWORK)
    same_seq = seal(capacity(6, bench=1.0), owner, NETWORK)
    forged = seal(capacity(7), other, NETWORK)
    ok = check_copies(NETWORK, owner.peer_id, {"s1": good, "s2": newer}, now_ms())
    assert ok.findings == [] and ok.newest.body.seq == 6 and not ok.expired
    bad = check_copies(NETWORK, owner.peer_id, {"s1": newer, "s2": same_seq, "s3": forged,
                                                "s4": b"junk"}, now_ms())
    assert sorted(f.kind for f in bad.findings) == ["equivocation", "wrong_key"]
    wrong = next(f for f in bad.findings if f.kind == "wrong_key")
    assert wrong.accused == "s3" and wrong.verified_by == "explorer"
    assert bad.invalid and bad.invalid[0][0] == "s4"
    expired = check_copies(NETWORK, owner.peer_id, {"s1": seal(capacity(8, exp=now_ms() - 60_000), owner, NETWORK)}, now_ms())
    assert expired.expired and expired.newest is not None
