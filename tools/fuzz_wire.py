#!/usr/bin/env python3
"""Fuzz the wire decoders: every input must be accepted or refused with a WireError.

Three modes, each with its own deterministic random stream for a given --seed:

  envelope  random bytes, and mutations of valid envelopes of every kind: bit flips, byte
            sets, truncation, extension, splices, inserted msgpack type bytes, huge or wrong
            length prefixes, re-packed envelopes with one field of the wrong type or value,
            re-labelled kind/network/version, deep nesting, non-bytes inputs, oversize.
  body      structure-aware mutations of valid bodies of every kind (drop/add/rename keys,
            swapped value types, extreme ints and floats, lengths just past the bounds and
            huge, deep nesting, non-UTF-8 strings, ext types, non-canonical encodings, random
            msgpack values, byte-level damage), RE-SIGNED with a test key so the msgpack
            limits and the strict schema decoders are reached (sometimes under another kind).
  rotation  key rotation statements with mutated countersignatures, keys and times, sealed
            by the old key, opened and checked with check_rotation.

Every input goes through open_envelope (always with now_ms; a share also with a NodeState
dedup store in a temporary SQLite file). It must return or raise a
p2pfleet.wire.errors.WireError. Anything else is a failure: its hex and traceback are
printed and the exit status is 1. A success is also checked: an envelope-mode success must
be a message somebody really signed; a decoded body must re-encode to an equal body and lie
within its lifetime; a rotation that passes check_rotation must carry the successor's real
countersignature. With the dedup store, repeats follow the kind's replay rule
(protocol/names.json `replay_check`): a kind deduplicated by message id (it expires and is
not a record) is accepted once and then refused as `replay`, and a `replay` refusal must be
of such a kind, accepted before; records (ordered by sequence number) and kinds that never
expire open again every time. An input slower than 1 s is a failure (hang); a watchdog aborts the run if
one input takes longer than --watchdog seconds. (A slow input is timed again before it
counts, so a stall of a busy machine is not reported as a hang.)

    tools/fuzz_wire.py --inputs 100000 --seed 1 --coverage --json out/fuzz.json
    tools/fuzz_wire.py --replay body:1234 --seed 1     # print one input's hex again
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import platform
import random
import re
import struct
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# p2pfleet is imported lazily (see _Wire) so --coverage sees the wire modules load.

MODES = ("envelope", "body", "rotation")
NET = "fuzznet"
OTHER_NET = "othernet"
NOW_MS = 1_700_000_000_000
HANG_S = 1.0
DEDUP_SHARE = 0.2
MAX_FAILURE_DETAILS = 50
MAX_HEX_IN_JSON = 8192  # bytes of input kept in the JSON per failure (stderr gets all)


class _Wire:
    """The modules under test, imported on first use."""

    _loaded = False

    @classmethod
    def load(cls) -> type["_Wire"]:
        if not cls._loaded:
            import msgpack

            from p2pfleet.identity import Identity, verify_signature
            from p2pfleet.store.state import NodeState
            from p2pfleet.wire import envelope, errors, kinds, rotation, samples, schema

            cls.msgpack, cls.Identity, cls.verify_signature = msgpack, Identity, verify_signature
            cls.NodeState = NodeState
            cls.envelope, cls.errors, cls.kinds = envelope, errors, kinds
            cls.rotation, cls.samples, cls.schema = rotation, samples, schema
            cls._loaded = True
        return cls


class InvariantBroken(AssertionError):
    """A decoder accepted something it must not have."""


@dataclass
class Case:
    data: Any
    network: str = NET
    now_ms: int = NOW_MS
    dedup: bool = False
    kinds: set | None = None
    post: Callable[[Any], None] | None = None  # called with the Opened on success
    valid: bool = False  # generated unmodified (expected to be accepted)


# ------------------------------------------------------------------------------------------
# msgpack building blocks

class Raw:
    """Raw msgpack bytes to splice into a value tree in place of one value (or key)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


