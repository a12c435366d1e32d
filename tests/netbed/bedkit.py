"""Helpers of the netbed tests: the bed package, probes run in hosts, leftovers."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))  # tools/ is not a package: import netbed from it

import netbed  # noqa: E402

PROBE = str(ROOT / "tools" / "netbed" / "probe.py")
TOKENS: list[str] = []  # every bed of this session, for tests/netbed/test_teardown.py


def root_veths() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True,
                         text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def need_bed() -> None:
    reason = netbed.missing()
    if reason:
        pytest.skip(reason)


def serve(host: netbed.Host, *args: str) -> tuple[subprocess.Popen, tuple[str, int]]:
    """Start a probe server in `host`; returns it and the address it listens on."""
    proc = host.python([PROBE, *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "listening", f"probe {args} did not start"
    ip, _, port = line[1].rpartition(":")
    return proc, (ip, int(port))


def probe(host: netbed.Host, *args: str, timeout: float = 120) -> dict:
    """Run a probe client in `host` to its end; its last JSON line."""
    proc = host.run([sys.executable, PROBE, *args], timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"probe {args} printed nothing: {proc.stderr[-1000:]}"
    return json.loads(lines[-1])


def read_json(proc: subprocess.Popen, timeout: float = 120) -> dict:
    """The next report of a probe server; a stuck probe fails the test, never hangs it."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert box, f"no report from the probe server within {timeout} s"
    assert box[0], "the probe server ended without a report"
    return json.loads(box[0])
