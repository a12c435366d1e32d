"""The node, not the publisher, bounds a sandbox run (issue 14, items 5 and 6): every
lease's wall-clock run time is capped by the node's `hardware.max_run_s`
(`SandboxConfig.max_run_s`) whatever deadline the publisher chose, and the child starts and
runs a model under lower inherited limits (ulimit -v, ulimit -t, systemd LimitAS/LimitCPU)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from p2pfleet.live.config import Config, load_config
from p2pfleet.exec.runner import run_shard
from p2pfleet.exec.sandbox import SandboxConfig, open_sandbox_pool, sandbox_config

from test_sandbox import classifier, lease_for, shard_inputs, squaring_chain

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")
WEEK_MS = 7 * 24 * 3600 * 1000


async def test_a_publishers_week_long_deadline_is_capped_by_the_node():
    slow = squaring_chain(400)  # ~860 GFLOP in one micro-batch: minutes on a car
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024, max_run_s=1.5)) as pool:
        box = await pool.get(b"publisher-a")
        with trio.fail_after(120):  # a bound for the code before the cap, which ran on
            out = await run_shard(box, lease_for(slow, 1024, 1024, deadline_ms=WEEK_MS),
                                  slow, shard_inputs(1024, 1024))
        assert (out.status, out.reason) == ("failed", "timeout"), out
        assert "max_run_s" in out.detail or "wall clock" in out.detail, out
        model = classifier()  # the child is usable again
        ok = await run_shard(box, lease_for(model, 10, 5, deadline_ms=WEEK_MS), model,
                             shard_inputs(10))
        assert ok.status == "done", ok


def test_the_cap_is_a_node_setting_with_a_default():
    assert sandbox_config(Config()).max_run_s == Config().hardware.max_run_s > 0
    cfg = load_config(env={}, overrides={"hardware.max_run_s": "90"})
    assert sandbox_config(cfg).max_run_s == 90
    with pytest.raises(ValueError, match="max_run_s"):
        SandboxConfig(memory_mb=1024, max_run_s=0)


GiB = 1 << 30


def _lower_limits() -> None:
    """In the child process before exec: what `ulimit -v 2097152; ulimit -t 600` does."""
    resource.setrlimit(resource.RLIMIT_AS, (2 * GiB, 2 * GiB))
    resource.setrlimit(resource.RLIMIT_CPU, (600, 600))


def test_the_sandbox_starts_and_runs_a_model_under_lower_inherited_limits():
    script = Path(__file__).with_name("sandbox_under_ulimit.py")
    proc = subprocess.run([sys.executable, str(script)], preexec_fn=_lower_limits,
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["status"] == "done", (got, proc.stderr[-3000:])
    # the defaults follow the process's own limits, and the node says so once at start
    assert got["memory_mb"] <= 2048 and got["cpu_hard_s"] <= 600, got
    assert proc.stderr.count("lowered to what this process may set") == 1, proc.stderr[-3000:]
