"""The sandboxed runner with real child processes (p2pfleet/exec/{sandbox,child,runner}.py)."""

from __future__ import annotations

import errno
import grp
import hashlib
import os
import pwd
import signal
import socket
import sys
import time

import numpy as np
import onnxruntime as ort
import pytest
import trio
from onnx import TensorProto, helper, numpy_helper

from p2pfleet.exec.hwclass import measure
from p2pfleet.exec.outputs import compare_outputs, concat_batches, decode_tensors, tensors_digest
from p2pfleet.exec.runner import plan_batches, run_shard
from p2pfleet.exec.sandbox import SandboxConfig, open_sandbox_pool
from p2pfleet.wire.kinds import Lease

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")
AS_ROOT = os.geteuid() == 0
CFG = SandboxConfig(memory_mb=1024, debug=True, kill_grace_s=1.0)


# --- models -------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits=()) -> bytes:
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def classifier() -> bytes:
    """x[N,32] -> Gemm 32x64 -> Relu -> MatMul 64x10 + b -> Softmax; also argmax labels."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in (("w1", (32, 64)), ("b1", (64,)), ("w2", (64, 10)), ("b2", (10,)))]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                  [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10]),
                   helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])], inits)


def memory_hog() -> bytes:
    """A 150-byte model that expands one float to 60000 x 60000 (14.4 GB)."""
    shape = numpy_helper.from_array(np.array([60000, 60000], dtype=np.int64), "shape")
    return _model([helper.make_node("Expand", ["x", "shape"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])


def matmul_chain(layers: int, dim: int = 512) -> bytes:
    """x[N,dim] through `layers` MatMuls with one shared weight: slow, tiny file."""
    w = numpy_helper.from_array(np.eye(dim, dtype=np.float32), "w")
    nodes, prev = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], [w])


def squaring_chain(layers: int) -> bytes:
    """x[N,N] -> x @ x, repeated: 2 N^3 FLOP per node, no weights to load or prepack."""
    nodes, prev = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, prev], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "N"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "N"])])


def lease_for(model: bytes, samples: int, micro_batch: int, *, opt_level="all", first_batch=0,
              deadline_ms=30_000, ort_versions=">=1.32") -> Lease:
    return Lease(lease_id=hashlib.sha256(model + bytes([first_batch])).digest()[:16],
                 job_id=b"j" * 16, shard=0, model_digest=hashlib.sha256(model).digest(),
                 model_size=len(model), input_digest=b"\0" * 32, input_size=0, input_sources=(),
                 token=b"t" * 16, deadline_ms=deadline_ms, micro_batch=micro_batch,
                 opt_level=opt_level, provider="CPUExecutionProvider", ort_versions=ort_versions,
                 samples=samples, first_batch=first_batch, credit=1)


def shard_inputs(samples: int = 50, dim: int = 32) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((samples, dim)).astype(np.float32)}


def direct_run(model: bytes, inputs, micro_batch: int, opt_level="all"):
    """The same shard in this process, straight through onnxruntime."""
    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[opt_level]
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    samples = len(next(iter(inputs.values())))
    batches = []
    for _k, a, b in plan_batches(samples, micro_batch):
        res = sess.run(None, {n: v[a:b] for n, v in inputs.items()})
        batches.append(dict(zip(names, res)))
    return batches


@pytest.fixture
async def pool():
    async with open_sandbox_pool(CFG) as p:
        yield p


# --- tests --------------------------------------------------------------------------------
async def test_normal_run_matches_direct_onnxruntime(pool):
    model, inputs = classifier(), shard_inputs(50)
    box = await pool.get(b"publisher-a")
    seen = []
    out = await run_shard(box, lease_for(model, 50, 16), model, inputs, threads=2,
                          on_progress=seen.append)
    assert out.status == "done", out
    assert (out.done, out.total, len(out.batch_digests)) == (4, 4, 4)
    assert [p.done for p in seen] == [1, 2, 3, 4] and seen[-1].batch_digests == out.batch_digests
    direct = direct_run(model, inputs, 16)
    assert list(out.batch_digests) == [tensors_digest(b) for b in direct]
    whole = concat_batches(direct)
    assert out.output_digest == tensors_digest(whole) == hashlib.sha256(out.outputs).digest()
    got = decode_tensors(out.outputs)
    assert got["probs"].shape == (50, 10) and got["label"].dtype == np.int64
    assert compare_outputs(got, whole).exact
    assert out.ort_version == ort.__version__ and out.compute_s > 0


async def test_two_publishers_get_two_children_and_identical_digests(pool):
    model, inputs = classifier(), shard_inputs(40)
    a, b = await pool.get(b"publisher-a"), await pool.get(b"publisher-b")
    assert a is not b and a is await pool.get(b"publisher-a")
    ra = await run_shard(a, lease_for(model, 40, 8), model, inputs, threads=1)
    rb = await run_shard(b, lease_for(model, 40, 8), model, inputs, threads=2)
    assert a.pid != b.pid and a.pid is not None
    assert ra.output_digest == rb.output_digest and ra.batch_digests == rb.batch_digests
    again = await run_shard(a, lease_for(model, 40, 8), model, inputs, threads=1)
    assert again.output_digest == ra.output_digest
    # A different optimisation level may change float bits; it must stay within tolerance.
    rd = await run_shard(b, lease_for(model, 40, 8, opt_level="disable"), model, inputs)
    agreement = compare_outputs(decode_tensors(ra.outputs), decode_tensors(rd.outputs))
    assert agreement.within_tolerance, agreement


async def test_memory_hog_is_out_of_memory_and_the_next_shard_runs(pool):
    box = await pool.get(b"publisher-a")
    hog = memory_hog()
    out = await run_shard(box, lease_for(hog, 1, 1), hog, {"x": np.ones(1, np.float32)})
    assert (out.status, out.reason, out.rule) == ("failed", "invalid_model", "checker"), out
    # Past validation (skipped here), the child's address-space limit stops it.
    out = await run_shard(box, lease_for(hog, 1, 1), hog, {"x": np.ones(1, np.float32)},
                          validate=False)
    assert (out.status, out.reason) == ("failed", "out_of_memory"), out
    model = classifier()
    ok = await run_shard(box, lease_for(model, 10, 5), model, shard_inputs(10))
    assert ok.status == "done"


async def test_slow_model_times_out_by_terminate_flag(pool):
    box = await pool.get(b"publisher-a")
    await box.start()
    slow = squaring_chain(400)  # ~860 GFLOP in one micro-batch: many seconds
    t0 = trio.current_time()
    out = await run_shard(box, lease_for(slow, 1024, 1024), slow, shard_inputs(1024, 1024),
                          time_limit_s=1.5)
    assert (out.status, out.reason) == ("failed", "timeout"), out
    assert "wall clock" in out.detail  # the child's watchdog, not the parent's kill
    assert trio.current_time() - t0 < 1.5 + CFG.kill_grace_s
    model = classifier()
    assert (await run_shard(box, lease_for(model, 10, 5), model, shard_inputs(10))).status == "done"


async def test_parent_kills_a_child_that_ignores_its_deadline(pool):
    box = await pool.get(b"publisher-a")
    await box.start()
    pid = box.pid
    t0 = trio.current_time()
    with pytest.raises(Exception) as info:  # one request that blocks past its deadline
        await box.debug("sleep", timeout_s=0.3, s=30)
    assert getattr(info.value, "reason", None) == "timeout"
    assert trio.current_time() - t0 < 3 and not box.alive
    await box.start()
    assert box.pid != pid


async def test_killed_child_is_a_crash_and_is_restarted(pool):
    box = await pool.get(b"publisher-a")
    slow = matmul_chain(40)
    first_batch_done = trio.Event()
    pids = []

    async def killer():
        await first_batch_done.wait()
        pids.append(box.pid)
        await trio.sleep(0.02)  # the next micro-batch is in flight
        os.kill(box.pid, signal.SIGKILL)

    async with trio.open_nursery() as n:
        n.start_soon(killer)
        out = await run_shard(box, lease_for(slow, 64 * 20, 64), slow, shard_inputs(64 * 20, 512),
                              on_progress=lambda p: first_batch_done.set())
    assert (out.status, out.reason) == ("failed", "crash"), out
    assert "SIGKILL" in out.detail and out.done >= 1 and len(out.batch_digests) == out.done
    model = classifier()
    ok = await run_shard(box, lease_for(model, 10, 5), model, shard_inputs(10))
    assert ok.status == "done" and box.pid != pids[0]


async def test_cpu_limit_signal_is_a_timeout(pool):
    # RLIMIT_CPU ends a child with SIGXCPU; stand in for it with the signal itself.
    box = await pool.get(b"publisher-a")
    slow = squaring_chain(400)

    async def signal_soon():
        await trio.sleep(0.4)
        os.kill(box.pid, signal.SIGXCPU)

    async with trio.open_nursery() as n:
        await box.start()
        n.start_soon(signal_soon)
        out = await run_shard(box, lease_for(slow, 1024, 1024), slow, shard_inputs(1024, 1024))
    assert (out.status, out.reason) == ("failed", "timeout") and "CPU time" in out.detail, out


async def test_cancelled_shard_kills_the_child_and_the_next_one_runs(pool):
    box = await pool.get(b"publisher-a")
    slow = squaring_chain(400)
    with trio.move_on_after(0.5) as scope:
        await run_shard(box, lease_for(slow, 1024, 1024), slow, shard_inputs(1024, 1024))
    assert scope.cancelled_caught and not box.alive
    model = classifier()
    assert (await run_shard(box, lease_for(model, 10, 5), model, shard_inputs(10), threads=8)).status == "done"


async def test_stop_hands_back_finished_batches_and_resume_continues(pool):
    model, inputs = classifier(), shard_inputs(50)
    box = await pool.get(b"publisher-a")
    full = await run_shard(box, lease_for(model, 50, 8), model, inputs)
    stop = trio.Event()

    def progress(p):
        if p.done == 3:
            stop.set()

    part = await run_shard(box, lease_for(model, 50, 8), model, inputs, on_progress=progress, stop=stop)
    # A micro-batch already queued behind the third (pipelined) was in flight: finished too.
    assert part.status == "stopped" and part.done in (3, 4) and part.total == 7, part
    assert part.batch_digests == full.batch_digests[:part.done]
    rest = await run_shard(box, lease_for(model, 50, 8, first_batch=part.done), model, inputs)
    assert (rest.status, rest.done) == ("done", 7)
    assert part.batch_digests + rest.batch_digests == full.batch_digests
    halves = concat_batches([decode_tensors(part.outputs), decode_tensors(rest.outputs)])
    assert tensors_digest(halves) == full.output_digest


async def test_bad_inputs_and_leases_fail_cleanly(pool):
    model = classifier()
    box = await pool.get(b"publisher-a")
    bad_dtype = {"x": shard_inputs(10)["x"].astype(np.float64)}
    out = await run_shard(box, lease_for(model, 10, 5), model, bad_dtype)
    assert (out.status, out.reason) == ("failed", "input_error")
    out = await run_shard(box, lease_for(model, 12, 5), model, shard_inputs(10))
    assert (out.status, out.reason) == ("failed", "input_error")
    out = await run_shard(box, lease_for(model, 10, 5, ort_versions="<1.0"), model, shard_inputs(10))
    assert (out.status, out.reason) == ("failed", "internal")
    out = await run_shard(box, lease_for(model, 10, 5), model + b"x", shard_inputs(10))
    assert (out.status, out.reason) == ("failed", "internal")
    garbage = b"\x08\x07not a model"
    out = await run_shard(box, lease_for(garbage, 10, 5), garbage, shard_inputs(10))
    assert (out.status, out.reason) == ("failed", "invalid_model")
    ok = await run_shard(box, lease_for(model, 10, 5), model, shard_inputs(10))
    assert ok.status == "done"


async def test_outputs_are_checked_against_what_validation_expected(pool):
    from types import SimpleNamespace as Spec

    model = classifier()
    box = await pool.get(b"publisher-a")
    right = [Spec(name="probs", dtype=np.float32, shape=(5, 10)), Spec(name="label", dtype=np.int64, shape=(5,))]
    ok = await run_shard(box, lease_for(model, 12, 5), model, shard_inputs(12), expected_outputs=right)
    assert ok.status == "done"  # the last micro-batch (2 samples) differs only on axis 0
    wrong = [right[0], Spec(name="label", dtype=np.int32, shape=(5,))]
    out = await run_shard(box, lease_for(model, 12, 5), model, shard_inputs(12), expected_outputs=wrong)
    assert (out.status, out.reason) == ("failed", "invalid_model") and "label" in out.detail


async def test_child_limits_are_in_place(pool):
    box = await pool.get(b"publisher-a")
    limits = await box.debug("rlimits")
    assert limits["AS"][0] == CFG.memory_mb << 20 and limits["CORE"] == [0, 0]
    assert limits["NOFILE"] == [CFG.nofile, CFG.nofile] and limits["FSIZE"] == [0, 0]
    assert 0 < limits["CPU"][0] <= limits["CPU"][1] == CFG.cpu_hard_s


@pytest.fixture
def listener():
    """A TCP listener on 127.0.0.1 in the host's network namespace; yields its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.skipif(not AS_ROOT, reason="privilege drop and network namespace need root")
