"""Model validation: real models pass; every measured attack and every data-dependent size
bomb is refused with its rule, naming the node or tensor; fuzzed bytes only ever raise
ModelRefused. Hostile models are generated here with onnx.helper, a few hundred bytes each.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx.defs
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from p2pfleet.exec import ModelLimits, ModelRefused, RULES, validate_model
from p2pfleet.exec.validate import _einsum_steps

F = TensorProto.FLOAT
I64 = TensorProto.INT64
LIMITS = ModelLimits()
INT64_MAX = 2**63 - 1


# --- building models -----------------------------------------------------------------------

def vi(name: str, dims, elem=F):
    return helper.make_tensor_value_info(name, elem, dims)


def model(nodes, inputs, outputs, inits=(), *, opset: int = 17, ml: int | None = None,
          extra_opsets=(), functions=(), sparse=(), ir: int | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits), sparse_initializer=list(sparse))
    opsets = [helper.make_opsetid("", opset)]
    if ml is not None:
        opsets.append(helper.make_opsetid("ai.onnx.ml", ml))
    opsets += [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(graph, opset_imports=opsets, functions=list(functions))
    m.ir_version = ir if ir is not None else 10
    return m


def ser(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


def i64(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def f32(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def external(t: TensorProto, location: str | None = "weights.bin", flag: bool = True) -> TensorProto:
    """Turn t into a tensor whose data lives outside the model, at `location`."""
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.ClearField("int64_data")
    if flag:
        t.data_location = TensorProto.EXTERNAL
    if location is not None:
        for k, v in (("location", location), ("offset", "0"), ("length", str(4 * max(1, len(t.dims))))):
            e = t.external_data.add()
            e.key, e.value = k, v
    return t


def relu_model(**kw) -> onnx.ModelProto:
    return model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [2, 3])],
                 [vi("y", [2, 3])], **kw)


def ext_initializer(location: str | None, flag: bool = True) -> bytes:
    w = external(f32("W", [1, 2, 3]), location, flag)
    return ser(model([helper.make_node("Add", ["x", "W"], ["y"], name="add")], [vi("x", [3])],
                     [vi("y", [3])], [w]))


def ext_attr(op: str) -> bytes:
    t = external(f32("value", [1.0]))
    if op == "Constant":
        n = helper.make_node("Constant", [], ["c"], name="const", value=t)
        extra = [helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    else:
        n = helper.make_node("ConstantOfShape", ["s"], ["c"], name="cos", value=t)
        extra = [helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    return ser(model([n] + extra, [vi("x", [3])], [vi("y", [3])], [i64("s", [3])]))


def ext_sparse_initializer() -> bytes:
    values = external(f32("S", [1.0]))
    indices = i64("S_idx", [0])
    sp = helper.make_sparse_tensor(values, indices, [3])
    return ser(model([helper.make_node("Add", ["x", "S"], ["y"], name="add")], [vi("x", [3])],
                     [vi("y", [3])], sparse=[sp]))


def ext_sparse_constant() -> bytes:
    values = external(f32("v", [1.0]))
    sp = helper.make_sparse_tensor(values, i64("v_idx", [0]), [3])
    n = helper.make_node("Constant", [], ["c"], name="sparse_const", sparse_value=sp)
    return ser(model([n, helper.make_node("Add", ["x", "c"], ["y"], name="add")],
                     [vi("x", [3])], [vi("y", [3])]))


def branch(name: str, out: str, nodes=(), inits=()) -> onnx.GraphProto:
    nodes = list(nodes) or [helper.make_node("Identity", ["x"], [out])]
    return helper.make_graph(nodes, name, [], [vi(out, [3])], list(inits))


def ext_in_subgraph() -> bytes:
    then = branch("then", "t", [helper.make_node("Add", ["x", "Wt"], ["t"])],
                  [external(f32("Wt", [1, 2, 3]), "/etc/passwd")])
    n = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then,
                         else_branch=branch("else", "e"))
    return ser(model([n], [vi("x", [3]), vi("cond", [], TensorProto.BOOL)], [vi("y", [3])]))


def ext_in_nested_subgraph() -> bytes:
    inner_const = helper.make_node("Constant", [], ["t"], name="hidden",
                                   value=external(f32("v", [1, 2, 3]), "../../etc/passwd"))
    inner_if = helper.make_node("If", ["c"], ["o"], name="inner", then_branch=branch("then", "t", [inner_const]),
                                else_branch=branch("else", "e"))
    body = helper.make_graph([inner_if, helper.make_node("Identity", ["c"], ["c_out"])], "body",
                             [vi("i", [], I64), vi("c", [], TensorProto.BOOL)],
                             [vi("c_out", [], TensorProto.BOOL), vi("o", [3])])
    loop = helper.make_node("Loop", ["n", "cond"], ["y"], name="outer", body=body)
    return ser(model([loop], [vi("x", [3]), vi("cond", [], TensorProto.BOOL)], [vi("y", [None, 3])],
                     [i64("n", 1)]))


def func(name: str, nodes, inputs=("a",), outputs=("b",)) -> onnx.FunctionProto:
    return helper.make_function("custom", name, list(inputs), list(outputs), nodes,
                                [helper.make_opsetid("", 17)])


def ext_in_function() -> bytes:
    c = helper.make_node("Constant", [], ["k"], name="fconst",
                         value=external(f32("k", [1.0]), "*/_ORT_MEM_ADDR_/*"))
    f = func("f", [c, helper.make_node("Add", ["a", "k"], ["b"])])
    n = helper.make_node("f", ["x"], ["y"], domain="custom", name="call")
    return ser(model([n], [vi("x", [1])], [vi("y", [1])], extra_opsets=[("custom", 1)],
                     functions=[f]))


def ext_in_training_info() -> bytes:
    m = relu_model()
    ti = m.training_info.add()
    ti.initialization.name = "init"
    ti.initialization.initializer.append(external(f32("state", [1.0]), "state.bin"))
    return ser(m)


def custom_domain_op() -> bytes:
    n = helper.make_node("Steal", ["x"], ["y"], domain="evil.domain", name="steal")
    return ser(model([n], [vi("x", [3])], [vi("y", [3])], extra_opsets=[("evil.domain", 1)]))


def contrib_op() -> bytes:
    n = helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft", name="gelu")
    return ser(model([n], [vi("x", [3])], [vi("y", [3])], extra_opsets=[("com.microsoft", 1)]))


def unused_custom_import() -> bytes:
    return ser(relu_model(extra_opsets=[("com.microsoft", 1)]))


def unregistered_default_op() -> bytes:
    return ser(model([helper.make_node("Steal", ["x"], ["y"], name="steal")], [vi("x", [3])],
                     [vi("y", [3])]))


def constant_of_shape_bomb() -> bytes:
    """60000x60000 floats (14.4 GB) from a ~150-byte file (notes/onnx.md)."""
    n = helper.make_node("ConstantOfShape", ["s"], ["big"], name="bomb")
    return ser(model([n], [], [vi("big", [60000, 60000])], [i64("s", [60000, 60000])]))


def infinite_loop() -> bytes:
    body = helper.make_graph([helper.make_node("Identity", ["c"], ["c_out"])], "body",
                             [vi("i", [], I64), vi("c", [], TensorProto.BOOL)],
                             [vi("c_out", [], TensorProto.BOOL)])
    loop = helper.make_node("Loop", ["n", "cond"], [], name="spin", body=body)
    ident = helper.make_node("Identity", ["x"], ["y"], name="id")
    return ser(model([loop, ident], [vi("x", [3]), vi("cond", [], TensorProto.BOOL)],
                     [vi("y", [3])], [i64("n", INT64_MAX)]))


def nested_loops() -> bytes:
    """Loop in a Loop: CPU with small static shapes."""
    inner_body = helper.make_graph([helper.make_node("Identity", ["c"], ["c_out"])], "inner",
                                   [vi("i", [], I64), vi("c", [], TensorProto.BOOL)],
                                   [vi("c_out", [], TensorProto.BOOL)])
    inner = helper.make_node("Loop", ["n", "c"], [], name="inner", body=inner_body)
    body = helper.make_graph([inner, helper.make_node("Identity", ["c"], ["c_out"])], "outer_body",
                             [vi("i", [], I64), vi("c", [], TensorProto.BOOL)],
                             [vi("c_out", [], TensorProto.BOOL)])
    outer = helper.make_node("Loop", ["n", "cond"], [], name="outer", body=body)
    return ser(model([outer, helper.make_node("Identity", ["x"], ["y"])],
                     [vi("x", [3]), vi("cond", [], TensorProto.BOOL)], [vi("y", [3])],
                     [i64("n", 10**9)]))


def scan_op() -> bytes:
    body = helper.make_graph([helper.make_node("Identity", ["s"], ["s_out"])], "body",
                             [vi("s", [3])], [vi("s_out", [3])])
    n = helper.make_node("Scan", ["x"], ["y"], name="scan", body=body, num_scan_inputs=0)
    return ser(model([n], [vi("x", [3])], [vi("y", [3])]))


def if_op() -> bytes:
    n = helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=branch("then", "t"),
                         else_branch=branch("else", "e"))
    return ser(model([n], [vi("x", [3]), vi("cond", [], TensorProto.BOOL)], [vi("y", [3])]))


def sequence_map() -> bytes:
    body = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "body", [vi("a", [3])],
                             [vi("b", [3])])
    seq = helper.make_node("SequenceConstruct", ["x"], ["s"], name="seq")
    n = helper.make_node("SequenceMap", ["s"], ["t"], name="map", body=body)
    at = helper.make_node("SequenceAt", ["t", "zero"], ["y"], name="at")
    return ser(model([seq, n, at], [vi("x", [3])], [vi("y", [3])], [i64("zero", 0)]))


def random_op(op: str) -> Callable[[], bytes]:
    def build() -> bytes:
        if op in ("RandomNormal", "RandomUniform"):
            n = helper.make_node(op, [], ["r"], name="dice", shape=[3])
        elif op == "Multinomial":
            n = helper.make_node(op, ["x"], ["r"], name="dice", dtype=TensorProto.FLOAT)
        else:
            n = helper.make_node(op, ["x"], ["r"], name="dice")
        return ser(model([n, helper.make_node("Identity", ["x"], ["y"])], [vi("x", [1, 3])],
                         [vi("y", [1, 3])]))
    return build


def dropout(training) -> bytes:
    """Dropout whose training_mode is a graph input (None) or a constant."""
    inits = [f32("ratio", 0.5)]
    inputs = [vi("x", [3])]
    if training is None:
        inputs.append(vi("training", [], TensorProto.BOOL))
    else:
        inits.append(numpy_helper.from_array(np.array(training), "training"))
    n = helper.make_node("Dropout", ["x", "ratio", "training"], ["y"], name="drop")
    return ser(model([n], inputs, [vi("y", [3])], inits))


def vgg_like_constant_weights() -> bytes:
    """~700 MB of ConstantOfShape weights in a file of a few hundred bytes."""
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate([(25088, 4096), (4096, 4096), (4096, 1000)]):
        inits.append(i64(f"ws{i}", [k, n]))
        nodes.append(helper.make_node("ConstantOfShape", [f"ws{i}"], [f"w{i}"], name=f"weights{i}",
                                      value=helper.make_tensor("v", F, [1], [0.01])))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        x = f"h{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return ser(model(nodes, [vi("x", [1, 25088])], [vi("y", [1, 1000])], inits))


def wide_concat() -> bytes:
    """One Concat of 10^5 inputs (~300 KB): strict shape inference ran out of memory."""
    n = helper.make_node("Concat", ["x"] * 100_000, ["y"], name="wide", axis=0)
    return ser(model([n], [vi("x", [1])], [vi("y", [100_000])]))


def nested_functions() -> bytes:
    """f0 calls f1 twice, ..., f29 -> 2^30 nodes once inlined; ~2 KB on disk."""
    fs = []
    for i in range(30):
        if i == 29:
            nodes = [helper.make_node("Relu", ["a"], ["b"])]
        else:
            nodes = [helper.make_node(f"f{i + 1}", ["a"], ["m"], domain="custom"),
                     helper.make_node(f"f{i + 1}", ["m"], ["b"], domain="custom")]
        fs.append(func(f"f{i}", nodes))
    n = helper.make_node("f0", ["x"], ["y"], domain="custom", name="call")
    return ser(model([n], [vi("x", [3])], [vi("y", [3])], extra_opsets=[("custom", 1)],
                     functions=fs))


def flat_million_nodes() -> bytes:
    """A flat graph of 10^6 Identity nodes, assembled as raw protobuf (the checker crashed
    on one). GraphProto.node is field 1, ModelProto.graph field 7."""
    node = helper.make_node("Identity", ["x"], ["x"]).SerializeToString()
    rec = b"\x0a" + bytes([len(node)]) + node
    head = relu_model()
    graph_bytes = head.graph.SerializeToString() + rec * 1_000_000
    head.ClearField("graph")

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    return head.SerializeToString() + b"\x3a" + varint(len(graph_bytes)) + graph_bytes


def data_propagation_bomb() -> bytes:
    """A 2*10^6-long 1-D constant through Adds, plus one Expand that needs data propagation:
    onnx would hold every element of every such tensor as a ~70-byte dim (the same model at
    10^7 and 20 Adds, 545 bytes, took 38 s and 7 GB)."""
    nodes = [helper.make_node("ConstantOfShape", ["n"], ["c0"], value=helper.make_tensor("v", I64, [1], [1])),
             helper.make_node("Add", ["c0", "c0"], ["c1"], name="grow"),
             helper.make_node("ReduceSum", ["c1"], ["total"], keepdims=0),
             helper.make_node("Shape", ["z"], ["sz"]),
             helper.make_node("Expand", ["x", "sz"], ["y"])]
    return ser(model(nodes, [vi("x", [1, 1]), vi("z", [2, 2])], [vi("total", [], I64), vi("y", [2, 2])],
                     [i64("n", [2_000_000])]))


def einsum_outer_product() -> bytes:
    """Four 300x300 inputs, a scalar output, a 32 GB intermediate in onnxruntime."""
    names = ["a", "b", "c", "d"]
    n = helper.make_node("Einsum", names, ["y"], name="einsum", equation="ab,cd,ac,bd->")
    return ser(model([n], [vi(x, [300, 300]) for x in names], [vi("y", [])], opset=17))


def heavy_conv() -> bytes:
    """A wide, dilated convolution with small static shapes: lots of CPU, little memory."""
    s = helper.make_node("ConstantOfShape", ["ws"], ["w"], name="weights",
                         value=helper.make_tensor("v", F, [1], [0.01]))
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", dilations=[2, 2],
                            pads=[30, 30, 30, 30])
    return ser(model([s, conv], [vi("x", [1, 64, 64, 64])], [vi("y", [1, 64, 64, 64])],
                     [i64("ws", [64, 64, 31, 31])]))


def sparse_densify() -> bytes:
    values = f32("S", [1.0])
    sp = helper.make_sparse_tensor(values, i64("S_idx", [0]), [100_000, 100_000])
    return ser(model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [3])], [vi("y", [3])],
                     sparse=[sp]))


def duplicate_initializers() -> bytes:
    return ser(model([helper.make_node("Add", ["x", "W"], ["y"], name="add")], [vi("x", [3])],
                     [vi("y", [3])], [f32("W", [1, 1, 1]), f32("W", [9, 9, 9])]))


def lying_output_shape() -> bytes:
    n = helper.make_node("Concat", ["x", "x"], ["y"], name="cat", axis=0)
    return ser(model([n], [vi("x", [2])], [vi("y", [2])]))


def topk_huge_k() -> bytes:
    n = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk")
    return ser(model([n], [vi("x", [1, 8])], [vi("v", [1, 8]), vi("i", [1, 8], I64)],
                     [i64("k", [INT64_MAX])]))


# Data-dependent size bombs: (op) -> a model whose output size comes from a lease input
# (inference cannot bound it: unbounded-shape) and, where a constant can say it, a model
# whose constant asks for 60000x60000 floats (tensor-too-large).

def _one(nodes, inputs, out_dims, inits=(), opset=17, out_elem=F) -> bytes:
    return ser(model(nodes, inputs, [vi("y", out_dims, out_elem)], inits, opset=opset))


def bomb_from_data(op: str) -> bytes:
    x = vi("x", [2, 2])
    shape = vi("s", [2], I64)
    if op == "Reshape":
        return _one([helper.make_node("Reshape", ["x", "s"], ["y"], name="bomb")], [x, shape], [None, None])
    if op == "Expand":  # x's dims must be 1: Expand never shrinks a dim, so a 2 stays 2
        return _one([helper.make_node("Expand", ["x", "s"], ["y"], name="bomb")],
                    [vi("x", [1, 1]), shape], [None, None])
    if op == "Tile":
        return _one([helper.make_node("Tile", ["x", "s"], ["y"], name="bomb")], [x, shape], [None, None])
    if op == "ConstantOfShape":
        return _one([helper.make_node("ConstantOfShape", ["s"], ["y"], name="bomb")], [shape], [None, None])
    if op == "Pad":
        pads = vi("s", [4], I64)
        return _one([helper.make_node("Pad", ["x", "s"], ["y"], name="bomb")], [x, pads], [None, None])
    if op == "Range":
        return _one([helper.make_node("Range", ["zero", "s", "one"], ["y"], name="bomb")],
                    [vi("s", [], I64)], [None], [i64("zero", 0), i64("one", 1)], out_elem=I64)
    if op == "Resize":
        sizes = vi("s", [4], I64)
        return _one([helper.make_node("Resize", ["x", "", "", "s"], ["y"], name="bomb")],
                    [vi("x", [1, 1, 2, 2]), sizes], [None, None, None, None])
    if op == "Upsample":
        scales = vi("s", [4])
        return _one([helper.make_node("Upsample", ["x", "s"], ["y"], name="bomb")],
                    [vi("x", [1, 1, 2, 2]), scales], [None, None, None, None], opset=9)
    if op == "OneHot":
        return _one([helper.make_node("OneHot", ["i", "s", "vals"], ["y"], name="bomb")],
                    [vi("i", [2], I64), vi("s", [], I64)], [2, None], [f32("vals", [0, 1])])
    if op == "TopK":
        return ser(model([helper.make_node("TopK", ["x", "s"], ["y", "idx"], name="bomb")],
                         [x, vi("s", [1], I64)], [vi("y", [2, None]), vi("idx", [2, None], I64)]))
    if op == "NonZero":
        return _one([helper.make_node("NonZero", ["x"], ["y"], name="bomb")], [x], [2, None], out_elem=I64)
    if op == "Compress":
        return _one([helper.make_node("Compress", ["x", "c"], ["y"], name="bomb", axis=0)],
                    [x, vi("c", [2], TensorProto.BOOL)], [None, 2])
    if op == "Unique":
        return _one([helper.make_node("Unique", ["x"], ["y"], name="bomb")], [x], [None])
    if op == "NonMaxSuppression":
        return _one([helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["y"], name="bomb")],
                    [vi("boxes", [1, 4, 4]), vi("scores", [1, 1, 4])], [None, 3], out_elem=I64)
    raise AssertionError(op)


BOMB_SHAPES = {"Expand": {"x": (1, 1), "s": (2,)}, "Range": {"s": ()}, "Resize": {"x": (1, 1, 2, 2), "s": (4,)},
               "Upsample": {"x": (1, 1, 2, 2), "s": (4,)}, "OneHot": {"i": (2,), "s": ()},
               "TopK": {"x": (2, 2), "s": (1,)}, "Compress": {"x": (2, 2), "c": (2,)},
               "NonZero": {"x": (2, 2)}, "Unique": {"x": (2, 2)},
               "ConstantOfShape": {"s": (2,)}, "Pad": {"x": (2, 2), "s": (4,)},
               "NonMaxSuppression": {"boxes": (1, 4, 4), "scores": (1, 1, 4)}}


def bomb_from_constant(op: str) -> bytes:
    big = [60000, 60000]
    x = vi("x", [2, 2])
    if op == "Expand":
        return _one([helper.make_node("Expand", ["x", "s"], ["y"], name="bomb")], [vi("x", [1, 1])],
                    big, [i64("s", big)])
    if op == "Tile":
        return _one([helper.make_node("Tile", ["x", "s"], ["y"], name="bomb")], [x], big,
                    [i64("s", [30000, 30000])])
    if op == "Pad":
        return _one([helper.make_node("Pad", ["x", "s"], ["y"], name="bomb")], [x], big,
                    [i64("s", [29999, 29999, 29999, 29999])])
    if op == "Range":
        return _one([helper.make_node("Range", ["zero", "lim", "one"], ["y"], name="bomb")], [],
                    [10**10], [i64("zero", 0), i64("lim", 10**10), i64("one", 1)], out_elem=I64)
    if op == "Resize":
        return _one([helper.make_node("Resize", ["x", "", "sc"], ["y"], name="bomb")],
                    [vi("x", [1, 1, 2, 2])], [1, 1, 60000, 60000], [f32("sc", [1, 1, 30000, 30000])])
    if op == "Upsample":
        return _one([helper.make_node("Upsample", ["x", "sc"], ["y"], name="bomb")],
                    [vi("x", [1, 1, 2, 2])], [1, 1, 60000, 60000], [f32("sc", [1, 1, 30000, 30000])],
                    opset=9)
    if op == "OneHot":
        return _one([helper.make_node("OneHot", ["i", "depth", "vals"], ["y"], name="bomb")],
                    [vi("i", [60000], I64)], [60000, 60000], [i64("depth", 60000), f32("vals", [0, 1])])
    if op == "ConstantOfShape":
        return constant_of_shape_bomb()
    if op == "Expand-via-Shape":  # data propagation: Shape(x) * 60000 -> [60000, 60000]
        nodes = [helper.make_node("Shape", ["x"], ["sx"], name="shape"),
                 helper.make_node("Mul", ["sx", "k"], ["s"], name="scale"),
                 helper.make_node("Expand", ["x", "s"], ["y"], name="bomb")]
        return _one(nodes, [vi("x", [1, 1])], big, [i64("k", [60000, 60000])])
    raise AssertionError(op)


# --- the cases -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], bytes]
    shapes: dict
    rule: str
    node: str | None = None
    tensor: str | None = None
    limits: ModelLimits = LIMITS


X3 = {"x": (3,)}
ATTACKS = [
    # notes/onnx.md, "Untrusted models: attacks seen" and the later measurements
    Case("external-data ../../etc/passwd", lambda: ext_initializer("../../etc/passwd"), X3, "external-data", tensor="W"),
    Case("external-data absolute path", lambda: ext_initializer("/etc/passwd"), X3, "external-data", tensor="W"),
    Case("external-data plain relative path (or a symlink)", lambda: ext_initializer("weights.bin"), X3, "external-data", tensor="W"),
    Case("external-data _ORT_MEM_ADDR_", lambda: ext_initializer("*/_ORT_MEM_ADDR_/*"), X3, "external-data", tensor="W"),
    Case("external-data flag without location", lambda: ext_initializer(None), X3, "external-data", tensor="W"),
    Case("external-data location without flag", lambda: ext_initializer("w.bin", flag=False), X3, "external-data", tensor="W"),
    Case("external-data in Constant attribute", lambda: ext_attr("Constant"), X3, "external-data", node="const"),
    Case("external-data in ConstantOfShape attribute", lambda: ext_attr("ConstantOfShape"), X3, "external-data", node="cos"),
    Case("external-data in sparse initializer", ext_sparse_initializer, X3, "external-data", tensor="S"),
    Case("external-data in sparse Constant", ext_sparse_constant, X3, "external-data", node="sparse_const"),
    Case("external-data in If branch", ext_in_subgraph, {"x": (3,), "cond": ()}, "external-data", tensor="branch.then_branch/Wt"),
    Case("external-data in If in Loop body", ext_in_nested_subgraph, {"x": (3,), "cond": ()}, "external-data", node="outer.body/inner.then_branch/hidden"),
    Case("external-data in model-local function", ext_in_function, {"x": (1,)}, "external-data", node="function custom:f/fconst"),
    Case("external-data in training info", ext_in_training_info, {"x": (2, 3)}, "external-data", tensor="training_info[0].initialization/state"),
    Case("unregistered custom-domain op", custom_domain_op, X3, "op-domain", node="steal"),
    Case("com.microsoft contrib op", contrib_op, X3, "op-domain", node="gelu"),
    Case("unused non-standard opset import", unused_custom_import, {"x": (2, 3)}, "op-domain"),
    Case("op not in the registry", unregistered_default_op, X3, "unknown-op", node="steal"),
    Case("ConstantOfShape 60000x60000 in 150 bytes", constant_of_shape_bomb, {}, "tensor-too-large", node="bomb", tensor="big"),
    Case("Loop with INT64_MAX iterations", infinite_loop, {"x": (3,), "cond": ()}, "control-flow", node="spin"),
    Case("nested Loops", nested_loops, {"x": (3,), "cond": ()}, "control-flow", node="outer"),
    Case("Scan", scan_op, X3, "control-flow", node="scan"),
    Case("If", if_op, {"x": (3,), "cond": ()}, "control-flow", node="choose"),
    Case("SequenceMap", sequence_map, X3, "control-flow", node="map"),
    *[Case(op, random_op(op), {"x": (1, 3)}, "random-op", node="dice")
      for op in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                 "Multinomial", "Bernoulli")],
    Case("Dropout training_mode from input", lambda: dropout(None), {"x": (3,), "training": ()}, "random-op", node="drop", tensor="training"),
    Case("Dropout training_mode constant true", lambda: dropout(True), X3, "random-op", node="drop", tensor="training"),
    Case("VGG-like constant weights (~700 MB) on a 256 MiB node", vgg_like_constant_weights,
         {"x": (1, 25088)}, "peak-too-large", tensor="w0",
         limits=ModelLimits(max_peak_bytes=256 * 2**20)),
    Case("VGG-like constant weights, sum of all tensors", vgg_like_constant_weights,
         {"x": (1, 25088)}, "total-too-large", limits=ModelLimits(max_total_bytes=256 * 2**20)),
    Case("Concat of 10^5 inputs", wide_concat, {"x": (1,)}, "too-many-edges", node="wide"),
    Case("nested model-local functions", nested_functions, X3, "model-function", node="function custom:f0"),
    Case("flat 10^6-node graph", flat_million_nodes, {"x": (2, 3)}, "too-many-nodes"),
    Case("data propagation over a 2*10^6-long tensor", data_propagation_bomb, {"x": (1, 1), "z": (2, 2)},
         "too-complex", node="grow"),
    Case("Einsum with a 32 GB intermediate", einsum_outer_product,
         {k: (300, 300) for k in "abcd"}, "workspace-too-large", node="einsum"),
    Case("wide dilated convolution", heavy_conv, {"x": (1, 64, 64, 64)}, "compute-too-large",
         limits=ModelLimits(max_macs=10**10)),
    Case("sparse initializer densifying to 40 GB", sparse_densify, X3, "tensor-too-large", tensor="S"),
    Case("duplicate initializer names", duplicate_initializers, X3, "duplicate-name", tensor="W"),
    Case("declared output shape lies", lying_output_shape, {"x": (2,)}, "declared-shape", tensor="y"),
    Case("TopK with a huge K", topk_huge_k, {"x": (1, 8)}, "shape-inference", node="topk"),
    Case("onnxruntime older than the floor", lambda: ser(relu_model()), {"x": (2, 3)},
         "runtime-too-old", limits=ModelLimits(min_ort_version="99.0")),
]

DATA_BOMB_OPS = ["Reshape", "Expand", "Tile", "Resize", "Upsample", "Range", "ConstantOfShape",
                 "Pad", "OneHot", "NonZero", "TopK", "Compress", "Unique", "NonMaxSuppression"]
CONST_BOMB_OPS = ["Expand", "Tile", "Resize", "Upsample", "Range", "ConstantOfShape", "Pad",
                  "OneHot", "Expand-via-Shape"]
BOMBS = [
    *[Case(f"{op} sized by input data", (lambda op=op: bomb_from_data(op)),
           BOMB_SHAPES.get(op, {"x": (2, 2), "s": (2,)}), "unbounded-shape", node="bomb",
           tensor="y") for op in DATA_BOMB_OPS],
    *[Case(f"{op} sized by a constant", (lambda op=op: bomb_from_constant(op)),
           {} if op in ("Range", "ConstantOfShape") else
           {"x": (1, 1, 2, 2)} if op in ("Resize", "Upsample") else
           {"i": (60000,)} if op == "OneHot" else
           {"x": (1, 1)} if op.startswith("Expand") else {"x": (2, 2)},
           "tensor-too-large", node="bomb", tensor="big" if op == "ConstantOfShape" else "y")
      for op in CONST_BOMB_OPS],
]


@pytest.mark.parametrize("case", ATTACKS + BOMBS, ids=lambda c: c.id)
def test_hostile_model_is_refused(case: Case) -> None:
    data = case.build()
    with pytest.raises(ModelRefused) as info:
        validate_model(data, case.shapes, case.limits)
    err = info.value
    assert err.rule == case.rule, str(err)
    assert err.rule in RULES
    if case.node is not None:
        assert err.node == case.node, str(err)
    if case.tensor is not None:
        assert err.tensor == case.tensor, str(err)
    assert err.rule in str(err) and err.reason in str(err)


def test_attacks_are_small_files() -> None:
    """The measured attacks really are cheap to send: caps must come before any tool."""
    assert len(constant_of_shape_bomb()) < 200
    assert len(nested_functions()) < 4000
    assert len(einsum_outer_product()) < 300


# --- real models pass ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_model():
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    clf = LogisticRegression(max_iter=300).fit(X_train, y_train)
    onx = to_onnx(clf, X_train[:1], options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    with_zipmap = to_onnx(clf, X_train[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString(), with_zipmap.SerializeToString(), X_test, y_test


def test_trained_digits_classifier_passes_and_runs(digits_model) -> None:
    data, _, X_test, y_test = digits_model
    batch = 64
    v = validate_model(data, {"X": (batch, 64)})
    assert [i.name for i in v.inputs] == ["X"] and v.inputs[0].shape == (batch, 64)
    assert v.inputs[0].dtype == np.float32
    outs = {o.name: o for o in v.outputs}
    assert outs["label"].shape == (batch,) and outs["probabilities"].shape == (batch, 10)
    assert v.ml_opset is not None and "ai.onnx.ml:LinearClassifier" in v.op_types
    sess = ort.InferenceSession(v.model_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"X": X_test[:batch]})
    for spec, arr in zip(v.outputs, got):
        assert arr.shape == spec.shape and arr.dtype == spec.dtype
    label = got[0]
    assert (label == y_test[:batch]).mean() > 0.9


@pytest.mark.parametrize("kind", ["mlp", "forest", "scaled-pipeline", "tree-regressor"])
def test_other_sklearn_exports_pass_and_match_onnxruntime(digits_model, kind) -> None:
    """Tree ensembles, scalers and normalizers have no onnx shape inference; the validator
    supplies their shapes, and they must be what onnxruntime really returns."""
    from skl2onnx import to_onnx
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.tree import DecisionTreeRegressor

    _, _, X, y = digits_model
    est = {"mlp": lambda: MLPClassifier(hidden_layer_sizes=(16,), max_iter=30),
           "forest": lambda: RandomForestClassifier(n_estimators=3, max_depth=4),
           "scaled-pipeline": lambda: make_pipeline(StandardScaler(), Normalizer(),
                                                    MLPClassifier(hidden_layer_sizes=(8,), max_iter=20)),
           "tree-regressor": lambda: DecisionTreeRegressor(max_depth=3)}[kind]()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    options = None if kind == "tree-regressor" else {"zipmap": False}
    data = to_onnx(est, X[:1], options=options).SerializeToString()
    v = validate_model(data, {"X": (32, 64)})
    sess = ort.InferenceSession(v.model_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"X": X[:32]})
    assert [(a.shape, a.dtype) for a in got] == [(o.shape, o.dtype) for o in v.outputs]


def test_light_vgg19_from_the_onnx_wheel() -> None:
    """notes/onnx.md: a 9 KB VGG19 whose weights are ConstantOfShape runs at ~1 GB."""
    path = importlib.resources.files("onnx") / "backend/test/data/light/light_vgg19.onnx"
    data = path.read_bytes()
    assert len(data) < 10_000
    v = validate_model(data, {"data_0": (1, 3, 224, 224)})  # IR 3: 40 initializer inputs
    assert v.constant_bytes > 500 * 2**20 and v.macs > 10**10
    with pytest.raises(ModelRefused) as info:
        validate_model(data, {"data_0": (1, 3, 224, 224)}, ModelLimits(max_peak_bytes=512 * 2**20))
    assert info.value.rule == "peak-too-large" and info.value.tensor


def test_classifier_with_zipmap_is_refused(digits_model) -> None:
    _, with_zipmap, _, _ = digits_model
    with pytest.raises(ModelRefused) as info:
        validate_model(with_zipmap, {"X": (8, 64)})
    assert info.value.rule == "non-tensor-type"
    assert info.value.tensor == "output_probability"


def magika_model() -> tuple[bytes, int]:
    """magika's shipped model and its real per-sample input length (from its config)."""
    root = importlib.resources.files("magika") / "models"
    found = sorted(d for d in root.iterdir() if d.is_dir() and (d / "model.onnx").is_file())
    assert found, "magika ships no model.onnx"
    config = json.loads((found[-1] / "config.min.json").read_text())
    return (found[-1] / "model.onnx").read_bytes(), config["beg_size"] + config["mid_size"] + config["end_size"]


