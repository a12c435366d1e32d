"""Run the test suite tier by tier and print how long each took.

This is what `make test` (the README's test command) runs. Tiers run in order, each its
own pytest process; the run fails if any tier fails, but every tier still runs so one
report shows them all. `--json FILE` writes the timings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# netbed builds network namespaces: it needs root and skips elsewhere, saying why.
TIERS = ["unit", "property", "sim", "vectors", "integration", "system", "netbed"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tiers", nargs="*", default=TIERS, help=f"tiers to run (default: {' '.join(TIERS)})")
    parser.add_argument("--json", type=Path, help="write timings here")
    args = parser.parse_args()
    results = []
    for tier in args.tiers:
        path = ROOT / "tests" / tier
        if not any(path.glob("test_*.py")):
            print(f"== tier {tier}: no tests", flush=True)
            continue
        print(f"== tier {tier}", flush=True)
        start = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", str(path.relative_to(ROOT))], cwd=ROOT)
        results.append({"tier": tier, "seconds": round(time.monotonic() - start, 1), "passed": rc == 0})
    print("\n== test tiers")
    for r in results:
        print(f"  {r['tier']:<10} {r['seconds']:>8.1f} s  {'ok' if r['passed'] else 'FAILED'}")
    total = sum(r["seconds"] for r in results)
    print(f"  {'total':<10} {total:>8.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"tiers": results, "total_seconds": round(total, 1)}, indent=2))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
