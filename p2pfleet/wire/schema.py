"""A small strict schema language for message bodies.

Each kind is a frozen dataclass whose fields carry a wire type in their metadata (see
`wire_field`). From that one declaration we get: strict decoding of a msgpack map (exactly
the declared keys, exact types, bounds), encoding back to plain msgpack values, and the
language-neutral JSON Schema in protocol/schemas/. Decoding errors name the dotted field
path and the reason, always as `InvalidBody`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import MISSING
from typing import Any

from .errors import InvalidBody

U8 = 2**8 - 1
U16 = 2**16 - 1
U32 = 2**32 - 1
U64 = 2**64 - 1


class WireType:
    """One field type: checks a decoded msgpack value, encodes a Python value."""

    def decode(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def encode(self, value: Any) -> Any:
        return value

    def json_schema(self) -> dict:
        raise NotImplementedError


def _fail(path: str, reason: str) -> InvalidBody:
    return InvalidBody(path, reason)


def _type_name(value: Any) -> str:
    return type(value).__name__


class UInt(WireType):
    def __init__(self, max: int = U64, min: int = 0):
        self.min, self.max = min, max

    def decode(self, value: Any, path: str) -> int:
        if type(value) is not int:
            raise _fail(path, f"expected an integer, got {_type_name(value)}")
        if not self.min <= value <= self.max:
            raise _fail(path, f"{value} outside [{self.min}, {self.max}]")
        return value

    def json_schema(self) -> dict:
        return {"type": "integer", "minimum": self.min, "maximum": self.max}


class Float(WireType):
    """A finite float. Integers are accepted (some encoders pack 5.0 as 5)."""

    def __init__(self, min: float = 0.0, max: float = 1e18):
        self.min, self.max = min, max

    def decode(self, value: Any, path: str) -> float:
        if type(value) is int:
            value = float(value) if abs(value) <= 2**53 else math.inf
        if type(value) is not float:
            raise _fail(path, f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise _fail(path, "number is not finite")
        if not self.min <= value <= self.max:
            raise _fail(path, f"{value} outside [{self.min}, {self.max}]")
        return value

    def encode(self, value: Any) -> float:
        return float(value)

    def json_schema(self) -> dict:
        return {"type": "number", "minimum": self.min, "maximum": self.max}


class Bool(WireType):
    def decode(self, value: Any, path: str) -> bool:
        if type(value) is not bool:
            raise _fail(path, f"expected a boolean, got {_type_name(value)}")
        return value

    def json_schema(self) -> dict:
        return {"type": "boolean"}


class Bytes(WireType):
    """msgpack bin. In JSON Schema: a string with "x-msgpack": "bin", lengths in bytes."""

    def __init__(self, max: int, min: int = 0):
        self.min, self.max = min, max

    def decode(self, value: Any, path: str) -> bytes:
        if type(value) is not bytes:
            raise _fail(path, f"expected bytes, got {_type_name(value)}")
        if not self.min <= len(value) <= self.max:
            if self.min == self.max:
                raise _fail(path, f"expected exactly {self.min} bytes, got {len(value)}")
            raise _fail(path, f"length {len(value)} outside [{self.min}, {self.max}]")
        return value

    def json_schema(self) -> dict:
        return {"type": "string", "x-msgpack": "bin", "minLength": self.min, "maxLength": self.max}


class Text(WireType):
    """msgpack str (UTF-8); `max` counts characters, `pattern` is a full-match regex."""

    def __init__(self, max: int, min: int = 0, pattern: str | None = None):
        self.min, self.max, self.pattern = min, max, pattern
        self._re = re.compile(pattern) if pattern else None

    def decode(self, value: Any, path: str) -> str:
        if type(value) is not str:
            raise _fail(path, f"expected a string, got {_type_name(value)}")
        if not self.min <= len(value) <= self.max:
            raise _fail(path, f"length {len(value)} outside [{self.min}, {self.max}]")
        if self._re is not None and not self._re.fullmatch(value):
            raise _fail(path, f"{value!r} does not match {self.pattern}")
        return value

    def json_schema(self) -> dict:
        out: dict = {"type": "string", "minLength": self.min, "maxLength": self.max}
        if self.pattern:
            out["pattern"] = f"^(?:{self.pattern})$"
        return out


class Enum(WireType):
    """One of a fixed set of strings."""

    def __init__(self, *values: str):
        self.values = tuple(values)

    def decode(self, value: Any, path: str) -> str:
        if type(value) is not str:
            raise _fail(path, f"expected a string, got {_type_name(value)}")
        if value not in self.values:
            raise _fail(path, f"{value!r} is not one of {', '.join(self.values)}")
        return value

    def json_schema(self) -> dict:
        return {"type": "string", "enum": list(self.values)}


class Optional(WireType):
    """The inner type, or nil. The key itself is always present."""

    def __init__(self, inner: WireType):
        self.inner = inner

    def decode(self, value: Any, path: str) -> Any:
        return None if value is None else self.inner.decode(value, path)

    def encode(self, value: Any) -> Any:
        return None if value is None else self.inner.encode(value)

    def json_schema(self) -> dict:
        return {"anyOf": [{"type": "null"}, self.inner.json_schema()]}


class ListOf(WireType):
    def __init__(self, item: WireType, max: int, min: int = 0):
        self.item, self.min, self.max = item, min, max

    def decode(self, value: Any, path: str) -> tuple:
        if type(value) is not list:
            raise _fail(path, f"expected an array, got {_type_name(value)}")
        if not self.min <= len(value) <= self.max:
            raise _fail(path, f"{len(value)} items outside [{self.min}, {self.max}]")
        return tuple(self.item.decode(v, f"{path}[{i}]") for i, v in enumerate(value))

    def encode(self, value: Any) -> list:
        return [self.item.encode(v) for v in value]

    def json_schema(self) -> dict:
        return {"type": "array", "items": self.item.json_schema(), "minItems": self.min,
                "maxItems": self.max}


class Struct(WireType):
    """A nested map described by another wire dataclass."""

    def __init__(self, cls: type):
        self.cls = cls

    def decode(self, value: Any, path: str) -> Any:
        return decode_struct(self.cls, value, path)

    def encode(self, value: Any) -> dict:
        return encode_struct(value)

    def json_schema(self) -> dict:
        return struct_json_schema(self.cls)


def wire_field(wtype: WireType, doc: str, default: Any = MISSING) -> Any:
    """Declare a dataclass field with its wire type and a one-line meaning."""
    meta = {"wire": wtype, "doc": doc}
    if default is MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _fields(cls: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


def decode_struct(cls: type, value: Any, path: str = "body") -> Any:
    if type(value) is not dict:
        raise _fail(path, f"expected a map, got {_type_name(value)}")
    fields = _fields(cls)
    names = {f.name for f in fields}
    for key in value:
        if type(key) is not str:
            raise _fail(path, f"map key {key!r} is not a string")
        if key not in names:  # the sender's text: shown quoted and cut short
            raise _fail(f"{path}.{key[:40]!r}" if not key.isidentifier() or len(key) > 40
                        else f"{path}.{key}", "unknown field")
    kwargs = {}
    for f in fields:
        sub = f"{path}.{f.name}"
        if f.name not in value:
            raise _fail(sub, "missing field")
        kwargs[f.name] = f.metadata["wire"].decode(value[f.name], sub)
    return cls(**kwargs)


def encode_struct(obj: Any) -> dict:
    return {f.name: f.metadata["wire"].encode(getattr(obj, f.name)) for f in _fields(type(obj))}


def struct_json_schema(cls: type) -> dict:
    props = {}
    for f in _fields(cls):
        schema = dict(f.metadata["wire"].json_schema())
        schema["description"] = f.metadata["doc"]
        props[f.name] = schema
    return {
        "type": "object",
        "description": (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
        "properties": props,
        "required": [f.name for f in _fields(cls)],
        "additionalProperties": False,
    }
