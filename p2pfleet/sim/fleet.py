"""The fleet simulator: a vehicle population, its publishers and the links between them,
in virtual time (issue 16, item 1).

Every vehicle runs the real vehicle policy (`p2pfleet.core.policy.Policy`) on its day from
sim/population.py; every publisher is a `verification.Sim` (the real
`core.scheduler.Scheduler`, its outputs, cheats and known answers) whose events this loop
schedules. A publisher's group (it and the vehicles that chose it) never meets another, so
the groups are played one after another, each on a heap of its events ordered by (virtual
ms, sequence number); each randomness comes from the seed, and what is drawn while playing
from the group's own generators. Pure: no clock, no I/O (the caller loads the traces).

What the loop adds to verification.Sim:
- Vehicles ask for work only while their policy computes (`StartComputing` .. the next
  `StopComputing`), after joining the mesh (`join_ms`). A stop hands back every running
  lease (`HandedBack`); its compute so far is "work lost to unplugging" (partial
  micro-batches are not credited in this model).
- Links (`LINKS`): a request or a result costs a round trip, plus a resend after a
  timeout for each loss (drawn per message). A lease's input comes from the publisher
  through its uplink, a FIFO shared by all its vehicles (`uplink_bytes_per_s`), then the
  vehicle's downlink; its model, the first time, from another vehicle when the vehicle can
  be dialled (reachable or hole punched) and one already has it, else through the uplink.
- Energy: `core.energy.estimate_wh` of the compute time, sent to the policy as
  `EnergyUsed` with the bytes moved (`BytesTransferred`), so budgets and caps bind.
- Scenario knobs (tools/scenarios/), all off by default and drawing from their own seeded
  generators, so a run without them is the run it was: `churn` (a share of cars unplug at
  a random moment of a lease, stay away a while and plug in again: the policy sees
  `plugged_in` false and stops), `partition` (for a window, a share of cars cannot reach
  their publisher: their messages arrive when it heals) and `uplink_bytes_per_s`.

Time: ms after local midnight of day 0; the policy gets Unix seconds `T0 + ms / 1000`
and the UTC offset of the traces' time zone (+02:00).
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import math
import random
from array import array
from dataclasses import dataclass, field

from p2pfleet.core import energy as E
from p2pfleet.core import policy as P
from p2pfleet.core import scheduler as S
from p2pfleet.core import trust as T

from . import verification as V
from .population import VEHICLE_KEYS, Assumptions, Trace, VehicleSpec, population

T0 = 1_717_365_600          # 2024-06-03T00:00:00+02:00, the commuter trace's first midnight
UTC_OFFSET_S = 7200
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
RESEND_MS = 1000            # a lost message is sent again after this


@dataclass(frozen=True)
class LinkClass:
    latency_ms: int          # one way
    down_bytes_per_s: float
    up_bytes_per_s: float
    loss: float              # per message


# Typical values (assumptions): home Wi-Fi reaching a garage, wired, LTE.
LINKS = {
    "wifi": LinkClass(20, 3e6, 1.5e6, 0.01),
    "ethernet": LinkClass(5, 12.5e6, 12.5e6, 0.001),
    "cellular": LinkClass(50, 2e6, 0.7e6, 0.02),
}

# Cheater kinds of sim/verification.py, in turn; "sybil" shares one /24 per publisher.
CHEATS: tuple[tuple[str, V.Cheat], ...] = (
    ("random", V.Cheat("random")),
    ("fp16", V.Cheat("fp16")),
    ("copy", V.Cheat("copy")),
    ("rows", V.Cheat("rows", rows=1)),
    ("strategic", V.Cheat("fp16", established=True)),
    ("colluder", V.Cheat("rows", rows=1, group="c", established=True, when="together")),
    ("sybil", V.Cheat("fp16")),
)


@dataclass(frozen=True)
class Workload:
    """Each publisher's work: 32-row shards (~10 min on a car computer), submitted as a
    stream of jobs of `job_shards` shards (the last takes the rest), `jobs_live` of them
    live at a time: when one is done the publisher forgets it and submits the next, so its
    scheduler holds only the jobs in flight (docs/manual.md, Simulator). `job_shards`
    None: the whole day's work is one job, held all day."""

    samples: int = 32
    credit: int = 10
    quorum: int = 2
    model_bytes: int = 20_000_000
    input_bytes: int = 2_000_000
    result_bytes: int = 64_000
    recheck_rate: float = 0.07
    shards_per_vehicle_hour: float = 2.5   # work size: enough that the fleet never runs out
    job_shards: int | None = 250           # about an hour of 100 cars' work at night
    jobs_live: int = 2                      # the next job is there before one ends

    def __post_init__(self) -> None:
        if self.job_shards is not None and (not isinstance(self.job_shards, int)
                                            or self.job_shards < 1):
            raise ValueError(f"Workload.job_shards: must be an integer >= 1 or None, got "
                             f"{self.job_shards!r}")
        if not isinstance(self.jobs_live, int) or self.jobs_live < 1:
            raise ValueError(f"Workload.jobs_live: must be an integer >= 1, got "
                             f"{self.jobs_live!r}")


