"""A small test worker for publisher tests: a real Mesh speaking the real wire protocol.

Not the node's work loop (p2pfleet/live/worker.py): a harness that sends signed work_request
envelopes on `lease`, fetches model and input with the blob protocol (the input with the
lease's token), computes with onnxruntime directly, reports `result` on `report`, collects
the receipts of the answer, and answers `notice` with a clean close. A `cheat` makes it
return wrong outputs: "fp16" (weights rounded to float16 first) or "random".

Also builds the small numpy MLP (onnx.helper) these tests run.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from p2pfleet.exec.outputs import concat_batches, decode_tensors, encode_tensors, tensors_digest
from p2pfleet.net import streams
from p2pfleet.net.blobs import BlobService
from p2pfleet.publisher.jobs import run_locally
from p2pfleet.store.blobcache import BlobCache
from p2pfleet.wire.envelope import open_envelope, seal
from p2pfleet.wire.kinds import KINDS, LeaseBatch, NoWork, Result, WorkRequest

HW_CLASS = b"\x11" * 32


def mlp_model(seed: int = 0, n_in: int = 16, hidden: int = 32, n_out: int = 8) -> bytes:
    """x[N, n_in] -> MatMul/Add/Relu -> MatMul/Add -> y[N, n_out], float32, seeded weights."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((n_in, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, n_out)).astype(np.float32)
    b2 = rng.standard_normal(n_out).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
             helper.make_node("Add", ["h3", "b2"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m.SerializeToString()


def fp16_weights(model: bytes) -> bytes:
    """The same model with every float initializer rounded to float16 (a cheaper substitute)."""
    m = onnx.load_from_string(model)
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), init.name))
    return m.SerializeToString()


def scale_small_rows(outs: dict, share: float = 0.01, factor: float = 1.5) -> dict:
    """The "small_rows" cheat: per float output, every sample (row of axis 0) whose max |value|
    is under `share` of the whole shard's largest is multiplied by `factor`; the other rows
    (the large ones) stay exact. Against a tolerance relative to the shard's largest value,
    the small rows may then be wrong by any relative amount (issue 12)."""
    out = {}
    for name, a in outs.items():
        a = np.array(a)
        if a.dtype.kind == "f" and a.size:
            rows = np.abs(a.reshape(len(a), -1)).max(axis=1)
            small = rows < share * rows.max()
            a[small] = a[small] * a.dtype.type(factor)
        out[name] = a
    return out


def was_reset(stream: Any) -> bool:
    """py-libp2p 0.8.1's yamux shows a reset to the reader as a clean end of stream (the RST
    drops the stream's bookkeeping, the waiting read then sees "Stream closed" = EOF); the
    muxed stream still remembers it."""
    return bool(getattr(getattr(stream, "muxed_stream", None), "reset_received", False))


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


