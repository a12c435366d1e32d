"""Static validation of an untrusted ONNX model before a node runs it.

`validate_model(model_bytes, input_shapes, limits)` returns a `ValidatedModel` or raises
`ModelRefused`, the one exception it raises for anything wrong with the model or the
shapes (a caller passing a path or a str instead of bytes gets a `TypeError`: our bug,
not the publisher's). Models are handled as bytes only, never as a path, so no onnx tool
ever resolves a file name relative to anything.

Checks run cheapest first, and the onnx tools that hostile models have attacked (checker,
shape inference) only run after the caps that keep them tractable:

 1. runtime-too-old     installed onnxruntime below `limits.min_ort_version`
 2. model-too-large     serialized size, before parsing
 3. parse-error         not a ModelProto
 4. too-many-nodes      nodes of the main graph (a length, before walking anything)
    too-complex         a bounded walk of the protobuf; every string valid UTF-8 (else
                        parse-error)
    too-many-nodes / too-many-edges   nodes and node inputs in all graphs, and in the
                        same walk
    external-data       any tensor anywhere with external data (initializers, sparse
                        initializers, tensor attributes of Constant/ConstantOfShape/any op,
                        subgraphs, model-local functions, training info)
 5. model-function      model-local functions: refused, not inlined. Inlining nested
                        functions multiplies nodes exponentially (a 2.3 KB file ran the
                        checker, inference and session creation past 20 s) and standard
                        exporters can inline before publishing
                        (onnx.inliner.inline_local_functions), after which the node cap
                        applies to what will really run.
    training-info       training info graphs: not inference
 6. ir-version / opset / op-domain   IR version and opset bounds; only '' ('ai.onnx') and
                        'ai.onnx.ml' may be imported or used
 7. control-flow / random-op / unknown-op   per node: Loop, Scan, If, SequenceMap or any
                        graph attribute; RandomNormal(Like), RandomUniform(Like),
                        Multinomial, Bernoulli, Dropout with a training_mode that is not a
                        constant false; ops missing from onnx's registry at the model's
                        opset, or deprecated there
 8. duplicate-name / bad-tensor / bad-dtype / tensor-too-large   initializers (duplicate
                        names: the last one silently wins in onnxruntime), graph inputs and
                        node outputs; initializer dims, raw data length, sizes
 9. too-many-inputs / too-many-outputs / input-mismatch / non-tensor-type   graph inputs
                        against the lease's concrete shapes: every input given, no other,
                        same rank, fixed dims equal
10. checker             onnx.checker on the model
11. shape-inference     strict shape inference on a copy whose inputs carry the concrete
                        shapes and from which every shape the model declares for
                        intermediates and outputs is removed (a declared shape can lie;
                        inference must derive each one). First without data propagation;
                        only if that leaves a tensor unbounded, again with it
    too-complex         (before that second pass) the 1-D tensors data propagation would
                        expand into one ~70-byte dim per element are too long. onnx has no shape
                        inference for some ai.onnx.ml ops (Scaler, Normalizer, Imputer,
                        LinearRegressor, SVMRegressor, TreeEnsembleRegressor/Classifier,
                        FeatureVectorizer; ArrayFeatureExtractor gets a type only); their
                        output shapes follow from input shapes and attributes as in
                        onnxruntime's kernels, and inference is rerun with them (at most 8
                        times); likewise the mask output of Dropout before opset 12.
                        SVMClassifier's scores have no such simple rule: refused.
12. declared-shape      a declared output dimension disagrees with the inferred one
13. unbounded-shape / non-tensor-type / bad-dtype / tensor-too-large   every node output
                        must have a tensor type and a fully concrete shape. Ops whose output
                        size comes from data (Reshape, Expand, Tile, Resize, Upsample,
                        Range, ConstantOfShape, Pad, OneHot, TopK, Compress, NonZero,
                        Unique, NonMaxSuppression, ...) pass only when inference could
                        compute their size from constants.
14. workspace-too-large / total-too-large / peak-too-large / compute-too-large   estimates
                        over the whole graph (see `ModelLimits`)
15. scalar-tensor       a fed graph input or a graph output of rank 0: a shard is split
                        into micro-batches and joined along axis 0, so such a model would
                        load, run, then fail. Checked last so that a model breaking an
                        earlier rule as well reports that one.

`ModelRefused.rule` is one of `RULES`; `node` and `tensor` name what was refused. Nodes
without a name are named `OpType#index` (index in their graph); nodes in subgraphs and
functions carry a path (`Loop_1.body/Add#0`, `function custom:f/Add#0`).

What validation cannot catch (the runner must): CPU time (dilated convolutions, big
matmuls within `max_macs` still take long), real memory use (kernels may allocate more than
estimated; string lengths), outputs that differ from the inferred types and shapes, and
bugs in onnx's or onnxruntime's own code. Nor all of its own cost: a 1-D tensor whose
length only data propagation learns (Expand(x, Concat([10^6])) then Adds) escapes the
too-complex budget (~70 bytes per element per propagating op). So a node runs validation
in the sandbox child (`Sandbox.validate`; `run_shard` does it by default), under the same
address-space, CPU and wall-clock limits as execution; a MemoryError is re-raised, never
reported as a rule.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import onnx
import onnx.checker
import onnx.defs
import onnx.numpy_helper
import onnx.shape_inference
from onnx import AttributeProto, GraphProto, ModelProto, NodeProto, SparseTensorProto, TensorProto

from .limits import ModelLimits

# --- rules -------------------------------------------------------------------------------

RULES: dict[str, str] = {
    "runtime-too-old": "installed onnxruntime is older than the required floor",
    "model-too-large": "serialized model larger than the node accepts",
    "parse-error": "bytes are not an ONNX ModelProto",
    "too-many-nodes": "more nodes than the node accepts",
    "too-many-edges": "more node inputs than the node accepts",
    "too-complex": "validating the model would cost more than the node allows (protobuf "
                   "messages walked, values held by data propagation)",
    "external-data": "a tensor refers to data outside the model bytes",
    "model-function": "model-local functions are not accepted",
    "training-info": "training info graphs are not accepted",
    "ir-version": "IR version out of bounds",
    "opset": "opset missing, duplicated or out of bounds",
    "op-domain": "an op domain other than '' / 'ai.onnx' / 'ai.onnx.ml'",
    "unknown-op": "an op not in onnx's registry at the model's opset, or deprecated there",
    "control-flow": "control flow or subgraphs (Loop, Scan, If, SequenceMap)",
    "random-op": "a random op, or Dropout in training mode",
    "duplicate-name": "a tensor name defined twice",
    "bad-tensor": "a tensor whose dims or data are malformed",
    "bad-dtype": "an element type that is undefined or unknown",
    "too-many-inputs": "more graph inputs than the node accepts",
    "too-many-outputs": "more graph outputs than the node accepts",
    "input-mismatch": "graph inputs and the lease's input shapes disagree",
    "non-tensor-type": "a sequence, map, optional or sparse value where a tensor is needed",
    "scalar-tensor": "a graph input or output of rank 0 (shards are split and joined along "
                     "axis 0, which a scalar does not have)",
    "checker": "onnx.checker refused the model",
    "shape-inference": "strict shape inference failed",
    "declared-shape": "a declared output shape disagrees with the inferred one",
    "unbounded-shape": "a tensor whose size static inference cannot bound",
    "tensor-too-large": "one tensor larger than the node accepts",
    "workspace-too-large": "one node's scratch space larger than the node accepts",
    "total-too-large": "all tensors together larger than the node accepts",
    "peak-too-large": "estimated peak memory larger than the node accepts",
    "compute-too-large": "estimated multiply-accumulates above the node's limit",
}

LIMIT_RULES = frozenset({
    "runtime-too-old", "model-too-large", "too-many-nodes", "too-many-edges", "too-complex",
    "too-many-inputs", "too-many-outputs", "tensor-too-large", "workspace-too-large",
    "total-too-large", "peak-too-large", "compute-too-large", "ir-version", "opset",
})
"""Rules that say "too big or too new for this node" rather than "malformed or hostile"."""


class ModelRefused(Exception):
    """A model this node will not run. One type for every rule.

    `rule`: a code from `RULES`; `node`, `tensor`: what was refused (None when the rule is
    about the whole model); `reason`: human-readable detail. `over_limit` is true when the
    model broke only one of this node's limits (see `LIMIT_RULES`): do not blame the
    publisher for that.
    """

    def __init__(self, rule: str, reason: str, *, node: str | None = None,
                 tensor: str | None = None):
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}")
        self.rule = rule
        self.reason = reason
        self.node = node
        self.tensor = tensor
        where = []
        if node is not None:
            where.append(f"node {node!r}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{rule}: {' '.join(where) + ': ' if where else ''}{reason}")

    @property
    def over_limit(self) -> bool:
        return self.rule in LIMIT_RULES


# --- result --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output with its concrete shape for this lease."""

    name: str
    elem_type: int
    """onnx.TensorProto element type (1 = FLOAT, 7 = INT64, ...)."""
    shape: tuple[int, ...]
    nbytes: int

    @property
    def type_name(self) -> str:
        return TensorProto.DataType.Name(self.elem_type)

    @property
    def dtype(self):
        """The numpy dtype to feed or expect (object for strings)."""
        return onnx.helper.tensor_dtype_to_np_dtype(self.elem_type)


