"""Vehicle state providers: is the car parked, plugged in, charged, cool, on an unmetered
network, and when does it leave? The policy (`p2pfleet.core.policy`) decides what to do.
"""

from .providers import (
    BUILTIN_TRACES,
    StaticProvider,
    Trace,
    TraceProvider,
    VehicleProvider,
    VehicleTraceError,
    builtin_trace,
    builtin_trace_path,
    load_trace,
    parse_trace,
)
from .state import VehicleState, VehicleStateError, state_from_mapping

__all__ = [
    "VehicleState", "VehicleStateError", "state_from_mapping", "VehicleProvider",
    "StaticProvider", "TraceProvider", "Trace", "VehicleTraceError", "parse_trace",
    "load_trace", "builtin_trace", "builtin_trace_path", "BUILTIN_TRACES",
]
