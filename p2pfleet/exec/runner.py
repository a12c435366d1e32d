"""Run one lease's shard in its publisher's sandbox, micro-batch by micro-batch.

Everything that changes outputs is pinned by the lease (notes/onnx.md): the model (its
digest is checked), the graph optimisation level, the execution provider, the allowed
onnxruntime versions and the exact micro-batch size. Threads (intra-op; inter-op is 1) come
from the node's policy: they do not change outputs.

Micro-batches. A shard of `samples` samples is split along axis 0 of every input into
`total = ceil(samples / micro_batch)` micro-batches; micro-batch k holds samples
[k * micro_batch, min((k + 1) * micro_batch, samples)), so only the last one may be smaller.
The runner runs k = first_batch .. total-1 in order (batches before `first_batch` were
finished and handed back by another node). At most 256 micro-batches per shard (the
wire's limit on digest lists).

Outputs. After each micro-batch, its outputs' digest (outputs.tensors_digest) is appended
to `batch_digests` and `on_progress(BatchProgress)` is called. The shard's outputs are every
run micro-batch's outputs concatenated along axis 0 per output name (so outputs must have
rank >= 1 and agree beyond axis 0), canonically encoded (outputs.py); `output_digest` is
SHA-256 of that encoding. With first_batch > 0 they cover only the batches run here;
`batch_digests[i]` belongs to micro-batch first_batch + i. `done` counts micro-batches
from the start of the shard: batches [0, done) are finished.

Data path. When every output validation expects has axis 0 = the micro-batch (the usual
case), the shard runs over shared memory (`Sandbox.run_shared`, shm.py): the inputs are
copied once into a sealed memfd (none if `inputs` already is a `shm.SharedArrays`, e.g.
made while the previous shard ran), the child maps it read-only and runs every micro-batch
on views of it, and writes outputs into an arena sized by the validated shapes; only small
control frames cross the pipe, and the child runs ahead of the node by a granted window.
Otherwise micro-batches go through the pipe, pipelined (`Sandbox.run_many`): the next one
is already in the pipe while the child runs the current one.

Stopping. When `stop` is set the runner finishes the micro-batch in flight (the one running
and the one already queued behind it), then returns status "stopped" with the finished
batches (for a HandBack). To abandon a shard at once,
cancel the caller's scope: the child is killed and restarted on the next use.

Failures (status "failed", `reason` as in FailedResult): crash, out_of_memory, timeout
(the whole shard, model loading included, must finish within `time_limit_s`),
invalid_model, input_error, internal. The batches finished before the failure are kept
in the outcome.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import trio

from .limits import ModelLimits
from .outputs import EncodingError, LayoutDigester, concat_batches, encode_tensors, tensors_digest
from ..core.worker import ort_allowed
from .sandbox import DTYPES, ModelInfo, Sandbox, SandboxFailure
from .shm import SharedArrays, share_arrays
from .validate import ModelRefused

MAX_BATCHES = 256


@dataclass(frozen=True)
class BatchProgress:
    """Sent to `on_progress` after each micro-batch (the node turns it into a Progress)."""

    lease_id: bytes
    done: int                       # micro-batches [0, done) of the shard are finished
    total: int                      # micro-batches in the shard
    batch_digests: tuple[bytes, ...]  # digests of the batches run here, from first_batch


@dataclass(frozen=True)
class ShardOutcome:
    """What became of a shard.

    status: "done" (every batch from first_batch on), "stopped" (stop requested: a hand-back
      of `done`), or "failed" (`reason`, `detail`).
    outputs: canonical encoding of the finished batches' outputs (None if none finished);
      output_digest its SHA-256.
    elapsed_ms: wall time of the whole call; compute_s: time the child spent running the
      model (for the energy estimate).
    """

    status: str
    lease_id: bytes
    first_batch: int
    done: int
    total: int
    batch_digests: tuple[bytes, ...]
    outputs: bytes | None
    output_digest: bytes | None
    elapsed_ms: int
    compute_s: float
    load_ms: float
    reason: str | None = None
    detail: str = ""
    ort_version: str = ""
    rule: str | None = None         # the validation rule of a refused model (detail starts with it)
    validate_ms: float = 0.0        # validation in the child (0 when cached or not run)

    @property
    def output_size(self) -> int:
        return len(self.outputs) if self.outputs is not None else 0


def plan_batches(samples: int, micro_batch: int, first_batch: int = 0) -> list[tuple[int, int, int]]:
    """[(k, start, stop)] of the micro-batches to run, from `first_batch` on."""
    if samples < 1 or micro_batch < 1 or first_batch < 0:
        raise ValueError("samples and micro_batch must be >= 1, first_batch >= 0")
    total = math.ceil(samples / micro_batch)
    return [(k, k * micro_batch, min((k + 1) * micro_batch, samples))
            for k in range(first_batch, total)]


def ort_version_allowed(spec: str, version: str) -> bool:
    """Does `version` satisfy the PEP 440 specifier `spec` ("" allows any)?"""
    return ort_allowed(spec, version)


def session_key(lease, threads: int) -> str:
    return f"{lease.model_digest.hex()}/{lease.opt_level}/{lease.provider}/{threads}"


def _check_inputs(info: ModelInfo, inputs: Mapping[str, np.ndarray], samples: int) -> str | None:
    want = {s.name: s for s in info.inputs}
    if set(inputs) != set(want):
        return f"inputs {sorted(inputs)} given, the model wants {sorted(want)}"
    for name, arr in inputs.items():
        spec = want[name]
        if not isinstance(arr, np.ndarray):
            return f"input {name!r} is not an array"
        if arr.dtype.newbyteorder("=") != np.dtype(spec.dtype):
            return f"input {name!r} is {arr.dtype}, the model wants {spec.dtype}"
        if arr.ndim < 1 or arr.shape[0] != samples:
            return f"input {name!r} has shape {list(arr.shape)}: axis 0 must be the {samples} samples"
        if len(spec.shape) != arr.ndim:
            return f"input {name!r} has rank {arr.ndim}, the model wants {len(spec.shape)}"
        for axis, (d, v) in enumerate(zip(spec.shape, arr.shape)):
            if axis > 0 and isinstance(d, int) and d != v:
                return f"input {name!r} has shape {list(arr.shape)}, the model wants {list(spec.shape)}"
    return None


def _precheck_inputs(inputs: Mapping[str, np.ndarray], samples: int) -> str | None:
    """Before validation: every input an array with axis 0 = the shard's samples."""
    for name, arr in inputs.items():
        if not isinstance(name, str) or not isinstance(arr, np.ndarray):
            return f"input {name!r} is not an array"
        if arr.ndim < 1 or arr.shape[0] != samples:
            return f"input {name!r} has shape {list(arr.shape)}: axis 0 must be the {samples} samples"
    return None


