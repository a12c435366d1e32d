"""The parent side of the sandbox: one long-lived child process per publisher (trio-native).

A `SandboxPool` owns the children and the tasks that drain their stderr; `await
pool.get(publisher)` returns that publisher's `Sandbox`, never shared with another
publisher. A `Sandbox` starts its child lazily (`python -m p2pfleet.exec.child`, see
child.py for what the child does before it loads a model) and talks to it with
framed messages over its stdin/stdout pipes (a msgpack map plus a raw payload for tensor
and model bytes, layout in child.py), capped at `max_frame` bytes each way. A shard's
inputs and outputs travel over shared memory instead (`run_shared`, shm.py): two memfds
passed over a Unix socket the child inherits, small control frames on the pipe.

Limits and who enforces them:
- memory: RLIMIT_AS in the child (`memory_mb`, the whole address space: the runtime
  itself takes ~300 MiB of it). An allocation that fails becomes `out_of_memory`; so does a
  child killed by the kernel's OOM killer (SIGKILL while /proc/vmstat's oom_kill grew).
- wall clock: the child's watchdog thread sets RunOptions.terminate at the request's
  deadline (`timeout`); the parent waits `kill_grace_s` longer under trio.fail_after, then
  SIGKILLs the child (`timeout`). Model loading has no terminate flag: only the backstop.
- CPU time: RLIMIT_CPU in the child, re-armed per request to that request's budget
  (wall limit x threads + 5 s); SIGXCPU kills the child (`timeout`).
- CPU share: at most `cpu_share x cores` onnxruntime threads, and, below a share of 1, a
  duty cycle in the parent: a task reads the child's CPU time (/proc/<pid>/stat) every 50 ms and SIGSTOPs it
  for as long as it ran ahead of `cpu_share x cores` CPU-seconds per second (a token
  bucket with 0.1 s of burst), then SIGCONTs it. Works unprivileged on any Linux; where
  the child has a cgroup v2 of its own (cgroups.py) its cpu.max holds the same share too.
- cgroup v2, where the node's is writable with memory, cpu and pids (else the pool says
  why at start): memory.max, memory.swap.max 0, pids.max, cpu.max per child; an OOM kill
  in it is `out_of_memory`; the cgroup is removed when the child is reaped.
- who may signal the child: as root, each child gets a uid and gid of its own (`private_id`:
  in no user or group database, held by no process, never given to another live child), so
  only root can stop or kill it, and it can signal nothing else. Not root: the child runs
  as the node's own uid (in its user namespace), which every process of that user shares.
- validation: `Sandbox.validate` runs validate_model in the child, under the same limits;
  onnx's tools cannot be interrupted, so a SIGALRM timer in the child (its default action
  ends the process) is the wall-clock limit (`timeout`).
- syscalls: a seccomp filter in the child (syscalls.py) refuses network sockets, new
  processes, exec and kernel interfaces it never needs, and kills it (SIGSYS: a `crash`)
  for the clearly dangerous ones; the pool logs at start when it cannot be had.
- anything else that ends the child (a signal, an exit) is a `crash`.
After any of these the child is gone; the next request starts a new one. The sandbox
itself never raises anything but `SandboxFailure` for what the child or model did.

A request cancelled from outside (the caller's cancel scope) leaves the pipe out of step,
so the child is killed (shielded) and the cancellation goes on.
"""

from __future__ import annotations

import dataclasses
import grp
import hashlib
import json
import logging
import math
import os
import pwd
import resource
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import trio

from . import cgroups, syscalls
from .limits import ModelLimits
from .shm import OutputArena, SharedArrays, send_fds
from .validate import ModelRefused, ValidatedModel
from .validate import TensorSpec as ValidatedSpec

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IQ")  # meta length, payload length (see child.py)
META_MAX = 1 << 20
MiB = 1 << 20
ARENA_KEEP_MAX = 16 * MiB  # a larger output arena is not kept between shards (memory held idle)
REASONS = ("crash", "out_of_memory", "timeout", "invalid_model", "input_error", "internal")
DTYPES = frozenset(("float32", "float64", "float16", "int8", "uint8", "int16", "uint16",
                    "int32", "uint32", "int64", "uint64", "bool"))