def magika_model_bytes() -> bytes:
    return magika_model()[0]


def test_magika_model_passes_with_its_real_input_shape() -> None:
    data, length = magika_model()
    assert length == 2048
    v = validate_model(data, {"bytes": (64, length)})
    assert v.inputs[0].shape == (64, length) and v.inputs[0].type_name == "INT32"
    assert v.outputs[0].name == "target_label" and v.outputs[0].shape[0] == 64
    sess = ort.InferenceSession(v.model_bytes, providers=["CPUExecutionProvider"])
    (scores,) = sess.run(None, {"bytes": np.full((64, length), 256, np.int32)})
    assert scores.shape == v.outputs[0].shape and scores.dtype == v.outputs[0].dtype
    # 64 x 2048 bytes: measured ~200 MB resident in onnxruntime; the estimate is close
    assert 100 * 2**20 < v.peak_bytes < 400 * 2**20
    assert v.peak_bytes <= v.total_bytes
    assert 10**10 < v.macs < 10**11
    with pytest.raises(ModelRefused) as info:
        validate_model(data, {"bytes": (64, 4096)})
    assert info.value.rule == "input-mismatch" and info.value.tensor == "bytes"
    with pytest.raises(ModelRefused) as info:
        validate_model(data, {"bytes": (64, 2048)}, ModelLimits(max_peak_bytes=64 * 2**20))
    assert info.value.rule == "peak-too-large" and info.value.over_limit


