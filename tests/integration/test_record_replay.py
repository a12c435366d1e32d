"""Old records against real hosts: a replayed "available" record after a car left, and two
records with one sequence number (issue 12).

The victim in the replay test is a real `Node` (its own publishing code, its own state
file) in this process; the fleet, a node that joins late and a fresh explorer read its
record. Record ages are moved by a shared clock offset (`ShiftedClock`): every rule of ours
reads the time through it; lifetimes are the configured ones (300 s at least).
"""

from __future__ import annotations

import functools
import random

import trio
from libp2p.custom_types import TProtocol

from p2pfleet.live.config import load_config
from p2pfleet.explorer.crawler import CrawlSettings, Crawler
from p2pfleet.identity import Identity
from p2pfleet.net.mesh import Mesh
from p2pfleet.live.node import Node
from p2pfleet.store.state import NodeState
from p2pfleet.wire.envelope import MAX_CLOCK_SKEW_MS, seal
from test_hostile import attacker, dial, penalty, put_value
from test_mesh import capacity

from fleetkit import NETWORK, ShiftedClock, fleet, settings, wait_until

NODE_SETTINGS = {
    "node.network": NETWORK, "vehicle.metered": "no", "policy.resume_after_s": "0",
    "node.state_jitter_s": "0", "node.publish_private_addrs": "true",
    "records.capacity_lifetime_s": "900", "records.leaving_lifetime_s": "300",
    # a DHT server from the start (the fleet's meshes are too): the explorer finds the car
    # through routing tables, which hold servers only (stable rule, reachability spec §3)
    "node.dht_server_after_s": "0", "node.dht_server_uptime_s": "0",
}


async def put_answered(host, mesh: Mesh, key: str, value: bytes) -> bool:
    """PUT_VALUE straight to `mesh`; True if it stored the value (py-libp2p echoes the
    record), False if it refused it (it resets the stream)."""
    stream = await host.new_stream(mesh.host.get_id(), [TProtocol(mesh.names.protocol("kad"))])
    await stream.write(put_value(key, value))
    with trio.fail_after(10):
        try:
            return bool(await stream.read(65536))
        except Exception:  # a reset
            return False


async def record_state(mesh: Mesh, peer_id: str) -> str | None:
    got = await mesh.get_capacity(peer_id)
    return got.body.state if got is not None else None


async def until_state(mesh: Mesh, peer_id: str, state: str, timeout: float = 20.0) -> None:
    """Poll `mesh`'s lookup of `peer_id` until its record says `state`."""
    with trio.fail_after(timeout):
        while await record_state(mesh, peer_id) != state:
            await trio.sleep(0.1)


async def test_a_replayed_available_record_does_not_bring_back_a_node_that_left(tmp_path):
    clock = ShiftedClock()
    config = load_config(None, env={}, overrides=NODE_SETTINGS)
    car_id = Identity.from_seed(b"car that leaves")
    async with fleet(3, state_dir=tmp_path, clock=clock) as meshes, \
            trio.open_nursery() as nursery:
        car = Node(car_id, config, NodeState(tmp_path / "car.sqlite"),
                   bootstrap=(meshes[0].listen_addrs()[0],), listen=("/ip4/127.0.0.9/tcp/0",),
                   rng=random.Random(1), clock=clock)
        await nursery.start(functools.partial(car.run, handle_signals=False))
        pid = car_id.peer_id
        key = meshes[0].names.node_key(pid)
        for mesh in meshes:  # every node looked it up (and keeps the copy it found)
            await until_state(mesh, pid, "available")
        available = await meshes[1].get_capacity(pid)
        old = available.raw  # anyone can keep a copy of a signed record

        await car.stop()
        for mesh in meshes:
            await until_state(mesh, pid, "leaving")

        # until the short leaving record would be gone (300 s + the 30 s skew), while the
        # replaced record (900 s) still lives
        lifetime_s = config.records.leaving_lifetime_s
        clock.offset += lifetime_s + MAX_CLOCK_SKEW_MS / 1000 + 30
        assert available.body.exp > clock() * 1000  # the old record is still current

        late = Mesh(Identity.from_seed(b"joins after the car left"), settings(5),
                    NodeState(tmp_path / "late.sqlite"), clock=clock)
        # node 2 after a restart: an empty DHT store, its state file kept
        restarted = Mesh(Identity.from_seed(b"node 2 restarted"), settings(6),
                         NodeState(tmp_path / "state-2.sqlite"), clock=clock)
        for mesh in (late, restarted):
            await nursery.start(mesh.run)
            await mesh.connect(meshes[0].listen_addrs()[0])
        assert restarted.dht.value_store.get(key.encode()) is None
        async with attacker(b"record replayer") as evil:
            for i, mesh in enumerate([*meshes, restarted]):
                await dial(evil, mesh, f"127.0.4.{i + 1}")
                # every node that saw the leaving record refuses the older one
                assert not await put_answered(evil, mesh, key, old)
                assert penalty(mesh, evil.get_id()) == 0  # stale: no offence of a relay's
            await dial(evil, late, "127.0.4.9")
            await put_answered(evil, late, key, old)  # it knows nothing newer: may store it

        for mesh in [*meshes, restarted, late]:
            assert await record_state(mesh, pid) != "available", mesh.identity.peer_id

        explorer = Crawler(CrawlSettings(network=NETWORK, bootstrap=(meshes[0].listen_addrs()[0],),
                                         timeout_s=20, seed=3), clock=clock)
        await nursery.start(explorer.run)
        snap = await explorer.crawl()
        views = {p.peer_id: p for p in snap.peers}
        assert pid in views, "the explorer must have read the car's record"
        assert views[pid].state == "offline" and views[pid].why_offline == "leaving", views[pid]
        nursery.cancel_scope.cancel()



