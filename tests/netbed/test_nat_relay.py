"""A node behind NAT is reached through a relay: real `p2pfleet node start` processes
(net/relay.py). The public node relays; the NATed one holds a reservation there and lists
the relayed address in its capacity record; a second public node finds that record and
opens a stream to it through the relay, and no blob crossed the relay."""

from __future__ import annotations

import pytest

import netbed
from p2pfleet.live.localfleet import wait_for


@pytest.mark.parametrize("mode", ["preserve", "random"])
def test_a_node_behind_nat_is_reached_through_its_relay(new_bed, tmp_path, mode):
    with new_bed() as bed:
        relay_host, other_host = bed.public("relay"), bed.public("other")
        car_host = bed.behind(bed.nat_router("home", mode=mode), "car")
        relay = netbed.start_node(relay_host, tmp_path)
        other = netbed.start_node(other_host, tmp_path, bootstrap=[relay.addr])
        car = netbed.start_node(car_host, tmp_path, bootstrap=[relay.addr],
                                settings={"node.info_opt_in": "true"})

        def relayed() -> dict | None:
            status = car.try_ask("status")
            return status if status and status.get("relay_addrs") else None

        car_status = wait_for(relayed, 90, "the NATed node's relay reservation")
        assert car_status["reachability"] == "private" and car_status["dht_mode"] == "client"
        assert car_status["relay"] == relay.peer_id, car_status
        circuit = car_status["relay_addrs"][0]
        assert circuit.startswith(f"/ip4/{relay_host.ip}/tcp/") and circuit.endswith(
            f"/p2p/{relay.peer_id}/p2p-circuit"), circuit
        relay_status = relay.ask("status")
        assert relay_status["relay_offered"] and relay_status["reachability"] == "public"

        def record_lists_circuit() -> bool:
            found = other.ask("lookup", peer_id=car.peer_id)
            return found["found"] and found["record"]["addrs"] == [circuit]

        wait_for(record_lists_circuit, 90, "the NATed node's record with its relayed address")
        reached = other.ask("reach", peer_id=car.peer_id)
        assert reached["ok"] and reached["addr"] == circuit, reached
        assert reached["relayed"], reached  # its only connection to the car is the circuit
        assert reached["info"] == "ok", reached  # a stream opened and answered
        # signalling crossed the relay, far less than any blob
        assert 0 < relay.ask("status")["relayed_bytes"] < 300 * 1024
        assert relay.stop() == 0 and other.stop() == 0 and car.stop() == 0