# --- boundaries that must pass ---------------------------------------------------------------

def test_benign_uses_of_the_watched_ops_pass() -> None:
    # Dropout in inference mode, Reshape/Expand from constants, a matmul-like Einsum.
    assert validate_model(dropout(False), X3).outputs[0].shape == (3,)
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r"]),
             helper.make_node("Expand", ["r", "e"], ["y"])]
    v = validate_model(ser(model(nodes, [vi("x", [4, 6])], [vi("y", [5, 24])],
                                 [i64("s", [1, 24]), i64("e", [5, 1])])), {"x": (4, 6)})
    assert v.outputs[0].shape == (5, 24)
    # a shape known only through data propagation: Expand(x, Shape(z))
    nodes = [helper.make_node("Shape", ["z"], ["sz"]), helper.make_node("Expand", ["x", "sz"], ["y"])]
    v = validate_model(ser(model(nodes, [vi("x", [1, 1]), vi("z", ["A", "B"])], [vi("y", ["A", "B"])])),
                       {"x": (1, 1), "z": (3, 5)})
    assert v.outputs[0].shape == (3, 5)
    ein = helper.make_node("Einsum", ["a", "b"], ["y"], equation="bij,bjk->bik")
    v = validate_model(ser(model([ein], [vi("a", ["B", 512, 512]), vi("b", ["B", 512, 512])],
                                 [vi("y", ["B", 512, 512])])), {"a": (8, 512, 512), "b": (8, 512, 512)})
    assert v.outputs[0].shape == (8, 512, 512)


