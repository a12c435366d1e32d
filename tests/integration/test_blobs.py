"""Blob exchange between real hosts: models spread car to car through DHT providers,
private inputs need a token, transfers resume at another source, liars are penalised."""

from __future__ import annotations

import hashlib
import time

import pytest
import trio
from libp2p.kad_dht import provider_store as kad_provider_store

from p2pfleet.identity import Identity
from p2pfleet.net import dht_providers, streams
from p2pfleet.net.blobs import BlobError, BlobService
from p2pfleet.net.mesh import Mesh
from p2pfleet.store.blobcache import BlobCache
from p2pfleet.wire.envelope import seal
from p2pfleet.wire.kinds import BlobManifest

import blobkit
from fleetkit import NETWORK, fleet, settings, wait_until

KiB = 1024


def make_blob(tag: bytes, size: int) -> tuple[bytes, bytes]:
    data = hashlib.shake_256(tag).digest(size)
    return hashlib.sha256(data).digest(), data


def services(meshes, tmp_path, **kw) -> list[BlobService]:
    out = []
    for i, mesh in enumerate(meshes):
        svc = BlobService(mesh, BlobCache(tmp_path / f"cache-{i}", 64 * 1024 * KiB), **kw)
        svc.install()
        out.append(svc)
    return out


def peer(mesh) -> str:
    return mesh.identity.peer_id


def addr(mesh) -> str:
    return mesh.listen_addrs()[0]


def penalty(mesh, of) -> float:
    return mesh.reputation.penalty(peer(of), time.time())


async def test_model_spreads_car_to_car_through_dht_providers(tmp_path):
    digest, model = make_blob(b"model", 1100 * KiB)  # 5 chunks
    async with fleet(3) as meshes:
        a, b, c = services(meshes, tmp_path)
        a.cache.put(digest, model, public=True)
        assert await b.fetch(digest, len(model), [peer(meshes[0])], public=True) == model
        assert b.cache.is_public(digest) and a.stats.served_bytes == len(model)
        assert await b.provide(digest) >= 1
        assert await wait_until(lambda: peer(meshes[1]) in
                                [str(p.peer_id) for p in meshes[0].dht.provider_store.get_providers(
                                    dht_providers.provider_key(meshes[0].names, digest))])
        assert await c.find_providers(digest) == [peer(meshes[1])]
        assert await c.fetch(digest, len(model), [], public=True, use_providers=True) == model
        assert b.stats.served_bytes == len(model) and a.stats.served_bytes == len(model)
        assert [(s.peer, s.offset, s.sent) for s in b.stats.recent] == [
            (peer(meshes[2]), 0, len(model))]
        with pytest.raises(ValueError, match="only public blobs"):
            await c.fetch(digest, len(model), [], use_providers=True)


async def test_provider_keys_fit_upstream_limits(tmp_path):
    """Fix 11: py-libp2p's server drops ADD_PROVIDER keys over 80 bytes (our namespaced
    DHT key string is 88+), while the sender believes it was stored."""
    digest, _ = make_blob(b"k", 10)
    async with fleet(2) as (a, b):
        names = a.names
        long_key = names.model_key(digest).encode()
        short_key = dht_providers.provider_key(names, digest)
        assert len(long_key) > 80 and len(short_key) == 34
        assert await b.dht.provider_store._send_add_provider(a.host.get_id(), long_key)
        assert await b.dht.provider_store._send_add_provider(a.host.get_id(), short_key)
        await wait_until(lambda: a.dht.provider_store.get_providers(short_key))
        assert a.dht.provider_store.get_providers(long_key) == []
        # and our walk always asks the network: upstream answers from its local copy
        found = await dht_providers.walk(b.dht, short_key)
        assert b.host.get_id() in found.providers and found.rpcs >= 1