@dataclass(frozen=True)
class ValidatedModel:
    """A model that passed every rule for these input shapes and limits.

    Run `model_bytes` (unchanged, so `digest` matches the lease's model digest), feed
    exactly `inputs` (names, dtypes, shapes), and compare every real output with `outputs`
    before using or hashing it: inference may still be wrong about a model.
    """

    model_bytes: bytes
    digest: bytes
    """SHA-256 of model_bytes."""
    ir_version: int
    opset: int
    ml_opset: int | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    node_count: int
    constant_bytes: int
    """Initializers (sparse ones dense) and outputs of nodes fed only by constants (which
    onnxruntime folds at load time)."""
    total_bytes: int
    """All tensors added up."""
    peak_bytes: int
    """Estimated peak memory of one run (see ModelLimits.max_peak_bytes)."""
    macs: int
    """Estimated multiply-accumulates of one run."""
    op_types: tuple[str, ...]
    """Distinct op types, sorted (domain-qualified for ai.onnx.ml)."""


# --- tables --------------------------------------------------------------------------------

STANDARD_DOMAINS = {"": "", "ai.onnx": "", "ai.onnx.ml": "ai.onnx.ml"}
CONTROL_FLOW_OPS = frozenset({"Loop", "Scan", "If", "SequenceMap"})
RANDOM_OPS = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
    "Bernoulli",
})

_T = TensorProto
ELEM_BITS: dict[int, int] = {
    _T.FLOAT: 32, _T.UINT8: 8, _T.INT8: 8, _T.UINT16: 16, _T.INT16: 16, _T.INT32: 32,
    _T.INT64: 64, _T.BOOL: 8, _T.FLOAT16: 16, _T.DOUBLE: 64, _T.UINT32: 32, _T.UINT64: 64,
    _T.COMPLEX64: 64, _T.COMPLEX128: 128, _T.BFLOAT16: 16,
}
for _name, _bits in (("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8),
                     ("FLOAT8E5M2FNUZ", 8), ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4),
                     ("FLOAT8E8M0", 8), ("UINT2", 2), ("INT2", 2), ("FLOAT6E2M3", 6),
                     ("FLOAT6E3M2", 6)):
    if hasattr(_T, _name):
        ELEM_BITS[getattr(_T, _name)] = _bits
STRING = _T.STRING


def _type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return str(elem_type)


# --- runtime version -----------------------------------------------------------------------

def _parse_version(text: str) -> tuple[tuple[int, ...], bool]:
    """'1.32.0' -> ((1, 32, 0), True); pre-releases ('1.32.0rc1', '.dev') -> final False."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)(.*)$", text)
    if not m:
        return ((), False)
    nums = tuple(int(x) for x in m.group(1).split("."))
    while len(nums) > 1 and nums[-1] == 0:
        nums = nums[:-1]
    rest = m.group(2).lower()
    final = not re.match(r"[.\-_]?(a|alpha|b|beta|c|rc|pre|preview|dev)", rest)
    return nums, final


def installed_ort_version() -> str:
    """The installed onnxruntime's version, without importing it."""
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino",
                 "onnxruntime-directml"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import onnxruntime  # a build not installed as a distribution

    return onnxruntime.__version__


def check_runtime(limits: ModelLimits, runtime_version: str | None = None) -> None:
    """Refuse (rule runtime-too-old) when onnxruntime is older than the floor."""
    have = runtime_version if runtime_version is not None else installed_ort_version()
    floor = _parse_version(limits.min_ort_version)
    got = _parse_version(have)
    if not got[0] or (got[0], got[1]) < (floor[0], True):
        raise ModelRefused(
            "runtime-too-old",
            f"onnxruntime {have} is older than {limits.min_ort_version}, the oldest release "
            "measured to agree with others within the verification tolerance",
        )


# --- walking the protobuf ------------------------------------------------------------------

def _node_label(node: NodeProto, index: int, prefix: str = "") -> str:
    return prefix + (node.name if node.name else f"{node.op_type}#{index}")


def _graph_attrs(attr: AttributeProto) -> list[GraphProto]:
    graphs = list(attr.graphs)
    if attr.HasField("g"):
        graphs.insert(0, attr.g)
    return graphs


def _attr_tensors(attr: AttributeProto) -> Iterator[TensorProto]:
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    if attr.HasField("sparse_tensor"):
        yield attr.sparse_tensor.values
        yield attr.sparse_tensor.indices
    for sp in attr.sparse_tensors:
        yield sp.values
        yield sp.indices


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL or len(t.external_data) > 0


def _external_detail(t: TensorProto) -> str:
    loc = next((e.value for e in t.external_data if e.key == "location"), None)
    return f"external data at {loc!r}" if loc is not None else "data_location EXTERNAL"


