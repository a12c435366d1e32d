#!/usr/bin/env python3
"""Benchmark the wire layer: seal (encode + sign) and open (verify + decode) per kind.

For every kind and two bodies, the deterministic sample (`samples.sample_body`, a typical
small message) and a body grown towards the kind's `max_body` (`samples.large_body`), it
runs each operation for a fixed time and reports messages/s and µs/message, with the body
and envelope sizes. `open` is `open_envelope(..., now_ms=...)`: size checks, signature,
msgpack limits, strict schema, lifetime (no dedup store: that is SQLite, not the wire).

    tools/bench_wire.py                      # JSON on stdout
    tools/bench_wire.py --seconds 1 --out out/bench_wire.json --sizes sample
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from p2pfleet.wire import samples as S  # noqa: E402
from p2pfleet.wire.envelope import encode_body, open_envelope, seal  # noqa: E402
from p2pfleet.wire.kinds import KINDS  # noqa: E402

NET = S.SAMPLE_NETWORK
SIZES = {"sample": S.sample_body, "large": S.large_body}


def _now_for(body) -> int:
    for name in ("exp", "at"):
        value = getattr(body, name, None)
        if value is not None:
            return value
    return S.SAMPLE_NOW_MS


def time_op(fn, seconds: float) -> dict:
    """Call fn repeatedly for about `seconds` (after a short warm-up)."""
    for _ in range(3):
        fn()
    n = 0
    clock = time.perf_counter
    start = clock()
    deadline = start + seconds
    while True:
        fn()
        n += 1
        now = clock()
        if now >= deadline:
            break
    elapsed = now - start
    return {"iterations": n, "msgs_per_s": round(n / elapsed, 1),
            "us_per_msg": round(elapsed / n * 1e6, 2)}


def bench(seconds: float = 0.5, kinds: list[str] | None = None,
          sizes: list[str] | None = None) -> dict:
    identity = S.sample_identity("bench")
    results = []
    for name in kinds or sorted(KINDS):
        spec = KINDS[name]
        for size in sizes or list(SIZES):
            body = SIZES[size](name)
            env = seal(body, identity, NET)
            now = _now_for(body)
            assert open_envelope(env, NET, now_ms=now).body == body
            results.append({
                "kind": name,
                "size": size,
                "body_bytes": len(encode_body(body)),
                "envelope_bytes": len(env),
                "max_body": spec.max_body,
                "seal": time_op(lambda: seal(body, identity, NET), seconds),
                "open": time_op(lambda: open_envelope(env, NET, now_ms=now), seconds),
            })
    return {
        "tool": "bench_wire",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds_per_op": seconds,
        "machine": machine(),
        "results": results,
    }


def machine() -> dict:
    import msgpack
    import nacl

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "pynacl": nacl.__version__,
        "msgpack_c_extension": not msgpack.Packer.__module__.endswith("fallback"),
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
    }


def table(report: dict) -> str:
    lines = [f"{'kind':14} {'size':6} {'body B':>8} {'seal/s':>9} {'µs':>8} {'open/s':>9} {'µs':>8}"]
    for r in report["results"]:
        lines.append(f"{r['kind']:14} {r['size']:6} {r['body_bytes']:8d} "
                     f"{r['seal']['msgs_per_s']:9.0f} {r['seal']['us_per_msg']:8.1f} "
                     f"{r['open']['msgs_per_s']:9.0f} {r['open']['us_per_msg']:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="time per kind and operation")
    ap.add_argument("--out", metavar="FILE", help="also write the JSON here")
    ap.add_argument("--kinds", help="comma list (default: all)")
    ap.add_argument("--sizes", default="sample,large", help="comma list of sample, large")
    ap.add_argument("--table", action="store_true", help="print a table on stderr too")
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",") if args.kinds else None
    for k in kinds or []:
        if k not in KINDS:
            ap.error(f"unknown kind {k!r}")
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s!r}")
    report = bench(args.seconds, kinds, sizes)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.table:
        print(table(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
