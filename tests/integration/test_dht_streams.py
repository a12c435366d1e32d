"""Fix 19 (net/dht_streams.py): DHT requests reuse an open stream to the peer, against
real hosts: answers stay right, and the server sees one stream instead of one per request."""

from __future__ import annotations

import time

import trio
from libp2p.abc import INotifee

from p2pfleet.identity import Identity
from p2pfleet.net.mesh import Mesh
from p2pfleet.wire.envelope import seal
from p2pfleet.wire.kinds import Capacity

from fleetkit import NETWORK, settings, wait_until

GETS = 5


class InboundStreams(INotifee):
    def __init__(self) -> None:
        self.count = 0

    async def opened_stream(self, network, stream) -> None:
        self.count += 1

    async def closed_stream(self, network, stream) -> None:
        pass

    async def connected(self, network, conn) -> None:
        pass

    async def disconnected(self, network, conn) -> None:
        pass

    async def listen(self, network, multiaddr) -> None:
        pass

    async def listen_close(self, network, multiaddr) -> None:
        pass


def capacity() -> Capacity:
    now = int(time.time() * 1000)
    return Capacity(seq=now, exp=now + 600_000, sw_version="0.1.0", state="available",
                    hw_class=b"\x07" * 32, cores=2, memory_mb=1024, bench=50.0,
                    providers=("CPUExecutionProvider",), ort_version="1.32.0", slots=1,
                    addrs=())


async def test_requests_to_one_peer_share_a_stream_and_get_right_answers():
    async with trio.open_nursery() as nursery:
        # no table refresh (its walks would open streams too); a long server idle timeout,
        # so the reuse window (a quarter of it) outlasts a slow request on a busy machine
        over = dict(dht_refresh_s=0, dht_idle_timeout_s=40.0)
        server = Mesh(Identity.from_seed(b"dht-streams-server"),
                      settings(0, listen=("/ip4/127.0.9.1/tcp/0",), **over))
        await nursery.start(server.run)
        inbound = InboundStreams()
        server.host.get_network().register_notifee(inbound)
        client = Mesh(Identity.from_seed(b"dht-streams-client"),
                      settings(1, listen=("/ip4/127.0.9.2/tcp/0",), **over))
        await nursery.start(client.run)
        await client.connect(server.listen_addrs()[0])
        before = inbound.count
        await client.put_capacity(seal(capacity(), client.identity, NETWORK))
        assert client.last_put_peers == 1
        client.dht.value_store.store.clear()  # found only if the server answers it
        for _ in range(GETS):
            opened = await client.get_capacity(client.identity.peer_id)
            assert opened is not None and opened.signer == client.identity.public_key
            client.dht.value_store.store.clear()
        # one walk request and a PUT_VALUE, then GETS walks: GETS + 2 requests; upstream
        # opens a stream for each
        assert inbound.count - before <= 2, inbound.count - before
        nursery.cancel_scope.cancel()


class _AnswersTwice:
    """A server's side of a DHT stream that sends each answer twice (a buggy or hostile
    peer): the copy stays unread in the client's stream buffer."""

    def __init__(self, stream) -> None:
        self._stream, self._prefix = stream, None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)

    async def write(self, data: bytes) -> None:
        await self._stream.write(data)
        if self._prefix is None:  # upstream writes the length prefix, then the message
            self._prefix = bytes(data)
        else:
            await self._stream.write(self._prefix + bytes(data))
            self._prefix = None


async def test_a_stream_with_an_unread_answer_is_not_reused():
    """An answer beyond the one read must not be taken as the next request's answer: a
    stream holding unread bytes goes, it is not pooled."""
    async with trio.open_nursery() as nursery:
        over = dict(dht_refresh_s=0, dht_idle_timeout_s=40.0)
        server = Mesh(Identity.from_seed(b"dht-streams-server2"),
                      settings(0, listen=("/ip4/127.0.9.3/tcp/0",), **over))
        await nursery.start(server.run)
        inner = server.dht.handle_stream
        server.host.set_stream_handler(server.names.protocol("kad"),
                                       lambda stream: inner(_AnswersTwice(stream)))
        client = Mesh(Identity.from_seed(b"dht-streams-client2"),
                      settings(1, listen=("/ip4/127.0.9.4/tcp/0",), **over))
        await nursery.start(client.run)
        await client.connect(server.listen_addrs()[0])
        await client.put_capacity(seal(capacity(), client.identity, NETWORK))
        assert client.last_put_peers == 1
        for _ in range(2):
            client.dht.value_store.store.clear()  # found only if the server answers it
            opened = await client.get_capacity(client.identity.peer_id)
            assert opened is not None and opened.signer == client.identity.public_key
        nursery.cancel_scope.cancel()


async def test_a_request_cancelled_half_way_resets_its_stream():
    """A query cancelled while it waits for its answer (its deadline, or a get that reached
    its quorum) used to leave its stream open on both ends: upstream closes it in a
    `finally` that the cancellation cut short. The server then waited for its idle timeout
    and counted a stall against the honest client. Now the stream is reset at once."""
    async with trio.open_nursery() as nursery:
        over = dict(dht_refresh_s=0, dht_idle_timeout_s=30.0)
        server = Mesh(Identity.from_seed(b"dht-streams-server3"),
                      settings(0, listen=("/ip4/127.0.9.5/tcp/0",), **over))
        await nursery.start(server.run)
        inner, ended = server.dht.handle_stream, []

        async def slow(stream) -> None:  # answers after the client gave up
            try:
                await trio.sleep(1.0)
                await inner(stream)
            finally:
                ended.append(stream)

        server.host.set_stream_handler(server.names.protocol("kad"), slow)
        client = Mesh(Identity.from_seed(b"dht-streams-client3"),
                      settings(1, listen=("/ip4/127.0.9.6/tcp/0",), **over))
        await nursery.start(client.run)
        await client.connect(server.listen_addrs()[0])
        key = client.names.node_key(client.identity.peer_id).encode()
        with trio.move_on_after(0.3) as waited:
            await client.dht.value_store._get_from_peer(server.host.get_id(), key,
                                                        return_record=True)
        assert waited.cancelled_caught
        await wait_until(lambda: ended, timeout=10)  # not the server's 30 s idle timeout
        assert not server.stats.violations, server.stats.violations
        nursery.cancel_scope.cancel()