def _check_text(model: ModelProto, limits: ModelLimits) -> None:
    """Every string field is valid UTF-8 (protobuf hands proto2 strings that are not to
    Python as bytes), walking at most `limits.max_messages` messages.

    Graph value_info is skipped: it is dropped before inference and never read here.
    """
    stack: list = [model]
    seen = 0
    value_info = GraphProto.DESCRIPTOR.fields_by_name["value_info"]
    while stack:
        msg = stack.pop()
        seen += 1
        if seen > limits.max_messages:
            raise ModelRefused("too-complex",
                               f"more than {limits.max_messages} protobuf messages")
        if isinstance(msg, TensorProto):  # do not copy its data out just to skip it
            for text in (msg.name, msg.doc_string):
                if not isinstance(text, str):
                    raise ModelRefused("parse-error", "TensorProto.name is not UTF-8")
            stack.extend(msg.external_data)
            stack.extend(getattr(msg, "metadata_props", ()))
            continue
        for field, value in msg.ListFields():
            repeated = _is_repeated(field)
            if field.type == field.TYPE_STRING:
                for v in (value if repeated else (value,)):
                    if not isinstance(v, str):
                        raise ModelRefused("parse-error",
                                           f"{msg.DESCRIPTOR.name}.{field.name} is not UTF-8")
            elif field.type == field.TYPE_MESSAGE and field is not value_info:
                if repeated:
                    stack.extend(value)
                else:
                    stack.append(value)


def _is_repeated(field) -> bool:
    flag = getattr(field, "is_repeated", None)
    if isinstance(flag, bool):
        return flag
    return field.label == field.LABEL_REPEATED


def _walk(model: ModelProto, limits: ModelLimits) -> None:
    """Count nodes and edges in every graph and refuse any external data, in one pass.

    An explicit stack, not recursion: nesting is bounded by protobuf's parse depth anyway,
    but the walk stops as soon as a cap is passed, so its cost is bounded by the caps.
    """
    stack: list[tuple[GraphProto | None, Sequence[NodeProto], str]] = [(model.graph, model.graph.node, "")]
    for f in model.functions:
        stack.append((None, f.node, f"function {f.domain}:{f.name}/"))
    for i, ti in enumerate(model.training_info):
        stack.append((ti.initialization, ti.initialization.node, f"training_info[{i}].initialization/"))
        stack.append((ti.algorithm, ti.algorithm.node, f"training_info[{i}].algorithm/"))
    nodes = edges = 0
    while stack:
        graph, graph_nodes, prefix = stack.pop()
        if graph is not None:
            for t in graph.initializer:
                if _is_external(t):
                    raise ModelRefused("external-data", f"initializer has {_external_detail(t)}",
                                       tensor=prefix + t.name)
            for sp in graph.sparse_initializer:
                for part in (sp.values, sp.indices):
                    if _is_external(part):
                        raise ModelRefused("external-data",
                                           f"sparse initializer has {_external_detail(part)}",
                                           tensor=prefix + (sp.values.name or part.name))
        nodes += len(graph_nodes)
        if nodes > limits.max_nodes:
            raise ModelRefused("too-many-nodes",
                               f"more than {limits.max_nodes} nodes (counting subgraphs and "
                               "functions)")
        for index, node in enumerate(graph_nodes):
            edges += len(node.input)
            if edges > limits.max_node_inputs:
                raise ModelRefused("too-many-edges",
                                   f"more than {limits.max_node_inputs} node inputs in all; "
                                   f"this node has {len(node.input)}",
                                   node=_node_label(node, index, prefix))
            for attr in node.attribute:
                for t in _attr_tensors(attr):
                    if _is_external(t):
                        raise ModelRefused("external-data",
                                           f"attribute {attr.name!r} has {_external_detail(t)}",
                                           node=_node_label(node, index, prefix),
                                           tensor=t.name or attr.name)
                for j, g in enumerate(_graph_attrs(attr)):
                    label = _node_label(node, index, prefix)
                    suffix = f"[{j}]" if len(attr.graphs) else ""
                    stack.append((g, g.node, f"{label}.{attr.name}{suffix}/"))


# --- opsets and ops ------------------------------------------------------------------------

def _opsets(model: ModelProto, limits: ModelLimits) -> dict[str, int]:
    if not (limits.min_ir_version <= model.ir_version <= limits.max_ir_version):
        raise ModelRefused("ir-version",
                           f"IR version {model.ir_version} outside "
                           f"[{limits.min_ir_version}, {limits.max_ir_version}]")
    registry_max = {"": onnx.defs.onnx_opset_version(),
                    "ai.onnx.ml": onnx.defs.onnx_ml_opset_version()}
    bounds = {"": (limits.min_opset, limits.max_opset),
              "ai.onnx.ml": (limits.min_ml_opset, limits.max_ml_opset)}
    opsets: dict[str, int] = {}
    for imp in model.opset_import:
        if imp.domain not in STANDARD_DOMAINS:
            continue  # refused after the nodes, so a node using it is named
        domain = STANDARD_DOMAINS[imp.domain]
        if domain in opsets and opsets[domain] != imp.version:  # skl2onnx repeats '' at one version
            raise ModelRefused("opset", f"domain {imp.domain or 'ai.onnx'!r} imported at "
                               f"opsets {opsets[domain]} and {imp.version}")
        lo, hi = bounds[domain]
        hi = min(hi, registry_max.get(domain, 0))
        if not (lo <= imp.version <= hi):
            raise ModelRefused("opset",
                               f"opset {imp.version} of domain {imp.domain or 'ai.onnx'!r} "
                               f"outside [{lo}, {hi}]")
        opsets[domain] = imp.version
    if "" not in opsets:
        raise ModelRefused("opset", "no default-domain (ai.onnx) opset imported")
    return opsets


def _constant_false(name: str, constants: Mapping[str, TensorProto]) -> bool:
    t = constants.get(name)
    if t is None or t.data_type != TensorProto.BOOL:
        return False
    try:
        arr = onnx.numpy_helper.to_array(t)
    except Exception:
        return False
    return arr.size == 1 and not bool(arr.reshape(-1)[0])


def _check_nodes(graph: GraphProto, opsets: Mapping[str, int]) -> None:
    constants: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
    for index, node in enumerate(graph.node):
        label = _node_label(node, index)
        if node.domain not in STANDARD_DOMAINS:
            raise ModelRefused("op-domain",
                               f"{node.op_type} is in domain {node.domain!r}; only '', "
                               "'ai.onnx' and 'ai.onnx.ml' run here", node=label)
        domain = STANDARD_DOMAINS[node.domain]
        if domain not in opsets:
            raise ModelRefused("opset", f"domain {node.domain!r} used but not imported",
                               node=label)
        if domain == "" and node.op_type in CONTROL_FLOW_OPS:
            raise ModelRefused("control-flow", f"{node.op_type} is not accepted", node=label)
        if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) or a.HasField("g")
               or len(a.graphs) for a in node.attribute):
            raise ModelRefused("control-flow", f"{node.op_type} carries a subgraph", node=label)
        if domain == "" and node.op_type in RANDOM_OPS:
            raise ModelRefused("random-op", f"{node.op_type} is not deterministic", node=label)
        if domain == "" and node.op_type == "Dropout" and len(node.input) >= 3 \
                and node.input[2] and not _constant_false(node.input[2], constants):
            raise ModelRefused("random-op",
                               "Dropout with a training_mode input that is not a constant "
                               "false", node=label, tensor=node.input[2])
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets[domain], domain)
        except onnx.defs.SchemaError:
            raise ModelRefused("unknown-op",
                               f"{node.op_type} is not a {node.domain or 'ai.onnx'} op at "
                               f"opset {opsets[domain]}", node=label) from None
        if schema.deprecated:
            raise ModelRefused("unknown-op",
                               f"{node.op_type} is deprecated at opset {opsets[domain]}",
                               node=label)
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t") and node.output:
                    constants[node.output[0]] = a.t