def test_initializer_backed_input_is_a_constant_not_an_input() -> None:
    m = model([helper.make_node("Add", ["x", "W"], ["y"])], [vi("x", [3]), vi("W", [3])],
              [vi("y", [3])], [f32("W", [1, 2, 3])], ir=3, opset=9)
    v = validate_model(ser(m), X3)
    assert [i.name for i in v.inputs] == ["x"]
    with pytest.raises(ModelRefused) as info:
        validate_model(ser(m), {"x": (3,), "W": (3,)})
    assert info.value.rule == "input-mismatch" and info.value.tensor == "W"


def test_einsum_steps_follow_onnxruntime() -> None:
    assert _einsum_steps("ab,cd,ac,bd->", [(300, 300)] * 4)[1] == 300**4
    # work: reading the first operand, then the pair's full product; held: b, i, k only
    assert _einsum_steps("bij,bjk->bik", [(8, 64, 32), (8, 32, 16)]) == (
        8 * 64 * 32 + 8 * 64 * 32 * 16, 8 * 64 * 16)
    assert _einsum_steps("...ij,...jk", [(2, 3, 4), (2, 4, 5)])[1] == 2 * 3 * 5
    assert _einsum_steps("ab,cd->", [(100, 100)] * 2)[1] == 1
    assert _einsum_steps("ab,c->", [(2, 2)]) is None


