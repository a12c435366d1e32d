"""The zoo's ResNet-50 (p2pfleet/zoo.py) through the sandboxed runner: validated in the
child, run with micro-batches of 2 and of 1, and the two shards' outputs agree."""

from __future__ import annotations

import hashlib
import sys

import pytest

from p2pfleet.exec.outputs import compare_outputs, decode_tensors
from p2pfleet.exec.runner import run_shard
from p2pfleet.exec.sandbox import SandboxConfig, open_sandbox_pool
from p2pfleet.wire.kinds import Lease
from p2pfleet.zoo import resnet50

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")


def lease_for(model: bytes, samples: int, micro_batch: int) -> Lease:
    return Lease(lease_id=bytes([micro_batch]) * 16, job_id=b"j" * 16, shard=0,
                 model_digest=hashlib.sha256(model).digest(), model_size=len(model),
                 input_digest=b"\0" * 32, input_size=0, input_sources=(), token=b"t" * 16,
                 deadline_ms=120_000, micro_batch=micro_batch, opt_level="all",
                 provider="CPUExecutionProvider", ort_versions="", samples=samples,
                 first_batch=0, credit=1)


async def test_resnet50_validates_and_runs_in_the_sandbox_with_any_micro_batch():
    model, name, make_inputs = resnet50()
    inputs = {name: make_inputs(4)}
    async with open_sandbox_pool(SandboxConfig(memory_mb=2048)) as pool:
        box = await pool.get(b"publisher")
        v = await box.validate(model, {name: (2, 3, 224, 224)})
        assert [o.shape for o in v.outputs] == [(2, 1000)]
        by_two = await run_shard(box, lease_for(model, 4, 2), model, inputs, threads=2)
        by_one = await run_shard(box, lease_for(model, 4, 1), model, inputs, threads=2)
    assert (by_two.status, by_two.total, by_one.status, by_one.total) == ("done", 2, "done", 4), (by_two, by_one)
    agreement = compare_outputs(decode_tensors(by_two.outputs), decode_tensors(by_one.outputs))
    assert agreement.within_tolerance, agreement
