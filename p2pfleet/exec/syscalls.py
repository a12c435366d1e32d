"""The sandbox child's seccomp filter: syscalls an inference child never needs.

Installed by child.py as the last start-up step (after every import, the chroot, the
privilege drop and the rlimits, before the hello frame), on every thread at once (TSYNC:
onnxruntime's import and the watchdog have started threads already). Later threads, such
as onnxruntime's intra-op pool created when a session loads, inherit it. Everything not
named here stays allowed: the filter removes attack surface (kernel interfaces a model
escape would use next), it does not describe the child.

Refused with EPERM (a library that probes them gets an error it handles):
- with network isolation (not isolation "none"): `socket` of any family but AF_UNIX, and
  `connect`, `bind`, `listen`, `accept`, `accept4` of any socket (the child talks to the
  parent over inherited pipes and an inherited AF_UNIX socket: recvmsg/sendmsg stay);
- new processes: `fork`, `vfork`, `clone` without CLONE_THREAD (threads need clone with
  it), `execve`, `execveat`; `clone3` fails with ENOSYS instead, because its flags sit in
  memory a filter cannot read, and glibc then falls back to `clone` for threads;
- `io_uring_*`, `userfaultfd`, `perf_event_open`, `keyctl`, `add_key`, `request_key`.
Killing the whole child (SIGSYS; the node reports a crash): `ptrace`, `process_vm_readv`,
`process_vm_writev`, `mount`, `umount2`, `unshare`, `setns`, `bpf`, `init_module`,
`finit_module`, `delete_module`, `kexec_load`, `kexec_file_load`, `reboot`, `swapon`,
`swapoff`, `chroot`, `pivot_root`, `open_by_handle_at`: nothing honest in the child calls
them. Syscalls of another ABI (x32, i386 on x86_64) kill the child too (libseccomp's
default for a foreign architecture).

Why our own ctypes binding over libseccomp.so.2 rather than a PyPI one: the only pure
binding, `pyseccomp` (0.1.2, last release 2021), is unmaintained, and its import runs
`ctypes.util.find_library` twice, which starts `ldconfig`/`gcc` subprocesses: ~16 ms per
child start, measured, against ~1 ms for loading the library by its soname here. The
official `seccomp` bindings are not on PyPI (they build with libseccomp's sources). The
handful of calls used below have kept their ABI since libseccomp 2.2.
"""

from __future__ import annotations

import ctypes
import errno
import os

LIBSECCOMP = "libseccomp.so.2"

ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000
ATTR_CTL_TSYNC = 4
CMP_NE = 1
CMP_MASKED_EQ = 7
AF_UNIX = 1
CLONE_THREAD = 0x00010000


def act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


NETWORK = ("connect", "bind", "listen", "accept", "accept4")
NEW_PROCESSES = ("fork", "vfork", "execve", "execveat")
REFUSED = ("io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd",
           "perf_event_open", "keyctl", "add_key", "request_key")
KILLED = ("ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "unshare",
          "setns", "bpf", "init_module", "finit_module", "delete_module", "kexec_load",
          "kexec_file_load", "reboot", "swapon", "swapoff", "chroot", "pivot_root",
          "open_by_handle_at")


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def load(name: str = LIBSECCOMP) -> ctypes.CDLL:
    """libseccomp, loaded while its file is still reachable (before the chroot)."""
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.restype = None
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp))
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    return lib


def number(lib: ctypes.CDLL, name: str) -> int:
    """`name`'s syscall number on this architecture, negative when it has none."""
    return lib.seccomp_syscall_resolve_name(name.encode())


def unavailable(library: str = LIBSECCOMP) -> str | None:
    """Why this process could not filter its children's syscalls, or None: the node logs
    it once at start and runs on without the filter."""
    try:
        with open("/proc/self/status") as f:
            if not any(line.startswith("Seccomp:") for line in f):
                return "the kernel has no seccomp (no Seccomp: line in /proc/self/status)"
    except OSError as e:
        return f"cannot read /proc/self/status ({e.strerror})"
    try:
        load(library)
    except OSError as e:
        return f"{library} cannot be loaded ({e}): install libseccomp2"
    return None


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, *cmps: tuple) -> None:
    nr = number(lib, name)
    if nr < 0:
        return  # not a syscall of this architecture (e.g. fork on arm64)
    arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")


def install(lib: ctypes.CDLL, network: bool = True) -> None:
    """Filter this process's syscalls, on all its threads, for good. `lib`: from `load`.
    `network`: also refuse network sockets (False keeps them: isolation "none", tests and
    debugging). Raises OSError when libseccomp or the kernel cannot."""
    ctx = lib.seccomp_init(ACT_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        rc = lib.seccomp_attr_set(ctx, ATTR_CTL_TSYNC, 1)
        if rc < 0:
            raise OSError(-rc, f"seccomp TSYNC: {os.strerror(-rc)}")
        eperm = act_errno(errno.EPERM)
        if network:
            _rule(lib, ctx, eperm, "socket", (0, CMP_NE, AF_UNIX, 0))
            for name in NETWORK:
                _rule(lib, ctx, eperm, name)
        for name in NEW_PROCESSES + REFUSED:
            _rule(lib, ctx, eperm, name)
        _rule(lib, ctx, eperm, "clone", (0, CMP_MASKED_EQ, CLONE_THREAD, 0))
        _rule(lib, ctx, act_errno(errno.ENOSYS), "clone3")
        for name in KILLED:
            _rule(lib, ctx, ACT_KILL_PROCESS, name)
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)


__all__ = ["load", "install", "number", "unavailable", "KILLED", "REFUSED", "NETWORK", "NEW_PROCESSES"]
