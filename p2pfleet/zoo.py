"""Real models for demos, benchmarks and tests (`make demo`, tools/bench_exec.py,
tools/bench_e2e.py, the execution tests): each builder returns (model bytes, input name, a
function n -> n samples of input). digits needs scikit-learn and skl2onnx, magika the
`magika` wheel (test extras, which the Makefile installs).

- digits: a scikit-learn MLP trained on the digits set, exported with skl2onnx (no ZipMap);
- magika: the trained file-type classifier shipped in the `magika` wheel;
- mlp784: a 784-1024-1024-10 MLP with seeded weights, built with onnx.helper;
- small: a 32-64-10 classifier with seeded weights (tests/integration/test_sandbox.py);
- resnet50: ResNet-50 (25.5M weights, ~4 GMAC and 600 KB of float32 input per 224x224
  image) built from the `light_resnet50` graph shipped in the `onnx` wheel, with seeded
  weights and a dynamic batch axis (`resnet50()` says how);
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


#: ImageNet normalisation, as torchvision's and the ONNX model zoo's ResNets expect.
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 3, 1, 1)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 3, 1, 1)


def images(n: int, seed: int = 3) -> np.ndarray:
    """n 3x224x224 pictures as a vision model sees them: 8-bit pixels (blocks of colour
    with pixel noise, so pooled features differ from picture to picture as they do on
    photographs; white noise would average out) normalised with the ImageNet mean and std."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (n, 3, 7, 7)).astype(np.float32)
    img = np.repeat(np.repeat(coarse, 32, axis=2), 32, axis=3)
    img += rng.normal(0, 20, img.shape).astype(np.float32)
    img = np.clip(np.rint(img), 0, 255) / np.float32(255)
    return ((img - _IMAGENET_MEAN) / _IMAGENET_STD).astype(np.float32)


def _light_weights(light: onnx.ModelProto, seed: int) -> tuple[list, list]:
    """The graph's nodes without its ConstantOfShape weight fillers, and initializers in
    their place: He-normal convolution weights, batch-norm statistics near identity, a
    small classifier; the small tensors the light file kept are used as they are."""
    g = light.graph
    given = {t.name: t for t in g.initializer}
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for node in g.node:
        if node.op_type != "ConstantOfShape":
            nodes.append(node)
            continue
        name = node.output[0]
        shape = tuple(int(d) for d in numpy_helper.to_array(given[node.input[0]]))
        if name.endswith("_w_0") and len(shape) == 4:
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / np.prod(shape[1:])))
        elif name.endswith("_w_0"):
            a = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
        elif name.endswith(("_bn_s_0", "_bn_riv_0")):
            a = rng.uniform(0.8, 1.2, shape).astype(np.float32)
            if name.endswith("branch2c_bn_s_0"):  # residual branches start small, as in
                a *= np.float32(0.2)                 # SkipInit/Fixup: see resnet50()
        elif name.endswith(("_b_0", "_bn_rm_0")):
            a = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            raise ValueError(f"light_resnet50: no rule for the weight {name!r}")
        inits.append(numpy_helper.from_array(a, name))
    used = {i for n in nodes for i in n.input}
    inits += [t for t in g.initializer if t.name in used and t.data_type == TensorProto.FLOAT]
    return nodes, inits


def _batch_stats_graph(nodes: list) -> tuple[list, list[tuple[str, str, str]]]:
    """The nodes with each BatchNormalization replaced by its training-mode form (the
    mean and variance of this batch over N, H, W), and (node output, mean, variance)
    names of the statistics as extra outputs."""
    out, stats = [], []
    for n in nodes:
        if n.op_type != "BatchNormalization":
            out.append(n)
            continue
        x, sc, b = n.input[:3]
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        y = n.output[0]
        out += [helper.make_node("ReduceMean", [x], [y + "__mean"], axes=[0, 2, 3], keepdims=1),
                helper.make_node("Sub", [x, y + "__mean"], [y + "__d"]),
                helper.make_node("Mul", [y + "__d", y + "__d"], [y + "__d2"]),
                helper.make_node("ReduceMean", [y + "__d2"], [y + "__var"], axes=[0, 2, 3], keepdims=1),
                helper.make_node("Add", [y + "__var", y + "__eps"], [y + "__ve"]),
                helper.make_node("Sqrt", [y + "__ve"], [y + "__sd"]),
                helper.make_node("Div", [y + "__d", y + "__sd"], [y + "__z"]),
                helper.make_node("Unsqueeze", [sc], [y + "__s3"], axes=[1, 2]),
                helper.make_node("Unsqueeze", [b], [y + "__b3"], axes=[1, 2]),
                helper.make_node("Mul", [y + "__z", y + "__s3"], [y + "__zs"]),
                helper.make_node("Add", [y + "__zs", y + "__b3"], [y]),
                helper.make_node("Constant", [], [y + "__eps"],
                                 value=numpy_helper.from_array(np.array(eps, np.float32)))]
        stats.append((n.input[3], n.input[4], y))
    return out, stats


