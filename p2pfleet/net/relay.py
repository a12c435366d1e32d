"""Circuit Relay v2 over py-libp2p 0.8.1: public nodes relay, private nodes hold a reservation.

Every node runs py-libp2p's relay protocol (the `stop` side: it accepts connections relayed
to it) and can dial `/p2p-circuit` addresses (the circuit transport is added to the swarm).
A node AutoNAT finds public and stable (core/reachability.py) also serves `hop` (it relays
for others) with our limits, not py-libp2p's (1 GiB and 1 h per circuit): relays carry
signalling and small messages only.
A node found private reserves a slot at a connected peer that offers `hop` and publishes
`<relay address>/p2p/<relay id>/p2p-circuit` in its capacity record.

Bytes relayed are counted (`relayed_bytes`) so tests and operators see what crossed.
"""

from __future__ import annotations

import logging
from typing import Any

import multiaddr
import trio
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from ..core.reachability import Reach
from .holepunch import HolePunch
from .relay_limits import LimitedRelay, RelayShares
from .reachability import Reachable, protocols_of

log = logging.getLogger(__name__)

# What one circuit may carry (both directions together, as py-libp2p counts) and for how
# long; a reservation lives an hour and is renewed by py-libp2p before it ends.
LIMITS = RelayLimits(duration=120, data=128 * 1024, max_circuit_conns=16, max_reservations=32,
                     reservation_ttl=3600)
RESERVE_EVERY_S = 5.0   # look for a relay this often while private without a reservation
KEEP_CHECK_S = 30.0     # then check the reservation this often


def is_relayed(conn_or_stream: Any) -> bool:
    """Whether a connection (or a stream's connection) runs over a relay circuit."""
    muxed = getattr(conn_or_stream, "muxed_conn", conn_or_stream)
    for obj in (conn_or_stream, muxed, getattr(muxed, "secured_conn", None)):
        get = getattr(obj, "get_transport_addresses", None)
        if callable(get):
            try:
                if any("/p2p-circuit" in str(a) for a in get() or []):
                    return True
            except Exception:  # noqa: BLE001 - no addresses known: not marked relayed
                continue
    return False


