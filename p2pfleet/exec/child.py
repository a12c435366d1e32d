"""The sandbox child: one long-lived process per publisher that runs untrusted ONNX models.

Started by sandbox.py as `python -s -B -m p2pfleet.exec.child '<json settings>'` with a
minimal environment, in a fresh empty working directory, in its own session. It talks to
its parent over stdin/stdout with frames: a 12-byte header (meta length u32, payload length
u64, big-endian), a msgpack map (at most 1 MiB), then a raw payload that the map's
tensors and models point into as [offset, nbytes]. Frames above `max_frame` bytes are
refused. Any stray write of native code to fd 1 goes to stderr: the protocol uses private
duplicates of fds 0 and 1.

Start-up, in this order, before any model is loaded:
1. import what the child needs (the validator and onnx included), except onnxruntime
   (whose import starts a thread);
2. leave the network while still single-threaded: as root, unshare into a fresh network
   namespace (only a loopback interface, down); otherwise a new user + network namespace
   where the kernel allows it; failing that, warn that the child has network access (the
   warning travels in the hello frame to the node's log);
   then import onnxruntime; confine the filesystem: chroot into the working directory (the
   parent made it empty, private and fresh) where the child may (as root, or inside its
   own user namespace, which then loses every capability), else warn that the child can
   read every file its user can; and as root switch for good (real, effective, saved) to
   the uid/gid the parent chose, with no supplementary groups: by default one of its own,
   that no user, group or other process has, so no process but root can signal it (see
   sandbox.private_id). Not root, the child keeps the node's uid. Nothing is imported
   after this step;
3. no new privileges, not dumpable (no ptrace by same-uid processes, no core), killed
   when the parent dies;
4. resource limits: RLIMIT_AS (address space), RLIMIT_CORE 0, RLIMIT_NOFILE small,
   RLIMIT_FSIZE 0 (no file writes), RLIMIT_NPROC when running as a dropped uid,
   RLIMIT_CPU (the soft limit is re-armed before each request to the CPU used so far plus
   that request's budget; SIGXCPU kills the child);
5. the seccomp filter (syscalls.py), last, on every thread: no network sockets, no new
   processes or exec, no kernel interfaces an inference child never needs (libseccomp is
   loaded before the chroot); where it cannot be installed, a warning says so;
6. send the hello frame: {"hello": 1, pid, uid, gid, net, fs, ids, user, warnings,
   seccomp ("filter" or "none"), ort_version}; ids: "private" (a uid/gid of its own), "shared" (a configured user, or
   nobody), "node" (the node's uid: not root).

Requests and replies (every reply has "ok"; failures carry "reason" and "detail"):
- {"op": "load", "model": [offset, nbytes], "key": str, "opt_level", "provider", "threads",
   "timeout_s"} -> {"ok": true, "inputs": [[name, type, shape]], "outputs": [...], "ms"}
- {"op": "run", "inputs": [[name, dtype, shape, [offset, nbytes]]], "timeout_s"}
   -> {"ok": true, "outputs": [[name, dtype, shape, [offset, nbytes]]], "ms", "cpu_s"}
  A watchdog thread sets RunOptions.terminate when timeout_s passes (reason "timeout").
- {"op": "shard", "inputs": [[name, dtype, shape, offset]], "in_size", "outputs": [[name,
   dtype, tail shape, offset]], "out_size", "rows": [[start, stop]], "grant", "timeout_s"}:
   a whole shard on shared memory. Just before this frame the parent sends two fds over
   the fd socket (settings "fd_sock", SOCK_SEQPACKET, SCM_RIGHTS): the sealed input memfd
   (mapped read-only here) and the output memfd (exactly out_size bytes, sealed against
   resizing; mapped writable). Micro-batch i runs rows [start, stop) of every input (views
   of the mapping, no copy) and writes its outputs' rows at offset + (start - rows[0][0]) x
   row bytes; each must be exactly (stop - start, *tail) of that dtype (else invalid_model).
   The child starts micro-batch i only while i < grant; the parent raises it with
   {"op": "grant", "upto"} and ends the shard early with {"op": "stop"} (checked between
   micro-batches; outside a shard both are ignored, without a reply). Replies:
   {"ok": true, "batches": [{"batch": i, "outputs": [[name, dtype, shape]], "ms"}, ...]}:
   the micro-batches finished since the last such frame, in order (sent at most every 30
   ms or 256 KiB of outputs, and before waiting for a grant, to spare the parent
   wake-ups); then
   {"ok": true, "end": micro-batches run, "cpu_s"} (in the same write as the last batches'
   frame), or a failure (which also ends the shard, after the finished micro-batches'
   frame). The watchdog holds the whole shard to timeout_s.
- {"op": "validate", "model": [offset, nbytes], "shapes": {name: [dims]}, "limits": {...
   ModelLimits fields}, "timeout_s"} -> {"ok": true, "valid": {ValidatedModel fields but
   model_bytes}} or {"ok": true, "refused": {"rule", "reason", "node", "tensor"}}. The onnx
   tools cannot be interrupted: a SIGALRM timer (default action: the child dies) ends a
   validation that passes timeout_s, RLIMIT_CPU and RLIMIT_AS bound it as they bound runs.
- {"op": "ping"} -> {"ok": true, "pid", "cpu_s"}
- {"op": "exit"}: exit 0 (so does end of input).
- {"op": "debug", "what": ...}: only when started with "debug": true (tests): "whoami",
  "connect" (host, port), "attempt" (call: a syscall the filter refuses), "touch" (mb resident), "sleep" (s), "rlimits", "open" (path), "spin" (s of CPU),
  "lie" (claim every later shard output `factor` times larger than it is), "write_input"
  (try to write the next shard's input memfd; the result is reported in its "end" reply).
Failure reasons: out_of_memory, timeout, invalid_model, input_error, internal.
"""

