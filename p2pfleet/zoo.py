"""Real models for demos, benchmarks and tests (`make demo`, tools/bench_exec.py,
tools/bench_e2e.py, the execution tests): each builder returns (model bytes, input name, a
function n -> n samples of input). digits needs scikit-learn and skl2onnx, magika the
`magika` wheel (test extras, which the Makefile installs).

- digits: a scikit-learn MLP trained on the digits set, exported with skl2onnx (no ZipMap);
- magika: the trained file-type classifier shipped in the `magika` wheel;
- mlp784: a 784-1024-1024-10 MLP with seeded weights, built with onnx.helper;
- small: a 32-64-10 classifier with seeded weights (tests/integration/test_sandbox.py);
- canary: the hardware-class canary (p2pfleet/exec/hwclass.py).

`fp16_weights(model)` is the cheap substitute verification must catch: every float32
initializer rounded to float16 and back.
"""

from __future__ import annotations

import importlib.resources
import json
import warnings
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Inputs = Callable[[int], np.ndarray]


@lru_cache(maxsize=None)
def digits() -> tuple[bytes, str, Inputs]:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a few iterations are enough
        clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=20, random_state=0).fit(X, y)
    onx = to_onnx(clf, X[:1], options={id(clf): {"zipmap": False}},
                  target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString(), "X", lambda n: np.resize(X, (n, 64))


@lru_cache(maxsize=None)
def magika() -> tuple[bytes, str, Inputs]:
    root = importlib.resources.files("magika") / "models"
    found = sorted(d for d in root.iterdir() if d.is_dir() and (d / "model.onnx").is_file())
    config = json.loads((found[-1] / "config.min.json").read_text())
    length = config["beg_size"] + config["mid_size"] + config["end_size"]
    model = (found[-1] / "model.onnx").read_bytes()
    name = onnx.load_from_string(model).graph.input[0].name

    def inputs(n: int) -> np.ndarray:
        return np.random.default_rng(3).integers(0, 257, (n, length), dtype=np.int32)

    return model, name, inputs


def _dense(sizes: tuple[int, ...], seed: int, scale: float = 0.05) -> bytes:
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        inits += [numpy_helper.from_array((rng.standard_normal((a, b)) * scale).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((rng.standard_normal(b) * 0.1).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"g{i}"]))
        prev = f"g{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probs"], axis=-1))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", sizes[0]])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", sizes[-1]])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


@lru_cache(maxsize=None)
def mlp784() -> tuple[bytes, str, Inputs]:
    def inputs(n: int) -> np.ndarray:
        return np.random.default_rng(1).random((n, 784), dtype=np.float32)

    return _dense((784, 1024, 1024, 10), seed=5), "x", inputs


@lru_cache(maxsize=None)
def small() -> tuple[bytes, str, Inputs]:
    def inputs(n: int) -> np.ndarray:
        return np.random.default_rng(1).standard_normal((n, 32)).astype(np.float32)

    return _dense((32, 64, 10), seed=7, scale=0.3), "x", inputs


@lru_cache(maxsize=None)
def canary() -> tuple[bytes, str, Inputs]:
    from p2pfleet.exec.hwclass import canary_inputs, canary_model

    x = canary_inputs()["x"]
    return canary_model(), "x", lambda n: x  # its batch is fixed at 8


MODELS: dict[str, Callable[[], tuple[bytes, str, Inputs]]] = {
    "digits": digits, "magika": magika, "mlp784": mlp784, "small": small, "canary": canary}


def _fp16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def fp16_weights(model: bytes) -> bytes:
    """The model with every float32 constant rounded to float16 (and back to float32):
    initializers, tensor attributes (Constant) and float attributes (the coefficients and
    thresholds of ai.onnx.ml's LinearClassifier, TreeEnsemble*, SVM*, Scaler...)."""
    m = onnx.load_from_string(model)
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(_fp16(numpy_helper.to_array(t)), t.name))
    for node in m.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.FLOATS:
                a.floats[:] = _fp16(np.array(a.floats, np.float32)).tolist()
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = float(_fp16(np.array([a.f], np.float32))[0])
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(_fp16(numpy_helper.to_array(a.t)), a.t.name))
    return m.SerializeToString()
