"""Scalar (rank-0) graph inputs and outputs are refused by validation with rule
`scalar-tensor`, before the model is loaded or run (issue 14, item 8): a shard is split into
micro-batches and joined along axis 0, which a scalar does not have."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

from p2pfleet.exec import ModelRefused, validate_model
from p2pfleet.exec.runner import run_shard
from p2pfleet.exec.sandbox import SandboxConfig, open_sandbox_pool
from p2pfleet.wire.kinds import Lease
from test_sandbox import _model  # the same few-node model builder

F = TensorProto.FLOAT


def sum_to_scalar() -> bytes:
    """x[N,4] -> ReduceSum(keepdims=0) over every axis: a rank-0 output."""
    return _model([helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)],
                  [helper.make_tensor_value_info("x", F, ["N", 4])],
                  [helper.make_tensor_value_info("s", F, [])])


def scalar_input() -> bytes:
    """x[N,4] * k, k a rank-0 graph input."""
    return _model([helper.make_node("Mul", ["x", "k"], ["y"])],
                  [helper.make_tensor_value_info("x", F, ["N", 4]),
                   helper.make_tensor_value_info("k", F, [])],
                  [helper.make_tensor_value_info("y", F, ["N", 4])])


def test_scalar_output_is_refused_by_validation():
    with pytest.raises(ModelRefused) as info:
        validate_model(sum_to_scalar(), {"x": (5, 4)})
    assert info.value.rule == "scalar-tensor" and info.value.tensor == "s", info.value
    assert "rank 0" in info.value.reason


def test_scalar_input_is_refused_by_validation():
    with pytest.raises(ModelRefused) as info:
        validate_model(scalar_input(), {"x": (5, 4), "k": ()})
    assert info.value.rule == "scalar-tensor" and info.value.tensor == "k", info.value
    with pytest.raises(ModelRefused) as info:  # a rank-1 shape for it breaks the declaration
        validate_model(scalar_input(), {"x": (5, 4), "k": (1,)})
    assert info.value.rule == "input-mismatch", info.value


def lease_for(model: bytes, samples: int, micro_batch: int) -> Lease:
    return Lease(lease_id=hashlib.sha256(model).digest()[:16], job_id=b"j" * 16, shard=0,
                 model_digest=hashlib.sha256(model).digest(), model_size=len(model),
                 input_digest=b"\0" * 32, input_size=0, input_sources=(), token=b"t" * 16,
                 deadline_ms=30_000, micro_batch=micro_batch, opt_level="all",
                 provider="CPUExecutionProvider", ort_versions="", samples=samples,
                 first_batch=0, credit=1)


@pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")
async def test_a_scalar_output_model_fails_with_the_rule_before_it_loads():
    model = sum_to_scalar()
    x = np.ones((10, 4), dtype=np.float32)
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024)) as pool:
        box = await pool.get(b"publisher-a")
        out = await run_shard(box, lease_for(model, 10, 5), model, {"x": x})
    assert (out.status, out.reason, out.rule) == ("failed", "invalid_model", "scalar-tensor"), out
    assert out.detail.startswith("scalar-tensor:") and out.done == 0 and out.load_ms == 0, out
