#!/usr/bin/env python3
"""Adversaries against the publisher's scheduler, in virtual time: how many wrong results
verification accepts (issue 12; specs/verification.md, section 5).

Runs the scenarios of `p2pfleet.sim.verification` (each adversary alone, then together)
against the real `Scheduler` and prints one JSON document: per run the scenario, the trust
settings, re-check and audit rates, and shards, accepted, failed, wrong accepted, cheater
identities and how many were excluded, leases issued, virtual hours. Seeded: one seed gives
the same numbers on every machine.

    tools/sim_verification.py                          # 10^4 shards, seed 1, all runs
    tools/sim_verification.py --shards 2000 --only colluders --trust short
    tools/sim_verification.py --part sweep --out out/sim_verification.json

Parts: `short` (trust settings under which cheaters are established within minutes:
3 results, 10 min), `default` (TrustSettings defaults: 10 results, 24 h; honest workers
10x slower so the job lasts days) and `sweep` (colluders against re-check rate, audit rate,
trusted machines and their own share). A 10^4-shard run takes 1-12 min (the scheduler's
work requests dominate: ~10 ms each, scanning its 256-shard window), all three parts ~2 h.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from p2pfleet.sim import verification as V  # noqa: E402

PARTS = {
    "short": lambda: V.scenarios(V.SHORT_TRUST),
    "default": lambda: V.scenarios(V.DEFAULT_TRUST, bench=0.02),
    "sweep": lambda: V.collusion_sweep(V.SHORT_TRUST),
}


def describe(scn: V.Scenario) -> dict:
    t = scn.trust
    return {
        "scenario": scn.name,
        "trust": {"established_accepted": t.established_accepted,
                  "established_age_min": t.established_age_ms / 60_000,
                  "reset_quiet_h": t.reset_quiet_ms / 3_600_000},
        "job": dataclasses.asdict(scn.job),
        "honest": scn.honest, "trusted": scn.trusted, "flaky": scn.flaky,
        "adversaries": [{"count": a.count, "prefixes": a.prefixes or "own",
                         "cheat": {k: v for k, v in dataclasses.asdict(a.cheat).items()
                                   if v != getattr(V.Cheat(), k) or k == "output"}}
                        for a in scn.adversaries],
        "zero_by_construction": V.zero_by_construction(scn),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--part", action="append", choices=sorted(PARTS),
                        help="which runs (repeatable; default: all)")
    parser.add_argument("--only", help="scenarios whose name contains this")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    runs = []
    for part in args.part or list(PARTS):
        for scn in PARTS[part]():
            if args.only and args.only not in scn.name:
                continue
            start = time.monotonic()
            sim = V.simulate(scn, args.shards, args.seed)
            rep = sim.report()
            runs.append({"part": part, **describe(scn), "seed": args.seed, **rep,
                         "wall_s": round(time.monotonic() - start, 1)})
            print(f"{part:8} {scn.name[:70]:70} wrong {rep['wrong_accepted']:4} "
                  f"failed {rep['failed']:4} excluded {rep['cheaters_excluded']:3}/"
                  f"{rep['cheater_identities']:<3} leases {rep['leases']:6} "
                  f"{runs[-1]['wall_s']:6.1f} s", file=sys.stderr, flush=True)
    doc = {"tool": "sim_verification", "shards": args.shards, "seed": args.seed, "runs": runs}
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
