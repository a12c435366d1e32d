"""Finding the node's cgroup v2 directory from /proc text (p2pfleet/exec/cgroups.py)."""

from __future__ import annotations

import pytest

from p2pfleet.exec.cgroups import cpu_max, node_dir, own_v2_path

HYBRID = """\
24 31 0:22 / /sys ro - sysfs sysfs rw
33 24 0:27 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
34 33 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
36 33 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
"""
PURE = "30 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
CONTAINER = "30 24 0:26 /system.slice/x.service /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n"


def test_node_dir_on_pure_hybrid_and_container_hierarchies():
    assert node_dir("0::/system.slice/n.service\n", PURE) == "/sys/fs/cgroup/system.slice/n.service"
    assert node_dir("4:memory:/a\n0::/\n", HYBRID) == "/sys/fs/cgroup/unified"
    assert node_dir("0::/system.slice/x.service/sub\n", CONTAINER) == "/sys/fs/cgroup/sub"
    assert node_dir("4:memory:/a\n", HYBRID) is None  # cgroup v1 only
    assert node_dir("0::/elsewhere\n", CONTAINER) is None  # outside what is mounted
    assert own_v2_path("0::\n") == "/"


def test_cpu_max():
    assert cpu_max(1.5) == "150000 100000"
    assert cpu_max(0.001) == "1000 100000"
    with pytest.raises(ValueError, match="cpus must be > 0"):
        cpu_max(0)
