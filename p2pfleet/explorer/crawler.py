"""The crawler: a light client that finds peers by walking the DHT and checks what they say.

It runs a `Mesh` in DHT client mode (py-libp2p then registers no Kademlia handler: it
answers no DHT query and stores nothing) with no listener and a fresh throw-away identity,
so it takes no work and is dialled by nobody. One `crawl()`:

1. discovery: dial the bootstrap peers, run a few lookups of random keys, then ask every
   peer found for the peers closest to random keys (their routing tables), until no new
   peer appears or `sample_cap` x 2 are known; above `sample_cap` it reads records for a
   random sample only, and says so;
2. records: for each peer, one GET_VALUE walk of its capacity key; every copy returned is
   checked by `evidence.check_copies` (signatures, wrong keys, equivocation); the newest
   valid copy decides its state (leaving or expired: offline);
3. liveness: online peers are asked for `node_info` (answered only by opted-in nodes) and
   otherwise pinged (`/ipfs/ping/1.0.0`); the round trip is the RTT;
4. jobs and publisher evidence are heard all the time on the jobs and evidence topics.

State is kept across crawls (`--watch`, `--serve`): peers seen before and now gone are shown
offline, and a record replaced by another with the same `seq` is equivocation too. The
newest record seen per peer is its high-water mark (in memory, or in a node state file when
one is given): a copy with a lower `seq` (a replay of an old "available" record after the
car left) never replaces it.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.custom_types import TProtocol

from ..core.records import mark_keep_until
from ..identity import Identity, peer_id_from_key
from ..names import Names
from ..net import dht_lookup
from ..net.info import fetch_node_info
from ..net.mesh import Mesh, MeshError, MeshSettings
from ..store.state import NodeState, RecordMark
from ..wire import errors as E
from ..wire.envelope import MAX_CLOCK_SKEW_MS, Opened, open_envelope
from ..wire.kinds import KINDS
from .evidence import EvidenceRefused, Finding, check_copies, equivocation_between, open_publisher_evidence
from .model import (ONLINE_STATES, History, JobView, PeerView, Snapshot, capacity_by_class,
                    capacity_now, job_heard)

log = logging.getLogger(__name__)

PING_PROTOCOL = TProtocol("/ipfs/ping/1.0.0")
PING_LENGTH = 32
MAX_REJECTED_KEPT = 50
WALK_ALPHA = 6  # record walks: every holder must answer anyway (all copies are checked)


@dataclass(frozen=True)
class CrawlSettings:
    network: str
    bootstrap: tuple[str, ...]
    timeout_s: float = 30.0      # the most one crawl may take
    sample_cap: int = 256        # records read per crawl at most
    random_walks: int = 3
    concurrency: int = 8
    probe_timeout_s: float = 5.0
    seed: int | None = None      # random keys and the sample; None: from the OS

    def __post_init__(self) -> None:
        if not self.bootstrap:
            raise ValueError("the explorer needs at least one bootstrap address "
                             "(/ip4/.../tcp/.../p2p/<peer id>)")
        if self.sample_cap < 1:
            raise ValueError(f"sample cap must be at least 1, not {self.sample_cap}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout must be positive, not {self.timeout_s}")


class Crawler:
    def __init__(self, settings: CrawlSettings, *, clock: Any = time.time,
                 state: NodeState | None = None):
        self.settings = settings
        self.names = Names(settings.network)
        self.clock = clock
        self.rng = random.Random(settings.seed)
        self.identity = Identity.from_seed(self.rng.randbytes(32))
        self.mesh = Mesh(self.identity, MeshSettings(
            network=settings.network, listen=(), bootstrap=settings.bootstrap,
            dht_mode="client", seed=settings.seed), state, clock=clock)
        self.peers: dict[str, PeerView] = {}
        # key -> newest valid record seen (its high-water mark)
        self.marks = self.mesh.marks  # the state's table, or memory
        self.jobs: dict[tuple[str, str], JobView] = {}
        self.findings: dict[tuple, Finding] = {}
        self.rejected_reports: list[str] = []
        self.history = History()
        self.crawls = 0
        self.last: Snapshot | None = None

    # --- the service -----------------------------------------------------------------------
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Join as a light client and hear the jobs and evidence topics until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.mesh.run)
            pubsub = self.mesh.pubsub
            topic = self.names.topic("evidence")
            # validated here so the explorer forwards nothing it would not show
            pubsub.set_topic_validator(topic, self._evidence_ok, False)
            evidence = await pubsub.subscribe(topic)
            nursery.start_soon(self._hear_jobs)
            nursery.start_soon(self._hear_evidence, evidence)
            task_status.started(self)
            await trio.sleep_forever()

    async def _hear_jobs(self) -> None:
        async for opened in self.mesh.jobs:  # verified by the mesh's topic validator
            body = opened.body
            key = (peer_id_from_key(opened.signer), body.job_id.hex())
            held = self.jobs.get(key)
            if held is not None and held.seq >= body.seq:
                continue
            self.jobs[key] = job_heard(held, JobView(
                publisher=key[0], job_id=key[1], seq=body.seq, exp_ms=body.exp,
                shards_total=body.shards_total, shards_left=body.shards_left,
                quorum=body.quorum, credit_rate=body.credit_rate,
                model_digest=body.model_digest.hex(), model_size=body.model_size,
                heard_at=self.clock()))

    def _evidence_ok(self, forwarder: Any, msg: Any) -> bool:
        try:
            open_envelope(bytes(msg.data), self.names.network, now_ms=self._now_ms(),
                          kinds={"evidence"})
        except E.WireError:
            return False
        return True

    async def _hear_evidence(self, sub: Any) -> None:
        while True:
            msg = await sub.get()
            try:
                finding = open_publisher_evidence(self.names.network, bytes(msg.data), self._now_ms())
            except EvidenceRefused as exc:
                self.rejected_reports.append(str(exc))
                del self.rejected_reports[:-MAX_REJECTED_KEPT]
                continue
            self.findings.setdefault(finding.key(), finding)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- one crawl -------------------------------------------------------------------------
    async def crawl(self) -> Snapshot:
        """Discover peers, read and check their records, probe the live ones."""
        if self.mesh.dht is None:
            raise MeshError("the crawler is not running (start Crawler.run first)")
        started = trio.current_time()
        deadline = started + self.settings.timeout_s
        found = await self._discover(deadline)
        phases = {"discover_s": trio.current_time() - started}
        ids = sorted(found)
        cap = self.settings.sample_cap
        sampled = len(ids) > cap
        if sampled:
            ids = sorted(self.rng.sample(ids, cap))
        mark = trio.current_time()
        with trio.move_on_at(deadline):
            await self._for_each(ids, lambda pid: self._read_record(pid, found[pid]))
        phases["records_s"] = trio.current_time() - mark
        mark = trio.current_time()
        live = [pid for pid in ids if self.peers[pid].state in ONLINE_STATES]
        with trio.move_on_at(deadline):
            await self._for_each(live, lambda pid: self._probe(pid))
        phases["probe_s"] = trio.current_time() - mark
        probed = set(live)
        for pid, view in self.peers.items():
            if pid not in probed:  # not probed this crawl: an old verdict would mislead
                view.reach = "not reached"
        for pid, view in self.peers.items():
            if pid not in ids and not sampled and view.state in ONLINE_STATES:
                view.state, view.why_offline = "offline", "gone from the DHT"
        now = self.clock()
        for key, job in list(self.jobs.items()):
            if job.exp_ms + MAX_CLOCK_SKEW_MS < now * 1000:
                del self.jobs[key]
        flagged = {f.accused for f in self.findings.values()}
        for pid, view in self.peers.items():
            view.flagged = pid in flagged
        peers = list(self.peers.values())
        self.history.add(now, *capacity_now(peers), capacity_by_class(peers))
        self.crawls += 1
        self.last = Snapshot(
            network=self.names.network, crawled_at=now,
            duration_s=trio.current_time() - started, peers=peers,
            jobs=list(self.jobs.values()), findings=list(self.findings.values()),
            discovered=len(found), sampled=sampled, sample_cap=cap,
            rejected_reports=list(self.rejected_reports), history=self.history,
            crawls=self.crawls, phases={k: round(v, 3) for k, v in phases.items()})
        return self.last

    async def _for_each(self, items: list[str], fn: Any) -> None:
        limiter = trio.CapacityLimiter(self.settings.concurrency)

        async def one(item: str) -> None:
            async with limiter:
                await fn(item)

        async with trio.open_nursery() as nursery:
            for item in items:
                nursery.start_soon(one, item)

    def _random_key(self) -> bytes:
        return self.names.node_key(peer_id_from_key(self.rng.randbytes(32))).encode()

    async def _discover(self, deadline: float) -> dict[str, ID]:
        mesh, dht = self.mesh, self.mesh.dht
        host_id = mesh.host.get_id()
        for addr in self.settings.bootstrap:
            try:
                await mesh.connect(addr, timeout=self.settings.probe_timeout_s)
            except MeshError as exc:
                log.warning("bootstrap %s: %s", addr, exc)
        known: dict[str, ID] = {}

        def add(peers: list[Any]) -> None:
            for p in peers:
                if p != host_id:
                    known.setdefault(str(p), p)

        add(list(mesh.host.get_connected_peers()))
        add([ID.from_base58(pid) for pid in self.peers])  # seen in earlier crawls
        limit = 2 * self.settings.sample_cap
        with trio.move_on_at(deadline - self.settings.timeout_s / 2):
            async def random_walk() -> None:
                closest, _values = await dht_lookup.walk(dht, self._random_key(), alpha=WALK_ALPHA)
                add(closest)

            async with trio.open_nursery() as nursery:
                for _ in range(self.settings.random_walks):
                    nursery.start_soon(random_walk)
            queried: set[str] = set()
            while len(known) < limit:
                pending = [pid for pid in sorted(known) if pid not in queried]
                if not pending:
                    break
                queried.update(pending)

                async def ask(pid: str) -> None:
                    for key in (self._random_key(), self._random_key()):
                        with trio.move_on_after(self.settings.probe_timeout_s):
                            try:
                                _rec, closer = await dht.value_store._get_from_peer(
                                    known[pid], key, return_record=True, return_closer_peers=True)
                            except Exception as exc:  # noqa: BLE001 - an unreachable peer
                                log.debug("routing-table query to %s: %s", pid, exc)
                                return
                            add(closer or [])

                await self._for_each(pending, ask)
        return known

    async def _read_record(self, pid: str, peer: ID) -> None:
        view = self.peers.setdefault(pid, PeerView(pid))
        key = self.names.node_key(pid).encode()
        _closest, values = await dht_lookup.walk(self.mesh.dht, key, alpha=WALK_ALPHA,
                                                 timeout=self.settings.probe_timeout_s)
        copies = {str(p): v for p, v in values.items()}
        if pid not in copies:  # the peer itself holds its own record
            with trio.move_on_after(self.settings.probe_timeout_s):
                try:
                    rec, _closer = await self.mesh.dht.value_store._get_from_peer(
                        peer, key, return_record=True, return_closer_peers=True)
                    if rec is not None and getattr(rec, "value", None):
                        copies[pid] = bytes(rec.value)
                except Exception as exc:  # noqa: BLE001
                    log.debug("GET_VALUE to %s: %s", pid, exc)
        now_ms = self._now_ms()
        check = check_copies(self.names.network, pid, copies, now_ms)
        for finding in check.findings:
            self.findings.setdefault(finding.key(), finding)
        view.copies = len(copies)
        newest = check.newest
        held = self._held(pid)
        if newest is not None and held is not None:
            finding = equivocation_between(pid, held, newest)
            if finding is not None:
                self.findings.setdefault(finding.key(), finding)
            if held.body.seq > newest.body.seq:
                newest = held  # never go back to an older record
        if newest is None:
            if view.record_seq is None:
                view.state, view.why_offline = "unknown", "no record"
            else:
                view.state, view.why_offline = "offline", "no record"
            return
        self._hold(pid, newest, now_ms)
        body = newest.body
        view.sw_version, view.ort_version = body.sw_version, body.ort_version
        view.hw_class, view.cores, view.memory_mb = body.hw_class.hex(), body.cores, body.memory_mb
        view.bench, view.slots = body.bench, body.slots
        view.providers, view.addrs = tuple(body.providers), tuple(body.addrs)
        view.record_seq, view.record_exp_ms = body.seq, body.exp
        if now_ms > body.exp + MAX_CLOCK_SKEW_MS:
            view.state, view.why_offline = "offline", "expired"
        elif body.state == "leaving":
            view.state, view.why_offline = "offline", "leaving"
        else:
            view.state, view.why_offline = body.state, None
            view.last_seen = self.clock()

    def _held(self, pid: str) -> Opened | None:
        mark = self.marks.record_mark(self.names.node_key(pid))
        if mark is None:
            return None
        try:
            return open_envelope(mark.envelope, self.names.network, kinds={"capacity"})
        except E.WireError:
            return None

    def _hold(self, pid: str, newest: Opened, now_ms: int) -> None:
        body = newest.body
        keep = mark_keep_until(body.seq, body.exp, now_ms, KINDS["capacity"].max_lifetime_ms,
                               MAX_CLOCK_SKEW_MS)
        self.marks.raise_mark(self.names.node_key(pid), RecordMark(
            body.seq, hashlib.sha256(newest.body_bytes).digest(), newest.raw, keep))

    async def _probe(self, pid: str) -> None:
        view = self.peers[pid]
        timeout = self.settings.probe_timeout_s
        reached = False
        try:
            reached = await self._probe_once(view, pid, timeout)
        finally:
            view.dht_role = self._dht_role(pid)
            view.reach = self._reach(pid, view) if reached else "not reached"

    def _dht_role(self, pid: str) -> str | None:
        """server or client as the peer's identify protocol list says (None: not told)."""
        try:
            protocols = [str(p) for p in self.mesh.host.get_peerstore().get_protocols(
                ID.from_base58(pid))]
        except Exception:  # noqa: BLE001 - never identified
            return None
        if not protocols:
            return None
        return "server" if self.names.protocol("kad") in protocols else "client"

    def _reach(self, pid: str, view: PeerView) -> str:
        """relayed when the probe went through a relay (or the record offers only relay
        addresses), else direct."""
        try:
            conns = self.mesh.host.get_network().get_connections(ID.from_base58(pid))
            addrs = [str(c.muxed_conn.secured_conn.get_remote_address()) for c in conns]
        except Exception:  # noqa: BLE001 - no connection object to ask
            addrs = []
        if any("p2p-circuit" in a for a in addrs) or (
                view.addrs and all("p2p-circuit" in a for a in view.addrs)):
            return "relayed"
        return "direct"

    async def _probe_once(self, view: PeerView, pid: str, timeout: float) -> bool:
        reply = None
        if self._may_offer_info(pid):
            reply = await fetch_node_info(self.mesh, pid, timeout=timeout, clock=self.clock)
        if reply is not None and reply.opened is not None:
            info = reply.info
            view.info = {"sw_version": info.sw_version, "state": info.state,
                         "uptime_s": info.uptime_s, "shards_done": info.shards_done,
                         "results_accepted": info.results_accepted, "seq": info.seq}
            view.rtt_ms, view.rtt_by = round(reply.rtt_s * 1000, 2), "info"
            view.last_seen = self.clock()
            return True
        rtt = await self._ping(pid, timeout)
        if rtt is not None:
            view.rtt_ms, view.rtt_by = round(rtt * 1000, 2), "ping"
            view.last_seen = self.clock()
            return True
        return False

    def _may_offer_info(self, pid: str) -> bool:
        """False when identify told us the peer's protocols and `info` is not among them
        (saves a negotiation round trip per node that has not opted in)."""
        try:
            protocols = self.mesh.host.get_peerstore().get_protocols(ID.from_base58(pid))
        except Exception:  # noqa: BLE001 - unknown peer: just ask
            return True
        return not protocols or self.names.protocol("info") in [str(p) for p in protocols]

    async def _ping(self, pid: str, timeout: float) -> float | None:
        """One libp2p ping round trip in seconds (None: no answer)."""
        payload = self.rng.randbytes(PING_LENGTH)
        stream = None
        try:
            with trio.fail_after(timeout):
                stream = await self.mesh.host.new_stream(ID.from_base58(pid), [PING_PROTOCOL])
                started = trio.current_time()
                await stream.write(payload)
                got = b""
                while len(got) < PING_LENGTH:
                    chunk = await stream.read(PING_LENGTH - len(got))
                    if not chunk:
                        return None
                    got += chunk
                rtt = trio.current_time() - started
            return rtt if got == payload else None
        except Exception as exc:  # noqa: BLE001 - unreachable, reset, timeout
            log.debug("ping %s: %s", pid, exc)
            return None
        finally:
            if stream is not None:
                with trio.move_on_after(1.0, shield=True):
                    try:
                        await stream.close()
                    except Exception:  # noqa: BLE001
                        pass
