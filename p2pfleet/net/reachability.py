"""AutoNAT over py-libp2p 0.8.1, and the DHT mode that follows from it.

A node asks a few connected peers to dial it back (AutoNAT v1, `/libp2p/autonat/1.0.0`,
py-libp2p's service) and feeds their answers to core.reachability, and, every second, the
status to core.reachability's stability rule. With `node.dht_mode = "auto"` a node serves
the DHT only once stable; a node found private stops serving (client mode) at once and
tells its peers (identify push), which drop it from their routing tables.

Gaps in py-libp2p filled here:
- Its AutoNAT server "dials back" with `host.connect`, which returns at once when a
  connection to the peer exists, and the asker is always connected (it sent the request):
  every node behind NAT was told it is reachable. `FreshDialAutoNAT` dials a new connection
  (transport dial plus security handshake, which proves the peer id) and closes it.
- Its KadDHT server adds every peer that opens a DHT stream to its routing table ("it
  MUST be a server"), but clients open DHT streams too. `keep_clients_out` refuses peers
  whose identify protocol list lacks the DHT protocol, and `prune_clients` removes those
  that stopped offering it.
- `KadDHT.switch_mode` to client empties the routing table (a client still needs one to
  look anything up) and back to server registers the raw handler (without our fixes):
  `set_dht_mode` switches without either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.kad_dht.kad_dht import DHTMode

from ..core.reachability import Answer, Reach, Reachability, Stability, StableRule, dht_mode

log = logging.getLogger(__name__)

DIAL_BACK_TIMEOUT_S = 10.0
DIAL_BACK_EVERY_S = 60.0      # per asking peer: one dial-back a minute at most
DIAL_BACKS_AT_ONCE = 4        # in total
CHECK_FIRST_S = 2.0           # poll for peers to ask this often until a verdict
RECHECK_S = 900.0             # then re-check this often (spec: at least every 15 min)
PEERS_ASKED = 4
PRUNE_S = 5.0                 # drop routing-table peers that stopped serving the DHT this often
FOLLOW_S = 1.0                # re-apply the stability rule this often (it is pure and cheap)


class FreshDialAutoNAT(AutoNATService):
    """py-libp2p's AutoNAT service whose dial-back is a new connection, rate-limited."""

    def __init__(self, host: Any, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(host, serve=True)
        self._clock = clock
        self._last_dial: dict[Any, float] = {}
        self._slots = trio.Semaphore(DIAL_BACKS_AT_ONCE)

    async def _try_dial(self, peer_id: Any, addrs: list[bytes]) -> bytes | None:
        now = self._clock()
        if now - self._last_dial.get(peer_id, -DIAL_BACK_EVERY_S) < DIAL_BACK_EVERY_S:
            # asked again too soon: no answer at all (a "failed" would be a false verdict)
            raise RuntimeError(f"{peer_id} asked for a dial-back again within "
                               f"{DIAL_BACK_EVERY_S:.0f} s")
        self._last_dial[peer_id] = now
        if len(self._last_dial) > 4096:
            self._last_dial = {p: t for p, t in self._last_dial.items()
                               if now - t < DIAL_BACK_EVERY_S}
        async with self._slots:
            for raw in addrs[:4]:
                if await dial_back(self.host, peer_id, multiaddr.Multiaddr(raw)):
                    return raw
        return None


async def dial_back(host: Any, peer_id: Any, addr: multiaddr.Multiaddr) -> bool:
    """Whether `peer_id` answers at `addr` on a new connection (never one we hold): a TCP
    dial and the security handshake, which proves the peer id; then closed."""
    swarm = host.get_network()
    transport = swarm.transport_manager.transport_for_dialing(addr)
    if transport is None:
        return False
    raw = None
    try:
        with trio.fail_after(DIAL_BACK_TIMEOUT_S):
            raw = await transport.dial(addr)
            secured = await swarm.upgrader.upgrade_security(raw, True, peer_id)
            await secured.close()
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable there"
        log.debug("dial-back to %s at %s failed: %s", peer_id, addr, exc)
        if raw is not None:
            with trio.move_on_after(1):
                try:
                    await raw.close()
                except Exception:  # noqa: BLE001
                    pass
        return False


def answer_of(status: int) -> Answer:
    """A DIAL_RESPONSE status as core.reachability's answer. We ask only over direct
    connections, so a refusal means none of our addresses has the IP the peer sees."""
    if status == Message.OK:
        return Answer.DIALED
    if status == Message.E_DIAL_ERROR:
        return Answer.FAILED
    if status == Message.E_DIAL_REFUSED:
        return Answer.REFUSED
    return Answer.NO_ANSWER


def keep_clients_out(dht: Any, kad_protocol: str) -> None:
    """Never add a peer to `dht`'s routing table whose identify protocols (once known)
    lack the DHT protocol, even when it opened a DHT stream (py-libp2p skips the check)."""
    original = dht.routing_table.add_peer

    async def add_peer(peer: Any, *, skip_server_mode_check: bool = False) -> bool:
        peer_id = getattr(peer, "peer_id", peer)
        if not offers(dht.host, peer_id, kad_protocol):
            return False
        return await original(peer, skip_server_mode_check=skip_server_mode_check)

    dht.routing_table.add_peer = add_peer


def protocols_of(host: Any, peer_id: Any) -> list[str]:
    """The peer's protocols as identify told us ([] while unknown)."""
    try:
        return [str(p) for p in host.get_peerstore().get_protocols(peer_id) or []]
    except Exception:  # noqa: BLE001 - a peer the peerstore does not know (yet, or any more)
        return []


def offers(host: Any, peer_id: Any, protocol: str) -> bool:
    """False only when identify told us the peer's protocols and `protocol` is not one."""
    protocols = protocols_of(host, peer_id)
    return not protocols or protocol in protocols


def prune_clients(dht: Any, kad_protocol: str) -> int:
    """Remove routing-table peers that no longer offer the DHT protocol; how many."""
    gone = [p for p in dht.routing_table.get_peer_ids()
            if not offers(dht.host, p, kad_protocol)]
    for peer in gone:
        dht.routing_table.remove_peer(peer)
    return len(gone)


class Reachable:
    """The AutoNAT client loop of one mesh: status, DHT mode, and why."""

    def __init__(self, host: Any, dht: Any, kad_protocol: str, setting: str,
                 *, clock: Callable[[], float] = time.time, relay_only: bool = False,
                 stable: StableRule | None = None) -> None:
        self.host, self.dht, self.kad_protocol = host, dht, kad_protocol
        self.setting = setting
        self.relay_only = relay_only  # never ask for a dial-back: it hands out our addresses
        self.clock = clock
        self.verdicts = Reachability()
        self.stability = Stability(started=clock(), rule=stable or StableRule())
        self.service = FreshDialAutoNAT(host)
        self._asked: dict[Any, float] = {}  # peer -> when we last asked it (trio time)
        self._kad_handler: Any = None
        self.private = trio.Event()   # set while AutoNAT finds us private
        self.public = trio.Event()    # set while it does not
        self.public.set()
        self.dht_mode = "server" if dht.mode == DHTMode.SERVER else "client"
        keep_clients_out(dht, kad_protocol)
        # start in the mode the rule gives: a node serving for its first second would enter
        # the routing tables of the first peers it meets
        want = dht_mode(setting, self.stability.observe(clock(), self.status))
        if want != self.dht_mode:
            switch_locally(self, want)

    @property
    def status(self) -> Reach:
        return self.verdicts.status

    @property
    def may_relay(self) -> bool:
        """Whether to serve as a relay: public, and stable (or a fixed DHT server: its
        operator vouches for it)."""
        return self.status == Reach.PUBLIC and (self.stability.stable or self.setting == "server")

    def report(self) -> dict:
        return {"reachability": self.status.value, "reachability_why": self.verdicts.why,
                "dht_mode": self.dht_mode, "stable": self.stability.stable,
                "stable_why": self.stability.why}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._prune)
            nursery.start_soon(self._follow)
            while True:
                try:
                    await self.check()
                except Exception as exc:  # noqa: BLE001 - a failed check must not end the mesh
                    log.warning("AutoNAT check failed: %s: %s", type(exc).__name__, exc)
                answered = self.status != Reach.UNKNOWN
                await trio.sleep(RECHECK_S if answered else CHECK_FIRST_S)

    async def _follow(self) -> None:
        # the stable time passes between AutoNAT checks (15 min apart once answered)
        while True:
            try:
                await self.apply_mode()
            except Exception as exc:  # noqa: BLE001 - a failed switch is retried next time
                log.warning("applying the DHT mode failed: %s: %s", type(exc).__name__, exc)
            await trio.sleep(FOLLOW_S)

    async def _prune(self) -> None:
        # a client whose first DHT stream came before identify told us its protocols
        while True:
            try:
                prune_clients(self.dht, self.kad_protocol)
            except Exception as exc:  # noqa: BLE001 - the table changed under us: next time
                log.debug("pruning DHT clients failed: %s", exc)
            await trio.sleep(PRUNE_S)

    async def check(self) -> Reach:
        """Ask up to PEERS_ASKED connected peers that speak AutoNAT, and that we did not ask
        in the last DIAL_BACK_EVERY_S, to dial us back."""
        if self.relay_only:
            self.verdicts.status = Reach.PRIVATE
            self.verdicts.why = "relay-only mode: reached through a relay only, never asked"
            await self.apply_mode()
            return self.status
        network = self.host.get_network()
        peers = [p for p, conns in list(network.connections.items()) if conns
                 and not _relayed(conns)
                 and str(AUTONAT_PROTOCOL_ID) in protocols_of(self.host, p)]
        addrs = [a.to_bytes() for a in self.host.get_addrs()]
        # Never a peer asked within its dial-back rate limit: it would refuse, and a refusal
        # (no answer) drops its earlier answer, so a node whose first round found too few
        # witnesses asked the same four every 2 s and stayed unknown for good (issue 15).
        now = trio.current_time()
        self._asked = {p: t for p, t in self._asked.items() if now - t < DIAL_BACK_EVERY_S}
        fresh = [p for p in peers if p not in self._asked]
        for peer in fresh[:PEERS_ASKED]:
            self._asked[peer] = now
            try:
                status, _addr = await self.service.query_server(peer, addrs,
                                                                timeout=2 * DIAL_BACK_TIMEOUT_S)
                answer = answer_of(status)
                text = {Answer.REFUSED: "none of our addresses is the IP it sees us from",
                        Answer.FAILED: "no answer at our addresses"}.get(answer, "")
            except Exception as exc:  # noqa: BLE001 - a peer that cannot answer says nothing
                log.debug("AutoNAT request to %s failed: %s", peer, exc)
                answer, text = Answer.NO_ANSWER, ""
            self.verdicts.record(self.clock(), str(peer), answer, text)
        self.verdicts.update(self.clock(), available=len(peers))
        await self.apply_mode()
        return self.status

    async def apply_mode(self) -> None:
        if self.status == Reach.PRIVATE and not self.private.is_set():
            self.private.set()
            self.public = trio.Event()
        elif self.status != Reach.PRIVATE and not self.public.is_set():
            self.public.set()
            self.private = trio.Event()
        stable = self.stability.observe(self.clock(), self.status)
        want = dht_mode(self.setting, stable)
        if want != self.dht_mode:
            await set_dht_mode(self, want)