from __future__ import annotations

# Everything the child needs is imported up front: see step 1 above.
import ctypes
import encodings.idna  # noqa: F401  (socket name lookups import it lazily)
import errno
import json
import math
import mmap
import os
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback

import msgpack
import numpy as np

from p2pfleet.exec import syscalls
from p2pfleet.exec.limits import ModelLimits
from p2pfleet.exec.validate import ModelRefused, validate_model

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
LINUX_CAPABILITY_VERSION_3 = 0x20080522

#: ONNX Runtime tensor type strings <-> numpy dtype names carried on the pipe.
ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16", "tensor(int32)": "int32", "tensor(uint32)": "uint32",
    "tensor(int64)": "int64", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
}
DTYPES = frozenset(ORT_TYPES.values())
OPT_LEVELS = ("disable", "basic", "extended", "all")
DETAIL_MAX = 240


class Refused(Exception):
    """A request fails with a reason for the parent."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail[:DETAIL_MAX]


# --- frames -----------------------------------------------------------------------------
# A frame: HEADER (meta length u32, payload length u64, big-endian), a msgpack map (the
# meta, at most META_MAX bytes), then the payload: raw bytes that tensors and models in the
# meta point into as [offset, nbytes]. Tensor bytes never pass through msgpack: fewer copies.
HEADER = struct.Struct(">IQ")
META_MAX = 1 << 20
_rbuf = bytearray(1 << 20)


def _read_bytes(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, n - got)
        if not b:
            return None
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _read_payload(fd: int, n: int) -> memoryview | None:
    """n bytes in a reused buffer (valid until the next frame), or None at EOF."""
    global _rbuf
    if len(_rbuf) < n or len(_rbuf) > max(n, 1 << 20) * 4:
        _rbuf = bytearray(max(n, 1 << 20))
    view = memoryview(_rbuf)[:n]
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if not k:
            return None
        got += k
    return view


def read_frame(fd: int, max_frame: int) -> tuple[dict, memoryview] | None:
    head = _read_bytes(fd, HEADER.size)
    if head is None:
        return None
    meta_len, payload_len = HEADER.unpack(head)
    if meta_len > META_MAX or meta_len + payload_len > max_frame:
        raise Refused("internal", f"request frame of {meta_len} + {payload_len} bytes exceeds "
                      f"the caps ({META_MAX} meta, {max_frame} total)")
    meta = _read_bytes(fd, meta_len)
    payload = _read_payload(fd, payload_len) if meta is not None else None
    if payload is None:
        return None
    msg = msgpack.unpackb(meta, raw=False)
    if not isinstance(msg, dict):
        raise Refused("internal", "request frame is not a map")
    return msg, payload


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_frame(fd: int, msg: dict, blobs: list = ()) -> None:
    meta = msgpack.packb(msg, use_bin_type=True)
    _write_all(fd, HEADER.pack(len(meta), sum(b.nbytes for b in blobs)) + meta)
    for b in blobs:
        if b.nbytes:
            _write_all(fd, b)


def _slice(payload: memoryview, ref) -> memoryview:
    if not (isinstance(ref, list) and len(ref) == 2 and all(isinstance(v, int) and v >= 0 for v in ref)
            and ref[0] + ref[1] <= len(payload)):
        raise Refused("internal", "malformed payload reference")
    return payload[ref[0]:ref[0] + ref[1]]


# --- isolation --------------------------------------------------------------------------
def _libc():
    return ctypes.CDLL(None, use_errno=True)  # the interpreter links libc


def _unshare(libc, flags: int) -> str | None:
    if libc.unshare(flags) == 0:
        return None
    return os.strerror(ctypes.get_errno())


def isolate_network(settings: dict, libc) -> tuple[str, list[str]]:
    """Leave the host's network. Must run while the process has one thread (a new user
    namespace needs that, and unshare only moves the calling thread): before onnxruntime is
    imported, which starts a thread. Returns (net, warnings).

    As root: a new network namespace. Not root: a new user + network namespace, where the
    kernel allows unprivileged user namespaces."""
    warnings: list[str] = []
    if settings.get("isolation", "auto") == "none":
        warnings.append("network isolation disabled by configuration: the child has network access")
        return "host", warnings
    if os.geteuid() == 0:
        err = _unshare(libc, CLONE_NEWNET)
        if err is None:
            return "netns", warnings
        warnings.append(f"unshare(CLONE_NEWNET) failed as root ({err})")
    else:
        err = _unshare(libc, CLONE_NEWUSER | CLONE_NEWNET)
        if err is None:
            return "userns+netns", warnings
        warnings.append(f"unshare(CLONE_NEWUSER|CLONE_NEWNET) failed ({err})")
    warnings.append("the sandbox child has network access: run the node as root, or allow "
                    "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 or "
                    "user.max_user_namespaces > 0), to isolate it")
    return "host", warnings


def _drop_capabilities(libc) -> str | None:
    """Clear the effective, permitted and inheritable capability sets (capset(2))."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    if libc.capset(ctypes.byref(Header(LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def confine_filesystem(settings: dict, net: str, libc) -> tuple[str, list[str]]:
    """chroot into the working directory: the parent made it fresh, empty and private, and
    the child cannot write there (RLIMIT_FSIZE 0; as root, the dropped user cannot even
    read it). Call after every import: nothing outside is reachable afterwards.

    As root: chroot, then the caller drops to the unprivileged user (which loses
    CAP_SYS_CHROOT, so the classic chroot escapes are closed). Not root, inside the child's
    own user namespace (net == "userns+netns"): that namespace grants CAP_SYS_CHROOT, so
    chroot works; then every capability is dropped. Otherwise (no user namespaces, or
    isolation "none"): no confinement, and a warning. Returns (fs, warnings)."""
    if settings.get("confine_fs", True) is False:
        return "host", ["filesystem confinement disabled by configuration: the child can read "
                        "every file its user can"]
    in_userns = net == "userns+netns"
    if os.geteuid() != 0 and not in_userns:
        return "host", ["the sandbox child can read every file its user can: run the node as "
                        "root, or allow unprivileged user namespaces, to confine it"]
    try:
        os.chroot(".")
        os.chdir("/")
    except OSError as e:
        return "host", [f"chroot failed ({e.strerror}): the sandbox child can read every "
                        "file its user can"]
    if in_userns:
        err = _drop_capabilities(libc)
        if err is not None:
            raise RuntimeError(f"could not drop capabilities after chroot ({err})")
    return "chroot", []