class Relays:
    """The relay service of one mesh, driven by its AutoNAT status."""

    def __init__(self, host: Any, reachable: Reachable, *, offer: bool = True,
                 punch: bool = True, shares: RelayShares | None = None) -> None:
        self.host, self.reachable, self.offer = host, reachable, offer
        self.protocol = LimitedRelay(host, limits=LIMITS, allow_hop=False, shares=shares)
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(
            roles=RelayRole.STOP | RelayRole.CLIENT, limits=LIMITS))
        host.get_network().transport_manager.add_transport(self.transport)
        # upgrade relayed connections we received to direct ones (not in relay-only mode,
        # where CONNECT would hand our addresses to the peer)
        self.punch = HolePunch(host) if punch else None
        self.offering = False
        self.relay: Any = None          # peer id of our relay while we hold a reservation
        self.relay_addr: str | None = None
        self.why = "not needed while reachable"
        self.relayed_bytes = 0          # bytes this node relayed for others
        self._changed = trio.Event()    # set when relay_addr changes
        self._count_relayed_bytes()

    def _count_relayed_bytes(self) -> None:
        relay_data = self.protocol._relay_data

        async def counted(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            await relay_data(_Counting(src, self), dst, *args, **kwargs)

        self.protocol._relay_data = counted

    async def dial(self, addr: str) -> Any:
        """Connect to `<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>` through the relay
        (py-libp2p's swarm refuses relayed addresses in its own dials)."""
        return await self.transport.dial(multiaddr.Multiaddr(addr))

    async def addrs_changed(self) -> None:
        """Return when our relayed address next changes."""
        await self._changed.wait()

    def _set_relay(self, peer: Any, addr: str | None) -> None:
        if addr != self.relay_addr:
            self._changed.set()
            self._changed = trio.Event()
        self.relay, self.relay_addr = peer, addr

    def addrs(self) -> list[str]:
        """Our relayed address while we hold a reservation (for the capacity record)."""
        return [self.relay_addr] if self.relay_addr else []

    def report(self) -> dict:
        return {"relay_offered": self.offering, "relay": str(self.relay) if self.relay else None,
                "relay_addrs": self.addrs(), "relay_why": self.why,
                "relayed_bytes": self.relayed_bytes, "relay_refused": dict(self.protocol.refused),
                "hole_punch": self.punch.report() if self.punch else {}}

    async def run(self) -> None:
        async with background_trio_service(self.protocol), trio.open_nursery() as nursery:
            if self.punch is not None:
                await nursery.start(self._run_punch)
            while True:
                try:
                    await self._step(nursery)
                except Exception as exc:  # noqa: BLE001 - a failed step must not end the mesh
                    log.warning("relay step failed: %s: %s", type(exc).__name__, exc)
                with trio.move_on_after(KEEP_CHECK_S if self.relay else RESERVE_EVERY_S):
                    private = self.reachable.private
                    if self.offering and not private.is_set():  # stop at once when private
                        await private.wait()
                    else:
                        await trio.sleep_forever()

    async def _run_punch(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.punch):
            task_status.started()
            await trio.sleep_forever()

    async def _step(self, nursery: trio.Nursery) -> None:
        status = self.reachable.status
        await self._set_offering(self.offer and self.reachable.may_relay)
        if status == Reach.PRIVATE:
            if self.relay is None or not self._connected(self.relay):
                self._set_relay(None, None)
                await self._reserve(nursery)
        elif self.relay is not None:
            self._set_relay(None, None)
            self.why = "not needed while reachable"

    async def _set_offering(self, on: bool) -> None:
        if on == self.offering:
            return
        self.protocol.allow_hop = on
        if on:
            self.host.set_stream_handler(HOP, self.protocol._handle_hop_stream)
        else:
            self.host.remove_stream_handler(HOP)
        self.offering = on
        log.info("relay service %s", "offered" if on else "withdrawn")
        try:
            with trio.move_on_after(10):
                await push_identify_to_peers(self.host)  # peers learn we (no longer) relay
        except Exception as exc:  # noqa: BLE001 - they learn at the next identify instead
            log.debug("identify push after the relay change failed: %s", exc)

    def _connected(self, peer: Any) -> bool:
        return any(not is_relayed(c) for c in self.host.get_network().get_connections(peer))

    async def _reserve(self, nursery: trio.Nursery) -> None:
        network = self.host.get_network()
        candidates = [p for p, conns in list(network.connections.items())
                      if conns and str(HOP) in protocols_of(self.host, p)
                      and any(not is_relayed(c) for c in conns)]
        if not candidates:
            self.why = "private, and no connected peer offers relay service"
            return
        failures = []
        for peer in candidates:
            addr = self._direct_addr(peer)
            if addr is None:
                continue
            stream = None
            try:
                with trio.fail_after(15):
                    stream = await self.host.new_stream(peer, [HOP])
                    ok = await self.transport.reserve(stream, peer, nursery)
            except Exception as exc:  # noqa: BLE001 - try the next relay
                ok = False
                failures.append(f"{peer}: {type(exc).__name__}: {exc}")
            finally:
                if stream is not None:
                    with trio.move_on_after(2):
                        try:
                            await stream.close()
                        except Exception:  # noqa: BLE001
                            pass
            if ok:
                self._set_relay(peer, f"{addr}/p2p/{peer}/p2p-circuit")
                self.why = f"private: reachable through relay {peer}"
                log.warning("holding a relay reservation at %s (%s)", peer, self.relay_addr)
                return
            failures.append(f"{peer}: reservation refused")
        self.why = "private, and no relay granted a reservation: " + "; ".join(failures)[:300]

    def _direct_addr(self, peer: Any) -> str | None:
        """The relay's address as we reach it (the one our direct connection uses)."""
        for conn in self.host.get_network().get_connections(peer):
            if is_relayed(conn):
                continue
            try:
                remote = conn.muxed_conn.secured_conn.get_remote_address()
            except Exception:  # noqa: BLE001
                remote = None
            if remote:
                family = "ip6" if ":" in remote[0] else "ip4"
                return f"/{family}/{remote[0]}/tcp/{remote[1]}"
        try:
            known = self.host.get_peerstore().addrs(peer)
        except Exception:  # noqa: BLE001 - a peer the peerstore forgot
            known = []
        for addr in known:
            if "/p2p-circuit" not in str(addr):
                return str(multiaddr.Multiaddr(str(addr).split("/p2p/")[0]))
        return None


class _Counting:
    """A relayed stream whose reads add to the relay's byte counter."""

    def __init__(self, stream: Any, relays: Relays) -> None:
        self._stream, self._relays = stream, relays

    async def read(self, n: int | None = None) -> bytes:
        data = await self._stream.read(n)
        self._relays.relayed_bytes += len(data or b"")
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