def test_provider_records_expire_after_an_hour():
    """Fix 11: upstream keeps a provider record for 48 h; a car leaves long before."""
    from libp2p import new_host
    from libp2p.peer.peerinfo import PeerInfo

    dht_providers.shorten_provider_expiry()
    host = new_host()
    store = kad_provider_store.ProviderStore(host)
    store.add_provider(b"key", PeerInfo(host.get_id(), []))
    assert store.get_providers(b"key")
    store.providers[b"key"][str(host.get_id())].timestamp = time.time() - 3601
    assert store.get_providers(b"key") == []


async def test_private_input_is_served_only_with_the_lease_token(tmp_path):
    digest, data = make_blob(b"input", 300 * KiB)
    token = b"t" * 16
    async with fleet(3) as meshes:
        pub, worker, other = meshes
        svc = services(meshes, tmp_path)
        svc[0].authorize = lambda who, d, t: who == peer(worker) and d == digest and t == token
        svc[0].cache.put(digest, data, public=False)
        with pytest.raises(ValueError, match="not a public blob"):
            await svc[0].provide(digest)
        with pytest.raises(BlobError, match="refused or does not hold it"):
            await svc[1].fetch(digest, len(data), [peer(pub)], timeout=10)
        with pytest.raises(BlobError, match="refused"):
            await svc[1].fetch(digest, len(data), [peer(pub)], token=b"x" * 16, timeout=10)
        with pytest.raises(BlobError, match="refused"):  # the right token, the wrong peer
            await svc[2].fetch(digest, len(data), [peer(pub)], token=token, timeout=10)
        assert svc[0].stats.refused["not authorized"] == 3
        got = await svc[1].fetch(digest, len(data), [pub.listen_addrs()[0]], token=token)
        assert got == data and not svc[1].cache.is_public(digest)
        assert penalty(pub, worker) == 0 and penalty(pub, other) == 0
        # a worker never serves an input on: it holds it privately, with no authorizer
        with pytest.raises(BlobError, match="refused"):
            await svc[2].fetch(digest, len(data), [worker.listen_addrs()[0]], token=token,
                               timeout=10)


def _bomb(raw_len: int) -> bytes:
    """A zstd frame that inflates to 64 MiB, with its content size set to `raw_len`."""
    import struct

    import zstandard

    frame = bytearray(zstandard.ZstdCompressor(level=1).compress(b"\0" * (64 << 20)))
    assert frame[4] >> 6 == 2 and not frame[4] & 0x20  # a 4-byte content size after a window byte
    struct.pack_into("<I", frame, 6, raw_len)
    return bytes(frame)


async def liar(stream, mode: str, digest: bytes, model: bytes, identity) -> None:
    """A hostile holder: answers with a well-signed manifest and chunks that break a rule."""
    req = await blobkit.read_request(stream)
    if mode == "garbage":  # a manifest true to wrong bytes
        await blobkit.answer(stream, identity, req, hashlib.shake_256(b"lies").digest(len(model)))
    elif mode == "mismatch":  # the second chunk is not what the manifest says
        await blobkit.answer(stream, identity, req, model,
                             tamper=lambda i, w: w[::-1] if i == 1 else w)
    elif mode == "bomb":  # the third chunk a compression bomb, declared and hashed
        chunks = blobkit.wire_chunks(model, 256 * KiB, "none")
        chunks[2] = _bomb(len(chunks[2]))
        await blobkit.answer(stream, identity, req, model, codec="zstd", chunks=chunks)
    elif mode == "wide":  # a manifest whose first chunk is wider on the wire than raw
        chunks = blobkit.wire_chunks(model, 256 * KiB, "none")
        chunks[0] += b"extra"
        await blobkit.answer(stream, identity, req, model, codec="zstd", chunks=chunks)