# --- tensors and sizes ---------------------------------------------------------------------

def _nbytes(elem_type: int, dims: Sequence[int], limits: ModelLimits) -> int:
    n = math.prod(dims)
    if elem_type == STRING:
        return n * limits.string_element_bytes
    return (n * ELEM_BITS[elem_type] + 7) // 8


def _known_dtype(elem_type: int) -> bool:
    return elem_type == STRING or elem_type in ELEM_BITS


def _check_size(nbytes: int, limits: ModelLimits, what: str, **where: str) -> None:
    if nbytes > limits.max_tensor_bytes:
        raise ModelRefused("tensor-too-large",
                           f"{what} needs {nbytes} bytes, more than {limits.max_tensor_bytes}",
                           **where)


def _initializer_bytes(t: TensorProto, limits: ModelLimits, what: str, **where: str) -> int:
    if not _known_dtype(t.data_type):
        raise ModelRefused("bad-dtype", f"{what} has element type {_type_name(t.data_type)}",
                           **where)
    if any(d < 0 for d in t.dims):
        raise ModelRefused("bad-tensor", f"{what} has negative dims {_fmt_dims(t.dims)}", **where)
    nbytes = _nbytes(t.data_type, t.dims, limits)
    _check_size(nbytes, limits, what, **where)
    if t.HasField("raw_data") and t.data_type != STRING and len(t.raw_data) != nbytes:
        raise ModelRefused("bad-tensor",
                           f"{what} has {len(t.raw_data)} bytes of data for dims "
                           f"{_fmt_dims(t.dims)} ({nbytes} bytes)", **where)
    return nbytes


def _sparse_bytes(sp: SparseTensorProto, limits: ModelLimits, what: str, **where: str) -> int:
    """Sparse tensors count at their dense size: onnxruntime densifies them at load."""
    dt = sp.values.data_type
    if not _known_dtype(dt):
        raise ModelRefused("bad-dtype", f"{what} has element type {_type_name(dt)}", **where)
    if any(d < 0 for d in sp.dims):
        raise ModelRefused("bad-tensor", f"{what} has negative dims {_fmt_dims(sp.dims)}", **where)
    nbytes = _nbytes(dt, sp.dims, limits)
    _check_size(nbytes, limits, f"{what} (densified)", **where)
    return nbytes


@dataclass
class _Shaped:
    elem_type: int
    dims: tuple[int, ...]
    nbytes: int


def _dims_of(type_proto: onnx.TypeProto) -> tuple[int, ...] | None:
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:
            return None
        dims.append(d.dim_value)
    return tuple(dims)


def _fmt_dims(dims: Sequence[object], most: int = 8) -> str:
    shown = [str(d) for d in list(dims[:most])]
    return "[" + ", ".join(shown) + (f", ... ({len(dims)} dims)" if len(dims) > most else "") + "]"


def _describe_dims(type_proto: onnx.TypeProto) -> str:
    tt = type_proto.tensor_type
    if not tt.HasField("shape"):
        return "unknown rank"
    return _fmt_dims([d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                      for d in tt.shape.dim])


def _value_kind(type_proto: onnx.TypeProto) -> str:
    kind = type_proto.WhichOneof("value")
    return kind or "no type"


# --- graph inputs --------------------------------------------------------------------------

def _normalise_shapes(input_shapes: Mapping[str, Sequence[int]], limits: ModelLimits
                      ) -> dict[str, tuple[int, ...]]:
    if not isinstance(input_shapes, Mapping):
        raise ModelRefused("input-mismatch", "input shapes must be a mapping of name to dims")
    if len(input_shapes) > limits.max_graph_inputs:
        raise ModelRefused("too-many-inputs",
                           f"{len(input_shapes)} input shapes given, more than "
                           f"{limits.max_graph_inputs}")
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in input_shapes.items():
        if not isinstance(name, str):
            raise ModelRefused("input-mismatch", f"input name {name!r} is not a str")
        if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) \
                or len(dims) > limits.max_rank:
            raise ModelRefused("input-mismatch",
                               f"shape must be a sequence of at most {limits.max_rank} ints, "
                               f"got {dims!r:.120}", tensor=name)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ModelRefused("input-mismatch", f"dims must be ints >= 1, got {dims!r:.120}",
                               tensor=name)
        shapes[name] = tuple(int(d) for d in dims)
    return shapes


def _check_inputs(graph: GraphProto, shapes: Mapping[str, tuple[int, ...]],
                  constant_names: set[str], limits: ModelLimits) -> list[onnx.ValueInfoProto]:
    """The graph inputs the lease must feed (those not backed by an initializer)."""
    if len(graph.output) > limits.max_graph_outputs:
        raise ModelRefused("too-many-outputs",
                           f"{len(graph.output)} graph outputs, more than "
                           f"{limits.max_graph_outputs}")
    fed = [vi for vi in graph.input if vi.name not in constant_names]
    if len(fed) > limits.max_graph_inputs:  # IR 3 lists every initializer as an input too
        raise ModelRefused("too-many-inputs",
                           f"{len(fed)} graph inputs, more than {limits.max_graph_inputs}")
    fed_names = {vi.name for vi in fed}
    for name in shapes:
        if name in constant_names and name not in fed_names:
            raise ModelRefused("input-mismatch",
                               "a shape is given for an initializer, which is not a runtime "
                               "input", tensor=name)
        if name not in fed_names:
            raise ModelRefused("input-mismatch", "a shape is given for no graph input",
                               tensor=name)
    for vi in fed:
        if vi.name not in shapes:
            raise ModelRefused("input-mismatch", "graph input has no shape in the lease",
                               tensor=vi.name)
        if vi.type.WhichOneof("value") != "tensor_type":
            raise ModelRefused("non-tensor-type",
                               f"graph input is a {_value_kind(vi.type)}, not a tensor",
                               tensor=vi.name)
        tt = vi.type.tensor_type
        if not _known_dtype(tt.elem_type):
            raise ModelRefused("bad-dtype",
                               f"graph input has element type {_type_name(tt.elem_type)}",
                               tensor=vi.name)
        given = shapes[vi.name]
        if tt.HasField("shape"):
            declared = tt.shape.dim
            if len(declared) != len(given):
                raise ModelRefused("input-mismatch",
                                   f"rank {len(given)} given {list(given)}, the model declares "
                                   f"rank {len(declared)} {_describe_dims(vi.type)}",
                                   tensor=vi.name)
            for axis, (d, g) in enumerate(zip(declared, given)):
                if d.HasField("dim_value") and d.dim_value != g:
                    raise ModelRefused("input-mismatch",
                                       f"dim {axis} is {g}, the model fixes it at {d.dim_value}",
                                       tensor=vi.name)
        _check_size(_nbytes(tt.elem_type, given, limits), limits, "graph input",
                    tensor=vi.name)
    for vo in graph.output:
        if vo.type.WhichOneof("value") != "tensor_type":
            raise ModelRefused("non-tensor-type",
                               f"graph output is a {_value_kind(vo.type)}, not a tensor "
                               "(export classifiers without ZipMap)", tensor=vo.name)
    return fed


