"""The sandbox's shared-memory data path (p2pfleet/exec/shm.py, Sandbox.run_shared) with
real child processes: outputs bit-identical to onnxruntime in this process, a child lying
about its outputs, sealed inputs, no leaked fds."""

from __future__ import annotations

import hashlib
import mmap
import os
import sys

import numpy as np
import onnxruntime as ort
import pytest
import trio

from p2pfleet.exec.outputs import concat_batches, encode_tensors
from p2pfleet.exec.runner import plan_batches, run_shard
from p2pfleet.exec.sandbox import SandboxConfig, open_sandbox_pool
from p2pfleet.exec.shm import share_arrays
from p2pfleet.wire.kinds import Lease
from p2pfleet.zoo import MODELS

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")
CFG = SandboxConfig(memory_mb=1024, debug=True, kill_grace_s=1.0)


def lease_for(model: bytes, samples: int, micro_batch: int, first_batch: int = 0) -> Lease:
    return Lease(lease_id=hashlib.sha256(model).digest()[:16], job_id=b"j" * 16, shard=0,
                 model_digest=hashlib.sha256(model).digest(), model_size=len(model),
                 input_digest=b"\0" * 32, input_size=0, input_sources=(), token=b"t" * 16,
                 deadline_ms=60_000, micro_batch=micro_batch, opt_level="all",
                 provider="CPUExecutionProvider", ort_versions="", samples=samples,
                 first_batch=first_batch, credit=1)


