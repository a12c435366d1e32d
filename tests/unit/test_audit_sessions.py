"""The publisher's own audits (p2pfleet/publisher/audit.py): one onnxruntime session per
model for all its audits, with the outputs a session per micro-batch gave."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from p2pfleet.exec.outputs import concat_batches, encode_tensors, tensors_digest
from p2pfleet.publisher.audit import SessionCache, compute_shard
from p2pfleet.publisher.jobs import run_locally


def model(scale: float) -> bytes:
    w = (np.arange(12, dtype=np.float32).reshape(4, 3) * scale).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(w, "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def key(m: bytes) -> tuple[bytes, str, str]:
    return hashlib.sha256(m).digest(), "all", "CPUExecutionProvider"


def test_audits_of_one_model_share_a_session_and_give_what_a_session_per_batch_gave():
    m = model(0.5)
    x = np.random.default_rng(0).standard_normal((21, 4)).astype(np.float32)
    blob = encode_tensors({"x": x})
    want = [run_locally(m, {"x": x[k:k + 8]}, "all") for k in range(0, 21, 8)]
    sessions = SessionCache(size=2)
    for _shard in range(3):
        out, digests = compute_shard(sessions.get(key(m), m), blob, 21, 8)
        assert out == encode_tensors(concat_batches(want))
        assert digests == tuple(tensors_digest(b) for b in want)
    assert sessions.created == 1
    # without the model a session is only taken from the cache
    assert sessions.get(key(m), None) is sessions.get(key(m), m)
    with pytest.raises(KeyError, match="no session kept"):
        sessions.get(key(model(2.0)), None)


def test_the_cache_keeps_the_models_used_last_and_drops_those_of_ended_jobs():
    a, b, c = model(1.0), model(2.0), model(3.0)
    sessions = SessionCache(size=2)
    for m in (a, b, c):
        sessions.get(key(m), m)
    assert not sessions.has(key(a)) and sessions.has(key(b)) and sessions.has(key(c))
    sessions.keep_only({key(c)[0]})
    assert not sessions.has(key(b)) and sessions.has(key(c))