# --- plain rules -----------------------------------------------------------------------------

@pytest.mark.parametrize("shapes, tensor", [
    ({}, "x"),
    ({"x": (2, 3), "z": (1,)}, "z"),
    ({"x": (6,)}, "x"),
    ({"x": (2, 4)}, "x"),
    ({"x": (2, 0)}, "x"),
    ({"x": (2, True)}, "x"),
    ({"x": "23"}, "x"),
])
def test_input_shapes_must_match_the_graph(shapes, tensor) -> None:
    with pytest.raises(ModelRefused) as info:
        validate_model(ser(relu_model()), shapes)
    assert info.value.rule == "input-mismatch" and info.value.tensor == tensor


def _raw(name: str, elem: int, dims, raw: bytes) -> TensorProto:
    t = TensorProto(name=name, data_type=elem, dims=dims)
    t.raw_data = raw
    return t


def _with(m: onnx.ModelProto, edit) -> bytes:
    edit(m)
    return ser(m)


@pytest.mark.parametrize("data, limits, rule", [
    (b"\xff" * 64, LIMITS, "parse-error"),
    (b"", LIMITS, "parse-error"),
    (ser(relu_model()), ModelLimits(max_model_bytes=10), "model-too-large"),
    (ser(relu_model(opset=6)), LIMITS, "opset"),
    (ser(relu_model(opset=40)), LIMITS, "opset"),
    (ser(relu_model(ml=9)), LIMITS, "opset"),
    (ser(relu_model(ir=99)), LIMITS, "ir-version"),
    (ser(model([helper.make_node("Upsample", ["x", "s"], ["y"], name="up")], [vi("x", [1, 1, 2, 2])],
               [vi("y", [1, 1, 4, 4])], [f32("s", [1, 1, 2, 2])], opset=10)), LIMITS, "unknown-op"),
    (_with(relu_model(), lambda m: m.training_info.add()), LIMITS, "training-info"),
    (_with(relu_model(), lambda m: m.functions.append(func("f", [helper.make_node("Relu", ["a"], ["b"])]))),
     LIMITS, "model-function"),
    (ser(relu_model()), ModelLimits(max_nodes=0), "too-many-nodes"),
    (ser(relu_model()), ModelLimits(max_graph_inputs=0), "too-many-inputs"),
    (ser(relu_model()), ModelLimits(max_graph_outputs=0), "too-many-outputs"),
    (ser(relu_model()), ModelLimits(max_tensor_bytes=8), "tensor-too-large"),
    (ser(model([helper.make_node("Relu", ["x"], ["x"])], [vi("x", [2, 3])], [vi("x", [2, 3])])),
     LIMITS, "duplicate-name"),
    (ser(model([helper.make_node("Add", ["x", "W"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])],
               [_raw("W", F, [3], b"\0" * 4)])), LIMITS, "bad-tensor"),
    (_with(relu_model(), lambda m: m.opset_import.add(domain="ai.onnx", version=16)), LIMITS, "opset"),
    (ser(model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3], TensorProto.INT32)])),
     LIMITS, "shape-inference"),
    (_with(relu_model(), lambda m: m.graph.output[0].type.tensor_type.ClearField("shape")), LIMITS, "checker"),
])
def test_plain_rules(data, limits, rule) -> None:
    with pytest.raises(ModelRefused) as info:
        validate_model(data, {"x": (2, 3)}, limits)
    assert info.value.rule == rule, str(info.value)


