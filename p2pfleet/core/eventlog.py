"""Event logs of the core machines: one JSON line per event a machine received.

A live node (or publisher) started with an event log writes every event its machines get,
in order; the simulator, or a test, reads the log back and feeds the same events to a fresh
machine, which must reach the same decisions. Events are frozen dataclasses; nested
dataclasses, tuples and bytes round-trip (bytes as {"hex": ...}).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterable, Mapping
from typing import Any


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def to_json(event: Any) -> str:
    """One line: {"type": <class name>, <fields>}."""
    return json.dumps({"type": type(event).__name__, **_plain(event)}, sort_keys=True)


def _typed(value: Any, hint: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"hex"}:
        return bytes.fromhex(value["hex"])
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _build(hint, value)
    if isinstance(value, list):
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        return tuple(_typed(v, inner) for v in value)
    return value


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            hint = hints.get(f.name, Any)
            for arg in typing.get_args(hint) or (hint,):  # Optional[X] and X | None
                if dataclasses.is_dataclass(arg):
                    hint = arg
            kwargs[f.name] = _typed(data[f.name], hint)
    return cls(**kwargs)


def from_json(line: str, types: Iterable[type]) -> Any:
    """The event of a line written by `to_json`; `types` are the event classes allowed."""
    by_name = {cls.__name__: cls for cls in types}
    data = json.loads(line)
    name = data.pop("type", None)
    if name not in by_name:
        raise ValueError(f"unknown event type {name!r} (known: {', '.join(sorted(by_name))})")
    return _build(by_name[name], data)


__all__ = ["to_json", "from_json"]