@dataclass(frozen=True)
class FleetConfig:
    vehicles: int
    hours: float = 24.0
    cheaters: float = 0.0               # share of vehicles that cheat (kinds in turn)
    cheat_kinds: tuple[str, ...] = tuple(k for k, _ in CHEATS)
    seed: int = 1
    per_publisher: int = 100            # vehicles choosing each publisher
    # The scheduler's window of open shards a request is ranked over (SchedulerSettings;
    # 256 by default). A request costs O(window): 32 serves 100 vehicles per publisher.
    window: int = 32
    uplink_bytes_per_s: float = 12.5e6  # each publisher's uplink: 100 Mbit/s
    churn: float = 0.0                  # share of cars that unplug at random moments
    churn_per_lease: float = 0.5        # chance a churning car unplugs during a lease
    churn_away_s: tuple[int, int] = (300, 3600)  # how long it stays unplugged (uniform)
    # (start hour, seconds, share of cars cut off from their publisher), or None
    partition: tuple[float, float, float] | None = None
    veterans: float = 0.8               # identities established before the run
    join_ms: int = 5_000                # joining the mesh before the first request
    bin_s: int = 900                    # capacity is counted in bins of this length
    workload: Workload = Workload()
    assumptions: Assumptions = Assumptions()
    policy: P.PolicyConfig = P.PolicyConfig(state_max_age_s=None, recheck_s=None)

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> None:
            raise ValueError(f"FleetConfig.{name}: must be {want}, got {getattr(self, name)!r}")
        if not isinstance(self.vehicles, int) or self.vehicles < 1:
            bad("vehicles", "an integer >= 1")
        if not (isinstance(self.hours, (int, float)) and 0 < self.hours <= 24 * 14):
            bad("hours", "a number of hours above 0 and at most 336")
        if not (isinstance(self.cheaters, (int, float)) and 0 <= self.cheaters < 1):
            bad("cheaters", "a share from 0 to below 1")
        unknown = set(self.cheat_kinds) - {k for k, _ in CHEATS}
        if unknown or not self.cheat_kinds:
            bad("cheat_kinds", f"some of {', '.join(k for k, _ in CHEATS)}")
        if not 0 <= self.veterans <= 1:
            bad("veterans", "a share from 0 to 1")
        if self.per_publisher < 1:
            bad("per_publisher", "an integer >= 1")
        if self.window < 1:
            bad("window", "an integer >= 1")
        if not (isinstance(self.uplink_bytes_per_s, (int, float))
                and self.uplink_bytes_per_s > 0):
            bad("uplink_bytes_per_s", "a number of bytes per second above 0")
        if not (isinstance(self.churn, (int, float)) and 0 <= self.churn <= 1):
            bad("churn", "a share from 0 to 1")
        if not (isinstance(self.churn_per_lease, (int, float))
                and 0 < self.churn_per_lease <= 1):
            bad("churn_per_lease", "a probability above 0 and at most 1")
        lo_hi = self.churn_away_s
        if not (len(lo_hi) == 2 and 1 <= lo_hi[0] <= lo_hi[1]):
            bad("churn_away_s", "(min, max) seconds with 1 <= min <= max")
        if self.partition is not None:
            try:
                start_h, secs, share = self.partition
            except (TypeError, ValueError):
                start_h = secs = share = -1
            if not (0 <= start_h < self.hours and secs > 0 and 0 < share <= 1):
                bad("partition", f"(start hour in [0, {self.hours:g}), seconds > 0, "
                                 "share of cars in (0, 1])")


