"""Replay of event logs written by live publishers and nodes (specs/event-log.md).

A log holds, per start of a machine, a header (its settings, its rng's key and counter, the
records it was restored from) and then one line per event with the decisions the live
machine took for it. `replay` rebuilds the same core machine (the scheduler for a
publisher's log, the vehicle policy for a node's, the receipt checks of core/credit.py for a
node's credit log), feeds it every event in virtual time (the times the events carry) and
compares its decisions with the logged ones, effect by effect. It stops at the first divergence, which it reports with the event and both sides.

A log this module cannot read (not JSON, a truncated line, an unknown event type, a field
missing, no header) raises `LogError` naming the file and line.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core import credit as C
from ..core import eventlog
from ..core import policy as P
from ..core import scheduler as S
from ..core import trust as T


class LogError(Exception):
    """An event log that cannot be replayed as it is; the message names file and line."""


@dataclass
class Divergence:
    """The first event whose replayed decisions differ from the logged ones."""

    log: str
    line: int
    index: int                 # the event's place in its log, from 0
    event: dict
    logged: Any                # the logged effects, or {"refused": why}
    replayed: Any
    first_difference: int      # index of the first effect that differs

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Report:
    logs: list[str] = field(default_factory=list)
    segments: int = 0          # machine starts (headers) replayed
    events: int = 0
    decisions: int = 0         # effects compared (a refusal counts as one)
    totals: Counter = field(default_factory=Counter)
    per_log: dict[str, Counter] = field(default_factory=dict)  # the totals of each log
    jobs: dict[str, dict] = field(default_factory=dict)  # job id -> the replayed counts
    excluded: set[str] = field(default_factory=set)      # workers excluded (keys, hex)
    divergence: Divergence | None = None

    def as_dict(self) -> dict:
        return {"logs": self.logs, "segments": self.segments, "events": self.events,
                "decisions": self.decisions, "totals": dict(sorted(self.totals.items())),
                "per_log": {p: dict(sorted(c.items())) for p, c in self.per_log.items()},
                "jobs": self.jobs, "excluded": sorted(self.excluded),
                "identical": self.divergence is None,
                "divergence": self.divergence.as_dict() if self.divergence else None}


def _lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line; LogError for anything else."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        raise LogError(f"{path}: cannot read: {exc.strerror}") from None
    with f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{n}"
            if not raw.endswith(b"\n"):
                raise LogError(f"{where}: the last line is truncated (no end of line): the "
                               f"log was cut while being written")
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise LogError(f"{where}: not UTF-8 text (byte {exc.start}): corrupt") from None
            except json.JSONDecodeError as exc:
                raise LogError(f"{where}: not JSON ({exc.msg} at column {exc.colno}): "
                               f"corrupt or truncated") from None
            if not isinstance(data, dict):
                raise LogError(f"{where}: not a JSON object but {type(data).__name__}")
            yield n, data


def _check_header(data: dict, where: str) -> str:
    if "format" not in data:
        if "type" in data:
            raise LogError(f"{where}: an event before any header: a log of version 1 (events "
                           f"only, written before version {eventlog.VERSION}) holds no "
                           f"decisions to compare; write it again with this version")
        raise LogError(f"{where}: neither a header nor an event")
    if data["format"] != eventlog.FORMAT:
        raise LogError(f"{where}: format {data['format']!r} is not {eventlog.FORMAT!r}")
    version = data.get("version")
    if version != eventlog.VERSION:
        newer = isinstance(version, int) and version > eventlog.VERSION
        raise LogError(f"{where}: event-log version {version!r} "
                       f"{'is newer than' if newer else 'is not'} the version this replayer "
                       f"reads ({eventlog.VERSION})")
    machine = data.get("machine")
    if machine not in _MACHINES:
        raise LogError(f"{where}: unknown machine {machine!r} (known: "
                       f"{', '.join(sorted(_MACHINES))})")
    return machine


def _build(cls: type, data: Any, where: str, what: str) -> Any:
    if not isinstance(data, dict):
        raise LogError(f"{where}: {what} is not a JSON object")
    try:
        return eventlog.build(cls, data)
    except Exception as exc:  # noqa: BLE001 - any bad field is the log's fault, named here
        raise LogError(f"{where}: {what}: {exc}") from None


class _Machine:
    """One machine rebuilt from a header; `step` gives its decisions for one event."""

    types: tuple[type, ...] = ()
    refusals: tuple[type[Exception], ...] = ()

    def handle(self, ev: object) -> list:
        raise NotImplementedError

    def count(self, effects: list, totals: Counter) -> None:
        raise NotImplementedError

    def finish(self, report: Report) -> None:
        pass


class _Scheduler(_Machine):
    types = S.EVENTS
    refusals = (S.CoreUsageError, S.PeerViolation, S.Forgotten)

    def __init__(self, header: dict, where: str):
        settings = _build(S.SchedulerSettings, header.get("settings"), where, "settings")
        rng = header.get("rng")
        if not isinstance(rng, dict) or not isinstance(rng.get("key"), str):
            raise LogError(f"{where}: the header holds no rng key: the lease ids and the "
                           f"re-check and audit draws cannot be drawn again")
        try:
            key, counter = bytes.fromhex(rng["key"]), int(rng.get("counter", 0))
        except (TypeError, ValueError) as exc:
            raise LogError(f"{where}: rng: {exc}") from None
        r = S.KeyedRandom(key)
        r.setstate((key, counter))
        self.m = S.Scheduler(settings, rng=r)  # as the publisher builds it: nothing left out
        restored = header.get("restored")
        if restored:
            if not isinstance(restored, dict):
                raise LogError(f"{where}: restored is not a JSON object")
            parts = []
            for name, cls in (("jobs", S.JobRec), ("shards", S.ShardRec),
                              ("leases", S.LeaseRec), ("workers", T.WorkerTrust)):
                items = restored.get(name, [])
                if not isinstance(items, list):
                    raise LogError(f"{where}: restored {name} is not a list")
                parts.append([_build(cls, d, where, f"restored {name}[{i}]")
                              for i, d in enumerate(items)])
            forgotten = restored.get("forgotten", [])
            try:
                forgotten = [bytes.fromhex(j) for j in forgotten]
            except (TypeError, ValueError) as exc:
                raise LogError(f"{where}: restored forgotten: {exc}") from None
            try:
                self.m.restore(*parts, forgotten=forgotten)
            except S.CoreUsageError as exc:
                raise LogError(f"{where}: the restored records do not fit: {exc}") from None

    def handle(self, ev: object) -> list:
        return self.m.handle(ev)

    def count(self, effects: list, totals: Counter) -> None:
        for e in effects:
            if isinstance(e, S.Grant):
                totals["leases"] += len(e.leases)
            elif isinstance(e, S.Refuse):
                totals["refusals"] += 1
            elif isinstance(e, S.Pay):
                totals["payments"] += 1
                totals["credit"] += e.credit
            elif isinstance(e, S.ShardAccepted):
                totals["accepts"] += 1
            elif isinstance(e, S.Excluded):
                totals["exclusions"] += 1
            elif isinstance(e, S.ShardReopened):
                totals["reopened"] += 1
            elif isinstance(e, S.ShardFailed):
                totals["shards_failed"] += 1
            elif isinstance(e, S.CancelLeases):
                totals["leases_cancelled"] += len(e.lease_ids)
            elif isinstance(e, S.JobDone):
                totals["jobs_done"] += 1

    def finish(self, report: Report) -> None:
        for job_id in self.m.jobs:
            report.jobs[job_id.hex()] = self.m.job_counts(job_id)
        report.excluded |= {w.hex() for w, t in self.m.workers.items() if t.excluded}


class _Policy(_Machine):
    types = P.EVENTS
    refusals = (P.PolicyUsageError,)

    def __init__(self, header: dict, where: str):
        self.m = P.Policy(_build(P.PolicyConfig, header.get("settings"), where, "settings"))

    def handle(self, ev: object) -> list:
        return self.m.handle(ev)

    def count(self, effects: list, totals: Counter) -> None:
        for e in effects:
            name = {P.StartComputing: "compute_starts", P.StopComputing: "compute_stops",
                    P.JoinMesh: "mesh_joins", P.LeaveMesh: "mesh_leaves"}.get(type(e))
            if name:
                totals[name] += 1


class _Credit(_Machine):
    """A node's receipt decisions (its ledger's `add_receipt`): the credit it recorded."""

    types = (C.ReceiptSeen,)
    refusals = (C.ReceiptRefused,)

    def __init__(self, header: dict, where: str):
        pass

    def handle(self, ev: object) -> list:
        return C.take_receipt(ev)

    def count(self, effects: list, totals: Counter) -> None:
        for e in effects:
            totals["receipts"] += 1
            if e.outcome == "new":  # a second receipt for a lease is kept as proof only
                totals["credit_received"] += e.credit


_MACHINES = {"scheduler": _Scheduler, "policy": _Policy, "credit": _Credit}


def _first_difference(a: Any, b: Any) -> int:
    if not (isinstance(a, list) and isinstance(b, list)):
        return 0
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _replay_one(path: Path, report: Report) -> None:
    machine: _Machine | None = None
    index = 0
    for n, data in _lines(path):
        where = f"{path}:{n}"
        if "format" in data or machine is None:
            if machine is not None:
                machine.finish(report)
            machine = _MACHINES[_check_header(data, where)](data, where)
            report.segments += 1
            continue
        if "effects" not in data or not isinstance(data["effects"], list):
            raise LogError(f"{where}: an event without its decisions ('effects')")
        by_name = {cls.__name__: cls for cls in machine.types}
        name = data.get("type")
        if name not in by_name:
            raise LogError(f"{where}: unknown event type {name!r} for this machine (known: "
                           f"{', '.join(sorted(by_name))})")
        fields = {k: v for k, v in data.items() if k not in ("type", "effects", "refused")}
        ev = _build(by_name[name], fields, where, f"event {name}")
        logged: Any = data["effects"]
        if "refused" in data:
            logged = {"refused": data["refused"]}
        try:
            effects = machine.handle(ev)
            replayed: Any = [eventlog.typed_plain(e) for e in effects]
        except machine.refusals as exc:
            effects, replayed = [], {"refused": str(exc)}
        report.events += 1
        report.decisions += len(replayed) if isinstance(replayed, list) else 1
        if replayed != logged:
            report.divergence = Divergence(
                str(path), n, index, {k: v for k, v in data.items()
                                      if k not in ("effects", "refused")},
                logged, replayed, _first_difference(logged, replayed))
            return
        machine.count(effects, report.totals)
        machine.count(effects, report.per_log.setdefault(str(path), Counter()))
        index += 1
    if machine is None:
        raise LogError(f"{path}: empty: no header, no events")
    machine.finish(report)


def replay(paths: Iterable[Path | str]) -> Report:
    """Replay each log in turn (each is its own machine); stop at the first divergence."""
    report = Report()
    for p in paths:
        path = Path(p)
        report.logs.append(str(path))
        _replay_one(path, report)
        if report.divergence is not None:
            break
    return report


__all__ = ["replay", "Report", "Divergence", "LogError"]
