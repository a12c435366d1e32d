"""A small in-process run of tools/fuzz_wire.py: no failures, and the decoders are reached.

The long run (10^5 inputs per mode, with branch coverage) is `make fuzz`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INPUTS = 1500
SEED = 20240601


def _load_fuzzer():
    name = "p2pfleet_tools_fuzz_wire"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / "fuzz_wire.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzzer()


@pytest.fixture(scope="module")
def sample_run():
    return fuzz.run_fuzz(INPUTS, SEED, watchdog_s=None)


def test_no_failures(sample_run):
    details = "\n\n".join(f"{f['mode']}#{f['index']}: {f['error']}\ninput hex: {f['input_hex']}\n"
                          f"{f['traceback']}" for f in sample_run["failure_details"])
    assert sample_run["failures"] == 0, details
    assert sample_run["ok"]
    assert sample_run["total_inputs"] == INPUTS * len(fuzz.MODES)
    assert sample_run["slowest_input_ms"] < 1000 * fuzz.HANG_S


# Error codes each mode must produce, so we know it gets past the outer layers.
EXPECTED = {
    "envelope": {"malformed-envelope", "bad-signature", "wrong-network", "unsupported-kind",
                 "unsupported-version", "expired"},
    "body": {"invalid-body", "oversized", "expired", "replay"},
    "rotation": {"bad-signature", "invalid-body", "not-yet-valid"},
}


@pytest.mark.parametrize("mode", fuzz.MODES)
def test_each_mode_reaches_its_decoders(sample_run, mode):
    info = sample_run["modes"][mode]
    assert info["inputs"] == INPUTS
    assert sum(info["outcomes"].values()) == INPUTS
    assert EXPECTED[mode] <= set(info["distinct_errors"]), info["outcomes"]
    assert info["outcomes"].get("ok", 0) > 0  # valid inputs are still accepted
    if mode == "body":
        # the strict schema is reached field by field, including nested structs and lists
        paths = set(info["invalid_body_by_field"])
        assert {"body", "body.exp", "body.<unknown>"} <= paths
        assert any(p.startswith("body.requirements.") for p in paths)  # nested struct
        assert any(p.startswith("body.leases[].") for p in paths)  # structs in a list
        assert info["invalid_body_field_paths"] >= 40
        # repeats with the dedup store: replays refused, records and kept kinds reopened
        repeats = info["repeats_with_dedup"]
        assert repeats["replays_refused"] == info["outcomes"]["replay"] > 0
        assert repeats["sequence_reopened"] > 0 and repeats["store_reopened"] > 0


def test_deterministic_for_a_seed():
    a = fuzz.run_fuzz(300, 5, ["rotation", "envelope"], watchdog_s=None)
    b = fuzz.run_fuzz(300, 5, ["rotation", "envelope"], watchdog_s=None)
    assert [m["outcomes"] for m in a["modes"].values()] == \
        [m["outcomes"] for m in b["modes"].values()]
    case = fuzz.replay_input("body", 17, 5)
    assert fuzz.replay_input("body", 17, 5).data == case.data


def test_a_non_wire_error_is_reported_as_failure(monkeypatch):
    """The harness itself: an exception other than WireError is caught and reported."""
    from p2pfleet.wire import envelope

    real = envelope._decode_body

    def broken(spec, body):
        if len(body) % 5 == 0:
            raise KeyError("injected")
        return real(spec, body)

    monkeypatch.setattr(envelope, "_decode_body", broken)
    result = fuzz.run_fuzz(100, 1, ["body"], watchdog_s=None)
    assert result["failures"] > 0 and not result["ok"]
    first = result["failure_details"][0]
    assert first["error"].startswith("KeyError") and "injected" in first["traceback"]
    assert bytes.fromhex(first["input_hex"])  # the input is there to reproduce it


def test_a_deduplicated_record_is_reported_as_failure(monkeypatch):
    """The harness itself: records are ordered by sequence number, never refused as replays;
    an open_envelope that deduplicated them (the old rule) fails the run."""
    from p2pfleet.wire import envelope
    from p2pfleet.wire import errors as E
    from p2pfleet.wire.kinds import KINDS

    real = envelope.open_envelope

    def deduplicating_records(data, network, *, now_ms=None, dedup=None, kinds=None):
        opened = real(data, network, now_ms=now_ms, dedup=dedup, kinds=kinds)
        if dedup is not None and KINDS[opened.kind].record \
                and not dedup.remember(opened.msg_id, None, now_ms):
            raise E.Replay("envelope", "a record seen before (the old rule)")
        return opened

    monkeypatch.setattr(envelope, "open_envelope", deduplicating_records)
    result = fuzz.run_fuzz(INPUTS, SEED, ["body"], watchdog_s=None)
    assert result["failures"] > 0 and not result["ok"]
    assert all("refused as a replay" in f["error"] for f in result["failure_details"])


def test_command_line(tmp_path):
    """The CLI in parallel mode: JSON written, exit status 0, same outcomes as in-process."""
    import json
    import subprocess

    out = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "fuzz_wire.py"), "--inputs", "150", "--seed", "3",
         "--modes", "envelope,rotation", "--jobs", "2", "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and report["total_inputs"] == 300 and report["jobs"] == 2
    assert report["machine"]["cpu_count"] >= 1
    here = fuzz.run_fuzz(150, 3, ["envelope", "rotation"], watchdog_s=None)
    assert {m: v["outcomes"] for m, v in report["modes"].items()} == \
        {m: v["outcomes"] for m, v in here["modes"].items()}
