"""Known-answer rows (p2pfleet/publisher/jobs.py, specs/verification.md section 7) are
judged like agreement (section 2): every row by its own magnitude, so a huge known-answer
row does not hide a wrong small one."""

from __future__ import annotations

import hashlib
import random

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from p2pfleet.exec.outputs import concat_batches, decode_tensors, encode_tensors, tensors_digest
from p2pfleet.publisher.jobs import JobSpec, build_job, check_result_outputs, run_locally

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 7 + 0.5
MB = 4


def linear_model() -> bytes:
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(W, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m.SerializeToString()


def result(outs: dict, built, i: int):
    batches = [{n: a[k:k + MB] for n, a in outs.items()} for k in range(0, built.samples[i], MB)]
    blob = encode_tensors(concat_batches(batches))
    return check_result_outputs(
        blob, digest=hashlib.sha256(blob).digest(), size=len(blob), samples=built.samples[i],
        micro_batch=MB, batch_digests=tuple(tensors_digest(b) for b in batches),
        output_names=built.output_names, ka=built.shard_ka[i],
        ka_expected=decode_tensors(built.ka_expected))


def test_a_huge_known_answer_row_does_not_hide_a_wrong_small_one():
    x = np.abs(np.random.default_rng(1).standard_normal((12, 4))).astype(np.float32) + 0.1
    x[5] *= np.float32(1e6)  # one sample's outputs ~1e6 times the others'
    built = build_job(JobSpec(linear_model(), {"x": x}, shard_size=4, micro_batch=MB,
                              known_answer_rows=3, known_answer_pool=12), random.Random(2))
    mixed = 0
    for i in range(len(built.samples)):
        inputs = decode_tensors(built.shard_blobs[i])["x"]
        honest = run_locally(linear_model(), {"x": inputs}, "all")
        assert result(honest, built, i).known_answer_ok is True
        # the cheat: rows under 1% of the shard's largest multiplied by 1.5, large rows exact
        y = np.array(honest["y"])
        small = np.abs(y).max(axis=1) < 0.01 * np.abs(y).max()
        y[small] *= np.float32(1.5)
        ka_rows = [pos for pos, _ in built.shard_ka[i]]
        got = result({"y": y}, built, i)
        assert got.form_ok
        assert got.known_answer_ok is (not small[ka_rows].any()), (i, built.shard_ka[i])
        mixed += bool(small[ka_rows].any() and not small[ka_rows].all())
    assert mixed >= 1  # a shard whose known-answer rows hold the huge sample and a small one