@dataclass(eq=False)
class Car(V.Worker):
    """A vehicle: verification's worker plus its day, its policy and its counters."""

    idx: int = 0
    spec: VehicleSpec | None = None
    policy: P.Policy | None = None
    pub: "Publisher | None" = None
    kind: str = "honest"
    state_i: int = 0
    computing: bool = False
    computing_since: int = 0
    wake_ms: int = -1
    has_model: bool = False
    running: dict[bytes, tuple[int, int]] = field(default_factory=dict)  # lease: start, done
    busy_ms: int = 0
    lost_ms: int = 0
    energy_wh: float = 0.0
    credit: int = 0
    bytes: int = 0
    churns: bool = False          # unplugs at random moments (FleetConfig.churn)
    cut_off: bool = False         # on the far side of the partition
    away_until: int = -1          # unplugged by churn until then


class Publisher(V.Sim):
    """verification.Sim whose events go to the fleet's heap, with links and stop rules."""

    def __init__(self, fleet: "Fleet", index: int, seed: int, shards: int, cars: list[Car],
                 job: V.SimJob):
        self.fleet = fleet
        self.index = index
        self.uplink_free = 0             # when the uplink has sent what is queued
        self.uplink_bytes = 0
        self.dropped: set[bytes] = set()  # leases handed back by a stopping vehicle
        # Draws made while playing: the publisher's own, so that groups played one after
        # another (Fleet.run) draw what they would on a shared heap.
        self.link_rng = random.Random(f"links {fleet.cfg.seed} {index}")
        self.churn_rng = random.Random(f"churn {fleet.cfg.seed} {index}")
        wl = fleet.cfg.workload
        super().__init__(seed, shards, list(cars), job=job, trust=V.DEFAULT_TRUST,
                         settings=S.SchedulerSettings(window=fleet.cfg.window), max_days=10**6,
                         job_shards=wl.job_shards, jobs_live=wl.jobs_live)
        self.handled = 0                 # scheduler events handled (core handle() calls)
        self.no_work = 0                 # requests refused for want of work
        self.m.sink = self._handled

    def _handled(self, _ev: object) -> None:
        self.handled += 1

    def _push(self, at: int, kind: str, *data: object) -> None:
        if kind == "result":
            w, g, _key = data
            at = self.fleet.transfer(self, w, g, at)
        self.fleet.push(at, "pub", self, kind, data)

    def _ask_at(self, w: Car, at: int) -> None:
        if w.computing and not w.asking:
            w.asking = True
            arrives = at + self.fleet.message_ms(w)
            if w.cut_off:
                arrives = self.fleet.reach(w, arrives)
            self.fleet.push(arrives, "pub", self, "ask", (w,))

    def apply(self, effects: list) -> None:
        super().apply(effects)
        for e in effects:
            if isinstance(e, S.Pay):
                self.by_key[e.worker].credit += e.credit
            elif isinstance(e, S.Refuse) and e.reason == "no_work":
                self.no_work += 1
            elif isinstance(e, S.ShardAccepted):
                first = min(l.issued_ms for l in self.m.shard_leases(e.job_id, e.shard))
                self.fleet.ttr_ms.append(self.now - first)


