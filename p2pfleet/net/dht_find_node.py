"""FIND_NODE for any key, as the libp2p Kademlia specification answers it (fix 14).

Upstream problem (py-libp2p 0.8.1, kad_dht.py `_do_handle_stream`): a FIND_NODE whose key
is not a multihash and is longer than 50 bytes is "not a valid PeerId" and the stream is
reset. A standard Kademlia client (go-libp2p, rust-libp2p, js-libp2p) stores a value by
first asking FIND_NODE for the value's key, then sending PUT_VALUE to the closest peers;
our record keys (/p2pfleet/<net>/node/1/<peer-id>, 75+ bytes) are not peer ids, so such a
client's put stored nothing. The specification answers FIND_NODE for any key with the k
closest peers by XOR distance of the key's SHA-256, which is what the routing table's
`find_local_closest_peers` computes.

The fix sits between the DHT's handler and its stream: it reads whole frames, answers the
FIND_NODE requests upstream would refuse itself, and hands every other frame to upstream
unchanged. It runs inside every per-peer and per-stream limit the handler already has
(inbound limiter, frame caps and deadlines of fix 7, idle timeouts of fix 3, stream slots).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)

UPSTREAM_MAX_PLAIN_KEY = 50  # upstream accepts non-multihash keys only up to this length
MAX_FIND_NODE_KEY = 1024     # our record keys are < 200 bytes; a longer key is refused


def upstream_refuses(key: bytes) -> bool:
    """True if py-libp2p 0.8.1 would reset a FIND_NODE for `key` (its PeerId check)."""
    import multihash

    if not key or len(key) <= UPSTREAM_MAX_PLAIN_KEY:
        return False  # empty keys stay upstream's to refuse; short ones it answers
    try:
        multihash.decode(key)
    except Exception:  # noqa: BLE001 - any decode failure is a refusal upstream
        return True
    return False


class _AnyKeyFindNodeStream:
    """A stream proxy for the DHT handler that answers FIND_NODE for any key itself."""

    def __init__(self, stream: Any, dht: Any, max_frame: int):
        self._stream = stream
        self._dht = dht
        self._max_frame = max_frame
        self._pending = b""

    async def read(self, n: int | None = None) -> bytes:
        while not self._pending:
            self._pending = await self._next_frame_for_upstream()
        take = len(self._pending) if n is None else n
        data, self._pending = self._pending[:take], self._pending[take:]
        return data

    async def _next_frame_for_upstream(self) -> bytes:
        """The next frame (with its length prefix) upstream must handle; the FIND_NODE
        frames we answer ourselves are consumed here."""
        from libp2p.utils.varint import encode_uvarint, read_varint_prefixed_bytes_limited

        # an end of stream (clean or not) reaches upstream's read as the same exception
        body = await read_varint_prefixed_bytes_limited(self._stream, self._max_frame)
        if await self._answered(body):
            return b""
        return encode_uvarint(len(body)) + body

    async def _answered(self, body: bytes) -> bool:
        from libp2p.kad_dht.common import BUCKET_SIZE
        from libp2p.kad_dht.pb.kademlia_pb2 import Message
        from libp2p.peer.peerstore import env_to_send_in_RPC
        from libp2p.kad_dht.utils import maybe_consume_signed_record
        from libp2p.utils.varint import encode_uvarint

        message = Message()
        try:
            message.ParseFromString(body)
        except Exception:  # noqa: BLE001 - upstream refuses undecodable frames itself
            return False
        if message.type != Message.MessageType.FIND_NODE or not upstream_refuses(message.key):
            return False
        peer = self._stream.muxed_conn.peer_id
        if not maybe_consume_signed_record(message, self._dht.host, peer):
            return False  # upstream resets the stream for an invalid signed record
        if len(message.key) > MAX_FIND_NODE_KEY:
            raise ValueError(f"FIND_NODE key of {len(message.key)} bytes from {peer}: "
                             f"over the {MAX_FIND_NODE_KEY}-byte cap")
        closest = self._dht.routing_table.find_local_closest_peers(message.key, BUCKET_SIZE)
        response = Message(type=Message.MessageType.FIND_NODE)
        self._dht._add_closer_peers_to_response(response, closest, exclude_peer_id=peer)
        response.senderRecord = env_to_send_in_RPC(self._dht.host)[0]
        data = response.SerializeToString()
        await self._stream.write(encode_uvarint(len(data)) + data)
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def answer_find_node_for_any_key(host: Any, dht: Any, protocol: str) -> None:
    """Re-register a server DHT's handler on `protocol` so FIND_NODE answers any key.
    Call after creating the DHT (which registers its handler), before it runs; a client
    DHT (no handler) is left alone."""
    from libp2p.custom_types import TProtocol
    from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE  # type: ignore[attr-defined]

    if protocol not in {str(p) for p in host.get_mux().handlers}:
        return
    handler: Callable[[Any], Awaitable[None]] = dht.handle_stream

    async def handle(stream: Any) -> None:
        await handler(_AnyKeyFindNodeStream(stream, dht, MAX_DHT_MESSAGE_SIZE))

    host.set_stream_handler(TProtocol(protocol), handle)