async def test_resume_at_another_source_and_liars_are_penalised(tmp_path):
    digest, model = make_blob(b"resume", 1000 * KiB)
    async with fleet(4) as meshes:
        a, b, c, d = meshes
        svc = services(meshes, tmp_path)
        for s in (svc[0], svc[2]):
            s.cache.put(digest, model, public=True)
        budget = [3 * 256 * KiB]  # A's transfer cap runs out after three chunks

        def may_send(n: int) -> bool:
            budget[0] -= n
            return budget[0] >= 0

        svc[0].may_send = may_send
        got = await svc[1].fetch(digest, len(model), [peer(a), addr(c)], public=True)
        assert got == model
        assert [(s.offset, s.sent) for s in svc[0].stats.recent] == [(0, 3 * 256 * KiB)]
        assert [(s.offset, s.sent) for s in svc[2].stats.recent] == [
            (3 * 256 * KiB, len(model) - 3 * 256 * KiB)]
        assert penalty(b, a) == 0 and penalty(b, c) == 0

        # a corrupt file at a source is refused there, not sent (and costs nobody)
        (svc[2].cache.root / "blobs" / digest.hex()).write_bytes(b"?" * len(model))
        svc[1].cache.remove(digest)
        with pytest.raises(BlobError, match="refused or does not hold it"):
            await svc[1].fetch(digest, len(model), [addr(c)], public=True, timeout=10)
        assert not svc[2].cache.has(digest) and penalty(b, c) == 0

        # liars: D's handler breaks the rules; each time the fetch falls back to C
        svc[2].cache.put(digest, model, public=True)
        # (why the liar failed, where C resumed: a garbage blob starts over, bytes that
        # arrived intact before a broken chunk are kept)
        expected = {"garbage": ("hash to", 0),
                    "mismatch": ("does not hash to the manifest", 256 * KiB),
                    "bomb": ("does not decode within its declared", 512 * KiB),
                    "wide": ("its raw size is", 0)}
        for mode, (why, resumed_at) in expected.items():
            d.set_handler("blob", lambda s, m=mode: liar(s, m, digest, model, d.identity))
            svc[1].cache.remove(digest)
            before = penalty(b, d)
            assert await svc[1].fetch(digest, len(model), [addr(d), addr(c)], public=True) == model
            assert penalty(b, d) > before, (mode, svc[1].stats.last_failures)
            assert why in " ".join(svc[1].stats.last_failures), mode
            assert svc[2].stats.recent[-1].offset == resumed_at, mode
        assert penalty(b, c) == 0


async def test_oversized_and_unsigned_requests_cost_the_requester(tmp_path):
    digest, model = make_blob(b"x", 10 * KiB)
    async with fleet(2) as (a, b):
        svc = services([a], tmp_path)[0]
        svc.cache.put(digest, model, public=True)
        stream = await b.open_stream(peer(a), "blob")
        await streams.write_envelope(stream, b"\x00" * 5000)  # over the request cap
        with pytest.raises(streams.StreamError):
            await streams.read_envelope(stream, 1000, 5)
        await wait_until(lambda: penalty(a, b) > 0)
        stream = await b.open_stream(peer(a), "blob")
        await streams.write_envelope(stream, b"not an envelope")
        await stream.close_write()
        with pytest.raises(streams.StreamError):
            await streams.read_envelope(stream, 1000, 5)
        await wait_until(lambda: penalty(a, b) > 15)  # two offences of 10
        assert svc.stats.served_requests == 0


async def test_a_peer_gets_at_most_four_streams_at_once(tmp_path):
    digest, model = make_blob(b"y", 10 * KiB)
    async with fleet(2) as (a, b):
        svc = services([a], tmp_path, read_timeout=1.0)[0]
        svc.cache.put(digest, model, public=True)
        fetcher = BlobService(b, BlobCache(tmp_path / "fetcher", 10**6))
        stalled = [await b.open_stream(peer(a), "blob") for _ in range(4)]
        for st in stalled:  # a byte, so each stream reaches the handler, then silence
            await st.write(b"\x80")
        await wait_until(lambda: sum(svc._serving.values()) == 4)
        with pytest.raises(BlobError, match="refused"):
            await fetcher.fetch(digest, len(model), [peer(a)], public=True, timeout=5)
        assert svc.stats.refused["busy"] == 1
        await wait_until(lambda: not svc._serving)  # the stalled ones time out after 1 s
        assert await fetcher.fetch(digest, len(model), [peer(a)], public=True) == model


