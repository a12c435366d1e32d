"""Everything the bed builds goes away: on an error, on Ctrl-C, on SIGTERM, and (last test
of the tier) nothing of this session's beds is left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from bedkit import ROOT, TOKENS, need_bed, root_veths

HOLDER = """
import json, signal, sys, time
sys.path.insert(0, sys.argv[1])
import netbed
# Ctrl-C as at a terminal: a process started from a background job inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
with netbed.Bed() as bed:
    a = bed.public("a")
    car = bed.behind(bed.nat_router("r"), "car")
    bed.shape(car, rate_mbit=5, loss_pct=1)
    sleeper = car.popen(["sleep", "600"])
    print(json.dumps({"token": bed.token, "namespaces": bed.namespaces, "pid": sleeper.pid}),
          flush=True)
    while True:
        time.sleep(1)
"""


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_error_inside_the_bed_still_removes_it(new_bed):
    with pytest.raises(RuntimeError, match="boom"):
        with new_bed() as bed:
            bed.behind(bed.nat_router("r"), "car")
            made = list(bed.namespaces)
            assert set(made) <= netns_names() and len(made) == 3
            raise RuntimeError("boom")
    assert not set(made) & netns_names()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_process_holding_a_bed_removes_it(sig):
    need_bed()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT / "tools")],
                              stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line, f"the bed holder did not start (exit {holder.wait(30)})"
        info = json.loads(line)
        TOKENS.append(info["token"])
        assert set(info["namespaces"]) <= netns_names() and pid_alive(info["pid"])
        holder.send_signal(sig)
        assert holder.wait(60) != 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert not set(info["namespaces"]) & netns_names()
    assert not pid_alive(info["pid"])


def test_nothing_is_left_behind(_root_veths_before):
    """Runs last in the tier: no namespace of any bed of this session, no veth added to the
    root namespace."""
    need_bed()
    left = {ns for ns in netns_names() for token in TOKENS if ns.startswith(f"nb{token}-")}
    assert not left, f"namespaces left behind: {sorted(left)}"
    assert root_veths() <= _root_veths_before, root_veths() - _root_veths_before
