"""Measure the sandboxed runner against plain onnxruntime, in one run on the same cores.

Per model (the scikit-learn digits classifier, magika's model from its wheel, a
784-1024-1024-10 MLP built with onnx.helper, ResNet-50 with seeded weights; p2pfleet/zoo.py):
samples/s of `run_shard` in a warm sandbox child (validation cached, session loaded; the
whole call: copying the shard's inputs into a sealed memfd, the child's micro-batches on
shared memory, per-batch digests, the canonical outputs blob) against an onnxruntime
session in this process running the same micro-batches with the same threads and
optimisation level (`ratio`), and against that session plus the digests and outputs blob a
node must make anyway (`ratio_vs_plain_with_digests`), alternated run by run; the same with
the inputs already in a sealed memfd (`ratio_shared_inputs*`: a worker that prepares them
while the previous shard runs), and the node's CPU time per shard (`parent_cpu_ms_per_shard`); validation time in this
process and in the child; the child's memory after loading the model; what bounds the ratio
whatever the sandbox does (`_bounds`: the sealed input copy and the outputs blob's SHA-256
that must follow the last micro-batch, timed here, and `bound`, `bound_shared_inputs`: the
best ratios they leave). Also: child start
time and memory, the CPU-share duty cycle (share 0.5 of one core), the hardware profile.
JSON on stdout (and in --json FILE).

    .venv/bin/python tools/bench_exec.py [--threads 2] [--repeat 7] [--cpus 0,1] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT,):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import onnxruntime as ort  # noqa: E402
import trio  # noqa: E402

from p2pfleet.zoo import MODELS  # noqa: E402
from p2pfleet.exec.hwclass import measure  # noqa: E402
from p2pfleet.exec.outputs import concat_batches, decode_tensors, encode_tensors, tensors_digest  # noqa: E402
from p2pfleet.exec.runner import plan_batches, run_shard  # noqa: E402
from p2pfleet.exec.sandbox import SandboxConfig, _proc_cpu_s, open_sandbox_pool  # noqa: E402
from p2pfleet.exec.shm import share_arrays  # noqa: E402
from p2pfleet.exec.validate import validate_model  # noqa: E402
from p2pfleet.wire.kinds import Lease  # noqa: E402

#: model -> (samples per shard, micro-batch): a shard of ~0.05-1 s.
SHARDS = {"digits": (65536, 4096), "digits@64": (8192, 64), "magika": (256, 64),
          "mlp784": (4096, 64), "resnet50": (32, 8)}


def lease(model: bytes, samples: int, mb: int) -> Lease:
    return Lease(lease_id=b"b" * 16, job_id=b"j" * 16, shard=0,
                 model_digest=hashlib.sha256(model).digest(), model_size=len(model),
                 input_digest=b"\0" * 32, input_size=0, input_sources=(), token=b"t" * 16,
                 deadline_ms=600_000, micro_batch=mb, opt_level="all",
                 provider="CPUExecutionProvider", ort_versions="", samples=samples,
                 first_batch=0, credit=1)


def session(model: bytes, threads: int):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.use_deterministic_compute = True
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def proc_mem_mb(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "VmPeak"):
                    out[key] = round(int(rest.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


async def bench_model(pool, key: str, threads: int, repeat: int) -> dict:
    name = key.split("@")[0]
    model, input_name, make_inputs = MODELS[name]()
    samples, mb = SHARDS[key]
    x = make_inputs(samples)
    inputs = {input_name: x}
    res: dict = {"model_bytes": len(model), "samples": samples, "micro_batch": mb}
    t0 = time.perf_counter()
    for _ in range(3):
        validate_model(model, {input_name: (mb, *x.shape[1:])})
    res["validate_in_process_ms"] = round((time.perf_counter() - t0) / 3 * 1000, 2)
    box = await pool.get(key.encode())
    await box.start()
    t0 = trio.current_time()
    await box.validate(model, {input_name: (mb, *x.shape[1:])})
    res["validate_in_child_ms"] = round(box.last_validate_ms, 2)
    res["validate_in_child_wall_ms"] = round((trio.current_time() - t0) * 1000, 2)

    sess = session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    plan = plan_batches(samples, mb)

    def plain() -> tuple[float, float, bytes]:
        """(onnxruntime alone, + what a node must add: batch digests and the canonical
        outputs blob with its digest, as run_shard makes them) seconds, digest."""
        t = time.perf_counter()
        batches = [dict(zip(names, sess.run(None, {input_name: x[a:b]}))) for _k, a, b in plan]
        elapsed = time.perf_counter() - t
        digests = [tensors_digest(b) for b in batches]
        blob = encode_tensors(concat_batches(batches))
        digest = hashlib.sha256(blob).digest()
        assert len(digests) == len(plan)
        last_blob[:] = [blob]
        return elapsed, time.perf_counter() - t, digest

    last_blob: list[bytes] = []

    le = lease(model, samples, mb)
    cold = await run_shard(box, le, model, inputs, threads=threads)
    assert cold.status == "done", cold
    res["sandbox_load_ms"] = round(cold.load_ms, 1)
    res["child_mem_after_load_mb"] = proc_mem_mb(box.pid)
    plain()  # warm-up
    t_plain, t_plain_d, t_box, t_shared, cpu_parent = [], [], [], [], []
    digest = None
    shared = share_arrays(inputs)  # as a worker may prepare them while the previous shard runs
    for _ in range(repeat):
        t, td, digest = plain()
        t_plain.append(t)
        t_plain_d.append(td)
        t0, c0 = trio.current_time(), time.process_time()
        r = await run_shard(box, le, model, inputs, threads=threads)
        t_box.append(trio.current_time() - t0)
        cpu_parent.append(time.process_time() - c0)
        assert r.status == "done" and r.output_digest == cold.output_digest, (r.status, r.reason, r.detail, r.done)
        t0 = trio.current_time()
        r = await run_shard(box, le, model, shared, threads=threads)
        t_shared.append(trio.current_time() - t0)
        assert r.status == "done" and r.output_digest == cold.output_digest, (r.status, r.reason, r.detail, r.done)
    shared.close()
    res.update(_bounds(inputs, last_blob[0], statistics.median(t_plain)))
    res["shared_memory_path"] = box.last_shard_end is not None
    res["plain_samples_per_s"] = round(samples / statistics.median(t_plain))
    res["sandbox_samples_per_s"] = round(samples / statistics.median(t_box))
    res["plain_with_digests_samples_per_s"] = round(samples / statistics.median(t_plain_d))
    res["ratio"] = round(statistics.median(t_plain) / statistics.median(t_box), 3)
    res["ratio_vs_plain_with_digests"] = round(statistics.median(t_plain_d) / statistics.median(t_box), 3)
    res["sandbox_shared_inputs_samples_per_s"] = round(samples / statistics.median(t_shared))
    res["ratio_shared_inputs"] = round(statistics.median(t_plain) / statistics.median(t_shared), 3)
    res["ratio_shared_inputs_vs_plain_with_digests"] = round(
        statistics.median(t_plain_d) / statistics.median(t_shared), 3)
    res["parent_cpu_ms_per_shard"] = round(statistics.median(cpu_parent) * 1000, 2)
    res["digest_matches_plain"] = digest == cold.output_digest
    await pool.close(key.encode())
    return res


def _bounds(inputs: dict, blob: bytes, t_plain: float) -> dict:
    """What no sandbox can avoid, measured here: the sealed copy of the inputs (`share_arrays`,
    unless a worker made it while the previous shard ran) and the part of the outputs
    blob's SHA-256 that can only start after the last micro-batch (the canonical encoding
    is tensor by tensor, so every tensor after the first in name order; SHA-256 is
    sequential). `bound*`: plain / (plain + those), the best ratio even if everything
    else overlapped the computation perfectly."""
    outs = decode_tensors(blob)
    first = min(outs, key=lambda n: n.encode())
    suffix = memoryview(blob)[len(encode_tensors({first: outs[first]})):]
    copy_s, tail_s = [], []
    for _ in range(5):
        t = time.perf_counter()
        share_arrays(inputs).close()
        copy_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        hashlib.sha256(suffix).digest()
        tail_s.append(time.perf_counter() - t)
    copy, tail = statistics.median(copy_s), statistics.median(tail_s)
    return {"input_copy_ms": round(copy * 1000, 2), "tail_digest_ms": round(tail * 1000, 2),
            "tail_digest_bytes": len(suffix),
            "bound_shared_inputs": round(t_plain / (t_plain + tail), 3),
            "bound": round(t_plain / (t_plain + copy + tail), 3)}


async def bench_duty_cycle(threads_model: str = "mlp784", seconds: float = 3.0, nice: int = 0) -> dict:
    """A busy child under cpu_share 0.5 of one core: CPU-seconds used per wall second."""
    model, input_name, make_inputs = MODELS[threads_model]()
    samples, mb = SHARDS[threads_model]
    x = make_inputs(samples)
    out = {}
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    for share in (1.0, 0.5, 0.25):
        cfg = SandboxConfig(memory_mb=2048, cores=1, cpu_share=share, nice=nice)
        async with open_sandbox_pool(cfg) as pool:
            box = await pool.get(b"duty")
            le = lease(model, samples, mb)
            await run_shard(box, le, model, {input_name: x}, threads=1)
            cpu0, t0, n = _proc_cpu_s(box.pid, tick), trio.current_time(), 0
            while trio.current_time() - t0 < seconds:
                r = await run_shard(box, le, model, {input_name: x}, threads=1)
                assert r.status == "done"
                n += samples
            wall = trio.current_time() - t0
            out[f"share_{share}"] = {"cpu_per_wall_s": round((_proc_cpu_s(box.pid, tick) - cpu0) / wall, 3),
                                     "samples_per_s": round(n / wall), "stopped_s": round(box.stopped_s, 2)}
    return out


async def main_async(args) -> dict:
    report: dict = {}
    cfg = SandboxConfig(memory_mb=2048, nice=args.nice)
    async with open_sandbox_pool(cfg) as pool:
        starts, mems = [], []
        for i in range(args.starts):
            box = await pool.get(b"start-%d" % i)
            t0 = trio.current_time()
            hello = await box.start()
            starts.append(trio.current_time() - t0)
            mems.append(proc_mem_mb(box.pid))
            await pool.close(b"start-%d" % i)
        report["child"] = {"start_ms_median": round(statistics.median(starts) * 1000, 1),
                           "start_ms_max": round(max(starts) * 1000, 1),
                           "rss_mb_after_start": statistics.median(m.get("VmRSS", 0) for m in mems),
                           "vm_peak_mb_after_start": statistics.median(m.get("VmPeak", 0) for m in mems),
                           "net": hello.get("net"), "fs": hello.get("fs"), "user": hello.get("user"),
                           "memory_limit_mb": cfg.memory_mb}
        report["models"] = {}
        for key in args.models.split(","):
            report["models"][key] = await bench_model(pool, key, args.threads, args.repeat)
            print(key, json.dumps(report["models"][key]), file=sys.stderr)
    report["duty_cycle_1_core"] = await bench_duty_cycle(nice=args.nice)
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--models", default="digits,digits@64,magika,mlp784,resnet50")
    p.add_argument("--cpus", default="", help="pin this process and its children, e.g. 0,1")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the children (a node uses 10; 0 compares like with like)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    report: dict = {"ort_version": ort.__version__, "python": platform.python_version(),
                    "machine": platform.machine(), "cpus": sorted(os.sched_getaffinity(0)),
                    "threads": args.threads, "repeat": args.repeat, "child_nice": args.nice,
                    "load_avg_1m_before": round(os.getloadavg()[0], 2), "as_root": os.geteuid() == 0}
    report.update(trio.run(main_async, args))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        prof = measure(d, threads=1)
        report["hw_profile"] = {"hw_class": prof.hw_class.hex(), "bench_1_thread": prof.bench,
                                "measure_s": round(time.perf_counter() - t0, 2)}
    report["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
