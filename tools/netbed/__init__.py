"""Network test bed: hosts in Linux network namespaces behind NAT routers and shaped links.

    with Bed() as bed:
        a = bed.public("a")
        router = bed.nat_router("r", mode="random")
        n = bed.behind(router, "n")
        bed.shape(n, rate_mbit=20, loss_pct=1)
        proc = n.python(["-c", "print('hello')"])

See bed.py for the layout, nodes.py to run `p2pfleet node start` in a host, probe.py for
traffic probes and delay_relay.py for latency. Needs root, iproute2 and nftables.
"""

from .bed import Bed, BedError, Host, NatMode, missing
from .nodes import start_node

__all__ = ["Bed", "BedError", "Host", "NatMode", "missing", "start_node"]
