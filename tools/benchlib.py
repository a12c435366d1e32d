"""Small helpers shared by the benchmarks in tools/: statistics, /proc sampling, machine
facts, timed control requests and fleet chores (an extra node, a parallel shutdown).

Nothing here changes how a node behaves; it only watches node processes from outside.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from p2pfleet.live.control import ControlError, request  # noqa: E402
from p2pfleet.live.localfleet import P2PFLEET, FleetError, LocalFleet, LocalNode, socket_inodes  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- statistics ---------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks
    (numpy's default method); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summary(values: list[float], digits: int = 2) -> dict:
    """n, mean, min, p50, p90, p99, max of `values` (rounded)."""
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, digits)
    if not values:
        return {"n": 0, "mean": None, "min": None, "p50": None, "p90": None, "p99": None,
                "max": None}
    return {"n": len(values), "mean": r(sum(values) / len(values)), "min": r(min(values)),
            "p50": r(percentile(values, 50)), "p90": r(percentile(values, 90)),
            "p99": r(percentile(values, 99)), "max": r(max(values))}


def rate(ok: int, total: int) -> float | None:
    return None if total == 0 else round(ok / total, 4)


# --- /proc ------------------------------------------------------------------------------
def _ppids() -> dict[int, int]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        out[int(stat.parent.name)] = int(text[text.rindex(")") + 2:].split()[1])
    return out


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (by parent pid, from /proc/<pid>/stat)."""
    parents = _ppids()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return out


def cpu_seconds(pids: list[int]) -> float | None:
    """utime + stime summed over `pids` (e.g. a process_tree), seconds
    (/proc/<pid>/stat fields 14 and 15)."""
    total, seen = 0, False
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        total += int(fields[11]) + int(fields[12])
        seen = True
    return total / CLK_TCK if seen else None


def memory_kb(pids: list[int]) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) summed over `pids`, in kB (/proc/<pid>/status)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in out:
                    out[key] += int(value.split()[0])
        except OSError:
            continue
    return out


def threads(pid: int) -> int:
    try:
        return len(list(Path(f"/proc/{pid}/task").iterdir()))
    except OSError:
        return 0


# --- machine ----------------------------------------------------------------------------
def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_total_mb = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        mem_total_mb = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_count": os.cpu_count(), "cpus_usable": affinity, "cpu_model": model,
        "mem_total_mb": mem_total_mb, "loadavg_at_start": list(os.getloadavg()),
        "platform": platform.platform(), "python": platform.python_version(),
        "python_impl": platform.python_implementation(),
        "libp2p": _pkg_version("libp2p"), "trio": _pkg_version("trio"),
        "p2pfleet": _pkg_version("p2pfleet"), "clock_ticks_per_s": CLK_TCK,
    }


# --- control requests ---------------------------------------------------------------------
def timed_ask(node: LocalNode, cmd: str, timeout: float = 15.0,
              **args: Any) -> tuple[dict | None, str | None, float]:
    """One control request: (reply or None, error or None, round trip in seconds)."""
    start = time.perf_counter()
    try:
        reply = request(node.control, cmd, timeout=timeout, **args)
        return reply, None, time.perf_counter() - start
    except ControlError as exc:
        return None, str(exc), time.perf_counter() - start


