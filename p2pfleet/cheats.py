"""Deliberately wrong workers, for demos and tests of verification only.

A node started with a cheat computes something cheaper or different and reports it as the
real thing, the way a dishonest volunteer would. Verification (specs/verification.md) must
catch it: these exist so tests and `make demo` can show that it does. Never enable one on a
real network; the node logs a warning at start when one is set.
"""

from __future__ import annotations

import numpy as np

CHEATS = ("", "fp16")


def fp16_weights(model: bytes) -> bytes:
    """The model with every float32 initializer rounded to float16 and back: deterministic,
    so two colluders with this cheat produce identical (wrong) outputs."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_model_from_string(model)
    for init in proto.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        rounded = array.astype(np.float16).astype(np.float32)
        init.CopyFrom(numpy_helper.from_array(rounded, init.name))
    return proto.SerializeToString()