async def test_a_leaving_car_reaches_its_record_holders_though_one_peer_is_silent(tmp_path):
    """A leaving car has 3 s (LEAVE_TIMEOUT_S) to publish its "leaving" record. The put's
    walk waits for its slowest query (up to 5 s): with one peer in the car's routing table
    that accepts TCP and never answers, the walk outlasted the window and no one ever read
    "leaving". The car now first stores it where its last record was accepted."""
    import multiaddr
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    held: list = []

    async def hang(stream) -> None:  # accepts, and never answers a handshake
        held.append(stream)
        await trio.sleep_forever()

    config = load_config(None, env={}, overrides=NODE_SETTINGS)
    car_id = Identity.from_seed(b"car that leaves past a silent peer")
    async with fleet(3, state_dir=tmp_path) as meshes, trio.open_nursery() as nursery:
        [listener] = await nursery.start(
            functools.partial(trio.serve_tcp, hang, 0, host="127.0.0.1"))
        silent_addr = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{listener.socket.getsockname()[1]}")
        car = Node(car_id, config, NodeState(tmp_path / "car.sqlite"),
                   bootstrap=(meshes[0].listen_addrs()[0],), listen=("/ip4/127.0.0.9/tcp/0",),
                   rng=random.Random(1))
        await nursery.start(functools.partial(car.run, handle_signals=False))
        pid = car_id.peer_id
        for mesh in meshes:
            await until_state(mesh, pid, "available")
        silent = ID.from_base58(Identity.from_seed(b"a silent peer").peer_id)
        car.mesh.host.get_peerstore().add_addrs(silent, [silent_addr], 3600)
        assert await car.mesh.dht.routing_table.add_peer(PeerInfo(silent, [silent_addr]),
                                                         skip_server_mode_check=True)
        await car.stop()
        for mesh in meshes:
            await until_state(mesh, pid, "leaving")
        nursery.cancel_scope.cancel()

async def test_two_records_with_one_seq_ban_their_signer_not_the_forwarders(tmp_path):
    async with fleet(4, state_dir=tmp_path) as meshes:
        victim, signer, holder, reader = meshes
        key = victim.names.node_key(signer.identity.peer_id)
        seq = 7_000
        one = seal(capacity(seq), signer.identity, NETWORK)
        other = seal(capacity(seq, bench=1.0), signer.identity, NETWORK)
        async with attacker(b"honest relay") as relay:
            await dial(relay, victim, "127.0.5.1")
            await dial(relay, holder, "127.0.5.2")
            # the relay forwards what it got: one version to the victim first, the other
            # version to the victim and to a holder that never saw the first
            assert await put_answered(relay, victim, key, one)
            assert not await put_answered(relay, victim, key, other)
            assert await put_answered(relay, holder, key, other)

            await wait_until(lambda: victim.is_banned(signer.identity.peer_id))
            bans = {p: why for p, _until, why in victim.state.active_bans(victim.clock())}
            assert "equivocation" in bans[signer.identity.peer_id]
            await wait_until(lambda: signer.identity.peer_id not in victim.connected_peers())
            assert penalty(victim, relay.get_id()) == 0 and not victim.is_banned(relay.get_id())
            assert relay.get_network().get_connections(victim.host.get_id())  # still welcome

        # a reader that finds the two versions at two holders bans the signer too, and
        # neither holder: they served what they were given
        await reader.connect(holder.listen_addrs()[0])
        got = await reader.get_capacity(signer.identity.peer_id)
        assert got is not None and got.body.seq == seq
        assert reader.is_banned(signer.identity.peer_id)
        for mesh in (victim, holder):
            assert penalty(reader, mesh.host.get_id()) == 0
        # the ban is persisted: a restarted victim refuses the signer still
        restarted = Mesh(Identity.from_seed(b"victim again"), settings(7), victim.state)
        assert restarted.is_banned(signer.identity.peer_id)
