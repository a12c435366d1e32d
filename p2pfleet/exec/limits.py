"""What a node lets an untrusted model be: `ModelLimits`, checked by `validate_model`.

Defaults suit a node with about 4 GiB for models; a node builds its own from its owner's
memory setting (`ModelLimits(max_peak_bytes=..., ...)`). Every limit is a hard refusal, not
a hint: a model over any of them is refused with a `ModelRefused` whose `over_limit` is
true (the model may be fine, this node is too small for it).

The caps on model size, nodes, node inputs and protobuf messages also protect the
validator itself, and are checked on the parsed protobuf before any onnx tool (checker,
shape inference) sees the model. onnx's data propagation (onnx 1.23, measured) holds every
element of every 1-D tensor a propagating op touches as a ~70-byte dim: 10^4 Adds over a
1-D tensor of 1000 floats took ~1 s and 0.4-0.7 GB, one Concat of 10^5 such inputs ran out
of memory (notes/onnx.md); `max_propagated_dims` bounds what the static pass can see of
that. Validation must still run inside the same memory and time limits as execution.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

RUNTIME_MB = 512
"""Address space a sandbox child needs before any model (python, numpy, onnx, onnxruntime,
thread stacks): measured ~310 MiB of VmPeak after start, ~60 MiB resident
(tools/bench_exec.py, "child"); the rest of the limit is left for the model."""

MIN_ORT_VERSION = "1.19"
"""The oldest onnxruntime release measured to agree with the others within the verification
tolerance (1.19.2 against 1.32: 3.0e-6; specs/verification.md, section 2). Not a security
floor: releases before 1.32 follow external-data paths out of the model (1.19 read
`../../etc/passwd` into an output and segfaulted on `_ORT_MEM_ADDR_`; notes/onnx.md), which
validation's `external-data` rule refuses before any runtime loads the model."""


@dataclass(frozen=True)
class ModelLimits:
    """Hard limits for one model run with the lease's concrete input shapes.

    Memory is counted in bytes by element type (strings at `string_element_bytes` each:
    their real length is only known at run time). "Tensor" means every initializer
    (sparse ones at their dense size, as onnxruntime densifies them), every graph input and
    every node output.
    """

    max_model_bytes: int = 256 * MiB
    """Size of the serialized model, checked before parsing."""
    max_nodes: int = 10_000
    """Nodes in all graphs together (main graph, subgraphs, functions, training info)."""
    max_node_inputs: int = 20_000
    """Node inputs (edges) in all graphs together; one Concat of 10^5 inputs made strict
    shape inference run out of memory (notes/onnx.md)."""
    max_messages: int = 250_000
    """Protobuf messages walked (nodes, attributes, tensors, dims, ...; not value_info):
    ~3 us each in Python."""
    max_propagated_dims: int = 1_000_000
    """Values of 1-D tensors onnx's data propagation may expand (~70 bytes each)."""
    max_graph_inputs: int = 64
    max_graph_outputs: int = 64
    max_rank: int = 16
    """Dimensions of a lease's input shape."""
    min_ir_version: int = 3
    max_ir_version: int = 14
    min_opset: int = 7
    """Oldest default-domain opset; onnxruntime only guarantees opset 7 and later."""
    max_opset: int = 28
    """Newest default-domain opset (onnx 1.23's registry; onnxruntime 1.32 loads it). A
    model newer than the installed onnx's registry is refused as well."""
    min_ml_opset: int = 1
    max_ml_opset: int = 5
    max_tensor_bytes: int = 1 * GiB
    """Any one tensor."""
    max_total_bytes: int = 16 * GiB
    """All tensors added up, as if nothing were ever freed: a crude upper bound of what
    the tensors of one run need (an honest deep model can be far above its peak)."""
    max_peak_bytes: int = 2 * GiB
    """Estimated peak: constants, inputs, and the node outputs alive at once in graph order
    (freed after their last use) plus the node's own scratch space (Conv's im2col buffer,
    Einsum's pairwise intermediates)."""
    max_workspace_bytes: int = 1 * GiB
    """Scratch space of any one node (see `max_peak_bytes`)."""
    max_macs: int = 10**12
    """Estimated multiply-accumulates of one run (Conv, ConvTranspose, MatMul, Gemm,
    Einsum, RNN/GRU/LSTM, Attention; one per element for everything else). ~10^12 is
    about a minute on a 2-core car."""
    string_element_bytes: int = 64
    """Assumed size of one string element when counting memory."""
    min_ort_version: str = MIN_ORT_VERSION

    @classmethod
    def for_memory(cls, memory_mb: int, **overrides) -> "ModelLimits":
        """Limits for a sandbox child with `memory_mb` MiB of address space (its RLIMIT_AS,
        from the node's hardware.memory_mb): what is left after the runtime (`RUNTIME_MB`)
        bounds the estimated peak, any one tensor and one node's scratch space (each also at
        most its default), the sum of all tensors at 8x that, and the model file at a
        quarter of it (the bytes are held several times while loading). `overrides` are
        other fields."""
        avail = max(64 * MiB, (int(memory_mb) - RUNTIME_MB) * MiB)
        d = cls()
        kw = dict(max_peak_bytes=min(d.max_peak_bytes, avail),
                  max_tensor_bytes=min(d.max_tensor_bytes, avail),
                  max_workspace_bytes=min(d.max_workspace_bytes, avail),
                  max_total_bytes=min(d.max_total_bytes, 8 * avail),
                  max_model_bytes=min(d.max_model_bytes, avail // 4))
        kw.update(overrides)
        return cls(**kw)

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if name == "min_ort_version":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelLimits.{name} must be a non-negative int, got {value!r}")


__all__ = ["ModelLimits", "MIN_ORT_VERSION", "RUNTIME_MB", "KiB", "MiB", "GiB"]
