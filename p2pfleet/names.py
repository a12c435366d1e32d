"""Every protocol id, gossip topic and DHT key of the network, defined once.

Each carries the network id and the protocol's major version, so test and production
fleets never mix and a new major version can run beside the old one. protocol/names.json
is generated from the tables below (`tools/gen_protocol.py`); a test fails if they drift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NETWORK_PATTERN = r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?"
_NETWORK_RE = re.compile(NETWORK_PATTERN)

# Stream protocols (libp2p protocol ids).
PROTOCOLS: dict[str, str] = {
    "kad": "/p2pfleet/{network}/kad/1.0.0",        # Kademlia DHT (never the default /ipfs one)
    "lease": "/p2pfleet/{network}/lease/1.0.0",    # work_request -> lease_batch | no_work
    "report": "/p2pfleet/{network}/report/1.0.0",  # progress, hand_back, result, failed, receipt_request -> receipts
    "notice": "/p2pfleet/{network}/notice/1.0.0",  # publisher -> node: cancel, receipt
    "blob": "/p2pfleet/{network}/blob/2.0.0",      # blob_request -> blob_manifest, chunks
    "info": "/p2pfleet/{network}/info/1.0.0",      # -> node_info (opt-in)
}

# GossipSub topics (low rate: announcements, not shards).
TOPICS: dict[str, str] = {
    "jobs": "/p2pfleet/{network}/jobs/1",          # job announcements
    "evidence": "/p2pfleet/{network}/evidence/1",  # evidence reports, key rotations
}

# DHT keys.
DHT_KEYS: dict[str, str] = {
    "node": "/p2pfleet/{network}/node/1/{peer_id}",          # capacity record (value)
    "model": "/p2pfleet/{network}/model/1/{digest_hex}",     # providers of a model blob
    "rotation": "/p2pfleet/{network}/rotation/1/{peer_id}",  # key rotation statement (value)
}


class NetworkIdError(ValueError):
    pass


def check_network(network: str) -> str:
    if not isinstance(network, str) or not _NETWORK_RE.fullmatch(network):
        raise NetworkIdError(
            f"network id {network!r} is invalid: use 1-32 of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit"
        )
    return network


@dataclass(frozen=True)
class Names:
    """The concrete names for one network."""

    network: str

    def __post_init__(self) -> None:
        check_network(self.network)

    def protocol(self, name: str) -> str:
        return PROTOCOLS[name].format(network=self.network)

    def topic(self, name: str) -> str:
        return TOPICS[name].format(network=self.network)

    def node_key(self, peer_id: str) -> str:
        return DHT_KEYS["node"].format(network=self.network, peer_id=peer_id)

    def model_key(self, digest: bytes) -> str:
        return DHT_KEYS["model"].format(network=self.network, digest_hex=digest.hex())

    def rotation_key(self, peer_id: str) -> str:
        return DHT_KEYS["rotation"].format(network=self.network, peer_id=peer_id)
