"""Relay-only mode (node.relay_only, net/relay_only.py): a node behind NAT that never hands
out an address of its own. Real `p2pfleet node start` processes: its capacity record lists
only its relayed address, a peer that reaches it (through the relay) learns no other
address of it from identify or signed peer records, it asks nobody to dial it back, and it
does not punch holes (it stays relayed although its NAT keeps ports)."""

from __future__ import annotations

import netbed
from p2pfleet.live.localfleet import wait_for


def test_a_relay_only_node_hands_out_its_relayed_address_only(new_bed, tmp_path):
    with new_bed() as bed:
        relay_host, other_host = bed.public("relay"), bed.public("other")
        car_host = bed.behind(bed.nat_router("home", mode="preserve"), "car")
        relay = netbed.start_node(relay_host, tmp_path)
        other = netbed.start_node(other_host, tmp_path, bootstrap=[relay.addr])
        car = netbed.start_node(car_host, tmp_path, bootstrap=[relay.addr],
                                settings={"node.info_opt_in": "true", "node.relay_only": "true"})

        def relayed() -> dict | None:
            status = car.try_ask("status")
            return status if status and status.get("relay_addrs") else None

        status = wait_for(relayed, 90, "the relay-only node's reservation")
        assert status["reachability"] == "private" and "relay-only" in status["reachability_why"]
        assert status["dht_mode"] == "client"
        circuit = status["relay_addrs"][0]
        # what it advertises (its status shows it too): relayed addresses only
        assert status["listen_addrs"] and all("/p2p-circuit" in a for a in status["listen_addrs"])

        def record_lists_circuit() -> bool:
            found = other.ask("lookup", peer_id=car.peer_id)
            return found["found"] and found["record"]["addrs"] == [circuit]

        wait_for(record_lists_circuit, 90, "the relay-only node's record")
        reached = other.ask("reach", peer_id=car.peer_id)
        assert reached["ok"] and reached["addr"] == circuit and reached["info"] == "ok", reached
        # identify and signed peer records told `other` no address of the car's own
        leaked = [a for a in reached["known_addrs"] if car_host.ip in a or "/p2p-circuit" not in a
                  and car_host.router.ip not in a]
        assert not leaked, reached["known_addrs"]
        # no hole punching: nothing was started, nothing recorded
        assert car.ask("status")["hole_punch"] == {}
        assert relay.stop() == 0 and other.stop() == 0 and car.stop() == 0
