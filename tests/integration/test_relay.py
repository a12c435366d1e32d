"""Circuit Relay v2 on loopback (net/relay.py): a node found private holds a reservation at
a public peer and is reached through it; blobs never cross the relay.

The NAT itself is in tests/netbed/test_nat_reachability.py; here AutoNAT's answers are
given (as peers behind a NAT would give them), everything else is real hosts over TCP."""

from __future__ import annotations

import time

import pytest
import trio
from libp2p.custom_types import TProtocol

from p2pfleet.core.reachability import Answer, Reach
from p2pfleet.net.blobs import BlobError
from p2pfleet.net.relay import is_relayed

from fleetkit import NETWORK, fleet, wait_until
from test_blobs import make_blob, peer, services

KiB = 1024


async def found_private(mesh, others) -> None:
    """What AutoNAT peers answer a node behind NAT."""
    for other in others:
        mesh.reachable.verdicts.record(time.time(), str(other.host.get_id()), Answer.FAILED,
                                       "as told by the test")
    mesh.reachable.verdicts.update(time.time(), available=len(others))
    await mesh.reachable.apply_mode()


async def reach_through_relay(relay, car, other) -> None:
    """Set up: `car` is private with a reservation at `relay`; `other` holds only a
    relayed connection to it."""
    for mesh in (relay, car, other):
        await wait_until(lambda m=mesh: m.reachable.status == Reach.PUBLIC, 30)
    await wait_until(lambda: relay.relays.offering, 10)
    await found_private(car, [relay, other])
    await wait_until(lambda: car.relays.relay_addr, 30)
    car_id = car.host.get_id()
    await other.host.get_network().close_peer(car_id)
    other.host.get_peerstore().clear_addrs(car_id)  # on loopback it could dial car directly
    await other.connect(f"{car.relays.relay_addr}/p2p/{car_id}")
    conns = other.host.get_network().get_connections(car_id)
    assert conns and all(is_relayed(c) for c in conns)


async def test_a_private_node_holds_a_reservation_and_a_public_one_reaches_it_through_it():
    async with fleet(3) as (relay, car, other):
        assert relay.relays.protocol.limits.duration == 120  # not py-libp2p's 1 h
        assert relay.relays.protocol.limits.data == 128 * KiB  # nor its 1 GiB
        await reach_through_relay(relay, car, other)
        report = car.relays.report()
        assert report["relay"] == peer(relay) and not report["relay_offered"]
        assert report["relay_addrs"] == [f"{relay.listen_addrs()[0].split('/p2p/')[0]}"
                                         f"/p2p/{peer(relay)}/p2p-circuit"]
        assert car.reachable.report()["dht_mode"] == "client"
        got = trio.Event()

        async def hello(stream):
            assert await stream.read(5) == b"hello" and is_relayed(stream)
            got.set()
            await stream.close()
        car.host.set_stream_handler(TProtocol("/itest/hello/1"), hello)
        stream = await other.host.new_stream(car.host.get_id(), [TProtocol("/itest/hello/1")])
        await stream.write(b"hello")
        with trio.fail_after(10):
            await got.wait()
        assert relay.relays.relayed_bytes > 0


async def test_blobs_never_cross_a_relay(tmp_path):
    """Attack on the relay's budget (and a volunteer's link): a worker fetched a model from
    a car it reached only through a relay, and every byte crossed the relay."""
    digest, blob = make_blob(b"relayed", 300 * KiB)
    async with fleet(3) as meshes:
        relay, car, other = meshes
        _, car_blobs, other_blobs = services(meshes, tmp_path)
        car_blobs.cache.put(digest, blob, public=True)
        await reach_through_relay(relay, car, other)
        before = relay.relays.relayed_bytes
        with pytest.raises(BlobError, match="blobs never cross a relay"):
            await other_blobs.fetch(digest, len(blob), [peer(car)], public=True, timeout=20)
        assert relay.relays.relayed_bytes - before < 16 * KiB
        assert car_blobs.stats.served_bytes == 0


async def test_a_publisher_found_private_says_so(tmp_path, caplog):
    from p2pfleet.sdk.client import connect

    async with fleet(1) as (boot,):
        async with connect(tmp_path / "pub", network=NETWORK, listen=("/ip4/127.0.0.9/tcp/0",),
                           bootstrap=[boot.listen_addrs()[0]]) as client:
            mesh = client.mesh
            await wait_until(lambda: mesh.reachable.status == Reach.PUBLIC, 30)
            assert "not reachable" not in caplog.text
            await found_private(mesh, [boot])
            await wait_until(lambda: "this publisher is not reachable from the network" in
                             caplog.text, 10)
            assert "workers cannot dial it" in caplog.text
