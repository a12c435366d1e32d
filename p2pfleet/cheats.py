"""Deliberately wrong workers, for demos and tests of verification only.

A node started with a cheat computes something cheaper or different and reports it as the
real thing, the way a dishonest volunteer would. Verification (specs/verification.md) must
catch it: these exist so tests and `make demo` can show that it does. Never enable one on a
real network; the node logs a warning at start when one is set.
"""

from __future__ import annotations

CHEATS = ("", "fp16")


def fp16_weights(model: bytes) -> bytes:
    """The model with every float32 constant rounded to float16 and back: deterministic, so
    two colluders with this cheat produce identical (wrong) outputs."""
    from .zoo import fp16_weights as rounded

    return rounded(model)