@dataclass
class TestWorker:
    __test__ = False  # not a pytest class

    mesh: Any
    blobs: BlobService
    cheat: str = ""
    receipts: list = field(default_factory=list)
    cancels: list = field(default_factory=list)
    results: dict = field(default_factory=dict)   # lease_id -> sealed result envelope
    leases: list = field(default_factory=list)
    refusals: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    _n: int = 0

    @classmethod
    def start(cls, mesh: Any, cache_dir, cheat: str = "") -> "TestWorker":
        blobs = BlobService(mesh, BlobCache(cache_dir, 64 * 1024 * 1024))
        blobs.install()
        w = cls(mesh, blobs, cheat)
        mesh.set_handler("notice", w._on_notice)
        return w

    @property
    def network(self) -> str:
        return self.mesh.settings.network

    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    async def _on_notice(self, stream: Any) -> None:
        try:
            raw = await streams.read_envelope(stream, 16 * 1024, 10)
            opened = open_envelope(raw, self.network, now_ms=self.now_ms(), kinds={"cancel", "receipt"})
        except Exception:  # noqa: BLE001
            await streams.reset_quietly(stream)
            return
        (self.cancels if opened.kind == "cancel" else self.receipts).append(opened)
        await streams.close_quietly(stream)

    async def request(self, publisher: str, free_slots: int = 1, job_id: bytes | None = None,
                      identity: Any = None) -> Any:
        """One work_request; returns the opened lease_batch or no_work body."""
        return await self.send_request(publisher, self.work_request(free_slots, job_id, identity))

    def work_request(self, free_slots: int = 1, job_id: bytes | None = None,
                     identity: Any = None) -> bytes:
        """A sealed work_request with a fresh req_id (not sent)."""
        self._n += 1
        body = WorkRequest(req_id=self._n.to_bytes(16, "big"), exp=self.now_ms() + 60_000,
                           job_id=job_id, hw_class=HW_CLASS, sw_version="0.1.0",
                           ort_version=ort_version(), bench=10_000.0, cores=2, memory_mb=2048,
                           providers=("CPUExecutionProvider",), free_slots=free_slots)
        return seal(body, identity or self.mesh.identity, self.network)

    async def send_request(self, publisher: str, env: bytes) -> Any:
        """Send a sealed work_request; returns the opened lease_batch or no_work body."""
        stream = await self.mesh.open_stream(publisher, "lease")
        await streams.write_envelope(stream, env)
        await stream.close_write()
        raw = await streams.read_envelope(stream, KINDS["lease_batch"].max_body + 256, 30)
        opened = open_envelope(raw, self.network, now_ms=self.now_ms(), kinds={"lease_batch", "no_work"})
        if isinstance(opened.body, LeaseBatch):
            self.leases.extend(opened.body.leases)
        else:
            assert isinstance(opened.body, NoWork)
            self.refusals.append(opened.body.reason)
        return opened.body

    async def compute(self, publisher: str, lease: Any) -> bytes:
        """Fetch, run and seal the result of one lease (not sent yet)."""
        model = await self.blobs.fetch(lease.model_digest, lease.model_size, [publisher], public=True)
        raw_inputs = await self.blobs.fetch(lease.input_digest, lease.input_size, [publisher],
                                            token=lease.token)
        inputs = {k: np.array(v) for k, v in decode_tensors(raw_inputs).items()}
        run_model = fp16_weights(model) if self.cheat == "fp16" else model
        batches = []
        for k in range(math.ceil(lease.samples / lease.micro_batch)):
            part = {n: a[k * lease.micro_batch:(k + 1) * lease.micro_batch] for n, a in inputs.items()}
            outs = run_locally(run_model, part, lease.opt_level, lease.provider)
            if self.cheat == "random":
                outs = {n: np.random.default_rng(k).standard_normal(a.shape).astype(a.dtype)
                        for n, a in outs.items()}
            batches.append(outs)
        if self.cheat == "small_rows":  # needs the whole shard: cheat, then split again
            whole = scale_small_rows(concat_batches(batches))
            batches = [{n: a[k:k + lease.micro_batch] for n, a in whole.items()}
                       for k in range(0, lease.samples, lease.micro_batch)]
        blob = encode_tensors(concat_batches(batches))
        body = Result(
            lease_id=lease.lease_id, exp=self.now_ms() + 3600_000, job_id=lease.job_id,
            shard=lease.shard, model_digest=lease.model_digest, input_digest=lease.input_digest,
            output_digest=hashlib.sha256(blob).digest(), output_size=len(blob),
            batch_digests=tuple(tensors_digest(b) for b in batches), hw_class=HW_CLASS,
            ort_version=ort_version(), elapsed_ms=1, energy_mwh=0, output=blob)
        env = seal(body, self.mesh.identity, self.network)
        self.results[lease.lease_id] = env
        return env

    async def report(self, publisher: str, envelope: bytes) -> list:
        """Send one report; returns the receipts of the answer. Raises if not acknowledged."""
        stream = await self.mesh.open_stream(publisher, "report")
        await streams.write_envelope(stream, envelope)
        await stream.close_write()
        got = await streams.read_all_envelopes(stream, 2048, 64, 30)
        if was_reset(stream):
            raise streams.StreamError("the publisher reset the stream: not acknowledged")
        opened = [open_envelope(r, self.network, kinds={"receipt"}) for r in got]
        self.receipts.extend(opened)
        return opened

    async def work(self, publisher: str, rounds: int = 50) -> None:
        """Ask, compute, report until the publisher has no work for us."""
        for _ in range(rounds):
            answer = await self.request(publisher, free_slots=2)
            if isinstance(answer, NoWork):
                return
            for lease in answer.leases:
                await self.report(publisher, await self.compute(publisher, lease))