def switch_locally(reach: Reachable, mode: str) -> None:
    """Serve the DHT or stop serving it, keeping the routing table and our handler."""
    host, dht, protocol = reach.host, reach.dht, TProtocol(reach.kad_protocol)
    handlers = host.get_mux().handlers
    if mode == "client":
        reach._kad_handler = handlers.get(protocol)
        host.remove_stream_handler(protocol)
        dht.mode = DHTMode.CLIENT
    else:
        if reach._kad_handler is not None:
            host.get_mux().add_handler(protocol, reach._kad_handler)  # wrapped by our fixes
        dht.mode = DHTMode.SERVER
    reach.dht_mode = mode


async def set_dht_mode(reach: Reachable, mode: str) -> None:
    """Switch the DHT mode and tell connected peers."""
    host = reach.host
    switch_locally(reach, mode)
    log.warning("DHT mode is now %s (reachability: %s, %s; %s)", mode, reach.status.value,
                reach.verdicts.why, reach.stability.why)
    try:
        with trio.move_on_after(10):
            await push_identify_to_peers(host)  # peers learn we (no longer) serve the DHT
    except Exception as exc:  # noqa: BLE001 - they learn at the next identify instead
        log.debug("identify push after the DHT mode change failed: %s", exc)


def _relayed(conns: Any) -> bool:
    return any("/p2p-circuit" in str(a) for c in conns
               for a in (getattr(c.muxed_conn, "get_transport_addresses", lambda: [])() or []))


async def warn_while_private(reach: Reachable, role: str) -> None:
    """Log an error each time AutoNAT finds this node private, for a role that must be
    reachable (a publisher: workers dial it, and its blobs never cross a relay)."""
    while True:
        await reach.private.wait()
        log.error("this %s is not reachable from the network (%s): workers cannot dial it "
                  "and blobs never cross a relay; give it a public address or forward its "
                  "listen port", role, reach.verdicts.why)
        await reach.public.wait()