def direct_blob(model: bytes, inputs: dict, micro_batch: int, first_batch: int = 0) -> bytes:
    """The shard's outputs blob made in this process, straight through onnxruntime."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    samples = len(next(iter(inputs.values())))
    batches = [dict(zip(names, sess.run(None, {n: v[a:b] for n, v in inputs.items()})))
               for _k, a, b in plan_batches(samples, micro_batch, first_batch)]
    return encode_tensors(concat_batches(batches))


#: zoo model -> (samples, micro-batch); the canary's batch is fixed at 8.
SHARDS = {"digits": (300, 64), "magika": (40, 16), "mlp784": (200, 64), "small": (77, 10),
          "canary": (8, 8)}


@pytest.fixture
async def pool():
    async with open_sandbox_pool(CFG) as p:
        yield p


@pytest.mark.parametrize("name", sorted(SHARDS))
async def test_outputs_are_bit_identical_to_onnxruntime_for_every_zoo_model(pool, name):
    model, input_name, make = MODELS[name]()  # the test extras bring scikit-learn and magika
    samples, mb = SHARDS[name]
    inputs = {input_name: make(samples)}
    box = await pool.get(b"publisher-a")
    out = await run_shard(box, lease_for(model, samples, mb), model, inputs, threads=2)
    assert out.status == "done", out
    assert box.last_shard_end is not None  # it ran over shared memory, not the pipe
    assert out.outputs == direct_blob(model, inputs, mb)
    # Inputs already in a sealed memfd (as a worker may prepare them): the same bytes.
    with share_arrays(inputs) as shared:
        again = await run_shard(box, lease_for(model, samples, mb), model, shared, threads=1)
    assert again.output_digest == out.output_digest
    if samples > mb:  # a resumed shard covers only its own micro-batches
        rest = await run_shard(box, lease_for(model, samples, mb, first_batch=1), model, inputs)
        assert rest.status == "done" and rest.outputs == direct_blob(model, inputs, mb, 1)


async def test_a_child_claiming_outputs_beyond_the_bound_is_refused(pool):
    model, input_name, make = MODELS["small"]()
    inputs = {input_name: make(40)}
    box = await pool.get(b"publisher-a")
    good = await run_shard(box, lease_for(model, 40, 10), model, inputs)
    assert good.status == "done"
    pid = box.pid
    await box.debug("lie", factor=1000)  # claims 1000x the rows it wrote
    out = await run_shard(box, lease_for(model, 40, 10), model, inputs)
    assert (out.status, out.reason, out.done) == ("failed", "crash", 0), out
    assert "beyond the 400-byte bound" in out.detail and "probs" in out.detail, out.detail
    assert not box.alive  # a child that breaks the protocol is killed
    again = await run_shard(box, lease_for(model, 40, 10), model, inputs)
    assert again.status == "done" and again.output_digest == good.output_digest
    assert box.pid != pid


async def test_sealed_inputs_cannot_be_written_by_the_node_or_the_child(pool):
    x = np.arange(64 * 32, dtype=np.float32).reshape(64, 32)
    with share_arrays({"x": x}) as shared:
        assert np.array_equal(shared["x"], x) and not shared["x"].flags.writeable
        with pytest.raises(PermissionError):
            os.pwrite(shared.fd, b"\xff" * 4, 0)
        with pytest.raises(PermissionError):
            mmap.mmap(shared.fd, shared.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.ftruncate(shared.fd, 0)
        assert np.array_equal(shared["x"], x)
        model, _, _ = MODELS["small"]()
        box = await pool.get(b"publisher-a")
        await box.start()
        await box.debug("write_input")  # the child tries to map the next shard's inputs writable
        out = await run_shard(box, lease_for(model, 64, 16), model, shared)
        assert out.status == "done", out
        assert box.last_shard_end["write_input"] == "EPERM"
        assert np.array_equal(shared["x"], x)


def _fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_no_fds_leak_over_many_shards(pool):
    model, input_name, make = MODELS["small"]()
    inputs = {input_name: make(50)}
    box = await pool.get(b"publisher-a")
    assert (await run_shard(box, lease_for(model, 50, 8), model, inputs)).status == "done"
    ours, theirs = _fds(), _fds(box.pid)
    for k in range(40):
        stop = trio.Event()

        def progress(p, k=k, stop=stop):
            if k % 4 == 1 and p.done == 2:
                stop.set()  # a hand-back mid-shard

        out = await run_shard(box, lease_for(model, 50, 8), model, inputs, stop=stop,
                              on_progress=progress)
        assert (out.status, out.done) == (("stopped", 3) if k % 4 == 1 else ("done", 7)) \
            or (out.status, out.done) == ("stopped", 2), out
    bad = {input_name: inputs[input_name].astype(np.float64)}
    assert (await run_shard(box, lease_for(model, 50, 8), model, bad)).reason == "input_error"
    assert (_fds(), _fds(box.pid)) == (ours, theirs)


async def test_a_reused_output_arena_never_shows_an_earlier_shards_outputs(pool):
    """The node keeps a shard's output arena for the next shard of the same layout: every
    shard's outputs are still its own, whatever ran before (other inputs, a stop, a
    different row count, a child killed for lying)."""
    model, input_name, make = MODELS["mlp784"]()
    a, b = make(128), make(128) * 0.5
    box = await pool.get(b"publisher-a")
    for x in (a, b, a):
        out = await run_shard(box, lease_for(model, 128, 32), model, {input_name: x})
        assert out.status == "done" and out.outputs == direct_blob(model, {input_name: x}, 32)
    stop = trio.Event()
    stopped = await run_shard(box, lease_for(model, 128, 32), model, {input_name: b}, stop=stop,
                              on_progress=lambda p: p.done == 1 and stop.set())
    assert stopped.status == "stopped" and stopped.done < 4
    out = await run_shard(box, lease_for(model, 128, 32), model, {input_name: a})
    assert out.outputs == direct_blob(model, {input_name: a}, 32)
    out = await run_shard(box, lease_for(model, 96, 32), model, {input_name: b[:96]})
    assert out.outputs == direct_blob(model, {input_name: b[:96]}, 32)
    await box.debug("lie", factor=1000)
    assert (await run_shard(box, lease_for(model, 96, 32), model, {input_name: b[:96]})).reason == "crash"
    out = await run_shard(box, lease_for(model, 96, 32), model, {input_name: a[:96]})
    assert out.outputs == direct_blob(model, {input_name: a[:96]}, 32)
