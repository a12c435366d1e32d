"""Hole punching between two nodes behind NAT: real `p2pfleet node start` processes
(net/holepunch.py). Both hold a reservation at a public relay; the second reaches the first
through it; the first (it received the relayed connection) starts DCUtR. Behind
port-preserving NAT they end up directly connected and a model blob (1 MiB, far above a
circuit's 128 KiB) flows directly; behind symmetric NAT they stay relayed, the first node
says why, and the blob is refused rather than sent over the relay."""

from __future__ import annotations

import hashlib
import os

import pytest

import netbed
from p2pfleet.live.control import ControlError
from p2pfleet.live.localfleet import wait_for
from p2pfleet.store.blobcache import BlobCache

BLOB = 1024 * 1024


@pytest.mark.parametrize("mode", ["preserve", "random"])
def test_two_nated_nodes_punch_through_unless_the_nat_is_symmetric(new_bed, tmp_path, mode):
    with new_bed() as bed:
        relay_host = bed.public("relay")
        host1 = bed.behind(bed.nat_router("home1", mode=mode), "car1")
        host2 = bed.behind(bed.nat_router("home2", mode=mode), "car2")
        relay = netbed.start_node(relay_host, tmp_path)
        car1 = netbed.start_node(host1, tmp_path, bootstrap=[relay.addr],
                                 settings={"node.info_opt_in": "true"})
        car2 = netbed.start_node(host2, tmp_path, bootstrap=[relay.addr])

        def reserved(car) -> bool:
            status = car.try_ask("status")
            return bool(status and status.get("relay_addrs"))

        wait_for(lambda: reserved(car1) and reserved(car2), 90, "both relay reservations")
        circuit = car1.ask("status")["relay_addrs"][0]
        data = os.urandom(BLOB)
        digest = hashlib.sha256(data).digest()
        cache = BlobCache(car1.data_dir / "cache" / "blobs", 64 * BLOB)  # the node's own cache
        cache.put(digest, data, public=True)
        cache.close()

        def record_lists_circuit() -> bool:
            found = car2.ask("lookup", peer_id=car1.peer_id)
            return found["found"] and found["record"]["addrs"] == [circuit]

        wait_for(record_lists_circuit, 90, "car1's record with its relayed address")
        reached = car2.ask("reach", peer_id=car1.peer_id)
        assert reached["ok"] and reached["addr"] == circuit, reached

        def outcome() -> str | None:
            return car1.ask("status")["hole_punch"].get(car2.peer_id)

        if mode == "preserve":
            wait_for(lambda: outcome() == "direct", 90, "car1's punch to car2")
            got = car2.ask("fetch_blob", peer_id=car1.peer_id, digest=digest.hex(), size=BLOB)
            assert got["ok"] and got["bytes"] == BLOB and got["direct"], got
            # the blob went directly: the relay carried signalling only
            assert relay.ask("status")["relayed_bytes"] < BLOB // 4
        else:
            why = wait_for(lambda: (outcome() or "").startswith("failed") and outcome(), 120,
                           "car1's punch to car2 to fail")
            assert "symmetric NAT" in why, why
            assert car2.ask("status")["hole_punch"].get(car1.peer_id) != "direct"
            with pytest.raises(ControlError, match="blobs never cross a relay"):
                car2.ask("fetch_blob", peer_id=car1.peer_id, digest=digest.hex(), size=BLOB)
        assert relay.stop() == 0 and car1.stop() == 0 and car2.stop() == 0
