"""Latency on a host's whole link, for every protocol: `delay_link(host, delay_ms)`.

`Bed.delay_relay` delays one TCP destination, which libp2p's connections (dialled to the
addresses nodes advertise, in any direction) never go through. This kernel has no netem (nor
fq, etf or an nftables queue), so the delay sits in user space at layer 2, inside the host:

    host stack -- dly0 ==veth== dly1 -- [delay_bridge.py] -- eth0 ==veth== switch / router

The host's addresses and routes move from eth0 to dly0; the bridge holds each frame
`delay_ms` in each direction. A path between two delayed hosts crosses two links: its
one-way delay is the sum of both links' delays. `Bed.shape` (tbf on eth0 and the far port,
the nftables loss rule) still applies on top. Call it before starting processes in the host.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .bed import BedError, Host

INNER, OUTER = "dly0", "dly1"


def delay_link(host: Host, delay_ms: float) -> subprocess.Popen:
    """Hold every frame crossing `host`'s link `delay_ms` each way; returns the bridge
    process (the bed stops it on exit)."""
    if host.kind == "router":
        raise BedError(f"{host.name} is a NAT router: delay the links of its hosts instead")
    if not delay_ms >= 0:
        raise BedError(f"delay_ms {delay_ms!r}: must be >= 0")
    if any(OUTER in " ".join(p.args) for p in host.procs if isinstance(p.args, list)):
        raise BedError(f"{host.name}'s link is already delayed")
    addrs = json.loads(host.run(["ip", "-j", "-4", "addr", "show", "dev", "eth0"]).stdout)
    cidrs = [f"{a['local']}/{a['prefixlen']}" for i in addrs for a in i.get("addr_info", [])]
    routes = json.loads(host.run(["ip", "-j", "-4", "route", "show", "dev", "eth0"]).stdout)
    gateways = [(r["dst"], r["gateway"]) for r in routes if r.get("gateway")]
    mtu = str(addrs[0]["mtu"]) if addrs else "1500"
    host.run(["ip", "link", "add", INNER, "mtu", mtu, "type", "veth", "peer", "name", OUTER,
              "mtu", mtu])
    host.run(["ip", "addr", "flush", "dev", "eth0"])
    host.run(["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=1"], check=False)
    host.run(["ip", "link", "set", "eth0", "promisc", "on"])
    for dev in (OUTER, INNER):
        host.run(["ip", "link", "set", dev, "up"])
    for cidr in cidrs:
        host.run(["ip", "addr", "add", cidr, "dev", INNER])
    for dst, gw in gateways:
        host.run(["ip", "route", "add", dst, "via", gw, "dev", INNER])
    script = Path(__file__).with_name("delay_bridge.py")
    proc = host.python([str(script), "--between", OUTER, "eth0", "--delay-ms", str(delay_ms)],
                       stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "bridging":
        proc.wait(10)
        raise BedError(f"delay bridge in {host.name} did not start (exit {proc.returncode})")
    return proc