def drop_privileges(settings: dict) -> tuple[str, str, list[str]]:
    """As root, switch for good (real, effective and saved ids) to the uid/gid the parent
    chose, no supplementary groups: a private one (`ids` "private": no other process has
    it, so only root can signal this child, and it can signal no one) or a configured user
    shared by the children ("shared"). Not root: nothing to switch; the child keeps the
    node's uid ("node"; inside its own user namespace it shows as the overflow uid, but
    signals and /proc see the node's). Returns (user, ids, warnings)."""
    if os.geteuid() != 0:
        uid = int(settings.get("uid", os.getuid()))
        return f"uid {uid} (the node's own)", "node", []
    uid, gid = int(settings["uid"]), int(settings["gid"])
    ids = settings.get("ids", "shared")
    if uid == 0 or gid == 0:
        raise RuntimeError("the sandbox user must not be root")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    try:  # paranoia: the switch must be irreversible
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise RuntimeError("could regain uid 0 after dropping privileges")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid) or os.getgroups():
        raise RuntimeError("the switch to the sandbox user left other ids behind")
    return f"uid {uid} gid {gid}", ids, []


def harden(libc, parent_pid: int) -> None:
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    # Cleared by a credential change, so set after dropping privileges.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid and os.getppid() != parent_pid:
        os._exit(3)  # the parent died before PDEATHSIG was armed


