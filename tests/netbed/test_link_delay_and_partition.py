"""The bed's whole-link delay (linkdelay.py) and partition (partition.py) on probes."""

from __future__ import annotations

import pytest
from bedkit import probe, read_json, serve

import netbed
from netbed.linkdelay import delay_link
from netbed.partition import partition


def test_link_delay_holds_every_frame_both_ways(new_bed):
    with new_bed() as bed:
        a, b = bed.public("a"), bed.public("b")
        n = bed.behind(bed.nat_router("r"), "n")
        echo, addr = serve(b, "tcp-echo", "--listen", f"{b.ip}:0")
        before = probe(a, "tcp-rtt", "--to", f"{addr[0]}:{addr[1]}", "--rounds", "3")
        assert before["min_rtt_ms"] < 40, before
        delay_link(a, 40)
        delay_link(n, 25)
        # a round trip crosses the delayed link twice; the echo host's link is not delayed
        out = probe(a, "tcp-rtt", "--to", f"{addr[0]}:{addr[1]}", "--rounds", "3")
        assert out["rounds"] == 3 and out["min_rtt_ms"] >= 80, out
        out = probe(n, "tcp-rtt", "--to", f"{addr[0]}:{addr[1]}", "--rounds", "3")
        assert out["min_rtt_ms"] >= 50, out  # through the NAT router too
        # inbound connections reach the delayed host at its address as before
        sink, saddr = serve(a, "tcp-sink", "--listen", f"{a.ip}:0")
        assert probe(b, "tcp-send", "--to", f"{saddr[0]}:{saddr[1]}", "--bytes", "200000")["ok"]
        assert read_json(sink)["bytes"] == 200000
        with pytest.raises(netbed.BedError, match="is a NAT router"):
            delay_link(n.router, 10)
        with pytest.raises(netbed.BedError, match="already delayed"):
            delay_link(a, 10)


def test_partition_drops_between_sides_and_heals(new_bed):
    with new_bed() as bed:
        a, b, c = bed.public("a"), bed.public("b"), bed.public("c")
        n = bed.behind(bed.nat_router("r"), "n")
        sink, addr = serve(c, "tcp-sink", "--listen", f"{c.ip}:0")
        to_c = ("tcp-send", "--to", f"{addr[0]}:{addr[1]}", "--bytes", "10", "--timeout", "3")
        with partition(bed, [a, n], [c]) as cut:
            assert probe(a, *to_c)["ok"] is False
            assert probe(n, *to_c)["ok"] is False  # matched by its router's address
            assert probe(b, *to_c)["ok"]  # a host on neither side is not cut off
            read_json(sink)
        assert cut.healed is not None and cut.elapsed() > 0
        assert probe(a, *to_c)["ok"]
        with pytest.raises(netbed.BedError, match="both sides"):
            with partition(bed, [a], [a]):
                pass


def test_public_hosts_are_distinct_networks_to_the_publishers_prefix_rule(new_bed):
    """Publishers give one replica of a shard per /24 (core.scheduler.prefix_of): bed hosts
    sharing one /24 made every quorum-2 shard wait for the publisher's stall path."""
    from p2pfleet.core.scheduler import prefix_of

    with new_bed() as bed:
        hosts = [bed.public(f"h{i}") for i in range(3)] + [bed.nat_router("r")]
        assert len({prefix_of(h.ip) for h in hosts}) == len(hosts)
        echo, addr = serve(hosts[1], "tcp-echo", "--listen", f"{hosts[1].ip}:0")
        assert probe(hosts[0], "tcp-rtt", "--to", f"{addr[0]}:{addr[1]}")["rounds"] >= 1