def test_a_model_is_bytes_never_a_path() -> None:
    with pytest.raises(TypeError):
        validate_model("model.onnx", {})  # type: ignore[arg-type]
    assert validate_model(bytearray(ser(relu_model())), {"x": (2, 3)}).digest


def test_runtime_floor() -> None:
    # the oldest release measured to agree (1.19.2), and onnxruntime-node's latest (1.31)
    data = ser(relu_model())
    for ok in ("1.19.2", "1.19", "1.31.0", "1.32.0", "1.33.1", "2.0.0"):
        validate_model(data, {"x": (2, 3)}, runtime_version=ok)
    for old in ("1.18.1", "1.19.0rc1", "1.19.0.dev20240101", "garbage"):
        with pytest.raises(ModelRefused) as info:
            validate_model(data, {"x": (2, 3)}, runtime_version=old)
        assert info.value.rule == "runtime-too-old" and info.value.over_limit


def test_external_data_is_refused_on_every_runtime_the_floor_lets_in() -> None:
    # releases before 1.32 follow external-data paths out of the model (1.19 returned
    # /etc/passwd): validation refuses any external data before a runtime sees the model
    for version in ("1.19.2", "1.31.0", "1.32.0"):
        for location in ("../../etc/passwd", "_ORT_MEM_ADDR_"):
            with pytest.raises(ModelRefused) as info:
                validate_model(ext_initializer(location), {"x": (3,)}, runtime_version=version)
            assert info.value.rule == "external-data"


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError):
        ModelLimits(max_nodes=-1)
    assert replace(LIMITS, max_nodes=5).max_nodes == 5


