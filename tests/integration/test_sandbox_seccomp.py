"""The sandbox child's seccomp filter (p2pfleet/exec/syscalls.py), on the real child.

A hostile ONNX model cannot run code of its own, so the attack is played by the child
itself: the debug request "attempt" (debug=True, tests only) makes the real child, after its
whole start-up, try a syscall an inference child never needs. Without the filter each of
these goes through (or fails for another reason than EPERM); with it they are refused, and
the clearly dangerous ones end the child (SIGSYS, reported as a crash).
"""

from __future__ import annotations

import signal
import sys

import numpy as np
import onnxruntime as ort
import pytest

from p2pfleet.exec import syscalls
from p2pfleet.exec.sandbox import SandboxConfig, SandboxFailure, open_sandbox_pool
from tests.integration.test_sandbox import classifier

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="seccomp is Linux-only"),
    pytest.mark.skipif(syscalls.unavailable() is not None,
                       reason=f"seccomp unavailable here: {syscalls.unavailable()}"),
]
CFG = SandboxConfig(memory_mb=1024, debug=True, kill_grace_s=1.0)


async def test_child_refuses_network_sockets_exec_and_fork_but_keeps_threads():
    async with open_sandbox_pool(CFG) as p:
        box = await p.get(b"publisher-a")
        hello = await box.start()
        assert hello["seccomp"] == "filter", hello
        assert box.confinement["seccomp"] == "filter"
        for call in ("socket_inet", "socket_inet6", "socket_netlink", "execve", "fork",
                     "io_uring_setup", "userfaultfd"):
            got = (await box.debug("attempt", call=call))["result"]
            assert got == "EPERM", (call, got)
        # What the child does need still works: AF_UNIX sockets and new threads.
        for call in ("socket_unix", "thread"):
            assert (await box.debug("attempt", call=call))["result"] == "ok", call
        assert (await box.ping())["ok"]


@pytest.mark.parametrize("call", ["unshare", "process_vm_readv", "bpf"])
async def test_clearly_dangerous_syscalls_kill_the_child(call):
    async with open_sandbox_pool(CFG) as p:
        box = await p.get(b"publisher-a")
        await box.start()
        pid = box.pid
        with pytest.raises(SandboxFailure) as exc:
            await box.debug("attempt", call=call)
        assert exc.value.reason == "crash", exc.value
        assert signal.Signals.SIGSYS.name in str(exc.value), (pid, exc.value)
        # The next request gets a fresh child, filtered as well.
        assert (await box.start())["seccomp"] == "filter"


async def test_a_model_runs_under_the_filter_with_the_same_outputs():
    model = classifier()
    x = np.random.default_rng(3).standard_normal((16, 32)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    want = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    async with open_sandbox_pool(CFG) as p:
        box = await p.get(b"publisher-a")
        assert (await box.start())["seccomp"] == "filter"
        await box.load(model, "classifier", opt_level="all", provider="CPUExecutionProvider",
                       threads=2, timeout_s=30)
        got, _ms = await box.run({"x": x}, timeout_s=30)
        np.testing.assert_array_equal(got["probs"], want[0])
        np.testing.assert_array_equal(got["label"], want[1])


async def test_without_network_isolation_the_filter_still_refuses_exec():
    # isolation "none" (tests, debugging) keeps network sockets, nothing else.
    cfg = SandboxConfig(memory_mb=1024, debug=True, isolation="none")
    async with open_sandbox_pool(cfg) as p:
        box = await p.get(b"publisher-a")
        assert (await box.start())["seccomp"] == "filter"
        assert (await box.debug("attempt", call="socket_inet"))["result"] == "ok"
        assert (await box.debug("attempt", call="execve"))["result"] == "EPERM"


def test_unavailable_is_said_not_silent():
    # Where libseccomp cannot be loaded the reason is a sentence for the node's log.
    why = syscalls.unavailable("libseccomp-missing.so.0")
    assert why is not None and "libseccomp-missing.so.0" in why and "install" in why
