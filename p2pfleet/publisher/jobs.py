"""What a publisher submits, and how a job becomes shards with hidden known answers.

`JobSpec` is the SDK-facing description of a job: model bytes, named inputs (samples on axis
0) and the verification settings. `build_job` checks it (clear errors naming the field),
computes the known answers with onnxruntime on the publisher's own machine, and splits the
inputs into shards: each shard's input blob is the canonical tensor encoding
(exec/outputs.py) of its samples with `known_answer_rows` known-answer samples inserted at
secret random positions (specs/verification.md, section 7). `check_result_outputs` is the
data side of verification: strict decoding, batch digests, known-answer rows, and
`strip_known_answers` gives the user's rows back.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..exec.outputs import (
    EncodingError,
    compare_outputs,
    decode_tensors,
    encode_tensors,
    tensors_digest,
)
from ..wire.kinds import OPT_LEVELS, Requirements

MAX_BATCHES = 256
_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
               "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


class JobSpecError(ValueError):
    """A job that cannot be run as given: names the field and what is wrong."""


@dataclass(frozen=True)
class JobSpec:
    model: bytes
    inputs: Mapping[str, np.ndarray]
    shard_size: int = 256
    micro_batch: int = 64
    quorum: int = 2
    max_error: int = 3
    max_total: int = 0                 # 0: 2 * quorum + 4
    credit_rate: int = 1               # credit units per sample computed
    budget: int | None = None          # credit units the job may spend at most
    opt_level: str = "all"
    provider: str = "CPUExecutionProvider"
    ort_versions: str = ""
    requirements: Requirements = field(default_factory=lambda: Requirements(0, (), "0.0.0", ""))
    known_answer_rate: float = 1.0     # share of shards holding known-answer rows
    known_answer_rows: int = 1         # rows per such shard
    known_answer_pool: int = 16        # distinct samples whose answers the publisher computes
    recheck_rate: float = 0.07
    audit_rate: float = 0.05           # shards with a replica reserved for trusted machines


@dataclass(frozen=True)
class BuiltJob:
    samples: tuple[int, ...]           # per shard, known-answer rows included
    credit: tuple[int, ...]
    known_answer: tuple[bool, ...]
    shard_blobs: tuple[bytes, ...]     # canonical encodings of each shard's inputs
    shard_ka: tuple[list[tuple[int, int]], ...]  # [(row position, pool index)]
    real_rows: tuple[tuple[int, int], ...]       # (first, stop) of the user's samples
    ka_expected: bytes                 # canonical encoding of the pool's outputs
    output_names: tuple[str, ...]


def _fail(field_name: str, why: str) -> JobSpecError:
    return JobSpecError(f"JobSpec.{field_name}: {why}")


def check_spec(spec: JobSpec) -> int:
    """Check a spec; returns the number of samples."""
    if not isinstance(spec.model, (bytes, bytearray)) or not spec.model:
        raise _fail("model", "must be the ONNX model's bytes")
    if not isinstance(spec.inputs, Mapping) or not spec.inputs:
        raise _fail("inputs", "must be a non-empty mapping name -> numpy array")
    lengths = set()
    for name, arr in spec.inputs.items():
        if not isinstance(arr, np.ndarray) or arr.ndim < 1:
            raise _fail("inputs", f"{name!r} must be a numpy array with samples on axis 0")
        lengths.add(arr.shape[0])
    if len(lengths) != 1 or 0 in lengths:
        raise _fail("inputs", f"every input needs the same number (>= 1) of samples on axis 0, "
                              f"got {sorted(lengths)}")
    for name in ("shard_size", "micro_batch", "credit_rate"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            raise _fail(name, f"must be an integer >= 1, got {getattr(spec, name)!r}")
    if not 1 <= spec.quorum <= 255:
        raise _fail("quorum", f"must be 1..255, got {spec.quorum}")
    if spec.max_error < 0 or spec.max_total < 0:
        raise _fail("max_error", "max_error and max_total must be >= 0")
    if spec.max_total and spec.max_total < spec.quorum:
        raise _fail("max_total", f"{spec.max_total} is less than the quorum {spec.quorum}")
    if spec.budget is not None and spec.budget < 0:
        raise _fail("budget", "must be >= 0 or None")
    if spec.opt_level not in OPT_LEVELS:
        raise _fail("opt_level", f"{spec.opt_level!r} is not one of {', '.join(OPT_LEVELS)}")
    for name in ("known_answer_rate", "recheck_rate", "audit_rate"):
        if not 0.0 <= getattr(spec, name) <= 1.0:
            raise _fail(name, f"must be within [0, 1], got {getattr(spec, name)}")
    if spec.known_answer_rows < 0 or spec.known_answer_pool < 1:
        raise _fail("known_answer_rows", "known_answer_rows >= 0 and known_answer_pool >= 1 needed")
    rows = spec.shard_size + spec.known_answer_rows
    if math.ceil(rows / spec.micro_batch) > MAX_BATCHES:
        raise _fail("micro_batch", f"a shard of {rows} rows in micro-batches of "
                                   f"{spec.micro_batch} makes more than {MAX_BATCHES} micro-batches")
    return lengths.pop()


def local_session(model: bytes, opt_level: str, provider: str = "CPUExecutionProvider") -> Any:
    """An onnxruntime session of the publisher's own model (trusted), one intra-op thread:
    the settings of every run of the publisher's own (known answers, audits)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[opt_level])
    so.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(bytes(model), so, providers=[provider])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises assorted types
        raise JobSpecError(f"JobSpec.model: onnxruntime cannot load it: {exc}") from None