# --- fleet chores -------------------------------------------------------------------------
def add_node(fleet: LocalFleet, index: int | None = None) -> LocalNode:
    """Initialise one more node (data dir, key) for `fleet`, not yet started. It is
    appended to fleet.nodes, so fleet.stop() stops it too."""
    index = len(fleet.nodes) if index is None else index
    settings = dict(fleet.nodes[0].settings) if fleet.nodes else {}
    node = LocalNode(index, fleet.root / f"node-{index}", settings)
    proc = subprocess.run([*P2PFLEET, "--data-dir", str(node.data_dir), "--json", "node", "init",
                           "--network", fleet.network],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise FleetError(f"node init failed: {proc.stderr.strip()}")
    node.peer_id = json.loads(proc.stdout)["peer_id"]
    fleet.nodes.append(node)
    return node


def stop_all(nodes: list[LocalNode], timeout: float = 20.0) -> dict:
    """SIGTERM every live node at once, wait for each (SIGKILL after `timeout`).
    Returns how long it took and how each exited."""
    start = time.monotonic()
    live = [n for n in nodes if n.alive()]
    for node in live:
        try:
            node.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    exits: dict[int, dict] = {}
    for node in live:
        left = max(0.1, timeout - (time.monotonic() - start))
        try:
            rc = node.proc.wait(left)
            exits[node.index] = {"rc": rc, "s": round(time.monotonic() - start, 2)}
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
            exits[node.index] = {"rc": node.proc.returncode, "s": None, "killed": True}
    return {"stopped": len(live), "seconds": round(time.monotonic() - start, 2),
            "nonzero_exits": {str(i): e for i, e in exits.items() if e["rc"] != 0},
            "killed_after_timeout": sorted(i for i, e in exits.items() if e.get("killed"))}


def system_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return (total - idle) / CLK_TCK, total / CLK_TCK


# --- py-spy (optional) --------------------------------------------------------------------
IDLE_LEAVES = ("EpollIOManager.get_events", "KqueueIOManager.get_events",
               "WindowsIOManager.get_events")
AREAS = (  # first match wins: (area, substring of the leaf frame's file)
    ("crypto (nacl, cryptography, noise)", ("nacl/", "cryptography/", "noise/")),
    ("libp2p pubsub/gossipsub", ("libp2p/pubsub/",)),
    ("libp2p yamux", ("libp2p/stream_muxer/",)),
    ("libp2p security/io", ("libp2p/security/", "libp2p/io/", "libp2p/utils/")),
    ("libp2p kad-dht", ("libp2p/kad_dht/",)),
    ("libp2p service manager", ("libp2p/tools/",)),
    ("libp2p other", ("libp2p/",)),
    ("trio", ("trio/",)),
    ("protobuf", ("google/protobuf",)),
    ("p2pfleet", ("p2pfleet/",)),
)


def find_py_spy(path: str | None = None) -> str | None:
    import shutil
    return path if path and Path(path).exists() else shutil.which("py-spy")


def py_spy_record(py_spy: str, pid: int, seconds: float, out: Path,
                  rate: int = 200) -> subprocess.Popen:
    """Start sampling `pid` for `seconds` without pausing it (collapsed stacks to `out`)."""
    return subprocess.Popen([py_spy, "record", "--nonblocking", "--rate", str(rate),
                             "--duration", str(max(1, round(seconds))), "--format", "raw",
                             "--output", str(out), "--pid", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def py_spy_summary(path: Path, rate: int = 200, top: int = 12) -> dict:
    """Busy samples (leaf not the event loop's epoll wait) by leaf function and by area,
    and the busiest call paths through a few known entry points."""
    import collections
    import re
    leaves: collections.Counter = collections.Counter()
    areas: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = busy = 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        leaf = frames[-1]
        if leaf.startswith(IDLE_LEAVES):
            continue
        busy += n
        leaves[re.sub(r":\d+\)$", ")", leaf)] += n
        area = next((a for a, keys in AREAS if any(k in leaf for k in keys)), "other")
        areas[area] += n
        for name in {re.sub(r" \(.*$", "", f) for f in frames}:
            inclusive[name] += n

    def pct(n: int) -> float:
        return round(100.0 * n / busy, 1) if busy else 0.0
    return {
        "samples": total, "busy_samples": busy,
        "busy_cpu_s_estimate": round(busy / rate, 2),
        "busy_by_area_pct": {a: pct(n) for a, n in areas.most_common()},
        "busy_by_leaf_pct": [[f, pct(n)] for f, n in leaves.most_common(top)],
        "busy_inclusive_pct": [[f, pct(n)] for f, n in inclusive.most_common(40)
                               if not f.startswith(("_run", "<module>", "main", "Command.",
                                                    "Group.", "Context.", "RootGroup.",
                                                    "make_pass_decorator", "run",
                                                    "node_start"))][:top],
    }


def inbound_sources(pid: int, listen_port: int) -> list[str]:
    """Remote IPv4 addresses of the established TCP connections that `pid` accepted on
    `listen_port` (one entry per connection), from /proc/<pid>/net/tcp."""
    try:
        inodes = socket_inodes(pid)
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return []
    out = []
    for line in lines:
        f = line.split()
        if f[3] != "01" or f[9] not in inodes:  # 01: ESTABLISHED
            continue
        local_port = int(f[1].split(":")[1], 16)
        if local_port != listen_port:
            continue
        raw = bytes.fromhex(f[2].split(":")[0])[::-1]
        out.append(".".join(str(b) for b in raw))
    return out


def scan_logs(texts: dict[int, str], patterns: dict[str, str]) -> dict:
    """How often each pattern (case-sensitive substring) occurs in the node logs, and in
    how many nodes' logs."""
    out = {}
    for name, pattern in patterns.items():
        counts = {i: t.count(pattern) for i, t in texts.items()}
        hit = {i: c for i, c in counts.items() if c}
        out[name] = {"pattern": pattern, "lines": sum(hit.values()), "nodes": sorted(hit)}
    return out


def wait_quiet(max_s: float, busy_pct: float = 30.0, window_s: float = 3.0) -> dict:
    """Wait (at most max_s) until the machine was less than busy_pct busy over window_s:
    other work on a shared machine skews latency. Returns what was seen."""
    start = time.monotonic()
    seen = []
    while True:
        b0 = system_cpu()
        time.sleep(window_s)
        b1 = system_cpu()
        busy = (b1[0] - b0[0]) / max(1e-9, b1[1] - b0[1]) * 100.0
        seen.append(round(busy, 1))
        if busy < busy_pct or time.monotonic() - start >= max_s:
            return {"waited_s": round(time.monotonic() - start, 1), "quiet": busy < busy_pct,
                    "threshold_busy_pct": busy_pct, "busy_pct_seen": seen[-10:]}
