"""protocol/ agrees with the code: generated files, test vectors, standalone checker, names.

If a test here says protocol/ is out of date, run `make schemas` (tools/gen_protocol.py) and
review the diff: a changed vector is a changed wire protocol.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import msgpack
import pytest

from p2pfleet import names as N
from p2pfleet.store.state import NodeState
from p2pfleet.wire import envelope as env
from p2pfleet.wire import errors as E
from p2pfleet.wire import kinds as K
from p2pfleet.wire import schema as S
from p2pfleet.wire.rotation import check_rotation

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = ROOT / "protocol"
REGENERATE = "protocol/ is out of date: run `make schemas` (tools/gen_protocol.py) and review the diff"


@lru_cache(maxsize=1)
def generator():
    spec = importlib.util.spec_from_file_location("gen_protocol", ROOT / "tools" / "gen_protocol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=1)
def generated() -> dict[str, str]:
    return generator().generate()


def load(rel: str):
    return json.loads((PROTOCOL / rel).read_text(encoding="utf-8"))


def valid_vectors() -> list[dict]:
    return load("vectors/valid.json")["vectors"]


def invalid_vectors() -> list[dict]:
    return load("vectors/invalid.json")["vectors"]


def to_json(value):
    return generator().to_json(value)


def vector_bytes(vec: dict) -> bytes:
    """A vector's or step's bytes, from "hex" or the compact "hex_repeat"."""
    return generator().vector_bytes(vec)


# (a) generated files ---------------------------------------------------------------------------


def test_generated_files_match_disk():
    files = generated()
    for rel, text in files.items():
        path = ROOT / rel
        assert path.exists(), f"{rel} is missing. {REGENERATE}"
        assert path.read_text(encoding="utf-8") == text, f"{rel} differs. {REGENERATE}"
    assert generator().stale_files(files) == [], f"stale files in protocol/. {REGENERATE}"


def test_generation_is_deterministic():
    again = generator().generate()
    assert again == generated()


# (b) every vector through p2pfleet's own decoder -------------------------------------------------


def p2pfleet_open(vec: dict, network: str, now_ms: int, dedup=None):
    try:
        opened = env.open_envelope(vector_bytes(vec), network, now_ms=now_ms, dedup=dedup)
        if opened.kind == "key_rotation":
            check_rotation(opened)
    except E.WireError as exc:
        return exc.code, exc.field, None
    return "ok", None, opened


@pytest.mark.parametrize("vec", valid_vectors(), ids=lambda v: v["name"])
def test_valid_vector_opens_to_recorded_fields(vec):
    code, field, opened = p2pfleet_open(vec, vec["network"], vec["now_ms"])
    assert (code, field) == ("ok", None)
    assert vec["expect"] == "ok"
    assert opened.kind == vec["kind"]
    assert opened.version == vec["version"]
    assert opened.signer.hex() == vec["signer"]
    assert opened.msg_id.hex() == vec["msg_id"]
    assert to_json(opened.body) == vec["body"]


@pytest.mark.parametrize("vec", invalid_vectors(), ids=lambda v: v["name"])
def test_invalid_vector_is_refused_with_code_and_field(vec, tmp_path):
    if "steps" in vec:
        with NodeState(tmp_path / "state.db") as dedup:
            got = [p2pfleet_open(s, vec["network"], vec["now_ms"], dedup)[:2]
                   for s in vec["steps"]]
        assert got == [(s["expect"], s["field"]) for s in vec["steps"]]
        return
    assert p2pfleet_open(vec, vec["network"], vec["now_ms"])[:2] == (vec["expect"], vec["field"])


def _step_kind(step: dict) -> str:
    return generator().outer_items(vector_bytes(step))[2]


def replay_check(spec: K.KindSpec) -> str:
    """The rule, written independently of the generator: open_envelope deduplicates by
    message id only kinds that expire and are not records."""
    if spec.max_lifetime_ms is None:
        return "store"
    return "sequence" if spec.record else "message-id"


def _opened_twice(sequences) -> set[str]:
    """Kinds of which some sequence vector opens the very same bytes twice, both accepted."""
    twice = set()
    for vec in sequences:
        opened = [vector_bytes(s) for s in vec["steps"] if s["expect"] == "ok"]
        twice |= {_step_kind(s) for s in vec["steps"] if opened.count(vector_bytes(s)) > 1}
    return twice


def test_sequence_vectors_include_replay():
    sequences = [v for v in invalid_vectors() if "steps" in v]
    assert any([s["expect"] for s in v["steps"]] == ["ok", "replay"] for v in sequences)


def test_replay_vectors_use_expiring_non_record_kinds():
    """open_envelope deduplicates only kinds that expire and are not records; a replay of
    another kind is a bug."""
    replayed = set()
    for vec in invalid_vectors():
        for step in vec.get("steps", []):
            if step["expect"] == "replay":
                spec = K.KINDS[_step_kind(step)]
                assert spec.max_lifetime_ms is not None and not spec.record, vec["name"]
                replayed.add(spec.name)
    assert replayed


def test_records_twice_are_not_replays():
    """A record arriving again (DHT, gossip) is ordered by sequence number, not refused."""
    sequences = {v["name"]: v for v in invalid_vectors() if "steps" in v}
    steps = sequences["replay-record"]["steps"]
    assert [s["expect"] for s in steps] == ["ok", "ok"]
    assert steps[0] == steps[1] and _step_kind(steps[0]) == "capacity"
    records = {n for n, spec in K.KINDS.items() if spec.record}
    twice = _opened_twice(sequences.values())
    assert records <= twice, f"record kinds without an opened-twice vector: {records - twice}"


def test_receipt_twice_is_not_a_replay():
    sequences = {v["name"]: v for v in invalid_vectors() if "steps" in v}
    steps = sequences["receipt-twice-not-deduplicated"]["steps"]
    assert [s["expect"] for s in steps] == ["ok", "ok"]
    assert steps[0] == steps[1] and _step_kind(steps[0]) == "receipt"
    never = {n for n, spec in K.KINDS.items() if spec.max_lifetime_ms is None}
    twice = _opened_twice(sequences.values())
    assert never <= twice, f"kinds that never expire without an opened-twice vector: {never - twice}"


NEW_RULE_VECTORS = {
    # envelope formats: newer -> ignore (unsupported-version at format); broken -> malformed
    "format-2-7-items": ("unsupported-version", "format"),
    "format-2-9-items": ("unsupported-version", "format"),
    "format-2-16-items": ("unsupported-version", "format"),
    "format-2-17-items": ("malformed-envelope", "envelope"),
    "format-0": ("malformed-envelope", "envelope"),
    "format-float": ("malformed-envelope", "envelope"),
    "empty-array": ("malformed-envelope", "envelope"),
    # body map keys
    "duplicate-key": ("invalid-body", "body"),
    "nested-duplicate-key": ("invalid-body", "body"),
    "body-int-key": ("invalid-body", "body"),
    "body-bin-key": ("invalid-body", "body"),
    "nested-int-key": ("invalid-body", "body"),
    # dating
    "receipt-not-yet-valid": ("not-yet-valid", "body.at"),
    "evidence-not-yet-valid": ("not-yet-valid", "body.at"),
    "key_rotation-not-yet-valid": ("not-yet-valid", "body.at"),
}


def test_vectors_for_the_wire_rules():
    invalid = {v["name"]: v for v in invalid_vectors()}
    for name, want in NEW_RULE_VECTORS.items():
        assert (invalid[name]["expect"], invalid[name]["field"]) == want, name
    valid = {v["name"] for v in valid_vectors()}
    for kind in ("receipt", "evidence", "key_rotation"):
        assert f"{kind}-dated-at-skew-limit" in valid
    pairs = {(v["expect"], v["field"]) for v in invalid_vectors() if "expect" in v}
    for unsupported in (("unsupported-kind", "kind"), ("unsupported-version", "version"),
                        ("unsupported-version", "format")):
        assert unsupported in pairs


def test_dated_vectors_sit_on_the_skew_boundary():
    skew = env.MAX_CLOCK_SKEW_MS
    for vec in valid_vectors():
        if vec["name"].endswith("-dated-at-skew-limit"):
            assert vec["body"]["at"] == vec["now_ms"] + skew
    for vec in invalid_vectors():
        if vec.get("expect") == "not-yet-valid":
            assert vec["now_ms"] + skew < p2pfleet_body_at(vec) <= vec["now_ms"] + skew + 1_000


def p2pfleet_body_at(vec: dict) -> int:
    body = generator().outer_items(vector_bytes(vec))[5]
    return msgpack.unpackb(body, raw=False)["at"]


def test_large_vectors_are_stored_compactly():
    """The 1 MiB oversized envelope is stored as hex_repeat, not 2 MiB of hex."""
    assert (PROTOCOL / "vectors" / "invalid.json").stat().st_size < 512 * 1024
    vec = next(v for v in invalid_vectors() if v["name"] == "oversized-envelope")
    assert "hex" not in vec and vec["hex_repeat"]["count"] > 1024 * 1000
    assert len(vector_bytes(vec)) == env.MAX_ENVELOPE + 1
    data = b"ab" + b"\x00" * 5000 + b"c" + b"\x07" * 6000 + b"d"
    stored = generator().hex_fields(data)
    assert stored["hex_repeat"]["byte"] == "07" and vector_bytes(stored) == data
    assert generator().hex_fields(b"\x00" * 100) == {"hex": "00" * 100}


# (c) the standalone checker ----------------------------------------------------------------------


def test_standalone_checker_passes():
    proc = subprocess.run([sys.executable, str(PROTOCOL / "check_vectors.py"), str(PROTOCOL)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 mismatches" in proc.stdout


def test_standalone_checker_does_not_import_p2pfleet():
    tree = ast.parse((PROTOCOL / "check_vectors.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported - set(sys.stdlib_module_names) <= {"msgpack", "nacl", "__future__"}


def test_standalone_checker_reports_mismatches(tmp_path):
    copy = tmp_path / "protocol"
    shutil.copytree(PROTOCOL, copy, ignore=shutil.ignore_patterns("__pycache__"))
    doc = json.loads((copy / "vectors" / "invalid.json").read_text(encoding="utf-8"))
    flipped = next(v for v in doc["vectors"] if v["name"] == "unknown-field")
    flipped["field"] = "body.other"
    shrunk = next(v for v in doc["vectors"] if v["name"] == "oversized-envelope")
    shrunk["hex_repeat"]["count"] -= 1  # now exactly at the cap: opened further
    (copy / "vectors" / "invalid.json").write_text(json.dumps(doc), encoding="utf-8")
    schema = json.loads((copy / "schemas" / "capacity.v1.json").read_text(encoding="utf-8"))
    schema["properties"]["cores"]["maximum"] = 2  # the valid capacity vectors have 4 cores
    (copy / "schemas" / "capacity.v1.json").write_text(json.dumps(schema), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(copy / "check_vectors.py"), str(copy)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "invalid.json unknown-field" in proc.stdout
    assert "invalid.json oversized-envelope" in proc.stdout
    assert "valid.json capacity:" in proc.stdout


def test_standalone_checker_takes_replay_rules_from_names_json(tmp_path):
    """The checker deduplicates exactly the kinds names.json marks "message-id": marking
    capacity so makes the replay-record vector fail, and the schema disagreement is reported."""
    copy = tmp_path / "protocol"
    shutil.copytree(PROTOCOL, copy, ignore=shutil.ignore_patterns("__pycache__"))
    names = json.loads((copy / "names.json").read_text(encoding="utf-8"))
    assert names["kinds"]["capacity"]["replay_check"] == "sequence"
    names["kinds"]["capacity"]["replay_check"] = "message-id"
    (copy / "names.json").write_text(json.dumps(names), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(copy / "check_vectors.py"), str(copy)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "invalid.json replay-record step 1: got replay at envelope" in proc.stdout
    assert "names.json kinds.capacity.replay_check" in proc.stdout


# (d) coverage: kinds, schemas, error codes -------------------------------------------------------


def test_every_kind_has_a_schema_and_a_valid_vector():
    covered = {v["kind"] for v in valid_vectors()}
    for name, spec in K.KINDS.items():
        schema = load(f"schemas/{name}.v{spec.major}.json")
        assert schema["x-p2pfleet"] == {
            "kind": name, "major": spec.major, "max_body": spec.max_body,
            "max_lifetime_ms": spec.max_lifetime_ms, "record": spec.record,
            "dated_by": "at" if "at" in {f.name for f in S._fields(spec.cls)} else None,
            "replay_check": replay_check(spec),
            "domain_tag": f"p2pfleet/{{network}}/{name}/v{spec.major}",
        }
        names_entry = load("names.json")["kinds"][name]
        for key in ("max_body", "max_lifetime_ms", "record", "dated_by", "replay_check"):
            assert names_entry[key] == schema["x-p2pfleet"][key], (name, key)
        assert name in covered, f"kind {name} has no valid vector"


def _raised_error_classes(path: Path, functions: set[str] | None = None) -> set[str]:
    """Names of `E.<Class>` raised in a module (optionally only in some functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    scopes = [tree] if functions is None else [
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in functions]
    found = set()
    for scope in scopes:
        for node in ast.walk(scope):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                        and func.value.id == "E":
                    found.add(func.attr)
    return found


def test_every_error_open_envelope_raises_has_a_vector():
    wire = ROOT / "p2pfleet" / "wire"
    raised = _raised_error_classes(wire / "envelope.py")
    raised |= _raised_error_classes(wire / "rotation.py", {"check_rotation"})
    by_name = {cls.__name__: cls for cls in E.ALL_ERRORS}
    assert raised <= set(by_name), f"raised but not in ALL_ERRORS: {raised - set(by_name)}"
    # decode_struct and the wire types raise InvalidBody for the schema checks
    raised.add("InvalidBody")
    codes = {v["expect"] for v in invalid_vectors() if "expect" in v}
    codes |= {s["expect"] for v in invalid_vectors() for s in v.get("steps", [])}
    missing = {by_name[n].code for n in raised} - codes
    assert not missing, f"error codes without an invalid vector: {sorted(missing)}"
    assert codes - {"ok"} <= {cls.code for cls in E.ALL_ERRORS}


ERROR_ACTIONS = {
    # (punish, unsupported): the action protocol/ documents
    (False, True): "ignore",
    (False, False): "drop, do not penalise",
    (True, False): "drop and penalise the deliverer",
}


def test_every_error_code_is_documented():
    readme = (PROTOCOL / "README.md").read_text(encoding="utf-8")
    names = load("names.json")
    assert set(names["errors"]) == {cls.code for cls in E.ALL_ERRORS}
    for cls in E.ALL_ERRORS:
        assert f"`{cls.code}`" in readme
        entry = names["errors"][cls.code]
        action = ERROR_ACTIONS[(cls.punish, issubclass(cls, E.Unsupported))]
        assert entry["action"] == action, cls.code
        assert entry["punish"] is cls.punish, cls.code
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{cls.code}` |"))
        assert row.split(" | ")[1] == action, cls.code


def test_error_actions_follow_the_wire_rules():
    """Unsupported: ignore; replays and stale records: drop without a penalty (honest peers
    resend and re-gossip); everything else: drop and penalise."""
    for cls in E.ALL_ERRORS:
        unpunished = issubclass(cls, (E.Unsupported, E.Replay, E.StaleRecord))
        assert cls.punish is not unpunished, cls.code


def _wire_types(w):
    yield w
    for inner in (getattr(w, "inner", None), getattr(w, "item", None)):
        if inner is not None:
            yield from _wire_types(inner)
    if isinstance(w, S.Struct):
        for f in S._fields(w.cls):
            yield from _wire_types(f.metadata["wire"])


def test_schemas_fit_the_decoder_buffer_limits():
    """Else a field's own check would be preempted by msgpack limits (error at `body`)."""
    for spec in K.KINDS.values():
        for w in _wire_types(S.Struct(spec.cls)):
            if isinstance(w, S.Struct):
                assert len(S._fields(w.cls)) <= env.BODY_MAP_MAX, w.cls
            if isinstance(w, S.ListOf):
                assert w.max <= env.BODY_ARRAY_MAX, (spec.name, w.max)
            if isinstance(w, S.Text):
                assert 4 * w.max <= env.BODY_STR_MAX, (spec.name, w.max)
            if isinstance(w, S.Bytes):
                assert w.max <= spec.max_body, (spec.name, w.max)
        if spec.max_lifetime_ms is not None:
            assert "exp" in {f.name for f in S._fields(spec.cls)}, spec.name
            if spec.record:
                assert spec.max_lifetime_ms >= env.MIN_RECORD_LIFETIME_MS, spec.name


# (e) names ---------------------------------------------------------------------------------------


def test_names_json_has_every_name():
    names = load("names.json")
    assert names["protocols"] == N.PROTOCOLS
    assert names["topics"] == N.TOPICS
    assert names["dht_keys"] == N.DHT_KEYS
    assert names["network"]["pattern"] == f"^(?:{N.NETWORK_PATTERN})$"
    assert names["limits"]["max_envelope_bytes"] == env.MAX_ENVELOPE
    assert names["limits"]["max_clock_skew_ms"] == env.MAX_CLOCK_SKEW_MS
    assert names["limits"]["min_record_lifetime_ms"] == env.MIN_RECORD_LIFETIME_MS
    assert names["limits"]["envelope_array_max_items"] == env.MAX_OUTER_ITEMS
    assert names["limits"]["envelope_str_max_bytes"] == max(env.MAX_NETWORK_LEN, env.MAX_KIND_LEN)
    assert names["limits"]["body_str_max_bytes"] == env.BODY_STR_MAX
    assert names["limits"]["body_array_max_items"] == env.BODY_ARRAY_MAX
    assert names["limits"]["body_map_max_entries"] == env.BODY_MAP_MAX
    assert names["limits"]["replay_keep_until_max_ms"] == env.KEEP_UNTIL_MAX
    assert names["envelope"]["format"] == env.ENVELOPE_FORMAT
    assert names["envelope"]["item_count"] == env.ENVELOPE_ITEMS == len(names["envelope"]["items"])
    envelope = load("schemas/envelope.json")
    assert envelope["minItems"] == envelope["maxItems"] == env.ENVELOPE_ITEMS
    assert envelope["x-p2pfleet"]["array_max_items"] == env.MAX_OUTER_ITEMS
    assert names["domain_tag"]["format"].format(network="n", kind="k", major=1).encode() \
        == env.domain_tag("n", "k", 1)


def _normalise(template: str) -> str:
    return re.sub(r"\{[^{}]*\}", "{}", template)


def _p2pfleet_literals(package: Path = ROOT / "p2pfleet"):
    """(file, line, normalised literal) for every string literal starting with /p2pfleet/."""
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        in_fstring = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                parts = [v.value if isinstance(v, ast.Constant) else "{}" for v in node.values]
                in_fstring |= {id(v) for v in node.values}
                text = "".join(str(p) for p in parts)
                if text.startswith("/p2pfleet/"):
                    yield path.relative_to(package.parent), node.lineno, _normalise(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in in_fstring and node.value.startswith("/p2pfleet/"):
                yield path.relative_to(package.parent), node.lineno, _normalise(node.value)


def _unknown_names(package: Path = ROOT / "p2pfleet") -> list[str]:
    names = load("names.json")
    known = {_normalise(t) for group in ("protocols", "topics", "dht_keys")
             for t in names[group].values()}
    return [f"{path}:{line}: {text}" for path, line, text in _p2pfleet_literals(package)
            if not any(k.startswith(text) for k in known)]


def test_no_name_outside_names_json():
    """A protocol id, topic or key invented elsewhere in p2pfleet/ (not via p2pfleet.names)
    fails here. Prefixes of known templates are allowed (e.g. for key validators)."""
    unknown = _unknown_names()
    assert not unknown, "names not in protocol/names.json (define them in p2pfleet/names.py):\n" \
        + "\n".join(unknown)


def test_literal_scan_sees_names_py():
    found = {text for path, _, text in _p2pfleet_literals() if path.name == "names.py"}
    assert _normalise(N.PROTOCOLS["kad"]) in found


def test_literal_scan_catches_invented_names(tmp_path):
    pkg = tmp_path / "p2pfleet"
    pkg.mkdir()
    (pkg / "rogue.py").write_text(
        'A = "/p2pfleet/{network}/telemetry/1.0.0"\n'
        'B = f"/p2pfleet/{net}/kad/2.0.0"\n'
        'OK1 = f"/p2pfleet/{net}/kad/1.0.0"\n'
        'OK2 = "/p2pfleet/"\n'
        'OK3 = f"/p2pfleet/{net}/node/1/"\n', encoding="utf-8")
    unknown = _unknown_names(pkg)
    assert sorted(u.split(": ", 1)[1] for u in unknown) == ["/p2pfleet/{}/kad/2.0.0",
                                                             "/p2pfleet/{}/telemetry/1.0.0"]
