"""Deliberately wrong workers, for demos and tests of verification only.

A node started with a cheat computes something cheaper or different and reports it as the
real thing, the way a dishonest volunteer would. Verification (specs/verification.md) must
catch it: these exist so tests and `make demo` can show that it does. Never enable one on a
real network; the node logs a warning at start when one is set.
"""

from __future__ import annotations

CHEATS = ("", "fp16", "strategic:N")


def check_cheat(cheat: str) -> str:
    """"" (honest), "fp16" (always rounds), or "strategic:N" (honest for N results, then fp16:
    the strategy that builds trust to be given single copies, then cheats under them)."""
    if cheat in ("", "fp16"):
        return cheat
    name, _, n = cheat.partition(":")
    if name == "strategic" and n.isdigit():
        return cheat
    raise ValueError(f"unknown cheat {cheat!r}: use fp16 or strategic:N")


def cheats_now(cheat: str, results_sent: int) -> bool:
    """Does a node with this cheat cheat on its next result?"""
    if cheat == "fp16":
        return True
    if cheat.startswith("strategic:"):
        return results_sent >= int(cheat.split(":", 1)[1])
    return False


def fp16_weights(model: bytes) -> bytes:
    """The model with every float32 constant rounded to float16 and back: deterministic, so
    two colluders with this cheat produce identical (wrong) outputs."""
    from ..zoo import fp16_weights as rounded

    return rounded(model)
