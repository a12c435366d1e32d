"""A cgroup v2 of its own for each sandbox child, where the node may make one.

`open_home()` looks for the node's own cgroup on a cgroup2 mount (/proc/self/cgroup's
"0::" line, /proc/self/mountinfo) with the memory, cpu and pids controllers and write
access (root, or a delegated subtree such as systemd's Delegate=yes). cgroup v2's "no
internal processes" rule forbids enabling controllers for the children of a cgroup that
holds processes, except in the root cgroup; so, where enabling them is refused (EBUSY), the
node moves itself into a leaf of its own (`p2pfleet-node-<pid>`) and tries again, and gives
up if other processes stay behind. Children go under `p2pfleet-sandbox-<pid>/child-<n>`, each with memory.max
(the child's memory limit), memory.swap.max 0, memory.oom.group 1, pids.max and cpu.max,
and are moved in by the parent right after the spawn, before they can load a model. The
parent removes a child's cgroup once it has reaped the child, after reading its OOM kill
count (memory.events), which makes a kernel OOM kill an `out_of_memory` failure.

Where none of this is possible (cgroup v1 or a hybrid hierarchy holding the memory
controller, no write access, other processes in the node's cgroup) `open_home` says why
and the sandbox keeps only its rlimits (RLIMIT_AS, RLIMIT_CPU, RLIMIT_NPROC).
"""

from __future__ import annotations

import atexit
import errno
import logging
import os

log = logging.getLogger(__name__)

NEEDED = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000


def own_v2_path(proc_cgroup: str) -> str | None:
    """The cgroup v2 path in /proc/<pid>/cgroup text ("0::<path>"), or None."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def v2_mounts(mountinfo: str) -> list[tuple[str, str]]:
    """(root within the hierarchy, mount point) of every cgroup2 mount in mountinfo text."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep or not right.startswith("cgroup2 "):
            continue
        fields = left.split()
        if len(fields) >= 5:
            out.append((_unescape(fields[3]), _unescape(fields[4])))
    return out


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def node_dir(proc_cgroup: str, mountinfo: str) -> str | None:
    """Directory of this process's cgroup v2, or None when it has none reachable."""
    path = own_v2_path(proc_cgroup)
    if path is None:
        return None
    for root, mount in v2_mounts(mountinfo):
        if path == root or path.startswith(root.rstrip("/") + "/"):
            rel = path[len(root):].lstrip("/")
            return os.path.join(mount, rel) if rel else mount
    return None


def cpu_max(cpus: float, period_us: int = CPU_PERIOD_US) -> str:
    """cpu.max for `cpus` CPU-seconds per second: "<quota> <period>" (quota >= 1 ms)."""
    if not cpus > 0:
        raise ValueError(f"cpus must be > 0, got {cpus!r}")
    return f"{max(1000, round(cpus * period_us))} {period_us}"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enable(cg: str) -> None:
    _write(os.path.join(cg, "cgroup.subtree_control"), " ".join("+" + c for c in NEEDED))


class Home:
    """Where this node's sandbox children get their cgroups (`open_home`)."""

    def __init__(self, node_cg: str, base: str, own_leaf: str | None):
        self.node_cg, self.base, self.own_leaf = node_cg, base, own_leaf
        self._n = 0

    def create(self, memory_bytes: int, cpus: float, pids: int) -> str:
        """A fresh child cgroup with its limits; raises OSError."""
        self._n += 1
        leaf = os.path.join(self.base, f"child-{self._n}")  # one Home per process: unique
        os.mkdir(leaf, 0o700)
        try:
            _write(os.path.join(leaf, "memory.max"), str(int(memory_bytes)))
            swap = os.path.join(leaf, "memory.swap.max")
            if os.path.exists(swap):  # absent when the kernel has no swap accounting
                _write(swap, "0")
            _write(os.path.join(leaf, "memory.oom.group"), "1")
            _write(os.path.join(leaf, "pids.max"), str(int(pids)))
            _write(os.path.join(leaf, "cpu.max"), cpu_max(cpus))
        except OSError:
            remove(leaf)
            raise
        return leaf

    def close(self) -> None:
        """Remove the base and put the node back where it was (best effort)."""
        remove(self.base)
        if self.own_leaf is not None:
            try:
                _write(os.path.join(self.node_cg, "cgroup.subtree_control"),
                       " ".join("-" + c for c in NEEDED))
                _write(os.path.join(self.node_cg, "cgroup.procs"), str(os.getpid()))
                os.rmdir(self.own_leaf)
            except OSError as e:
                log.debug("could not move the node back to %s: %s", self.node_cg, e)


