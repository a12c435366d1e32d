"""Hostile models against each layer of the sandbox, validation in the child, filesystem
confinement, memory from the node's setting, bounded threads and the CPU-share duty cycle
(p2pfleet/exec/{sandbox,child,runner}.py, real child processes)."""

from __future__ import annotations

import hashlib
import os
import resource
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import trio
from onnx import TensorProto, helper, numpy_helper

from p2pfleet.live.config import load_config
from p2pfleet.exec.limits import ModelLimits
from p2pfleet.exec.runner import run_shard
from p2pfleet.exec.sandbox import SandboxConfig, SandboxFailure, measured_memory_mb, open_sandbox_pool, sandbox_config
from p2pfleet.exec.validate import ModelRefused
from p2pfleet.wire.kinds import Lease

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")
AS_ROOT = os.geteuid() == 0
F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, inits=()) -> bytes:
    m = helper.make_model(helper.make_graph(nodes, "t", inputs, outputs, list(inits)),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def vi(name, dims, elem=F):
    return helper.make_tensor_value_info(name, elem, dims)


def relu() -> bytes:
    return _model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["N", 4])], [vi("y", ["N", 4])])


def external_data(location: str) -> bytes:
    """y = x + W, W's bytes 'outside the model' at `location` (notes/onnx.md)."""
    w = numpy_helper.from_array(np.ones(4, np.float32), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    return _model([helper.make_node("Add", ["x", "W"], ["y"], name="add")], [vi("x", ["N", 4])],
                  [vi("y", ["N", 4])], [w])


def constant_of_shape_bomb() -> bytes:
    """~150 bytes asking for 60000 x 60000 floats."""
    shape = numpy_helper.from_array(np.array([60000, 60000], np.int64), "shape")
    n = helper.make_node("ConstantOfShape", ["shape"], ["big"], name="bomb",
                         value=helper.make_tensor("v", F, [1], [1.0]))
    add = helper.make_node("Add", ["x", "big"], ["y"])
    return _model([n, add], [vi("x", ["N", 1])], [vi("y", [60000, 60000])], [shape])


def propagation_escape(length: int, adds: int = 10) -> bytes:
    """~345 bytes: a 1-D tensor whose length only onnx's data propagation learns
    (Expand(x, Shape(x) * k)), then Adds over it. onnx holds each element as a ~70-byte
    dim per propagating op: at 10^6 validation took ~1 s and ~800 MB in the caller; at 10^7
    it would take ~8 GB. The validator's too-complex budget cannot see it (execution.md 3.5)."""
    nodes = [helper.make_node("Shape", ["x"], ["sx"]), helper.make_node("Mul", ["sx", "k"], ["s"]),
             helper.make_node("Expand", ["x", "s"], ["e0"])]
    for i in range(adds):
        nodes.append(helper.make_node("Add", [f"e{i}", f"e{i}"], [f"e{i + 1}"]))
    nodes.append(helper.make_node("ReduceSum", [f"e{adds}"], ["y"], keepdims=0))
    k = numpy_helper.from_array(np.array([length], np.int64), "k")
    return _model(nodes, [vi("x", [1], I64)], [vi("y", [], I64)], [k])


def expand_hog() -> bytes:
    """Expand one float to 60000 x 60000 (14.4 GB) at run time; declared output unbounded."""
    shape = numpy_helper.from_array(np.array([60000, 60000], dtype=np.int64), "shape")
    return _model([helper.make_node("Expand", ["x", "shape"], ["y"])], [vi("x", ["N"])],
                  [vi("y", ["A", "B"])], [shape])


def squaring_chain(layers: int) -> bytes:
    """x[N,N] -> x @ x, repeated: passes validation (MACs under 10^12), runs for long."""
    nodes, prev = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, prev], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return _model(nodes, [vi("x", ["N", "N"])], [vi("y", ["N", "N"])])


