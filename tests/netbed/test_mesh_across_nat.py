"""Real `p2pfleet node start` processes in the bed: a NATed node joins a public one."""

from __future__ import annotations

import pytest

import netbed
from p2pfleet.live.localfleet import wait_for


@pytest.mark.parametrize("mode", ["preserve", "random"])
def test_nated_node_joins_public_bootstrap_node(new_bed, tmp_path, mode):
    with new_bed() as bed:
        boot_host = bed.public("boot")
        car_host = bed.behind(bed.nat_router("home", mode=mode), "car")
        boot = netbed.start_node(boot_host, tmp_path)
        car = netbed.start_node(car_host, tmp_path, bootstrap=[boot.addr])
        assert boot.addr.startswith(f"/ip4/{boot_host.ip}/tcp/")
        # the car dials out through its NAT and is in the public node's peer list
        wait_for(lambda: car.peer_id in boot.ask("peers")["peers"], 60,
                 "the NATed node in the bootstrap node's peers")
        wait_for(lambda: boot.peer_id in car.ask("peers")["peers"], 30,
                 "the bootstrap node in the NATed node's peers")
        wait_for(lambda: car.ask("status")["in_mesh"], 30, "the NATed node to be in the mesh")
        # the public node sees the connection coming from the router's address
        conns = boot_host.run(["ss", "-Htn", "state", "established"]).stdout
        assert any(line.split()[-1].startswith(f"{car_host.router.ip}:")
                   for line in conns.splitlines()), conns
        assert boot.stop() == 0 and car.stop() == 0