def _at_most_hard(which: int, value: int) -> int:
    """`value`, or the inherited hard limit if lower: a process can never raise it (the
    parent lowered its settings already; this keeps an older parent's child alive)."""
    _soft, hard = resource.getrlimit(which)
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def set_limits(settings: dict, dropped_uid: bool) -> None:
    as_bytes = _at_most_hard(resource.RLIMIT_AS, int(settings["memory_mb"]) << 20)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    nofile = _at_most_hard(resource.RLIMIT_NOFILE, int(settings["nofile"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    cpu_hard = _at_most_hard(resource.RLIMIT_CPU, int(settings["cpu_hard_s"]))
    resource.setrlimit(resource.RLIMIT_CPU, (min(cpu_hard, int(cpu_used()) + 60), cpu_hard))
    if dropped_uid:
        nproc = _at_most_hard(resource.RLIMIT_NPROC, int(settings["nproc"]))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))


_SECCOMP_LIB: list = [None]  # for the debug request "attempt"


def _seccomp_library(settings: dict, warnings: list[str]):
    try:
        _SECCOMP_LIB[0] = syscalls.load()
        return _SECCOMP_LIB[0]
    except OSError as e:
        warnings.append(f"no syscall filter: {syscalls.LIBSECCOMP} cannot be loaded ({e})")
        return None


def filter_syscalls(lib, settings: dict, warnings: list[str]) -> str:
    """Install the seccomp filter (syscalls.py) last, once nothing more is imported or
    set up; "filter", or "none" with a warning."""
    if lib is None:
        return "none"
    try:
        syscalls.install(lib, network=settings.get("isolation", "auto") != "none")
    except OSError as e:
        warnings.append(f"no syscall filter: {e}")
        return "none"
    return "filter"


def cpu_used() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def arm_cpu(budget_s: float) -> None:
    """Soft RLIMIT_CPU = CPU used so far + budget (the hard limit stays)."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(cpu_used() + budget_s) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


# --- watchdog ---------------------------------------------------------------------------
class Watchdog(threading.Thread):
    """Sets RunOptions.terminate on the armed run when its deadline passes.

    Arming only wakes the thread when the new deadline is earlier than the one it sleeps
    towards, and disarming never does: a shard's micro-batches share one deadline, so the
    thread sleeps through them instead of costing two context switches per batch."""

    def __init__(self) -> None:
        super().__init__(name="watchdog", daemon=True)
        self._cond = threading.Condition()
        self._target = None
        self._deadline = 0.0
        self._sleeping_until = math.inf
        self.fired = False

    def arm(self, run_options, timeout_s: float) -> None:
        with self._cond:
            self._target, self._deadline, self.fired = run_options, time.monotonic() + timeout_s, False
            if self._deadline < self._sleeping_until:
                self._cond.notify()

    def disarm(self) -> bool:
        with self._cond:
            self._target = None
            return self.fired

    def run(self) -> None:
        with self._cond:
            while True:
                if self._target is None:
                    self._sleeping_until = math.inf
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._sleeping_until = self._deadline
                    self._cond.wait(left)
                    continue
                self._target.terminate = True
                self.fired = True
                self._target = None


# --- the model --------------------------------------------------------------------------
def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return any(s in text for s in ("Failed to allocate memory", "bad_alloc", "std::bad_alloc",
                                   "Cannot allocate memory", "out of memory"))


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}"[:DETAIL_MAX]


def _shape(shape) -> list:
    return [d if isinstance(d, int) else (str(d) if d is not None else None) for d in shape]


class Child:
    def __init__(self, settings: dict, ort, watchdog: Watchdog):
        self.settings = settings
        self.ort = ort
        self.watchdog = watchdog
        self.session = None
        self.threads = 1
        self.key: str | None = None
        self.inputs: list = []
        self.outputs: list = []
        self.debug_lie = 0              # debug "lie": factor on claimed output rows
        self.debug_write_input = False  # debug "write_input"

    def load(self, req: dict, payload: memoryview) -> dict:
        ort = self.ort
        model, key = bytes(_slice(payload, req.get("model"))), req.get("key")
        opt_level, provider = req.get("opt_level"), req.get("provider")
        threads, timeout_s = req.get("threads"), req.get("timeout_s")
        if not (isinstance(model, bytes) and isinstance(key, str) and opt_level in OPT_LEVELS
                and isinstance(provider, str) and isinstance(threads, int)
                and 1 <= threads <= int(self.settings.get("max_threads", 256))
                and isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise Refused("internal", "malformed load request")
        if provider not in ort.get_available_providers():
            raise Refused("internal", f"execution provider {provider} is not available")
        self.session, self.key = None, None
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opt_level]
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.use_deterministic_compute = True
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        arm_cpu(timeout_s * threads + 5)
        t0 = time.monotonic()
        try:
            session = ort.InferenceSession(model, so, providers=[provider])
        except BaseException as e:  # noqa: BLE001 - the model is untrusted
            raise Refused("out_of_memory" if _is_oom(e) else "invalid_model", _describe(e)) from None
        del model, req
        inputs = [[i.name, i.type, _shape(i.shape)] for i in session.get_inputs()]
        outputs = [[o.name, o.type, _shape(o.shape)] for o in session.get_outputs()]
        for name, typ, _ in inputs + outputs:
            if typ not in ORT_TYPES:
                raise Refused("invalid_model", f"{name!r} has type {typ}: only numeric and bool "
                              "tensors are supported")
        self.session, self.key, self.inputs, self.outputs = session, key, inputs, outputs
        self.threads = threads
        return {"ok": True, "key": key, "inputs": inputs, "outputs": outputs,
                "ms": (time.monotonic() - t0) * 1000}

    def validate(self, req: dict, payload: memoryview) -> dict:
        """validate_model here, under this child's limits (section 3.6 of execution.md)."""
        model = _slice(payload, req.get("model"))
        shapes, limits, timeout_s = req.get("shapes"), req.get("limits"), req.get("timeout_s")
        if not (isinstance(shapes, dict) and isinstance(limits, dict)
                and isinstance(timeout_s, (int, float)) and 0 < timeout_s < 1e6):
            raise Refused("internal", "malformed validate request")
        try:
            lim = ModelLimits(**limits)
        except (TypeError, ValueError) as e:
            raise Refused("internal", f"bad limits: {e}") from None
        model = bytes(model)
        del req
        arm_cpu(timeout_s + 5)  # validation is single-threaded
        # The onnx tools cannot be interrupted: past timeout_s, SIGALRM's default action
        # ends the child (the parent reports a timeout and starts a new one).
        signal.setitimer(signal.ITIMER_REAL, float(timeout_s))
        t0 = time.monotonic()
        try:
            vm = validate_model(model, shapes, lim, runtime_version=self.ort.__version__)
        except ModelRefused as e:
            return {"ok": True, "ms": (time.monotonic() - t0) * 1000, "refused": {
                "rule": e.rule, "reason": e.reason[:1000], "node": e.node, "tensor": e.tensor}}
        except MemoryError:
            raise Refused("out_of_memory", "validation ran out of memory") from None
        except RecursionError:
            raise Refused("invalid_model", "validation: model nested too deeply") from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        del model

        def spec(t):
            return [t.name, t.elem_type, list(t.shape), t.nbytes]

        return {"ok": True, "ms": (time.monotonic() - t0) * 1000, "valid": {
            "digest": vm.digest, "ir_version": vm.ir_version, "opset": vm.opset,
            "ml_opset": vm.ml_opset, "inputs": [spec(t) for t in vm.inputs],
            "outputs": [spec(t) for t in vm.outputs], "node_count": vm.node_count,
            "constant_bytes": vm.constant_bytes, "total_bytes": vm.total_bytes,
            "peak_bytes": vm.peak_bytes, "macs": vm.macs, "op_types": list(vm.op_types)}}

    def session_run(self, ro, feeds: dict, left_s: float, limit_s: float) -> tuple[list, float]:
        """session.run under the watchdog (`left_s` of the `limit_s` wall-clock limit)."""
        if left_s <= 0:
            raise Refused("timeout", f"run stopped after {limit_s:.3g} s wall clock")
        t0 = time.monotonic()
        self.watchdog.arm(ro, left_s)
        try:
            results = self.session.run(None, feeds, ro)
        except BaseException as e:  # noqa: BLE001 - the model is untrusted
            fired = self.watchdog.disarm()
            if fired or "terminate flag" in str(e):
                raise Refused("timeout", f"run stopped after {limit_s:.3g} s wall clock") from None
            if _is_oom(e):
                raise Refused("out_of_memory", _describe(e)) from None
            bad_input = type(e).__name__ == "InvalidArgument"
            raise Refused("input_error" if bad_input else "invalid_model", _describe(e)) from None
        self.watchdog.disarm()
        return results, (time.monotonic() - t0) * 1000

    def run(self, req: dict, payload: memoryview) -> tuple[dict, list]:
        if self.session is None:
            raise Refused("internal", "run before a successful load")
        timeout_s = req.get("timeout_s")
        raw = req.get("inputs")
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0 and isinstance(raw, list)):
            raise Refused("internal", "malformed run request")
        feeds = {}
        declared = {name: typ for name, typ, _ in self.inputs}
        for item in raw:
            if not (isinstance(item, list) and len(item) == 4):
                raise Refused("internal", "malformed input tensor")
            name, dtype, shape, ref = item
            data = _slice(payload, ref)
            if name not in declared or name in feeds:
                raise Refused("input_error", f"unexpected input {name!r}")
            if dtype != ORT_TYPES[declared[name]]:
                raise Refused("input_error", f"input {name!r} is {dtype}, the model wants "
                              f"{ORT_TYPES[declared[name]]}")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise Refused("internal", f"malformed input tensor {name!r}")
            dt = np.dtype(dtype).newbyteorder("<")
            if len(data) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise Refused("input_error", f"input {name!r}: {len(data)} bytes do not fit {shape}")
            feeds[name] = np.frombuffer(data, dtype=dt).reshape(shape)
        if set(feeds) != set(declared):
            raise Refused("input_error", f"inputs {sorted(feeds)} given, the model wants {sorted(declared)}")
        ro = self.ort.RunOptions()
        ro.log_severity_level = 3
        arm_cpu(timeout_s * self.threads + 5)
        results, ms = self.session_run(ro, feeds, float(timeout_s), float(timeout_s))
        del feeds
        out, blobs, offset = [], [], 0
        for (name, typ, shape), value in zip(self.outputs, results):
            if not isinstance(value, np.ndarray):
                raise Refused("invalid_model", f"output {name!r} is a {type(value).__name__}, "
                              "not a tensor")
            want = ORT_TYPES[typ]
            if value.dtype != np.dtype(want):
                raise Refused("invalid_model", f"output {name!r} is {value.dtype}, declared {want}")
            if shape is not None and (len(shape) != value.ndim or any(
                    isinstance(d, int) and d != v for d, v in zip(shape, value.shape))):
                raise Refused("invalid_model", f"output {name!r} has shape {list(value.shape)}, "
                              f"declared {shape}")
            arr = np.asarray(value, dtype=np.dtype(want).newbyteorder("<"), order="C")
            out.append([name, want, list(arr.shape), [offset, arr.nbytes]])
            blobs.append(memoryview(arr).cast("B") if arr.nbytes else memoryview(b""))
            offset += arr.nbytes
        return {"ok": True, "outputs": out, "ms": ms, "cpu_s": cpu_used()}, blobs


