"""The mesh: one py-libp2p host with our DHT, gossip, fixes, reputation and connection gate.

`Mesh.run()` is a trio service: it starts the host without listening, starts GossipSub and
the DHT (so no peer can reach a protocol whose service is not running yet: fix for the
crash in notes/libp2p.md), only then listens, and then keeps dialling bootstrap peers with
exponential back-off (a node runs alone until peers appear). Cancelling `run()` closes every
connection: a node that leaves the mesh holds none.

What arrives from the network is checked by p2pfleet.wire before use; each offence goes to
`core.reputation`, whose bans are persisted in the node state, fed into GossipSub's
application score and enforced by a connection gate, so a punished peer does not come back
clean by reconnecting. DHT records are ordered against per-key high-water marks kept in the
node state (net/dht_records.py): an older record is neither stored nor served, and two
different records with one sequence number ban their signer.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pubsub import Pubsub
from libp2p.custom_types import TProtocol
from libp2p.records.validator import NamespacedValidator
from libp2p.tools.anyio_service import background_trio_service

from ..core.held_records import HeldLimits
from ..core.peer_budget import BudgetLimits, PeerBudget
from ..core.reachability import NO_STABILITY, StableRule
from ..core.reputation import Reputation
from ..identity import Identity
from ..names import Names
from ..store.state import MemoryMarks, NodeState
from ..wire.envelope import Opened
from . import (conn_trim, dht_find_node, dht_lookup, dht_providers, dht_refresh, dht_streams,
               libp2p_fixes, state_limits, traffic)
from .dht_slots import DHT_FLOOD, DhtSlotLimits, share_dht_slots
from .reachability import Reachable
from .relay import Relays, is_relayed
from .relay_limits import RelayShares
from .relay_only import advertise_only
from .dht_records import (
    FleetRecordValidator,
    RecordEquivocation,
    RecordRejected,
    RecordStale,
    guard_served_values,
)
from .gossip import (
    GOSSIP_PROTOCOLS,
    MAX_GOSSIP_RPC,
    OVER_RATE,
    JobTopicValidator,
    Verdict,
    make_gossipsub,
    over_rate_filter,
)

log = logging.getLogger(__name__)

MARK_PRUNE_S = 600.0  # forget record marks that protect nothing any more this often
TRIM_INTERVAL_S = 5.0  # trim connections above the high watermark at least this often (fix 21)
MAX_USEFUL = 4096  # peers marked useful (fix 16) remembered at most
FIRST_REFRESH_S = 15.0  # refresh again this soon while the table is smaller than k (doubling)


class MeshError(Exception):
    """A mesh operation failed in a way the caller should report (names what and why)."""


@dataclass(frozen=True)
class MeshSettings:
    network: str
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: tuple[str, ...] = ()
    dht_mode: str = "auto"  # server | client | auto (auto: server once stable)
    # when a public node is stable (core/reachability.py); off here (serve unless private),
    # the live node's config sets the 10 min / 30 min default
    stable: StableRule = field(default_factory=lambda: NO_STABILITY)
    heartbeat_s: float = 1.0
    gossip_degree: int = 6
    dht_idle_timeout_s: float = 10.0
    bootstrap_backoff_s: tuple[float, float] = (1.0, 60.0)
    mdns: bool = False  # announce and find peers on the LAN (opt-in)
    relay_only: bool = False  # hand out relayed addresses only (net/relay_only.py)
    max_connections: int = 128
    min_connections: int = 8
    trim_grace_s: float = 20.0  # a new connection is not trimmed before this (fix 21)
    # Cars behind carrier-grade NAT share public IPs: these trade honest cars refused at a
    # popular node against slots one attacker address can hold.
    max_pending_handshakes_per_ip: int = 4
    max_connections_per_ip: int = 16
    seed: int | None = None  # back-off jitter; None: from the OS
    # DHT value and provider records one peer, and one source address, may have us hold,
    # and the value records held in all (fix 13, core/held_records.py)
    held_records: HeldLimits = field(default_factory=HeldLimits)
    max_records: int = 50_000
    dht_slots: DhtSlotLimits = field(default_factory=DhtSlotLimits)  # fair DHT service (fix 15)
    # inbound slots kept for our routing table's and dialled peers' addresses (fix 16)
    inbound_reserve: libp2p_fixes.InboundReserve = field(default_factory=libp2p_fixes.InboundReserve)
    dht_k: int = dht_lookup.K  # bucket size and replication (small in tests, so lookups route)
    # a record get ends once this many peers returned a current copy (the libp2p spec's Q;
    # the newest of them wins and older holders are corrected); 0 (the default): ask all k
    # closest. Off because copies cached away from the key's closest peers may be older: at
    # Q = 3 a node kept reading "available" for a car whose "leaving" record the closest held
    # (tests/integration/test_record_replay.py)
    dht_get_quorum: int = dht_lookup.GET_QUORUM
    # routing-table refresh period (net/dht_refresh.py); 0: never fill or refresh the table
    # (it then holds only peers met otherwise: a test that needs a fixed topology)
    dht_refresh_s: float = 600.0
    # fix 18 (net/dht_refresh.py): walk only stale buckets, end bucket walks when nothing
    # closer turns up, back off refreshes while walks go unanswered; False: as before
    dht_lean_refresh: bool = True
    # fix 19 (net/dht_streams.py): send DHT requests on open streams to the peer, reused
    # within a quarter of dht_idle_timeout_s; False: a new stream per request, as upstream
    dht_reuse_streams: bool = True
    # unasked inbound bytes one peer may send (core/peer_budget.py)
    peer_budget: BudgetLimits = field(default_factory=BudgetLimits)
    # what one address, one peer and everyone may hold at our relay (net/relay_limits.py)
    relay_shares: RelayShares = field(default_factory=RelayShares)


@dataclass
class MeshStats:
    rejected_messages: int = 0
    ignored_messages: int = 0
    protocol_errors: int = 0
    violations: Counter[str] = field(default_factory=Counter)  # stream violations by offence
    gated_connections: int = 0
    bans: list[str] = field(default_factory=list)
    connections_opened: int = 0  # both directions, since the mesh started (churn: with closed)
    connections_closed: int = 0
    trims: int = 0  # fix 21's trims; the last one: connections before, peers it closed
    last_trim: tuple[int, tuple[str, ...]] = (0, ())


def _direct_source(conn: Any) -> str | None:
    """The IP a direct connection comes from (None for a relayed one: its address is the
    relay's, shared by every peer it carries, whose circuits have limits of their own)."""
    if is_relayed(conn):
        return None
    try:
        remote = conn.muxed_conn.get_remote_address()
    except Exception:  # noqa: BLE001 - a connection without a socket address
        return None
    return str(remote[0]) if remote else None


class _ConnectionGate(INotifee):
    """Closes connections of banned peers as soon as they are established."""

    def __init__(self, mesh: "Mesh"):
        self.mesh = mesh

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def connected(self, network: Any, conn: Any) -> None:
        peer = conn.muxed_conn.peer_id
        self.mesh.stats.connections_opened += 1
        if self.mesh.is_banned(peer):
            self.mesh.stats.gated_connections += 1
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - it may already be closing
                pass
            return
        traffic.attribute(conn, self.mesh.budget, str(peer))
        source, limiter = _direct_source(conn), getattr(self.mesh, "inbound_limiter", None)
        if source is not None and limiter is not None:  # its unasked bytes count there too
            self.mesh.budget.bind(str(peer), limiter.source(source))
        self.mesh.first_peer.set()

    async def disconnected(self, network: Any, conn: Any) -> None:
        # A peer that leaves before it was of any use (not in our routing table, not dialled
        # by us, holding no lease of ours) spends none of the transfer cap: fresh identities
        # cycling through connect-and-leave would otherwise cost ~3 kB of it each.
        self.mesh.stats.connections_closed += 1
        reservation = getattr(self.mesh, "inbound_reservation", None)
        peer = conn.muxed_conn.peer_id
        if reservation is not None and not reservation.known(peer):
            self.mesh.budget.forfeit(str(peer))

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


class Mesh:
    def __init__(self, identity: Identity, settings: MeshSettings, state: NodeState | None = None,
                 *, clock: Callable[[], float] = time.time, reputation: Reputation | None = None,
                 budget: PeerBudget | None = None):
        libp2p_fixes.check_version()
        self.identity = identity
        self.settings = settings
        self.names = Names(settings.network)
        self.state = state
        self.clock = clock
        self.reputation = reputation or Reputation()
        self.budget = budget or PeerBudget(time.monotonic, settings.peer_budget)  # outlives a mesh: the node's
        self.stats = MeshStats()
        self._rng = random.Random(settings.seed)
        self._accepted: OrderedDict[bytes, Opened] = OrderedDict()
        self._job_send, self.jobs = trio.open_memory_channel[Opened](64)
        self.first_peer = trio.Event()
        # peers the application found useful (a publisher's leaseholders): kept by fix 16
        # like peers in our routing table, which cars behind NAT (DHT clients) never enter
        self._useful: OrderedDict[Any, None] = OrderedDict()
        self.last_put_peers = 0
        self.last_put = dht_lookup.WalkStats()  # the last put's PUT_VALUE requests
        self.puts = 0  # record puts so far, republishing included
        self.last_lookup = dht_lookup.WalkStats()  # set when the first (unbanned) peer connects
        # set once the routing table was filled (self-lookup and bucket refresh) after the
        # first peer: a record put before that reaches only the peers we happen to know
        self.table_ready = trio.Event()
        self.last_refresh = dht_refresh.RefreshStats()
        self.refreshes = 0  # fills and refreshes run so far
        self._refresh_wanted = trio.Event()
        self._poor_puts = 0  # puts in a row that reached fewer than half their peers
        self._walked = dht_refresh.WalkedBuckets()  # stale-bucket rule (fix 18)
        self._published: dict[bytes, tuple[bytes, set[Any]]] = {}  # key -> (ours, held at)
        self.host: Any = None
        self.reachable: Reachable | None = None  # AutoNAT status and DHT mode, once running
        self.relays: Relays | None = None  # relay service and our reservation, once running
        self._handlers: dict[str, Callable[[Any], Awaitable[None]]] = {}
        self.dht: KadDHT | None = None
        self.pubsub: Pubsub | None = None
        self.marks = state if state is not None else MemoryMarks()
        self.record_validator = FleetRecordValidator(self.names, clock, marks=self.marks,
                                                     on_equivocation=self._on_equivocation)
        self.job_validator = JobTopicValidator(settings.network, clock=clock)
        if state is not None:
            for peer, until, _reason in state.active_bans(clock()):
                self.reputation.restore_ban(peer, until)

    def set_handler(self, name: str, handler: Callable[[Any], Awaitable[None]]) -> None:
        """Answer the stream protocol `name` (a key of names.PROTOCOLS) with `handler`.

        Registered before `run` or while running; the handler gets the libp2p stream and runs
        under the fix-2 guard (an exception resets the stream, nothing more)."""
        protocol = self.names.protocol(name)
        self._handlers[protocol] = handler
        if self.host is not None:
            self.host.set_stream_handler(TProtocol(protocol), handler)

    async def open_stream(self, peer_id: str, name: str, timeout: float = 10.0) -> Any:
        """Open a stream of protocol `name` to a connected or known peer."""
        if self.host is None:
            raise MeshError("the mesh is not running")
        try:
            with trio.fail_after(timeout):
                return await self.host.new_stream(ID.from_base58(peer_id),
                                                  [TProtocol(self.names.protocol(name))])
        except trio.TooSlowError:
            raise MeshError(f"{peer_id}: no {name} stream within {timeout:.0f} s") from None
        except Exception as exc:  # noqa: BLE001 - dial/negotiation errors come in many types
            raise MeshError(f"{peer_id}: cannot open {name} stream: {type(exc).__name__}: {exc}") from None

    # --- reputation ----------------------------------------------------------------------
    def is_banned(self, peer: Any) -> bool:
        return self.reputation.is_banned(str(peer), self.clock())

    def penalize(self, peer: Any, offence: str, detail: str = "") -> None:
        if peer is None:
            return
        self.budget.forfeit(str(peer))
        for ban in self.reputation.penalize(str(peer), offence, self.clock(), detail):
            log.warning("banning peer %s until %s: %s", ban.peer, time.ctime(ban.until), ban.reason)
            self.stats.bans.append(ban.peer)
            self.budget.refuse(ban.peer, f"banned: {ban.reason}")
            if self.state is not None:
                self.state.save_ban(ban.peer, ban.until, ban.reason)
            if self.pubsub is not None:
                self.pubsub.add_to_blacklist(peer if isinstance(peer, ID) else ID.from_base58(ban.peer))
            if self.host is not None:
                self._nursery.start_soon(self._close_peer, peer)

    async def _close_peer(self, peer: Any) -> None:
        try:
            await self.host.get_network().close_peer(peer)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass

    def _stream_source(self, stream: Any) -> str | None:
        """The source address (fix 8's notion) a stream's connection comes from; None if
        relayed."""
        source = _direct_source(stream)
        return None if source is None else self.inbound_limiter.source(source)

    def _on_stream_violation(self, peer: Any, protocol: str, reason: str) -> None:
        self.stats.protocol_errors += 1
        if reason.startswith(libp2p_fixes.OVER_BUDGET):
            self.stats.violations["over-budget"] += 1
            # its bytes no longer count toward the cap (peer_budget); cut it off as well
            self.penalize(peer, "rate-limit", f"{protocol}: {reason}")
            if self.host is not None and peer is not None:
                self._nursery.start_soon(self._close_peer, peer)
            return
        offence = ("stalled-stream" if reason == libp2p_fixes.IDLE_TIMEOUT
                   else "rate-limit" if reason == DHT_FLOOD else "protocol-error")
        self.stats.violations[offence] += 1
        self.penalize(peer, offence, f"{protocol}: {reason}")

    def _on_equivocation(self, signer: str, key: str, held: bytes, new: bytes) -> None:
        """Two different records with one seq, both signed by `signer`: the signer is
        banned (whoever forwarded them is not at fault: relays cannot know)."""
        if self.is_banned(signer):
            return
        try:
            peer: Any = ID.from_base58(signer)
        except Exception:  # noqa: BLE001 - the validator checked it; keep the text then
            peer = signer
        self.penalize(peer, "equivocation",
                      f"{key[:80]}: two records with one seq ({len(held)} and {len(new)} bytes)")

    def _count_ignored(self) -> None:
        self.stats.ignored_messages += 1

    def _app_score(self, peer: Any) -> float:
        return self.reputation.score(str(peer), self.clock())

    # --- the service ---------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        libp2p_fixes.set_dht_protocol(self.names.protocol("kad"))
        dht_providers.shorten_provider_expiry()  # fix 11: provider records live 1 h, not 48 h
        try:
            listen = [multiaddr.Multiaddr(a) for a in self.settings.listen]
        except Exception as exc:  # noqa: BLE001 - multiaddr raises assorted types
            raise MeshError(f"bad listen address in {list(self.settings.listen)}: {exc}") from None
        key_pair = create_new_key_pair(self.identity.seed)
        host = new_host(key_pair=key_pair, listen_addrs=listen,
                        connection_config=self._connection_config(),
                        enable_mDNS=self.settings.mdns)
        if self.settings.mdns:
            # py-libp2p's mDNS advertises its own `port` (default 4001), not the bound one
            port = int(listen[0].value_for_protocol("tcp")) if listen else 0
            if port:
                host.mDNS.port = host.mDNS.broadcaster.port = port
                host.mDNS.broadcaster._build_service_info()
            else:
                log.warning("mDNS needs a fixed TCP listen port (not 0): LAN peers will not "
                            "find this node")
        libp2p_fixes.fix_inbound_slot_leak(host.get_network())
        libp2p_fixes.limit_auto_dial(  # fix 17
            host.get_network(), self._connection_config().low_watermark)
        if len(listen) == 1 and "ip4" in [p.name for p in listen[0].protocols()]:
            # a node of a loopback fleet (127.x.y.z) dials from its own address (no-op else)
            libp2p_fixes.dial_loopback_from(host, listen[0].value_for_protocol("ip4"))
        self.inbound_limiter = libp2p_fixes.limit_inbound_per_ip(  # fix 8
            host.get_network(), libp2p_fixes.PerIPLimits(
                max_pending=self.settings.max_pending_handshakes_per_ip,
                max_open=self.settings.max_connections_per_ip),
            refuse=lambda source: self.budget.source_refused(source))
        libp2p_fixes.guard_stream_handlers(
            host, self._on_stream_violation,
            idle_timeouts={self.names.protocol("kad"): self.settings.dht_idle_timeout_s},
            meter=lambda peer, n: None if peer is None else self.budget.unasked(str(peer), n),
            # results come on `report` because the publisher issued leases: asked-for bytes
            # (a busy honest worker sends more than a day's budget of inline outputs)
            unmetered={self.names.protocol("report")},
        )

        def record_offence(key: str, value: bytes) -> str | None:
            try:
                self.record_validator.parse_key(key)
            except RecordRejected:
                return None  # not a record type we know (a newer node's?): refused, unpunished
            try:
                self.record_validator.validate(key, value)
            except (RecordStale, RecordEquivocation):
                return None  # refused; a forwarder of an old or a signer's double is not at fault
            except RecordRejected as exc:
                return str(exc)
            return None

        frame_deadline = self.settings.dht_idle_timeout_s  # a started frame completes in this
        libp2p_fixes.check_frames(host, self._on_stream_violation, {  # fix 7
            self.names.protocol("kad"): libp2p_fixes.FrameRules(
                libp2p_fixes.MAX_DHT_FRAME, frame_deadline,
                libp2p_fixes.kad_frame_inspector(record_offence)),
            **{protocol: libp2p_fixes.FrameRules(MAX_GOSSIP_RPC, frame_deadline)
               for protocol in GOSSIP_PROTOCOLS},
            libp2p_fixes.IDENTIFY_PUSH: libp2p_fixes.FrameRules(
                libp2p_fixes.MAX_IDENTIFY_FRAME, frame_deadline,
                libp2p_fixes.identify_frame_inspector()),
        })
        for protocol, handler in self._handlers.items():
            host.set_stream_handler(TProtocol(protocol), handler)
        gossipsub = make_gossipsub(self._app_score, heartbeat_s=self.settings.heartbeat_s,
                                   degree=self.settings.gossip_degree)
        pubsub = Pubsub(host, gossipsub, max_inbound_rpc_size=MAX_GOSSIP_RPC,
                        allowed_topics={self.names.topic("jobs"), self.names.topic("evidence")})
        mode = DHTMode.CLIENT if self.settings.dht_mode == "client" else DHTMode.SERVER
        validator = NamespacedValidator({"p2pfleet": self.record_validator}, strict_validation=True)
        dht = KadDHT(host, mode, validator=validator, validator_changed=True, strict_validation=True)
        if self.settings.dht_k < 1:
            raise MeshError(f"dht_k must be at least 1, not {self.settings.dht_k}")
        for bucket in dht.routing_table.buckets:  # split buckets inherit it
            bucket.bucket_size = self.settings.dht_k
        guard_served_values(dht.value_store, self.record_validator)
        dht_refresh.disable_upstream_refresh(dht)  # fix 23: _refresh_loop refreshes the table
        pubsub.set_topic_validator(self.names.topic("jobs"), self._validate_job, False)
        libp2p_fixes.add_validation_ignore(  # fix 10
            pubsub, self.names.topic("jobs"), over_rate_filter(
                self.job_validator,
                lambda peer: self.penalize(peer, "rate-limit", f"jobs topic: {OVER_RATE}"),
                self._count_ignored))
        state_limits.limit_gossip_topics(  # fix 12
            pubsub, {self.names.topic("jobs"), self.names.topic("evidence")},
            lambda peer, why: self.penalize(peer, "unknown-topic", why))
        self.record_quota, self.provider_quota = state_limits.limit_records_per_sender(  # fix 13
            host, dht, self.names.protocol("kad"), self.settings.held_records,
            self.settings.max_records, self._stream_source,
            lambda peer, why: self.penalize(peer, "invalid-message", why))
        self.dht_slots = share_dht_slots(  # fix 15 (before fix 14: it wraps this)
            host, dht, self.names.protocol("kad"), self.settings.dht_slots, self._on_stream_violation)
        long_lived = frozenset([*GOSSIP_PROTOCOLS, self.names.protocol("kad"),
                                libp2p_fixes.IDENTIFY_PUSH])

        def in_gossip_mesh(peer: Any) -> bool:
            return any(peer in peers for peers in gossipsub.mesh.values())

        self.inbound_reservation = libp2p_fixes.reserve_inbound_slots(  # fix 16
            host.get_network(), self.settings.inbound_reserve, dht.routing_table.get_peer_ids,
            lambda peer: dht.routing_table.peer_in_table(peer) or peer in self._useful,
            self.inbound_limiter.source,
            on_prune=lambda peer: self.budget.forfeit(str(peer)),
            busy=lambda conn: conn_trim.busy(conn, long_lived), keep=in_gossip_mesh)
        dht_streams.learn_peer_per_request(dht)  # fix 19, server half (before fix 14)
        dht_find_node.answer_find_node_for_any_key(host, dht, self.names.protocol("kad"))  # fix 14
        self.dht_streams = (dht_streams.reuse_dht_streams(  # fix 19
            host, self.names.protocol("kad"), self.settings.dht_idle_timeout_s / 4)
            if self.settings.dht_reuse_streams else None)
        self.reachable = Reachable(host, dht, self.names.protocol("kad"), self.settings.dht_mode,
                                   relay_only=self.settings.relay_only, clock=self.clock,
                                   stable=self.settings.stable)
        self.relays = Relays(host, self.reachable, punch=not self.settings.relay_only,
                             shares=self.settings.relay_shares)
        if self.settings.relay_only:
            if self.settings.mdns:
                raise MeshError("relay_only and mdns exclude each other: mDNS announces "
                                "this node's address on the LAN")
            advertise_only(host, self.relays.addrs)

        def trimmed(before: int, peers: list[Any]) -> None:
            self.stats.trims += 1
            self.stats.last_trim = (before, tuple(str(p) for p in peers))

        conn_trim.trim_connections(host.get_network(), long_lived, keep=in_gossip_mesh,  # fix 21
                                   in_table=dht.routing_table.peer_in_table, on_trim=trimmed)
        host.get_network().register_notifee(_ConnectionGate(self))
        async with host.run(listen_addrs=[]), trio.open_nursery() as nursery:
            self._nursery = nursery
            async with background_trio_service(pubsub), background_trio_service(gossipsub):
                await pubsub.wait_until_ready()
                async with background_trio_service(dht):
                    try:
                        await host.get_network().listen(*listen)
                    except Exception as exc:  # noqa: BLE001
                        raise MeshError(f"cannot listen on {list(self.settings.listen)}: {exc}") from None
                    self.host, self.dht, self.pubsub = host, dht, pubsub
                    jobs_sub = await pubsub.subscribe(self.names.topic("jobs"))
                    nursery.start_soon(self._receive_jobs, jobs_sub)
                    nursery.start_soon(self.reachable.run)  # AutoNAT, then the DHT mode
                    nursery.start_soon(self.relays.run)  # relay for others, or hold a reservation
                    if self.settings.bootstrap:
                        nursery.start_soon(self._bootstrap_loop)
                    nursery.start_soon(self._forget_marks)
                    nursery.start_soon(self._trim_loop)
                    nursery.start_soon(self._refresh_loop, dht)
                    if self.dht_streams is not None:
                        nursery.start_soon(self.dht_streams.run)
                    task_status.started(self)
                    try:
                        await trio.sleep_forever()
                    finally:
                        self.host = self.dht = self.pubsub = None
                        nursery.cancel_scope.cancel()
                        await _close_swarm(host)

    async def _forget_marks(self) -> None:
        while True:
            self.marks.forget_marks(int(self.clock() * 1000))
            await trio.sleep(MARK_PRUNE_S)

    async def _trim_loop(self) -> None:
        """Trim also without new connections (fix 21): a host full up to max_connections
        refuses newcomers before they could trigger a trim."""
        while True:
            await trio.sleep(TRIM_INTERVAL_S)
            if self.host is not None:
                await self.host.get_network().connection_pruner.maybe_prune_connections()

    def _connection_config(self) -> ConnectionConfig:
        # py-libp2p's defaults keep >= 50 connections and dial up to 200 known peers every
        # 30 s; a car on a shared link wants few, long-lived connections.
        s = self.settings
        return ConnectionConfig(
            max_connections=s.max_connections, min_connections=s.min_connections,
            low_watermark=s.min_connections * 2, high_watermark=int(s.max_connections * 0.75),
            max_connections_per_peer=2, inbound_upgrade_timeout=5.0,
            grace_period=s.trim_grace_s,
            outbound_upgrade_timeout=10.0, dial_timeout=10.0,
        )

    # --- bootstrap -----------------------------------------------------------------------
    async def _bootstrap_loop(self) -> None:
        low, high = self.settings.bootstrap_backoff_s
        delay = low
        while True:
            if len(self.connected_peers()) >= self.settings.min_connections:
                await trio.sleep(60.0)  # in the mesh: the bootstrap peers are not needed now
                continue
            # One bootstrap peer is enough to join (the self-lookup learns the rest); asked in
            # random order, a fleet joining at once spreads over them instead of every
            # newcomer handshaking with each (at 200 hosts they could not keep up).
            answered, failures = 0, []
            for addr in self._rng.sample(self.settings.bootstrap, len(self.settings.bootstrap)):
                try:
                    await self.connect(addr)
                    answered += 1
                    break
                except MeshError as exc:
                    failures.append(str(exc))
            if answered:
                delay = low
                await self.table_ready.wait()
                await self._release_bootstrap_peers()
                await trio.sleep(60.0)  # keep bootstrap links fresh
                continue
            log.warning("no bootstrap peer answered (%s); running alone, retrying in %.0f s",
                        "; ".join(failures), delay)
            await trio.sleep(delay * (0.5 + self._rng.random()))
            delay = min(high, delay * 2)

    async def _release_bootstrap_peers(self) -> None:
        """Close our connections to the bootstrap peers once we hold enough others.

        A whole fleet joins through a few bootstrap nodes; each newcomer holding a slot
        there for good would fill them (issue 15: at 200 hosts the bootstrap nodes sat at
        their connection limit and 76 hosts found no peer). They stay in our routing table,
        which needs no live connection: a walk dials them again when they are closest."""
        bootstrap_ids = set()
        for addr in self.settings.bootstrap:
            try:
                bootstrap_ids.add(info_from_p2p_addr(multiaddr.Multiaddr(addr)).peer_id)
            except Exception:  # noqa: BLE001 - a bad address was reported when dialled
                continue
        others = [p for p in self.host.get_network().connections
                  if p not in bootstrap_ids and self.host.get_network().get_connections(p)]
        if len(others) < self.settings.min_connections:
            return
        for peer in bootstrap_ids:
            if self.host.get_network().get_connections(peer):
                await self._close_peer(peer)

    async def connect(self, addr: str, timeout: float = 10.0) -> str:
        """Dial a /.../p2p/<peer-id> multiaddr, add it to the DHT; returns its peer id."""
        if self.host is None:
            raise MeshError("the mesh is not running")
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:  # noqa: BLE001
            raise MeshError(f"{addr}: not a multiaddr with /p2p/<peer-id> ({exc})") from None
        if info.peer_id == self.host.get_id():
            return str(info.peer_id)
        if self.host.get_network().get_connections(info.peer_id):
            return str(info.peer_id)
        try:
            with trio.fail_after(timeout):
                if "/p2p-circuit" in addr and self.relays is not None:
                    await self.relays.dial(addr)  # py-libp2p's swarm dials no relayed addresses
                else:
                    await self.host.connect(info)
                await self.dht.add_peer(info.peer_id)
        except trio.TooSlowError:
            raise MeshError(f"{addr}: no answer within {timeout:.0f} s") from None
        except Exception as exc:  # noqa: BLE001 - dial errors come in many types
            raise MeshError(f"{addr}: {type(exc).__name__}: {exc}") from None
        return str(info.peer_id)

    # --- records ---------------------------------------------------------------------------
    async def put_capacity(self, envelope: bytes, *, known_first: bool = False) -> str:
        """Store our signed capacity record in the DHT under our peer id.

        `known_first`: before the walk, store it at once where the last put of the key was
        accepted and at the routing table's closest peers, a single round of requests: a
        leaving car has seconds, and a walk waits for its slowest query (a 5 s limit), so
        its "leaving" record reached no one whenever one closest peer was slow or gone."""
        if self.dht is None:
            raise MeshError("the mesh is not running")
        key = self.names.node_key(self.identity.peer_id)
        try:
            self.record_validator.validate(key, envelope)
        except RecordRejected as exc:
            raise MeshError(f"our own capacity record is invalid: {exc}") from None
        key_bytes = key.encode()
        self.dht.value_store.put(key_bytes, envelope)
        if known_first:
            await self._store_at_known(self.dht, key_bytes, envelope)
        await self._store(self.dht, key_bytes, envelope)
        return key

    async def _store_at_known(self, dht: KadDHT, key_bytes: bytes, envelope: bytes) -> None:
        """Store at the peers that accepted the key's last put and the table's closest."""
        _old, held_before = self._published.get(key_bytes, (b"", set()))
        targets = list(held_before)
        for peer in dht.routing_table.find_local_closest_peers(key_bytes, self.settings.dht_k):
            if peer not in held_before:
                targets.append(peer)
        await self._store_at(dht, targets, key_bytes, envelope)

    async def _store(self, dht: KadDHT, key_bytes: bytes, envelope: bytes) -> None:
        closest, _values = await dht_lookup.walk(dht, key_bytes, k=self.settings.dht_k, learn=True)
        self._walked.note(dht, key_bytes, trio.current_time())
        held = await self._store_at(dht, closest, key_bytes, envelope)
        if len(held) * 2 < len(closest):
            self._poor_puts += 1
            self.refresh_now()  # few copies (peers busy or gone): refresh, then store again
        else:
            self._poor_puts = 0

    async def _refresh_loop(self, dht: KadDHT) -> None:
        """Fill the routing table once a first peer is connected (then `table_ready`), and
        refresh it periodically: sooner while it holds fewer than k peers, as a node that
        joined a young fleet does. After each refresh, republish what moved."""
        if self.settings.dht_refresh_s <= 0:
            self.table_ready.set()
            return
        await self.first_peer.wait()
        k, period = self.settings.dht_k, self.settings.dht_refresh_s
        lean = self.settings.dht_lean_refresh
        delay = backoff = FIRST_REFRESH_S
        while True:
            try:
                self.last_refresh = await dht_refresh.fill(
                    dht, k=k, rng=self._rng, lean=lean, walked=self._walked,
                    now=trio.current_time(), period=period)
            except Exception as exc:  # noqa: BLE001 - a refresh failing must not end the mesh
                log.warning("routing-table refresh failed: %s: %s", type(exc).__name__, exc)
            self.refreshes += 1
            self.table_ready.set()
            await self._republish_moved(dht)
            wait, delay = dht_refresh.next_wait(self.last_refresh, k=k, lean=lean, delay=delay,
                                                table=dht.routing_table.size(), period=period)
            asked, backoff = dht_refresh.asked_wait(self.last_refresh, backoff=backoff,
                                                    first=FIRST_REFRESH_S, period=period,
                                                    lean=lean, poor_puts=self._poor_puts)
            with trio.move_on_after(wait * self._rng.uniform(0.9, 1.1)):
                await self._refresh_wanted.wait()
                await trio.sleep(asked)  # asked for: still not more often than this
            self._refresh_wanted = trio.Event()

    def refresh_now(self) -> None:
        """Ask for a routing-table refresh (and republish check) without waiting."""
        self._refresh_wanted.set()

    async def _store_at(self, dht: KadDHT, peers: list[Any], key_bytes: bytes,
                        envelope: bytes) -> set[Any]:
        """PUT_VALUE to `peers`, remembered as this key's last put; returns who accepted."""
        held: set[Any] = set()
        self.puts += 1
        self.last_put = dht_lookup.WalkStats()
        self.last_put_peers = await dht_lookup.store_at(dht, peers, key_bytes, envelope,
                                                        accepted=held, stats=self.last_put)
        self._published[key_bytes] = (envelope, held)
        return held

    async def _republish_moved(self, dht: KadDHT) -> None:
        """Store our records again where the peers closest to their keys changed much."""
        for key_bytes, (envelope, held) in list(self._published.items()):
            closest = dht.routing_table.find_local_closest_peers(key_bytes, self.settings.dht_k)
            if not dht_refresh.moved(held, closest):
                continue
            try:
                self.record_validator.validate(key_bytes.decode(), envelope)
            except RecordRejected:  # expired or replaced: the node publishes anew
                del self._published[key_bytes]
                continue
            await self._store(dht, key_bytes, envelope)

    async def get_capacity(self, peer_id: str, timeout: float = 10.0) -> Opened | None:
        """Find a peer's capacity record; None if there is none we can believe."""
        if self.dht is None:
            raise MeshError("the mesh is not running")
        key = self.names.node_key(peer_id)
        key_bytes = key.encode()
        values: dict[Any, bytes] = {}
        self.last_lookup = dht_lookup.WalkStats()
        with trio.move_on_after(timeout):  # what the walk found by then counts (`found`)
            await dht_lookup.walk(self.dht, key_bytes, k=self.settings.dht_k,
                                  stats=self.last_lookup, learn=True, found=values,
                                  quorum=self.settings.dht_get_quorum,
                                  counts=lambda value: self.record_validator.authentic(key, value))
            self._walked.note(self.dht, key_bytes, trio.current_time())
        local = self.dht.value_store.get(key_bytes)
        candidates = list(values.values()) + ([bytes(local.value)] if local else [])
        newest = self.record_validator.newest(key, candidates)
        best = newest[1] if newest else None
        if best is not None:
            stale = [p for p, v in values.items() if v != best.raw]
            if stale:  # Kademlia's entry correction: bring outdated holders up to date
                self._nursery.start_soon(dht_lookup.store_at, self.dht, stale, key_bytes, best.raw)
            if local is None or bytes(local.value) != best.raw:
                self.dht.value_store.put(key_bytes, best.raw)
        return best

    # --- job announcements -----------------------------------------------------------------
    async def announce_job(self, envelope: bytes) -> None:
        if self.pubsub is None:
            raise MeshError("the mesh is not running")
        verdict, _opened, why = self.job_validator.check(envelope)
        if verdict != Verdict.ACCEPT:
            raise MeshError(f"announcement refused locally: {why}")
        await self.pubsub.publish(self.names.topic("jobs"), envelope)

    def _validate_job(self, forwarder: ID, msg: Any) -> bool:
        data = bytes(msg.data)
        digest = hashlib.sha256(data).digest()
        if digest in self._accepted:  # seen and accepted already (e.g. our own publish)
            return True
        verdict, opened, why = self.job_validator.check(data)
        if verdict == Verdict.REJECT:
            self.stats.rejected_messages += 1
            self.penalize(forwarder, "invalid-message", f"jobs topic: {why}")
            return False
        if verdict == Verdict.IGNORE:  # normally stopped earlier by over_rate_filter
            self.stats.ignored_messages += 1
            return False
        self._accepted[digest] = opened
        while len(self._accepted) > 1024:
            self._accepted.popitem(last=False)
        return True

    async def _receive_jobs(self, sub: Any) -> None:
        while True:
            msg = await sub.get()
            opened = self._accepted.get(hashlib.sha256(bytes(msg.data)).digest())
            if opened is None:
                continue
            try:
                self._job_send.send_nowait(opened)
            except trio.WouldBlock:
                log.warning("job announcements arrive faster than the node reads them; dropping one")

    # --- introspection ---------------------------------------------------------------------
    def listen_addrs(self) -> list[str]:
        if self.host is None:
            return []
        return [str(a) for a in self.host.get_addrs()]

    def mark_useful(self, peer: Any) -> None:
        """`peer` earned its connection (e.g. it holds our leases): under an inbound flood,
        fix 16 never prunes it to make room (bounded: the oldest mark goes first)."""
        peer = peer if isinstance(peer, ID) else ID.from_base58(str(peer))
        self._useful[peer] = None
        self._useful.move_to_end(peer)
        while len(self._useful) > MAX_USEFUL:
            self._useful.popitem(last=False)

    def connected_peers(self) -> list[str]:
        if self.host is None:
            return []
        return sorted(str(p) for p, conns in self.host.get_network().connections.items() if conns)


async def _close_swarm(host: Any) -> None:
    """Close every connection's socket and every listener when the mesh stops (fix 6).

    Upstream: on cancellation, each connection's own task starts SwarmConn.close(), which
    marks the connection closed and is then cancelled before it reaches the socket; the
    swarm's cleanup sees "already closed" and skips it. A node that "left" the mesh still
    held its TCP connections. We close the secured connection (and with it the socket) of
    every connection directly, shielded and with a deadline, then close the swarm.
    """
    network = host.get_network()
    conns = [c for cs in list(network.connections.values()) for c in list(cs)]
    with trio.move_on_after(5.0) as scope:
        scope.shield = True
        for conn in conns:
            try:
                await conn.muxed_conn.secured_conn.close()
            except Exception as exc:  # noqa: BLE001 - best effort; the deadline bounds it
                log.debug("closing a connection: %s", exc)
        try:
            await network.close()
        except Exception as exc:  # noqa: BLE001
            log.debug("closing the swarm: %s", exc)
