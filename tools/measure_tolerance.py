#!/usr/bin/env python3
"""Measure, per sample, how far honest runs and the fp16-weights cheat are from a reference
run: the numbers behind exec.outputs' TOLERANCE and SCALE_FLOOR (specs/verification.md,
section 2).

For each model (p2pfleet/zoo.py: digits, magika, mlp784, small, canary; the MLP of
tests/integration/workerkit.py with normal inputs, and with the inputs of the attack test,
one sample in 30 scaled by 1e6), the reference is onnxruntime at optimisation level "all",
1 intra-op thread, micro-batches of 64. Against it:

- honest variants: a new session (rerun), 2 threads, levels disable/basic/extended,
  micro-batches of 1 and of the whole set, and (with --qemu-cpus, when qemu-x86_64 is on
  PATH: Debian's qemu-user) the same run on emulated older CPUs (e.g. SandyBridge: AVX, no
  FMA; Haswell: AVX2 + FMA; this machine's own instruction set is the reference), on the
  first --qemu-samples samples (magika at most 16: emulated, it takes ~5 s a sample);
  and (with --other-python) the same run by another interpreter with another onnxruntime
  (e.g. a scratch venv with onnxruntime 1.19.2, numpy and onnx);
- the cheat: every float constant rounded to float16 (zoo.fp16_weights), level "all".

Per float output and per sample (row i of axis 0), with a_i, b_i the row in the two runs:

    d_i   = max |a_i - b_i|                    (absolute error of the row)
    s_i   = max(max |a_i|, max |b_i|)          (the row's own magnitude)
    row_i = d_i / s_i                          (0 when d_i = 0)

and a sample's error is the largest row_i over the model's float outputs. Reported per
model and variant: the largest sample error (honest: the noise to stay above), the
distribution of sample errors (fp16: min, p10, p50, max, and the share of samples above
the current TOLERANCE), the largest absolute row error and the smallest row magnitude (for
the floor), the old whole-tensor error (max |a-b| / max over the whole shard) for
comparison, and the largest per-element relative error |a-b| / max(|a|, |b|, floor) (to
judge whether a per-element rule would hold honest noise).

    .venv/bin/python tools/measure_tolerance.py [--samples 256] [--models a,b]
        [--qemu-cpus SandyBridge,Haswell] [--qemu-samples 64] [--other-python PY] [--json FILE]

JSON on stdout (and in FILE; the last full run is kept in tools/measure_tolerance.last.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests" / "integration"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import onnxruntime as ort  # noqa: E402

from p2pfleet import zoo  # noqa: E402
from p2pfleet.exec import outputs as O  # noqa: E402

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
REFERENCE = {"level": "all", "threads": 1, "micro_batch": 64, "weights": "fp32"}
HONEST = {
    "rerun": {},
    "threads2": {"threads": 2},
    "level_disable": {"level": "disable"},
    "level_basic": {"level": "basic"},
    "level_extended": {"level": "extended"},
    "batch1": {"micro_batch": 1},
    "batch_whole": {"micro_batch": 0},
}
CHEATS = {"fp16": {"weights": "fp16"}}
#: samples run under emulation (emulated onnxruntime is 100-1000x slower; magika ~5 s/sample)
QEMU_SAMPLES_CAP = {"magika": 16}
#: every `ATTACK_EVERY`-th sample of the attack inputs is scaled by `ATTACK_SCALE`
ATTACK_EVERY, ATTACK_SCALE = 30, 1e6


def _workerkit_mlp(attack: bool):
    def build():
        from workerkit import mlp_model  # tests/integration/workerkit.py

        def inputs(n: int) -> np.ndarray:
            x = np.random.default_rng(5).standard_normal((n, 16)).astype(np.float32)
            if attack:
                x[::ATTACK_EVERY] *= np.float32(ATTACK_SCALE)
            return x

        return mlp_model(seed=3), "x", inputs
    return build


MODELS = dict(zoo.MODELS)
MODELS["workerkit_mlp"] = _workerkit_mlp(False)
MODELS["workerkit_mlp_attack"] = _workerkit_mlp(True)


def run(name: str, n: int, level: str, threads: int, micro_batch: int, weights: str) -> dict:
    """Outputs of model `name` on its first n samples, run in micro-batches (0: all at once)."""
    model, input_name, inputs = MODELS[name]()
    if weights == "fp16":
        model = zoo.fp16_weights(model)
    return run_model(model, input_name, inputs(n), level, threads, micro_batch)


def run_model(model: bytes, input_name: str, x: np.ndarray, level: str, threads: int,
              micro_batch: int, weights: str = "fp32") -> dict:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    dim0 = sess.get_inputs()[0].shape[0]
    mb = len(x) if micro_batch == 0 or isinstance(dim0, int) else micro_batch
    names = [o.name for o in sess.get_outputs()]
    batches = [dict(zip(names, sess.run(names, {input_name: x[k:k + mb]})))
               for k in range(0, len(x), mb)]
    return {k: np.asarray(v) for k, v in O.concat_batches(batches).items()}


def fixed_batch(name: str) -> bool:
    model, _, _ = MODELS[name]()
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return isinstance(sess.get_inputs()[0].shape[0], int)


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64)
    return a.reshape(1, 1) if a.ndim == 0 else a.reshape(a.shape[0], int(np.prod(a.shape[1:])))


def measure_pair(ref: dict, other: dict, floor: float) -> dict:
    """The per-sample numbers of the module docstring for one pair of runs."""
    sample_err = None
    abs_err, min_scale, whole, elem = 0.0, float("inf"), 0.0, 0.0
    for name in sorted(ref):
        a, b = ref[name], other[name]
        if a.dtype.kind != "f":
            if not np.array_equal(a, b):
                whole = elem = float("inf")
                err = np.full(len(a), np.inf)
                sample_err = err if sample_err is None else np.maximum(sample_err, err)
            continue
        ra, rb = _rows(a), _rows(b)
        if not (np.isfinite(ra).all() and np.isfinite(rb).all()):
            raise SystemExit(f"non-finite outputs in {name}: not measured")
        d = np.abs(ra - rb)
        drow = d.max(axis=1) if d.shape[1] else np.zeros(len(d))
        srow = np.maximum(np.abs(ra).max(axis=1), np.abs(rb).max(axis=1)) if d.shape[1] else np.zeros(len(d))
        err = np.where(drow == 0, 0.0, drow / np.where(srow == 0, 1.0, srow))
        sample_err = err if sample_err is None else np.maximum(sample_err, err)
        abs_err = max(abs_err, float(drow.max(initial=0.0)))
        min_scale = min(min_scale, float(srow.min(initial=np.inf)))
        whole = max(whole, _whole(a, b))
        den = np.maximum(np.maximum(np.abs(ra), np.abs(rb)), floor)
        elem = max(elem, float((d / den).max(initial=0.0)))
    e = sample_err if sample_err is not None else np.zeros(0)
    q = (lambda p: float(np.percentile(e, p))) if len(e) else (lambda p: 0.0)
    return {
        "samples": int(len(e)),
        "exact": bool(all(np.array_equal(ref[k], other[k]) for k in ref)),
        "sample_error": {"min": q(0), "p10": q(10), "p50": q(50), "max": q(100)},
        "share_above_tolerance": float(np.mean(e > O.TOLERANCE)) if len(e) else 0.0,
        "share_above_4x_tolerance": float(np.mean(e > 4 * O.TOLERANCE)) if len(e) else 0.0,
        "max_abs_row_error": abs_err,
        "min_row_scale": None if min_scale == float("inf") else min_scale,
        "whole_shard_error": whole,
        "max_element_rel_error": elem,
    }


def _whole(a: np.ndarray, b: np.ndarray) -> float:
    """The old rule: max |a-b| / max over the whole tensor."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = float(np.abs(a64 - b64).max(initial=0.0))
    if d == 0:
        return 0.0
    return d / max(float(np.abs(a64).max()), float(np.abs(b64).max()))


