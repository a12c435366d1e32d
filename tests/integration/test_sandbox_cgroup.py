"""Each sandbox child in a cgroup v2 of its own (p2pfleet/exec/cgroups.py), on real children.

Runs wherever this process may make cgroups with the memory, cpu and pids controllers (CI
runs as root: on a pure cgroup v2 host it runs; on a cgroup v1 or hybrid host, where the
memory controller sits in a v1 hierarchy, the sandbox keeps its rlimits and this skips).
"""

from __future__ import annotations

import os
import sys

import pytest

from p2pfleet.exec import cgroups
from p2pfleet.exec.sandbox import SandboxConfig, SandboxFailure, open_sandbox_pool

HOME, WHY = cgroups.home() if sys.platform == "linux" else (None, "not Linux")
pytestmark = pytest.mark.skipif(HOME is None, reason=f"no writable cgroup v2 here: {WHY}")


async def test_a_child_over_memory_max_is_out_of_memory_and_its_cgroup_goes():
    # RLIMIT_AS (memory_mb) counts address space and would stop the allocation first; the
    # cgroup's memory.max counts resident memory, so it is set lower to be the one hit.
    cfg = SandboxConfig(memory_mb=1536, cgroup_memory_mb=300, debug=True, cpu_share=0.5)
    async with open_sandbox_pool(cfg) as p:
        box = await p.get(b"publisher-a")
        await box.start()
        leaf = box.cgroup
        assert leaf is not None and os.path.isdir(leaf)
        with open(os.path.join(leaf, "cgroup.procs")) as f:
            assert str(box.pid) in f.read().split()
        with open(os.path.join(leaf, "memory.max")) as f:
            assert int(f.read()) == 300 << 20
        with open(os.path.join(leaf, "cpu.max")) as f:
            quota, period = f.read().split()
            assert int(quota) == round(0.5 * cfg.cores * int(period))
        await box.debug("touch", mb=100)  # under the limit: fine
        with pytest.raises(SandboxFailure) as exc:
            await box.debug("touch", mb=600)
        assert exc.value.reason == "out_of_memory", exc.value
        assert not os.path.exists(leaf)
        # The next child gets a fresh cgroup, removed when the pool closes it.
        await box.start()
        leaf2 = box.cgroup
        assert leaf2 is not None and leaf2 != leaf
    assert not os.path.exists(leaf2)