#: Replies of finished micro-batches wait up to this long to go in one write: each write
#: wakes the node, whose work then competes with onnxruntime's threads for the cores (at
#: 10 ms, half the node's CPU per mlp784 shard was its ~20 wake-ups; a stop still reaches
#: the child within about this long)...
FLUSH_S = 0.030
#: ... unless their outputs reach this many bytes: then the node has enough to copy and
#: digest to be worth waking for while the child computes on.
FLUSH_BYTES = 256 << 10


class ParentGone(Exception):
    """End of input while a shard waited for its next control message."""


def _frame_bytes(msg: dict) -> bytes:
    meta = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(meta), 0) + meta


def _receive_fds(sock: socket.socket | None, want: int) -> list[int]:
    """The fds the parent sent just before a shard request (never blocks)."""
    if sock is None:
        raise Refused("internal", "shard request without an fd socket")
    try:
        _, fds, _, _ = socket.recv_fds(sock, 16, want + 1,
                                       socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
    except BlockingIOError:
        raise Refused("internal", "shard request without its memfds") from None
    if len(fds) != want:
        for fd in fds:
            os.close(fd)
        raise Refused("internal", f"shard request with {len(fds)} fds, {want} expected")
    return fds


def _map(fd: int, size: int, writable: bool) -> mmap.mmap | None:
    if os.fstat(fd).st_size != size:
        raise Refused("internal", f"a shard memfd holds {os.fstat(fd).st_size} bytes, "
                      f"{size} announced")
    if size == 0:
        return None
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    # The output arena is written whole, and the node reuses it shard after shard: mapping
    # its pages in one go costs ~0.4 of a write fault per 4 KiB page (the inputs are read,
    # and read faults already map pages in batches).
    flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if writable else 0)
    try:
        return mmap.mmap(fd, size, flags, prot)
    except (MemoryError, OSError) as e:
        if isinstance(e, MemoryError) or e.errno == errno.ENOMEM:
            raise Refused("out_of_memory", f"mapping {size >> 20} MiB of shard data exceeds "
                          "the child's address-space limit") from None
        raise Refused("internal", f"cannot map a shard memfd: {e.strerror}") from None