def _names(graph: GraphProto) -> None:
    """Every tensor defined once: initializers, graph inputs, node outputs."""
    seen: dict[str, str] = {}

    def define(name: str, what: str, node: str | None = None) -> None:
        if not name:
            return
        if name in seen:
            raise ModelRefused("duplicate-name", f"{what} reuses the name of {seen[name]}",
                               node=node, tensor=name)
        seen[name] = what

    for t in graph.initializer:
        define(t.name, "an initializer")
    for sp in graph.sparse_initializer:
        define(sp.values.name, "a sparse initializer")
    initializer_names = set(seen)
    for vi in graph.input:
        if vi.name in initializer_names:  # an input with a default value (IR >= 4), allowed
            continue
        define(vi.name, "a graph input")
    for index, node in enumerate(graph.node):
        label = _node_label(node, index)
        for out in node.output:
            define(out, f"an output of {label}", node=label)


# --- shape inference -----------------------------------------------------------------------

INFERENCE_DATA_ELEMENTS = 4096
_TENSOR_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data",
                       "double_data", "uint64_data")


def _prepared(model: ModelProto, shapes: Mapping[str, tuple[int, ...]],
              initializer_dims: Mapping[str, tuple[int, ...]]) -> ModelProto:
    """A copy for inference: concrete input shapes, no declared shapes for anything else."""
    prep = ModelProto()
    prep.CopyFrom(model)
    g = prep.graph
    del g.value_info[:]
    for t in g.initializer:
        # Inference reads only small constants (shapes, axes, scales); weights are dims
        # only here, which saves copying them through the C++ inference twice. Less data
        # can only make inference know less, never more.
        if math.prod(t.dims) > INFERENCE_DATA_ELEMENTS:
            for field in _TENSOR_DATA_FIELDS:
                t.ClearField(field)
    for vi in g.input:
        dims = shapes.get(vi.name, initializer_dims.get(vi.name))
        if dims is None or vi.type.WhichOneof("value") != "tensor_type":
            continue
        shape = vi.type.tensor_type.shape
        shape.Clear()
        for d in dims:
            shape.dim.add().dim_value = d
    for vo in g.output:
        if vo.type.WhichOneof("value") == "tensor_type" and vo.type.tensor_type.HasField("shape"):
            for d in vo.type.tensor_type.shape.dim:
                d.Clear()  # keep the rank, forget the values: inference must derive them
    return prep


_NODE_IN_MESSAGE = re.compile(r"\(op_type:(\w+), node name: ([^)]*)\)|Name: (\S*) OpType")


def _infer(prep: ModelProto, data_prop: bool) -> ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(prep, check_type=True, strict_mode=True,
                                                 data_prop=data_prop)
    except MemoryError:
        raise  # the caller's memory limit, not the model's fault to report as a rule
    except Exception as e:  # InferenceError, ValidationError, RuntimeError from C++
        msg = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
        m = _NODE_IN_MESSAGE.search(str(e))
        node = None
        if m:
            node = m.group(2) if m.group(2) is not None else m.group(3)
            node = node or (f"{m.group(1)}" if m.group(1) else None)
        raise ModelRefused("shape-inference", msg, node=node) from None


HINT_PASSES = 8


def _missing_outputs(node: NodeProto, ins: Sequence[tuple[int, tuple[int, ...]] | None],
                     opsets: Mapping[str, int]) -> list[tuple[int, tuple[int, ...]]] | None:
    """Output (elem_type, dims) of ops that onnx 1.23 infers no shape for: ai.onnx.ml ops
    common in scikit-learn exports, following onnxruntime's kernels, and the mask of old
    Dropouts (opset 7-11: same shape as the input). None if unknown.
    """
    if not ins or ins[0] is None:
        return None
    attrs = {a.name: a for a in node.attribute}
    op = node.op_type
    elem, dims = ins[0]
    if node.domain in ("", "ai.onnx"):
        if op == "Dropout":
            mask = elem if opsets[""] < 10 else TensorProto.BOOL
            return [(elem, dims), (mask, dims)]
        return None
    if op in ("Scaler", "Normalizer"):
        return [(TensorProto.FLOAT, dims)]
    if op == "Imputer":
        return [(elem, dims)]
    if op == "ArrayFeatureExtractor":  # onnx infers the type only
        if len(ins) < 2 or ins[1] is None:
            return None
        picked = math.prod(ins[1][1])
        return [(elem, (1, picked) if len(dims) == 1 else dims[:-1] + (picked,))]
    if len(dims) not in (1, 2):
        return None
    n = dims[0] if len(dims) == 2 else 1
    if op == "LinearRegressor":
        return [(TensorProto.FLOAT, (n, attrs["targets"].i if "targets" in attrs else 1))]
    if op == "SVMRegressor":
        return [(TensorProto.FLOAT, (n, 1))]
    if op == "TreeEnsembleRegressor":
        return [(TensorProto.FLOAT, (n, attrs["n_targets"].i if "n_targets" in attrs else 1))]
    if op == "TreeEnsembleClassifier":
        if "classlabels_int64s" in attrs and len(attrs["classlabels_int64s"].ints):
            label, classes = TensorProto.INT64, len(attrs["classlabels_int64s"].ints)
        elif "classlabels_strings" in attrs and len(attrs["classlabels_strings"].strings):
            label, classes = TensorProto.STRING, len(attrs["classlabels_strings"].strings)
        else:
            return None
        return [(label, (n,)), (TensorProto.FLOAT, (n, classes))]
    if op == "FeatureVectorizer" and "inputdimensions" in attrs and all(i is not None for i in ins):
        return [(TensorProto.FLOAT, (n, sum(attrs["inputdimensions"].ints)))]
    return None


def _shape_hints(prep: ModelProto, inferred: ModelProto, opsets: Mapping[str, int]) -> bool:
    """Write the shapes `_missing_outputs` knows into `prep`; True if it added any."""
    g = inferred.graph
    known: dict[str, tuple[int, tuple[int, ...]]] = {}
    for t in g.initializer:
        known[t.name] = (t.data_type, tuple(t.dims))
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _dims_of(vi.type) if vi.type.WhichOneof("value") == "tensor_type" else None
        if dims is not None:
            known[vi.name] = (vi.type.tensor_type.elem_type, dims)
    outputs = {vo.name: vo for vo in prep.graph.output}
    added = False
    for node in g.node:
        if all(not o or o in known for o in node.output):
            continue
        result = _missing_outputs(node, [known.get(i) for i in node.input], opsets)
        if result is None:
            continue
        for name, (elem, dims) in zip(node.output, result):
            if not name or name in known:
                continue
            if name in outputs:
                tt = outputs[name].type.tensor_type
                tt.elem_type = elem
                tt.shape.Clear()
                for d in dims:
                    tt.shape.dim.add().dim_value = d
            else:
                prep.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, dims))
            added = True
    return added


# --- estimates -----------------------------------------------------------------------------