def lease_for(model: bytes, samples: int, micro_batch: int, deadline_ms: int = 30_000) -> Lease:
    return Lease(lease_id=hashlib.sha256(model).digest()[:16], job_id=b"j" * 16, shard=0,
                 model_digest=hashlib.sha256(model).digest(), model_size=len(model),
                 input_digest=b"\0" * 32, input_size=0, input_sources=(), token=b"t" * 16,
                 deadline_ms=deadline_ms, micro_batch=micro_batch, opt_level="all",
                 provider="CPUExecutionProvider", ort_versions="", samples=samples,
                 first_batch=0, credit=1)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- each hostile model, the layer that stops it, the error it gives -----------------------
@dataclass(frozen=True)
class Hostile:
    id: str
    build: object
    inputs: object
    layer: str                  # "validation rule", "memory limit", "time limit"
    reason: str                 # ShardOutcome.reason
    detail: str                 # in ShardOutcome.detail
    rule: str | None = None
    restarts: bool = False      # the child is killed (and restarted for the next shard)
    memory_mb: int = 1024
    kw: tuple = ()              # more run_shard keywords


X4 = lambda: {"x": np.ones((2, 4), np.float32)}  # noqa: E731
HOSTILE = [
    Hostile("external data ../../etc/passwd", lambda: external_data("../../etc/passwd"), X4,
            "validation rule", "invalid_model", "external-data: tensor 'W'", "external-data"),
    Hostile("ConstantOfShape 60000x60000", constant_of_shape_bomb, lambda: {"x": np.ones((1, 1), np.float32)},
            "validation rule", "invalid_model", "tensor-too-large: node 'bomb'", "tensor-too-large"),
    Hostile("data propagation escape, 10^7 (validation needs ~8 GB)",
            lambda: propagation_escape(10**7), lambda: {"x": np.ones(1, np.int64)},
            "memory limit", "out_of_memory", "validation ran out of memory", restarts=True),
    Hostile("data propagation escape, 10^6 (validation ~1 s)", lambda: propagation_escape(10**6),
            lambda: {"x": np.ones(1, np.int64)}, "time limit", "timeout", "SIGALRM",
            restarts=True, memory_mb=2048, kw=(("validate_timeout_s", 0.3),)),
    Hostile("Expand to 14.4 GB at run time (validation skipped)", expand_hog,
            lambda: {"x": np.ones(1, np.float32)}, "memory limit", "out_of_memory", "",
            restarts=True, kw=(("validate", False),)),
    Hostile("400 chained 1024^3 MatMuls (passes validation)", lambda: squaring_chain(400),
            lambda: {"x": np.ones((1024, 1024), np.float32)}, "time limit", "timeout",
            "wall clock", restarts=True, kw=(("time_limit_s", 1.5),)),
]


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.id)
async def test_hostile_model_is_stopped_by_its_layer_and_the_node_lives_on(case: Hostile):
    model, inputs = case.build(), case.inputs()
    samples = len(next(iter(inputs.values())))
    rss_before = _rss_mb()
    async with open_sandbox_pool(SandboxConfig(memory_mb=case.memory_mb, kill_grace_s=1.0)) as pool:
        box = await pool.get(b"publisher")
        await box.start()
        pid = box.pid
        out = await run_shard(box, lease_for(model, samples, samples), model, inputs, **dict(case.kw))
        assert (out.status, out.reason, out.rule) == ("failed", case.reason, case.rule), out
        assert case.detail in out.detail, out.detail
        if case.rule:
            assert out.detail.startswith(case.rule + ":")  # execution.md 3.7
        assert box.alive is (not case.restarts)
        good = relu()
        ok = await run_shard(box, lease_for(good, 3, 3), good, {"x": np.ones((3, 4), np.float32)})
        assert ok.status == "done", ok
        assert (box.pid != pid) is case.restarts
    assert _rss_mb() - rss_before < 100  # the node (this process) never held the model's memory