def _check_outputs(expected, outs: Mapping[str, np.ndarray]) -> str | None:
    """Real outputs against what validation inferred: same names, dtypes, ranks and dims
    beyond axis 0 (axis 0 is the micro-batch, smaller in the last one)."""
    want = {e.name: e for e in expected}
    if set(want) != set(outs):
        return f"outputs {sorted(outs)}, validation expected {sorted(want)}"
    for name, arr in outs.items():
        e = want[name]
        shape = tuple(e.shape)
        if np.dtype(e.dtype) != arr.dtype.newbyteorder("=") or len(shape) != arr.ndim or \
                tuple(shape[1:]) != arr.shape[1:]:
            return (f"output {name!r} is {arr.dtype}{list(arr.shape)}, validation expected "
                    f"{np.dtype(e.dtype)}{list(shape)}")
    return None


def _shared_layout(expected, rows: int) -> list[tuple[str, np.dtype, tuple[int, ...]]] | None:
    """(name, dtype, shape beyond axis 0) of every expected output when all of them have
    axis 0 = the micro-batch's `rows` (as validated): the shared-memory path then knows each
    micro-batch's exact output size. None: use the pipe (run_many)."""
    if not expected:
        return None
    out = []
    for e in expected:
        shape = tuple(e.shape)
        try:
            dt = np.dtype(e.dtype)
        except TypeError:
            return None
        if not shape or shape[0] != rows or dt.name not in DTYPES or \
                not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
            return None
        out.append((e.name, dt, tuple(int(d) for d in shape[1:])))
    return out


