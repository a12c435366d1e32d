"""The volunteer node: the vehicle policy decides, the mesh follows.

The node wires the pure policy machine (`core.policy`) to a vehicle state provider and to
the mesh (`net.mesh`). It observes the car, feeds the policy, and carries out its effects:
`JoinMesh` starts a libp2p host after a random delay (`node.state_jitter_s`, so the public
record is no precise log of when the car is home) and publishes the capacity record;
`LeaveMesh` publishes a short-lived "leaving" record and then stops the host entirely, so
an ineligible car holds no connection, sends no heartbeat and serves no DHT. A record never
expires before one it replaces (`NodeState.next_record`): the leaving record lives at least
as long as the last "available" one, so a replay of that one cannot bring the car back.

While in the mesh the capacity record is republished every `records.republish_s` and on
every state change. The owner controls the node through a unix socket (`p2pfleet.live.control`):
status, peers, pause, resume, stop (now or after the current shard). SIGINT and SIGTERM stop
it the same way: publish the leaving record, close the host, exit within a few seconds.

While the policy lets the car compute, the worker (`p2pfleet.live.worker`) pulls leases from the
publishers the owner chose, runs them in a sandbox child per publisher (`p2pfleet.exec`),
reports results and keeps receipts in the ledger (`store.ledger`); a stop hands back the
finished micro-batches before the node leaves the mesh.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import ipaddress
import logging
import os
import random
import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID

from .. import __version__
from .config import Config, ConfigError
from .control import serve_control
from .metrics import serve_metrics
from ..core import eventlog
from ..core import policy as P
from ..core.reachability import StableRule
from ..identity import Identity, key_from_peer_id, peer_id_from_key
from ..net import traffic
from ..net.mesh import Mesh, MeshError, MeshSettings
from ..net.info import InfoFacts, fetch_node_info, info_handler
from ..net.relay import is_relayed
from ..store.state import NodeState
from .worker import Worker, WorkerSettings
from ..core.peer_budget import MB, BudgetLimits, PeerBudget
from ..core.worker import HeardJob, hand_back_reason
from ..vehicle.providers import StaticProvider, TraceProvider
from ..vehicle.survey import resolve_trace
from ..vehicle.ocpp.charger import OcppServerError
from ..vehicle.live import observation, provider_health
from .providers import LIVE_PROVIDERS, make_live_provider
from .timeline import VehicleTimeline
from ..wire.envelope import seal
from ..wire.kinds import KINDS, Capacity

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
ORT_VERSION = importlib.metadata.version("onnxruntime")  # without importing it (~40 MB)
LEAVE_TIMEOUT_S = 3.0  # how long a leaving node may spend publishing its leaving record
POLL_S = 5.0  # observe the car at least this often
MAX_JOBS_HELD = 256  # job announcements remembered


class NodeError(Exception):
    """The node cannot start as configured; the message says what to change."""


def make_provider(config: Config, *, t0: float | None = None) -> Any:
    v = config.vehicle
    if v.provider in LIVE_PROVIDERS:
        return make_live_provider(config)
    if v.provider == "trace":
        if not v.trace:
            raise NodeError("vehicle.provider is 'trace' but vehicle.trace names no file")
        return TraceProvider(resolve_trace(v.trace), t0=time.time() if t0 is None else t0,
                             speedup=v.trace_speedup)
    if v.provider == "ocpp":  # the owner's charger (vehicle/ocpp/)
        from .ocpp_setup import make_ocpp_provider
        return make_ocpp_provider(config)
    values: dict[str, Any] = {
        "parked": v.parked, "plugged_in": v.plugged_in, "soc_pct": v.soc_pct,
        "charge_limit_pct": v.charge_limit_pct, "network": v.network,
        "metered": {"yes": True, "no": False, "unknown": None}[v.metered],
    }
    if v.departure_daily:
        values["departure_daily"] = v.departure_daily
    return StaticProvider.from_config(values, where="config [vehicle]")


def policy_config(config: Config) -> P.PolicyConfig:
    p = config.policy
    return P.PolicyConfig(
        battery_floor_pct=p.battery_floor_pct, charge_limit_margin_pct=p.charge_limit_margin_pct,
        max_battery_temp_c=p.max_battery_temp_c, max_cabin_temp_c=p.max_cabin_temp_c,
        require_unmetered=p.require_unmetered, quiet_hours=p.quiet_hours,
        excluded_tariff_windows=p.excluded_tariff_windows,
        departure_margin_s=p.departure_margin_s, resume_after_s=p.resume_after_s,
        cpu_share=p.cpu_share, max_threads=p.max_threads,
        daily_energy_budget_wh=p.daily_energy_budget_wh or None,
        daily_transfer_cap_mb=p.daily_transfer_cap_mb or None,
        power_w=p.power_w, leaving_flush_cap_kb=p.leaving_flush_cap_kb,
    )


def peer_budget_limits(node: Any) -> BudgetLimits:
    """The per-peer byte budgets of the [node] settings (core/peer_budget.py)."""
    per_minute = int(node.peer_budget_mb_per_minute * MB)
    per_day = int(node.peer_budget_mb_per_day * MB)
    if per_day < per_minute:
        raise ConfigError(
            f"node.peer_budget_mb_per_day = {node.peer_budget_mb_per_day:g} is below "
            f"node.peer_budget_mb_per_minute = {node.peer_budget_mb_per_minute:g}: a day's "
            "budget must hold at least a minute's", key="node.peer_budget_mb_per_day")
    return BudgetLimits(per_minute=per_minute, per_day=per_day)


def utc_offset_s(at: float) -> int:
    off = time.localtime(at).tm_gmtoff
    return int(off or 0)


def memory_mb(configured: int = 0) -> int:
    """The memory a sandbox child really gets, offered as the node's: `configured`
    (hardware.memory_mb) or, when 0, a quarter of RAM or of the cgroup limit; either way at
    most this process's own hard RLIMIT_AS, which the sandbox clamps its children to."""
    from ..exec.sandbox import measured_memory_mb, own_hard_limit

    if not configured:
        return measured_memory_mb()
    own = own_hard_limit("RLIMIT_AS")
    return configured if own is None else min(configured, own >> 20)


