"""Reachability of real `p2pfleet node start` processes behind NAT (net/reachability.py):
AutoNAT tells a NATed node it cannot be dialled, it becomes a DHT client, and its capacity
record is still found through the public node."""

from __future__ import annotations

import pytest

import netbed
from p2pfleet.live.localfleet import wait_for


@pytest.mark.parametrize("mode", ["preserve", "random"])
def test_a_node_behind_nat_learns_it_is_private_and_becomes_a_dht_client(new_bed, tmp_path, mode):
    with new_bed() as bed:
        boot_host = bed.public("boot")
        car_host = bed.behind(bed.nat_router("home", mode=mode), "car")
        boot = netbed.start_node(boot_host, tmp_path)
        car = netbed.start_node(car_host, tmp_path, bootstrap=[boot.addr])

        def settled(node):
            status = node.try_ask("status")
            return status if status and status["reachability"] != "unknown" else None

        car_status = wait_for(lambda: settled(car), 60, "the NATed node's AutoNAT verdict")
        assert car_status["reachability"] == "private", car_status
        assert car_status["dht_mode"] == "client", car_status
        assert "could not dial us back" in car_status["reachability_why"], car_status
        boot_status = wait_for(lambda: settled(boot), 60, "the public node's AutoNAT verdict")
        assert boot_status["reachability"] == "public", boot_status
        assert boot_status["dht_mode"] == "server", boot_status
        # the client's capacity record is stored at the server and found there
        wait_for(lambda: boot.ask("lookup", peer_id=car.peer_id)["found"], 60,
                 "the NATed node's capacity record")
        assert boot.stop() == 0 and car.stop() == 0
