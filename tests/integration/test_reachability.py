"""AutoNAT and the DHT mode on loopback (net/reachability.py): real py-libp2p hosts.

NAT itself is in tests/netbed/test_reachability.py; here is the logic that needs none."""

from __future__ import annotations

import socket
import time

import multiaddr
import trio

from p2pfleet.core.reachability import Answer, Reach, StableRule
from p2pfleet.identity import Identity
from p2pfleet.net import reachability
from p2pfleet.net.mesh import Mesh
from p2pfleet.wire.envelope import seal
from test_mesh import capacity, now_ms

from fleetkit import NETWORK, ShiftedClock, fleet, settings, wait_until


def closed_port(ip: str) -> int:
    """A TCP port on `ip` where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


async def test_nodes_on_one_network_find_each_other_public_and_serve_the_dht():
    async with fleet(2) as meshes:
        for mesh in meshes:
            await wait_until(lambda m=mesh: m.reachable.status == Reach.PUBLIC, 30)
            assert mesh.reachable.report() == {
                "reachability": "public", "reachability_why": "1 peer(s) dialled us back",
                "dht_mode": "server", "stable": True,
                "stable_why": "no stability condition (stable rule off)"}


async def test_the_dht_and_relay_serve_only_after_the_stable_time():
    """A public node stays a DHT client and offers no relay until it has been public for
    the rule's time (read through the mesh's clock, moved forward here, never slept)."""
    clock = ShiftedClock()
    async with fleet(2, clock=clock, stable=StableRule(public_s=600, uptime_s=0)) as meshes:
        for mesh in meshes:
            await wait_until(lambda m=mesh: m.reachable.status == Reach.PUBLIC, 30)
            await wait_until(lambda m=mesh: "server after 10 min" in
                             m.reachable.report()["stable_why"], 10)
            report = mesh.reachable.report()
            assert report["dht_mode"] == "client" and not report["stable"], report
            assert report["stable_why"].startswith("public for "), report
            assert not mesh.relays.offering
        clock.offset += 600
        for mesh in meshes:
            await wait_until(lambda m=mesh: m.reachable.dht_mode == "server", 10)
            await wait_until(lambda m=mesh: m.relays.offering, 15)
            assert mesh.reachable.report()["stable"]


async def test_a_dial_back_is_a_new_connection_not_the_one_the_request_came_on():
    """Attack: py-libp2p's AutoNAT server "dialled back" with host.connect, which returns at
    once over the existing connection: an address nobody can reach was reported reachable,
    so a node behind NAT believed it could serve the DHT."""
    async with fleet(2) as (server, asker):
        for mesh in (server, asker):  # their own checks are done (next in 15 min)
            await wait_until(lambda m=mesh: m.reachable.status != Reach.UNKNOWN, 30)
        ip = asker.listen_addrs()[0].split("/")[2]
        dead = multiaddr.Multiaddr(f"/ip4/{ip}/tcp/{closed_port(ip)}")
        server.reachable.service._last_dial.clear()  # the asker's own check used its slot
        status, _addr = await asker.reachable.service.query_server(
            server.host.get_id(), [dead.to_bytes()])
        assert reachability.answer_of(status) == Answer.FAILED
        # its real address answers on a new connection
        server.reachable.service._last_dial.clear()
        status, addr = await asker.reachable.service.query_server(
            server.host.get_id(), [a.to_bytes() for a in asker.host.get_addrs()])
        assert reachability.answer_of(status) == Answer.DIALED


async def test_a_dht_client_never_enters_a_servers_routing_table():
    """Attack: py-libp2p's DHT server adds every peer that opens a DHT stream to its routing
    table, clients included, and hands them out to others as servers to store records at."""
    async with fleet(1) as (server,):
        client = Mesh(Identity.from_seed(b"itest-client"), settings(5, dht_mode="client"))
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            await client.connect(server.listen_addrs()[0])
            await client.put_capacity(seal(capacity(now_ms()), client.identity, NETWORK))
            client_id = client.host.get_id()
            await wait_until(lambda: server.host.get_peerstore().get_protocols(client_id), 10)
            await wait_until(lambda: client_id not in server.dht.routing_table.get_peer_ids(),
                             3 * reachability.PRUNE_S)
            assert client_id not in server.dht.routing_table.get_peer_ids()
            assert client.reachable.report()["dht_mode"] == "client"
            nursery.cancel_scope.cancel()


async def verdicts(reach: reachability.Reachable, peers: list, answer: Answer) -> None:
    """What AutoNAT peers behind a NAT would answer (tests/netbed has the real NAT)."""
    for peer in peers:
        reach.verdicts.record(time.time(), str(peer.host.get_id()), answer, "as told by the test")
    reach.verdicts.update(time.time(), available=len(peers))
    await reach.apply_mode()


async def test_a_node_found_private_stops_serving_and_its_peers_drop_it():
    async with fleet(3) as meshes:
        car, others = meshes[1], [meshes[0], meshes[2]]
        await meshes[2].connect(car.listen_addrs()[0])
        car_id = car.host.get_id()
        kad = car.names.protocol("kad")
        await wait_until(lambda: car.reachable.status == Reach.PUBLIC, 30)  # its own check ran
        for m in others:  # they put it in their tables when it sends them DHT requests
            await car.dht.add_peer(m.host.get_id())
        await car.put_capacity(seal(capacity(now_ms()), car.identity, NETWORK))
        await wait_until(lambda: all(car_id in m.dht.routing_table.get_peer_ids() for m in others), 20)
        await wait_until(lambda: car.relays.offering, 15)
        await verdicts(car.reachable, others, Answer.FAILED)
        assert car.reachable.report()["dht_mode"] == "client"
        await wait_until(lambda: not car.relays.offering, 10)  # nor relays for others
        assert "2 peer(s) could not dial us back" in car.reachable.report()["reachability_why"]
        assert kad not in {str(p) for p in car.host.get_mux().handlers}
        await wait_until(lambda: all(car_id not in m.dht.routing_table.get_peer_ids()
                                     for m in others), 3 * reachability.PRUNE_S)
        # it still looks records up as a client
        await meshes[2].put_capacity(seal(capacity(now_ms()), meshes[2].identity, NETWORK))
        assert await car.get_capacity(meshes[2].identity.peer_id) is not None
        # and serves again (through our fixed handler) once public
        await verdicts(car.reachable, others, Answer.DIALED)
        assert car.reachable.report()["dht_mode"] == "server"
        assert kad in {str(p) for p in car.host.get_mux().handlers}
        await wait_until(lambda: kad in [str(p) for p in
                                         meshes[0].host.get_peerstore().get_protocols(car_id)], 20)
        await car.put_capacity(seal(capacity(now_ms()), car.identity, NETWORK))
        assert await meshes[0].get_capacity(car.identity.peer_id) is not None


async def test_a_node_whose_first_witnesses_do_not_answer_asks_others():
    """Two of the first four peers asked never answer: the two that dialled us back are
    not enough (three must agree). Before, the node asked the same four every 2 s; the
    two refused a second dial-back within their one-a-minute limit, which erased their
    answers, and it stayed unknown for good. Now it asks peers it has not asked lately."""
    from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID

    async def never_answers(stream) -> None:
        await stream.reset()

    async with trio.open_nursery() as nursery:
        peers = []
        for i in range(1, 6):
            peer = Mesh(Identity.from_seed(f"autonat-witness-{i}".encode()),
                        settings(i, dht_refresh_s=0))
            await nursery.start(peer.run)
            peers.append(peer)
        for mute in peers[:2]:  # they speak AutoNAT (identify says so) but never answer
            mute.host.set_stream_handler(AUTONAT_PROTOCOL_ID, never_answers)
        node = Mesh(Identity.from_seed(b"autonat-asker"), settings(0, dht_refresh_s=0))
        await nursery.start(node.run)
        for peer in peers:  # in this order: the mute ones come first in its connections
            await node.connect(peer.listen_addrs()[0])
        await wait_until(lambda: node.reachable.status == Reach.PUBLIC, 30)
        assert node.reachable.verdicts.why == "3 peer(s) dialled us back"
        nursery.cancel_scope.cancel()
