"""Relay-only mode: a host that hands out no address of its own, only its relayed ones.

py-libp2p 0.8.1 hands out `host.get_addrs()` (listen addresses plus confirmed observed
ones) in identify's `listen_addrs`, and in the signed peer record that rides on identify,
on GossipSub and DHT messages and in DHT provider records. Relay-only mode replaces the
host's `get_addrs` with one returning our relayed addresses only. One gap stays: when `get_addrs()` is empty (before our first
reservation), identify falls back to the raw transport (listen) addresses
(`libp2p/identity/identify/identify.py`, `_mk_identify_protobuf`); `hide_listen_fallback`
wraps that function so a relay-only host sends an empty list instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import multiaddr
from libp2p.identity.identify import identify
from libp2p.identity.identify_push import identify_push

_MARK = "_p2pfleet_relay_only"


def advertise_only(host: Any, relayed: Callable[[], list[str]]) -> None:
    """Make `host` hand out `relayed()` (circuit addresses without our /p2p/ suffix; py-libp2p
    appends it) and nothing else, wherever py-libp2p sends our addresses."""
    own = host.get_id()
    # an instance attribute, not the host's addrs factory: BasicHost.get_addrs strips
    # everything from an address's first /p2p/ on, which turns a circuit address into the
    # relay's own address
    host.get_addrs = lambda: [multiaddr.Multiaddr(f"{a}/p2p/{own}") for a in relayed()]
    setattr(host, _MARK, True)
    hide_listen_fallback()


def hide_listen_fallback() -> None:
    """Identify of a relay-only host with no relayed address yet lists none (py-libp2p lists
    its listen addresses then). Other hosts are untouched. Idempotent."""
    original = identify._mk_identify_protobuf
    if getattr(original, _MARK, False):
        return

    def make(host: Any, observed: Any) -> Any:
        msg = original(host, observed)
        if getattr(host, _MARK, False) and not host.get_addrs():
            del msg.listen_addrs[:]
        return msg

    setattr(make, _MARK, True)
    identify._mk_identify_protobuf = make
    identify_push._mk_identify_protobuf = make  # imported there by name