async def test_validate_in_the_child_returns_what_validate_model_returns():
    from p2pfleet.exec.validate import validate_model

    model = relu()
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024)) as pool:
        box = await pool.get(b"publisher")
        got = await box.validate(model, {"x": (5, 4)})
        assert got == validate_model(model, {"x": (5, 4)})
        assert box.last_validate_ms > 0
        again = await box.validate(model, {"x": (5, 4)})
        assert again == got and box.last_validate_ms == 0.0  # cached
        with pytest.raises(ModelRefused) as info:
            await box.validate(model, {"x": (5, 4)}, ModelLimits(min_ort_version="99"))
        assert info.value.rule == "runtime-too-old" and info.value.over_limit
        with pytest.raises(ModelRefused) as info:
            await box.validate(model, {"x": (5, 3)})
        assert info.value.rule == "input-mismatch" and box.alive
        with pytest.raises(SandboxFailure) as failed:
            await box.validate(propagation_escape(10**7), {"x": (1,)})
        assert failed.value.reason == "out_of_memory" and not box.alive


# --- filesystem confinement ------------------------------------------------------------------
@pytest.mark.skipif(not AS_ROOT, reason="chroot needs root (or a user namespace)")
async def test_child_cannot_read_the_host_filesystem():
    assert os.access("/etc/hostname", os.R_OK) or os.access("/etc/passwd", os.R_OK)
    path = "/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd"
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024, debug=True)) as pool:
        box = await pool.get(b"publisher")
        hello = await box.start()
        assert hello["fs"] == "chroot" and hello["warnings"] == []
        assert (await box.debug("open", path=path))["result"] != "opened"
        assert (await box.debug("whoami"))["cwd"] == "/"
        model = relu()  # onnxruntime still works inside the empty root
        ok = await run_shard(box, lease_for(model, 3, 3), model, {"x": np.ones((3, 4), np.float32)})
        assert ok.status == "done", ok
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024, debug=True, confine_fs=False)) as pool:
        box = await pool.get(b"publisher")
        hello = await box.start()
        assert hello["fs"] == "host" and any("every file" in w for w in hello["warnings"])
        assert (await box.debug("open", path=path))["result"] == "opened"  # world-readable


@pytest.mark.skipif(not AS_ROOT, reason="needs root to become another unprivileged user")
def test_unprivileged_child_is_confined_through_its_user_namespace():
    # A node that is not root: the child's isolation steps in a fork as nobody, in a
    # private directory of its own (as the parent makes for a real child).
    import shutil
    import tempfile

    from p2pfleet.exec import child

    root = tempfile.mkdtemp(prefix="p2pfleet-test-")
    os.chown(root, 65534, 65534)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the fork
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.chdir(root)
            libc = child._libc()
            net, _ = child.isolate_network({"isolation": "auto"}, libc)
            fs, warnings = child.confine_filesystem({}, net, libc)
            try:
                open("/etc/passwd", "rb").close()
                result = "opened"
            except OSError as e:
                result = type(e).__name__
            try:  # the classic escape needs CAP_SYS_CHROOT, dropped with the rest
                os.mkdir("/x")
                os.chroot("/x")
                escaped = "chroot allowed"
            except OSError as e:
                escaped = type(e).__name__
            os.write(write_end, repr((net, fs, warnings, result, escaped)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 4096):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    shutil.rmtree(root, ignore_errors=True)
    net, fs, warnings, result, escaped = eval(data.decode())  # noqa: S307 - our own fork's repr
    if net == "host":
        assert fs == "host" and any("every file" in w for w in warnings)
        pytest.skip("this kernel refuses unprivileged user namespaces")
    assert (fs, warnings, result) == ("chroot", [], "FileNotFoundError")
    assert escaped != "chroot allowed"


# --- memory, threads and CPU share from the node's configuration -----------------------------
def test_sandbox_config_follows_the_node_configuration():
    cfg = load_config(None, env={"P2PFLEET_HARDWARE_MEMORY_MB": "1536", "P2PFLEET_HARDWARE_CORES": "4",
                                 "P2PFLEET_POLICY_CPU_SHARE": "0.5", "P2PFLEET_POLICY_MAX_THREADS": "3"})
    sc = sandbox_config(cfg, debug=True)
    assert (sc.memory_mb, sc.cores, sc.cpu_share, sc.max_threads, sc.debug) == (1536, 4, 0.5, 3, True)
    measured = sandbox_config(load_config(None, env={}))
    assert measured.memory_mb == measured_memory_mb() >= 1024
    assert SandboxConfig(memory_mb=0).memory_mb == measured_memory_mb()
    lim = ModelLimits.for_memory(1536)
    assert lim.max_peak_bytes == (1536 - 512) << 20 and lim.max_tensor_bytes == lim.max_peak_bytes
    assert ModelLimits.for_memory(64 * 1024) .max_peak_bytes == ModelLimits().max_peak_bytes
    with pytest.raises(ValueError):
        SandboxConfig(cpu_share=0)


async def test_threads_are_bounded_by_policy_and_share():
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024, cores=4, cpu_share=0.5, max_threads=3)) as pool:
        box = await pool.get(b"publisher")
        assert [box.threads_for(n) for n in (1, 2, 3, 8)] == [1, 2, 2, 2]
        pool.set_cpu_share(1.0)
        assert box.threads_for(8) == 3 and box.cpu_limit is None
        model = relu()
        out = await run_shard(box, lease_for(model, 3, 3), model, {"x": np.ones((3, 4), np.float32)},
                              threads=64)
        assert out.status == "done" and box.loaded.key.endswith("#t3")


