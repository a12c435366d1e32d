#!/usr/bin/env python3
"""Standalone checker of the p2pfleet test vectors, written from protocol/ alone.

    python3 protocol/check_vectors.py [protocol-dir]

It does not import p2pfleet: only the Python standard library, msgpack and PyNaCl. It reads
names.json (limits, envelope format, domain tag, rotation rule, peer id rule, and per kind
the replay rule `replay_check`: only "message-id" kinds go through the replay store),
schemas/envelope.json and schemas/<kind>.v<major>.json (body schemas; size caps, lifetimes
and dating field in "x-p2pfleet", which must agree with names.json),
implements the envelope checks in the order of README.md with a minimal JSON Schema
validator for exactly the subset the generator emits, and runs every vector of
vectors/valid.json and vectors/invalid.json. It prints a summary and exits 1 listing each
mismatch (2 if the folder cannot be read).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import msgpack
import nacl.exceptions
import nacl.signing


class Reject(Exception):
    """The envelope is refused with an error code naming a field."""

    def __init__(self, code: str, field: str, reason: str):
        super().__init__(f"{code} at {field}: {reason}")
        self.code, self.field, self.reason = code, field, reason


class SchemaError(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


# ----------------------------------------------------------------------------------------------
# the JSON Schema subset: type (with x-msgpack bin), properties, required,
# additionalProperties false, minimum/maximum, minLength/maxLength, pattern, enum, const,
# items, prefixItems, minItems/maxItems, anyOf (with null)

_EXACT_FLOAT_INT = 2**53
_pattern_cache: dict[str, re.Pattern] = {}


def _pattern(p: str) -> re.Pattern:
    """ECMA-262 semantics for our patterns: `$` is the end of the string (Python: \\Z)."""
    if p not in _pattern_cache:
        py = p[:-1] + r"\Z" if p.endswith("$") and not p.endswith("\\$") else p
        _pattern_cache[p] = re.compile(py)
    return _pattern_cache[p]


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is not an int on the wire


def validate(schema: Any, value: Any, path: str) -> Any:
    """Check `value` (as msgpack decoded it); return it normalised (ints in number fields
    become floats). Raise SchemaError(path, reason) at the first fault."""
    if schema is True:
        return value
    if schema is False:
        raise SchemaError(path, "not allowed")
    if "anyOf" in schema:
        branches = schema["anyOf"]
        if value is None and any(b.get("type") == "null" for b in branches):
            return None
        error: SchemaError | None = None
        for branch in branches:
            if branch.get("type") == "null":
                continue
            try:
                return validate(branch, value, path)
            except SchemaError as exc:
                error = error or exc
        raise error or SchemaError(path, "matches no alternative")
    kind = schema.get("type")
    if kind == "object":
        value = _object(schema, value, path)
    elif kind == "array":
        value = _array(schema, value, path)
    elif kind == "string" and schema.get("x-msgpack") == "bin":
        if type(value) is not bytes:
            raise SchemaError(path, f"expected bin, got {type(value).__name__}")
        _length(schema, len(value), path, "bytes")
    elif kind == "string":
        if type(value) is not str:
            raise SchemaError(path, f"expected str, got {type(value).__name__}")
        _length(schema, len(value), path, "characters")
        if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
            raise SchemaError(path, f"{value!r} does not match {schema['pattern']}")
    elif kind == "integer":
        if not _is_int(value):
            raise SchemaError(path, f"expected an integer, got {type(value).__name__}")
        _range(schema, value, path)
    elif kind == "number":
        if _is_int(value):
            if abs(value) > _EXACT_FLOAT_INT:
                raise SchemaError(path, "integer too large to be exactly a double")
            value = float(value)
        if type(value) is not float:
            raise SchemaError(path, f"expected a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise SchemaError(path, "number is not finite")
        _range(schema, value, path)
    elif kind == "boolean":
        if type(value) is not bool:
            raise SchemaError(path, f"expected a boolean, got {type(value).__name__}")
    elif kind == "null":
        if value is not None:
            raise SchemaError(path, "expected nil")
    elif kind is not None:
        raise SchemaError(path, f"schema type {kind!r} is outside the supported subset")
    if "enum" in schema and not any(type(value) is type(e) and value == e for e in schema["enum"]):
        raise SchemaError(path, f"{value!r} is not one of {schema['enum']}")
    if "const" in schema and not (type(value) is type(schema["const"]) and value == schema["const"]):
        raise SchemaError(path, f"must be {schema['const']!r}")
    return value


def _length(schema: dict, n: int, path: str, unit: str) -> None:
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    if n < lo or (hi is not None and n > hi):
        raise SchemaError(path, f"{n} {unit} outside [{lo}, {hi}]")


def _range(schema: dict, v: Any, path: str) -> None:
    if "minimum" in schema and v < schema["minimum"]:
        raise SchemaError(path, f"{v} below {schema['minimum']}")
    if "maximum" in schema and v > schema["maximum"]:
        raise SchemaError(path, f"{v} above {schema['maximum']}")


def _object(schema: dict, value: Any, path: str) -> dict:
    if type(value) is not dict:
        raise SchemaError(path, f"expected a map, got {type(value).__name__}")
    props = schema.get("properties", {})
    for key in value:  # wire order
        if type(key) is not str:
            raise SchemaError(path, f"map key {key!r} is not a str")
        if key not in props and schema.get("additionalProperties", True) is False:
            raise SchemaError(f"{path}.{key}", "unknown field")
    out = {}
    for name in schema.get("required", []):  # declaration order
        if name not in value:
            raise SchemaError(f"{path}.{name}", "missing field")
        out[name] = validate(props.get(name, True), value[name], f"{path}.{name}")
    for key in value:
        if key not in out:
            out[key] = validate(props.get(key, True), value[key], f"{path}.{key}")
    return out


def _array(schema: dict, value: Any, path: str) -> list:
    if type(value) is not list:
        raise SchemaError(path, f"expected an array, got {type(value).__name__}")
    lo, hi = schema.get("minItems", 0), schema.get("maxItems")
    if len(value) < lo or (hi is not None and len(value) > hi):
        raise SchemaError(path, f"{len(value)} items outside [{lo}, {hi}]")
    prefix = schema.get("prefixItems", [])
    rest = schema.get("items", True)
    return [validate(prefix[i] if i < len(prefix) else rest, v, f"{path}[{i}]")
            for i, v in enumerate(value)]


# ----------------------------------------------------------------------------------------------
# the protocol


class BadMapKey(Exception):
    pass


def strict_map(pairs: list) -> dict:
    """Body maps, at any depth: str keys only, each at most once (README, step 7a)."""
    out: dict = {}
    for key, value in pairs:
        if type(key) is not str:
            raise BadMapKey(f"map key {key!r:.40} is not a str")
        if key in out:
            raise BadMapKey(f"duplicate map key {key!r:.40}")
        out[key] = value
    return out


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def base58btc(data: bytes) -> str:
    n = int.from_bytes(data, "big")
    out = ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(data) - len(data.lstrip(b"\x00"))) + out


def verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        return False
    return True


REPLAY_CHECKS = ("message-id", "sequence", "store")  # README: Kinds


class Protocol:
    """The rules of protocol/, read from its files."""

    def __init__(self, root: Path):
        self.root = root
        self.names = json.loads((root / "names.json").read_text(encoding="utf-8"))
        self.limits = self.names["limits"]
        self.envelope = json.loads((root / "schemas" / "envelope.json").read_text(encoding="utf-8"))
        self.kinds: dict[str, dict[int, dict]] = {}
        for path in sorted((root / "schemas").glob("*.v*.json")):
            schema = json.loads(path.read_text(encoding="utf-8"))
            ann = schema["x-p2pfleet"]
            if path.name != f"{ann['kind']}.v{ann['major']}.json":
                raise ValueError(f"{path.name} annotates kind {ann['kind']} v{ann['major']}")
            self.kinds.setdefault(ann["kind"], {})[ann["major"]] = schema
        # How repeats are recognised, per kind: from names.json (README, step 9).
        self.replay_check: dict[str, str] = {}
        for kind, entry in self.names["kinds"].items():
            if entry["replay_check"] not in REPLAY_CHECKS:
                raise ValueError(f"names.json kinds.{kind}: unknown replay_check "
                                 f"{entry['replay_check']!r}")
            self.replay_check[kind] = entry["replay_check"]

    def domain_tag(self, network: str, kind: str, major: int) -> bytes:
        fmt = self.names["domain_tag"]["format"]
        return fmt.format(network=network, kind=kind, major=major).encode("utf-8")

    def signed_bytes(self, network: str, kind: str, major: int, body: bytes) -> bytes:
        sep = bytes.fromhex(self.names["signing"]["separator_hex"])
        return self.domain_tag(network, kind, major) + sep + body

    def peer_id(self, public_key: bytes) -> str:
        proto = bytes.fromhex("08011220") + public_key
        return base58btc(bytes([0x00, len(proto)]) + proto)

    # -- opening ---------------------------------------------------------------------------

    def open(self, data: bytes, network: str, now_ms: int, seen: set[bytes] | None = None) -> dict:
        """Open untrusted bytes; return the decoded fields or raise Reject."""
        lim = self.limits
        # 1. size
        if len(data) > lim["max_envelope_bytes"]:
            raise Reject("oversized", "envelope", f"{len(data)} bytes")
        # 2a. structure, within the envelope decoding limits
        try:
            outer = msgpack.unpackb(
                data, raw=False, strict_map_key=True, use_list=True,
                max_str_len=lim["envelope_str_max_bytes"], max_bin_len=lim["max_envelope_bytes"],
                max_array_len=lim["envelope_array_max_items"], max_map_len=0, max_ext_len=0)
        except Exception as exc:
            raise Reject("malformed-envelope", "envelope", f"not msgpack ({type(exc).__name__})")
        # 2b. an array starting with a format number >= 1
        if type(outer) is not list or not outer or not _is_int(outer[0]) or outer[0] < 1:
            raise Reject("malformed-envelope", "envelope", "not an array starting with a format")
        # 2c. a newer envelope format: unsupported (ignore), before the item count
        fmt = self.names["envelope"]["format"]
        if outer[0] > fmt:
            raise Reject("unsupported-version", "format", f"format {outer[0]}, we read {fmt}")
        # 2d. the item count of our format
        n_items = self.names["envelope"]["item_count"]
        if len(outer) != n_items:
            raise Reject("malformed-envelope", "envelope", f"not an array of {n_items} items")
        # 2e. the items' types
        for item_schema, value in zip(self.envelope["prefixItems"], outer):
            try:
                validate(item_schema, value, item_schema["title"])
            except SchemaError as exc:
                raise Reject("malformed-envelope", exc.path, exc.reason) from None
        _fmt, net, kind, version, signer, body, sig = outer
        # 3. network
        if net != network:
            raise Reject("wrong-network", "network", f"{net!r} is not {network!r}")
        # 4. kind and version
        if kind not in self.kinds:
            raise Reject("unsupported-kind", "kind", repr(kind))
        schema = self.kinds[kind].get(version)
        if schema is None:
            raise Reject("unsupported-version", "version", f"{kind} v{version}")
        ann = schema["x-p2pfleet"]
        # 5. body cap
        if len(body) > ann["max_body"]:
            raise Reject("oversized", "body", f"{len(body)} bytes, cap {ann['max_body']}")
        # 6. signature
        if not verify(signer, self.signed_bytes(net, kind, version, body), sig):
            raise Reject("bad-signature", "signature", "does not verify")
        # 7. body: msgpack within limits with unique str map keys, then the schema
        try:
            value = msgpack.unpackb(
                body, raw=False, strict_map_key=False, object_pairs_hook=strict_map,
                use_list=True, max_str_len=lim["body_str_max_bytes"], max_bin_len=ann["max_body"],
                max_array_len=lim["body_array_max_items"], max_map_len=lim["body_map_max_entries"],
                max_ext_len=0)
        except BadMapKey as exc:
            raise Reject("invalid-body", "body", str(exc)) from None
        except Exception as exc:
            raise Reject("invalid-body", "body", f"not msgpack within limits ({type(exc).__name__})")
        try:
            decoded = validate(schema, value, "body")
        except SchemaError as exc:
            raise Reject("invalid-body", exc.path, exc.reason) from None
        skew = lim["max_clock_skew_ms"]
        # 8a. dating
        dated_by = ann["dated_by"]
        if dated_by is not None and decoded[dated_by] > now_ms + skew:
            raise Reject("not-yet-valid", f"body.{dated_by}",
                         f"dated {decoded[dated_by]}, now {now_ms}")
        # 8b. expiry
        life = ann["max_lifetime_ms"]
        if life is not None:
            exp = decoded["exp"]
            if exp + skew < now_ms:
                raise Reject("expired", "body.exp", f"expired at {exp}, now {now_ms}")
            if exp - now_ms > life + skew:
                raise Reject("expired", "body.exp", f"lives {exp - now_ms} ms, limit {life}")
        # 9. replay, only for kinds deduplicated by message id (records are ordered by
        # sequence number, kinds that never expire by their idempotent stores)
        tag_and_body = self.signed_bytes(net, kind, version, body)
        msg_id = hashlib.sha256(signer + tag_and_body).digest()
        if seen is not None and self.replay_check.get(kind) == "message-id":
            if msg_id in seen:
                raise Reject("replay", "envelope", msg_id.hex()[:16])
            seen.add(msg_id)
        # 10. kind-specific semantics
        if kind == "key_rotation":
            self.check_rotation(net, signer, decoded)
        return {"kind": kind, "version": version, "signer": signer.hex(),
                "body": to_json(decoded), "msg_id": msg_id.hex()}

    def check_rotation(self, network: str, old_key: bytes, body: dict) -> None:
        if body["new_key"] == old_key:
            raise Reject("invalid-body", "body.new_key", "names the signing key itself")
        tag = self.names["key_rotation"]["acceptance_tag_format"].format(network=network).encode()
        message = tag + b"\x00" + old_key + body["new_key"] + body["at"].to_bytes(8, "big")
        if not verify(body["new_key"], message, body["new_key_sig"]):
            raise Reject("bad-signature", "body.new_key_sig", "not countersigned by the new key")


def to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# running the vectors


def vector_bytes(vec: dict) -> bytes:
    """A vector's (or step's) bytes: "hex", or "hex_repeat" (prefix || byte * count || suffix)."""
    if "hex" in vec:
        return bytes.fromhex(vec["hex"])
    r = vec["hex_repeat"]
    byte = bytes.fromhex(r["byte"])
    if len(byte) != 1 or type(r["count"]) is not int or r["count"] < 0:
        raise ValueError(f"bad hex_repeat in {vec.get('name', 'a step')}")
    return bytes.fromhex(r["prefix"]) + byte * r["count"] + bytes.fromhex(r["suffix"])


def outcome(proto: Protocol, vec: dict, network: str, now_ms: int, seen: set | None = None):
    try:
        return "ok", None, proto.open(vector_bytes(vec), network, now_ms, seen)
    except Reject as exc:
        return exc.code, exc.field, None


def check_names(proto: Protocol) -> list[str]:
    problems = []
    names = proto.names
    ex = names["examples"]
    pk = bytes.fromhex(ex["peer"]["public_key"])
    if proto.peer_id(pk) != ex["peer"]["peer_id"]:
        problems.append(f"names.json examples: peer id of {pk.hex()} is {proto.peer_id(pk)}")
    fill = {"network": ex["network"], "peer_id": ex["peer"]["peer_id"], "digest_hex": ex["digest_hex"]}
    for group in ("protocols", "topics", "dht_keys"):
        for key, template in names[group].items():
            if template.format(**fill) != ex[group].get(key):
                problems.append(f"names.json examples: {group}.{key} is not {template} filled in")
    if not _pattern(names["network"]["pattern"]).search(ex["network"]):
        problems.append("names.json examples: network does not match the pattern")
    for kind, entry in names["kinds"].items():
        schema = proto.kinds.get(kind, {}).get(entry["major"])
        if schema is None:
            problems.append(f"names.json kinds.{kind}: no schemas/{kind}.v{entry['major']}.json")
            continue
        ann = schema["x-p2pfleet"]
        for key in ("max_body", "max_lifetime_ms", "record", "dated_by", "replay_check"):
            if entry[key] != ann[key]:
                problems.append(f"names.json kinds.{kind}.{key} is {entry[key]!r}, the schema "
                                f"says {ann[key]!r}")
    for kind in proto.kinds:
        if kind not in names["kinds"]:
            problems.append(f"schemas: kind {kind} is not in names.json")
    return problems


def run(root: Path) -> tuple[int, list[str]]:
    proto = Protocol(root)
    problems = check_names(proto)
    count = 0
    for file_name, want_ok in (("valid.json", True), ("invalid.json", False)):
        doc = json.loads((root / "vectors" / file_name).read_text(encoding="utf-8"))
        for name, key in doc.get("keys", {}).items():
            seed = bytes.fromhex(key["seed"])
            if seed != hashlib.sha256(key["seed_label"].encode()).digest():
                problems.append(f"{file_name} keys.{name}: seed is not SHA-256 of its label")
            public = bytes(nacl.signing.SigningKey(seed).verify_key)
            if public.hex() != key["public_key"] or proto.peer_id(public) != key["peer_id"]:
                problems.append(f"{file_name} keys.{name}: public key or peer id does not match")
        for vec in doc["vectors"]:
            count += 1
            where = f"{file_name} {vec['name']}"
            if "steps" in vec:
                seen: set[bytes] = set()
                for i, step in enumerate(vec["steps"]):
                    code, field, _ = outcome(proto, step, vec["network"], vec["now_ms"], seen)
                    if (code, field) != (step["expect"], step.get("field")):
                        problems.append(f"{where} step {i}: got {code} at {field}, expected "
                                        f"{step['expect']} at {step.get('field')}")
                continue
            code, field, got = outcome(proto, vec, vec["network"], vec["now_ms"])
            if want_ok:
                if code != "ok":
                    problems.append(f"{where}: got {code} at {field}, expected ok")
                    continue
                for k in ("kind", "version", "signer", "body", "msg_id"):
                    if got[k] != vec[k]:
                        problems.append(f"{where}: decoded {k} is {json.dumps(got[k])[:200]}, "
                                        f"expected {json.dumps(vec[k])[:200]}")
            elif (code, field) != (vec["expect"], vec.get("field")):
                problems.append(f"{where}: got {code} at {field}, expected "
                                f"{vec['expect']} at {vec.get('field')}")
    return count, problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent
    try:
        count, problems = run(root)
    except (OSError, ValueError, KeyError) as exc:
        print(f"cannot read the protocol folder {root}: {type(exc).__name__}: {exc}")
        return 2
    for problem in problems:
        print(f"MISMATCH {problem}")
    kinds = len(Protocol(root).kinds)
    print(f"{count} vectors, {kinds} kinds: {len(problems)} mismatches"
          + ("" if problems else ", all as expected"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
