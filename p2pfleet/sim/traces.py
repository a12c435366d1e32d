"""Reading the vehicle traces the simulator's population is built from (the one file-reading
module of the simulator; everything after it is pure)."""

from __future__ import annotations

from pathlib import Path

from .population import Trace, TraceError, parse_trace

# The traces shipped with the node (package data of p2pfleet.vehicle), found by path so the
# simulator imports nothing of the live driver.
SHIPPED = Path(__file__).resolve().parents[1] / "vehicle" / "traces"


def load_traces(directory: Path = SHIPPED) -> dict[str, Trace]:
    """Every *.jsonl trace in `directory`, by file stem."""
    files = sorted(Path(directory).glob("*.jsonl"))
    if not files:
        raise TraceError(f"no *.jsonl vehicle traces in {directory}")
    return {f.stem: parse_trace(f.name, f.read_text(encoding="utf-8").splitlines())
            for f in files}