class Fleet:
    """One run: `Fleet(config, traces).run()`, then `summary()`."""

    def __init__(self, cfg: FleetConfig, traces: dict[str, Trace]):
        self.cfg = cfg
        self.rng = random.Random(f"fleet {cfg.seed}")
        specs = population(cfg.vehicles, traces, random.Random(f"population {cfg.seed}"),
                           cfg.assumptions)
        self.end_ms = int(cfg.hours * HOUR_MS)
        self.now = 0
        self._heap: list = []
        self._seq = 0
        self.events = 0
        self.policy_calls = 0
        self.ttr_ms = array("q")         # time to result per accepted shard (8 B each)
        self.seeders: set[int] = set()   # publishers whose model a dialable car holds
        nbins = math.ceil(self.end_ms / (cfg.bin_s * 1000))
        # ms per bin, integers: the sums do not depend on the order the groups are played in
        self.available_ms = [0] * nbins
        self.used_ms = [0] * nbins
        self.cars = self._cars(specs)
        self.publishers = self._publishers()
        # The scenario knobs draw from generators of their own: the default run's draws
        # stay the same.
        churn_rng = random.Random(f"churn {cfg.seed}")
        self.unplugs = 0
        for c in self.cars:
            c.churns = cfg.churn > 0 and churn_rng.random() < cfg.churn
        self.cut_window = (0, 0)
        if cfg.partition is not None:
            start_h, secs, share = cfg.partition
            self.cut_window = (int(start_h * HOUR_MS), int(start_h * HOUR_MS + secs * 1000))
            cut = random.Random(f"partition {cfg.seed}")
            for c in self.cars:
                c.cut_off = cut.random() < share

    # --- set-up ----------------------------------------------------------------------
    def _cars(self, specs: list[VehicleSpec]) -> list[Car]:
        cfg = self.cfg
        n_cheat = round(cfg.cheaters * cfg.vehicles)
        cheat_at = set(self.rng.sample(range(cfg.vehicles), n_cheat))
        kinds = dict(CHEATS)
        cars, k = [], 0
        for i, spec in enumerate(specs):
            kind, cheat = "honest", None
            if i in cheat_at:
                kind = cfg.cheat_kinds[k % len(cfg.cheat_kinds)]
                cheat, k = kinds[kind], k + 1
            prefix = f"{10 + i // 65536}.{(i // 256) % 256}.{i % 256}.0/24"
            if kind == "sybil":
                prefix = f"172.31.{(i // cfg.per_publisher) % 256}.0/24"
            cars.append(Car(f"v{i}", prefix, cheat=cheat, hw_class=spec.hw_class.encode(),
                            bench=spec.bench, slots=1, idx=i, spec=spec,
                            policy=P.Policy(cfg.policy), kind=kind))
        return cars

    def _publishers(self) -> list[Publisher]:
        cfg, wl = self.cfg, self.cfg.workload
        job = V.SimJob(samples=wl.samples, credit=wl.credit, quorum=wl.quorum,
                       recheck_rate=wl.recheck_rate)
        pubs = []
        for p in range(math.ceil(cfg.vehicles / cfg.per_publisher)):
            group = self.cars[p * cfg.per_publisher:(p + 1) * cfg.per_publisher]
            shards = math.ceil(len(group) * cfg.hours * wl.shards_per_vehicle_hour) + 16
            seed = int.from_bytes(hashlib.sha256(f"{cfg.seed} {p}".encode()).digest()[:6], "big")
            pub = Publisher(self, p, seed, shards, group, job)
            for c in group:
                c.pub = pub
                if self.rng.random() < cfg.veterans:
                    # The fleet ran before: a veteran's trust record, as restore() loads it.
                    pub.m.workers[c.key] = T.WorkerTrust(c.key, accepted=10,
                                                         first_valid_ms=-2 * DAY_MS)
            pubs.append(pub)
        return pubs

    # --- the loop --------------------------------------------------------------------
    def push(self, at: int, kind: str, *data: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (int(at), self._seq, kind, data))

    def run(self, progress=None, together: bool = False) -> "Fleet":
        """Play the run out; `progress(done, total)` is called as it goes (in vehicle-ms
        simulated).

        A publisher and its vehicles never meet another group: each group is played alone,
        one after another, on a heap of its own (`together`: all on one heap, in one pass;
        the same events in the same order per group, so the same summary, and the test of
        that). A heap of one group's events is small and its records stay in the cache, so
        the time per vehicle stays flat with the fleet's size (8,000 vehicles x 24 h: 57.7
        against 72.4 s of CPU on one heap).

        The cyclic garbage collector is paused meanwhile (and restored): the run makes no
        reference cycles (tests/sim/test_fleet_gc.py checks it), and with millions of
        records alive the collector's passes over them were a tenth of the CPU time."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            groups = [self.publishers] if together else [[p] for p in self.publishers]
            done, total = 0, len(self.cars) * self.end_ms
            for group in groups:
                cars = [c for p in group for c in p.workers]
                self._play(cars, progress, done, total)
                done += len(cars) * self.end_ms
            if progress is not None:
                progress(total, total)
            return self
        finally:
            if collecting:
                gc.enable()

    def _play(self, cars: list[Car], progress, done: int, total: int) -> None:
        """Play the days of `cars` (whole groups: their publishers' events come with them)."""
        self._heap, self.now = [], 0
        for c in cars:
            self.push(0, "state", c)
        step, next_report = 5 * 60_000, 0
        heap, end = self._heap, self.end_ms
        while heap and heap[0][0] <= end:
            at, _seq, kind, data = heapq.heappop(heap)
            self.now = at
            self.events += 1
            if progress is not None and at >= next_report:
                progress(done + at * len(cars), total)
                next_report = at + step
            if kind == "pub":
                self._pub_event(at, *data)
            elif kind == "state":
                self._state(data[0])
            elif kind == "wake":
                c = data[0]
                if c.wake_ms == at:
                    c.wake_ms = -1
                    self._policy(c, P.Tick(T0 + at / 1000, UTC_OFFSET_S))
            elif kind == "unplug":
                self._unplug(data[0])
            elif kind == "replug":
                c = data[0]
                if c.away_until == at:
                    c.away_until = -1
                    self._observe(c, c.spec.day.states[c.state_i - 1][1])
        self.now = end
        for c in cars:
            if c.computing:
                self._count(self.available_ms, c.computing_since, end)
            for start, stop in c.running.values():
                if start < end:
                    self._count(self.used_ms, start, min(stop, end))
        self._heap = []

    def _pub_event(self, at: int, pub: Publisher, kind: str, data: tuple) -> None:
        pub.now = max(pub.now, at)
        if kind == "ask" and not data[0].computing:
            data[0].asking = False
            return
        if kind == "late" and data[1].lease_id in pub.dropped:
            return
        if kind == "result":
            c, g = data[0], data[1]
            span = c.running.pop(g.lease_id, None)
            if span is not None and g.lease_id in c.busy:
                self._computed(c, span[0], span[1], at, lost=False)
        pub.dispatch(kind, data)

    def _state(self, c: Car) -> None:
        states = c.spec.day.states
        t_day, values = states[c.state_i]
        self._observe(c, values)
        c.state_i += 1
        if c.state_i >= len(states):
            c.state_i = 0
            nxt = (self.now // DAY_MS + 1) * DAY_MS
        else:
            nxt = (self.now // DAY_MS) * DAY_MS + states[c.state_i][0] * 1000
        self.push(nxt, "state", c)

    def _observe(self, c: Car, values: tuple) -> None:
        """The policy observes the state `values` of the car's day, now."""
        vs = dict(zip(VEHICLE_KEYS, values))
        day0 = (self.now // DAY_MS) * DAY_MS // 1000
        if vs["departure_at"] is not None:
            vs["departure_at"] = T0 + day0 + vs["departure_at"]
        if c.away_until > self.now:  # unplugged by churn: the day's plug-ins wait
            vs["plugged_in"] = False
        self._policy(c, P.StateObserved(T0 + self.now / 1000, P.VehicleState(**vs),
                                        UTC_OFFSET_S))

    def _unplug(self, c: Car) -> None:
        """Churn: the cable comes out mid-lease; it goes back in after a drawn pause."""
        if not c.computing or c.away_until > self.now:
            return
        self.unplugs += 1
        lo, hi = self.cfg.churn_away_s
        c.away_until = self.now + 1000 * c.pub.churn_rng.randint(lo, hi)
        self._observe(c, c.spec.day.states[c.state_i - 1][1])
        self.push(c.away_until, "replug", c)

    def _policy(self, c: Car, ev: object) -> None:
        self.policy_calls += 1
        for e in c.policy.handle(ev):
            if isinstance(e, P.StartComputing):
                c.computing, c.computing_since = True, self.now
                c.pub._ask_at(c, self.now + self.cfg.join_ms)
            elif isinstance(e, P.StopComputing):
                if c.computing:
                    self._count(self.available_ms, c.computing_since, self.now)
                c.computing = False
                if e.hand_back:
                    self._hand_back(c)
            elif isinstance(e, P.WakeAt):
                ms = max(self.now, math.ceil((e.at - T0) * 1000))
                if c.wake_ms < 0 or ms < c.wake_ms or c.wake_ms < self.now:
                    c.wake_ms = ms
                    self.push(ms, "wake", c)

    def _hand_back(self, c: Car) -> None:
        pub = c.pub
        for lid in list(c.busy):
            del c.busy[lid]
            span = c.running.pop(lid, None)
            if span is not None and span[0] < self.now:
                self._computed(c, span[0], min(span[1], self.now), self.now, lost=True)
            pub.dropped.add(lid)
            if pub.m.leases[lid].state == "live":
                pub.now = max(pub.now, self.now)
                pub.apply(pub.m.handle(S.HandedBack(self.now, lid, c.key)))

    def _computed(self, c: Car, start: int, done: int, now: int, lost: bool) -> None:
        busy = max(0, done - start)
        c.busy_ms += busy
        if lost:
            c.lost_ms += busy
        self._count(self.used_ms, start, done)
        wh = E.estimate_wh(self.cfg.policy.power_w, self.cfg.policy.cpu_share, busy / 1000)
        c.energy_wh += wh
        at = T0 + now / 1000
        if c.policy.state.at is None or at >= c.policy.state.at:
            self._policy(c, P.EnergyUsed(at, wh))
            self._policy(c, P.BytesTransferred(at, self._bytes_of(c, lost)))

    def _bytes_of(self, c: Car, lost: bool) -> int:
        wl = self.cfg.workload
        return wl.input_bytes + (0 if lost else wl.result_bytes)

    def _count(self, bins: list[int], start: int, end: int) -> None:
        size = self.cfg.bin_s * 1000
        start, end = max(0, start), min(end, self.end_ms)
        while start < end:
            b = start // size
            stop = min(end, (b + 1) * size)
            bins[b] += stop - start
            start = stop

    # --- links -----------------------------------------------------------------------
    def _link(self, c: Car) -> LinkClass:
        net = c.policy.state.vehicle.network if c.policy.state.vehicle else "wifi"
        return LINKS.get(net, LINKS["cellular"])

    def message_ms(self, c: Car) -> int:
        """A request and its answer: a round trip, and a resend for each loss."""
        link = self._link(c)
        ms = 2 * link.latency_ms
        while c.pub.link_rng.random() < link.loss:
            ms += RESEND_MS
        return ms

    def transfer(self, pub: Publisher, c: Car, g: S.LeaseGrant, result_at: int) -> int:
        """When the result of lease `g` reaches `pub`, computed in `result_at - now` ms
        once the inputs (and the model, the first time) have arrived; records the span."""
        wl, link, now = self.cfg.workload, self._link(c), pub.now
        compute = result_at - now
        send = wl.input_bytes
        if not c.has_model:
            c.has_model = True
            if not (c.spec.direct and pub.index in self.seeders):
                send += wl.model_bytes
            if c.spec.reachable or c.spec.direct:
                self.seeders.add(pub.index)
        # the uplink is a FIFO shared by all the publisher's vehicles
        start = max(now, pub.uplink_free)
        pub.uplink_free = start + int(1000 * send / self.cfg.uplink_bytes_per_s)
        pub.uplink_bytes += send
        arrived = max(pub.uplink_free, now + int(1000 * send / link.down_bytes_per_s))
        arrived += self.message_ms(c)
        if c.cut_off:
            arrived = self.reach(c, arrived)
        done = arrived + compute
        c.running[g.lease_id] = (arrived, done)
        c.bytes += send + wl.result_bytes
        up = int(1000 * wl.result_bytes / link.up_bytes_per_s)
        if c.churns and pub.churn_rng.random() < self.cfg.churn_per_lease:
            self.push(pub.churn_rng.randint(arrived, max(arrived, done - 1)), "unplug", c)
        back = done + up + self.message_ms(c)
        return self.reach(c, back) if c.cut_off else back

    def reach(self, c: Car, at: int) -> int:
        """When a message of car `c` that would arrive at `at` arrives: a cut-off car's
        message during the partition goes through once it heals (a resend)."""
        start, end = self.cut_window
        if c.cut_off and start <= at < end:
            return end + 2 * self._link(c).latency_ms
        return at

    # --- results ---------------------------------------------------------------------
    def capacity(self) -> tuple[list[float], list[float]]:
        """Share of the fleet available (policy computing) and used, per bin."""
        n = len(self.cars) * self.cfg.bin_s * 1000
        return [a / n for a in self.available_ms], [u / n for u in self.used_ms]

    def summary(self) -> dict:
        cfg, pubs, cars = self.cfg, self.publishers, self.cars
        reps = [p.report() for p in pubs]

        def total(key: str) -> int:
            return sum(r[key] for r in reps)

        accepted = total("accepted")
        honest = [c for c in cars if c.cheat is None]
        hours = cfg.hours
        by_hour = _by_hour([a / 1000 for a in self.available_ms],
                           [u / 1000 for u in self.used_ms], cfg.bin_s, len(cars),
                           cfg.policy.power_w * cfg.policy.cpu_share)
        ttr = sorted(self.ttr_ms)
        uplink = sum(p.uplink_bytes for p in pubs)
        return {
            "vehicles": len(cars), "hours": hours, "seed": cfg.seed,
            "cheaters": sum(1 for c in cars if c.cheat is not None),
            "publishers": len(pubs),
            "shards_accepted": accepted,
            "verified_samples": accepted * cfg.workload.samples,
            "shards_failed": total("failed"),
            "wrong_accepted": total("wrong_accepted"),
            "wrong_accepted_ever": total("wrong_accepted_ever"),
            "accepted_on_fresh_only": total("accepted_on_fresh_only"),
            "cheaters_excluded": total("cheaters_excluded"),
            "honest_excluded": total("honest_excluded"),
            "results": total("results"), "wrong_results": total("wrong_results"),
            "leases": total("leases"),
            "late_results_refused": total("late_refused"),
            "no_work_refusals": sum(p.no_work for p in pubs),
            "effective_replication": round(total("results") / accepted, 3) if accepted else None,
            "energy_wh_per_vehicle": round(sum(c.energy_wh for c in cars) / len(cars), 2),
            "credit_per_honest_vehicle": round(sum(c.credit for c in honest)
                                               / max(1, len(honest)), 2),
            "compute_hours": round(sum(c.busy_ms for c in cars) / HOUR_MS, 1),
            "work_lost_to_unplugging_hours": round(sum(c.lost_ms for c in cars) / HOUR_MS, 2),
            "time_to_result_s": {f"p{q}": round(_pct(ttr, q) / 1000, 1) if ttr else None
                                 for q in (50, 90, 99)},
            "publisher_uplink": {
                "gb_sent": round(uplink / 1e9, 2),
                "mean_use": round(uplink / (len(pubs) * cfg.uplink_bytes_per_s * hours * 3600),
                                  4)},
            "by_hour": by_hour,
            "events": self.events, "policy_calls": self.policy_calls,
            "scheduler_calls": sum(p.handled for p in pubs),
        }


def _pct(xs: list[int], q: int) -> float:
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


def _by_hour(available: list[float], used: list[float], bin_s: int, n: int,
             watts: float) -> list[dict]:
    """Hour of day -> usable share of the fleet (mean), share computing, GW-equivalent of
    the usable share scaled to 10^8 vehicles at `watts` each (the compute they offer)."""
    per_h = 3600 // bin_s
    out = []
    hours = math.ceil(len(available) / per_h)
    for h in range(min(24, hours)):
        a = u = 0.0
        span = 0
        for b in range(h * per_h, len(available), 24 * per_h):  # every day's hour h
            for k in range(b, min(b + per_h, len(available))):
                a, u, span = a + available[k], u + used[k], span + bin_s
        share = a / (n * span) if span else 0.0
        out.append({"hour": h, "usable_share": round(share, 4),
                    "used_share": round(u / (n * span), 4) if span else 0.0,
                    "gw_at_1e8": round(share * 1e8 * watts / 1e9, 3)})
    return out


def simulate(cfg: FleetConfig, traces: dict[str, Trace], progress=None) -> dict:
    return Fleet(cfg, traces).run(progress).summary()


__all__ = ["Fleet", "FleetConfig", "Workload", "LinkClass", "LINKS", "CHEATS", "Car",
           "Publisher", "simulate"]
