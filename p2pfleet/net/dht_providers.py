"""Provider records for model blobs: our own walk over GET_PROVIDERS (fix 11 for py-libp2p 0.8.1).

A node that holds a public (model) blob announces itself with ADD_PROVIDER to the k peers
closest to the blob's provider key; a fetcher walks GET_PROVIDERS towards the key and
collects the providers every responder holds. Upstream problems this avoids:

- The key. Our DHT key for a model, /p2pfleet/<net>/model/1/<digest hex>, is 88 bytes or
  more: a py-libp2p server refuses ADD_PROVIDER keys over 80 bytes (the announcement is
  fire-and-forget, so `provide()` reports success although no server stored it), and its
  FIND_NODE refuses keys over 50 bytes that are not multihashes, so `provide()` cannot
  find the closest peers either. On the wire the provider key is therefore the sha2-256
  multihash of that DHT key string (34 bytes; `provider_key`): namespaced like the string,
  and a valid FIND_NODE and ADD_PROVIDER key.
- `KadDHT.find_providers` returns the locally held providers without asking anyone, and
  keeps every provider it ever learnt for 48 h: a node that looked a model up once never
  hears of new providers and keeps dialling cars that left. We always walk the network.
- Its GET_PROVIDERS client drops the addresses of closer peers, so a walk cannot go beyond
  peers already connected. Ours keeps them (in the peerstore, 10 min, as value lookups do).
- Provider records live 48 h on servers (libp2p's republish interval suits servers, not
  cars that leave the mesh): `shorten_provider_expiry` makes them expire after 1 h
  (reachability-and-discovery.md, section 5); providers re-announce every 30 min.

py-libp2p's own ADD_PROVIDER sender (`ProviderStore._send_add_provider`) and its server
side are used as they are.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import trio
import varint
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import common as kad_common
from libp2p.kad_dht import provider_store as kad_provider_store
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from ..names import Names
from .dht_lookup import query_rounds, start_shortlist

log = logging.getLogger(__name__)

K = 20
ALPHA = 3
QUERY_TIMEOUT_S = 5.0
MAX_RESPONSE = 64 * 1024  # our DHT frame cap (reachability-and-discovery.md, section 8)
PROVIDER_EXPIRY_S = 3600
REPROVIDE_S = 1800
ADDR_TTL_S = 600
_SHA2_256_MULTIHASH = b"\x12\x20"


def provider_key(names: Names, digest: bytes) -> bytes:
    """The key a model blob's provider records are stored under on the wire."""
    return _SHA2_256_MULTIHASH + hashlib.sha256(names.model_key(digest).encode()).digest()


def shorten_provider_expiry(seconds: int = PROVIDER_EXPIRY_S) -> None:
    """Fix 11: provider records held by this node expire after `seconds` (upstream 48 h).
    Process-wide: the constant is read by ProviderStore at each use."""
    kad_provider_store.PROVIDER_RECORD_EXPIRATION_INTERVAL = seconds  # type: ignore[attr-defined]


@dataclass
class ProviderWalk:
    """What one walk found and cost."""

    providers: dict[ID, list[Multiaddr]]
    closest: list[ID]
    rounds: int = 0
    rpcs: int = 0


def _addrs(raw: Any) -> list[Multiaddr]:
    out = []
    for b in list(raw)[:8]:
        try:
            out.append(Multiaddr(bytes(b)))
        except Exception:  # noqa: BLE001 - a bad address is skipped
            pass
    return out


async def get_providers_rpc(dht: Any, peer: ID, key: bytes) -> tuple[list[PeerInfo], list[ID]]:
    """One GET_PROVIDERS request: (providers, closer peers). Raises on any failure."""
    host = dht.host
    stream = await host.new_stream(peer, [TProtocol(kad_common.PROTOCOL_ID)])
    try:
        message = Message()
        message.type = Message.MessageType.GET_PROVIDERS
        message.key = key
        message.senderRecord, _ = env_to_send_in_RPC(host)
        payload = message.SerializeToString()
        await stream.write(varint.encode(len(payload)) + payload)
        raw = await read_varint_prefixed_bytes_limited(stream, MAX_RESPONSE)
    finally:
        try:
            await stream.close()
        except Exception:  # noqa: BLE001
            pass
    response = Message()
    response.ParseFromString(raw)
    if response.type != Message.MessageType.GET_PROVIDERS:
        raise ValueError(f"answer of type {response.type} to GET_PROVIDERS")
    store = host.get_peerstore()
    providers: list[PeerInfo] = []
    for p in list(response.providerPeers)[:K]:
        try:
            pid = ID(p.id)
        except Exception:  # noqa: BLE001
            continue
        addrs = _addrs(p.addrs)
        if addrs and pid != host.get_id():
            store.add_addrs(pid, addrs, ADDR_TTL_S)
        providers.append(PeerInfo(pid, addrs))
    closer: list[ID] = []
    for p in list(response.closerPeers)[:K]:
        try:
            pid = ID(p.id)
        except Exception:  # noqa: BLE001
            continue
        if pid == host.get_id():
            continue
        addrs = _addrs(p.addrs)
        if addrs:
            store.add_addrs(pid, addrs, ADDR_TTL_S)
        closer.append(pid)
    return providers, closer


async def walk(dht: Any, key: bytes, *, want: int | None = None, k: int = K,
               alpha: int = ALPHA, timeout: float = QUERY_TIMEOUT_S) -> ProviderWalk:
    """Iterative GET_PROVIDERS walk towards `key`: the k closest responders and every
    provider they hold (the local store's included). Stops early once `want` providers
    are known."""
    found: dict[ID, list[Multiaddr]] = {}
    for info in dht.provider_store.get_providers(key):
        found.setdefault(info.peer_id, list(info.addrs))
    shortlist = start_shortlist(dht, key, k)
    responded: list[ID] = []
    result = ProviderWalk(found, [])

    async def query(peer: ID) -> None:
        with trio.move_on_after(timeout):
            try:
                providers, closer = await get_providers_rpc(dht, peer, key)
            except Exception as exc:  # noqa: BLE001 - a failing peer is just not counted
                log.debug("GET_PROVIDERS to %s failed: %s", peer, exc)
                return
            responded.append(peer)
            for info in providers:
                found.setdefault(info.peer_id, list(info.addrs))
            for p in closer:
                if p not in shortlist:
                    shortlist.append(p)

    await query_rounds(key, shortlist, query, k=k, alpha=alpha, stats=result,
                       enough=lambda: want is not None and len(found) >= want)
    result.closest = sort_peer_ids_by_distance(key, responded)[:k]
    return result


async def provide(dht: Any, key: bytes, *, timeout: float = QUERY_TIMEOUT_S) -> int:
    """Announce this node as a provider of `key` to the k closest peers (and in its own
    store). Returns to how many peers the announcement was sent."""
    host = dht.host
    dht.provider_store.add_provider(key, PeerInfo(host.get_id(), list(host.get_addrs())))
    closest = (await walk(dht, key, timeout=timeout)).closest
    sent = 0

    async def one(peer: ID) -> None:
        nonlocal sent
        with trio.move_on_after(timeout):
            if await dht.provider_store._send_add_provider(peer, key):
                sent += 1

    async with trio.open_nursery() as nursery:
        for peer in closest:
            nursery.start_soon(one, peer)
    return sent
