"""Event logs of the core machines: one JSON line per event a machine received.

A live node (or publisher) started with an event log writes every event its machines get,
in order; the simulator (p2pfleet/sim/replay.py), or a test, reads the log back and feeds
the same events to a fresh machine, which must reach the same decisions. Events are frozen
dataclasses; nested dataclasses, tuples, sets and bytes round-trip (bytes as {"hex": ...},
sets as sorted lists).

Format version 2 (specs/event-log.md): every start of a machine writes a `header` line
(format, version, which machine, its settings, the state of its rng and the records it was
restored from), then one `record` line per event: the event's fields, "type", and the
decisions the machine took for it ("effects"; "refused" when it refused the event). Lines of
version 1 (events only, no header) hold no decisions to compare and are refused by replay.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Iterable, Mapping
from typing import Any

FORMAT = "p2pfleet-event-log"
VERSION = 2


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # fields the class derives itself (init=False) are not part of what it was given
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.init}
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_plain(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def plain(value: Any) -> Any:
    """`value` as JSON-ready data: what a log line holds of it."""
    return _plain(value)


def typed_plain(obj: Any) -> dict:
    """An event or effect as JSON-ready data: {"type": <class name>, <fields>}."""
    return {"type": type(obj).__name__, **_plain(obj)}


def to_json(event: Any) -> str:
    """One line: {"type": <class name>, <fields>}."""
    return json.dumps(typed_plain(event), sort_keys=True)


def header(machine: str, settings: Any, *, rng: Mapping[str, Any] | None = None,
           restored: Mapping[str, Any] | None = None) -> str:
    """The first line of a machine's log (and of every restart): what a replay needs to
    build the same machine. `rng`: {"key": hex, "counter": n} of a KeyedRandom; `restored`:
    the records the machine was rebuilt from (`plain` of each), None when it started empty."""
    return json.dumps({"format": FORMAT, "version": VERSION, "machine": machine,
                       "settings": _plain(settings), "rng": rng, "restored": restored},
                      sort_keys=True)


def record(event: Any, effects: Iterable[Any] = (), refused: str | None = None) -> str:
    """One event and the decisions taken for it (or why the machine refused it)."""
    line = typed_plain(event)
    line["effects"] = [typed_plain(e) for e in effects]
    if refused is not None:
        line["refused"] = refused
    return json.dumps(line, sort_keys=True)


def _typed(value: Any, hint: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"hex"}:
        return bytes.fromhex(value["hex"])
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _build(hint, value)
    if isinstance(value, list):
        args = typing.get_args(hint)
        inner = args[0] if args else Any
        items = tuple(_typed(v, inner) for v in value)
        return frozenset(items) if typing.get_origin(hint) in (set, frozenset) else items
    return value


def build(cls: type, data: Mapping[str, Any]) -> Any:
    """An instance of dataclass `cls` from its `plain` form (fields it lacks: defaults)."""
    return _build(cls, data)


def _build(cls: type, data: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.init and f.name in data:
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


__all__ = ["FORMAT", "VERSION", "plain", "typed_plain", "to_json", "from_json", "header",
           "record", "build"]