@lru_cache(maxsize=None)
def resnet50() -> tuple[bytes, str, Inputs]:
    """ResNet-50 from onnx's backend test data. The "light" files there keep the graph
    and only the smallest tensors (here the 64-value batch-norm parameters of conv1 and
    res2); every larger weight is replaced by ConstantOfShape(its shape, 0.02) that the
    backend tests feed with dummy data. We put seeded initializers in their place
    (`_light_weights`), make the batch axis dynamic and fix the one Reshape, which flattened
    the pooled features to a literal [1, 2048], to [-1, 2048].

    Then the model is calibrated once on 16 pictures (`images`), as training would leave
    it: every batch norm's running mean and variance set to what its input really has (one
    pass of the training-mode graph, `_batch_stats_graph`), so activations stay of order 1
    through the 16 residual blocks; and the classifier head centred (the mean pooled
    feature subtracted through the bias) and scaled to a logit spread of about 2, so the
    outputs are softmax rows that depend on the picture (64 pictures: ~55 distinct top
    classes). Without this, random weights give activations in the thousands with a large
    common part, and honest float noise (optimisation level all vs disabled) came out at
    8e-5, above exec.outputs.TOLERANCE; a random net whose residual branches all start at
    full scale amplifies rounding (3e-4), so the last batch norm of each branch starts at
    0.2. Measured (onnxruntime 1.32, x86-64, 8 pictures): levels all vs disabled 2.3e-5,
    a batch of 8 vs 8 batches of 1 identical, fp16 weights 2e-2 to 4e-2. Like digits,
    the bytes are reproducible on one machine and onnxruntime version; the calibration may
    differ in the last bits elsewhere."""
    import onnxruntime as ort

    path = importlib.resources.files("onnx") / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    light = onnx.load_from_string(path.read_bytes())
    nodes, inits = _light_weights(light, seed=50)
    (reshape,) = [n for n in nodes if n.op_type == "Reshape"]
    inits = [t for t in inits if t.name != reshape.input[1]]
    inits.append(numpy_helper.from_array(np.array([-1, 2048], np.int64), reshape.input[1]))
    x_name, y_name = light.graph.input[0].name, light.graph.output[0].name
    (gemm,) = [n for n in nodes if n.op_type == "Gemm"]

    def build(graph_nodes: list, extra_outputs: list[str]) -> bytes:
        graph = helper.make_graph(
            graph_nodes, "resnet50",
            [helper.make_tensor_value_info(x_name, TensorProto.FLOAT, ["N", 3, 224, 224])],
            [helper.make_tensor_value_info(y_name, TensorProto.FLOAT, ["N", 1000])]
            + [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in extra_outputs], inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
        m.ir_version = 8
        return m.SerializeToString()

    def run(model: bytes, names: list[str]) -> list[np.ndarray]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3  # the training-mode graph leaves the running statistics unused
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return sess.run(names, {x_name: images(16, seed=101)})

    by_name = {t.name: i for i, t in enumerate(inits)}

    def put(name: str, a: np.ndarray) -> None:
        inits[by_name[name]] = numpy_helper.from_array(a.astype(np.float32), name)

    train_nodes, stats = _batch_stats_graph(nodes)
    names = [n for _rm, _riv, y in stats for n in (y + "__mean", y + "__var")] + [gemm.input[0]]
    *moments, feats = run(build(train_nodes, names), names)
    for (rm, riv, _y), mean, var in zip(stats, moments[0::2], moments[1::2]):
        put(rm, mean.reshape(-1))
        put(riv, var.reshape(-1))
    feats = feats.astype(np.float64)
    w = numpy_helper.to_array(inits[by_name[gemm.input[1]]]).astype(np.float64)
    b = numpy_helper.to_array(inits[by_name[gemm.input[2]]]).astype(np.float64)
    scale = 2.0 ** np.round(np.log2(2.0 / ((feats - feats.mean(axis=0)) @ w.T).std()))
    put(gemm.input[1], w * scale)
    put(gemm.input[2], b - scale * (w @ feats.mean(axis=0)))
    return build(nodes, []), x_name, images


MODELS: dict[str, Callable[[], tuple[bytes, str, Inputs]]] = {
    "digits": digits, "magika": magika, "mlp784": mlp784, "small": small, "canary": canary,
    "resnet50": resnet50}


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
