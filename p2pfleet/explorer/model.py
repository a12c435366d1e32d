"""What the explorer knows, as plain data: peers, jobs, evidence, totals, history (pure).

Everything here is computed from verified records and the times the crawler passes in; no
clock is read. `Snapshot.to_json()` is the document behind `explore --json`, the web
pages, the JSON API and /metrics, so all views say the same.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .evidence import Finding

# The record says nothing about power: estimate every computing node at the default full
# load of the node's energy accounting (config `policy.power_w`, 60 W).
ESTIMATED_NODE_W = 60.0
ONLINE_STATES = ("available", "busy", "paused")
USED_STATES = ("busy",)  # slots in use: capacity being used


@dataclass
class PeerView:
    peer_id: str
    state: str = "unknown"           # available | busy | paused | offline | unknown
    why_offline: str | None = None   # leaving | expired | no record
    sw_version: str | None = None
    ort_version: str | None = None
    hw_class: str | None = None      # hex
    cores: int | None = None
    memory_mb: int | None = None
    bench: float | None = None
    slots: int | None = None
    providers: tuple[str, ...] = ()
    addrs: tuple[str, ...] = ()
    record_seq: int | None = None
    record_exp_ms: int | None = None
    rtt_ms: float | None = None
    rtt_by: str | None = None        # info | ping
    last_seen: float | None = None   # Unix s the explorer last reached it or read a live record
    info: dict[str, Any] | None = None  # verified node_info, if the owner opted in
    copies: int = 0                  # record copies the DHT returned
    flagged: bool = False
    dht_role: str | None = None      # server | client (from identify), None: not told
    reach: str | None = None         # direct | relayed | not reached (this crawl's probe)

    @property
    def hw_short(self) -> str:
        return self.hw_class[:8] if self.hw_class else "-"

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id, "state": self.state, "why_offline": self.why_offline,
            "sw_version": self.sw_version, "ort_version": self.ort_version,
            "hw_class": self.hw_class, "hw_class_short": self.hw_short if self.hw_class else None,
            "cores": self.cores, "memory_mb": self.memory_mb, "bench": self.bench,
            "slots": self.slots, "providers": list(self.providers), "addrs": list(self.addrs),
            "record_seq": self.record_seq, "record_exp_ms": self.record_exp_ms,
            "rtt_ms": self.rtt_ms, "rtt_by": self.rtt_by, "last_seen": self.last_seen,
            "info": self.info, "copies": self.copies, "flagged": self.flagged,
            "dht_role": self.dht_role, "reach": self.reach,
        }


@dataclass
class JobView:
    publisher: str
    job_id: str
    seq: int
    exp_ms: int
    shards_total: int
    shards_left: int
    quorum: int
    credit_rate: int
    model_digest: str
    model_size: int
    heard_at: float
    first_heard_at: float | None = None
    # (heard at, shards left) per newer announcement heard, oldest first
    heard: list[tuple[float, int]] = field(default_factory=list)

    @property
    def done(self) -> int:
        return self.shards_total - self.shards_left

    @property
    def progress(self) -> float:
        return self.done / self.shards_total if self.shards_total else 1.0

    def to_json(self) -> dict[str, Any]:
        return {"publisher": self.publisher, "job_id": self.job_id, "seq": self.seq,
                "exp_ms": self.exp_ms, "shards_total": self.shards_total,
                "shards_left": self.shards_left, "shards_done": self.done,
                "progress": round(self.progress, 4), "quorum": self.quorum,
                "credit_rate": self.credit_rate, "model_digest": self.model_digest,
                "model_size": self.model_size, "heard_at": self.heard_at,
                "first_heard_at": self.first_heard_at,
                "heard": [{"t": t, "shards_left": left} for t, left in self.heard]}


MAX_JOB_POINTS = 500


def job_heard(held: JobView | None, new: JobView) -> JobView:
    """`new` (a newer announcement) carrying on `held`'s progress history."""
    new.first_heard_at = held.first_heard_at if held else new.heard_at
    new.heard = (held.heard if held else []) + [(new.heard_at, new.shards_left)]
    del new.heard[:-MAX_JOB_POINTS]
    return new


@dataclass(frozen=True)
class TotalsRow:
    state: str
    hw_class: str
    nodes: int
    samples_per_s: float
    est_kw: float


