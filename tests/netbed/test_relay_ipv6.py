"""A relay's per-address limits count an IPv6 /64 as one address (net/relay_limits.py, and
libp2p_fixes fix 20): Sybil identities, each on its own address of one /64, ask a relay for
reservations. In a bed namespace: the root namespace has only ::1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from p2pfleet.net.relay_limits import RESERVATIONS_PER_IP

SCRIPT = str(Path(__file__).with_name("relay_v6_attack.py"))
RELAY, HONEST = "fd77:0:0:1::1", "fd77:0:0:3::1"
SYBILS = [f"fd77:0:0:2::{i:x}" for i in range(1, 2 * RESERVATIONS_PER_IP + 5)]


def test_addresses_of_one_ipv6_prefix_share_one_reservation_quota(new_bed):
    """Before: py-libp2p gave no remote address for IPv6 connections, so every IPv6 peer
    counted as one address "unknown" (8 Sybils locked out an honest IPv6 peer); with the
    address but raw IPs counted, the 20 Sybils took 20 reservations (a /64 holds enough
    addresses for all 32 slots). Now the /64 holds RESERVATIONS_PER_IP and a peer from
    another prefix still gets one."""
    if not Path("/proc/sys/net/ipv6").exists():
        pytest.skip("this kernel has no IPv6 (no /proc/sys/net/ipv6)")
    with new_bed() as bed:
        host = bed.public("v6")
        for ip in (RELAY, HONEST, *SYBILS):
            host.run(["ip", "-6", "addr", "add", f"{ip}/128", "dev", "lo", "nodad"])
        proc = host.run([sys.executable, SCRIPT, RELAY, HONEST, *SYBILS], timeout=120,
                        check=False)
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-2000:]
    out = json.loads(lines[-1])
    assert out["granted"] == RESERVATIONS_PER_IP, out
    assert out["honest"], out
    assert out["refused"].get("reservations per address") == len(SYBILS) - RESERVATIONS_PER_IP, out