def run_session(sess: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs of `sess` (from `local_session`) on `inputs`."""
    try:
        names = [o.name for o in sess.get_outputs()]
        outs = sess.run(names, {k: np.ascontiguousarray(v) for k, v in inputs.items()})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises assorted types
        raise JobSpecError(f"JobSpec.model: onnxruntime cannot run it on the inputs: {exc}") from None
    return {n: np.asarray(o) for n, o in zip(names, outs)}


def run_locally(model: bytes, inputs: Mapping[str, np.ndarray], opt_level: str,
                provider: str = "CPUExecutionProvider") -> dict[str, np.ndarray]:
    """The publisher's own onnxruntime run (its own model: trusted)."""
    return run_session(local_session(model, opt_level, provider), inputs)


def build_job(spec: JobSpec, rng: random.Random) -> BuiltJob:
    n = check_spec(spec)
    pool_idx = sorted(rng.sample(range(n), min(spec.known_answer_pool, n)))
    pool = {k: v[pool_idx] for k, v in spec.inputs.items()}
    # The known answers (a session and a run of the pool: ~3 s for ResNet-50 on a busy
    # core) are computed on one thread while this one shards: onnxruntime releases the GIL
    with ThreadPoolExecutor(1, thread_name_prefix="known-answers") as ex:
        answers = ex.submit(run_locally, spec.model, pool, spec.opt_level, spec.provider)
        shards = _shards(spec, n, pool, len(pool_idx), rng)
        expected = answers.result()  # its JobSpecError (a model that does not run) raised here
    for name, arr in expected.items():
        if arr.ndim < 1 or arr.shape[0] != len(pool_idx):
            raise _fail("model", f"output {name!r} has shape {list(arr.shape)}: axis 0 of every "
                                 f"output must be the sample axis")
    try:
        ka_expected = encode_tensors(expected)
    except EncodingError as exc:
        raise _fail("model", f"its outputs cannot be encoded: {exc}") from None
    samples, credit, has_ka, blobs, kas, real = shards
    return BuiltJob(tuple(samples), tuple(credit), tuple(has_ka), tuple(blobs), tuple(kas),
                    tuple(real), ka_expected, tuple(sorted(expected)))


def _shards(spec: JobSpec, n: int, pool: Mapping[str, np.ndarray], pool_size: int,
            rng: random.Random) -> tuple[list, ...]:
    """(samples, credit, has known answers, input blob, known-answer rows, real rows) of
    each shard, drawing from `rng` in shard order."""
    samples, credit, has_ka, blobs, kas, real = [], [], [], [], [], []
    for first in range(0, n, spec.shard_size):
        stop = min(n, first + spec.shard_size)
        k = spec.known_answer_rows if rng.random() < spec.known_answer_rate else 0
        rows = stop - first + k
        positions = sorted(rng.sample(range(rows), k))
        picks = [rng.randrange(pool_size) for _ in range(k)]
        shard_inputs = {}
        real_at = np.ones(rows, dtype=bool)
        real_at[positions] = False
        for name, arr in spec.inputs.items():
            # the job's rows in order, the known-answer rows at `positions` (one copy; a
            # list of rows and np.stack took 4x as long on 12.8 MB shards)
            part = np.empty((rows, *arr.shape[1:]), dtype=arr.dtype)
            part[real_at] = arr[first:stop]
            if k:
                part[positions] = pool[name][picks]
            shard_inputs[name] = part
        blobs.append(encode_tensors(shard_inputs))
        kas.append(list(zip(positions, picks)))
        samples.append(rows)
        credit.append(rows * spec.credit_rate)
        has_ka.append(k > 0)
        real.append((first, stop))
    return samples, credit, has_ka, blobs, kas, real


@dataclass(frozen=True)
class OutputCheck:
    form_ok: bool
    known_answer_ok: bool | None
    why: str = ""
    outputs: dict | None = None


def check_result_outputs(output: bytes, *, digest: bytes, size: int, samples: int,
                         micro_batch: int, batch_digests: tuple[bytes, ...],
                         output_names: tuple[str, ...], ka: list[tuple[int, int]],
                         ka_expected: Mapping[str, np.ndarray]) -> OutputCheck:
    """Everything a publisher can check on one result's outputs blob by itself."""
    if len(output) != size or hashlib.sha256(output).digest() != digest:
        return OutputCheck(False, None, "outputs blob does not match output_size/output_digest")
    try:
        outs = decode_tensors(output)
    except EncodingError as exc:
        return OutputCheck(False, None, f"outputs blob is not a canonical encoding: {exc}")
    if tuple(sorted(outs)) != tuple(output_names):
        return OutputCheck(False, None, f"outputs {sorted(outs)}, the model has {list(output_names)}")
    for name, arr in outs.items():
        if arr.ndim < 1 or arr.shape[0] != samples:
            return OutputCheck(False, None, f"output {name!r} has shape {list(arr.shape)}, "
                                            f"expected {samples} rows")
    total = math.ceil(samples / micro_batch)
    if len(batch_digests) != total:
        return OutputCheck(False, None, f"{len(batch_digests)} batch digests for {total} micro-batches")
    for k in range(total):
        part = {n: a[k * micro_batch:(k + 1) * micro_batch] for n, a in outs.items()}
        if tensors_digest(part) != batch_digests[k]:
            return OutputCheck(False, None, f"batch digest {k} does not match the outputs")
    ka_ok = None
    if ka:
        # the agreement rule of verification.md section 2, which judges every sample (here
        # every known-answer row) by its own magnitude, whatever the other rows hold
        rows, picks = [pos for pos, _ in ka], [p for _, p in ka]
        ka_ok = compare_outputs({n: outs[n][rows] for n in outs},
                                {n: ka_expected[n][picks] for n in outs}).within_tolerance
    return OutputCheck(True, ka_ok, "" if ka_ok is not False else "known-answer rows differ", outs)


def strip_known_answers(outs: Mapping[str, np.ndarray], ka: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    keep = [pos for pos, _ in ka]
    return {n: np.delete(np.asarray(a), keep, axis=0) if keep else np.asarray(a)
            for n, a in outs.items()}


__all__ = ["JobSpec", "JobSpecError", "BuiltJob", "OutputCheck", "check_spec", "build_job",
           "run_locally", "local_session", "run_session", "check_result_outputs", "strip_known_answers"]