def _view(mapping, dtype: str, shape: list, offset: int, size: int, what: str) -> np.ndarray:
    if not (isinstance(dtype, str) and dtype in DTYPES and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offset, int) and offset >= 0):
        raise Refused("internal", f"malformed shard layout for {what}")
    dt = np.dtype(dtype).newbyteorder("<")
    count = int(np.prod(shape, dtype=np.int64))
    if offset + count * dt.itemsize > size:
        raise Refused("internal", f"shard layout of {what} runs past its memfd")
    if count == 0:
        return np.zeros(shape, dt)
    return np.frombuffer(mapping, dtype=dt, count=count, offset=offset).reshape(shape)


class ShardRun:
    """One "shard" request: micro-batches on views of the shared input mapping, outputs
    written into the shared output mapping, small replies in bursts."""

    def __init__(self, child: "Child", req: dict, fd_in: int, fd_out: int,
                 sock: socket.socket | None, max_frame: int):
        self.child, self.req, self.fd_in, self.fd_out = child, req, fd_in, fd_out
        self.sock, self.max_frame = sock, max_frame
        self.pending: list[dict] = []  # replies of finished micro-batches not yet sent
        self.pending_bytes = 0          # their outputs' bytes
        self.last_flush = time.monotonic()
        self.grant = 0
        self.stopped = False

    def flush(self, then: dict | None = None) -> None:
        """Send the pending micro-batches' frame and, in the same write (one wake-up of the
        parent), `then`. The CPU time goes in the end frame only: read between two
        micro-batches, while onnxruntime's threads wind down, it cost ~70 us (under load),
        4 ms of an mlp784 shard read after each of its 64 micro-batches."""
        out = b""
        if self.pending:
            out = _frame_bytes({"ok": True, "batches": self.pending})
            self.pending, self.pending_bytes = [], 0
        if then is not None:
            out += _frame_bytes(then)
        if out:
            _write_all(self.fd_out, out)
        self.last_flush = time.monotonic()

    def control(self, i: int) -> None:
        """Read the parent's grants and stop; block while micro-batch i is not granted."""
        while not self.stopped:
            if i < self.grant and not select.select([self.fd_in], [], [], 0)[0]:
                return
            if i >= self.grant:
                self.flush()  # the parent grants more once it has seen these
            frame = read_frame(self.fd_in, self.max_frame)
            if frame is None:
                raise ParentGone
            op, upto = frame[0].get("op"), frame[0].get("upto")
            if op == "grant" and isinstance(upto, int):
                self.grant = max(self.grant, upto)
            elif op == "stop":
                self.stopped = True
            else:
                raise Refused("internal", f"unexpected request {op!r} during a shard")

    def run(self) -> None:
        """Run the shard and send its replies, the end frame last; a failure is raised
        (after the finished micro-batches' frame) for the caller to send."""
        child, req = self.child, self.req
        fds = _receive_fds(self.sock, 2)  # first: fds left queued would go to the next shard
        in_map = out_map = end = None
        try:
            if child.session is None:
                raise Refused("internal", "shard before a successful load")
            ins, outs, rows = req.get("inputs"), req.get("outputs"), req.get("rows")
            in_size, out_size = req.get("in_size"), req.get("out_size")
            timeout_s, grant = req.get("timeout_s"), req.get("grant")
            if not (isinstance(ins, list) and isinstance(outs, list) and isinstance(rows, list)
                    and rows and isinstance(in_size, int) and isinstance(out_size, int)
                    and isinstance(grant, int) and isinstance(timeout_s, (int, float))
                    and timeout_s > 0):
                raise Refused("internal", "malformed shard request")
            self.grant = grant
            in_map = _map(fds[0], in_size, writable=False)
            out_map = _map(fds[1], out_size, writable=True)
            if child.debug_write_input:
                child.debug_write_input = False
                try:
                    mmap.mmap(fds[0], max(in_size, 1), mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE).close()
                    self.write_input = "mapped writable"
                except OSError as e:
                    self.write_input = errno.errorcode.get(e.errno or 0, str(e))
            for fd in fds:
                os.close(fd)
            fds = []
            end = self._batches(ins, outs, rows, in_map, in_size, out_map, out_size,
                                float(timeout_s))
        finally:
            for fd in fds:
                os.close(fd)
            # Unmapped before the end frame (which waits ~0.6 ms for an mlp784 shard's
            # 12.8 MB of inputs): each mapping holds a copy of its memfd's fd until then,
            # and the node may count the child's fds once the shard has ended.
            for m in (in_map, out_map):
                if m is not None:
                    try:
                        m.close()
                    except BufferError:  # a view survived (an exception's frame): let it go
                        pass
            self.flush(then=end)  # end is None when a failure is raised

    def _batches(self, ins, outs, rows, in_map, in_size, out_map, out_size, timeout_s) -> dict:
        child = self.child
        declared = {name: typ for name, typ, _ in child.inputs}
        feeds_all: dict[str, np.ndarray] = {}
        for item in ins:
            if not (isinstance(item, list) and len(item) == 4):
                raise Refused("internal", "malformed shard input")
            name, dtype, shape, offset = item
            if name not in declared or name in feeds_all:
                raise Refused("input_error", f"unexpected input {name!r}")
            if dtype != ORT_TYPES[declared[name]]:
                raise Refused("input_error", f"input {name!r} is {dtype}, the model wants "
                              f"{ORT_TYPES[declared[name]]}")
            feeds_all[name] = _view(in_map, dtype, shape, offset, in_size, f"input {name!r}")
        if set(feeds_all) != set(declared):
            raise Refused("input_error", f"inputs {sorted(feeds_all)} given, the model wants "
                          f"{sorted(declared)}")
        n_in = min((len(a) for a in feeds_all.values()), default=0)
        if not all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r)
                   for r in rows):
            raise Refused("internal", "malformed shard rows")
        first = rows[0][0]
        for k, (a, b) in enumerate(rows):
            if not (0 <= a < b <= n_in and (k == 0 or a == rows[k - 1][1])):
                raise Refused("internal", "shard rows are not consecutive micro-batches")
        n_out = rows[-1][1] - first
        # Per output: its view of the arena, dtype, dtype name and shape beyond axis 0, all
        # worked out once. Python run between two micro-batches runs cache-cold (the
        # model's data just went through the caches): `dtype.name`, Python code inside
        # numpy, cost ~65 us per call there, 4 ms of an mlp784 shard's 64 micro-batches.
        out_views: dict[str, tuple[np.ndarray, np.dtype, str, tuple]] = {}
        for item in outs:
            if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], str)):
                raise Refused("internal", "malformed shard output")
            name, dtype, tail, offset = item
            view = _view(out_map, dtype, [n_out, *tail] if isinstance(tail, list) else tail,
                         offset, out_size, f"output {name!r}")
            out_views[name] = (view, np.dtype(dtype), np.dtype(dtype).name, tuple(tail))
        session_outs = [name for name, _, _ in child.outputs]
        if set(out_views) != set(session_outs):
            raise Refused("invalid_model", f"outputs {sorted(session_outs)}, validation "
                          f"expected {sorted(out_views)}")
        ro = child.ort.RunOptions()
        ro.log_severity_level = 3
        arm_cpu(timeout_s * child.threads + 5)
        end_at = time.monotonic() + timeout_s
        lie = child.debug_lie
        done = 0
        for i, (a, b) in enumerate(rows):
            self.control(i)
            if self.stopped:
                break
            feeds = {name: arr[a:b] for name, arr in feeds_all.items()}
            results, ms = child.session_run(ro, feeds, end_at - time.monotonic(), timeout_s)
            claimed = []
            for (name, _typ, _shape), value in zip(child.outputs, results):
                view, dt, dt_name, tail = out_views[name]
                if not isinstance(value, np.ndarray):
                    raise Refused("invalid_model", f"output {name!r} is a "
                                  f"{type(value).__name__}, not a tensor")
                if value.dtype != dt or value.shape != (b - a, *tail):
                    raise Refused("invalid_model", f"output {name!r} is {value.dtype}"
                                  f"{list(value.shape)}, validation expected "
                                  f"{dt}{[b - a, *tail]}")
                view[a - first:b - first] = value
                shape = list(value.shape)
                if lie:
                    shape[0] *= lie
                claimed.append([name, dt_name, shape])
            done += 1
            self.pending.append({"batch": i, "outputs": claimed, "ms": ms})
            self.pending_bytes += sum(v.nbytes for v in results)
            if self.pending_bytes >= FLUSH_BYTES or time.monotonic() - self.last_flush >= FLUSH_S:
                self.flush()
        end = {"ok": True, "end": done, "cpu_s": cpu_used()}
        if hasattr(self, "write_input"):
            end["write_input"] = self.write_input
        return end


