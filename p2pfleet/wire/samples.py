"""Example bodies for every wire kind: deterministic samples and random valid bodies.

For tests, fuzzers, benchmarks and test vectors. Everything here is derived generically
from the wire types in the kinds' dataclass field metadata (`p2pfleet.wire.schema`), so a
new kind or field needs no change here:

- `sample_body(kind)`: one valid, deterministic body per kind (a few field values are made
  realistic by name, e.g. `exp`, `seq`, `addrs`; evidence proofs and key rotation
  countersignatures are real signatures by deterministic test keys).
- `large_body(kind)`: a deterministic valid body grown towards the kind's `max_body`.
- `random_body(kind, rng)`: a random valid body from a `random.Random` (fast, reproducible
  for a seed; boundary values are favoured), always within the kind's `max_body`.
- `body_strategy(kind)`: a Hypothesis strategy for valid bodies of a kind (Hypothesis is
  imported lazily: this module does not need it at runtime).

Nothing here is used by a running node.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import random
import re
from typing import Any

from ..identity import Identity
from .envelope import encode_body, seal
from .kinds import KINDS, KindSpec
from .schema import Bool, Bytes, Enum, Float, ListOf, Optional, Struct, Text, UInt, WireType

SAMPLE_NETWORK = "testnet"
SAMPLE_NOW_MS = 1_700_000_000_000  # 2023-11-14T22:13:20Z: the time every sample is "issued"

# Characters tried when building strings for a `Text` (with or without a pattern): ASCII,
# multi-byte UTF-8 of every length, controls. No surrogates (they are not valid UTF-8).
_CHAR_POOL = (
    "".join(chr(c) for c in range(0x20, 0x7F))
    + "\x00\t\n\x7f\u00e9\u00df\u0394\u0416\u05d0\u4e2d\u20ac\u2028\ufeff\U0001F600\U0010FFFF"
)


def sample_identity(name: str = "sample") -> Identity:
    """A deterministic test identity (never use such keys outside tests)."""
    return Identity.from_seed(b"p2pfleet-sample:" + name.encode())


def spec_of(kind: str | type | KindSpec) -> KindSpec:
    if isinstance(kind, KindSpec):
        return kind
    if isinstance(kind, str):
        return KINDS[kind]
    for spec in KINDS.values():
        if spec.cls is kind:
            return spec
    raise KeyError(f"{kind!r} is not a registered wire kind")


def wire_fields(cls: type) -> tuple[tuple[str, WireType], ...]:
    return tuple((f.name, f.metadata["wire"]) for f in dataclasses.fields(cls))


def _det_bytes(n: int, *label: object) -> bytes:
    return hashlib.shake_256("/".join(map(str, label)).encode()).digest(n) if n else b""


@functools.lru_cache(maxsize=None)
def pattern_alphabet(pattern: str) -> str:
    """The characters of the pool that match `pattern` on their own (its character class)."""
    rx = re.compile(pattern)
    return "".join(c for c in _CHAR_POOL if rx.fullmatch(c))


def _text_of_length(t: Text, n: int, label: str = "") -> str:
    """A deterministic valid string of n characters for `t` (n within its bounds)."""
    if t.pattern is None:
        base = (label or "sample") + " "
        return (base * (n // len(base) + 1))[:n]
    alphabet = pattern_alphabet(t.pattern)
    if not alphabet:
        raise NotImplementedError(f"cannot build a string for pattern {t.pattern!r}")
    start = sum(label.encode()) % len(alphabet)
    value = "".join(alphabet[(start + i) % len(alphabet)] for i in range(n))
    if t._re is not None and not t._re.fullmatch(value):
        raise NotImplementedError(f"cannot build a string for pattern {t.pattern!r}")
    return value


# --------------------------------------------------------------------------------------
# Deterministic samples

# Realistic values for some fields, by name (each must still be valid for its wire type:
# tests check every sample against its schema).
_NAMED: dict[str, Any] = {
    "sw_version": "0.1.0",
    "min_sw_version": "0.1.0",
    "providers": ("CPUExecutionProvider",),
    "provider": "CPUExecutionProvider",
    "addrs": ("/ip4/203.0.113.7/udp/4001/quic-v1",),
    "input_sources": ("/ip4/198.51.100.20/tcp/4001",),
    "ort_versions": ">=1.19,<2",
    "detail": "onnxruntime raised: out of memory",
    "note": "two conflicting results for one shard",
    "reason": "sample",
    "cores": 4,
    "memory_mb": 4096,
    "bench": 125.5,
    "slots": 2,
    "free_slots": 2,
    "quorum": 2,
    "deadline_ms": 600_000,
    "micro_batch": 8,
    "samples": 64,
    "total": 8,
    "done": 3,
    "retry_after_ms": 30_000,
    "length": 65_536,
}


def _sample_value(w: WireType, name: str, spec: KindSpec, now_ms: int, label: str) -> Any:
    if name in _NAMED:
        value = _NAMED[name]
        try:
            if w.decode(w.encode(value), name) == value:
                return value
        except Exception:  # noqa: BLE001 - a named default that does not fit this type
            pass
    if isinstance(w, Optional):
        return _sample_value(w.inner, name, spec, now_ms, label)
    if isinstance(w, UInt):
        if name == "exp" and spec.max_lifetime_ms is not None:
            value = now_ms + spec.max_lifetime_ms // 2
        elif name in ("seq", "at"):
            value = now_ms
        else:
            value = 1000
        return min(max(value, w.min), w.max)
    if isinstance(w, Float):
        return min(max(1.5, w.min), w.max)
    if isinstance(w, Bool):
        return True
    if isinstance(w, Bytes):
        n = min(max(w.min, 32), w.max)
        return _det_bytes(n, label)
    if isinstance(w, Text):
        n = min(max(w.min, 6), w.max)
        return _text_of_length(w, n, name)
    if isinstance(w, Enum):
        return w.values[0]
    if isinstance(w, ListOf):
        n = min(max(w.min, 1), w.max)
        return tuple(_sample_value(w.item, name, spec, now_ms, f"{label}[{i}]") for i in range(n))
    if isinstance(w, Struct):
        return _sample_struct(w.cls, spec, now_ms, label)
    raise NotImplementedError(f"no sample for wire type {type(w).__name__}")


def _sample_struct(cls: type, spec: KindSpec, now_ms: int, label: str) -> Any:
    kwargs = {name: _sample_value(w, name, spec, now_ms, f"{label}.{name}")
              for name, w in wire_fields(cls)}
    return cls(**kwargs)


def sample_body(kind: str | type | KindSpec, now_ms: int = SAMPLE_NOW_MS,
                network: str = SAMPLE_NETWORK) -> Any:
    """One valid body of `kind`, the same every time for the same arguments."""
    spec = spec_of(kind)
    body = _sample_struct(spec.cls, spec, now_ms, spec.name)
    if spec.name == "evidence":
        # The proof is a real envelope signed by the accused.
        accused = sample_identity("accused")
        proof = seal(sample_body("result", now_ms, network), accused, network)
        body = dataclasses.replace(body, accused=accused.public_key, proofs=(proof,))
    elif spec.name == "key_rotation":
        from .rotation import acceptance_bytes  # rotation imports envelope, not samples

        old, new = sample_identity(), sample_identity("successor")
        sig = new.sign(acceptance_bytes(network, old.public_key, new.public_key, body.at))
        body = dataclasses.replace(body, new_key=new.public_key, new_key_sig=sig)
    return body


def sample_envelope(kind: str | type | KindSpec, identity: Identity | None = None,
                    network: str = SAMPLE_NETWORK, now_ms: int = SAMPLE_NOW_MS) -> bytes:
    """`sample_body(kind)` sealed by `identity` (default: `sample_identity()`)."""
    return seal(sample_body(kind, now_ms, network), identity or sample_identity(), network)


def fits(spec: KindSpec, body: Any) -> bool:
    return len(encode_body(body)) <= spec.max_body


# --------------------------------------------------------------------------------------
# Filling variable-size fields towards the kind's body cap

def _filled(w: WireType, f: float, label: str, spec: KindSpec, now_ms: int, name: str) -> Any:
    """A value of `w` whose variable lengths are a fraction f of their range."""
    if isinstance(w, Optional):
        return _filled(w.inner, f, label, spec, now_ms, name)
    if isinstance(w, Bytes):
        return _det_bytes(w.min + math.floor((w.max - w.min) * f), label)
    if isinstance(w, Text):
        return _text_of_length(w, w.min + math.floor((w.max - w.min) * f), label)
    if isinstance(w, ListOf):
        n = w.min + math.floor((w.max - w.min) * f)
        n = max(n, min(w.max, 1)) if f > 0 else n
        return tuple(_filled(w.item, f, f"{label}[{i}]", spec, now_ms, name) for i in range(n))
    if isinstance(w, Struct):
        return w.cls(**{n: _filled(fw, f, f"{label}.{n}", spec, now_ms, n)
                        for n, fw in wire_fields(w.cls)})
    return _sample_value(w, name, spec, now_ms, label)


def large_body(kind: str | type | KindSpec, now_ms: int = SAMPLE_NOW_MS,
               network: str = SAMPLE_NETWORK) -> Any:
    """A deterministic valid body grown towards the kind's `max_body`.

    Field by field, in declaration order, each bytes/string/list field is filled as far as
    the remaining budget allows (binary search on the fill fraction). Semantic links
    (evidence proofs, rotation countersignatures) are not kept: use `sample_body` for those.
    """
    spec = spec_of(kind)
    body = sample_body(spec, now_ms, network)
    for name, w in wire_fields(spec.cls):
        inner = w.inner if isinstance(w, Optional) else w
        if not isinstance(inner, (Bytes, Text, ListOf, Struct)):
            continue
        lo, hi = 0.0, 1.0
        best = None
        top = dataclasses.replace(body, **{name: _filled(w, 1.0, f"{spec.name}.{name}", spec, now_ms, name)})
        if fits(spec, top):
            body = top
            continue
        for _ in range(24):
            mid = (lo + hi) / 2
            cand = dataclasses.replace(body, **{name: _filled(w, mid, f"{spec.name}.{name}", spec, now_ms, name)})
            if fits(spec, cand):
                lo, best = mid, cand
            else:
                hi = mid
        if best is not None:
            body = best
    return body


# --------------------------------------------------------------------------------------
# Worst-case encoded sizes, to bound random bodies so they always fit `max_body`

def _scaled(lo: int, hi: int, scale: float) -> int:
    return lo + math.floor((hi - lo) * scale)


def max_encoded_size(w: WireType, scale: float = 1.0) -> int:
    """An upper bound of the msgpack size of any value `strategy_for(w, scale)` draws."""
    if isinstance(w, Optional):
        return max(1, max_encoded_size(w.inner, scale))
    if isinstance(w, (UInt, Float)):
        return 9
    if isinstance(w, Bool):
        return 1
    if isinstance(w, Bytes):
        n = _scaled(w.min, w.max, scale)
        return 5 + n
    if isinstance(w, Text):
        n = _scaled(w.min, w.max, scale)
        return 5 + 4 * n
    if isinstance(w, Enum):
        return 5 + max(len(v.encode()) for v in w.values)
    if isinstance(w, ListOf):
        n = _scaled(w.min, w.max, scale)
        return 5 + n * max_encoded_size(w.item, scale)
    if isinstance(w, Struct):
        return struct_max_size(w.cls, scale)
    raise NotImplementedError(type(w).__name__)


def struct_max_size(cls: type, scale: float = 1.0) -> int:
    return 5 + sum(5 + len(name) + max_encoded_size(w, scale) for name, w in wire_fields(cls))


@functools.lru_cache(maxsize=None)
def fitting_scale(kind: str) -> float:
    """The largest scale (<= 1) at which every drawn body of `kind` fits its `max_body`."""
    spec = KINDS[kind]
    if struct_max_size(spec.cls, 1.0) <= spec.max_body:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if struct_max_size(spec.cls, mid) <= spec.max_body:
            lo = mid
        else:
            hi = mid
    if struct_max_size(spec.cls, lo) > spec.max_body:
        raise ValueError(f"{kind}: even its smallest body may not fit max_body")
    return lo


# --------------------------------------------------------------------------------------
# Random valid bodies from a random.Random (the fuzzer's generator)

def _pick_len(rng: random.Random, lo: int, hi: int) -> int:
    r = rng.random()
    if r < 0.15:
        return lo
    if r < 0.25:
        return hi
    if r < 0.7:
        return rng.randint(lo, min(hi, lo + 4))
    return rng.randint(lo, hi)


_INT_EDGES = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**32 - 1,
              2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1)


def random_value(w: WireType, rng: random.Random, scale: float = 1.0, name: str = "",
                 now_ms: int = SAMPLE_NOW_MS) -> Any:
    """A random value valid for `w` (lengths bounded by `scale`, as in `max_encoded_size`)."""
    if isinstance(w, Optional):
        return None if rng.random() < 0.3 else random_value(w.inner, rng, scale, name, now_ms)
    if isinstance(w, UInt):
        r = rng.random()
        if name in ("exp", "seq", "at") and r < 0.6:
            value = now_ms + rng.randint(-60_000, 3_600_000)
        elif r < 0.3:
            value = rng.choice((w.min, w.max, w.min + 1, w.max - 1))
        elif r < 0.5:
            value = rng.choice(_INT_EDGES)
        elif r < 0.8:
            value = w.min + rng.randint(0, 1000)
        else:
            value = rng.randint(w.min, w.max)
        return min(max(value, w.min), w.max)
    if isinstance(w, Float):
        r = rng.random()
        if r < 0.2:
            value = rng.choice((w.min, w.max, 0.0, 1.0, 5e-324, 2.0**53))
        elif r < 0.6:
            value = rng.uniform(w.min, min(w.max, 1e4))
        else:
            value = rng.uniform(w.min, w.max)
        return min(max(float(value), w.min), w.max)
    if isinstance(w, Bool):
        return rng.random() < 0.5
    if isinstance(w, Bytes):
        n = _pick_len(rng, w.min, _scaled(w.min, w.max, scale))
        return rng.randbytes(n)
    if isinstance(w, Text):
        hi = _scaled(w.min, w.max, scale)
        alphabet = pattern_alphabet(w.pattern) if w.pattern else _CHAR_POOL
        for _ in range(20):
            n = _pick_len(rng, w.min, hi)
            value = "".join(rng.choice(alphabet) for _ in range(n))
            if w._re is None or w._re.fullmatch(value):
                return value
        return _text_of_length(w, max(w.min, min(hi, 6)), name)
    if isinstance(w, Enum):
        return rng.choice(w.values)
    if isinstance(w, ListOf):
        n = _pick_len(rng, w.min, _scaled(w.min, w.max, scale))
        return tuple(random_value(w.item, rng, scale, name, now_ms) for _ in range(n))
    if isinstance(w, Struct):
        return random_struct(w.cls, rng, scale, now_ms)
    raise NotImplementedError(type(w).__name__)


def random_struct(cls: type, rng: random.Random, scale: float = 1.0,
                  now_ms: int = SAMPLE_NOW_MS) -> Any:
    return cls(**{name: random_value(w, rng, scale, name, now_ms) for name, w in wire_fields(cls)})


def random_body(kind: str | type | KindSpec, rng: random.Random,
                now_ms: int = SAMPLE_NOW_MS) -> Any:
    """A random valid body of `kind` that fits its `max_body`.

    Usually drawn at the kind's fitting scale (always fits); sometimes at full type bounds,
    kept when it happens to fit, so large values are reached too.
    """
    spec = spec_of(kind)
    if rng.random() < 0.2:
        body = random_struct(spec.cls, rng, 1.0, now_ms)
        if fits(spec, body):
            return body
    return random_struct(spec.cls, rng, fitting_scale(spec.name), now_ms)


# --------------------------------------------------------------------------------------
# Hypothesis strategies

def strategy_for(w: WireType, scale: float = 1.0, *, max_bytes: int | None = None):
    """A Hypothesis strategy for valid values of `w`.

    Lengths are bounded by `scale` like `max_encoded_size`; `max_bytes` further caps
    bytes fields (drawing 256 KiB blobs makes tests slow without finding more).
    """
    from hypothesis import strategies as st

    def cap(lo: int, hi: int) -> int:
        n = _scaled(lo, hi, scale)
        return n if max_bytes is None else max(lo, min(n, max_bytes))

    if isinstance(w, Optional):
        return st.none() | strategy_for(w.inner, scale, max_bytes=max_bytes)
    if isinstance(w, UInt):
        return st.integers(min_value=w.min, max_value=w.max)
    if isinstance(w, Float):
        return st.floats(min_value=w.min, max_value=w.max, allow_nan=False,
                         allow_infinity=False)
    if isinstance(w, Bool):
        return st.booleans()
    if isinstance(w, Bytes):
        return st.binary(min_size=w.min, max_size=cap(w.min, w.max))
    if isinstance(w, Text):
        hi = _scaled(w.min, w.max, scale)
        if w.pattern is None:
            return st.text(alphabet=st.characters(codec="utf-8"), min_size=w.min, max_size=hi)
        return st.from_regex(w.pattern, fullmatch=True).filter(
            lambda s, lo=w.min, hi=hi: lo <= len(s) <= hi)
    if isinstance(w, Enum):
        return st.sampled_from(w.values)
    if isinstance(w, ListOf):
        return st.lists(strategy_for(w.item, scale, max_bytes=max_bytes), min_size=w.min,
                        max_size=_scaled(w.min, w.max, scale)).map(tuple)
    if isinstance(w, Struct):
        return struct_strategy(w.cls, scale, max_bytes=max_bytes)
    raise NotImplementedError(type(w).__name__)


def struct_strategy(cls: type, scale: float = 1.0, *, max_bytes: int | None = None):
    from hypothesis import strategies as st

    return st.builds(cls, **{name: strategy_for(w, scale, max_bytes=max_bytes)
                             for name, w in wire_fields(cls)})


def body_strategy(kind: str | type | KindSpec, *, max_bytes: int | None = 4096):
    """Random valid bodies of `kind`, always within its `max_body`."""
    spec = spec_of(kind)
    return struct_strategy(spec.cls, fitting_scale(spec.name), max_bytes=max_bytes)


__all__ = [
    "SAMPLE_NETWORK", "SAMPLE_NOW_MS", "sample_identity", "sample_body", "sample_envelope",
    "large_body", "random_body", "random_value", "random_struct", "body_strategy",
    "strategy_for", "struct_strategy", "fitting_scale", "max_encoded_size", "fits",
    "wire_fields", "spec_of", "pattern_alphabet",
]
