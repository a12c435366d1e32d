#!/usr/bin/env python3
"""Run the fleet simulator's named scenarios (tools/scenarios/catalog.py) and print one
JSON document: per scenario its definition, the simulator's summary, the publishers' job
counts, its checks and the CPU it took; and the cheater table (kind x share x quorum:
wrong results accepted beside the f^k bound). Exit status 1 when a check fails.

    tools/scenarios/run.py --out tools/scenarios/last.json     # everything (~10 min CPU)
    tools/scenarios/run.py --part named --json                 # the named ones (~2 min)
    tools/scenarios/run.py --only churn                        # names containing "churn"
    tools/scenarios/run.py --only sweep-colluder --vehicles 200
    tools/scenarios/run.py --table tools/scenarios/last.json   # its tables as Markdown

Seeded: one seed gives the same numbers on every machine (the CPU times aside).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from p2pfleet.sim import verification as V  # noqa: E402
from p2pfleet.sim.fleet import Fleet  # noqa: E402
from p2pfleet.sim.traces import load_traces  # noqa: E402
from scenarios import catalog as C  # noqa: E402


def play(scn: C.Scenario, traces: dict) -> dict:
    """Run one scenario; its summary, job counts and checks."""
    start = time.process_time()
    fleet = Fleet(scn.config, traces)
    broken = None
    try:
        fleet.run()
    except V.InvariantBroken as exc:  # e.g. a shard decided twice: reported, not hidden
        broken = str(exc)
    summary = fleet.summary()
    reps = [p.report() for p in fleet.publishers]
    jobs = {k: sum(r[k] for r in reps)
            for k in ("shards", "accepted", "failed", "undecided", "reopened")}
    jobs["lost"] = sum(len(p.lost()) for p in fleet.publishers)
    jobs["double_decisions"] = int(broken is not None)
    jobs["unplugs"] = fleet.unplugs
    checks = C.check(scn, summary, jobs)
    return {"scenario": scn.name, "what": scn.what, "config": _config(scn),
            "checks": checks, "ok": all(checks.values()) and broken is None,
            "invariant_broken": broken, "jobs": jobs, "summary": summary,
            "cpu_s": round(time.process_time() - start, 1)}


def _config(scn: C.Scenario) -> dict:
    cfg = dataclasses.asdict(scn.config)
    del cfg["policy"]   # the default vehicle policy throughout
    return cfg


def table_row(scn: C.Scenario, run: dict) -> dict:
    t, s = scn.table, run["summary"]
    return {**t, "shards_accepted": s["shards_accepted"],
            "wrong_accepted": s["wrong_accepted"],
            "wrong_accepted_ever": s["wrong_accepted_ever"],
            "wrong_results": s["wrong_results"],
            "f_k_bound": round(C.bound(t["share"], t["quorum"], s["shards_accepted"]), 1),
            "cheaters_excluded": s["cheaters_excluded"], "cheaters": s["cheaters"]}


def named_markdown(doc: dict) -> str:
    """The named scenarios of a run's JSON as a Markdown table (docs/measured.md)."""
    out = ["| scenario | what | shards accepted of submitted | wrong accepted | work lost to "
           "unplugging | time to result p50 / p90 / p99 | uplink use | checks |",
           "|---|---|---|---|---|---|---|---|"]
    for run in doc["runs"]:
        if run["scenario"].startswith("sweep-"):
            continue
        s, j = run["summary"], run["jobs"]
        accepted = f"{j['accepted']:,} of {j['shards']:,}"
        extra = [f"{n:,} {what}" for n, what in ((j["unplugs"], "unplugs"),
                                                 (j["reopened"], "withdrawn"),
                                                 (j["failed"], "failed")) if n]
        t = s["time_to_result_s"]
        out.append(
            f"| {run['scenario']} | {run['what']} | {', '.join([accepted, *extra])} | "
            f"{s['wrong_accepted']} of {s['wrong_results']} wrong results | "
            f"{s['work_lost_to_unplugging_hours']:,} of {s['compute_hours']:,} h | "
            f"{t['p50']:,} / {t['p90']:,} / {t['p99']:,} s | "
            f"{s['publisher_uplink']['mean_use']:.1%} | {', '.join(run['checks'])} |")
    return "\n".join(out)


def markdown(doc: dict) -> str:
    """The cheater table of a run's JSON as Markdown (docs/measured.md): per kind and share,
    per quorum wrong results accepted / shards accepted, and the f^k bound."""
    rows = {(r["kind"], r["share"], r["quorum"]): r for r in doc["table"]}
    quorums = sorted({q for _k, _s, q in rows})
    head = "| cheaters | share |" + "".join(
        f" quorum {q}: wrong accepted / shards | f^{q} bound |" for q in quorums)
    out = [head, "|---|---|" + "---|---|" * len(quorums)]
    for kind in dict.fromkeys(k for k, _s, _q in rows):
        for share in sorted({s for k, s, _q in rows if k == kind}):
            cells = []
            for q in quorums:
                r = rows.get((kind, share, q))
                cells += (["-", "-"] if r is None else [
                    f"{r['wrong_accepted']} / {r['shards_accepted']:,}",
                    f"{r['f_k_bound']:,.0f}"])
            out.append(f"| {kind} | {share:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("named", "sweep"),
                        help="only the named scenarios, or only the cheater sweep")
    parser.add_argument("--only", help="scenarios whose name contains this")
    parser.add_argument("--vehicles", type=int, help="override every scenario's fleet size")
    parser.add_argument("--seed", type=int, help="override every scenario's seed")
    parser.add_argument("--json", action="store_true", help="print the JSON document")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--table", type=Path, metavar="JSON",
                        help="print the tables of a saved run (named scenarios, cheaters) as "
                             "Markdown, run nothing")
    args = parser.parse_args()
    if args.table is not None:
        doc = json.loads(args.table.read_text())
        print(named_markdown(doc) + "\n\n" + markdown(doc))
        return 0
    pool = {"named": C.NAMED, "sweep": C.sweep(), None: C.all_scenarios()}[args.part]
    chosen = [s for s in pool if not args.only or args.only in s.name]
    if not chosen:
        parser.error(f"--only {args.only!r}: no scenario's name contains it "
                     f"(names: {', '.join(s.name for s in C.NAMED)}, sweep-<kind>-<share>-q<k>)")
    if args.vehicles is not None and args.vehicles < 1:
        parser.error("--vehicles must be >= 1")
    traces = load_traces()
    runs, table = [], []
    for scn in chosen:
        over = {k: v for k, v in (("vehicles", args.vehicles), ("seed", args.seed))
                if v is not None}
        if over:
            scn = dataclasses.replace(scn, config=dataclasses.replace(scn.config, **over))
        run = play(scn, traces)
        runs.append(run)
        if scn.table:
            table.append(table_row(scn, run))
            del run["summary"]["by_hour"]   # the sweep is about cheaters, not capacity
        s = run["summary"]
        print(f"{scn.name:24} {'ok ' if run['ok'] else 'BAD'} accepted {s['shards_accepted']:6} "
              f"wrong {s['wrong_accepted']:3} lost {s['work_lost_to_unplugging_hours']:7} h "
              f"unplugs {run['jobs']['unplugs']:5} {run['cpu_s']:6.1f} s CPU",
              file=sys.stderr, flush=True)
    doc = {"tool": "scenarios", "ok": all(r["ok"] for r in runs), "runs": runs,
           "table": table}
    text = json.dumps(doc, indent=1)
    if args.json:
        print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