def _attempt(call: str) -> str:
    """Try one thing an inference child never needs; "ok" or the errno's name."""
    try:
        if call in ("socket_inet", "socket_inet6", "socket_netlink", "socket_unix"):
            family = {"socket_inet": socket.AF_INET, "socket_inet6": socket.AF_INET6,
                      "socket_netlink": socket.AF_NETLINK, "socket_unix": socket.AF_UNIX}[call]
            socket.socket(family, socket.SOCK_DGRAM if family == socket.AF_NETLINK
                          else socket.SOCK_STREAM).close()
        elif call == "execve":
            os.execv("/nonexistent-p2pfleet", ["x"])
        elif call == "fork":
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        elif call == "thread":
            t = threading.Thread(target=lambda: None)
            t.start()
            t.join()
        elif call in ("process_vm_readv", "io_uring_setup", "userfaultfd", "bpf", "unshare"):
            lib = _SECCOMP_LIB[0]
            if lib is None:
                return "no libseccomp to resolve the syscall number"
            libc = _libc()
            if libc.syscall(syscalls.number(lib, call), 0, 0, 0, 0, 0) != 0:
                return errno.errorcode.get(ctypes.get_errno(), "?")
        else:
            return f"unknown call {call!r}"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    return "ok"


def debug(req: dict, child: Child | None = None) -> dict:
    what = req.get("what")
    if what == "lie" and child is not None:
        child.debug_lie = int(req["factor"])
        return {"ok": True}
    if what == "write_input" and child is not None:
        child.debug_write_input = True
        return {"ok": True}
    if what == "whoami":
        return {"ok": True, "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                "egid": os.getegid(), "groups": os.getgroups(), "pid": os.getpid(),
                "cwd": os.getcwd()}
    if what == "rlimits":
        names = ("AS", "CPU", "CORE", "NOFILE", "NPROC", "FSIZE")
        return {"ok": True, **{n: list(resource.getrlimit(getattr(resource, "RLIMIT_" + n)))
                               for n in names}}
    if what == "connect":
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # EPERM under the filter
        except OSError as e:
            return {"ok": True, "result": errno.errorcode.get(e.errno or 0, str(e))}
        try:
            s.settimeout(2.0)
            s.connect((str(req["host"]), int(req["port"])))
            return {"ok": True, "result": "connected"}
        except OSError as e:
            return {"ok": True, "result": errno.errorcode.get(e.errno or 0, str(e))}
        finally:
            s.close()
    if what == "attempt":  # a syscall the filter should refuse (tests: syscalls.py)
        return {"ok": True, "result": _attempt(str(req["call"]))}
    if what == "touch" and child is not None:  # hold `mb` MiB of resident memory (tests: cgroup memory.max)
        child.debug_held = np.ones(int(req["mb"]) << 17, dtype=np.float64)
        return {"ok": True}
    if what == "sleep":
        time.sleep(float(req["s"]))
        return {"ok": True}
    if what == "open":
        try:
            with open(str(req["path"]), "rb") as f:
                f.read(64)
            return {"ok": True, "result": "opened"}
        except OSError as e:
            return {"ok": True, "result": errno.errorcode.get(e.errno or 0, str(e))}
    if what == "spin":  # burn CPU on one thread for s seconds of wall clock
        end, n = time.monotonic() + float(req["s"]), 0
        while time.monotonic() < end:
            n += 1
        return {"ok": True, "cpu_s": cpu_used()}
    raise Refused("internal", f"unknown debug request {what!r}")


