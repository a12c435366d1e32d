#!/usr/bin/env python3
"""Fleet simulator speed: CPU, events/s and core `handle()` calls/s of `p2pfleet sim`.

Runs `sim.fleet.Fleet` (the CLI's simulator: every publisher a real `core.scheduler.Scheduler`,
every car a real `core.policy.Policy`) for --vehicles x --hours, and, as the baseline measured
in the same run, the same fleet again with the reference scheduler of
tests/property/test_scheduler_index.py (`Scan`: the window found by walking every shard, a
job done when every shard is decided, stall requesters gathered per shard: the scheduler
before its shard index). Both must give the same summary (the index changes no decision);
reported: each run's process CPU seconds, events and `handle()` calls per CPU second, and
the baseline's CPU over the indexed one's. Memory is peak RSS (ru_maxrss), taken after the
indexed run and before the baseline (which only adds to it); for the fleet alone run
`/usr/bin/time -v p2pfleet sim ...`. --no-baseline skips the reference (an hour at 100,000
vehicles). Writes tools/bench_sim.last.json (--out).

    .venv/bin/python tools/bench_sim.py                       # 1,000 vehicles x 24 h, ~1 min
    .venv/bin/python tools/bench_sim.py --vehicles 200 --hours 6   # a smoke run
    .venv/bin/python tools/bench_sim.py --vehicles 100000 --no-baseline
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests" / "property"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from p2pfleet.core import scheduler as S  # noqa: E402
from p2pfleet.sim import fleet as F  # noqa: E402
from p2pfleet.sim.traces import SHIPPED, load_traces  # noqa: E402


def run(cfg: F.FleetConfig, traces: dict, scheduler: type) -> tuple[dict, float]:
    """One fleet run with `scheduler` as the publishers' machine: (summary, CPU seconds)."""
    real = S.Scheduler
    S.Scheduler = scheduler  # verification.Sim builds its machine as S.Scheduler(...)
    try:
        t0 = time.process_time()
        fleet = F.Fleet(cfg, traces).run()
        summary = fleet.summary()
        return summary, time.process_time() - t0
    finally:
        S.Scheduler = real


def rates(summary: dict, cpu: float) -> dict:
    return {"cpu_s": round(cpu, 2), "events": summary["events"],
            "events_per_cpu_s": round(summary["events"] / cpu),
            "scheduler_handle_per_cpu_s": round(summary["scheduler_calls"] / cpu),
            "policy_handle_per_cpu_s": round(summary["policy_calls"] / cpu)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vehicles", type=int, default=1000)
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--cheaters", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-baseline", action="store_true", help="skip the reference scheduler")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "bench_sim.last.json")
    args = ap.parse_args()
    cfg = F.FleetConfig(args.vehicles, hours=args.hours, cheaters=args.cheaters, seed=args.seed)
    traces = load_traces(SHIPPED)
    summary, cpu = run(cfg, traces, S.Scheduler)
    out = {"vehicles": args.vehicles, "hours": args.hours, "cheaters": args.cheaters,
           "seed": args.seed, "indexed": rates(summary, cpu),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "shards_accepted": summary["shards_accepted"],
           "wrong_accepted": summary["wrong_accepted"]}
    if not args.no_baseline:
        from test_scheduler_index import Scan  # the reference rules, kept with their test
        ref, ref_cpu = run(cfg, traces, Scan)
        out["baseline_scan"] = rates(ref, ref_cpu)
        out["same_summary"] = ref == summary
        out["speedup"] = round(ref_cpu / cpu, 2)
    text = json.dumps(out, indent=2)
    args.out.write_text(text + "\n")
    print(text)
    return 0 if out.get("same_summary", True) else 1


if __name__ == "__main__":
    sys.exit(main())