async def test_child_has_no_network_and_is_not_root(listener):
    async with open_sandbox_pool(CFG) as p:
        box = await p.get(b"publisher-a")
        hello = await box.start()
        assert hello["warnings"] == [] and hello["net"] == "netns"
        who = await box.debug("whoami")
        assert who["uid"] != 0 and who["euid"] != 0 and who["gid"] != 0 and who["groups"] == []
        tried = await box.debug("connect", host="127.0.0.1", port=listener)
        assert tried["result"] != "connected", tried
    # The same request without network isolation does connect: the listener was reachable.
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024, debug=True, isolation="none")) as p:
        box = await p.get(b"publisher-a")
        hello = await box.start()
        assert any("network access" in w for w in hello["warnings"])
        assert (await box.debug("whoami"))["uid"] != 0  # privileges are dropped all the same
        assert (await box.debug("connect", host="127.0.0.1", port=listener))["result"] == "connected"


@pytest.mark.skipif(not AS_ROOT, reason="needs root to become another unprivileged user")
def test_unprivileged_child_leaves_the_network_through_a_user_namespace(listener):
    # A node that is not root: the child's isolation step in a fork (one thread) as nobody.
    from p2pfleet.exec import child

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the fork
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            net, warnings = child.isolate_network({"isolation": "auto"}, child._libc())
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect(("127.0.0.1", listener))
                result = "connected"
            except OSError as e:
                result = type(e).__name__
            os.write(write_end, repr((net, warnings, result)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 4096):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    net, warnings, result = eval(data.decode())  # noqa: S307 - our own fork's repr
    if net == "host":
        assert any("network access" in w for w in warnings)
        pytest.skip(f"this kernel refuses unprivileged user namespaces: {warnings}")
    assert net == "userns+netns" and warnings == [] and result != "connected"


# --- the child's own uid: nothing else on the machine may signal it -------------------------
NEEDS_ROOT = ("needs root: only a node running as root can give each child a uid of its own, "
              "and the attacker must become nobody or another child's uid")


def _signal_as(uid: int, gid: int, pid: int, sigs) -> list[str]:
    """A real attacker: a fork that becomes uid/gid (no supplementary groups) and sends each
    of `sigs` to `pid`. Returns what each kill(2) did: "sent" or the errno name."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the fork
        try:
            os.close(read_end)
            try:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                out = []
                for sig in sigs:
                    try:
                        os.kill(pid, sig)
                        out.append("sent")
                    except OSError as e:
                        out.append(errno.errorcode.get(e.errno, str(e.errno)))
            except OSError as e:
                out = [f"could not become {uid}/{gid}: {e}"]
            os.write(write_end, "\n".join(out).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 4096):
        data += chunk
    os.close(read_end)
    os.waitpid(child, 0)
    return data.decode().split("\n")


def _ids_of(pid: int) -> tuple[list[int], list[int]]:
    """(real, effective, saved, filesystem) uids and gids of a process, from /proc."""
    uids = gids = []
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uids = [int(v) for v in line.split()[1:]]
            elif line.startswith("Gid:"):
                gids = [int(v) for v in line.split()[1:]]
    return uids, gids


def _processes_with_uid(uid: int) -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if uid in _ids_of(int(name))[0]:
                    found.add(int(name))
            except OSError:
                pass  # gone meanwhile
    return found


def _nobody() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


@pytest.mark.skipif(not AS_ROOT, reason=NEEDS_ROOT)
async def test_a_process_running_as_nobody_cannot_stop_or_kill_the_child_mid_run(pool):
    # Issue 12: children ran as the shared nobody user, so any process running as nobody
    # could SIGSTOP a child (the lease then fails as a timeout) or SIGKILL it (a crash).
    box = await pool.get(b"publisher-a")
    slow, samples, micro_batch = matmul_chain(40), 64 * 20, 64
    inputs = shard_inputs(samples, 512)
    await box.start()
    pid = box.pid
    first_batch_done = trio.Event()
    done: list[int] = []
    attack: dict = {}

    def progress(p):
        done.append(p.done)
        first_batch_done.set()

    async def attacker():
        await first_batch_done.wait()  # the model is running: more micro-batches to come
        attack["result"] = _signal_as(*_nobody(), pid, [signal.SIGSTOP, signal.SIGKILL])
        attack["batches_done"] = len(done)

    async with trio.open_nursery() as n:
        n.start_soon(attacker)
        out = await run_shard(box, lease_for(slow, samples, micro_batch), slow, inputs,
                              on_progress=progress)
    assert attack["result"] == ["EPERM", "EPERM"], attack
    assert attack["batches_done"] < out.total  # the attack came while the shard ran
    assert (out.status, out.done) == ("done", out.total), out
    assert np.array_equal(decode_tensors(out.outputs)["y"], inputs["x"])  # identity weights
    assert box.alive and box.pid == pid  # the same child, never restarted


@pytest.mark.skipif(not AS_ROOT, reason=NEEDS_ROOT)
async def test_each_child_has_a_uid_and_gid_of_its_own(pool):
    a, b = await pool.get(b"publisher-a"), await pool.get(b"publisher-b")
    hellos = [await a.start(), await b.start()]
    known_uids = {p.pw_uid for p in pwd.getpwall()}
    known_gids = {g.gr_gid for g in grp.getgrall()} | {p.pw_gid for p in pwd.getpwall()}
    ids = []
    for box in (a, b):
        uids, gids = _ids_of(box.pid)
        assert len(set(uids)) == 1 and len(set(gids)) == 1, (uids, gids)  # real = saved = ...
        uid, gid = uids[0], gids[0]
        assert uid not in known_uids and uid not in (0, _nobody()[0]), uid
        assert gid not in known_gids and gid not in (0, _nobody()[1]), gid
        assert _processes_with_uid(uid) == {box.pid}  # no other process on the machine has it
        ids.append((uid, gid))
    (ua, ga), (ub, gb) = ids
    assert ua != ub and ga != gb
    # Neither child can stop or kill the other (nor could a process it left behind).
    assert _signal_as(ub, gb, a.pid, [signal.SIGSTOP, signal.SIGKILL]) == ["EPERM", "EPERM"]
    assert _signal_as(ua, ga, b.pid, [signal.SIGSTOP, signal.SIGKILL]) == ["EPERM", "EPERM"]
    assert a.alive and b.alive and (await a.ping())["ok"] and (await b.ping())["ok"]
    for hello, (uid, gid) in zip(hellos, ids):  # what the node's log says is in force
        assert (hello["ids"], hello["uid"], hello["gid"], hello["warnings"]) == ("private", uid, gid, [])
    assert a.confinement["ids"] == "private"


@pytest.mark.skipif(not AS_ROOT, reason=NEEDS_ROOT)
def test_private_ids_skip_what_a_process_or_the_user_database_holds():
    from p2pfleet.exec.sandbox import PRIVATE_IDS, private_id

    lo, hi = PRIVATE_IDS
    assert private_id(ranges=((65534, 65534),)) is None  # nobody: in the user database
    assert private_id(ranges=((0, 0),)) is None
    free = private_id()
    assert free is not None and lo <= free <= hi
    assert private_id(reserved={free}, ranges=((free, free),)) is None  # handed out already
    assert private_id(ranges=((free, free),)) == free
    # A process running as that uid (a child left behind, say) takes it out of the draw.
    read_end, write_end = os.pipe()
    holder = os.fork()
    if holder == 0:  # pragma: no cover - runs in the fork
        try:
            os.close(write_end)
            os.setgroups([])
            os.setgid(free)
            os.setuid(free)
            os.read(read_end, 1)  # until the test closes its end
        finally:
            os._exit(0)
    os.close(read_end)
    try:
        while free not in _ids_of(holder)[0]:  # poll until the fork has switched
            assert os.waitpid(holder, os.WNOHANG) == (0, 0), "the holder could not switch"
            time.sleep(0.01)
        assert private_id(ranges=((free, free),)) is None
    finally:
        os.close(write_end)
        os.waitpid(holder, 0)
    assert private_id(ranges=((free, free),)) == free


async def test_debug_requests_are_refused_without_the_flag():
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024)) as p:
        box = await p.get(b"publisher-a")
        with pytest.raises(Exception, match="unknown request"):
            await box.debug("whoami")


async def test_pool_closes_the_least_recently_used_child():
    async with open_sandbox_pool(SandboxConfig(memory_mb=1024, max_children=2)) as p:
        boxes = [await p.get(bytes([65 + i])) for i in range(2)]
        for b in boxes:
            await b.start()
        await p.get(b"C")
        assert len(p) == 2 and boxes[0].closed and not boxes[0].alive and boxes[1].alive


def test_hardware_profile_is_stable_and_cached(tmp_path):
    first = measure(tmp_path, bench_seconds=0.2)
    assert len(first.hw_class) == 32 and first.bench > 0 and not first.cached
    again = measure(tmp_path, bench_seconds=0.2)
    assert again.cached and again.hw_class == first.hw_class and again.bench == first.bench
    fresh = measure(tmp_path, bench_seconds=0.2, refresh=True)
    assert fresh.hw_class == first.hw_class and not fresh.cached
    (tmp_path / "hwprofile.json").write_text("{not json")
    assert measure(tmp_path, bench_seconds=0.2).hw_class == first.hw_class