async def test_cpu_share_duty_cycle_holds_a_busy_child_to_half_a_core():
    # One busy thread under a 0.5 share of one core: about half a core of CPU over 2 s.
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024, debug=True, cores=1)) as pool:
        box = await pool.get(b"publisher")
        await box.start()

        async def busy(seconds: float) -> float:
            before = (await box.ping())["cpu_s"]
            t0 = trio.current_time()
            spun = await box.debug("spin", s=seconds, timeout_s=10)
            return (spun["cpu_s"] - before) / (trio.current_time() - t0)

        whole = await busy(1.0)  # below 1 only when other processes compete for the core
        pool.set_cpu_share(0.5)
        half = await busy(2.0)
        assert half < 0.62, (half, whole)
        if whole > 0.9:  # an idle machine: the duty cycle did the limiting, and not too much
            assert half > 0.38 and box.stopped_s > 0.5, (half, whole, box.stopped_s)


# --- the child's life ------------------------------------------------------------------------
async def test_an_idle_child_outlives_trio_worker_threads():
    # trio's idle worker threads exit after 10 s; a child forked from one of them got its
    # parent-death signal then. The sandbox forks from the trio thread itself.
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024)) as pool:
        box = await pool.get(b"publisher")
        await box.start()
        pid = box.pid
        await trio.sleep(11)
        assert (await box.ping())["pid"] == pid and box.starts == 1


PARENT = """
import functools, os, signal, sys, trio
from p2pfleet.exec.sandbox import SandboxConfig, open_sandbox_pool

async def main():
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024, debug=True, cores=1, cpu_share=0.1)) as pool:
        box = await pool.get(b"publisher")
        await box.start()
        print(box.pid, flush=True)
        async with trio.open_nursery() as n:
            n.start_soon(functools.partial(box.debug, "spin", timeout_s=30.0, s=20))
            while True:  # until the duty cycle has stopped the child (state T)
                with open(f"/proc/{box.pid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"T":
                        break
                await trio.sleep(0.002)
            os.kill(os.getpid(), signal.SIGKILL)  # the node dies while its child is stopped

trio.run(main)
"""


async def test_the_child_dies_with_the_node_even_while_stopped():
    proc = await trio.run_process([sys.executable, "-c", PARENT], capture_stdout=True, check=False,
                                  cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert proc.returncode == -9
    pid = int(proc.stdout.split()[0])
    with trio.fail_after(5):
        while True:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except FileNotFoundError:
                break
            if state == b"Z":  # gone, waiting for init to reap it
                break
            await trio.sleep(0.05)
