"""Running strangers' ONNX models: validation (validate.py, limits.py), the sandbox
(sandbox.py, child.py: one child per publisher; validation runs there too), the runner
(runner.py), canonical outputs (outputs.py), hardware class and benchmark (hwclass.py).

`validate_model(model_bytes, input_shapes, limits)` checks an untrusted model (as bytes,
never a path) against one lease's concrete input shapes and this node's `ModelLimits`, and
returns a `ValidatedModel` or raises `ModelRefused(rule, reason, node=, tensor=)`.
"""

from .limits import MIN_ORT_VERSION, ModelLimits
from .validate import (
    LIMIT_RULES,
    RULES,
    ModelRefused,
    TensorSpec,
    ValidatedModel,
    check_runtime,
    validate_model,
)

__all__ = [
    "validate_model", "check_runtime", "ModelLimits", "ModelRefused", "ValidatedModel",
    "TensorSpec", "RULES", "LIMIT_RULES", "MIN_ORT_VERSION",
]
