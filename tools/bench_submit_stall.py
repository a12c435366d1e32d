#!/usr/bin/env python3
"""How long a large `submit` stalls the publisher's event loop (issue 13, item 3).

An embedded publisher (the SDK's `connect`, a real libp2p host, store and blob cache) runs
a heartbeat task that wakes every millisecond and records the longest gap between two
wake-ups, while a job is submitted: once with the blocking `Publisher.submit` (what the SDK
did before), once with `Publisher.submit_async` (sharding, known answers, encoding and
hashing in a worker thread; the store and cache take the blobs one at a time). While the
loop stalls, no other job's leases or blobs are served. JSON on stdout and in
tools/bench_submit_stall.last.json.

    tools/bench_submit_stall.py            # mlp784, 65536 samples: 205 MB of input
    tools/bench_submit_stall.py --quick    # 16384 samples
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from p2pfleet.publisher import JobSpec  # noqa: E402
from p2pfleet.sdk import connect  # noqa: E402
from p2pfleet.zoo import MODELS  # noqa: E402

OUT = Path(__file__).with_suffix(".last.json")


class Heartbeat:
    """The longest time the event loop did not run this task (a 1 ms sleep loop)."""

    def __init__(self) -> None:
        self.longest = 0.0

    async def run(self) -> None:
        last = time.perf_counter()
        while True:
            await trio.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now


async def measure(workdir: Path, samples: int, shard: int) -> dict:
    model, name, gen = MODELS["mlp784"]()
    X = gen(samples)
    out: dict = {"model": "mlp784", "samples": samples, "shard_size": shard,
                 "input_mb": round(X.nbytes / 1e6, 1)}
    async with connect(workdir / "pub", network="stall-bench",
                       listen=["/ip4/127.0.0.1/tcp/0"]) as client:
        pub = client.publisher
        for how in ("blocking", "async"):
            spec = JobSpec(model=model, inputs={name: X}, shard_size=shard, micro_batch=256,
                           quorum=1)
            beat = Heartbeat()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(beat.run)
                await trio.sleep(0.05)
                beat.longest = 0.0
                t0 = time.perf_counter()
                if how == "blocking":
                    pub.submit(spec)
                else:
                    await pub.submit_async(spec)
                took = time.perf_counter() - t0
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            out[how] = {"submit_s": round(took, 3), "longest_stall_s": round(beat.longest, 3)}
            print(f"{how}: submit {took:.2f} s, longest event-loop stall {beat.longest:.3f} s",
                  file=sys.stderr)
    out["stall_ratio_async_to_blocking"] = round(
        out["async"]["longest_stall_s"] / max(1e-9, out["blocking"]["longest_stall_s"]), 3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16384 samples instead of 65536")
    ap.add_argument("--samples", type=int, default=0)
    ap.add_argument("--shard", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    samples = args.samples or (16384 if args.quick else 65536)
    with tempfile.TemporaryDirectory(prefix="stall-") as tmp:
        res = trio.run(measure, Path(tmp), samples, args.shard)
    text = json.dumps(res, indent=2)
    print(text)
    args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