def main() -> int:
    settings = json.loads(sys.argv[1])
    # Private protocol fds; fd 0 becomes /dev/null and fd 1 a copy of stderr.
    fd_in, fd_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    libc = _libc()
    try:
        os.nice(int(settings.get("nice", 0)))
    except OSError:
        pass
    was_root = os.geteuid() == 0
    net, warnings = isolate_network(settings, libc)  # still one thread
    import onnxruntime as ort  # before privileges go: the install may be unreadable after

    ort.set_default_logger_severity(3)
    seccomp_lib = _seccomp_library(settings, warnings)  # before the chroot hides it
    fs, more = confine_filesystem(settings, net, libc)
    warnings += more
    user, ids, more = drop_privileges(settings)
    warnings += more
    harden(libc, int(settings.get("parent_pid", 0)))
    dropped = was_root and os.geteuid() != 0
    watchdog = Watchdog()
    watchdog.start()
    set_limits(settings, dropped)
    seccomp = filter_syscalls(seccomp_lib, settings, warnings)
    max_frame = int(settings["max_frame"])
    sock_fd = settings.get("fd_sock")
    fd_sock = socket.socket(fileno=int(sock_fd)) if isinstance(sock_fd, int) else None
    write_frame(fd_out, {"hello": 1, "pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(),
                         "net": net, "fs": fs, "ids": ids, "user": user, "warnings": warnings, "seccomp": seccomp,
                         "ort_version": ort.__version__})
    child = Child(settings, ort, watchdog)
    debug_enabled = bool(settings.get("debug"))
    while True:
        try:
            frame = read_frame(fd_in, max_frame)
        except Refused as e:
            write_frame(fd_out, {"ok": False, "reason": e.reason, "detail": e.detail})
            return 2  # the stream is out of step: the parent restarts us
        if frame is None:
            return 0
        req, payload = frame
        frame = None
        op = req.get("op")
        blobs: list = []
        if op in ("grant", "stop"):
            continue  # meant for a shard that has ended meanwhile: no reply
        try:
            if op == "load":
                reply = child.load(req, payload)
            elif op == "run":
                reply, blobs = child.run(req, payload)
            elif op == "validate":
                reply = child.validate(req, payload)
            elif op == "ping":
                reply = {"ok": True, "pid": os.getpid(), "cpu_s": cpu_used()}
            elif op == "exit":
                return 0
            elif op == "shard":
                ShardRun(child, req, fd_in, fd_out, fd_sock, max_frame).run()
                continue  # its replies and end frame are sent
            elif op == "debug" and debug_enabled:
                reply = debug(req, child)
            else:
                raise Refused("internal", f"unknown request {op!r}")
        except Refused as e:
            reply = {"ok": False, "reason": e.reason, "detail": e.detail}
        except MemoryError:
            reply = {"ok": False, "reason": "out_of_memory", "detail": "MemoryError in the child"}
        except ParentGone:
            return 0
        except Exception as e:  # noqa: BLE001 - report, keep serving
            traceback.print_exc()
            reply = {"ok": False, "reason": "internal", "detail": _describe(e)}
        req = payload = None
        try:
            write_frame(fd_out, reply, blobs)
        except MemoryError:
            write_frame(fd_out, {"ok": False, "reason": "out_of_memory",
                                 "detail": "outputs too large to send"})
        reply = blobs = None


if __name__ == "__main__":
    sys.exit(main())