def public_addrs(addrs: list[str], allow_private: bool) -> tuple[str, ...]:
    """Addresses fit for the public record: no private, loopback or link-local ones unless
    the owner allows them (test networks)."""
    out = []
    for text in addrs:
        try:
            ma = multiaddr.Multiaddr(text)
            ip = ma.value_for_protocol("ip4") if "ip4" in [p.name for p in ma.protocols()] else \
                ma.value_for_protocol("ip6")
            addr = ipaddress.ip_address(ip)
        except Exception:  # noqa: BLE001 - dns names and odd transports: skip
            continue
        if addr.is_unspecified:
            continue
        if not allow_private and not addr.is_global:  # private, loopback, CGNAT 100.64/10, ...
            continue
        out.append(text.split("/p2p/")[0])
    return tuple(out[:8])


@dataclass
class NodeStatus:
    started_at: float
    in_mesh: bool = False
    record_state: str = "offline"
    last_record_seq: int | None = None
    mesh_joins: int = 0
    mesh_leaves: int = 0
    last_error: str | None = None
    history: list[tuple[float, str]] = field(default_factory=list)


class Node:
    def __init__(self, identity: Identity, config: Config, state: NodeState, *,
                 control_path: Path | None = None, provider: Any = None,
                 bootstrap: tuple[str, ...] = (), listen: tuple[str, ...] | None = None,
                 rng: random.Random | None = None, clock: Any = time.time,
                 cache_dir: Path | None = None, ledger_path: Path | None = None,
                 cheat: str = "", event_log: Path | None = None):
        self.identity = identity
        self.config = config
        self.cache_dir = cache_dir
        self.hw_class = bytes.fromhex(config.hardware.hw_class)
        self.bench = config.hardware.bench
        self.state = state
        self.control_path = control_path
        self.provider = provider if provider is not None else make_provider(config)
        # a trace the node loads itself replays from when the node starts watching the car
        # (see _run): hardware measurement and sandbox start-up take seconds, and a sped-up
        # trace would otherwise play its first events before anyone looks
        self._trace_from_policy_start = provider is None and isinstance(self.provider, TraceProvider)
        self.policy = P.Policy(policy_config(config))
        self.rng = rng or random.Random()
        self.clock = clock
        self.mesh_settings = MeshSettings(
            network=config.node.network,
            listen=listen or config.node.listen,
            bootstrap=tuple(config.node.bootstrap) + tuple(bootstrap),
            dht_mode=config.node.dht_mode,
            stable=StableRule(public_s=config.node.dht_server_after_s,
                              uptime_s=config.node.dht_server_uptime_s),
            mdns=config.node.mdns,
            relay_only=config.node.relay_only,
        )
        self.status = NodeStatus(started_at=clock())
        self.timeline = VehicleTimeline()  # for the owner's dashboard
        self.mesh: Mesh | None = None
        self._mesh_scope: trio.CancelScope | None = None
        self._mesh_done: trio.Event | None = None
        self._wake = trio.Event()
        self._stopping = False
        self._leaving = False  # set once a leaving record is made, until the next session
        self._events: list[Any] = []
        self.jobs: dict[tuple[bytes, bytes], dict] = {}
        self.traffic = traffic.install()
        self.metrics_addr: tuple[str, int] | None = None
        # over-budget peers' bytes never count toward the cap
        self.peer_budget = PeerBudget(time.monotonic, peer_budget_limits(config.node))
        self._traffic_reported = self.traffic.total
        self._energy_pending_wh = 0.0
        # one JSON line per policy event and its decisions (specs/event-log.md), replayable
        self.event_log = open(event_log, "a", encoding="utf-8") if event_log else None  # noqa: SIM115
        if self.event_log is not None:
            self.event_log.write(eventlog.header("policy", self.policy.config) + "\n")
        # beside it, the ledger's receipt decisions (the credit this node recorded)
        self.credit_log = (open(Path(event_log).with_name("credit-events.jsonl"), "a",  # noqa: SIM115
                                encoding="utf-8") if event_log else None)
        if self.credit_log is not None:
            self.credit_log.write(eventlog.header("credit", None) + "\n")
        self.ledger_path = ledger_path
        self.cheat = cheat
        self.worker: Worker | None = None
        self.blob_cache: Any = None
        self.blob_service: Any = None  # the mesh's blob service while in the mesh (a worker)

    # --- hardware ------------------------------------------------------------------------
    async def measure_hardware(self) -> None:
        """Fill the hardware class and benchmark the config leaves open (0 or empty) by
        running the canary and reference models in a child process (cached in cache_dir)."""
        hw = self.config.hardware
        self.hw_class = bytes.fromhex(hw.hw_class)
        self.bench = hw.bench
        if (self.hw_class and self.bench) or self.cache_dir is None:
            return
        threads = str(max(1, self.config.policy.max_threads))
        try:
            with trio.fail_after(60):
                proc = await trio.run_process(
                    [sys.executable, "-m", "p2pfleet.exec.hwclass", str(self.cache_dir), threads],
                    capture_stdout=True, capture_stderr=True)
            profile = json.loads(proc.stdout)
        except (trio.TooSlowError, OSError, ValueError, subprocess.CalledProcessError) as exc:
            log.warning("could not measure the hardware class and benchmark: %s", exc)
            return
        self.hw_class = self.hw_class or bytes.fromhex(profile["hw_class"])
        self.bench = self.bench or float(profile["bench"])
        self._note(f"hardware class {self.hw_class.hex()[:16]}..., bench {self.bench:g} samples/s"
                   + (" (cached)" if profile.get("cached") else ""))

    # --- records -------------------------------------------------------------------------
    def capacity_record(self, state: str, lifetime_s: int) -> bytes:
        now = self.clock()
        hw = self.config.hardware
        # exp never moves back: a replayed older record expires no later than this one
        seq, exp = self.state.next_record("capacity", int(now * 1000), lifetime_s * 1000,
                                          KINDS["capacity"].max_lifetime_ms)
        addrs = public_addrs(self.mesh.listen_addrs() if self.mesh else [],
                             self.config.node.publish_private_addrs)
        relayed = self.mesh.relays.addrs() if self.mesh and self.mesh.relays else []
        if relayed or self.config.node.relay_only:  # only the relay reaches us (§3)
            addrs = tuple(a for a in relayed
                          if public_addrs([a], self.config.node.publish_private_addrs))
        body = Capacity(
            seq=seq, exp=exp, sw_version=__version__, state=state,
            hw_class=self.hw_class, cores=hw.cores or (os.cpu_count() or 1),
            memory_mb=memory_mb(hw.memory_mb),
            bench=float(f"{self.bench:.2g}"),  # coarse: a precise figure fingerprints the car
            providers=(CPU_PROVIDER,),
            ort_version=ORT_VERSION, slots=self.worker.settings.slots if self.worker else 1,
            addrs=addrs,
        )
        self.status.last_record_seq = seq
        return seal(body, self.identity, self.config.node.network)

    async def publish_capacity(self, state: str) -> None:
        if self.mesh is None:
            return
        if self._leaving and state != "leaving":
            # a republish that began after the leaving record was made has a newer seq and
            # would replace it everywhere: the car would read "available" after it left
            return
        lifetime = (self.config.records.leaving_lifetime_s if state == "leaving"
                    else self.config.records.capacity_lifetime_s)
        try:
            await self.mesh.put_capacity(self.capacity_record(state, lifetime),
                                         known_first=state == "leaving")
            self.status.record_state = state
        except MeshError as exc:
            self.status.last_error = str(exc)
            log.warning("could not publish the capacity record: %s", exc)

    # --- the mesh session ----------------------------------------------------------------
    async def _mesh_session(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        done = trio.Event()
        self._mesh_done = done
        self._leaving = False  # a new session: records say what the car does again
        try:
            with trio.CancelScope() as scope:
                self._mesh_scope = scope
                task_status.started()
                delay = self.rng.uniform(0, self.config.node.state_jitter_s)
                await trio.sleep(delay)
                mesh = Mesh(self.identity, self.mesh_settings, self.state, clock=self.clock,
                            budget=self.peer_budget)
                blobs = self.blob_service = self._blob_service(mesh)
                if self.config.node.info_opt_in:  # else the info protocol is not offered
                    mesh.set_handler("info", self._info_handler())
                async with trio.open_nursery() as nursery:
                    await nursery.start(mesh.run)
                    self.mesh = mesh
                    self.status.in_mesh = True
                    self.status.mesh_joins += 1
                    self._note("joined the mesh")
                    nursery.start_soon(self._hear_jobs, mesh)
                    if self.worker is not None and blobs is not None:
                        await nursery.start(self.worker.run, mesh, blobs, self.heard_jobs)
                    await self.publish_capacity("available")  # stored locally at least
                    with trio.move_on_after(self.config.records.republish_s):
                        await mesh.table_ready.wait()  # a first peer, then table filled
                    while True:  # now it reaches the peers closest to our key
                        await self.publish_capacity(self.coarse_state())
                        # jittered, so republishing is no clock others can read a car by
                        with trio.move_on_after(self.config.records.republish_s
                                                * self.rng.uniform(0.9, 1.1)):
                            await mesh.relays.addrs_changed()  # our relayed address, at once
        finally:
            self.mesh = None
            self.status.in_mesh = False
            self._mesh_scope = None
            done.set()

    def _info_handler(self) -> Any:
        """Answer explorers' `info` streams with a signed node_info (net/info.py)."""
        def facts() -> InfoFacts:
            w = self.worker
            state = "available" if self.status.record_state == "offline" else self.status.record_state
            return InfoFacts(sw_version=__version__, state=state,
                             uptime_s=self.clock() - self.status.started_at,
                             shards_done=w.stats.shards_done if w else 0,
                             results_accepted=w.stats.receipts if w else 0)
        return info_handler(self.identity, self.config.node.network, facts,
                            next_seq=lambda now_ms: self.state.next_sequence("node_info", now_ms),
                            clock=self.clock)

    def _blob_service(self, mesh: Mesh) -> Any:
        if self.blob_cache is None or self.worker is None:
            return None
        from ..net.blobs import BlobService

        service = BlobService(mesh, self.blob_cache, authorize=self.worker.authorize_blob,
                              scores=self.worker.source_scores)
        service.install()
        return service  # its run() (re-announcing models) starts with the worker

    def coarse_state(self) -> str:
        """The public state: "busy" while a shard runs, else "available" (only at republish
        time, so the record is no precise log of the car's work)."""
        return "busy" if self.worker is not None and self.worker.running else "available"

    def heard_jobs(self) -> list[HeardJob]:
        """Announcements heard that have not expired, for the worker to choose from."""
        now_ms = int(self.clock() * 1000)
        out = []
        for held in self.jobs.values():
            opened = held["opened"]
            body = opened.body
            if body.exp <= now_ms:
                continue
            out.append(HeardJob(publisher=opened.signer, job_id=body.job_id,
                                shards_left=body.shards_left, requirements=body.requirements,
                                heard_at=held["heard_at"], addrs=tuple(body.addrs)))
        return out

    def offer(self) -> dict:
        """The capacity fields a work request states."""
        hw = self.config.hardware
        return {"hw_class": self.hw_class, "ort_version": ORT_VERSION, "bench": float(self.bench),
                "cores": hw.cores or (os.cpu_count() or 1), "memory_mb": memory_mb(hw.memory_mb),
                "providers": (CPU_PROVIDER,)}

    def _make_worker(self, pool: Any) -> Worker:
        from ..store.blobcache import BlobCache
        from ..store.ledger import Ledger

        c = self.config
        self.ledger = Ledger(self.ledger_path)
        if self.credit_log is not None:
            self.ledger.on_receipt = self._log_credit
        blob_mb = getattr(c.node, "blob_cache_mb", 1024)
        self.blob_cache = BlobCache(self.cache_dir / "blobs", int(blob_mb) * 2**20)
        settings = WorkerSettings(
            network=c.node.network, allow=tuple(key_from_peer_id(p) for p in c.publishers.allow),
            serve_anyone=c.publishers.serve_anyone, unpaid_cap=c.publishers.unpaid_cap,
            unpaid_cap_elapsed_ms=int(c.publishers.unpaid_time_cap_h * 3_600_000),
            retry_base_s=c.publishers.retry_base_s, backoff_base_s=c.publishers.retry_base_s,
            power_w=c.policy.power_w, cheat=self.cheat)
        if self.cheat:
            log.warning("this node CHEATS (%s): for demos and tests of verification only",
                        self.cheat)

        def used(wh: float) -> None:
            self._energy_pending_wh += wh
            self._wake.set()

        def meter() -> float | None:  # the provider's meter of the computer, if any
            state = self.provider.state_at(self.clock())
            return None if state is None else state.charger_energy_wh

        return Worker(self.identity, settings, self.ledger, self.blob_cache, pool,
                      offer=self.offer, clock=self.clock, rng=random.Random(self.rng.random()),
                      on_energy=used, note=self._note, meter=meter,
                      meter_min_share=getattr(self.provider, "meter_min_share", 0.0))

    async def _hear_jobs(self, mesh: Mesh) -> None:
        """Keep the announcements heard (newest per publisher and job), for choosing work."""
        async for opened in mesh.jobs:
            body = opened.body
            key = (opened.signer, body.job_id)
            held = self.jobs.get(key)
            if held is None or held["seq"] < body.seq:
                if held is None:
                    log.info("heard job %s of %s", body.job_id.hex()[:8], opened.signer.hex()[:8])
                self.jobs[key] = {"seq": body.seq, "heard_at": self.clock(), "opened": opened}
                if self.worker is not None:
                    self.worker.poke()
            while len(self.jobs) > MAX_JOBS_HELD:
                oldest = min(self.jobs, key=lambda k: self.jobs[k]["heard_at"])
                del self.jobs[oldest]

    async def _leave_mesh(self, may_send: bool = True) -> None:
        """Publish the leaving record (if the link may carry it), then stop the host."""
        scope, done = self._mesh_scope, self._mesh_done
        if scope is None:
            return
        self._leaving = True
        if self.mesh is not None and may_send:
            with trio.move_on_after(LEAVE_TIMEOUT_S) as leaving:
                leaving.shield = True
                await self.publish_capacity("leaving")
        scope.cancel()
        if done is not None:
            await done.wait()
        self.status.mesh_leaves += 1
        self.status.record_state = "offline"
        self._note("left the mesh")

    def _note(self, what: str) -> None:
        self.status.history.append((self.clock(), what))
        del self.status.history[:-50]
        log.info(what)

    # --- policy --------------------------------------------------------------------------
    def _feed(self, event: Any) -> list[Any]:
        self._events.append(event)
        del self._events[:-200]
        if self.event_log is None:
            return self.policy.handle(event)
        try:
            effects = self.policy.handle(event)
        except P.PolicyUsageError as exc:
            self.event_log.write(eventlog.record(event, refused=str(exc)) + "\n")
            self.event_log.flush()
            raise
        self.event_log.write(eventlog.record(event, effects) + "\n")
        self.event_log.flush()
        return effects

    def _log_credit(self, seen: Any, effects: list, refused: str | None) -> None:
        self.credit_log.write(eventlog.record(seen, effects, refused) + "\n")
        self.credit_log.flush()

    async def _apply(self, nursery: trio.Nursery, effects: list[Any]) -> float | None:
        wake = None
        for eff in effects:
            if isinstance(eff, P.JoinMesh):
                await nursery.start(self._mesh_session)
            elif isinstance(eff, P.LeaveMesh):
                # On a metered or lost link the policy allows no bytes: the record then
                # simply expires (records.capacity_lifetime_s) instead of saying "leaving".
                await self._leave_mesh(may_send=eff.flush_byte_cap > 0)
            elif isinstance(eff, P.StartComputing):
                self._note(f"computing allowed: {eff.threads} threads, {eff.cpu_share:g} CPU share")
                if self.worker is not None:
                    self.sandbox_pool.set_cpu_share(eff.cpu_share)
                    self.worker.allow(eff.threads, eff.cpu_share)
            elif isinstance(eff, P.StopComputing):
                self._note(f"computing stopped: {eff.reason}")
                if self.worker is not None:
                    if eff.hand_back:
                        await self.worker.halt(hand_back_reason(eff.code), hand_back=True)
                    else:  # let the running shard finish; stop asking for more
                        nursery.start_soon(self.worker.halt, "policy", False)
            elif isinstance(eff, P.WakeAt):
                wake = eff.at if wake is None else min(wake, eff.at)
        return wake

    async def _policy_loop(self, nursery: trio.Nursery) -> None:
        policy_wake: float | None = None
        while not self._stopping:
            now = self.clock()
            moved = (self.traffic.total - self.traffic.unattributed - self.peer_budget.not_counted()
                     - self._traffic_reported)
            if moved > 0:  # counts toward the daily transfer cap
                self._traffic_reported += moved
                await self._apply(nursery, self._feed(P.BytesTransferred(now, moved)))
            if self._energy_pending_wh > 0:  # counts toward the daily energy budget
                used, self._energy_pending_wh = self._energy_pending_wh, 0.0
                await self._apply(nursery, self._feed(P.EnergyUsed(now, used)))
            # a live provider without a state to trust gives StateUnavailable (vehicle/live.py)
            seen = observation(self.provider, now, utc_offset_s(now))
            if isinstance(seen, P.StateObserved):
                v = seen.vehicle_state
                self.timeline.note(now, v.soc_pct, v.plugged_in, v.parked)
            wake = await self._apply(nursery, self._feed(seen))
            if wake is not None:
                policy_wake = wake if policy_wake is None or policy_wake <= now else min(policy_wake, wake)
            candidates = [now + POLL_S]
            if policy_wake is not None and policy_wake > now:
                candidates.append(policy_wake)
            change = self.provider.next_change_after(now)
            if change is not None:
                candidates.append(change)
            self._wake = trio.Event()
            with trio.move_on_after(max(0.0, min(candidates) - self.clock())):
                await self._wake.wait()

    async def _owner(self, event_cls: type, nursery: trio.Nursery) -> None:
        await self._apply(nursery, self._feed(event_cls(self.clock())))
        self._wake.set()

    # --- control -------------------------------------------------------------------------
    def status_report(self) -> dict:
        now = self.clock()
        return {
            "peer_id": self.identity.peer_id,
            "network": self.config.node.network,
            "version": __version__,
            "uptime_s": round(now - self.status.started_at, 1),
            "computing": self.policy.computing,
            "in_mesh": self.status.in_mesh,
            "record_state": self.status.record_state,
            "record_seq": self.status.last_record_seq,
            "why": self.policy.status(now),
            "vehicle": provider_health(self.provider, now),  # a live provider's health line
            "reasons": [{"code": r.code, "text": r.text, "until": r.until}
                        for r in self.policy.reasons(now)],
            "listen_addrs": self.mesh.listen_addrs() if self.mesh else [],
            "peers": len(self.mesh.connected_peers()) if self.mesh else 0,
            # AutoNAT's verdict, why, and the DHT mode it set (net/reachability.py)
            **(self.mesh.reachable.report() if self.mesh and self.mesh.reachable else
               {"reachability": "unknown", "reachability_why": "not in the mesh", "dht_mode": None}),
            **(self.mesh.relays.report() if self.mesh and self.mesh.relays else {}),
            "jobs_heard": len(self.jobs),
            "work": self.work_report(),
            "metrics_addr": "%s:%d" % self.metrics_addr if self.metrics_addr else None,
            "bytes_sent": self.traffic.sent,
            "bytes_received": self.traffic.received,
            "bytes_refused": self.peer_budget.refused,  # from over-budget peers: not capped
            "bytes_capped": self._traffic_reported,  # counted toward the daily transfer cap
            "mesh_joins": self.status.mesh_joins,
            "mesh_leaves": self.status.mesh_leaves,
            "last_error": self.status.last_error,
            "history": [[t, what] for t, what in self.status.history[-10:]],
            **self.dashboard_report(now),
        }

    def dashboard_report(self, now: float) -> dict:
        """What the owner's dashboard draws beyond the status lines (p2pfleet/dashboard/)."""
        s, cfg = self.policy.state, self.policy.config
        v = s.vehicle
        return {
            "now": now,
            "vehicle_now": None if v is None else {
                "soc_pct": v.soc_pct, "charge_limit_pct": v.charge_limit_pct,
                "plugged_in": v.plugged_in, "parked": v.parked, "network": v.network,
                "metered": v.metered, "departure_at": v.departure_at},
            "timeline": list(self.timeline.points),
            "today": {"energy_wh": s.energy_wh, "energy_budget_wh": cfg.daily_energy_budget_wh,
                      "transfer_bytes": s.transfer_bytes,
                      "transfer_cap_bytes": cfg.transfer_cap_bytes},
            "quiet_hours": list(cfg.quiet_hours),
            "next_wake_at": s.wake_at,
        }

    def work_report(self) -> dict | None:
        if self.worker is None:
            return None
        w = self.worker
        return {**dataclasses.asdict(w.stats), "computing": w.computing,
                "running": [{"lease_id": r.lease.lease_id.hex(), "job_id": r.lease.job_id.hex(),
                             "shard": r.lease.shard} for r in w.running.values()]}

    async def _control(self, request: dict, nursery: trio.Nursery) -> dict:
        cmd = request["cmd"]
        if cmd == "status":
            return {"ok": True, **self.status_report()}
        if cmd == "peers":
            peers = self.mesh.connected_peers() if self.mesh else []
            return {"ok": True, "in_mesh": self.status.in_mesh, "peers": peers}
        if cmd == "jobs":
            return {"ok": True, "jobs": [self._job_view(v) for v in self.jobs.values()]}
        if cmd == "announce":
            return await self._announce(str(request.get("envelope_hex", "")))
        if cmd == "reach":
            return await self._reach(str(request.get("peer_id", "")))
        if cmd == "lookup":
            return await self._lookup(str(request.get("peer_id", "")))
        if cmd == "fetch_blob":
            return await self._fetch_blob(str(request.get("peer_id", "")),
                                          str(request.get("digest", "")), request.get("size"))
        if cmd == "pause":
            await self._owner(P.PauseRequested, nursery)
            return {"ok": True, **self.status_report()}
        if cmd == "resume":
            await self._owner(P.ResumeRequested, nursery)
            return {"ok": True, **self.status_report()}
        if cmd == "stop":
            if request.get("after_current"):
                await self._owner(P.StopAfterCurrent, nursery)
            nursery.start_soon(self.stop)
            return {"ok": True, "stopping": True}
        return {"ok": False, "error": f"unknown command {cmd!r}; known: status, peers, lookup, "
                                      "reach, fetch_blob, jobs, announce, pause, resume, stop"}

    @staticmethod
    def _job_view(held: dict) -> dict:
        opened = held["opened"]
        body = opened.body
        return {"publisher": peer_id_from_key(opened.signer), "job_id": body.job_id.hex(),
                "seq": body.seq, "heard_at": held["heard_at"], "quorum": body.quorum,
                "shards_total": body.shards_total, "shards_left": body.shards_left,
                "credit_rate": body.credit_rate, "model_digest": body.model_digest.hex()}

    async def _announce(self, envelope_hex: str) -> dict:
        """Gossip a signed job announcement (the publisher side uses this until the SDK)."""
        if self.mesh is None:
            return {"ok": False, "error": "the node is out of the mesh (see 'node status')"}
        try:
            envelope = bytes.fromhex(envelope_hex)
            await self.mesh.announce_job(envelope)
        except (ValueError, MeshError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "sent_at": self.clock()}

    def _peer_request_error(self, peer_id: str) -> dict | None:
        """The error reply to a control request about `peer_id`, if it cannot be made."""
        if self.mesh is None:
            return {"ok": False, "error": "the node is out of the mesh (see 'node status')"}
        try:
            key_from_peer_id(peer_id)
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        return None

    async def _reach(self, peer_id: str) -> dict:
        """Dial a peer at the addresses of its capacity record (a private one: through its
        relay) and ask it for its node_info; says which address answered and how."""
        refused = self._peer_request_error(peer_id)
        if refused is not None:
            return refused
        opened = await self.mesh.get_capacity(peer_id)
        if opened is None:
            return {"ok": False, "error": f"no capacity record of {peer_id} found"}
        errors = []
        for addr in opened.body.addrs:
            try:
                await self.mesh.host.get_network().close_peer(ID.from_base58(peer_id))
                await self.mesh.connect(f"{addr}/p2p/{peer_id}")
            except (MeshError, ValueError) as exc:
                errors.append(str(exc))
                continue
            conns = self.mesh.host.get_network().get_connections(ID.from_base58(peer_id))
            reply = await fetch_node_info(self.mesh, peer_id)
            known = self.mesh.host.get_peerstore().addrs(ID.from_base58(peer_id))
            return {"ok": True, "peer_id": peer_id, "addr": addr,
                    "relayed": bool(conns) and all(is_relayed(c) for c in conns),
                    "info": "ok" if reply.opened is not None else reply.error,
                    "known_addrs": sorted(str(a) for a in known)}  # what it told us, too
        return {"ok": False, "error": f"no address of {peer_id} answered: "
                                      f"{'; '.join(errors) or 'its record lists none'}"}

    async def _fetch_blob(self, peer_id: str, digest_hex: str, size: Any) -> dict:
        """Fetch a public blob from one peer only (an operator's check that a direct
        connection carries bulk data: blobs never cross a relay); says how we were
        connected to it when the fetch ended."""
        if self.mesh is None or self.blob_service is None:
            return {"ok": False, "error": "no blob service: the node is out of the mesh or "
                                          "does not compute (see 'node status')"}
        try:
            key_from_peer_id(peer_id)
            digest = bytes.fromhex(digest_hex)
            if len(digest) != 32 or not isinstance(size, int) or size < 0:
                raise ValueError("digest must be 64 hex digits (SHA-256), size bytes >= 0; "
                                 f"got {digest_hex!r:.80}, {size!r:.40}")
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        from ..net.blobs import BlobError

        try:
            data = await self.blob_service.fetch(digest, size, [peer_id], public=True,
                                                 timeout=60.0)
        except BlobError as exc:
            return {"ok": False, "error": str(exc)}
        conns = self.mesh.host.get_network().get_connections(ID.from_base58(peer_id))
        return {"ok": True, "peer_id": peer_id, "bytes": len(data),
                "direct": any(not is_relayed(c) for c in conns)}

    async def _lookup(self, peer_id: str) -> dict:
        refused = self._peer_request_error(peer_id)
        if refused is not None:
            return refused
        opened = await self.mesh.get_capacity(peer_id)
        stats = self.mesh.last_lookup
        cost = {"rounds": stats.rounds, "rpcs": stats.rpcs, "responses": stats.responses}
        if opened is None:
            return {"ok": True, "found": False, "peer_id": peer_id, "lookup": cost}
        body = opened.body
        return {"ok": True, "found": True, "peer_id": peer_id, "lookup": cost, "record": {
            "seq": body.seq, "exp": body.exp, "state": body.state, "sw_version": body.sw_version,
            "hw_class": body.hw_class.hex(), "ort_version": body.ort_version, "cores": body.cores, "memory_mb": body.memory_mb,
            "bench": body.bench, "providers": list(body.providers), "slots": body.slots,
            "addrs": list(body.addrs)}}

    # --- lifecycle -----------------------------------------------------------------------
    async def stop(self) -> None:
        """Leave the mesh (publishing the leaving record) and end `run()`."""
        if self._stopping:
            return
        self._stopping = True
        if self.worker is not None:
            await self.worker.halt("shutdown", hand_back=True, timeout=LEAVE_TIMEOUT_S)
        await self._leave_mesh()
        self._root.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.warning("received %s: leaving the mesh and stopping",
                            signal.Signals(signum).name)
                await self.stop()
                return

    async def run(self, *, handle_signals: bool = True,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped. With a ledger and a cache the node computes (a sandbox pool,
        the worker); without, it only takes part in the mesh."""
        if self.ledger_path is None or self.cache_dir is None:
            await self._run(handle_signals, task_status)
            return
        from ..exec.sandbox import open_sandbox_pool, sandbox_config

        async with open_sandbox_pool(sandbox_config(self.config)) as pool:
            self.sandbox_pool = pool
            self.worker = self._make_worker(pool)
            try:
                await self._run(handle_signals, task_status)
            finally:
                self.ledger.close()

    async def _run(self, handle_signals: bool, task_status: Any) -> None:
        async with trio.open_nursery() as nursery:
            self._root = nursery
            if handle_signals:
                nursery.start_soon(self._signals)
            # the provider first: once `status` answers, a charger can connect (its port is bound)
            if callable(getattr(self.provider, "run", None)):  # a live provider polls in the background
                self.provider.on_update = lambda: self._wake.set()
                try:
                    await nursery.start(self.provider.run)
                except OcppServerError as exc:  # e.g. ocpp.listen is taken
                    raise NodeError(str(exc)) from None
            if self.control_path is not None:
                await nursery.start(serve_control, self.control_path,
                                    lambda req: self._control(req, nursery))
            if self.config.node.metrics_listen:
                host, _, port = self.config.node.metrics_listen.rpartition(":")
                try:
                    self.metrics_addr = await nursery.start(serve_metrics, host, int(port),
                                                            self.status_report)
                except OSError as exc:
                    raise NodeError(f"node.metrics_listen {self.config.node.metrics_listen}: "
                                    f"{exc.strerror or exc}") from None
            await self.measure_hardware()
            if self._trace_from_policy_start:
                self.provider.t0 = self.clock()
            nursery.start_soon(self._policy_loop, nursery)
            task_status.started(self)