def _einsum_steps(equation: str, in_dims: Sequence[tuple[int, ...]]
                  ) -> tuple[int, int] | None:
    """(work, largest intermediate) in elements for onnxruntime's Einsum, or None.

    onnxruntime contracts the operands left to right. Before each pair it reduces labels
    found in one operand only and nowhere later; then it materialises every label of the
    pair still needed by the output or a later operand. So 'ab,cd,ac,bd->' builds the whole
    abcd outer product from four tiny matrices (~32 GB for dims of 300; notes/onnx.md),
    while 'bij,bjk->bik' only ever holds bik. Measured: dims of 100 -> 400 MB intermediate,
    ~800 MB resident.
    """
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(in_dims) or not terms:
        return None
    size: dict[str, int] = {}
    operands: list[set[str]] = []
    ellipsis: set[str] = set()
    for term, dims in zip(terms, in_dims):
        head, dots, tail = term.partition("...")
        if not (head + tail).isalpha() and (head + tail) or "." in head + tail:
            return None
        n_ell = len(dims) - len(head) - len(tail)
        if n_ell < 0 or (n_ell and not dots):
            return None
        ell = [f"@{n_ell - 1 - i}" for i in range(n_ell)]  # broadcast from the right
        ellipsis.update(ell)
        labels = list(head) + ell + list(tail)
        for lab, d in zip(labels, dims):
            size[lab] = max(size.get(lab, 1), d)
        operands.append(set(labels))
    if arrow:
        if any(c not in size for c in rhs.replace("...", "")):
            return None
        out = set(rhs.replace("...", "")) | (ellipsis if "..." in rhs else set())
    else:
        counts: dict[str, int] = {}
        for labels in operands:
            for lab in labels:
                counts[lab] = counts.get(lab, 0) + 1
        out = {lab for lab, c in counts.items() if c == 1} | ellipsis

    suffix = [set(out)]  # suffix[j]: labels needed by the output or operands[-j:]
    for labels in reversed(operands):
        suffix.append(suffix[-1] | labels)

    def later(k: int) -> set[str]:
        return suffix[len(operands) - k]

    def elems(labels: set[str]) -> int:
        return math.prod(size[lab] for lab in labels)

    running = operands[0]
    work = elems(running)
    biggest = 0
    for k in range(1, len(operands)):
        after = later(k + 1)
        running = running & (after | operands[k])      # pre-reduce the running operand
        operand = operands[k] & (after | running)       # and the next one
        pair = running | operand
        work += elems(pair)
        running = pair & after
        biggest = max(biggest, elems(running))
    return work, biggest


