"""Signed envelopes: seal a body, and open untrusted bytes in the only safe order.

Envelope, format 1 (msgpack array of exactly 7 items):
    [1, network: str, kind: str, version: int, signer: bin(32), body: bin, signature: bin(64)]

The signature is Ed25519 by `signer` over
    domain_tag(network, kind, version) || 0x00 || body
with domain_tag = "p2pfleet/<network>/<kind>/v<major>", so a signature never verifies as
another kind, another major version or on another network. `body` is kept as the exact
bytes that were signed; it is a msgpack map checked by the kind's strict schema.

`open_envelope` checks, in order: total size, envelope structure, network, kind and version
(unknown ones raise `Unsupported`: ignore, do not punish), the kind's body size cap, the
signature, then decodes the body under msgpack buffer limits and the schema, then expiry
and dating (given `now_ms`) and replay (given a dedup store; records and kinds that never
expire are not deduplicated here). Only `WireError` subclasses escape. Map keys in a body must be
unique strings; an envelope format newer than ours is unsupported, not invalid.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from ..identity import Identity, verify_signature
from . import errors as E
from .kinds import BY_CLASS, KINDS, KindSpec
from .schema import decode_struct, encode_struct

ENVELOPE_FORMAT = 1
MAX_ENVELOPE = 1024 * 1024  # hard cap on any message, before anything else is looked at
MAX_CLOCK_SKEW_MS = 30_000
MIN_RECORD_LIFETIME_MS = 10 * MAX_CLOCK_SKEW_MS
ENVELOPE_ITEMS = 7
MAX_OUTER_ITEMS = 16  # read a future format far enough to see its number
MAX_NETWORK_LEN = 32
MAX_KIND_LEN = 32
BODY_MAP_MAX = 32  # no kind has more fields
BODY_ARRAY_MAX = 256  # the largest list any schema allows
BODY_STR_MAX = 1024  # bytes: 256 characters of UTF-8
# containers (arrays, maps, the body map included) nested in a body: msgpack's C decoder
# stops beyond this (StackError); no valid body nests more than 4 (vectors body-nested-*)
BODY_NEST_MAX = 1024
KEEP_UNTIL_MAX = 2**63 - 1  # dedup stores keep times as signed 64-bit integers


class DedupStore(Protocol):
    def remember(self, msg_id: bytes, keep_until_ms: int | None, now_ms: int) -> bool:
        """Record msg_id; return False if it was already there (a replay)."""


def domain_tag(network: str, kind: str, major: int) -> bytes:
    return f"p2pfleet/{network}/{kind}/v{major}".encode()


def signed_bytes(network: str, kind: str, major: int, body: bytes) -> bytes:
    return domain_tag(network, kind, major) + b"\x00" + body


def message_id(network: str, kind: str, major: int, signer: bytes, body: bytes) -> bytes:
    """What dedup remembers: the signed content and its signer (not the signature bytes)."""
    return hashlib.sha256(signer + signed_bytes(network, kind, major, body)).digest()


@dataclass(frozen=True)
class Opened:
    """A verified, decoded envelope."""

    network: str
    kind: str
    version: int
    signer: bytes
    body: Any
    body_bytes: bytes
    signature: bytes
    raw: bytes

    @property
    def msg_id(self) -> bytes:
        return message_id(self.network, self.kind, self.version, self.signer, self.body_bytes)


def encode_body(body: Any) -> bytes:
    return msgpack.packb(encode_struct(body), use_bin_type=True)


def seal(body: Any, identity: Identity, network: str) -> bytes:
    """Sign `body` (a registered kind's dataclass) as `identity` for `network`."""
    spec = BY_CLASS.get(type(body))
    if spec is None:
        raise TypeError(f"{type(body).__name__} is not a registered wire kind")
    body_bytes = encode_body(body)
    if len(body_bytes) > spec.max_body:
        raise ValueError(f"{spec.name} body is {len(body_bytes)} bytes, cap {spec.max_body}")
    sig = identity.sign(signed_bytes(network, spec.name, spec.major, body_bytes))
    return pack_envelope(network, spec.name, spec.major, identity.public_key, body_bytes, sig)


def pack_envelope(network: str, kind: str, version: int, signer: bytes, body: bytes,
                  signature: bytes) -> bytes:
    return msgpack.packb([ENVELOPE_FORMAT, network, kind, version, signer, body, signature],
                         use_bin_type=True)


def _unpack_outer(data: Any) -> list:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise E.MalformedEnvelope("envelope", f"expected bytes, got {type(data).__name__}")
    if len(data) > MAX_ENVELOPE:
        raise E.Oversized("envelope", f"{len(data)} bytes, cap {MAX_ENVELOPE}")
    try:
        outer = msgpack.unpackb(
            bytes(data), raw=False, strict_map_key=True, use_list=True,
            max_str_len=max(MAX_NETWORK_LEN, MAX_KIND_LEN),
            max_bin_len=MAX_ENVELOPE, max_array_len=MAX_OUTER_ITEMS, max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise E.MalformedEnvelope("envelope", f"not a msgpack envelope ({type(exc).__name__})") from None
    if type(outer) is not list or not outer or type(outer[0]) is not int or outer[0] < 1:
        raise E.MalformedEnvelope("envelope", "expected an array starting with a format number")
    if outer[0] > ENVELOPE_FORMAT:
        raise E.UnsupportedVersion("format", f"envelope format {outer[0]}; this node reads "
                                             f"format {ENVELOPE_FORMAT}")
    if len(outer) != ENVELOPE_ITEMS:
        raise E.MalformedEnvelope("envelope", f"expected an array of {ENVELOPE_ITEMS} items")
    fmt, network, kind, version, signer, body, sig = outer
    checks = (
        ("network", type(network) is str, "must be a string"),
        ("kind", type(kind) is str, "must be a string"),
        ("version", type(version) is int and version >= 1, "must be an integer >= 1"),
        ("signer", type(signer) is bytes and len(signer) == 32, "must be 32 bytes"),
        ("body", type(body) is bytes, "must be bytes"),
        ("signature", type(sig) is bytes and len(sig) == 64, "must be 64 bytes"),
    )
    for name, ok, why in checks:
        if not ok:
            raise E.MalformedEnvelope(name, why)
    return outer


class _BadMap(Exception):
    pass


def _strict_map(pairs: list[tuple[Any, Any]]) -> dict:
    """Map keys must be strings and unique: a decoder that kept the first or the last of
    two equal keys would disagree with another about what was signed."""
    out: dict = {}
    for key, value in pairs:
        if type(key) is not str:
            raise _BadMap(f"map key {key!r:.40} is not a string")
        if key in out:
            raise _BadMap(f"duplicate map key {key!r:.40}")
        out[key] = value
    return out


def _decode_body(spec: KindSpec, body: bytes) -> Any:
    try:
        value = msgpack.unpackb(
            body, raw=False, strict_map_key=False, object_pairs_hook=_strict_map, use_list=True,
            max_str_len=BODY_STR_MAX, max_bin_len=spec.max_body,
            max_array_len=BODY_ARRAY_MAX, max_map_len=BODY_MAP_MAX, max_ext_len=0,
        )
    except _BadMap as exc:
        raise E.InvalidBody("body", str(exc)) from None
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise E.InvalidBody("body", f"not a msgpack value within limits ({type(exc).__name__})") from None
    try:
        return decode_struct(spec.cls, value, "body")
    except E.WireError:
        raise
    except RecursionError:
        raise E.InvalidBody("body", "nested too deeply") from None


def _check_lifetime(spec: KindSpec, body: Any, now_ms: int) -> None:
    if spec.dated and body.at > now_ms + MAX_CLOCK_SKEW_MS:
        raise E.NotYetValid("body.at", f"dated {body.at}, now {now_ms} "
                                       f"(skew allowed {MAX_CLOCK_SKEW_MS} ms)")
    exp = getattr(body, "exp", None)
    if spec.max_lifetime_ms is None or exp is None:
        return
    if exp + MAX_CLOCK_SKEW_MS < now_ms:
        raise E.Expired("body.exp", f"expired at {exp}, now {now_ms} (skew allowed {MAX_CLOCK_SKEW_MS} ms)")
    if exp - now_ms > spec.max_lifetime_ms + MAX_CLOCK_SKEW_MS:
        raise E.Expired("body.exp", f"lives {exp - now_ms} ms, longer than the {spec.name} "
                                    f"limit of {spec.max_lifetime_ms} ms")


def open_envelope(data: bytes, network: str, *, now_ms: int | None = None,
                  dedup: DedupStore | None = None, kinds: set[str] | None = None) -> Opened:
    """Verify and decode untrusted bytes. Raises only `WireError` subclasses.

    `kinds` restricts which kinds this caller accepts (others: `UnsupportedKind`).
    Expiry is checked when `now_ms` is given; replays when `dedup` is given too.
    """
    fmt, net, kind, version, signer, body_bytes, sig = _unpack_outer(data)
    if net != network:
        raise E.WrongNetwork("network", f"message is for network {net!r}, this is {network!r}")
    spec = KINDS.get(kind)
    if spec is None or (kinds is not None and kind not in kinds):
        raise E.UnsupportedKind("kind", f"{kind!r} is not a kind accepted here")
    if version != spec.major:
        raise E.UnsupportedVersion("version", f"{kind} v{version}; this node speaks v{spec.major}")
    if len(body_bytes) > spec.max_body:
        raise E.Oversized("body", f"{kind} body is {len(body_bytes)} bytes, cap {spec.max_body}")
    if not verify_signature(signer, signed_bytes(network, kind, version, body_bytes), sig):
        raise E.BadSignature("signature", f"does not verify for {kind} v{version} on {network!r}")
    body = _decode_body(spec, body_bytes)
    opened = Opened(network, kind, version, signer, body, body_bytes, sig, bytes(data))
    if now_ms is not None:
        _check_lifetime(spec, body, now_ms)
        # Kinds kept as proof (no expiry) are not remembered here: anyone can mint them
        # with fresh keys, so the dedup table would grow without bound. Their stores are
        # idempotent instead (a receipt per lease, a rotation per key).
        # Records are ordered by sequence number instead: the same record arriving again
        # (from the DHT, by gossip) is normal, not a replay.
        if dedup is not None and spec.max_lifetime_ms is not None and not spec.record:
            # Clamped to a signed 64-bit integer (SQLite INTEGER): exp may be up to 2**64-1.
            keep = min(body.exp + MAX_CLOCK_SKEW_MS, KEEP_UNTIL_MAX)
            if not dedup.remember(opened.msg_id, keep, now_ms):
                raise E.Replay("envelope", f"{kind} {opened.msg_id.hex()[:16]} was seen before")
    elif dedup is not None:
        raise TypeError("replay checks need now_ms")
    return opened