ISOLATION = ("auto", "none")
_PKG_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class SandboxConfig:
    """How children are started and limited.

    memory_mb: RLIMIT_AS of a child, MiB (address space, including ~300 MiB of runtime);
      0: measured (`measured_memory_mb`: a quarter of the machine's memory, or of the
      node's cgroup limit, at least 1024). The node passes its hardware.memory_mb. Each
      child gets the whole limit: a node running shards at once divides it itself.
    max_frame: largest frame either way, bytes (a model plus its load request must fit).
    isolation: "auto": no network (as root a new network namespace, else a new user + network
      namespace where the kernel allows, else a warning); "none": the child keeps the host's
      network (tests and debugging only).
    user: None (the default): as root, each child switches to a uid and gid of its own
      (`private_id`), so no other process but root can signal it. A user name or uid: every
      child switches to that user instead (never root), and the children share it: any
      process of that user, each other included, can stop or kill them. Not root: unused
      (the child keeps the node's uid).
    nofile / nproc: RLIMIT_NOFILE; RLIMIT_NPROC (per uid: with private ids, per child; only
      set after dropping privileges).
    memory_mb, cpu_hard_s, nofile and nproc are lowered to this process's own hard limits
      (a lower ulimit, systemd LimitAS/LimitCPU, a container), which a child cannot raise;
      `clamped` lists what was lowered and the pool logs it once.
    cpu_hard_s: hard RLIMIT_CPU over a child's life; the pool restarts children nearing it.
    nice: niceness of the child (inference yields to the car's own work).
    start_timeout_s: time for a child to start and say hello.
    kill_grace_s: how long past a request's deadline the parent waits before SIGKILL.
    max_children: children kept at once; the least recently used idle one is closed.
    debug: allow the child's debug requests (tests only).
    cpu_share: share of the machine's CPU the children may use, (0, 1] (policy.cpu_share):
      caps onnxruntime threads at ceil(cpu_share x cores) and, below 1, duty-cycles each
      child to cpu_share x cores CPU-seconds per second.
    cores: cores of the machine for cpu_share (hardware.cores); 0: those this process may run on.
    max_threads: most onnxruntime intra-op threads per child (policy.max_threads); 0: cores.
    confine_fs: chroot the child into its empty working directory where possible.
    max_run_s: longest wall-clock time of one shard (`run_shard`), whatever the lease's
      deadline (hardware.max_run_s): the node, not the publisher, bounds a run.
    cgroup_memory_mb: memory.max of a child's cgroup v2 (cgroups.py; resident memory plus
      the page cache and kernel memory it causes), MiB; 0: memory_mb.
    """

    memory_mb: int = 2048
    max_frame: int = 512 * MiB
    isolation: str = "auto"
    user: str | int | None = None
    nofile: int = 32
    nproc: int = 64
    cpu_hard_s: int = 7 * 24 * 3600
    nice: int = 10
    start_timeout_s: float = 30.0
    kill_grace_s: float = 2.0
    max_children: int = 4
    debug: bool = False
    python: str = sys.executable
    cpu_share: float = 1.0
    cores: int = 0
    max_threads: int = 0
    confine_fs: bool = True
    max_run_s: float = 3600.0
    cgroup_memory_mb: int = 0
    clamped: tuple[str, ...] = field(default=(), init=False, compare=False)
    """Limits lowered to this process's own hard limits (`clamp_to_own_limits`)."""

    def __post_init__(self) -> None:
        if isinstance(self.memory_mb, int) and not isinstance(self.memory_mb, bool) \
                and self.memory_mb == 0:
            object.__setattr__(self, "memory_mb", measured_memory_mb())
        for name in ("cores", "max_threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 4096:
                raise ValueError(f"SandboxConfig.{name} must be an integer 0..4096, got {v!r}")
        if self.cores == 0:
            object.__setattr__(self, "cores", _usable_cores())
        if self.max_threads == 0:
            object.__setattr__(self, "max_threads", self.cores)
        share = self.cpu_share
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 1:
            raise ValueError(f"SandboxConfig.cpu_share must be a number in (0, 1], got {share!r}")
        run_s = self.max_run_s
        if not isinstance(run_s, (int, float)) or isinstance(run_s, bool) or not run_s > 0 \
                or not math.isfinite(run_s):
            raise ValueError(f"SandboxConfig.max_run_s must be a number of seconds > 0, "
                             f"got {run_s!r}")
        if self.isolation not in ISOLATION:
            raise ValueError(f"SandboxConfig.isolation must be one of {ISOLATION}, got {self.isolation!r}")
        cg = self.cgroup_memory_mb
        if not isinstance(cg, int) or isinstance(cg, bool) or cg < 0:
            raise ValueError(f"SandboxConfig.cgroup_memory_mb must be an integer >= 0, got {cg!r}")
        for name in ("memory_mb", "max_frame", "nofile", "nproc", "cpu_hard_s", "max_children"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SandboxConfig.{name} must be an integer >= 1, got {v!r}")
        if self.memory_mb < 256:
            raise ValueError(f"SandboxConfig.memory_mb must be >= 256 (the runtime needs ~300 MiB "
                             f"of address space), got {self.memory_mb}")
        clamp_to_own_limits(self)


_OWN_LIMITS = (("memory_mb", "RLIMIT_AS", 1 << 20), ("cpu_hard_s", "RLIMIT_CPU", 1),
               ("nofile", "RLIMIT_NOFILE", 1), ("nproc", "RLIMIT_NPROC", 1))


def own_hard_limit(name: str) -> int | None:
    """This process's hard limit `resource.<name>`, None when unlimited or unknown. A child
    inherits it and can never raise a limit past it (ulimit, systemd LimitAS/LimitCPU, a
    container runtime may have set it lower than the sandbox wants)."""
    try:
        _soft, hard = resource.getrlimit(getattr(resource, name))
    except (AttributeError, ValueError, OSError):
        return None
    return None if hard == resource.RLIM_INFINITY or hard < 0 else int(hard)


def clamp_to_own_limits(cfg: SandboxConfig) -> None:
    """Lower each limit the child sets to what this process may set (its hard limit), instead
    of a child that fails raising it; `cfg.clamped` says what was lowered (the pool logs it
    once)."""
    notes = []
    for attr, rlimit, unit in _OWN_LIMITS:
        hard = own_hard_limit(rlimit)
        want = getattr(cfg, attr)
        if hard is not None and want * unit > hard:
            object.__setattr__(cfg, attr, max(1, hard // unit))
            notes.append(f"{attr} {want} -> {getattr(cfg, attr)} ({rlimit} hard limit)")
    object.__setattr__(cfg, "clamped", tuple(notes))


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().split()[0]
        return int(text)
    except (OSError, ValueError, IndexError):
        return None


def measured_memory_mb() -> int:
    """A child's memory limit when the owner left hardware.memory_mb at 0: a quarter of
    the machine's memory or of this process's cgroup memory limit, whichever is smaller,
    and at least 1024 MiB (the runtime alone takes ~300 MiB of address space); at most this
    process's own hard RLIMIT_AS, which the child inherits."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 4 << 30
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            limit = _read_int(f"/sys/fs/cgroup{path}/memory.max")
        elif "memory" in controllers.split(","):
            limit = _read_int(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        else:
            continue
        if limit is not None and 0 < limit < total:
            total = limit
    own = own_hard_limit("RLIMIT_AS")  # the child inherits this process's own limit
    mb = max(1024, total // 4 >> 20)
    return mb if own is None else min(mb, own >> 20)


def sandbox_config(config, **overrides) -> SandboxConfig:
    """The SandboxConfig of a node's `p2pfleet.live.config.Config`: memory from
    hardware.memory_mb (0: measured), cores from hardware.cores, the run cap from
    hardware.max_run_s, cpu_share and max_threads from the policy. `overrides` are other
    SandboxConfig fields."""
    kw = dict(memory_mb=config.hardware.memory_mb, cores=config.hardware.cores,
              cpu_share=config.policy.cpu_share, max_threads=config.policy.max_threads,
              max_run_s=config.hardware.max_run_s)
    kw.update(overrides)
    return SandboxConfig(**kw)


def _proc_cpu_s(pid: int, tick: float) -> float | None:
    """CPU time (user + system, all threads) of a process from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) * tick
    except (OSError, ValueError, IndexError):
        return None


class SandboxFailure(Exception):
    """The child or the model failed a request. `reason` is a FailedResult reason."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:240]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # numpy dtype name, e.g. "float32"
    shape: tuple                    # ints for fixed dims, str or None for symbolic ones


@dataclass(frozen=True)
class ModelInfo:
    key: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    load_ms: float


_ORT_TO_DTYPE = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}


def _oom_kills() -> int | None:
    """The kernel's count of OOM kills (/proc/vmstat), or None where unknown."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _grow_pipe(fd: int, size: int = MiB) -> None:
    """Larger pipe buffers: fewer wake-ups per micro-batch (Linux; best effort)."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except OSError:
        pass


#: The ids a child's private uid/gid is drawn from when the node runs as root: a range that
#: systemd's UID/GID allocation (docs/UIDS-GIDS.md) leaves unused, above its container
#: ranges (which end at 1879048191) and below its "foreign" range (2147352576), under 2^31
#: (so no tool reads them as negative), and far from the /etc/subuid ranges that
#: useradd hands out (from 100000). Drawn at random from 268 million ids, so two nodes on
#: one machine practically never draw the same one at the same moment.
PRIVATE_IDS = (0x70000000, 0x7FFDFFFF)
#: Where to draw when PRIVATE_IDS is not mapped in this user namespace (a container).
_FALLBACK_IDS = (1000, 0x7FFFFFFF)
_NEVER = frozenset((0, 65534, 65535, 0xFFFFFFFF))  # root, nobody, 16-bit and 32-bit -1
_DRAWS = 64
#: Private ids this process handed to children still alive (released when one is reaped).
_held_ids: set[int] = set()


def _ranges_in(path: str) -> list[tuple[int, int]] | None:
    """The ids mapped in this user namespace (first column of /proc/self/{uid,gid}_map),
    as inclusive ranges; None where unknown."""
    try:
        with open(path) as f:
            rows = [line.split() for line in f]
        return [(int(r[0]), int(r[0]) + int(r[2]) - 1) for r in rows if len(r) == 3 and int(r[2]) > 0]
    except (OSError, ValueError):
        return None


def _sub_ranges() -> list[tuple[int, int]]:
    """/etc/subuid and /etc/subgid ranges: ids that rootless containers run processes as."""
    out = []
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                for line in f:
                    parts = line.strip().split(":")
                    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                        out.append((int(parts[1]), int(parts[1]) + int(parts[2]) - 1))
        except OSError:
            pass
    return out


def _ids_in_use() -> set[int]:
    """Every uid and gid (real, effective, saved, filesystem) that a process visible here
    holds (/proc/<pid>/status)."""
    used: set[int] = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return used
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                for line in f:
                    if line.startswith((b"Uid:", b"Gid:")):
                        used.update(int(v) for v in line.split()[1:])
        except (OSError, ValueError):
            pass  # gone meanwhile
    return used


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return out


def private_id(reserved=frozenset(), ranges: Sequence[tuple[int, int]] | None = None) -> int | None:
    """An id that is free as both a uid and a gid, for one child to run as: mapped in this
    user namespace, in no user or group database (NSS), in no /etc/subuid or /etc/subgid
    range, held by no process (as any of its uids or gids), not in `reserved` (ids handed
    to children that may not have switched yet), and none of 0, 65534, 65535, 2^32 - 1.
    Drawn at random from `ranges` (inclusive; default PRIVATE_IDS, or, where that is not
    mapped here, 1000..2^31 - 1). None: no such id found in 64 draws. Blocking (NSS, /proc):
    call from a thread."""
    mapped = [(0, 0xFFFFFFFE)]
    for path in ("/proc/self/uid_map", "/proc/self/gid_map"):
        got = _ranges_in(path)
        if got is not None:
            mapped = _intersect(mapped, got)
    if ranges is None:
        spans = _intersect(mapped, [PRIVATE_IDS]) or _intersect(mapped, [_FALLBACK_IDS])
    else:
        spans = _intersect(mapped, list(ranges))
    total = sum(hi - lo + 1 for lo, hi in spans)
    if total == 0:
        return None
    if total <= _DRAWS:
        candidates = [i for lo, hi in spans for i in range(lo, hi + 1)]
    else:
        candidates = []
        for _ in range(_DRAWS):
            k = secrets.randbelow(total)
            for lo, hi in spans:
                if k <= hi - lo:
                    candidates.append(lo + k)
                    break
                k -= hi - lo + 1
    in_use, subs = _ids_in_use(), _sub_ranges()
    for i in candidates:
        if i in _NEVER or i in reserved or i in in_use or any(lo <= i <= hi for lo, hi in subs):
            continue
        try:
            pwd.getpwuid(i)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(i)
            continue
        except KeyError:
            pass
        return i
    return None


def _nobody() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _resolve_user(user: str | int) -> tuple[int, int]:
    if isinstance(user, int):
        try:
            return user, pwd.getpwuid(user).pw_gid
        except KeyError:
            return user, user
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def _bad_reply(what: str) -> SandboxFailure:
    return SandboxFailure("crash", f"child broke the protocol: {what}")


class _ChildProcess:
    """A child started from the trio thread itself, not from a worker thread as
    trio.lowlevel.open_process does: the child's PR_SET_PDEATHSIG fires when the thread
    that forked it exits, and trio's idle worker threads exit after 10 s, which killed
    long-lived children. The part of trio.Process the sandbox uses: pid, returncode,
    wait, kill, send_signal and the stdin/stdout/stderr streams (trio FdStreams).
    Forking blocks the event loop for a few milliseconds."""

    def __init__(self, argv: list[str], *, cwd: str, env: dict[str, str],
                 pass_fds: Sequence[int] = ()):
        pipes = [os.pipe() for _ in range(3)]  # (read, write) each
        child_ends = (pipes[0][0], pipes[1][1], pipes[2][1])
        try:
            self._popen = subprocess.Popen(argv, stdin=child_ends[0], stdout=child_ends[1],
                                           stderr=child_ends[2], cwd=cwd, env=env,
                                           start_new_session=True, close_fds=True,
                                           pass_fds=tuple(pass_fds))
        except BaseException:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            raise
        for fd in child_ends:
            os.close(fd)
        self.pid = self._popen.pid
        self.stdin = trio.lowlevel.FdStream(pipes[0][1])
        self.stdout = trio.lowlevel.FdStream(pipes[1][0])
        self.stderr = trio.lowlevel.FdStream(pipes[2][0])
        try:
            self._pidfd: int | None = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        if self._popen.poll() is None:
            if self._pidfd is not None:
                await trio.lowlevel.wait_readable(self._pidfd)
            else:
                while self._popen.poll() is None:
                    await trio.sleep(0.05)
        rc = self._popen.wait()
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        return rc

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)  # a no-op once the child is reaped

    def kill(self) -> None:
        self._popen.kill()


class Sandbox:
    """One publisher's child process. Use through `SandboxPool.get`; one request at a time
    (`lock` serialises callers; the runner holds it for a whole shard)."""

    def __init__(self, publisher: bytes, config: SandboxConfig, nursery: trio.Nursery):
        self.publisher = publisher
        self.config = config
        self._nursery = nursery
        self.lock = trio.Lock()
        self._proc: _ChildProcess | None = None
        self._fdsock: socket.socket | None = None
        self._share_changed = trio.Event()
        self._workdir: str | None = None
        self._held_id: int | None = None    # the private uid/gid of the current child
        self._stderr_tail = bytearray()
        self._killed_for: tuple[str, str] | None = None
        self._loaded: ModelInfo | None = None
        self._cpu_s = 0.0
        self._oom_before: int | None = None
        self._cgroup: str | None = None     # the current child's cgroup v2 (cgroups.py)
        self._cgroup_ooms = 0               # OOM kills in it, read when the child was reaped
        self.hello: dict | None = None
        self.starts = 0
        self.closed = False
        self.cpu_share = config.cpu_share
        self.stopped_s = 0.0                # time the duty cycle kept the child stopped
        self._validated: OrderedDict[tuple, dict] = OrderedDict()
        self.start_ms: float | None = None
        self._rx = bytearray()              # bytes read from the child past the last frame
        self._digests: list[tuple[bytes, bytes]] = []  # (model object, SHA-256), newest last
        self.last_validate_ms = 0.0
        self.last_shard_end: dict | None = None  # the child's last "end" reply (tests)
        self._arena: tuple[tuple, OutputArena] | None = None  # kept for the next shard alike

    # --- lifecycle ----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def loaded(self) -> ModelInfo | None:
        return self._loaded

    def model_digest(self, model: bytes) -> bytes:
        """SHA-256 of `model`, remembered for the last few model objects (by identity; bytes
        are immutable): hashing a 7 MB model costs ~10 ms, once per shard otherwise."""
        for obj, digest in self._digests:
            if obj is model:
                return digest
        digest = hashlib.sha256(model).digest()
        if isinstance(model, bytes):
            self._digests = [*self._digests[-3:], (model, digest)]
        return digest

    def threads_for(self, requested: int) -> int:
        """onnxruntime intra-op threads for a request of `requested`: at most max_threads
        and ceil(cpu_share x cores), at least 1 (threads do not change outputs)."""
        cfg = self.config
        by_share = math.ceil(self.cpu_share * cfg.cores - 1e-9)
        return max(1, min(int(requested), cfg.max_threads, by_share))

    @property
    def cpu_limit(self) -> float | None:
        """CPU-seconds per second the duty cycle allows the child (None: not limited)."""
        return None if self.cpu_share >= 1 else self.cpu_share * self.config.cores

    def set_cpu_share(self, share: float) -> None:
        """Change the CPU share (the policy changed); takes effect within 50 ms; the
        thread cap applies from the next model load."""
        if not (isinstance(share, (int, float)) and 0 < share <= 1):
            raise ValueError(f"cpu_share must be in (0, 1], got {share!r}")
        self.cpu_share = float(share)
        self._share_changed.set()
        if self._cgroup is not None:
            try:
                cgroups.set_cpus(self._cgroup, self.cpu_share * self.config.cores)
            except OSError as e:
                log.warning("cpu.max of %s not changed: %s", self._cgroup, e)

    async def start(self) -> dict:
        """Start the child if it is not running; returns its hello frame."""
        if self.closed:
            raise RuntimeError("sandbox is closed")
        if self.alive and self.hello is not None:
            return self.hello
        if self._proc is not None:
            await self._kill("crash", "stale child")
        cfg = self.config
        uid, gid, ids = await self._child_ids()
        try:
            self._workdir = tempfile.mkdtemp(prefix="p2pfleet-sandbox-")  # empty, 0700, ours
        except BaseException:
            self._release_id()
            raise
        settings = {
            "memory_mb": cfg.memory_mb, "max_frame": cfg.max_frame, "isolation": cfg.isolation,
            "uid": uid, "gid": gid, "ids": ids, "nofile": cfg.nofile, "nproc": cfg.nproc,
            "cpu_hard_s": cfg.cpu_hard_s, "nice": cfg.nice, "debug": cfg.debug,
            "parent_pid": os.getpid(), "max_threads": cfg.max_threads,
            "confine_fs": cfg.confine_fs,
        }
        env = {
            "PATH": os.defpath, "PYTHONPATH": _PKG_ROOT, "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONFAULTHANDLER": "1", "MALLOC_ARENA_MAX": "2",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        }
        # The shard memfds go to the child over this socket (shm.py); its end is the
        # child's only inherited fd besides stdin, stdout and stderr.
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent_sock.set_inheritable(False)
        settings["fd_sock"] = child_sock.fileno()
        self._stderr_tail.clear()
        self._rx.clear()
        self._killed_for = None
        self._loaded = None
        self.hello = None
        t0 = trio.current_time()
        try:
            proc = _ChildProcess([cfg.python, "-s", "-B", "-m", "p2pfleet.exec.child",
                                  json.dumps(settings)], cwd=self._workdir, env=env,
                                 pass_fds=(child_sock.fileno(),))
        except BaseException:
            parent_sock.close()
            self._release_id()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            raise
        finally:
            child_sock.close()
        self._proc = proc
        self._fdsock = parent_sock
        self._cgroup_ooms = 0
        self._cgroup = self._join_cgroup(proc.pid)  # before the child can load a model
        self.starts += 1
        for stream in (proc.stdin, proc.stdout):
            _grow_pipe(stream.fileno())
        self._nursery.start_soon(self._drain_stderr, proc)
        try:
            with trio.fail_after(cfg.start_timeout_s):
                hello, _ = await self._recv()
        except trio.TooSlowError:
            await self._kill("crash", f"child did not start within {cfg.start_timeout_s} s")
            raise SandboxFailure("crash", f"child did not start within {cfg.start_timeout_s} s") from None
        except SandboxFailure:
            raise
        except BaseException:
            await self._kill("crash", "start abandoned by the node")  # e.g. cancelled
            raise
        if hello.get("hello") != 1 or not isinstance(hello.get("warnings"), list):
            await self._kill("crash", "bad hello")
            raise _bad_reply("bad hello frame")
        self.hello = hello
        self._cpu_s = 0.0
        self._oom_before = _oom_kills()
        self._nursery.start_soon(self._duty_cycle, proc)
        for w in hello["warnings"]:
            log.warning("sandbox child %s: %s", proc.pid, w)
        self.start_ms = (trio.current_time() - t0) * 1000
        log.info("sandbox child %s started in %.0f ms: net=%s fs=%s ids=%s user=%s seccomp=%s "
                 "cgroup=%s", proc.pid, self.start_ms, hello.get("net"), hello.get("fs"),
                 hello.get("ids"), hello.get("user"), hello.get("seccomp"), self._cgroup)
        return hello

    def _join_cgroup(self, pid: int) -> str | None:
        """Move the new child into a cgroup of its own (memory.max, cpu.max, pids.max);
        None where there is none (the pool said why at start) or this one failed."""
        home, _why = cgroups.home()
        if home is None:
            return None
        cfg = self.config
        try:
            leaf = home.create((cfg.cgroup_memory_mb or cfg.memory_mb) * MiB,
                               self.cpu_share * cfg.cores, max(cfg.nproc, cfg.max_threads + 16))
        except OSError as e:
            log.warning("sandbox child %s gets no cgroup: %s", pid, e)
            return None
        try:
            cgroups.enter(leaf, pid)
        except OSError as e:
            cgroups.remove(leaf)
            log.warning("sandbox child %s gets no cgroup: %s", pid, e)
            return None
        return leaf

    @property
    def cgroup(self) -> str | None:
        """The current child's cgroup v2 directory (None: rlimits only)."""
        return self._cgroup

    @property
    def confinement(self) -> dict | None:
        """What confines the current child, from its hello (None before it started):
        net ("netns", "userns+netns" or "host"), fs ("chroot" or "host"), ids ("private":
        a uid/gid of its own, only root can signal it; "shared": a configured user, or
        nobody when no private id was free; "node": the node's own uid, not root), user and
        seccomp ("filter" or "none")."""
        hello = self.hello
        if hello is None:
            return None
        return {k: hello.get(k) for k in ("net", "fs", "ids", "user", "seccomp")}

    async def _child_ids(self) -> tuple[int, int, str]:
        """The uid, gid and kind of ids ("private", "shared", "node") of the next child:
        see SandboxConfig.user. A private id is held until the child is reaped."""
        self._release_id()
        if os.geteuid() != 0:
            uid = os.getuid()
            if uid == _nobody()[0]:
                log.warning("the node runs as nobody: every process running as nobody can stop "
                            "or kill its sandbox children; run it as a dedicated user, or as root")
            return uid, os.getgid(), "node"
        if self.config.user is not None:
            uid, gid = _resolve_user(self.config.user)
            return uid, gid, "shared"
        while True:
            pick = await trio.to_thread.run_sync(private_id, frozenset(_held_ids))
            if pick is None:
                uid, gid = _nobody()
                log.warning("no free private uid/gid for a sandbox child (see PRIVATE_IDS): it "
                            "runs as nobody, and every process running as nobody can stop or "
                            "kill it")
                return uid, gid, "shared"
            if pick not in _held_ids:  # else another child took it meanwhile: draw again
                _held_ids.add(pick)
                self._held_id = pick
                return pick, pick, "private"

    def _release_id(self) -> None:
        if self._held_id is not None:
            _held_ids.discard(self._held_id)
            self._held_id = None

    async def _duty_cycle(self, proc: _ChildProcess, period: float = 0.05, burst_s: float = 0.1) -> None:
        """Hold the child to `cpu_limit` CPU-seconds per second: a token bucket filled at
        that rate (at most `burst_s` seconds' worth); when the child's CPU time runs ahead
        of it, SIGSTOP it until the bucket is back at zero, then SIGCONT. Ends with the child."""
        tick = 1.0 / os.sysconf("SC_CLK_TCK")
        last = _proc_cpu_s(proc.pid, tick)
        t_last = trio.current_time()
        credit = 0.0
        while last is not None and proc.returncode is None:
            if self.cpu_limit is None:
                # Nothing to enforce: no wake-ups (they cost the child's cores) until the
                # share changes or the child is reaped.
                self._share_changed = trio.Event()
                await self._share_changed.wait()
                last, t_last, credit = _proc_cpu_s(proc.pid, tick), trio.current_time(), 0.0
                continue
            await trio.sleep(period)
            used, now = _proc_cpu_s(proc.pid, tick), trio.current_time()
            if used is None or proc.returncode is not None:
                return
            rate = self.cpu_limit
            if rate is None:
                credit = 0.0
            else:
                credit = min(credit + rate * (now - t_last) - (used - last), rate * burst_s)
            last, t_last = used, now
            if credit >= 0:
                continue
            pause = -credit / rate
            try:
                proc.send_signal(signal.SIGSTOP)  # a no-op once the child is reaped
                await trio.sleep(pause)
            finally:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGCONT)
                self.stopped_s += pause

    async def _drain_stderr(self, proc: _ChildProcess) -> None:
        """Keep the last 4 KiB of the child's stderr (for crash details); log a little."""
        logged = 0
        try:
            while True:
                chunk = await proc.stderr.receive_some(65536)
                if not chunk:
                    return
                self._stderr_tail += chunk
                del self._stderr_tail[:-4096]
                if logged < 64 * 1024:
                    logged += len(chunk)
                    log.debug("sandbox child %s stderr: %s", proc.pid,
                              chunk.decode("utf-8", "replace").rstrip())
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        finally:
            with trio.CancelScope(shield=True):
                await proc.stderr.aclose()

    async def _kill(self, reason: str, detail: str) -> None:
        """SIGKILL the child and reap it (shielded: runs even while being cancelled)."""
        proc = self._proc
        if proc is None:
            return
        if self._killed_for is None:
            self._killed_for = (reason, detail)
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
            await self._reap()

    async def _reap(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                await proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    await stream.aclose()
            if self._cgroup is not None:
                leaf, self._cgroup = self._cgroup, None
                self._cgroup_ooms = cgroups.oom_kills(leaf)
                with trio.move_on_after(2):  # empties as the child's threads go
                    while not cgroups.remove(leaf):
                        await trio.sleep(0.01)
        self._proc = None
        self._loaded = None
        if self._fdsock is not None:
            self._fdsock.close()
            self._fdsock = None
        self._share_changed.set()  # ends the duty cycle's wait
        self._release_id()  # a process it left behind still holds it: private_id skips it
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return proc.returncode

    async def aclose(self) -> None:
        """Ask the child to exit; kill it if it does not within 2 s."""
        self.closed = True
        self._drop_arena()
        proc = self._proc
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                try:
                    with trio.move_on_after(2):
                        await self._send({"op": "exit"})
                        await proc.stdin.aclose()
                        await proc.wait()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await self._kill("crash", "closed")

    async def restart(self) -> None:
        """Kill the child now; the next request starts a fresh one."""
        await self._kill("crash", "restarted by the node")
        await self._reap()

    # --- frames (layout in child.py) ---------------------------------------------------
    async def _send(self, msg: dict, blobs: list[memoryview] = ()) -> None:
        meta = msgpack.packb(msg, use_bin_type=True)
        payload_len = sum(b.nbytes for b in blobs)
        if len(meta) > META_MAX or len(meta) + payload_len > self.config.max_frame:
            raise SandboxFailure("input_error", f"request of {len(meta) + payload_len} bytes "
                                 f"exceeds the {self.config.max_frame}-byte frame cap")
        head = HEADER.pack(len(meta), payload_len) + meta
        if payload_len <= 256 * 1024:
            # One write, straight into the pipe when it has room (a grant during a shard
            # always does): send_all would first yield to the scheduler, an event-loop
            # round per control frame.
            data = b"".join([head, *blobs])
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                sent = os.write(self._proc.stdin.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError as e:  # EPIPE: the child is gone; EBADF: killed meanwhile
                raise trio.BrokenResourceError(str(e)) from None
            if sent < len(data):
                await self._proc.stdin.send_all(memoryview(data)[sent:])
            return
        await self._proc.stdin.send_all(head)
        for b in blobs:
            if b.nbytes:
                await self._proc.stdin.send_all(b)

    async def _read_into(self, buf: bytearray) -> None:
        """Fill `buf` from the child's stdout. Reads ask for at least 64 KiB, so a small
        reply's header, meta and payload usually arrive in one read; bytes past `buf` wait
        in `_rx` for the next call. The pipe is read directly (non-blocking, as trio set
        it), waiting only when it is empty: FdStream.receive_some yields to the scheduler
        first and then usually finds it empty, two event-loop rounds per reply where one
        does (the node's CPU per mlp784 shard went mostly to such rounds)."""
        view, got, n = memoryview(buf), 0, len(buf)
        if self._rx:
            got = min(n, len(self._rx))
            view[:got] = self._rx[:got]
            del self._rx[:got]
        stdout = self._proc.stdout
        while got < n:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                chunk = os.read(stdout.fileno(), min(max(n - got, 65536), 4 * MiB))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(stdout.fileno())
                continue
            except OSError as e:  # closed under us (the child was killed meanwhile)
                raise trio.ClosedResourceError(str(e)) from None
            if not chunk:
                raise EOFError
            take = min(len(chunk), n - got)
            view[got:got + take] = chunk[:take] if take < len(chunk) else chunk
            got += take
            if take < len(chunk):
                self._rx += chunk[take:]

    async def _recv(self) -> tuple[dict, bytearray]:
        """One frame: (meta map, payload)."""
        try:
            head = bytearray(HEADER.size)
            await self._read_into(head)
            meta_len, payload_len = HEADER.unpack(head)
            if meta_len > META_MAX or meta_len + payload_len > self.config.max_frame:
                await self._kill("crash", "oversized reply")
                raise _bad_reply(f"reply of {meta_len} + {payload_len} bytes exceeds the caps")
            meta = bytearray(meta_len)
            await self._read_into(meta)
            payload = bytearray(payload_len)
            await self._read_into(payload)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            raise await self._died() from None
        try:
            msg = msgpack.unpackb(meta, raw=False)
        except Exception as e:  # noqa: BLE001 - the child is not trusted to be well-formed
            await self._kill("crash", "undecodable reply")
            raise _bad_reply(f"undecodable reply ({type(e).__name__})") from None
        if not isinstance(msg, dict):
            await self._kill("crash", "reply not a map")
            raise _bad_reply("reply is not a map")
        return msg, payload

    async def _died(self) -> SandboxFailure:
        """The child went away: reap it and say why."""
        proc = self._proc
        killed_for = self._killed_for
        oom_before = self._oom_before
        rc = await self._reap() if proc is not None else None
        if killed_for is not None:
            return SandboxFailure(*killed_for)
        tail = self._stderr_tail.decode("utf-8", "replace").strip().splitlines()
        last = tail[-1][:160] if tail else ""
        if rc is not None and rc < 0:
            sig = -rc
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            if sig == signal.SIGXCPU:
                return SandboxFailure("timeout", "child exceeded its CPU time limit (SIGXCPU)")
            if sig == signal.SIGALRM:
                return SandboxFailure("timeout", "validation passed its wall-clock limit (SIGALRM)")
            if sig == signal.SIGKILL and self._cgroup_ooms > 0:
                return SandboxFailure("out_of_memory", "child killed by its cgroup's OOM killer "
                                      "(memory.max)")
            if sig == signal.SIGKILL:
                oom_after = _oom_kills()
                if oom_before is not None and oom_after is not None and oom_after > oom_before:
                    return SandboxFailure("out_of_memory", "child killed by the kernel's OOM killer")
            return SandboxFailure("crash", f"child killed by {name}" + (f" ({last})" if last else ""))
        return SandboxFailure("crash", f"child exited with status {rc}" + (f" ({last})" if last else ""))

    async def _call(self, msg: dict, timeout_s: float, blobs: list[memoryview] = ()) -> tuple[dict, bytearray]:
        """One request and its reply (meta, payload), under the parent's backstop deadline."""
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise SandboxFailure("timeout", "no time left for the request")
        await self.start()
        if msg.get("op") == "load" or self._oom_before is None:
            # Read per load, not per request (~0.1 ms): a SIGKILL after this, while the
            # kernel's OOM kill count grew, is taken for an OOM kill.
            self._oom_before = _oom_kills()
        try:
            with trio.fail_after(timeout_s):
                try:
                    await self._send(msg, blobs)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise await self._died() from None
                reply, payload = await self._recv()
        except trio.TooSlowError:
            detail = f"no reply within {timeout_s:.3g} s: child killed"
            await self._kill("timeout", detail)
            raise SandboxFailure("timeout", detail) from None
        except SandboxFailure:
            raise
        except BaseException:
            # Cancelled (or worse) mid-request: the pipe is out of step.
            await self._kill("crash", "request abandoned by the node")
            raise
        if reply.get("ok") is True:
            return reply, payload
        reason, detail = reply.get("reason"), reply.get("detail")
        if reason not in REASONS or not isinstance(detail, str):
            await self._kill("crash", "bad failure reply")
            raise _bad_reply("malformed failure reply")
        if reason in ("out_of_memory", "timeout", "internal"):
            # The child's heap or the stream may be in a bad state: start afresh next time.
            await self._kill(reason, detail)
        raise SandboxFailure(reason, detail)

    # --- requests -----------------------------------------------------------------------
    async def load(self, model: bytes, key: str, *, opt_level: str, provider: str, threads: int,
                   timeout_s: float) -> ModelInfo:
        """Load a model (a no-op if this key is loaded). `key` names model + settings.
        `threads` is capped by `threads_for` (the thread count is part of the loaded key)."""
        threads = self.threads_for(threads)
        key = f"{key}#t{threads}"
        if self.alive and self._loaded is not None and self._loaded.key == key:
            return self._loaded
        self._loaded = None  # a failed load leaves the child without a session
        if self.alive and self._cpu_s > 0.8 * self.config.cpu_hard_s:
            await self.restart()  # a fresh child before its lifetime CPU limit ends a shard
        reply, _ = await self._call({"op": "load", "model": [0, len(model)], "key": key,
                                     "opt_level": opt_level, "provider": provider,
                                     "threads": threads, "timeout_s": timeout_s},
                                    timeout_s + self.config.kill_grace_s, [memoryview(model)])
        try:
            info = ModelInfo(
                key=key,
                inputs=tuple(TensorSpec(n, _ORT_TO_DTYPE[t], tuple(s)) for n, t, s in reply["inputs"]),
                outputs=tuple(TensorSpec(n, _ORT_TO_DTYPE[t], tuple(s)) for n, t, s in reply["outputs"]),
                load_ms=float(reply["ms"]))
        except (KeyError, TypeError, ValueError):
            await self._kill("crash", "bad load reply")
            raise _bad_reply("malformed load reply") from None
        self._loaded = info
        return info

    async def validate(self, model: bytes, input_shapes: Mapping[str, Sequence[int]],
                       limits: ModelLimits | None = None, *, timeout_s: float = 30.0) -> ValidatedModel:
        """`validate_model(model, input_shapes, limits)` run in the child, under its
        address-space, CPU-time and (SIGALRM) wall-clock limits, so no model can make the
        node itself run out of memory or hang. Returns the ValidatedModel (its model_bytes
        the bytes given here) or raises ModelRefused (the rule, as validate_model would);
        what stops the child raises SandboxFailure (`out_of_memory`, `timeout`, `crash`;
        the child is gone and the next request starts a new one). Results are cached per
        model digest, shapes and limits (validation is deterministic)."""
        if isinstance(model, (bytearray, memoryview)):
            model = bytes(model)
        if not isinstance(model, bytes):
            raise TypeError(f"model must be bytes, not {type(model).__name__}")
        limits = limits if limits is not None else ModelLimits()
        try:
            shapes = {str(k): [int(d) for d in v] for k, v in input_shapes.items()}
        except (TypeError, ValueError, AttributeError):
            raise ModelRefused("input-mismatch", "input shapes must map names to lists of "
                               "integers") from None
        digest = self.model_digest(model)
        ckey = (digest, tuple(sorted((k, tuple(v)) for k, v in shapes.items())), limits)
        result = self._validated.get(ckey)
        self.last_validate_ms = 0.0
        if result is None:
            reply, _ = await self._call(
                {"op": "validate", "model": [0, len(model)], "shapes": shapes,
                 "limits": dataclasses.asdict(limits), "timeout_s": timeout_s},
                timeout_s + self.config.kill_grace_s, [memoryview(model)])
            result = {k: reply.get(k) for k in ("valid", "refused", "ms")}
            try:
                self._build_validated(model, digest, result)  # well-formed before caching
            except ModelRefused:
                pass
            except (KeyError, TypeError, ValueError):
                await self._kill("crash", "bad validate reply")
                raise _bad_reply("malformed validate reply") from None
            self._validated[ckey] = result
            while len(self._validated) > 16:
                self._validated.popitem(last=False)
            self.last_validate_ms = float(result.get("ms") or 0.0)
        return self._build_validated(model, digest, result)

    @staticmethod
    def _build_validated(model: bytes, digest: bytes, result: dict) -> ValidatedModel:
        refused = result.get("refused")
        if refused is not None:
            rule, reason = refused["rule"], refused["reason"]
            node, tensor = refused.get("node"), refused.get("tensor")
            if not (isinstance(rule, str) and isinstance(reason, str)
                    and all(v is None or isinstance(v, str) for v in (node, tensor))):
                raise ValueError("refusal")
            raise ModelRefused(rule, reason, node=node, tensor=tensor)  # unknown rule: ValueError
        v = result["valid"]

        def specs(items) -> tuple:
            out = []
            for name, elem, shape, nbytes in items:
                if not (isinstance(name, str) and isinstance(elem, int) and isinstance(nbytes, int)
                        and all(isinstance(d, int) and d >= 0 for d in shape)):
                    raise ValueError(name)
                out.append(ValidatedSpec(name, elem, tuple(shape), nbytes))
            return tuple(out)

        if v["digest"] != digest:
            raise ValueError("digest")
        ints = ("ir_version", "opset", "node_count", "constant_bytes", "total_bytes",
                "peak_bytes", "macs")
        if not all(isinstance(v[k], int) for k in ints) or not (
                v["ml_opset"] is None or isinstance(v["ml_opset"], int)):
            raise ValueError("fields")
        return ValidatedModel(model_bytes=model, digest=digest, inputs=specs(v["inputs"]),
                              outputs=specs(v["outputs"]), op_types=tuple(map(str, v["op_types"])),
                              ml_opset=v["ml_opset"], **{k: v[k] for k in ints})

    @staticmethod
    def _run_request(inputs: Mapping[str, np.ndarray], timeout_s: float) -> tuple[dict, list]:
        wire, blobs, offset = [], [], 0
        for name, arr in inputs.items():
            a = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")
            wire.append([name, a.dtype.name, list(a.shape), [offset, a.nbytes]])
            blobs.append(memoryview(a).cast("B") if a.nbytes else memoryview(b""))
            offset += a.nbytes
        return {"op": "run", "inputs": wire, "timeout_s": timeout_s}, blobs

    async def _run_reply(self, info: ModelInfo, reply: dict, payload: bytearray
                         ) -> tuple[dict[str, np.ndarray], float]:
        outputs: dict[str, np.ndarray] = {}
        try:
            items = reply["outputs"]
            for name, dtype, shape, (off, nbytes) in items:
                if dtype not in DTYPES or name in outputs or not isinstance(name, str):
                    raise ValueError(name)
                if not all(isinstance(d, int) and d >= 0 for d in shape):
                    raise ValueError(name)
                dt = np.dtype(dtype).newbyteorder("<")
                if not (isinstance(off, int) and isinstance(nbytes, int) and 0 <= off
                        and off + nbytes <= len(payload) and nbytes == math.prod(shape) * dt.itemsize):
                    raise ValueError(name)
                outputs[name] = np.frombuffer(payload, dtype=dt, count=nbytes // dt.itemsize,
                                              offset=off).reshape(shape)
            if [o.name for o in info.outputs] != [i[0] for i in items]:
                raise ValueError("names")
            ms = float(reply["ms"])
            self._cpu_s = float(reply["cpu_s"])
        except (KeyError, TypeError, ValueError):
            await self._kill("crash", "bad run reply")
            raise _bad_reply("malformed run reply") from None
        return outputs, ms

    async def _failed_reply(self, reply: dict) -> SandboxFailure:
        reason, detail = reply.get("reason"), reply.get("detail")
        if reason not in REASONS or not isinstance(detail, str):
            await self._kill("crash", "bad failure reply")
            return _bad_reply("malformed failure reply")
        if reason in ("out_of_memory", "timeout", "internal"):
            await self._kill(reason, detail)
        return SandboxFailure(reason, detail)

    async def run(self, inputs: Mapping[str, np.ndarray], timeout_s: float) -> tuple[dict[str, np.ndarray], float]:
        """Run the loaded model on one micro-batch; returns (outputs, run ms in the child)."""
        info = self._loaded
        if info is None or not self.alive:
            raise SandboxFailure("internal", "run without a loaded model (the child restarted?)")
        msg, blobs = self._run_request(inputs, timeout_s)
        reply, payload = await self._call(msg, timeout_s + self.config.kill_grace_s, blobs)
        return await self._run_reply(info, reply, payload)

    async def run_many(self, batches: Sequence[Mapping[str, np.ndarray]], deadline: float,
                       on_result: Callable[[int, dict[str, np.ndarray], float], bool],
                       depth: int = 2) -> None:
        """Run the loaded model on micro-batches in order, keeping up to `depth` requests
        in the pipe so the child never waits for the parent between micro-batches (each is
        still its own session.run: outputs are those of `run`). `on_result(i, outputs, ms)`
        is called for every micro-batch in order; returning False sends no further
        micro-batches, but those already sent (at most depth - 1: "the micro-batch in
        flight") are still run and passed to `on_result`. `deadline` is on trio's clock.
        Raises SandboxFailure like `run`; with requests still in the pipe the child is then
        killed (restarted on next use)."""
        info = self._loaded
        if info is None or not self.alive:
            raise SandboxFailure("internal", "run without a loaded model (the child restarted?)")
        if depth < 1:
            raise ValueError("depth must be >= 1")
        slots = trio.Semaphore(depth)
        sent = replies = 0
        more = True
        sending = False           # a frame may be half written (the pipe is out of step)
        sender_done = trio.Event()
        wake = trio.Event()       # the receiver waits here for something to read
        failure: list[SandboxFailure] = []

        async def sender() -> None:
            nonlocal sent, sending
            try:
                for batch in batches:
                    await slots.acquire()
                    left = deadline - trio.current_time()
                    if not more or left <= 0:
                        return
                    msg, blobs = self._run_request(batch, left)
                    sending = True
                    try:
                        await self._send(msg, blobs)
                    except SandboxFailure as e:  # over the frame cap: nothing was written
                        sending = False
                        failure.append(e)
                        return
                    sending = False
                    sent += 1
                    wake.set()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the child went away: the receiver learns why
            finally:
                sender_done.set()
                wake.set()

        try:
            with trio.fail_at(deadline + self.config.kill_grace_s):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender)
                    try:
                        while True:
                            while replies == sent and not sender_done.is_set():
                                wake = trio.Event()
                                await wake.wait()
                            if replies == sent:
                                break  # the sender stopped and every reply is in
                            reply, payload = await self._recv()
                            replies += 1
                            if reply.get("ok") is not True:
                                failure.append(await self._failed_reply(reply))
                                break
                            outs, ms = await self._run_reply(info, reply, payload)
                            if not on_result(replies - 1, outs, ms):
                                more = False
                            slots.release()
                    except SandboxFailure as e:
                        failure.append(e)
                    nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            detail = f"no reply within the deadline (+{self.config.kill_grace_s:.3g} s): child killed"
            await self._kill("timeout", detail)
            raise SandboxFailure("timeout", detail) from None
        except BaseException:
            await self._kill("crash", "request abandoned by the node")  # cancelled mid-request
            raise
        if failure:
            e = failure[0]
            if sending or sent > replies:
                await self._kill(e.reason, e.detail)  # replies still due, or half a frame
            raise e
        if more and replies < len(batches):
            raise SandboxFailure("timeout", "the deadline passed between micro-batches")

    async def run_shared(self, inputs: SharedArrays, rows: Sequence[tuple[int, int]],
                         outputs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
                         deadline: float,
                         on_result: Callable[[int, dict[str, np.ndarray], float], bool],
                         depth: int = 2, ahead_s: float = 0.1) -> None:
        """Run the loaded model on micro-batches `rows` ([start, stop) of every input in
        `inputs`, consecutive) over shared memory (shm.py): one request for the whole
        shard, the inputs mapped read-only by the child, the outputs written by it into an
        arena of exactly the size `outputs` ((name, dtype, shape beyond axis 0): validation's
        inferred outputs) allow for these rows (the last shard's arena when its layout and
        rows were the same: `_output_arena`). Only small control frames cross the pipe.

        Each micro-batch's outputs are copied out of the arena (the child could still
        write there) before `on_result(i, outputs, ms)` sees them, in order. Flow control:
        the child runs micro-batch i only once granted; the first `depth` are, and the
        grant is kept about `ahead_s` seconds of micro-batches (at least `depth`; 32
        before the first reply) ahead of the results seen, so the child neither waits for
        the node (it replies every 30 ms: child.FLUSH_S) nor runs far past a stop.
        on_result returning False stops the shard like run_many: the micro-batch queued
        behind is still passed to it, any later one the child finished is dropped. A reply
        that claims an output other than the one the layout bounds (a larger shape above
        all) is a protocol breach: the child is killed (`crash`). Raises SandboxFailure
        like run_many."""
        info = self._loaded
        if info is None or not self.alive:
            raise SandboxFailure("internal", "run without a loaded model (the child restarted?)")
        if depth < 1 or not rows:
            raise ValueError("depth must be >= 1 and rows non-empty")
        first, n_rows, total = rows[0][0], rows[-1][1] - rows[0][0], len(rows)
        arena = self._output_arena(outputs, n_rows)
        private = {name: np.empty((n_rows, *tail), np.dtype(dt).newbyteorder("<"))
                   for name, dt, tail in outputs}
        bound = {name: (np.dtype(dt).name, list(tail), arena.row_bytes[name])
                 for name, dt, tail in outputs}
        # Granting ahead costs no stop latency (the child checks for a stop between micro-batches)
        # and results past a stop are dropped anyway: start generously, then keep ~ahead_s.
        granted, seen, limit, stopping = min(total, max(2 * depth, 32)), 0, total, False
        completed = False
        try:
            with trio.fail_at(deadline + self.config.kill_grace_s):
                left = deadline - trio.current_time()
                if left <= 0:
                    raise SandboxFailure("timeout", "no time left for the shard")
                if self._oom_before is None:
                    self._oom_before = _oom_kills()
                msg = {"op": "shard", "inputs": inputs.layout, "in_size": inputs.size,
                       "outputs": arena.layout, "out_size": arena.size,
                       "rows": [[int(a), int(b)] for a, b in rows], "grant": granted,
                       "timeout_s": left}
                try:
                    send_fds(self._fdsock, [inputs.fd, arena.fd])
                    await self._send(msg)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    raise await self._died() from None
                while True:
                    reply, payload = await self._recv()
                    if reply.get("ok") is not True:
                        raise await self._failed_reply(reply)  # the child ended the shard
                    if "end" in reply:
                        if reply["end"] != seen or (seen < total and not stopping) or payload:
                            await self._kill("crash", "bad shard end")
                            raise _bad_reply(f"shard ended after {reply['end']!r} micro-batches, "
                                             f"{seen} replies seen")
                        self._cpu_s = float(reply.get("cpu_s", self._cpu_s))
                        self.last_shard_end = reply
                        completed = True
                        break
                    items = reply.get("batches")
                    if not isinstance(items, list) or not items or payload:
                        await self._kill("crash", "bad shard reply")
                        raise _bad_reply("malformed shard reply")
                    ms = 0.0
                    for item in items:
                        i = item.get("batch") if isinstance(item, dict) else None
                        if i != seen or i >= total:
                            await self._kill("crash", "bad shard reply")
                            raise _bad_reply(f"reply for micro-batch {i!r}, {seen} expected")
                        a, b = rows[i]
                        outs = await self._shared_outputs(i, item, b - a, a - first, arena,
                                                          private, bound)
                        try:
                            ms = float(item["ms"])
                        except (KeyError, TypeError, ValueError):
                            await self._kill("crash", "bad shard reply")
                            raise _bad_reply("malformed shard reply") from None
                        seen += 1
                        if i >= limit:
                            continue  # finished past a stop: dropped, as run_many never sent it
                        if not on_result(i, outs, ms) and not stopping:
                            stopping, limit = True, min(limit, i + 2)
                            await self._send({"op": "stop"})
                    if not stopping and granted < total:
                        window = max(depth, min(64, int(ahead_s * 1000 / max(ms, 0.05))))
                        if granted - seen <= max(1, window // 2):
                            granted = min(total, seen + window)
                            await self._send({"op": "grant", "upto": granted})
        except trio.TooSlowError:
            detail = f"no reply within the deadline (+{self.config.kill_grace_s:.3g} s): child killed"
            await self._kill("timeout", detail)
            raise SandboxFailure("timeout", detail) from None
        except SandboxFailure:
            raise
        except BaseException:
            await self._kill("crash", "request abandoned by the node")  # cancelled mid-shard
            raise
        finally:
            if not completed or self._arena is None or self._arena[1] is not arena:
                if self._arena is not None and self._arena[1] is arena:
                    self._arena = None
                arena.close()  # kept only after a shard that ended as the protocol says

    def _output_arena(self, outputs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
                      rows: int) -> OutputArena:
        """An output arena for this layout, the last shard's when it had the same one: a
        fresh memfd costs its set-up and a page allocation per 4 KiB the child writes
        (~1 ms for digits' 3 MB of outputs per shard). Reuse gives this publisher's child
        nothing it could not write itself: the node reads only rows the child reports,
        copied out, as ever."""
        key = (tuple((name, np.dtype(dt).name, tuple(tail)) for name, dt, tail in outputs), rows)
        if self._arena is not None and self._arena[0] == key:
            return self._arena[1]
        self._drop_arena()
        arena = OutputArena(outputs, rows)
        if arena.size <= ARENA_KEEP_MAX:
            self._arena = (key, arena)
        return arena

    def _drop_arena(self) -> None:
        if self._arena is not None:
            self._arena[1].close()
            self._arena = None

    async def _shared_outputs(self, i: int, reply: dict, n: int, row: int, arena: OutputArena,
                              private: dict[str, np.ndarray], bound: dict) -> dict[str, np.ndarray]:
        """Micro-batch i's outputs (n rows from `row` of the arena), checked against what
        the child claims and copied out of the shared mapping."""
        outs: dict[str, np.ndarray] = {}
        try:
            for name, dtype, shape in reply["outputs"]:
                dt, tail, row_bytes = bound[name]
                if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                    raise ValueError(f"output {name!r} with shape {shape!r}")
                claimed = math.prod(shape) * np.dtype(dt).itemsize if dtype in DTYPES else 0
                if claimed > n * row_bytes:
                    raise ValueError(f"micro-batch {i} output {name!r} claimed as {dtype}{shape} "
                                     f"({claimed} bytes), beyond the {n * row_bytes}-byte bound "
                                     f"its validated output shape sets")
                if dtype != dt or shape != [n, *tail] or name in outs:
                    raise ValueError(f"micro-batch {i} output {name!r} claimed as {dtype}{shape}, "
                                     f"the layout holds {dt}{[n, *tail]}")
                dst = private[name][row:row + n]
                dst[...] = arena.rows_of(name, row, row + n)
                outs[name] = dst
            if set(outs) != set(bound):
                raise ValueError(f"micro-batch {i} outputs {sorted(outs)}, {sorted(bound)} expected")
        except (KeyError, TypeError, ValueError) as e:
            detail = str(e) if isinstance(e, ValueError) else "malformed shard reply"
            await self._kill("crash", "bad shard reply")
            raise _bad_reply(detail) from None
        return outs

    async def ping(self, timeout_s: float = 5.0) -> dict:
        return (await self._call({"op": "ping"}, timeout_s))[0]

    async def debug(self, what: str, timeout_s: float = 10.0, **kw) -> dict:
        """A debug request (only when the pool was configured with debug=True)."""
        return (await self._call({"op": "debug", "what": what, **kw}, timeout_s))[0]

    async def kill_now(self) -> None:
        """SIGKILL the child without reaping (tests: a crash mid-shard)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGKILL)


class SandboxPool:
    """The node's children, one per publisher. Create with `open_sandbox_pool`."""

    def __init__(self, config: SandboxConfig, nursery: trio.Nursery):
        self.config = config
        self._nursery = nursery
        if config.clamped:
            log.warning("sandbox limits lowered to what this process may set: %s",
                        "; ".join(config.clamped))
        _home, no_cgroup = cgroups.home()
        if no_cgroup is not None:
            log.warning("sandbox children get no cgroup, only rlimits: %s", no_cgroup)
        no_filter = syscalls.unavailable()
        if no_filter is not None:
            log.warning("sandbox children run without a syscall filter: %s", no_filter)
        self._boxes: OrderedDict[bytes, Sandbox] = OrderedDict()

    async def get(self, publisher: bytes) -> Sandbox:
        """This publisher's sandbox (created on first use; its child starts lazily)."""
        if not isinstance(publisher, bytes) or not publisher:
            raise ValueError("publisher must be non-empty bytes (its public key)")
        box = self._boxes.get(publisher)
        if box is not None:
            self._boxes.move_to_end(publisher)
            return box
        while len(self._boxes) >= self.config.max_children:
            idle = next((k for k, b in self._boxes.items() if not b.lock.locked()), None)
            if idle is None:
                break  # all busy: go over the cap rather than block
            await self.close(idle)
        box = Sandbox(publisher, self.config, self._nursery)
        self._boxes[publisher] = box
        return box

    def set_cpu_share(self, share: float) -> None:
        """The policy's CPU share changed: applies to every child, now and later."""
        if not (isinstance(share, (int, float)) and 0 < share <= 1):
            raise ValueError(f"cpu_share must be in (0, 1], got {share!r}")
        self.config = dataclasses.replace(self.config, cpu_share=float(share))
        for box in self._boxes.values():
            box.set_cpu_share(share)

    async def close(self, publisher: bytes) -> None:
        box = self._boxes.pop(publisher, None)
        if box is not None:
            await box.aclose()

    def __len__(self) -> int:
        return len(self._boxes)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for publisher in list(self._boxes):
                await self.close(publisher)


@asynccontextmanager
async def open_sandbox_pool(config: SandboxConfig | None = None) -> AsyncIterator[SandboxPool]:
    """`async with open_sandbox_pool(cfg) as pool:` children die when the block ends."""
    async with trio.open_nursery() as nursery:
        pool = SandboxPool(config or SandboxConfig(), nursery)
        try:
            yield pool
        finally:
            await pool.aclose()


__all__ = ["SandboxConfig", "SandboxFailure", "Sandbox", "SandboxPool", "open_sandbox_pool",
           "ModelInfo", "TensorSpec", "REASONS", "sandbox_config", "measured_memory_mb",
           "PRIVATE_IDS", "private_id"]
