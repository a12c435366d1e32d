"""Attacks on a relay's reservations and circuits (net/relay_limits.py): real hosts over TCP
on loopback. The attackers are plain py-libp2p hosts speaking the hop protocol by hand, from
127.0.0.9 (and 127.0.0.10); the honest car and peer are real meshes."""

from __future__ import annotations

from contextlib import AsyncExitStack

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from p2pfleet.core.reachability import Reach
from p2pfleet.net.relay import is_relayed
from p2pfleet.net.relay_limits import CIRCUITS_PER_PEER, RESERVATIONS_PER_IP, RelayShares

from fleetkit import fleet, wait_until
from test_relay import found_private

OK = to_proto_status(StatusCode.OK)
ATTACKER_IP = "127.0.0.9"


async def attackers(stack: AsyncExitStack, relay, n: int, tag: bytes,
                    ip: str = ATTACKER_IP) -> list:
    """`n` hosts with their own keys, all connected to `relay` from `ip`."""
    relay_id = relay.host.get_id()
    relay_addr = multiaddr.Multiaddr(relay.listen_addrs()[0].split("/p2p/")[0])
    hosts = []
    for i in range(n):
        host = new_host(key_pair=create_new_key_pair((tag + bytes([i])).ljust(32, b"\0")))
        await stack.enter_async_context(host.run([multiaddr.Multiaddr(f"/ip4/{ip}/tcp/0")]))
        await host.get_network().dial_addr(relay_addr, relay_id, (ip, 0))
        hosts.append(host)
    return hosts


async def hop(host, relay, msg: HopMessage) -> tuple[int, object]:
    """Send one hop message on a new stream; the relay's status and the open stream."""
    stream = await host.new_stream(relay.host.get_id(), [HOP])
    with trio.fail_after(15):
        await write_delimited_msg(stream, msg)
        reply = await read_delimited_msg(stream, HopMessage)
    return reply.status, stream


async def relay_ready(relay, car) -> None:
    for mesh in (relay, car):
        await wait_until(lambda m=mesh: m.reachable.status == Reach.PUBLIC, 30)
    await wait_until(lambda: relay.relays.offering, 10)


async def car_reserved(car, relay) -> bool:
    """Whether the honest car, found private, gets a reservation at `relay` within 30 s."""
    await found_private(car, [relay])
    with trio.move_on_after(30):
        while not car.relays.relay_addr:
            await trio.sleep(0.2)
    return bool(car.relays.relay_addr)


async def test_reservations_for_made_up_peer_ids_take_no_slot():
    """Before: py-libp2p created a reservation for whatever peer id a RESERVE named (then
    failed to answer it), so one connection filled all 32 slots and the honest car found
    no relay. Now a reservation is for the asking peer only."""
    async with fleet(2) as (relay, car):
        await relay_ready(relay, car)
        async with AsyncExitStack() as stack:
            [liar] = await attackers(stack, relay, 1, b"liar")
            granted = 0
            for i in range(40):
                msg = HopMessage(type=HopMessage.RESERVE)
                msg.peer.id = ID.from_pubkey(
                    create_new_key_pair(bytes([i + 1]) * 32).public_key).to_bytes()
                status, _ = await hop(liar, relay, msg)
                granted += status == OK
            got_one = await car_reserved(car, relay)
        assert granted == 0, f"{granted} reservations for peer ids the asker does not hold"
        assert got_one, "the honest car got no reservation"


async def test_two_addresses_cannot_take_every_reservation():
    """Before: 16 keys from each of two addresses (the mesh lets an address hold 16
    connections) took all 32 reservations and the honest car found no relay. Now an address
    holds at most RESERVATIONS_PER_IP reservations and the car gets one."""
    async with fleet(2) as (relay, car):
        await relay_ready(relay, car)
        async with AsyncExitStack() as stack:
            sybils = [*await attackers(stack, relay, 16, b"sybil", ATTACKER_IP),
                      *await attackers(stack, relay, 16, b"sybjl", "127.0.0.10")]
            granted = 0
            for host in sybils:
                status, _ = await hop(host, relay, HopMessage(type=HopMessage.RESERVE))
                granted += status == OK
            got_one = await car_reserved(car, relay)
            refused = relay.relays.report().get("relay_refused", {})
        assert granted == 2 * RESERVATIONS_PER_IP, granted
        assert got_one, "the honest car got no reservation"
        assert refused.get("reservations per address", 0) >= 32 - 2 * RESERVATIONS_PER_IP, refused


async def test_one_peer_cannot_take_every_circuit_to_a_car():
    """Before: a relay allowed 16 circuits per reservation whoever opened them, so one peer
    opening 20 circuits to a car left no circuit for anyone else. Now one peer holds at
    most CIRCUITS_PER_PEER at once and an honest peer still reaches the car."""
    async with fleet(3) as (relay, car, other):
        await relay_ready(relay, car)
        await found_private(car, [relay, other])
        await wait_until(lambda: car.relays.relay_addr, 30)
        car_id = car.host.get_id()
        async with AsyncExitStack() as stack:
            [hog] = await attackers(stack, relay, 1, b"hog")
            granted, held = 0, []
            for _ in range(20):
                msg = HopMessage(type=HopMessage.CONNECT)
                msg.peer.id = car_id.to_bytes()
                status, stream = await hop(hog, relay, msg)
                granted += status == OK
                held.append(stream)  # kept open: the circuits stay up
            await other.host.get_network().close_peer(car_id)
            other.host.get_peerstore().clear_addrs(car_id)
            try:
                await other.connect(f"{car.relays.relay_addr}/p2p/{car_id}")
                error = None
            except Exception as exc:  # noqa: BLE001 - reported below
                error = f"{type(exc).__name__}: {exc}"
            conns = other.host.get_network().get_connections(car_id)
        assert granted == CIRCUITS_PER_PEER, granted
        assert error is None, f"the honest peer could not reach the car: {error}"
        assert conns and all(is_relayed(c) for c in conns)


async def test_circuits_in_total_are_capped():
    """Before: py-libp2p capped circuits per destination only (16 per reservation, 32
    reservations), so peers from many addresses could make a relay carry hundreds. Now the
    relay carries at most `circuits_total`; here 3, taken by two hogs from two addresses."""
    shares = RelayShares(circuits_total=3)
    async with fleet(2, relay_shares=shares) as (relay, car):
        await relay_ready(relay, car)
        await found_private(car, [relay])
        await wait_until(lambda: car.relays.relay_addr, 30)
        car_id = car.host.get_id()
        async with AsyncExitStack() as stack:
            hogs = [*await attackers(stack, relay, 1, b"hog1", ATTACKER_IP),
                    *await attackers(stack, relay, 1, b"hog2", "127.0.0.10")]
            granted, held = 0, []
            for i in range(8):
                msg = HopMessage(type=HopMessage.CONNECT)
                msg.peer.id = car_id.to_bytes()
                status, stream = await hop(hogs[i % 2], relay, msg)
                granted += status == OK
                held.append(stream)  # kept open: the circuits stay up
            refused = relay.relays.report()["relay_refused"]
        assert granted == shares.circuits_total, granted
        assert refused.get("circuits in total") == 8 - shares.circuits_total, refused
