"""The ResNet-50 of the model zoo (p2pfleet/zoo.py): built from the light model in the onnx
wheel with seeded weights, it passes validation with any batch size and gives the same
outputs batched as one picture at a time."""

from __future__ import annotations


import numpy as np
import onnxruntime as ort

from p2pfleet.exec.outputs import compare_outputs
from p2pfleet.exec.validate import validate_model
from p2pfleet.zoo import resnet50



def test_resnet50_batch_of_two_matches_two_batches_of_one() -> None:
    model, name, inputs = resnet50()
    assert resnet50()[0] is model  # cached: built once per process
    x = inputs(2)
    assert x.shape == (2, 3, 224, 224) and x.dtype == np.float32 and x[0].nbytes == 602_112
    assert np.array_equal(inputs(2), x)  # seeded
    v = validate_model(model, {name: (2, 3, 224, 224)})
    assert [o.shape for o in v.outputs] == [(2, 1000)]
    assert 20 * 2**20 * 4 < v.constant_bytes < 30 * 2**20 * 4  # 25.5M real weights, not fillers
    assert 7 * 10**9 < v.macs < 9 * 10**9  # ~4 GMAC per picture
    validate_model(model, {name: (1, 3, 224, 224)})

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    out = sess.get_outputs()[0].name
    (both,) = sess.run(None, {name: x})
    one_by_one = np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(2)])
    agreement = compare_outputs({out: both}, {out: one_by_one})
    assert agreement.within_tolerance, agreement
    assert np.allclose(both.sum(axis=1), 1.0, atol=1e-5)  # softmax rows
    assert not compare_outputs({out: both[:1]}, {out: both[1:]}).within_tolerance  # depends on the picture