def pack_tree(value: Any, rng: random.Random) -> bytes:
    """msgpack-encode a tree that may hold Raw pieces (keys or values)."""
    W = _Wire.load()
    raws: dict[bytes, bytes] = {}

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            marker = rng.randbytes(16)
            raws[marker] = v.data
            return marker
        if isinstance(v, dict):
            return {swap(k): swap(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [swap(x) for x in v]
        return v

    packed = W.msgpack.packb(swap(value), use_bin_type=True)
    for marker, data in raws.items():
        packed = packed.replace(b"\xc4\x10" + marker, data, 1)
    return packed


def str_header(n: int) -> bytes:
    if n < 32:
        return bytes([0xA0 | n])
    if n < 256:
        return b"\xd9" + bytes([n])
    if n < 65536:
        return b"\xda" + n.to_bytes(2, "big")
    return b"\xdb" + n.to_bytes(4, "big")


INT_EDGES = (0, 1, -1, 0x7F, 0x80, -32, -33, 0xFF, 0x100, -128, -129, 0xFFFF, 0x10000,
             2**31 - 1, 2**31, -(2**31), 2**32 - 1, 2**32, 2**53, 2**53 + 1, 2**63 - 1, 2**63,
             -(2**63), 2**64 - 1)
FLOAT_EDGES = (0.0, -0.0, 1.5, -1.5, math.nan, math.inf, -math.inf, 5e-324, 1e18, 1e18 * 1.0000001,
               1.7976931348623157e308, -1e-300, 2.0**53)
NON_UTF8 = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\x28",
            b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"abc\x80", b"\xf4\x90\x80\x80")
MSGPACK_TYPE_BYTES = (bytes([b]) for b in range(0xC0, 0x100))
MSGPACK_TYPE_BYTES = tuple(MSGPACK_TYPE_BYTES) + (b"\x90", b"\x9f", b"\x80", b"\x8f", b"\xa0",
                                                  b"\xbf", b"\x00", b"\x7f")
HUGE_HEADERS = (b"\xc6\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                b"\xdf\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01", b"\xc5\xff\xff",
                b"\xda\xff\xff", b"\xdc\xff\xff", b"\xde\xff\xff", b"\xd9\xff", b"\xc4\xff",
                b"\xc6\x00\x10\x00\x01", b"\xdd\x00\x01\x00\x00", b"\xdf\x7f\xff\xff\xff")


def random_text(rng: random.Random, n: int) -> str:
    pool = "aZ09 ._-+/\u00e9\u4e2d\U0001F600\x00\n"
    return "".join(rng.choice(pool) for _ in range(n))


def random_msgpack(rng: random.Random, depth: int = 0) -> Any:
    """Any msgpack value (sometimes with Raw pieces msgpack itself would not produce)."""
    r = rng.random()
    if depth > 3:
        r *= 0.6
    if r < 0.08:
        return None
    if r < 0.14:
        return rng.random() < 0.5
    if r < 0.3:
        return rng.choice(INT_EDGES) if rng.random() < 0.5 else rng.randint(-(2**63), 2**64 - 1)
    if r < 0.38:
        return rng.choice(FLOAT_EDGES) if rng.random() < 0.5 else rng.uniform(-1e20, 1e20)
    if r < 0.48:
        return random_text(rng, rng.choice((0, 1, 5, 31, 32, 256, 257)))
    if r < 0.58:
        return rng.randbytes(rng.choice((0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65)))
    if r < 0.62:
        return Raw(random_raw(rng))
    if r < 0.8:
        return [random_msgpack(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    out: dict = {}
    for _ in range(rng.randint(0, 4)):
        k = rng.choice((random_text(rng, rng.randint(0, 8)), rng.randbytes(3), rng.randint(-5, 5),
                        "exp", "seq", "job_id"))
        out[k] = random_msgpack(rng, depth + 1)
    return out


def random_raw(rng: random.Random) -> bytes:
    """A value encoding msgpack would not produce for us: odd, non-canonical or broken."""
    r = rng.randrange(14)
    if r == 0:  # non-UTF-8 str
        bad = rng.choice(NON_UTF8)
        return str_header(len(bad)) + bad
    if r == 1:  # ext types (including the timestamp ext)
        return rng.choice((b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x01", b"\xc7\x00\x05",
                           b"\xd5\x7f\x00\x00", b"\xc8\x00\x01\x02\x00"))
        # (the last one is a truncated ext16)
    if r == 2:  # never-used type byte
        return b"\xc1"
    if r == 3:  # wide encodings of small ints (valid, non-canonical)
        v = rng.choice((0, 1, 5, 127, 1000))
        return rng.choice((b"\xcf" + v.to_bytes(8, "big"), b"\xd3" + v.to_bytes(8, "big"),
                           b"\xce" + v.to_bytes(4, "big"), b"\xcd" + v.to_bytes(2, "big")))
    if r == 4:  # negative ints in signed formats
        return rng.choice((b"\xd0\xff", b"\xd3\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd0\x80",
                           b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00"))
    if r == 5:  # float32 and special float64
        f = rng.choice((1.5, math.nan, math.inf, -0.0, 3.4e38))
        return rng.choice((b"\xca" + struct.pack(">f", f), b"\xcb" + struct.pack(">d", f)))
    if r == 6:  # short str / bin with wide headers
        s = b"abc"
        return rng.choice((b"\xdb\x00\x00\x00\x03" + s, b"\xda\x00\x03" + s, b"\xd9\x03" + s,
                           b"\xc6\x00\x00\x00\x03" + s, b"\xc5\x00\x03" + s))
    if r == 7:  # duplicate keys
        return b"\x82\xa3exp\x01\xa3exp\x02"
    if r == 8:  # deep nesting
        depth = rng.choice((40, 200, 600, 1100, 3000))
        return rng.choice((b"\x91" * depth + b"\xc0", b"\x81\xa1a" * depth + b"\xc0"))
    if r == 9:  # a length prefix promising more than follows
        return rng.choice(HUGE_HEADERS) + b"ab"
    if r == 10:  # a container header with missing items
        return rng.choice((b"\x93\x01", b"\x83\xa1a", b"\xdc\x00\x10\x01\x02"))
    if r == 11:  # array / map32 of a few items (valid, non-canonical)
        return rng.choice((b"\xdd\x00\x00\x00\x01\xc0", b"\xdf\x00\x00\x00\x00",
                           b"\xdc\x00\x00", b"\xde\x00\x00"))
    if r == 12:  # bin where str is expected and vice versa
        return rng.choice((b"\xc4\x03abc", b"\xa3abc", b"\xc4\x00", b"\xa0"))
    return rng.randbytes(rng.randint(1, 9))


# ------------------------------------------------------------------------------------------
# envelope mode

class EnvelopeMode:
    """Mutations at the envelope level; nothing is re-signed."""

    def __init__(self, rng: random.Random):
        W = _Wire.load()
        self.rng = rng
        S = W.samples
        self.signers = [S.sample_identity("fuzz-a"), S.sample_identity("fuzz-b")]
        self.corpus: list[bytes] = []
        self.signed: set[tuple] = set()  # what somebody really signed
        for name in sorted(W.kinds.KINDS):
            bodies = [S.sample_body(name, NOW_MS, NET)]
            bodies += [S.random_body(name, rng, NOW_MS) for _ in range(3)]
            for i, body in enumerate(bodies):
                net = OTHER_NET if i == 3 else NET
                signer = self.signers[i % 2]
                self.add(W.envelope.seal(body, signer, net))
        self.large = []
        for name in ("lease_batch", "blob_manifest", "result", "evidence"):
            env = W.envelope.seal(S.large_body(name, NOW_MS, NET), self.signers[0], NET)
            self.add(env, large=True)

    def add(self, env: bytes, large: bool = False) -> None:
        W = _Wire.load()
        fmt, net, kind, version, signer, body, sig = W.msgpack.unpackb(env, raw=False)
        self.signed.add((net, kind, version, signer, body, sig))
        (self.large if large else self.corpus).append(env)

    def base(self) -> bytes:
        if self.rng.random() < 0.01:
            return self.rng.choice(self.large)
        return self.rng.choice(self.corpus)

    def check_success(self, opened: Any) -> None:
        key = (opened.network, opened.kind, opened.version, opened.signer, opened.body_bytes,
               opened.signature)
        if key not in self.signed:
            raise InvariantBroken("accepted an envelope nobody signed (forgery/malleability)")

    # -- mutators on bytes
    def m_bitflip(self, d: bytes) -> bytes:
        if not d:
            return d
        b = bytearray(d)
        for _ in range(self.rng.choice((1, 1, 1, 2, 3, 8))):
            i = self.rng.randrange(len(b))
            b[i] ^= 1 << self.rng.randrange(8)
        return bytes(b)

    def m_byteset(self, d: bytes) -> bytes:
        if not d:
            return d
        b = bytearray(d)
        i = self.rng.randrange(len(b))
        b[i] = self.rng.choice((0x00, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, self.rng.randrange(256)))
        return bytes(b)

    def m_truncate(self, d: bytes) -> bytes:
        return d[: self.rng.randrange(len(d) + 1)]

    def m_extend(self, d: bytes) -> bytes:
        extra = self.rng.choice((b"\x00", b"\xc0", self.rng.randbytes(self.rng.randint(1, 16)), d))
        return d + extra

    def m_splice(self, d: bytes) -> bytes:
        other = self.base()
        i = self.rng.randrange(len(d) + 1)
        j = i if self.rng.random() < 0.5 and i <= len(other) else self.rng.randrange(len(other) + 1)
        return d[:i] + other[j:]

    def m_insert_type(self, d: bytes) -> bytes:
        i = self.rng.randrange(len(d) + 1)
        return d[:i] + self.rng.choice(MSGPACK_TYPE_BYTES) + d[i:]

    def m_huge_length(self, d: bytes) -> bytes:
        i = self.rng.randrange(len(d) + 1)
        h = self.rng.choice(HUGE_HEADERS)
        if self.rng.random() < 0.5:
            return d[:i] + h + d[i:]
        return d[:i] + h + d[i + len(h):]

    def m_delete(self, d: bytes) -> bytes:
        if not d:
            return d
        i = self.rng.randrange(len(d))
        return d[:i] + d[i + self.rng.randint(1, 8):]

    def m_repack(self, d: bytes) -> bytes:
        """Decode the envelope (if it is one) and re-pack with one field changed."""
        W = _Wire.load()
        rng = self.rng
        try:
            items = list(W.msgpack.unpackb(d, raw=False))
            assert len(items) == 7
        except Exception:  # noqa: BLE001 - already damaged: leave it
            return d
        fmt, net, kind, version, signer, body, sig = items
        if not (type(kind) is str and type(signer) is bytes and type(body) is bytes
                and type(sig) is bytes):
            return d
        which = rng.randrange(10)
        if which == 0:
            items[0] = rng.choice((0, 2, -1, "1", None, 1.0, True, 2**64 - 1))
        elif which == 1:
            items[1] = rng.choice((OTHER_NET, NET, "", "x" * 33, NET.encode(), 7, None,
                                   Raw(str_header(2) + b"\xff\xfe"), NET.upper()))
        elif which == 2:
            others = sorted(W.kinds.KINDS)
            items[2] = rng.choice((rng.choice(others), "unknown", "", "r" * 33, kind.encode(),
                                   5, kind.upper(), kind + "\x00", Raw(str_header(1) + b"\xff")))
        elif which == 3:
            items[3] = rng.choice((0, 2, -1, 2**64 - 1, "1", 1.0, True, None, 1 << 32))
        elif which == 4:
            items[4] = rng.choice((signer[:31], signer + b"\x00", signer.decode("latin-1"),
                                   bytes(32), self.signers[1].public_key,
                                   b"\x01" + bytes(31), b"\xff" * 32))
        elif which == 5:
            items[5] = rng.choice((b"", rng.randbytes(rng.randint(1, 64)), body[:-1], body + b"\xc0",
                                   body.decode("latin-1"), None, [body]))
        elif which == 6:
            items[6] = rng.choice((sig[:63], sig + b"\x00", bytes(64), rng.randbytes(64),
                                   sig.decode("latin-1"), sig[32:] + sig[:32]))
        elif which == 7:
            items = rng.choice((items[:6], items + [None], [items], items[::-1],
                                dict(zip(map(str, range(7)), items)), items[1:] + items[:1]))
        elif which == 8:  # a body length header that lies
            n = len(body) + rng.choice((-1, 1, 2**20, 2**32 - 1 - len(body)))
            n = max(0, min(n, 2**32 - 1))
            items[5] = Raw(b"\xc6" + n.to_bytes(4, "big") + bytes(body))
        else:  # relabel the kind (and maybe the network) keeping the signature
            items[2] = rng.choice(sorted(W.kinds.KINDS))
            if rng.random() < 0.3:
                items[1] = OTHER_NET
        return pack_tree(items, rng)

    def m_random(self, d: bytes) -> bytes:
        n = self.rng.choice((0, 1, 2, 7, 16, 64, 200, 1000))
        prefix = self.rng.choice((b"", b"\x97", b"\x97\x01", b"\x97\x01\xa7fuzznet"))
        return prefix + self.rng.randbytes(n)

    def m_nest(self, d: bytes) -> bytes:
        depth = self.rng.choice((10, 100, 1000, 5000))
        return b"\x97" + b"\x91" * depth + b"\xc0"

    MUTATORS = ("m_bitflip", "m_byteset", "m_truncate", "m_extend", "m_splice", "m_insert_type",
                "m_huge_length", "m_delete", "m_repack", "m_repack", "m_random", "m_nest")

    def next_case(self) -> Case:
        rng = self.rng
        r = rng.random()
        data: Any = self.base()
        if r < 0.03:
            pass  # a valid envelope (or a replay of one)
        elif r < 0.035:
            data = rng.choice((data.hex(), None, 42, [data], bytearray(data), memoryview(data),
                               data.decode("latin-1")))
        elif r < 0.0353:
            data = b"\x97" + bytes(1024 * 1024)  # oversized
        else:
            for _ in range(rng.choice((1, 1, 1, 2, 2, 3))):
                data = getattr(self, rng.choice(self.MUTATORS))(data)
        case = Case(data=data, post=self.check_success)
        r = rng.random()
        case.network = NET if r < 0.85 else OTHER_NET
        case.now_ms = NOW_MS + rng.choice((0, 0, 0, rng.randint(-2 * 86_400_000, 10 * 86_400_000),
                                           -10**12, 10**13))
        case.dedup = rng.random() < DEDUP_SHARE
        if rng.random() < 0.05:
            case.kinds = set(rng.sample(sorted(_Wire.load().kinds.KINDS), 3))
        return case


# ------------------------------------------------------------------------------------------
# body mode

class BodyMode:
    """Structure-aware body mutations, re-signed so the schema decoders are reached."""

    def __init__(self, rng: random.Random):
        W = _Wire.load()
        self.rng = rng
        self.key = W.samples.sample_identity("fuzz-body")
        self.names = sorted(W.kinds.KINDS)
        self.corpus: dict[str, list] = {}
        self.all_field_names: list[str] = []
        for name in self.names:
            S = W.samples
            bodies = [S.sample_body(name, NOW_MS, NET), S.large_body(name, NOW_MS, NET)]
            bodies += [S.random_body(name, rng, NOW_MS) for _ in range(24)]
            self.corpus[name] = bodies
            for fname, _ in S.wire_fields(W.kinds.KINDS[name].cls):
                if fname not in self.all_field_names:
                    self.all_field_names.append(fname)

    # -- tree helpers
    @staticmethod
    def copy(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: BodyMode.copy(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [BodyMode.copy(x) for x in v]
        return v

    @staticmethod
    def slots(v: Any, out: list) -> list:
        if isinstance(v, dict):
            for k in list(v):
                out.append((v, k))
                BodyMode.slots(v[k], out)
        elif isinstance(v, list):
            for i in range(len(v)):
                out.append((v, i))
                BodyMode.slots(v[i], out)
        return out

    @staticmethod
    def maps(v: Any, out: list) -> list:
        if isinstance(v, dict):
            out.append(v)
            for x in v.values():
                BodyMode.maps(x, out)
        elif isinstance(v, list):
            for x in v:
                BodyMode.maps(x, out)
        return out

    def pick_slot(self, tree: Any):
        slots = self.slots(tree, [])
        return self.rng.choice(slots) if slots else None

    # -- mutators on the value tree (return the new root)
    def t_drop_key(self, t: Any) -> Any:
        maps = [m for m in self.maps(t, []) if m]
        if maps:
            m = self.rng.choice(maps)
            del m[self.rng.choice(list(m))]
        return t

    def t_add_key(self, t: Any) -> Any:
        maps = self.maps(t, [])
        if maps:
            m = self.rng.choice(maps)
            key = self.rng.choice((self.rng.choice(self.all_field_names), "extra", "", "x" * 40,
                                   Raw(str_header(2) + b"\xc3\x28"), b"exp", 3, "EXP"))
            m[key] = random_msgpack(self.rng) if self.rng.random() < 0.7 else 0
        return t

    def t_rename_key(self, t: Any) -> Any:
        maps = [m for m in self.maps(t, []) if m]
        if maps:
            m = self.rng.choice(maps)
            k = self.rng.choice(list(m))
            kk = k if isinstance(k, str) else str(k)
            new = self.rng.choice((kk.upper(), kk + "_", " " + kk, kk[:-1], kk.encode(),
                                   self.rng.choice(self.all_field_names), kk + "\x00", 0))
            m[new] = m.pop(k)
        return t

    def t_swap_type(self, t: Any) -> Any:
        s = self.pick_slot(t)
        if s is None:
            return random_msgpack(self.rng)
        parent, k = s
        v = parent[k]
        choices = [None, True, 0, -1, 1.5, "x", b"x", [], {}]
        choices = [c for c in choices if type(c) is not type(v)]
        parent[k] = self.rng.choice(choices)
        if isinstance(v, (bytes, str)) and self.rng.random() < 0.5:  # same content, other type
            parent[k] = v.decode("latin-1") if isinstance(v, bytes) else v.encode()
        return t

    def t_extreme(self, t: Any) -> Any:
        s = self.pick_slot(t)
        if s is None:
            return t
        parent, k = s
        parent[k] = self.rng.choice(INT_EDGES + FLOAT_EDGES)
        return t

    def t_huge(self, t: Any) -> Any:
        s = self.pick_slot(t)
        if s is None:
            return t
        parent, k = s
        rng = self.rng
        r = rng.randrange(7)
        if r == 0:
            parent[k] = "s" * rng.choice((257, 1024, 1025, 5000))
        elif r == 1:
            parent[k] = "\u4e2d" * rng.choice((256, 342, 400))  # 3 bytes each
        elif r == 2:
            parent[k] = rng.randbytes(rng.choice((33, 65, 257, 4096, 70_000, 262_145, 600_000)))
        elif r == 3:
            item = parent[k]
            parent[k] = [item] * self.capped(item, rng.choice((9, 65, 257, 300)))
        elif r == 4:
            parent[k] = {f"k{i}": i for i in range(rng.choice((8, 33, 40)))}
        elif r == 5:
            lists = [(p, kk) for p, kk in self.slots(t, []) if isinstance(p[kk], list)]
            if lists:
                p, kk = rng.choice(lists)
                lst = p[kk]
                fill = lst[0] if lst else rng.randbytes(32)
                n = self.capped(fill, rng.choice((1, 9, 65, 257)))
                p[kk] = lst + [self.copy(fill) for _ in range(n)]
        else:
            parent[k] = Raw(rng.choice(HUGE_HEADERS) + b"xy")
        return t

    @staticmethod
    def capped(item: Any, count: int) -> int:
        """Repeat counts are cut so a body stays under ~2 MiB: anything past the 1 MiB
        envelope cap only tests the first size check, and signing 100 MB is slow."""
        try:
            size = len(_Wire.load().msgpack.packb(item, use_bin_type=True))
        except Exception:  # noqa: BLE001 - holds Raw pieces: small
            size = 64
        return max(1, min(count, (2 * 1024 * 1024) // max(size, 1)))

    def t_nest(self, t: Any) -> Any:
        s = self.pick_slot(t)
        if s is None:
            return t
        parent, k = s
        if self.rng.random() < 0.5:
            v: Any = parent[k]
            for _ in range(self.rng.randint(1, 60)):
                v = [v] if self.rng.random() < 0.5 else {"a": v}
            parent[k] = v
        else:
            depth = self.rng.choice((100, 600, 1100, 3000))
            parent[k] = Raw(b"\x91" * depth + b"\xc0")
        return t

    def t_non_utf8(self, t: Any) -> Any:
        bad = self.rng.choice(NON_UTF8)
        raw = Raw(str_header(len(bad)) + bad)
        maps = self.maps(t, [])
        if maps and self.rng.random() < 0.3:
            m = self.rng.choice(maps)
            m[raw] = 1
            return t
        s = self.pick_slot(t)
        if s is None:
            return raw
        parent, k = s
        parent[k] = raw
        return t

    def t_raw(self, t: Any) -> Any:
        s = self.pick_slot(t)
        if s is None:
            return Raw(random_raw(self.rng))
        parent, k = s
        parent[k] = Raw(random_raw(self.rng))
        return t

    def t_random(self, t: Any) -> Any:
        if self.rng.random() < 0.2:
            return random_msgpack(self.rng)
        s = self.pick_slot(t)
        if s is None:
            return random_msgpack(self.rng)
        parent, k = s
        parent[k] = random_msgpack(self.rng)
        return t

    def t_exp(self, t: Any) -> Any:
        if isinstance(t, dict) and "exp" in t:
            day = 86_400_000
            t["exp"] = self.rng.choice((0, NOW_MS - 30_001, NOW_MS - 30_000, NOW_MS + 30 * day,
                                        NOW_MS + 7 * day + 30_001, NOW_MS + 3_600_000 + 30_001,
                                        NOW_MS + 300_000 + 30_000, 2**64 - 1, 2**63))
        return t

    def t_boundary(self, t: Any, spec: Any) -> Any:
        """Set one declared field to a value just outside its wire type's bounds."""
        W = _Wire.load()
        sch = W.schema
        if not isinstance(t, dict):
            return t
        fields = W.samples.wire_fields(spec.cls)
        name, w = self.rng.choice(fields)
        target = t
        if isinstance(w, sch.Struct) and isinstance(t.get(name), dict):
            target = t[name]
            name, w = self.rng.choice(W.samples.wire_fields(w.cls))
        if isinstance(w, sch.ListOf) and self.rng.random() < 0.5:
            w_item = w.item
            lst = target.get(name)
            if isinstance(lst, list) and lst:
                target = lst
                name = self.rng.randrange(len(lst))
                w = w_item
        if isinstance(w, sch.Optional):
            w = w.inner
        rng = self.rng
        if isinstance(w, sch.UInt):
            v = rng.choice((w.min - 1, w.max + 1, -1, True))
            v = v if v >= -(2**63) and v <= 2**64 - 1 else 2**64 - 1
        elif isinstance(w, sch.Float):
            v = rng.choice((w.min - 1.0, w.max * 2, math.nan, math.inf, 2**64 - 1, -1, "1.0"))
        elif isinstance(w, sch.Bytes):
            v = rng.randbytes(rng.choice((max(0, w.min - 1), w.max + 1)))
        elif isinstance(w, sch.Text):
            choices = [("a" * (w.max + 1)), ""]
            if w.pattern:
                choices += ["bad char!", "\u00e9", "ok\n"]
            v = rng.choice(choices)
        elif isinstance(w, sch.Enum):
            v = rng.choice(("", w.values[0].upper(), w.values[0] + " ", "other", w.values[0].encode()))
        elif isinstance(w, sch.ListOf):
            v = [None] * rng.choice((max(0, w.min - 1), w.max + 1)) if rng.random() < 0.5 else \
                (None if rng.random() < 0.5 else {})
        elif isinstance(w, sch.Struct):
            v = rng.choice(([], "x", None, {}))
        else:
            v = None
        if isinstance(target, dict) or (isinstance(target, list) and isinstance(name, int)):
            target[name] = v
        return t

    TREE_MUTATORS = ("t_drop_key", "t_add_key", "t_rename_key", "t_swap_type", "t_extreme",
                     "t_huge", "t_nest", "t_non_utf8", "t_raw", "t_random", "t_exp")

    # -- byte-level damage after packing
    def b_damage(self, b: bytes) -> bytes:
        rng = self.rng
        r = rng.randrange(5)
        if not b:
            return rng.randbytes(3)
        i = rng.randrange(len(b))
        if r == 0:
            ba = bytearray(b)
            ba[i] ^= 1 << rng.randrange(8)
            return bytes(ba)
        if r == 1:
            return b[:i]
        if r == 2:
            return b[:i] + rng.choice(MSGPACK_TYPE_BYTES) + b[i:]
        if r == 3:
            return b + rng.choice((b"\xc0", b"\x00", b))
        return b[:i] + rng.choice(HUGE_HEADERS) + b[i:]

    def next_case(self) -> Case:
        if self.rng.random() < 0.03 and self.recent:  # an earlier valid input again
            old = self.rng.choice(self.recent)
            return Case(data=old.data, network=old.network, now_ms=old.now_ms, dedup=True,
                        post=old.post)
        case = self._next_case()
        if case.valid:
            case.dedup = True
            self.recent = (self.recent + [case])[-8:]
        return case

    recent: list = []

    def _next_case(self) -> Case:
        W = _Wire.load()
        rng = self.rng
        name = rng.choice(self.names)
        spec = W.kinds.KINDS[name]
        body = rng.choice(self.corpus[name]) if rng.random() < 0.9 else \
            W.samples.random_body(name, rng, NOW_MS)
        tree = W.schema.encode_struct(body)
        tree = self.copy(tree)
        r = rng.random()
        if r < 0.04:
            pass  # unmutated: valid, re-signed
        elif r < 0.3:
            tree = self.t_boundary(tree, spec)
            if rng.random() < 0.2:
                tree = getattr(self, rng.choice(self.TREE_MUTATORS))(tree)
        else:
            for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
                tree = getattr(self, rng.choice(self.TREE_MUTATORS))(tree)
        body_bytes = pack_tree(tree, rng)
        if rng.random() < 0.08:
            body_bytes = self.b_damage(body_bytes)
        label = name if rng.random() < 0.92 else rng.choice(self.names)  # re-signed as another kind
        sig = self.key.sign(W.envelope.signed_bytes(NET, label, spec.major, body_bytes))
        env = W.envelope.pack_envelope(NET, label, spec.major, self.key.public_key, body_bytes, sig)
        exp, at = getattr(body, "exp", None), getattr(body, "at", None)
        now = NOW_MS
        if exp is not None and rng.random() < 0.8:
            now = exp - rng.randint(0, 60_000)
        elif at is not None and rng.random() < 0.8:
            now = at + rng.randint(-40_000, 60_000)
        elif rng.random() < 0.3:
            now = NOW_MS + rng.randint(-10 * 86_400_000, 10 * 86_400_000)
        return Case(data=env, network=NET, now_ms=now, dedup=rng.random() < DEDUP_SHARE,
                    post=self.check_success, valid=r < 0.04 and label == name)

    @staticmethod
    def check_success(opened: Any) -> None:
        W = _Wire.load()
        spec = W.kinds.KINDS[opened.kind]
        body = opened.body
        if type(body) is not spec.cls:
            raise InvariantBroken(f"decoded a {type(body).__name__} for kind {opened.kind}")
        again = W.schema.decode_struct(spec.cls, W.schema.encode_struct(body))
        if again != body:
            raise InvariantBroken("decoded body does not survive re-encoding")
        if len(W.envelope.encode_body(body)) > 2 * spec.max_body:
            raise InvariantBroken("decoded body re-encodes far above max_body")


def replay_check(spec: Any) -> str:
    """How open_envelope treats a repeat of a kind (protocol/names.json `replay_check`)."""
    if spec.max_lifetime_ms is None:
        return "store"  # never expires: the store keeping it is idempotent
    if spec.record:
        return "sequence"  # ordered by sequence number, never deduplicated by message id
    return "message-id"


class DedupLedger:
    """What the fuzzer expects the dedup store to hold: the message ids of the messages of
    "message-id" kinds accepted with it. Checks each success and each `replay` refusal."""

    def __init__(self) -> None:
        self.remembered: set[bytes] = set()
        self.reopened: set[bytes] = set()  # ids of other kinds accepted with the store
        self.counts = {"replays_refused": 0, "sequence_reopened": 0, "store_reopened": 0}

    def accepted(self, opened: Any) -> None:
        W = _Wire.load()
        rule = replay_check(W.kinds.KINDS[opened.kind])
        msg_id = opened.msg_id
        if rule == "message-id":
            if msg_id in self.remembered:
                raise InvariantBroken(f"accepted a replay of a {opened.kind} message with the "
                                      "dedup store")
            self.remembered.add(msg_id)
        elif msg_id in self.reopened:
            self.counts[f"{rule}_reopened"] += 1
        else:
            self.reopened.add(msg_id)

    def refused_as_replay(self, case: Case) -> None:
        W = _Wire.load()
        if not case.dedup:
            raise InvariantBroken("refused as a replay without a dedup store")
        _fmt, net, kind, version, signer, body, _sig = W.msgpack.unpackb(bytes(case.data),
                                                                         raw=False)
        rule = replay_check(W.kinds.KINDS[kind])
        if rule != "message-id":
            raise InvariantBroken(f"a {kind} message (replay_check {rule}) refused as a replay")
        if W.envelope.message_id(net, kind, version, signer, body) not in self.remembered:
            raise InvariantBroken(f"a {kind} message refused as a replay, never accepted before")
        self.counts["replays_refused"] += 1


def _lifetime_ok(opened: Any, now_ms: int) -> None:
    W = _Wire.load()
    spec = W.kinds.KINDS[opened.kind]
    exp = getattr(opened.body, "exp", None)
    skew = W.envelope.MAX_CLOCK_SKEW_MS
    if spec.max_lifetime_ms is not None and exp is not None:
        if exp + skew < now_ms or exp - now_ms > spec.max_lifetime_ms + skew:
            raise InvariantBroken(f"accepted outside its lifetime: exp {exp}, now {now_ms}")


# ------------------------------------------------------------------------------------------
# rotation mode

class RotationMode:
    def __init__(self, rng: random.Random):
        W = _Wire.load()
        self.rng = rng
        S = W.samples
        self.ids = [S.sample_identity(f"rot-{i}") for i in range(4)]
        self.by_key = {i.public_key: i for i in self.ids}
        self.body_mode = BodyMode.__new__(BodyMode)  # reuse the tree mutators
        self.body_mode.rng = rng
        self.body_mode.all_field_names = ["new_key", "at", "reason", "new_key_sig", "exp"]
        # Keys that are not valid (or are low-order) curve points, and random ones.
        self.odd_keys = [bytes(32), b"\x01" + bytes(31), b"\xff" * 32,
                         bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
                         bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
                         bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")]

    def next_case(self) -> Case:
        W = _Wire.load()
        rng = self.rng
        R = W.rotation
        old, new = rng.sample(self.ids, 2)
        third = next(i for i in self.ids if i not in (old, new))
        net = NET
        at = rng.choice((NOW_MS, 0, 2**64 - 1, 2**63, NOW_MS + rng.randint(-10**9, 10**9)))
        reason = rng.choice(("scheduled", "compromised"))
        new_key = new.public_key
        good = new.sign(R.acceptance_bytes(net, old.public_key, new_key, at))
        sig = good
        r = rng.randrange(16)
        if r == 0:
            pass
        elif r == 1:
            b = bytearray(good)
            b[rng.randrange(64)] ^= 1 << rng.randrange(8)
            sig = bytes(b)
        elif r == 2:
            sig = rng.choice((bytes(64), b"\xff" * 64, rng.randbytes(64)))
        elif r == 3:
            sig = old.sign(R.acceptance_bytes(net, old.public_key, new_key, at))
        elif r == 4:
            sig = third.sign(R.acceptance_bytes(net, old.public_key, new_key, at))
        elif r == 5:
            sig = new.sign(R.acceptance_bytes(OTHER_NET, old.public_key, new_key, at))
        elif r == 6:
            sig = new.sign(R.acceptance_bytes(net, old.public_key, new_key, (at + 1) % 2**64))
        elif r == 7:
            sig = new.sign(R.acceptance_bytes(net, new_key, old.public_key, at))
        elif r == 8:
            sig = new.sign(R.acceptance_bytes(net, third.public_key, new_key, at))
        elif r == 9:
            new_key = old.public_key  # rotate to itself
        elif r == 10:
            new_key = third.public_key  # names someone else's key
        elif r == 11:
            new_key = rng.choice(self.odd_keys + [rng.randbytes(32)])
        elif r == 12:
            at = (at + rng.choice((1, -1, 1000))) % 2**64  # statement time differs from signed
        elif r == 13:
            sig = good[:32] + good[:32]  # R repeated
        elif r == 14:
            # S + L: a non-canonical (malleated) signature of the same message
            L = 2**252 + 27742317777372353535851937790883648493
            s_val = int.from_bytes(good[32:], "little") + L
            sig = good[:32] + (s_val % 2**256).to_bytes(32, "little")
        else:
            sig = good  # valid, mutated below at the body level
        if r == 0 and rng.random() < 0.5:  # the real API, unmodified
            return Case(data=R.make_rotation(old, new, net, at, reason), network=net,
                        now_ms=at, dedup=rng.random() < DEDUP_SHARE, post=self.check_success)
        body = W.kinds.KeyRotation(new_key=new_key, at=at, reason=reason, new_key_sig=sig)
        tree = W.schema.encode_struct(body)
        if r == 15 or rng.random() < 0.1:
            bm = self.body_mode
            for _ in range(rng.randint(1, 2)):
                tree = getattr(bm, rng.choice(BodyMode.TREE_MUTATORS))(tree)
        body_bytes = pack_tree(tree, rng)
        signer = old if rng.random() < 0.95 else third
        env_sig = signer.sign(W.envelope.signed_bytes(net, "key_rotation", 1, body_bytes))
        env = W.envelope.pack_envelope(net, "key_rotation", 1, signer.public_key, body_bytes,
                                       env_sig)
        if rng.random() < 0.05:
            b = bytearray(env)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            env = bytes(b)
        now = at + rng.randint(-40_000, 10**8) if rng.random() < 0.9 else \
            NOW_MS + rng.randint(-10**8, 10**8)
        return Case(data=env, network=net, now_ms=now, dedup=rng.random() < DEDUP_SHARE,
                    post=self.check_success)

    def check_success(self, opened: Any) -> None:
        W = _Wire.load()
        if opened.kind != "key_rotation":
            raise InvariantBroken(f"rotation input opened as {opened.kind}")
        body = W.rotation.check_rotation(opened)  # may raise WireError: fine
        holder = self.by_key.get(body.new_key)
        if holder is None:
            raise InvariantBroken("rotation accepted to a key nobody here holds")
        want = holder.sign(W.rotation.acceptance_bytes(opened.network, opened.signer,
                                                       body.new_key, body.at))
        if body.new_key_sig != want:
            raise InvariantBroken("rotation accepted with a countersignature its holder never made")


MODE_CLASSES = {"envelope": EnvelopeMode, "body": BodyMode, "rotation": RotationMode}


# ------------------------------------------------------------------------------------------
# the runner

class _Watchdog:
    """Aborts the process if one input runs longer than `limit_s` (a real hang)."""

    def __init__(self, limit_s: float):
        self.limit_s = limit_s
        self.current: tuple | None = None  # (mode, index, data, started)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True, name="fuzz-watchdog")

    def run(self) -> None:
        while not self.stop.wait(0.25):
            cur = self.current
            if cur is not None and time.perf_counter() - cur[3] > self.limit_s:
                mode, index, data, _ = cur
                sys.stderr.write(f"\nHANG: {mode} input {index} ran over {self.limit_s} s\n"
                                 f"input hex: {_hex(data)}\n")
                faulthandler.dump_traceback(all_threads=True)
                sys.stderr.flush()
                os._exit(3)

    def __enter__(self) -> "_Watchdog":
        self.thread.start()
        self.kick()
        return self

    def kick(self) -> None:
        """Re-arm the last resort for a C extension that hangs holding the GIL (the thread
        above cannot run then): faulthandler dumps all tracebacks and exits."""
        faulthandler.dump_traceback_later(self.limit_s * 4, exit=True)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        faulthandler.cancel_dump_traceback_later()


def _retime(open_envelope: Callable, case: Case) -> float:
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        try:
            open_envelope(case.data, case.network, now_ms=case.now_ms, kinds=case.kinds)
        except Exception:  # noqa: BLE001 - only the time matters here
            pass
        best = min(best, time.perf_counter() - t0)
    return best


_INDEX = re.compile(r"\[\d+\]")
_UNKNOWN = re.compile(r"^(body(?:\.(?:requirements|leases\[\]))?)\..*$", re.S)


def _hex(data: Any) -> str:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).hex()
    return f"<{type(data).__name__}> {data!r}"[:2000]


def run_mode(mode: str, inputs: int, seed: int, state_dir: Path, *, watchdog: _Watchdog | None = None,
             progress: Callable[[str, int], None] | None = None) -> dict:
    W = _Wire.load()
    rng = random.Random(f"p2pfleet-fuzz/{seed}/{mode}")
    gen = MODE_CLASSES[mode](rng)
    outcomes: dict[str, int] = {}
    body_fields: dict[str, int] = {}  # invalid-body refusals by field path: decoders reached
    failures: list[dict] = []
    n_failures = 0
    slowest = (0.0, -1)
    retimed = 0
    started = time.perf_counter()
    WireError = W.errors.WireError
    open_envelope = W.envelope.open_envelope
    ledger = DedupLedger()
    with W.NodeState(state_dir / f"{mode}.sqlite") as dedup:
        for index in range(inputs):
            case = gen.next_case()
            t0 = time.perf_counter()
            if watchdog is not None:
                watchdog.current = (mode, index, case.data, t0)
                if index % 64 == 0:
                    watchdog.kick()
            error = None
            try:
                opened = open_envelope(case.data, case.network, now_ms=case.now_ms,
                                       dedup=dedup if case.dedup else None, kinds=case.kinds)
                if case.dedup:
                    ledger.accepted(opened)
                _lifetime_ok(opened, case.now_ms)
                if case.post is not None:
                    case.post(opened)
                outcome = "ok"
            except WireError as exc:
                outcome = exc.code
                if outcome == "replay":
                    try:
                        ledger.refused_as_replay(case)
                    except InvariantBroken as broken:
                        outcome = "FAILURE"
                        error = broken
                if outcome == "invalid-body":
                    path = _INDEX.sub("[]", exc.field)
                    if exc.reason == "unknown field":  # the path ends in the sender's key
                        path = _UNKNOWN.sub(r"\1.<unknown>", path)
                    body_fields[path] = body_fields.get(path, 0) + 1
            except Exception as exc:  # noqa: BLE001 - this is what we are looking for
                outcome = "FAILURE"
                error = exc
            dt = time.perf_counter() - t0
            if watchdog is not None:
                watchdog.current = None
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if dt > slowest[0]:
                slowest = (dt, index)
            if error is None and dt > HANG_S:
                # Confirm it is the input, not a stall of the machine: time it again
                # (without the dedup store, whose answer would now differ).
                again = _retime(open_envelope, case)
                retimed += 1
                if again > HANG_S:
                    outcome = "FAILURE"
                    error = TimeoutError(f"input took {dt:.3f} s, again {again:.3f} s "
                                         f"(limit {HANG_S} s)")
            if error is not None:
                n_failures += 1
                tb = "".join(traceback.format_exception(error))
                hexed = _hex(case.data)
                sys.stderr.write(f"\nFAILURE {mode} input {index} (seed {seed}): "
                                 f"{type(error).__name__}: {error}\ninput hex: {hexed}\n{tb}\n")
                if len(failures) < MAX_FAILURE_DETAILS:
                    failures.append({
                        "mode": mode, "index": index, "seed": seed,
                        "error": f"{type(error).__name__}: {error}",
                        "input_hex": hexed[: 2 * MAX_HEX_IN_JSON],
                        "input_len": len(case.data) if hasattr(case.data, "__len__") else None,
                        "network": case.network, "now_ms": case.now_ms, "dedup": case.dedup,
                        "traceback": tb,
                    })
            if progress is not None and (index + 1) % 10_000 == 0:
                progress(mode, index + 1)
    elapsed = time.perf_counter() - started
    return {
        "inputs": inputs,
        "outcomes": dict(sorted(outcomes.items())),
        "distinct_errors": sorted(k for k in outcomes if k not in ("ok", "FAILURE")),
        "invalid_body_field_paths": len(body_fields),
        "invalid_body_by_field": dict(sorted(body_fields.items())),
        "repeats_with_dedup": dict(ledger.counts),
        "failures": n_failures,
        "failure_details": failures,
        "slowest_input_ms": round(slowest[0] * 1000, 3),
        "slowest_input_index": slowest[1],
        "retimed_slow_inputs": retimed,
        "seconds": round(elapsed, 3),
        "inputs_per_second": round(inputs / elapsed, 1) if elapsed > 0 else None,
    }


def run_fuzz(inputs_per_mode: int, seed: int = 0, modes: tuple[str, ...] | list[str] = MODES, *,
             watchdog_s: float | None = 30.0,
             progress: Callable[[str, int], None] | None = None) -> dict:
    """Run the fuzzer in-process and return its summary (see the module doc)."""
    started = time.perf_counter()
    result: dict = {"seed": seed, "inputs_per_mode": inputs_per_mode, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="p2pfleet-fuzz-") as tmp:
        if watchdog_s:
            with _Watchdog(watchdog_s) as wd:
                for mode in modes:
                    result["modes"][mode] = run_mode(mode, inputs_per_mode, seed, Path(tmp),
                                                     watchdog=wd, progress=progress)
        else:
            for mode in modes:
                result["modes"][mode] = run_mode(mode, inputs_per_mode, seed, Path(tmp),
                                                 progress=progress)
    return _summarise(result, time.perf_counter() - started)


def _summarise(result: dict, elapsed: float) -> dict:
    per = result["modes"].values()
    result["total_inputs"] = sum(m["inputs"] for m in per)
    result["failures"] = sum(m["failures"] for m in per)
    result["failure_details"] = [f for m in per for f in m["failure_details"]]
    for m in per:
        m.pop("failure_details", None)
    result["slowest_input_ms"] = max((m["slowest_input_ms"] for m in per), default=0.0)
    result["elapsed_s"] = round(elapsed, 3)
    result["ok"] = result["failures"] == 0
    return result


def replay_input(mode: str, index: int, seed: int) -> Case:
    """Regenerate one input (generation does not depend on outcomes)."""
    gen = MODE_CLASSES[mode](random.Random(f"p2pfleet-fuzz/{seed}/{mode}"))
    case = None
    for _ in range(index + 1):
        case = gen.next_case()
    return case


# ------------------------------------------------------------------------------------------
# coverage and parallel workers

WIRE_DIR = ROOT / "p2pfleet" / "wire"
COVERAGE_OMIT = [str(WIRE_DIR / "samples.py")]  # test helper, not decoder code


def _new_coverage(data_file: str | None):
    import coverage

    return coverage.Coverage(branch=True, source=[str(WIRE_DIR)], omit=COVERAGE_OMIT,
                             data_file=data_file, config_file=False)


def _worker(args: tuple) -> dict:
    mode, inputs, seed, cov_file, watchdog_s = args
    cov = None
    if cov_file:
        cov = _new_coverage(cov_file)
        cov.start()
    try:
        res = run_fuzz(inputs, seed, [mode], watchdog_s=watchdog_s)
    finally:
        if cov is not None:
            cov.stop()
            cov.save()
    return res


def coverage_summary(cov) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cov.json"
        cov.json_report(outfile=str(out), show_contexts=False)
        rep = json.loads(out.read_text())
    totals = rep["totals"]
    files = {}
    for path, info in sorted(rep["files"].items()):
        s = info["summary"]
        files[Path(path).name] = {
            "branch_percent": round(100 * s["covered_branches"] / s["num_branches"], 2)
            if s["num_branches"] else 100.0,
            "statement_percent": round(100 * s["covered_lines"] / s["num_statements"], 2)
            if s["num_statements"] else 100.0,
            "missing_lines": info["missing_lines"],
            "missing_branches": info.get("missing_branches", []),
        }
    nb = totals["num_branches"]
    return {
        "scope": "p2pfleet/wire (excluding samples.py)",
        "branch_percent": round(100 * totals["covered_branches"] / nb, 2) if nb else 100.0,
        "branches_covered": totals["covered_branches"],
        "branches_total": nb,
        "statement_percent": round(100 * totals["covered_lines"] / totals["num_statements"], 2),
        "combined_percent": round(totals["percent_covered"], 2),
        "files": files,
    }


def machine() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0], "implementation": platform.python_implementation()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=10_000, help="inputs per mode (default 10000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--coverage", action="store_true",
                    help="measure branch coverage of p2pfleet/wire")
    ap.add_argument("--json", metavar="OUT", help="write the summary JSON here")
    ap.add_argument("--jobs", type=int, default=0,
                    help="worker processes, one mode each (default: min(modes, cpu count))")
    ap.add_argument("--watchdog", type=float, default=30.0,
                    help="abort if one input runs longer than this (s)")
    ap.add_argument("--replay", metavar="MODE:INDEX",
                    help="print the hex of one input of this seed and exit")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")

    if args.replay:
        mode, _, index = args.replay.partition(":")
        case = replay_input(mode, int(index), args.seed)
        print(json.dumps({"mode": mode, "index": int(index), "network": case.network,
                          "now_ms": case.now_ms, "dedup": case.dedup,
                          "kinds": sorted(case.kinds) if case.kinds else None,
                          "input_hex": _hex(case.data)}, indent=1))
        return 0

    jobs = args.jobs or min(len(modes), os.cpu_count() or 1)
    started = time.perf_counter()
    say = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    say(f"fuzz_wire: {args.inputs} inputs x {len(modes)} modes, seed {args.seed}, "
        f"{jobs} process(es){', coverage on' if args.coverage else ''}")
    cov_summary = None
    if jobs <= 1:
        cov = _new_coverage(None) if args.coverage else None
        if cov is not None:
            cov.start()
        try:
            result = run_fuzz(args.inputs, args.seed, modes, watchdog_s=args.watchdog,
                              progress=lambda m, n: say(f"  {m}: {n}"))
        finally:
            if cov is not None:
                cov.stop()
        if cov is not None:
            cov_summary = coverage_summary(cov)
    else:
        import multiprocessing as mp

        with tempfile.TemporaryDirectory(prefix="p2pfleet-fuzzcov-") as tmp:
            cov_base = str(Path(tmp) / ".coverage") if args.coverage else None
            work = [(m, args.inputs, args.seed,
                     f"{cov_base}.{m}" if cov_base else None, args.watchdog) for m in modes]
            ctx = mp.get_context("spawn")  # fresh interpreters: coverage sees every import
            with ctx.Pool(jobs) as pool:
                parts = pool.map(_worker, work, chunksize=1)
            result = {"seed": args.seed, "inputs_per_mode": args.inputs, "modes": {}}
            for m, part in zip(modes, parts):
                result["modes"][m] = part["modes"][m]
                result["modes"][m]["failure_details"] = part["failure_details"]
            result = _summarise(result, 0.0)
            if cov_base:
                cov = _new_coverage(cov_base)
                cov.combine([f"{cov_base}.{m}" for m in modes], keep=True)
                cov_summary = coverage_summary(cov)
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    result["jobs"] = jobs
    result["coverage"] = cov_summary
    result["machine"] = machine()

    say(f"fuzz_wire: {result['total_inputs']} inputs in {result['elapsed_s']} s, "
        f"{result['failures']} failure(s), slowest input {result['slowest_input_ms']} ms")
    for m, info in result["modes"].items():
        say(f"  {m:9} {info['inputs']} inputs, {info['seconds']} s, outcomes {info['outcomes']}")
    if cov_summary:
        say(f"  branch coverage of p2pfleet/wire: {cov_summary['branch_percent']}% "
            f"({cov_summary['branches_covered']}/{cov_summary['branches_total']}), "
            f"statements {cov_summary['statement_percent']}%")
    text = json.dumps(result, indent=1, sort_keys=False)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