def _estimate(node: NodeProto, label: str, shaped: Mapping[str, _Shaped]) -> tuple[int, int]:
    """(multiply-accumulates, scratch bytes) of one node; rough, documented in ModelLimits."""
    ins = [shaped.get(n) for n in node.input]
    outs = [shaped[n] for n in node.output if n in shaped]
    out_elems = sum(math.prod(o.dims) for o in outs)
    op = node.op_type if node.domain in ("", "ai.onnx") else ""
    attrs = {a.name: a for a in node.attribute}
    x = ins[0] if ins else None
    w = ins[1] if len(ins) > 1 else None
    y = outs[0] if outs else None
    elem_bytes = max(1, (ELEM_BITS.get(y.elem_type, 32) + 7) // 8) if y else 4
    if op in ("Conv", "ConvInteger", "QLinearConv") and y and len(y.dims) >= 3:
        wi = 3 if op == "QLinearConv" else 1
        wt = ins[wi] if len(ins) > wi else None
        if wt is not None and len(wt.dims) >= 2:
            per_out = math.prod(wt.dims[1:])  # C_in/group * kernel
            cols = per_out * math.prod(y.dims[2:])
            return math.prod(y.dims) * per_out, cols * elem_bytes
    if op == "ConvTranspose" and x is not None and w is not None and len(w.dims) >= 2:
        return math.prod(x.dims) * math.prod(w.dims[1:]), math.prod(w.dims[1:]) * \
            math.prod(x.dims[2:]) * elem_bytes
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul") and x is not None and y:
        k = x.dims[-1] if x.dims else 1
        return math.prod(y.dims) * k, 0
    if op == "Gemm" and x is not None and y and len(x.dims) == 2:
        trans_a = attrs.get("transA")
        k = x.dims[0] if trans_a is not None and trans_a.i else x.dims[1]
        return math.prod(y.dims) * k, 0
    if op in ("RNN", "GRU", "LSTM") and x is not None and w is not None and len(ins) > 2 \
            and ins[2] is not None and x.dims:
        seq_batch = math.prod(x.dims) // max(1, x.dims[-1])
        return seq_batch * (math.prod(w.dims) + math.prod(ins[2].dims)), 0
    if op == "Attention" and x is not None and w is not None and len(w.dims) >= 2:
        kv_len = w.dims[-2]
        rows = math.prod(x.dims) // max(1, x.dims[-1])
        heads = attrs["q_num_heads"].i if len(x.dims) == 3 and "q_num_heads" in attrs else 1
        return 2 * math.prod(x.dims) * kv_len, rows * max(1, heads) * kv_len * elem_bytes
    if op == "Einsum" and "equation" in attrs and all(i is not None for i in ins):
        steps = _einsum_steps(attrs["equation"].s.decode("utf-8", "replace"),
                              [i.dims for i in ins])  # type: ignore[union-attr]
        if steps is None:
            raise ModelRefused("unbounded-shape", "cannot bound this Einsum equation",
                               node=label)
        work, biggest = steps
        return work, 2 * biggest * elem_bytes
    in_elems = sum(math.prod(i.dims) for i in ins if i is not None)
    return max(in_elems, out_elems), 0


# --- the entry point -----------------------------------------------------------------------

def validate_model(model_bytes: bytes, input_shapes: Mapping[str, Sequence[int]],
                   limits: ModelLimits | None = None, *,
                   runtime_version: str | None = None) -> ValidatedModel:
    """Check an untrusted model for one lease's concrete input shapes.

    `model_bytes`: the serialized ModelProto (bytes, bytearray or memoryview; never a path).
    `input_shapes`: the concrete shape of every graph input the lease feeds (inputs backed
    by an initializer are constants and must not be named). `limits`: this node's limits
    (default `ModelLimits()`). `runtime_version`: the onnxruntime version to check against
    the floor (default: the installed one).

    Returns a `ValidatedModel`; raises `ModelRefused` for everything else wrong, and only
    that (a non-bytes model is a `TypeError`: the caller's bug).
    """
    limits = limits if limits is not None else ModelLimits()
    if isinstance(model_bytes, (bytearray, memoryview)):
        model_bytes = bytes(model_bytes)
    if not isinstance(model_bytes, bytes):
        raise TypeError(f"model must be bytes, not {type(model_bytes).__name__} "
                        "(models are never loaded from a path)")
    check_runtime(limits, runtime_version)
    if len(model_bytes) > limits.max_model_bytes:
        raise ModelRefused("model-too-large",
                           f"{len(model_bytes)} bytes, more than {limits.max_model_bytes}")
    shapes = _normalise_shapes(input_shapes, limits)
    model = _parse(model_bytes, limits)
    opsets = _structure(model, limits)
    graph = model.graph
    initializer_dims = _constants(graph, limits)
    fed = _check_inputs(graph, shapes, set(initializer_dims), limits)
    _checker(model_bytes)
    inferred = _infer_all(model, shapes, initializer_dims, opsets, limits)
    shaped = _bound_tensors(graph, inferred.graph, shapes, fed, limits)
    outputs = _outputs(graph, shaped)
    est = _estimate_run(inferred.graph, shaped, set(initializer_dims), shapes, limits)
    _no_scalars(fed, shapes, outputs)
    return ValidatedModel(
        model_bytes=model_bytes,
        digest=hashlib.sha256(model_bytes).digest(),
        ir_version=model.ir_version,
        opset=opsets[""],
        ml_opset=opsets.get("ai.onnx.ml"),
        inputs=tuple(TensorSpec(vi.name, vi.type.tensor_type.elem_type, shapes[vi.name],
                                shaped[vi.name].nbytes) for vi in fed),
        outputs=outputs,
        node_count=len(graph.node),
        constant_bytes=est.constant_bytes,
        total_bytes=est.total_bytes,
        peak_bytes=est.peak_bytes,
        macs=est.macs,
        op_types=tuple(sorted({(f"{n.domain}:" if n.domain not in ("", "ai.onnx") else "")
                               + n.op_type for n in graph.node})),
    )


def _parse(model_bytes: bytes, limits: ModelLimits) -> ModelProto:
    model = ModelProto()
    try:
        model.ParseFromString(model_bytes)
    except MemoryError:
        raise  # the caller's memory limit, not the model's fault to report as a rule
    except Exception as e:  # DecodeError, RecursionError, ...
        raise ModelRefused("parse-error", f"not an ONNX model: {e}"[:300]) from None
    if not model.HasField("graph"):
        raise ModelRefused("parse-error", "no graph")
    if len(model.graph.node) > limits.max_nodes:  # before walking anything
        raise ModelRefused("too-many-nodes", f"{len(model.graph.node)} nodes, more than "
                           f"{limits.max_nodes}")
    return model


def _structure(model: ModelProto, limits: ModelLimits) -> dict[str, int]:
    """Rules 4-8 up to the tensors: walks, functions, opsets, ops, names. Returns opsets."""
    _check_text(model, limits)
    _walk(model, limits)
    if model.functions:
        f = model.functions[0]
        raise ModelRefused("model-function",
                           f"{len(model.functions)} model-local function(s); inline them "
                           "before publishing (onnx.inliner.inline_local_functions)",
                           node=f"function {f.domain}:{f.name}")
    if model.training_info:
        raise ModelRefused("training-info", "training info graphs are not accepted")
    opsets = _opsets(model, limits)
    _check_nodes(model.graph, opsets)
    for imp in model.opset_import:
        if imp.domain not in STANDARD_DOMAINS:
            raise ModelRefused("op-domain", f"imports non-standard domain {imp.domain!r}")
    _names(model.graph)
    return opsets


def _constants(graph: GraphProto, limits: ModelLimits) -> dict[str, tuple[int, ...]]:
    """Check initializers, sparse initializers and tensor attributes; their dims by name."""
    dims: dict[str, tuple[int, ...]] = {}
    for t in graph.initializer:
        _initializer_bytes(t, limits, "initializer", tensor=t.name)
        dims[t.name] = tuple(t.dims)
    for sp in graph.sparse_initializer:
        _sparse_bytes(sp, limits, "sparse initializer", tensor=sp.values.name)
        dims[sp.values.name] = tuple(sp.dims)
    for index, node in enumerate(graph.node):
        label = _node_label(node, index)
        where = node.output[0] if node.output else None
        for a in node.attribute:
            if a.HasField("t"):
                _initializer_bytes(a.t, limits, f"attribute {a.name!r}", node=label,
                                   tensor=where or a.name)
            if a.HasField("sparse_tensor"):
                _sparse_bytes(a.sparse_tensor, limits, f"attribute {a.name!r}", node=label,
                              tensor=where or a.name)
    return dims


def _checker(model_bytes: bytes) -> None:
    try:
        onnx.checker.check_model(model_bytes)  # bytes: the checker never sees a path
    except MemoryError:
        raise  # the caller's memory limit, not the model's fault to report as a rule
    except Exception as e:  # ValidationError and C++ errors
        msg = str(e).strip()
        m = _NODE_IN_MESSAGE.search(msg)
        node = (m.group(2) if m.group(2) is not None else m.group(3)) if m else None
        raise ModelRefused("checker", (msg.splitlines()[0] if msg else type(e).__name__)[:500],
                           node=node or None) from None


def _infer_all(model: ModelProto, shapes: Mapping[str, tuple[int, ...]],
               initializer_dims: Mapping[str, tuple[int, ...]], opsets: Mapping[str, int],
               limits: ModelLimits) -> ModelProto:
    """Strict inference, first without data propagation (linear in the graph), then, only
    if that leaves a tensor unbounded, with it.

    onnx's data propagation writes every 1-D tensor of known length D that a propagating
    op (Add, Sub, Mul, Cast, Concat, Gather, Shape, Size, Slice, Squeeze, Unsqueeze)
    touches as D dims of ~70 bytes each: ConstantOfShape([10^7]) and twenty Adds, 545
    bytes, took 38 s and 7 GB. So the lengths the first pass knows are added up against
    `limits.max_propagated_dims` before the second pass runs.
    """
    prep = _prepared(model, shapes, initializer_dims)
    static = _infer_with_hints(prep, opsets, data_prop=False)
    if _all_bounded(static.graph):
        return static
    _check_propagation_cost(static.graph, opsets, limits)
    return _infer_with_hints(prep, opsets, data_prop=True)


def _infer_with_hints(prep: ModelProto, opsets: Mapping[str, int], data_prop: bool) -> ModelProto:
    inferred = _infer(prep, data_prop)
    for _ in range(HINT_PASSES):
        if not _shape_hints(prep, inferred, opsets):
            break
        inferred = _infer(prep, data_prop)
    return inferred


def _inferred_types(g: GraphProto) -> dict[str, onnx.TypeProto]:
    types = {vi.name: vi.type for vi in list(g.input) + list(g.value_info) + list(g.output)}
    for t in g.initializer:
        types.setdefault(t.name, onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    return types


def _all_bounded(g: GraphProto) -> bool:
    types = _inferred_types(g)
    return all(out in types and types[out].WhichOneof("value") == "tensor_type"
               and _dims_of(types[out]) is not None
               for node in g.node for out in node.output if out)


def _check_propagation_cost(g: GraphProto, opsets: Mapping[str, int],
                            limits: ModelLimits) -> None:
    types = _inferred_types(g)
    counted: set[str] = set()
    total = 0
    for index, node in enumerate(g.node):
        domain = STANDARD_DOMAINS.get(node.domain, node.domain)
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 0), domain)
        except onnx.defs.SchemaError:
            continue
        if not schema.has_data_propagation_function:
            continue
        for name in list(node.input) + list(node.output):
            tp = types.get(name)
            if not name or name in counted or tp is None:
                continue
            dims = _dims_of(tp) if tp.WhichOneof("value") == "tensor_type" else None
            if dims is not None and len(dims) == 1:
                counted.add(name)
                total += dims[0]
        if total > limits.max_propagated_dims:
            raise ModelRefused("too-complex",
                               f"data propagation would hold more than "
                               f"{limits.max_propagated_dims} values of 1-D tensors",
                               node=_node_label(node, index))