def dump(model_file: str, out: str) -> None:
    """--dump: the reference run of a model and inputs written by `external_run` (the very
    bytes the host uses: digits is trained when built, and training under another
    instruction set need not give the same weights)."""
    with np.load(model_file) as z:
        model, input_name, x = z["model"].tobytes(), str(z["input_name"]), z["x"]
    settings = {k: v for k, v in REFERENCE.items() if k != "weights"}
    np.savez(out, **run_model(model, input_name, x, **settings))


def external_run(prefix: list[str], name: str, n: int) -> dict:
    """The reference run in another process: `prefix` is the interpreter to use (another
    Python with another onnxruntime, or this one under qemu-x86_64 -cpu CPU)."""
    model, input_name, inputs = MODELS[name]()
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.npz", Path(tmp) / "out.npz"
        np.savez(job, model=np.frombuffer(model, np.uint8), input_name=np.array(input_name),
                 x=inputs(n))
        subprocess.run([*prefix, __file__, "--dump", str(job), "--out", str(out)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with np.load(out) as z:
            return {k: z[k] for k in z.files}


def other_ort_version(python: str) -> str:
    return subprocess.run([python, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                          check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--qemu-cpus", default="", help="e.g. SandyBridge,Haswell (needs qemu-user)")
    ap.add_argument("--qemu-samples", type=int, default=64,
                    help="samples per emulated run (magika: at most 16)")
    ap.add_argument("--other-python", default="",
                    help="comma-separated interpreters with another onnxruntime (and numpy, onnx)")
    ap.add_argument("--json", help="also write the JSON here")
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.dump:
        dump(args.dump, args.out)
        return
    floor = getattr(O, "SCALE_FLOOR", 0.0)
    qemu = shutil.which("qemu-x86_64")
    cpus = [c for c in args.qemu_cpus.split(",") if c] if qemu else []
    pythons = [p for p in args.other_python.split(",") if p]
    report: dict = {
        "what": "per-sample error of honest variants and of the fp16-weights cheat against a "
                "reference run (tools/measure_tolerance.py docstring)",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": _cpu_model(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "qemu_cpus": cpus,
                    "other_onnxruntime": [other_ort_version(p) for p in pythons]},
        "samples": args.samples, "reference": REFERENCE,
        "tolerance": O.TOLERANCE, "scale_floor": floor, "models": {},
    }
    for name in args.models.split(","):
        print(f"measuring {name}", file=sys.stderr)
        ref = run(name, args.samples, **REFERENCE)
        rows: dict = {}
        for variant, over in {**HONEST, **CHEATS}.items():
            if variant.startswith("batch") and fixed_batch(name):
                continue
            other = run(name, args.samples, **{**REFERENCE, **over})
            rows[variant] = measure_pair(ref, other, floor)
        for python in pythons:
            version = other_ort_version(python)
            print(f"measuring {name} with onnxruntime {version}", file=sys.stderr)
            rows[f"ort_{version}"] = measure_pair(ref, external_run([python], name, args.samples), floor)
        nq = min(args.samples, args.qemu_samples, QEMU_SAMPLES_CAP.get(name, args.samples))
        ref_q = run(name, nq, **REFERENCE) if cpus else None
        for cpu in cpus:
            print(f"measuring {name} on {cpu} (qemu, {nq} samples)", file=sys.stderr)
            rows[f"cpu_{cpu}"] = measure_pair(ref_q, external_run([qemu, "-cpu", cpu, sys.executable],
                                                                  name, nq), floor)
        honest = {k: v for k, v in rows.items() if k not in CHEATS}
        rows["summary"] = {
            "honest_max_sample_error": max(v["sample_error"]["max"] for v in honest.values()),
            "honest_max_element_rel_error": max(v["max_element_rel_error"] for v in honest.values()),
            "honest_max_abs_row_error": max(v["max_abs_row_error"] for v in honest.values()),
            "fp16_sample_error": rows["fp16"]["sample_error"],
            "fp16_share_above_tolerance": rows["fp16"]["share_above_tolerance"],
        }
        report["models"][name] = rows
    allm = report["models"].values()
    report["overall"] = {
        "honest_max_sample_error": max(m["summary"]["honest_max_sample_error"] for m in allm),
        "fp16_min_shard_error": min(m["fp16"]["sample_error"]["max"] for m in allm),
        "fp16_min_median_sample_error": min(m["fp16"]["sample_error"]["p50"] for m in allm),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
