"""A network partition: `with partition(bed, side_a, side_b) as cut:` drops every packet
between the two groups of hosts until the block ends (the heal).

The rule sits on the bed's switch (an nftables bridge-family table in the switch's
namespace), so hosts, their stacks and their processes are untouched: for them the other
side just stops answering, as when a real network splits. A host behind NAT is matched by
its router's public address, which is what its packets carry on the switch. The cut records
when it started and healed (monotonic clock), so a test states how long it really held.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .bed import Bed, BedError, Host, _run


@dataclass
class Cut:
    """A partition's record: when it started and, once over, when it healed."""

    side_a: list[str]
    side_b: list[str]
    started: float
    healed: float | None = None

    def elapsed(self) -> float:
        """Seconds the partition has held (to the heal, once healed)."""
        return (self.healed if self.healed is not None else time.monotonic()) - self.started


def _switch_ip(host: Host) -> str:
    return host.router.ip if host.kind == "nat" and host.router else host.ip


@contextmanager
def partition(bed: Bed, side_a: Iterable[Host], side_b: Iterable[Host]) -> Iterator[Cut]:
    """Drop all traffic between `side_a` and `side_b` on the switch for the block's length."""
    a = sorted({_switch_ip(h) for h in side_a})
    b = sorted({_switch_ip(h) for h in side_b})
    if not a or not b:
        raise BedError("a partition needs hosts on both sides")
    if set(a) & set(b):
        raise BedError(f"hosts on both sides of the partition: {sorted(set(a) & set(b))}")
    table = "netbed_partition"
    script = f"""
table bridge {table} {{
  set a {{ type ipv4_addr; elements = {{ {", ".join(a)} }} }}
  set b {{ type ipv4_addr; elements = {{ {", ".join(b)} }} }}
  chain forward {{
    type filter hook forward priority -10; policy accept;
    ip saddr @a ip daddr @b drop
    ip saddr @b ip daddr @a drop
  }}
}}
"""
    _run(["ip", "netns", "exec", bed.pub, "nft", "-f", "-"], input=script)
    cut = Cut(a, b, time.monotonic())
    try:
        yield cut
    finally:
        _run(["ip", "netns", "exec", bed.pub, "nft", "delete", "table", "bridge", table])
        cut.healed = time.monotonic()