def _bound_tensors(graph: GraphProto, ig: GraphProto, shapes: Mapping[str, tuple[int, ...]],
                   fed: Sequence[onnx.ValueInfoProto], limits: ModelLimits
                   ) -> dict[str, _Shaped]:
    """Every tensor with a concrete shape, a known element type and a size within limits."""
    types = {vi.name: vi.type for vi in list(ig.value_info) + list(ig.output)}
    shaped: dict[str, _Shaped] = {}
    for t in graph.initializer:
        shaped[t.name] = _Shaped(t.data_type, tuple(t.dims), _nbytes(t.data_type, t.dims, limits))
    for sp in graph.sparse_initializer:
        dt = sp.values.data_type
        shaped[sp.values.name] = _Shaped(dt, tuple(sp.dims), _nbytes(dt, sp.dims, limits))
    for vi in fed:
        et = vi.type.tensor_type.elem_type
        shaped[vi.name] = _Shaped(et, shapes[vi.name], _nbytes(et, shapes[vi.name], limits))
    for index, node in enumerate(ig.node):
        label = _node_label(node, index)
        for out in node.output:
            if not out:
                continue
            tp = types.get(out)
            if tp is None:
                raise ModelRefused("unbounded-shape",
                                   f"inference gives {node.op_type}'s output no type",
                                   node=label, tensor=out)
            if tp.WhichOneof("value") != "tensor_type":
                raise ModelRefused("non-tensor-type",
                                   f"{node.op_type} yields a {_value_kind(tp)}, not a tensor",
                                   node=label, tensor=out)
            et = tp.tensor_type.elem_type
            if not _known_dtype(et):
                raise ModelRefused("bad-dtype", f"element type {_type_name(et)}",
                                   node=label, tensor=out)
            dims = _dims_of(tp)
            if dims is None:
                raise ModelRefused("unbounded-shape",
                                   f"{node.op_type}'s output shape {_describe_dims(tp)} is not "
                                   "known from the input shapes and constants alone",
                                   node=label, tensor=out)
            nbytes = _nbytes(et, dims, limits)
            _check_size(nbytes, limits, f"{node.op_type} output of shape {_fmt_dims(dims)}",
                        node=label, tensor=out)
            shaped[out] = _Shaped(et, dims, nbytes)
    return shaped


def _outputs(graph: GraphProto, shaped: Mapping[str, _Shaped]) -> tuple[TensorSpec, ...]:
    """Graph outputs as inferred, refusing any the model declares otherwise."""
    outputs = []
    for vo in graph.output:
        s = shaped.get(vo.name)
        if s is None:
            raise ModelRefused("unbounded-shape", "graph output is produced by no node",
                               tensor=vo.name)
        declared = vo.type.tensor_type
        if declared.elem_type != s.elem_type:
            raise ModelRefused("declared-shape",
                               f"declared element type {_type_name(declared.elem_type)}, "
                               f"inferred {_type_name(s.elem_type)}", tensor=vo.name)
        if declared.HasField("shape"):
            dd = declared.shape.dim
            if len(dd) != len(s.dims) or any(d.HasField("dim_value") and d.dim_value != v
                                             for d, v in zip(dd, s.dims)):
                raise ModelRefused("declared-shape",
                                   f"declared {_describe_dims(vo.type)}, inferred "
                                   f"{_fmt_dims(s.dims)}", tensor=vo.name)
        outputs.append(TensorSpec(vo.name, s.elem_type, s.dims, s.nbytes))
    return tuple(outputs)


def _no_scalars(fed: Sequence[onnx.ValueInfoProto], shapes: Mapping[str, tuple[int, ...]],
                outputs: Sequence[TensorSpec]) -> None:
    """Refuse rank-0 graph inputs (given or declared) and outputs (as inferred)."""
    for vi in fed:
        tt = vi.type.tensor_type
        if not shapes[vi.name] or (tt.HasField("shape") and not tt.shape.dim):
            raise ModelRefused("scalar-tensor", "graph input has rank 0 (declared "
                               f"{_describe_dims(vi.type)}, given {list(shapes[vi.name])}): "
                               "axis 0 must be the samples", tensor=vi.name)
    for o in outputs:
        if not o.shape:
            raise ModelRefused("scalar-tensor", "graph output has rank 0: micro-batch "
                               "outputs are joined along axis 0", tensor=o.name)


@dataclass(frozen=True)
class _RunEstimate:
    constant_bytes: int
    total_bytes: int
    peak_bytes: int
    macs: int


def _estimate_run(ig: GraphProto, shaped: Mapping[str, _Shaped], initializers: set[str],
                  shapes: Mapping[str, tuple[int, ...]], limits: ModelLimits) -> _RunEstimate:
    """Totals, liveness peak, scratch space and compute of one run, in graph order.

    Outputs of nodes fed only by constants count as constants: onnxruntime folds them into
    initializers at load time and keeps them for the session's life. Other node outputs
    are freed after their last use; inputs and graph outputs stay.
    """
    constant_names = set(initializers)
    for node in ig.node:
        if all(not name or name in constant_names for name in node.input):
            constant_names.update(name for name in node.output if name)
    constant_bytes = sum(shaped[n].nbytes for n in constant_names if n in shaped)
    total = sum(s.nbytes for s in shaped.values())
    if total > limits.max_total_bytes:
        raise ModelRefused("total-too-large",
                           f"all tensors add up to {total} bytes, more than "
                           f"{limits.max_total_bytes}")
    live = peak = constant_bytes + sum(shaped[name].nbytes for name in shapes)
    if peak > limits.max_peak_bytes:
        biggest = max((n for n in constant_names | set(shapes) if n in shaped),
                      key=lambda n: shaped[n].nbytes)
        raise ModelRefused("peak-too-large",
                           f"constants (folded at load) and inputs alone need ~{peak} bytes, "
                           f"more than {limits.max_peak_bytes}; the largest is "
                           f"{shaped[biggest].nbytes} bytes", tensor=biggest)
    kept = constant_names | set(shapes) | {vo.name for vo in ig.output}
    last_use: dict[str, int] = {}
    for index, node in enumerate(ig.node):
        for name in node.input:
            last_use[name] = index
    macs = 0
    for index, node in enumerate(ig.node):
        label = _node_label(node, index)
        node_macs, scratch = _estimate(node, label, shaped)
        if scratch > limits.max_workspace_bytes:
            raise ModelRefused("workspace-too-large",
                               f"{node.op_type} needs ~{scratch} bytes of scratch space, more "
                               f"than {limits.max_workspace_bytes}", node=label)
        macs += node_macs
        produced = [o for o in dict.fromkeys(node.output) if o and o not in constant_names]
        live += sum(shaped[o].nbytes for o in produced)
        if live + scratch > peak:
            peak = live + scratch
            if peak > limits.max_peak_bytes:
                raise ModelRefused("peak-too-large",
                                   f"~{peak} bytes live at this node, more than "
                                   f"{limits.max_peak_bytes}", node=label)
        for name in dict.fromkeys(list(node.input) + produced):
            if name and name in shaped and name not in kept and last_use.get(name, -1) <= index:
                live -= shaped[name].nbytes
    if macs > limits.max_macs:
        raise ModelRefused("compute-too-large",
                           f"~{macs} multiply-accumulates per run, more than {limits.max_macs}")
    return _RunEstimate(constant_bytes, total, peak, macs)


__all__ = [
    "validate_model", "check_runtime", "installed_ort_version", "ModelRefused",
    "ValidatedModel", "TensorSpec", "RULES", "LIMIT_RULES", "CONTROL_FLOW_OPS", "RANDOM_OPS",
    "STANDARD_DOMAINS",
]