def test_fast_sealer_matches_seal():
    from p2pfleet.identity import Identity
    from p2pfleet.net.blobs import FastSealer

    ident = Identity.from_seed(b"sealer")
    m = BlobManifest(req_id=b"r" * 16, exp=123, digest=b"d" * 32, total_size=9,
                     chunk_size=1024, codec="none", first=0, hashes=b"h" * 32,
                     sizes=(9).to_bytes(4, "big"))
    assert FastSealer(ident, NETWORK).seal(m) == seal(m, ident, NETWORK)


async def test_a_slow_liar_is_abandoned_and_then_proven_wrong_by_the_last_source(tmp_path):
    """A source that trickles wrong bytes is abandoned below the minimum rate (its bytes
    kept); the blob then fails its hash with two senders, so the last source is asked for a
    whole copy, which verifies and proves the first one lied (core/fetch.py)."""
    from p2pfleet.core.fetch import FetchRules

    digest, model = make_blob(b"slow liar", 600 * KiB)
    sent = []

    async def trickle_lies(stream):
        req = await blobkit.read_request(stream)
        await blobkit.answer(stream, h.identity, req, b"?" * len(model), chunk_size=1024,
                             pace_s=0.2, sent=sent)

    async with fleet(3) as (b, h, c):
        # the times shrunk (a first chunk within 1 s); the rate and shares as in production
        fetcher = BlobService(b, BlobCache(tmp_path / "fetcher", 64 * 1024 * KiB),
                              fetch_rules=FetchRules(first_bytes_s=1.0))
        honest = services([c], tmp_path)[0]
        honest.cache.put(digest, model, public=True)
        h.set_handler("blob", trickle_lies)
        got = await fetcher.fetch(digest, len(model), [addr(h), addr(c)], public=True,
                                  timeout=30)
        assert got == model
        why = " ".join(fetcher.stats.last_failures)
        assert "too slow" in why and "hash to" in why, why
        # C resumed after the liar's bytes that had arrived, then sent a whole copy
        [(resumed_at, rest), whole] = [(s.offset, s.sent) for s in honest.stats.recent]
        assert 1024 <= resumed_at <= 1024 * len(sent) and resumed_at + rest == len(model)
        assert whole == (0, len(model))
        # the liar: invalid-message (10) once disproved (being slow costs a named source, as
        # it is here, demerits but no penalty), and it is not asked first again
        assert penalty(b, h) > 5 and penalty(b, c) == 0
        assert fetcher.scores.rank([peer(h), peer(c)], time.time()) == [peer(c)]


async def test_a_relay_only_node_never_announces_itself_as_a_provider(tmp_path):
    """A relay-only car is reached only through a relay, and blobs never cross a relay: it
    announced itself as a model's provider (at its relayed address) all the same, so every
    fetcher that tried it wasted a dial and a refused request. Now it does not announce."""
    digest, model = make_blob(b"relay-only model", 300 * KiB)
    async with fleet(1) as (a,), trio.open_nursery() as nursery:
        car = Mesh(Identity.from_seed(b"relay-only car"), settings(1, relay_only=True))
        await nursery.start(car.run)
        await car.connect(addr(a))
        svc = BlobService(car, BlobCache(tmp_path / "car", 64 * 1024 * KiB))
        svc.install()
        svc.cache.put(digest, model, public=True)
        assert await svc.provide(digest) == 0
        key = dht_providers.provider_key(a.names, digest)
        assert a.dht.provider_store.get_providers(key) == []
        nursery.cancel_scope.cancel()
