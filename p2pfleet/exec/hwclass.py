"""Hardware class and reference benchmark of this node, cached per runtime and CPU.

Hardware class: a fixed canary model (built here with onnx.helper, weights and inputs from
a fixed generator) runs on fixed inputs at optimisation levels "disable" and "all"; the
hardware class is the output digest (outputs.tensors_digest) of its outputs, named
"<level>/<output>". Nodes whose CPUs pick the same kernels (same instruction set, same
onnxruntime) get the same class and usually bit-identical outputs: a hint for placing
replicas, not a proof of anything (a node can claim any class).

The canary: x[8,1,8,8] -> Conv(4 filters 3x3, pad 1) + bias -> Relu -> Flatten[8,256]
-> MatMul 256x64 + bias -> Tanh -> MatMul 64x32 -> LayerNormalization -> GELU (written out
with Erf) -> MatMul 32x10 -> Softmax; outputs "probs" [8,10] and "hidden" [8,32] (the GELU). Ops chosen for
instruction-set dependent kernels (GEMM/FMA, transcendental approximations, reductions).

Fixed values: `fixed_floats(tag, n)` = SHAKE-256(b"p2pfleet/canary/v1/" + tag) read as n
little-endian uint32 u, each mapped to ((u >> 8) * 2^-23 - 1) * scale: exact float32 values
in [-scale, scale), reproducible in any language.

Benchmark: samples/s of a 784-256-10 MLP (Relu), batch 64, optimisation "all", `threads`
intra-op threads, in this process, for about `bench_seconds`.

Both are cached in <cache_dir>/hwprofile.json under a key of the onnxruntime version, a
hash of the CPU's model and flags, and the thread count.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .outputs import tensors_digest

CACHE_FILE = "hwprofile.json"
CANARY_BATCH = 8
BENCH_BATCH = 64


@dataclass(frozen=True)
class HardwareProfile:
    hw_class: bytes      # 32 bytes: digest of the canary's outputs
    bench: float         # reference samples/s
    ort_version: str
    cpu: str             # "<machine> <model name>"
    threads: int = 1
    cached: bool = False


def fixed_floats(tag: str, n: int, scale: float = 1.0) -> np.ndarray:
    raw = hashlib.shake_256(b"p2pfleet/canary/v1/" + tag.encode()).digest(4 * n)
    u = np.frombuffer(raw, dtype="<u4")
    return (((u >> 8).astype(np.float64) * 2.0 ** -23 - 1.0) * scale).astype(np.float32)


def canary_model() -> bytes:
    """The canary model's bytes (deterministic for a given onnx version)."""
    from onnx import TensorProto, helper, numpy_helper

    def init(name: str, shape: tuple, scale: float):
        arr = fixed_floats(name, int(np.prod(shape)), scale).reshape(shape)
        return numpy_helper.from_array(arr, name)

    inits = [
        init("conv_w", (4, 1, 3, 3), 0.5), init("conv_b", (4,), 0.1),
        init("w1", (256, 64), 0.1), init("b1", (64,), 0.1),
        init("w2", (64, 32), 0.2), init("ln_scale", (32,), 1.0), init("ln_bias", (32,), 0.1),
        init("w3", (32, 10), 0.5),
        numpy_helper.from_array(np.array(np.sqrt(2.0), dtype=np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Tanh", ["a1"], ["t1"]),
        helper.make_node("MatMul", ["t1", "w2"], ["m2"]),
        helper.make_node("LayerNormalization", ["m2", "ln_scale", "ln_bias"], ["ln"], axis=-1),
        # GELU written out (x * 0.5 * (1 + erf(x / sqrt 2))): fused into one kernel at "all".
        helper.make_node("Div", ["ln", "sqrt2"], ["g1"]),
        helper.make_node("Erf", ["g1"], ["g2"]),
        helper.make_node("Add", ["g2", "one"], ["g3"]),
        helper.make_node("Mul", ["ln", "g3"], ["g4"]),
        helper.make_node("Mul", ["g4", "half"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "p2pfleet-canary-v1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [CANARY_BATCH, 1, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [CANARY_BATCH, 10]),
         helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [CANARY_BATCH, 32])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="p2pfleet")
    model.ir_version = 8
    return model.SerializeToString()


def canary_inputs() -> dict[str, np.ndarray]:
    return {"x": fixed_floats("x", CANARY_BATCH * 64, 2.0).reshape(CANARY_BATCH, 1, 8, 8)}


def reference_model() -> bytes:
    """The benchmark model: MLP 784-256-10 with Relu, batch dimension symbolic."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(fixed_floats(n, int(np.prod(s)), sc).reshape(s), n)
             for n, s, sc in (("r_w1", (784, 256), 0.05), ("r_b1", (256,), 0.1),
                              ("r_w2", (256, 10), 0.1), ("r_b2", (10,), 0.1))]
    nodes = [
        helper.make_node("Gemm", ["x", "r_w1", "r_b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Gemm", ["hr", "r_w2", "r_b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "p2pfleet-reference-mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="p2pfleet")
    model.ir_version = 8
    return model.SerializeToString()


def _session(model: bytes, level: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def hardware_class() -> bytes:
    """Digest of the canary's outputs at optimisation levels disable and all."""
    model, feeds = canary_model(), canary_inputs()
    named: dict[str, np.ndarray] = {}
    for level in ("disable", "all"):
        sess = _session(model, level, 1)
        names = [o.name for o in sess.get_outputs()]
        for name, value in zip(names, sess.run(None, feeds)):
            named[f"{level}/{name}"] = value
    return tensors_digest(named)


def benchmark(threads: int = 1, seconds: float = 1.5) -> float:
    """Samples/s of the reference MLP at batch 64 (at most `seconds` of timed runs)."""
    sess = _session(reference_model(), "all", threads)
    x = fixed_floats("bench_x", BENCH_BATCH * 784).reshape(BENCH_BATCH, 784)
    for _ in range(5):
        sess.run(None, {"x": x})
    runs, t0 = 0, time.perf_counter()
    while True:
        sess.run(None, {"x": x})
        runs += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            break
    return runs * BENCH_BATCH / elapsed


def cpu_description() -> tuple[str, str]:
    """("<machine> <model name>", sorted CPU flags as one string)."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if not model and key in ("model name", "hardware", "cpu model"):
                    model = value.strip()
                elif not flags and key in ("flags", "features"):
                    flags = " ".join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    return f"{platform.machine()} {model or platform.processor()}".strip(), flags


def cache_key(ort_version: str, cpu: str, flags: str, threads: int) -> str:
    h = hashlib.sha256(f"{cpu}\n{flags}".encode()).hexdigest()[:16]
    return f"ort={ort_version};cpu={h};threads={threads}"


def measure(cache_dir: str | os.PathLike, *, threads: int = 1, bench_seconds: float = 1.5,
            refresh: bool = False) -> HardwareProfile:
    """The node's hardware class and benchmark: from the cache if this onnxruntime, CPU and
    thread count were measured before (and `refresh` is false), else measured now (about
    `bench_seconds` plus ~0.2 s) and cached. Blocking: from trio, use trio.to_thread."""
    import onnxruntime as ort

    if not 1 <= threads <= 1024:
        raise ValueError(f"threads must be in 1..1024, got {threads}")
    ort_version = ort.__version__
    cpu, flags = cpu_description()
    key = cache_key(ort_version, cpu, flags, threads)
    path = Path(cache_dir) / CACHE_FILE
    entries: dict = {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("version") == 1 and isinstance(data.get("entries"), dict):
            entries = data["entries"]
    except (OSError, ValueError):
        pass
    hit = entries.get(key)
    if not refresh and isinstance(hit, dict):
        try:
            hw = bytes.fromhex(hit["hw_class"])
            bench = float(hit["bench"])
            if len(hw) == 32 and bench > 0:
                return HardwareProfile(hw, bench, ort_version, cpu, threads, cached=True)
        except (KeyError, TypeError, ValueError):
            pass
    hw = hardware_class()
    bench = benchmark(threads, bench_seconds)
    entries[key] = {"hw_class": hw.hex(), "bench": round(bench, 1), "ort_version": ort_version,
                    "cpu": cpu, "threads": threads}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{CACHE_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True),
                   encoding="utf-8")
    os.replace(tmp, path)
    return HardwareProfile(hw, round(bench, 1), ort_version, cpu, threads, cached=False)


__all__ = ["HardwareProfile", "measure", "hardware_class", "benchmark", "canary_model",
           "canary_inputs", "reference_model", "fixed_floats", "cpu_description"]


def main(argv: list[str] | None = None) -> int:
    """`python -m p2pfleet.exec.hwclass CACHE_DIR [THREADS]`: print the profile as JSON.

    The node runs this in a child process at start, so its own process never imports
    onnxruntime (about 40 MB of resident memory a car would carry all day for nothing)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m p2pfleet.exec.hwclass CACHE_DIR [THREADS]", file=sys.stderr)
        return 2
    profile = measure(args[0], threads=int(args[1]) if len(args) == 2 else 1)
    print(json.dumps({"hw_class": profile.hw_class.hex(), "bench": profile.bench,
                      "ort_version": profile.ort_version, "cpu": profile.cpu,
                      "threads": profile.threads, "cached": profile.cached}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