# --- fuzzing ---------------------------------------------------------------------------------

SMALL = ser(model(
    [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
     helper.make_node("Relu", ["h"], ["r"], name="relu"),
     helper.make_node("Reshape", ["r", "s"], ["y"], name="reshape")],
    [vi("x", ["N", 4])], [vi("y", ["N", 2, 2])],
    [f32("W", np.arange(16).reshape(4, 4) / 16), i64("s", [-1, 2, 2])]))
FUZZ_SHAPES = {"x": (2, 4)}


def _only_refusals(data: bytes) -> None:
    try:
        validate_model(data, FUZZ_SHAPES)
    except ModelRefused as e:
        assert e.rule in RULES


def test_fuzz_base_model_is_valid() -> None:
    assert validate_model(SMALL, FUZZ_SHAPES).outputs[0].shape == (2, 2, 2)


DEFAULT_OPS = sorted({s.name for s in onnx.defs.get_all_schemas() if s.domain == ""})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_model_fields_only_raise_model_refused(data) -> None:
    """Mutations that keep the protobuf well-formed reach the checker, inference and the
    estimates: op types, dims, attributes, wiring, element types, opsets."""
    m = onnx.ModelProto()
    m.ParseFromString(SMALL)
    g = m.graph
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["op", "dim", "attr", "drop", "wire", "dtype", "opset", "dup"]))
        node = g.node[data.draw(st.integers(0, len(g.node) - 1))] if g.node else None
        if kind == "op" and node is not None:
            node.op_type = data.draw(st.sampled_from(DEFAULT_OPS))
        elif kind == "dim":
            t = g.initializer[data.draw(st.integers(0, len(g.initializer) - 1))]
            if t.dims:
                t.dims[data.draw(st.integers(0, len(t.dims) - 1))] = data.draw(
                    st.sampled_from([0, 1, 3, -1, 2**31, 2**62]))
        elif kind == "attr" and node is not None:
            a = node.attribute.add()
            a.name = data.draw(st.sampled_from(["axis", "equation", "perm", "to", "value"]))
            a.type = data.draw(st.sampled_from([onnx.AttributeProto.INT, onnx.AttributeProto.STRING,
                                                onnx.AttributeProto.INTS]))
            a.i = data.draw(st.integers(-(2**40), 2**40))
            a.s = data.draw(st.binary(max_size=6))
        elif kind == "drop" and node is not None:
            g.node.remove(node)
        elif kind == "wire" and node is not None and node.input:
            names = [o for n in g.node for o in n.output] + ["x", "W", "s", "", "nope"]
            node.input[0] = data.draw(st.sampled_from(names))
        elif kind == "dtype":
            g.initializer[0].data_type = data.draw(st.integers(0, 40))
        elif kind == "opset":
            m.opset_import[0].version = data.draw(st.sampled_from([1, 7, 9, 13, 17, 21, 28, 29]))
        elif kind == "dup" and node is not None:
            g.node.append(node)
    _only_refusals(m.SerializeToString())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_model_refused(data: bytes) -> None:
    _only_refusals(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_model_bytes_only_raise_model_refused(data) -> None:
    b = bytearray(SMALL)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(0, len(b) - 1)))
        if kind == "flip" and b:
            b[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and b:
            b[pos] = data.draw(st.integers(0, 255))
        elif kind == "insert":
            b[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del b[pos:pos + data.draw(st.integers(1, 8))]
        else:
            del b[pos:]
    _only_refusals(bytes(b))