def totals(peers: list[PeerView]) -> list[TotalsRow]:
    """Capacity by (state, short hardware class) over the peers in the mesh."""
    rows: dict[tuple[str, str], list[float]] = {}
    for p in peers:
        if p.state not in ONLINE_STATES:
            continue
        acc = rows.setdefault((p.state, p.hw_short), [0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += p.bench or 0.0
        acc[2] += ESTIMATED_NODE_W / 1000
    return [TotalsRow(s, h, int(a[0]), round(a[1], 3), round(a[2], 3))
            for (s, h), a in sorted(rows.items())]


def capacity_by_class(peers: list[PeerView]) -> dict[str, tuple[float, float, int, int]]:
    """{short hardware class: (available, used samples/s, available, used nodes)}, split as
    `capacity_now` splits the totals."""
    out: dict[str, list[float]] = {}
    for p in peers:
        if p.state == "available" or p.state in USED_STATES:
            acc = out.setdefault(p.hw_short, [0.0, 0.0, 0, 0])
            i = 0 if p.state == "available" else 1
            acc[i] += p.bench or 0.0
            acc[i + 2] += 1
    return {k: (round(a, 3), round(u, 3), int(an), int(un))
            for k, (a, u, an, un) in sorted(out.items())}


def capacity_now(peers: list[PeerView]) -> tuple[float, float]:
    """(available, used) samples/s: available counts `available` nodes, used `busy` ones."""
    available = sum(p.bench or 0.0 for p in peers if p.state == "available")
    used = sum(p.bench or 0.0 for p in peers if p.state in USED_STATES)
    return round(available, 3), round(used, 3)


@dataclass
class History:
    """The last `size` capacity samples (t, available, used, by class), for the chart;
    by class is what `capacity_by_class` returns."""

    size: int = 720
    points: deque = field(default_factory=deque)

    def add(self, t: float, available: float, used: float,
            by_class: dict[str, tuple[float, float, int, int]] | None = None) -> None:
        self.points.append((t, available, used, dict(by_class or {})))
        while len(self.points) > self.size:
            self.points.popleft()

    def to_json(self) -> list[dict[str, float]]:
        return [{"t": t, "available": a, "used": u} for t, a, u, _c in self.points]

    def by_class_json(self) -> list[dict[str, dict[str, float]]]:
        """Per point of `to_json()` (same order), the capacity by short hardware class."""
        return [{k: {"available": ca, "used": cu, "available_nodes": an, "used_nodes": un}
                 for k, (ca, cu, an, un) in c.items()} for _t, _a, _u, c in self.points]


@dataclass
class Snapshot:
    """One crawl's result (or the running state in --watch / --serve)."""

    network: str
    crawled_at: float
    duration_s: float
    peers: list[PeerView]
    jobs: list[JobView]
    findings: list[Finding]
    discovered: int       # peer ids seen in routing tables and replies
    sampled: bool         # True: more peers were found than the cap; records read for a sample
    sample_cap: int
    rejected_reports: list[str] = field(default_factory=list)
    history: History | None = None
    crawls: int = 1
    phases: dict[str, float] = field(default_factory=dict)  # seconds per crawl phase

    def flagged(self) -> set[str]:
        return {f.accused for f in self.findings}

    def to_json(self) -> dict[str, Any]:
        rows = totals(self.peers)
        available, used = capacity_now(self.peers)
        by_state: dict[str, int] = {}
        for p in self.peers:
            by_state[p.state] = by_state.get(p.state, 0) + 1
        return {
            "network": self.network, "crawled_at": self.crawled_at,
            "duration_s": round(self.duration_s, 3), "phases": self.phases,
            "crawls": self.crawls,
            "discovered": self.discovered, "sampled": self.sampled,
            "sample_cap": self.sample_cap,
            "note": (f"sampled: {len(self.peers)} of {self.discovered} peers found were read "
                     f"(cap {self.sample_cap})") if self.sampled else None,
            "peers": [p.to_json() for p in sorted(self.peers, key=lambda p: p.peer_id)],
            "counts": by_state,
            "totals": [r.__dict__ for r in rows],
            "capacity": {"available_samples_per_s": available, "used_samples_per_s": used,
                         "available_est_kw": round(sum(r.est_kw for r in rows
                                                       if r.state == "available"), 3),
                         "estimate_w_per_node": ESTIMATED_NODE_W},
            "jobs": [j.to_json() for j in sorted(self.jobs, key=lambda j: (j.publisher, j.job_id))],
            "evidence": [finding_json(f) for f in self.findings],
            "rejected_reports": self.rejected_reports[-20:],
            "history": self.history.to_json() if self.history else [],
            "history_by_class": self.history.by_class_json() if self.history else [],
        }


def finding_json(f: Finding) -> dict[str, Any]:
    return {"kind": f.kind, "accused": f.accused, "verified_by": f.verified_by,
            "verified_by_explorer": f.verified_by == "explorer", "detail": f.detail,
            "served_by": list(f.served_by), "proofs": [p.hex() for p in f.proofs]}