def enter(leaf: str, pid: int) -> None:
    _write(os.path.join(leaf, "cgroup.procs"), str(pid))


def oom_kills(leaf: str) -> int:
    """OOM kills in the cgroup (memory.events), 0 when unknown."""
    try:
        for line in _read(os.path.join(leaf, "memory.events")).splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def remove(leaf: str) -> bool:
    """rmdir an (empty) cgroup; False if it is still there."""
    try:
        os.rmdir(leaf)
    except FileNotFoundError:
        return True
    except OSError as e:
        log.debug("cgroup %s not removed: %s", leaf, e)
        return False
    return True


def open_home() -> tuple[Home | None, str | None]:
    """(Home, None), or (None, why the children get no cgroup)."""
    try:
        node_cg = node_dir(_read("/proc/self/cgroup"), _read("/proc/self/mountinfo"))
    except OSError as e:
        return None, f"cannot read this process's cgroup ({e.strerror})"
    if node_cg is None:
        return None, "this process is in no cgroup v2 hierarchy reachable from here"
    try:
        have = set(_read(os.path.join(node_cg, "cgroup.controllers")).split())
    except OSError as e:
        return None, f"cannot read {node_cg}/cgroup.controllers ({e.strerror})"
    missing = [c for c in NEEDED if c not in have]
    if missing:
        return None, (f"the cgroup v2 hierarchy at {node_cg} lacks the {', '.join(missing)} "
                      "controller(s) (a cgroup v1 or hybrid hierarchy holds them)")
    if not os.access(node_cg, os.W_OK):
        return None, f"{node_cg} is not writable (run as root or delegate the node's cgroup)"
    own_leaf = None
    try:
        try:
            _enable(node_cg)  # the root cgroup, or a delegated one that holds no process
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            own_leaf = os.path.join(node_cg, f"p2pfleet-node-{os.getpid()}")
            os.makedirs(own_leaf, exist_ok=True)
            enter(own_leaf, os.getpid())
            try:
                _enable(node_cg)
            except OSError as e2:
                enter(node_cg, os.getpid())
                remove(own_leaf)
                if e2.errno == errno.EBUSY:
                    return None, (f"{node_cg} holds other processes besides the node: give "
                                  "the node a cgroup of its own (systemd Delegate=yes)")
                raise
        base = os.path.join(node_cg, f"p2pfleet-sandbox-{os.getpid()}")
        os.makedirs(base, 0o700, exist_ok=True)
        _enable(base)
    except OSError as e:
        return None, f"cannot set up cgroups under {node_cg} ({e.strerror or e})"
    return Home(node_cg, base, own_leaf), None


_HOME: list = []


def home() -> tuple[Home | None, str | None]:
    """`open_home()` once per process (a node has one pool; tests open many): the node
    is moved at most once, and put back when the process exits."""
    if not _HOME:
        _HOME.append(open_home())
        if _HOME[0][0] is not None:
            atexit.register(_HOME[0][0].close)
    return _HOME[0]


def set_cpus(leaf: str, cpus: float) -> None:
    _write(os.path.join(leaf, "cpu.max"), cpu_max(cpus))


__all__ = ["Home", "home", "open_home", "set_cpus", "enter", "oom_kills", "remove", "cpu_max", "node_dir"]
