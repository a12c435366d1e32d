"""The parent side of the sandbox: one long-lived child process per publisher (trio-native).

A `SandboxPool` owns the children and the tasks that drain their stderr; `await
pool.get(publisher)` returns that publisher's `Sandbox`, never shared with another
publisher. A `Sandbox` starts its child lazily (`python -m p2pfleet.exec.child`, see
child.py for what the child does before it loads a model) and talks to it with
framed messages over its stdin/stdout pipes (a msgpack map plus a raw payload for tensor
and model bytes, layout in child.py), capped at `max_frame` bytes each way.

Limits and who enforces them:
- memory: RLIMIT_AS in the child (`memory_mb`, the whole address space: the runtime
  itself takes ~300 MiB of it). An allocation that fails becomes `out_of_memory`; so does a
  child killed by the kernel's OOM killer (SIGKILL while /proc/vmstat's oom_kill grew).
- wall clock: the child's watchdog thread sets RunOptions.terminate at the request's
  deadline (`timeout`); the parent waits `kill_grace_s` longer under trio.fail_after, then
  SIGKILLs the child (`timeout`). Model loading has no terminate flag: only the backstop.
- CPU time: RLIMIT_CPU in the child, re-armed per request to that request's budget
  (wall limit x threads + 5 s); SIGXCPU kills the child (`timeout`).
- anything else that ends the child (a signal, an exit) is a `crash`.
After any of these the child is gone; the next request starts a new one. The sandbox
itself never raises anything but `SandboxFailure` for what the child or model did.

A request cancelled from outside (the caller's cancel scope) leaves the pipe out of step,
so the child is killed (shielded) and the cancellation goes on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pwd
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import trio

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IQ")  # meta length, payload length (see child.py)
META_MAX = 1 << 20
MiB = 1 << 20
REASONS = ("crash", "out_of_memory", "timeout", "invalid_model", "input_error", "internal")
DTYPES = frozenset(("float32", "float64", "float16", "int8", "uint8", "int16", "uint16",
                    "int32", "uint32", "int64", "uint64", "bool"))
ISOLATION = ("auto", "none")
_PKG_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class SandboxConfig:
    """How children are started and limited.

    memory_mb: RLIMIT_AS of a child, MiB (address space, including ~300 MiB of runtime).
    max_frame: largest frame either way, bytes (a model plus its load request must fit).
    isolation: "auto": no network (as root a new network namespace, else a new user + network
      namespace where the kernel allows, else a warning); "none": the child keeps the host's
      network (tests and debugging only).
    user: user name or uid the child switches to when the node runs as root (never root).
    nofile / nproc: RLIMIT_NOFILE; RLIMIT_NPROC (per uid, so shared by the children running
      as that uid; only set after dropping to `user`).
    cpu_hard_s: hard RLIMIT_CPU over a child's life; the pool restarts children nearing it.
    nice: niceness of the child (inference yields to the car's own work).
    start_timeout_s: time for a child to start and say hello.
    kill_grace_s: how long past a request's deadline the parent waits before SIGKILL.
    max_children: children kept at once; the least recently used idle one is closed.
    debug: allow the child's debug requests (tests only).
    """

    memory_mb: int = 2048
    max_frame: int = 512 * MiB
    isolation: str = "auto"
    user: str | int = "nobody"
    nofile: int = 32
    nproc: int = 64
    cpu_hard_s: int = 7 * 24 * 3600
    nice: int = 10
    start_timeout_s: float = 30.0
    kill_grace_s: float = 2.0
    max_children: int = 4
    debug: bool = False
    python: str = sys.executable

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION:
            raise ValueError(f"SandboxConfig.isolation must be one of {ISOLATION}, got {self.isolation!r}")
        for name in ("memory_mb", "max_frame", "nofile", "nproc", "cpu_hard_s", "max_children"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SandboxConfig.{name} must be an integer >= 1, got {v!r}")
        if self.memory_mb < 256:
            raise ValueError(f"SandboxConfig.memory_mb must be >= 256 (the runtime needs ~300 MiB "
                             f"of address space), got {self.memory_mb}")


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


class Sandbox:
    """One publisher's child process. Use through `SandboxPool.get`; one request at a time
    (`lock` serialises callers; the runner holds it for a whole shard)."""

    def __init__(self, publisher: bytes, config: SandboxConfig, nursery: trio.Nursery):
        self.publisher = publisher
        self.config = config
        self._nursery = nursery
        self.lock = trio.Lock()
        self._proc: trio.Process | None = None
        self._workdir: str | None = None
        self._stderr_tail = bytearray()
        self._killed_for: tuple[str, str] | None = None
        self._loaded: ModelInfo | None = None
        self._cpu_s = 0.0
        self._oom_before: int | None = None
        self.hello: dict | None = None
        self.starts = 0
        self.closed = False

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

    async def start(self) -> dict:
        """Start the child if it is not running; returns its hello frame."""
        if self.closed:
            raise RuntimeError("sandbox is closed")
        if self.alive and self.hello is not None:
            return self.hello
        if self._proc is not None:
            await self._kill("crash", "stale child")
        cfg = self.config
        uid, gid = _resolve_user(cfg.user)
        self._workdir = tempfile.mkdtemp(prefix="p2pfleet-sandbox-")  # empty, 0700, ours
        settings = {
            "memory_mb": cfg.memory_mb, "max_frame": cfg.max_frame, "isolation": cfg.isolation,
            "uid": uid, "gid": gid, "nofile": cfg.nofile, "nproc": cfg.nproc,
            "cpu_hard_s": cfg.cpu_hard_s, "nice": cfg.nice, "debug": cfg.debug,
            "parent_pid": os.getpid(),
        }
        env = {
            "PATH": os.defpath, "PYTHONPATH": _PKG_ROOT, "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONFAULTHANDLER": "1", "MALLOC_ARENA_MAX": "2",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        }
        self._stderr_tail.clear()
        self._killed_for = None
        self._loaded = None
        self.hello = None
        t0 = trio.current_time()
        proc = await trio.lowlevel.open_process(
            [cfg.python, "-s", "-B", "-m", "p2pfleet.exec.child", json.dumps(settings)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=self._workdir, env=env, start_new_session=True)
        self._proc = proc
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
        for w in hello["warnings"]:
            log.warning("sandbox child %s: %s", proc.pid, w)
        log.info("sandbox child %s started in %.0f ms: net=%s user=%s", proc.pid,
                 (trio.current_time() - t0) * 1000, hello.get("net"), hello.get("user"))
        return hello

    async def _drain_stderr(self, proc: trio.Process) -> None:
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
        self._proc = None
        self._loaded = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return proc.returncode

    async def aclose(self) -> None:
        """Ask the child to exit; kill it if it does not within 2 s."""
        self.closed = True
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
        if payload_len <= 256 * 1024:  # one write (each send_all is a scheduler checkpoint)
            await self._proc.stdin.send_all(b"".join([head, *blobs]))
            return
        await self._proc.stdin.send_all(head)
        for b in blobs:
            if b.nbytes:
                await self._proc.stdin.send_all(b)

    async def _read_into(self, buf: bytearray) -> None:
        view, got, n = memoryview(buf), 0, len(buf)
        stdout = self._proc.stdout
        while got < n:
            chunk = await stdout.receive_some(min(n - got, 4 * MiB))
            if not chunk:
                raise EOFError
            view[got:got + len(chunk)] = chunk
            got += len(chunk)

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
        """Load a model (a no-op if this key is loaded). `key` names model + settings."""
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

    async def run(self, inputs: Mapping[str, np.ndarray], timeout_s: float) -> tuple[dict[str, np.ndarray], float]:
        """Run the loaded model on one micro-batch; returns (outputs, run ms in the child)."""
        info = self._loaded
        if info is None or not self.alive:
            raise SandboxFailure("internal", "run without a loaded model (the child restarted?)")
        wire, blobs, offset = [], [], 0
        for name, arr in inputs.items():
            a = np.asarray(arr, dtype=arr.dtype.newbyteorder("<"), order="C")
            wire.append([name, a.dtype.name, list(a.shape), [offset, a.nbytes]])
            blobs.append(memoryview(a).cast("B") if a.nbytes else memoryview(b""))
            offset += a.nbytes
        reply, payload = await self._call({"op": "run", "inputs": wire, "timeout_s": timeout_s},
                                          timeout_s + self.config.kill_grace_s, blobs)
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
           "ModelInfo", "TensorSpec", "REASONS"]
