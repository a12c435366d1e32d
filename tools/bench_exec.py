"""Measure the sandboxed runner: child start time, per-shard and per-micro-batch overhead
against onnxruntime run in-process, output digests per optimisation level, and the
hardware profile.

    .venv/bin/python tools/bench_exec.py [--samples 4096] [--micro-batch 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import trio  # noqa: E402

from p2pfleet.exec.hwclass import fixed_floats, measure, reference_model  # noqa: E402
from p2pfleet.exec.outputs import compare_outputs, concat_batches, decode_tensors, tensors_digest  # noqa: E402
from p2pfleet.exec.runner import plan_batches, run_shard  # noqa: E402
from p2pfleet.exec.sandbox import SandboxConfig, open_sandbox_pool  # noqa: E402
from p2pfleet.wire.kinds import OPT_LEVELS, Lease  # noqa: E402

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def lease(model: bytes, samples: int, mb: int, level: str = "all") -> Lease:
    return Lease(lease_id=b"b" * 16, job_id=b"j" * 16, shard=0,
                 model_digest=hashlib.sha256(model).digest(), model_size=len(model),
                 input_digest=b"\0" * 32, input_size=0, input_sources=(), token=b"t" * 16,
                 deadline_ms=600_000, micro_batch=mb, opt_level=level,
                 provider="CPUExecutionProvider", ort_versions="", samples=samples,
                 first_batch=0, credit=1)


def in_process(model: bytes, x: np.ndarray, mb: int, threads: int, level: str = "all"):
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    t0 = time.perf_counter()
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    t_load = time.perf_counter() - t0
    names = [o.name for o in sess.get_outputs()]
    t0 = time.perf_counter()
    batches = [dict(zip(names, sess.run(None, {"x": x[a:b]}))) for _k, a, b in plan_batches(len(x), mb)]
    digest = tensors_digest(concat_batches(batches))
    return t_load, time.perf_counter() - t0, digest


async def sandboxed(args, model: bytes, x: np.ndarray) -> dict:
    cfg = SandboxConfig(memory_mb=2048)
    out: dict = {}
    async with open_sandbox_pool(cfg) as pool:
        starts = []
        for i in range(args.starts):
            box = await pool.get(b"start-%d" % i)
            t0 = trio.current_time()
            await box.start()
            starts.append(trio.current_time() - t0)
            await pool.close(b"start-%d" % i)
        out["child_start_ms"] = {"median": round(statistics.median(starts) * 1000, 1),
                                 "max": round(max(starts) * 1000, 1)}
        box = await pool.get(b"publisher")
        await box.start()
        le = lease(model, len(x), args.micro_batch)
        cold = await run_shard(box, le, model, {"x": x}, threads=args.threads)
        warm = []
        for _ in range(args.repeat):
            r = await run_shard(box, le, model, {"x": x}, threads=args.threads)
            assert r.status == "done" and r.output_digest == cold.output_digest
            warm.append(r)
        out["sandbox_cold_shard_ms"] = cold.elapsed_ms
        out["sandbox_load_ms"] = round(cold.load_ms, 1)
        out["sandbox_warm_shard_ms"] = statistics.median(r.elapsed_ms for r in warm)
        out["sandbox_compute_ms"] = round(statistics.median(r.compute_s for r in warm) * 1000, 1)
        out["sandbox_digest"] = cold.output_digest.hex()
        digests = {}
        outputs = {}
        for level in OPT_LEVELS:
            r = await run_shard(box, lease(model, len(x), args.micro_batch, level), model, {"x": x},
                                threads=args.threads)
            digests[level] = r.output_digest.hex()[:16]
            outputs[level] = decode_tensors(r.outputs)
        out["digest_by_opt_level"] = digests
        out["max_norm_error_vs_all"] = {lv: compare_outputs(outputs[lv], outputs["all"]).max_norm_error
                                        for lv in OPT_LEVELS}
        box2 = await pool.get(b"other-publisher")
        r2 = await run_shard(box2, le, model, {"x": x}, threads=1)
        out["second_child_same_digest"] = r2.output_digest == cold.output_digest
        out["second_child_pid_differs"] = box2.pid != box.pid
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    model = reference_model()
    x = fixed_floats("bench_exec_x", args.samples * 784).reshape(args.samples, 784)
    report: dict = {"ort_version": ort.__version__, "model": "MLP 784-256-10",
                    "samples": args.samples, "micro_batch": args.micro_batch, "threads": args.threads}
    loads, runs, digest = [], [], None
    for _ in range(args.repeat):
        t_load, t_run, digest = in_process(model, x, args.micro_batch, args.threads)
        loads.append(t_load)
        runs.append(t_run)
    report["in_process_load_ms"] = round(statistics.median(loads) * 1000, 1)
    report["in_process_shard_ms"] = round(statistics.median(runs) * 1000, 1)
    report["in_process_digest"] = digest.hex()
    report.update(trio.run(sandboxed, args, model, x))
    batches = len(plan_batches(args.samples, args.micro_batch))
    over = report["sandbox_warm_shard_ms"] - report["in_process_shard_ms"]
    report["warm_overhead_ms"] = round(over, 1)
    report["overhead_per_micro_batch_us"] = round(over * 1000 / batches, 1)
    report["digest_matches_in_process"] = report["in_process_digest"] == report["sandbox_digest"]
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        prof = measure(d, threads=1)
        report["hw_profile"] = {"hw_class": prof.hw_class.hex(), "bench_1_thread": prof.bench,
                                "measure_s": round(time.perf_counter() - t0, 2)}
        report["hw_profile"]["bench_2_threads"] = measure(d, threads=2).bench
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