async def run_shard(sandbox: Sandbox, lease, model: bytes, inputs: Mapping[str, np.ndarray], *,
                    threads: int = 1, time_limit_s: float | None = None,
                    on_progress: Callable[[BatchProgress], None] | None = None,
                    stop: trio.Event | None = None,
                    expected_outputs: Sequence | None = None,
                    validate: bool = True, limits: ModelLimits | None = None,
                    validate_timeout_s: float = 30.0) -> ShardOutcome:
    """Run `lease` (a wire.kinds.Lease) on `model` (validated bytes) and `inputs` (the whole
    shard: name -> array, axis 0 = lease.samples) in `sandbox`.

    `on_progress` is called synchronously after each micro-batch: it must not block (put the
    Progress on a channel with send_nowait, or keep the latest). `time_limit_s` defaults to
    the lease's deadline; either is capped by the node's `sandbox.config.max_run_s`.
    `expected_outputs` (e.g. validate's ValidatedModel.outputs: objects with name, dtype,
    shape) are checked against every micro-batch's real outputs
    (the child already checks them against the model's declared types and shapes).

    `validate` (default on): before loading, the model is validated in the child
    (`Sandbox.validate`, cached per model, shapes and limits) with the shape of one full
    micro-batch (axis 0 = min(micro_batch, samples)) and `limits` (default
    `ModelLimits.for_memory(sandbox.config.memory_mb)`), within `validate_timeout_s` and the
    shard's time. A refusal fails the shard with reason `invalid_model` (`input_error` for
    rule input-mismatch), `rule` set and `detail` starting "<rule>: "; validation's
    inferred outputs become `expected_outputs` unless given. validate=False skips it (the
    caller validated in a child already, or tests of the runtime limits)."""
    t_start = trio.current_time()
    limit = lease.deadline_ms / 1000.0 if time_limit_s is None else float(time_limit_s)
    cap = sandbox.config.max_run_s
    capped = cap < limit  # the node bounds a run, not the publisher's deadline alone
    limit = min(limit, cap)
    deadline = t_start + limit
    digests: list[bytes] = []
    results: list[dict[str, np.ndarray]] = []
    compute_s = 0.0
    load_ms = 0.0
    ort_version = ""
    plan: list = []
    total = 0

    validate_ms = 0.0

    def timed_out(detail: str) -> ShardOutcome:  # say when the node's cap, not the lease, ended it
        return outcome("failed", "timeout",
                       f"{detail} (the node's max_run_s of {cap:.3g} s)" if capped else detail)

    def outcome(status: str, reason: str | None = None, detail: str = "",
                rule: str | None = None) -> ShardOutcome:
        encoded = digest = None
        if results:
            try:
                encoded = encode_tensors(concat_batches(results))
            except EncodingError as e:
                status, reason, detail = "failed", "invalid_model", str(e)
            else:
                digest = hashlib.sha256(encoded).digest()
        return ShardOutcome(
            status=status, lease_id=lease.lease_id, first_batch=lease.first_batch,
            done=lease.first_batch + len(digests), total=total,
            batch_digests=tuple(digests), outputs=encoded, output_digest=digest,
            elapsed_ms=int((trio.current_time() - t_start) * 1000), compute_s=compute_s,
            load_ms=load_ms, reason=reason, detail=detail[:240], ort_version=ort_version,
            rule=rule, validate_ms=validate_ms)

    try:
        plan = plan_batches(lease.samples, lease.micro_batch, lease.first_batch)
    except ValueError as e:
        return outcome("failed", "input_error", str(e))
    total = math.ceil(lease.samples / lease.micro_batch)
    if total > MAX_BATCHES:
        return outcome("failed", "input_error",
                       f"{total} micro-batches: at most {MAX_BATCHES} per shard")
    if not plan:
        return outcome("failed", "input_error",
                       f"first_batch {lease.first_batch} is past the last micro-batch ({total})")
    if sandbox.model_digest(model) != lease.model_digest:
        return outcome("failed", "internal", "model bytes do not match the lease's model digest")

    async with sandbox.lock:
        try:
            hello = await sandbox.start()
            ort_version = str(hello.get("ort_version", ""))
            if not ort_version_allowed(lease.ort_versions, ort_version):
                return outcome("failed", "internal", f"onnxruntime {ort_version} is outside "
                               f"the lease's range {lease.ort_versions!r}")
            if validate:
                problem = _precheck_inputs(inputs, lease.samples)
                if problem:
                    return outcome("failed", "input_error", problem)
                left = deadline - trio.current_time()
                if left <= 0:
                    return timed_out(f"no time left of {limit:.3g} s")
                rows = min(lease.micro_batch, lease.samples)
                shapes = {name: (rows, *arr.shape[1:]) for name, arr in inputs.items()}
                # The child maps the whole shard's inputs: they count against its address space.
                mapped_mb = -(-sum(a.nbytes for a in inputs.values()) // (1 << 20))
                lim = limits if limits is not None else ModelLimits.for_memory(
                    sandbox.config.memory_mb - mapped_mb)
                try:
                    vm = await sandbox.validate(model, shapes, lim,
                                                timeout_s=min(left, validate_timeout_s))
                except ModelRefused as e:
                    validate_ms = sandbox.last_validate_ms
                    reason = "input_error" if e.rule == "input-mismatch" else "invalid_model"
                    return outcome("failed", reason, str(e), rule=e.rule)
                validate_ms = sandbox.last_validate_ms
                if expected_outputs is None:
                    expected_outputs = vm.outputs
            left = deadline - trio.current_time()
            if left <= 0:
                return timed_out(f"no time left of {limit:.3g} s")
            info = await sandbox.load(model, session_key(lease, threads), opt_level=lease.opt_level,
                                      provider=lease.provider, threads=threads, timeout_s=left)
            load_ms = info.load_ms
            problem = _check_inputs(info, inputs, lease.samples)
            if problem:
                return outcome("failed", "input_error", problem)
            if stop is not None and stop.is_set():
                return outcome("stopped")
            problem_at: list[str] = []
            layout = _shared_layout(expected_outputs, min(lease.micro_batch, lease.samples))
            # On the shared path run_shared has already held every micro-batch's outputs to
            # `layout` (names, dtypes, shapes: validation's expected outputs), so neither the
            # check nor the digest's headers need deriving again per micro-batch.
            digester = LayoutDigester(layout) if layout is not None else None

            def on_result(i: int, outs: dict[str, np.ndarray], ms: float) -> bool:
                nonlocal compute_s
                if problem_at:
                    return False  # a micro-batch that was in flight after a failure
                compute_s += ms / 1000.0
                bad = None
                if digester is None and expected_outputs is not None:
                    bad = _check_outputs(expected_outputs, outs)
                if bad is None:
                    try:
                        digests.append(tensors_digest(outs) if digester is None else
                                       digester.digest(outs, plan[i][2] - plan[i][1]))
                    except EncodingError as e:
                        bad = str(e)
                if bad is not None:
                    problem_at.append(bad)
                    return False
                results.append(outs)
                if on_progress is not None:
                    on_progress(BatchProgress(lease.lease_id, lease.first_batch + len(digests),
                                              total, tuple(digests)))
                return not (stop is not None and stop.is_set())

            if layout is not None:
                shared = inputs if isinstance(inputs, SharedArrays) else \
                    await trio.to_thread.run_sync(share_arrays, inputs)
                try:
                    await sandbox.run_shared(shared, [(a, b) for _k, a, b in plan], layout,
                                             deadline, on_result)
                finally:
                    if shared is not inputs:
                        shared.close()
            else:
                batches = [{name: arr[start:end] for name, arr in inputs.items()}
                           for _k, start, end in plan]
                await sandbox.run_many(batches, deadline, on_result)
            if problem_at:
                return outcome("failed", "invalid_model", problem_at[0])
            if len(digests) < len(plan):
                return outcome("stopped")
        except SandboxFailure as e:
            if e.reason == "timeout":
                return timed_out(e.detail)
            return outcome("failed", e.reason, e.detail)
    return outcome("done")


__all__ = ["BatchProgress", "ShardOutcome", "run_shard", "plan_batches", "ort_version_allowed",
           "session_key", "MAX_BATCHES"]
