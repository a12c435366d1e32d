"""A model is offered to other nodes only after it validated and ran here (issue 14, item 7):
the node's real Worker, the real publisher engine, a real sandbox pool and blob service on
real py-libp2p hosts.

A model whose shard fails without a rule code (here a timeout at the node's run cap) must not
be served to a third peer that asks the worker for it, nor announced as provided; one that
ran is both."""

from __future__ import annotations

import hashlib

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from p2pfleet.net.blobs import BlobError, BlobService
from p2pfleet.publisher import JobSpec
from p2pfleet.store.blobcache import BlobCache

from fleetkit import wait_until
from test_hostile_providers import meshes, node_worker, publisher
from workerkit import mlp_model

MiB = 1024 * 1024
WAIT_S = 60
N = 256


def matmul_chain(layers: int, dim: int) -> bytes:
    """x[N,dim] -> (x @ w) repeated with one shared dim x dim weight: 2 dim^2 FLOP per row
    and node, cheap for the publisher's one-row check, far past the run cap for a shard."""
    w = numpy_helper.from_array(np.full((dim, dim), 1.0 / dim, dtype=np.float32), "w")
    nodes, prev = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def spec(model: bytes, inputs) -> JobSpec:
    samples = len(next(iter(inputs.values())))
    return JobSpec(model=model, inputs=inputs, shard_size=samples, micro_batch=samples,
                   quorum=1, recheck_rate=0.0, audit_rate=0.0, known_answer_rate=0.0)


async def ask_worker(hm, tmp_path, wm, digest: bytes, size: int) -> bytes | None:
    """A third peer asks the worker alone for the model: the bytes, or None if refused."""
    await hm.connect(wm.listen_addrs()[0])
    worker_peer = wm.identity.peer_id
    fetcher = BlobService(hm, BlobCache(tmp_path / "third-blobs", 64 * MiB))
    try:
        return await fetcher.fetch(digest, size, [worker_peer], public=True, timeout=15)
    except BlobError:
        return None


async def test_a_model_that_timed_out_is_neither_served_nor_provided(tmp_path):
    slow = matmul_chain(1000, 512)  # ~0.5 GFLOP a row: ~270 GFLOP in the shard
    digest = hashlib.sha256(slow).digest()
    inputs = {"x": np.random.default_rng(1).standard_normal((N, 512)).astype(np.float32)}
    async with meshes(3) as (pm, wm, hm):
        async with publisher(pm, tmp_path, wm.identity.public_key) as pub, \
                node_worker(wm, tmp_path, (pm.identity.public_key,), 1.0) as (worker, blobs):
            pub.submit(spec(slow, inputs))
            await wait_until(lambda: worker.stats.shards_failed >= 1, timeout=WAIT_S)
            assert worker.stats.shards_done == 0
            assert worker.cache.has(digest)  # kept for another lease, but only privately
            assert not worker.cache.is_public(digest)
            assert digest not in blobs._provided
            assert await ask_worker(hm, tmp_path, wm, digest, len(slow)) is None


async def test_a_model_that_ran_is_served_and_provided(tmp_path):
    model = mlp_model(seed=21)
    digest = hashlib.sha256(model).digest()
    inputs = {"x": np.random.default_rng(2).standard_normal((16, 16)).astype(np.float32)}
    async with meshes(3) as (pm, wm, hm):
        async with publisher(pm, tmp_path, wm.identity.public_key) as pub, \
                node_worker(wm, tmp_path, (pm.identity.public_key,), 60.0) as (worker, blobs):
            pub.submit(spec(model, inputs))
            await wait_until(lambda: worker.stats.shards_done >= 1, timeout=WAIT_S)
            await wait_until(lambda: digest in blobs._provided, timeout=WAIT_S)
            assert worker.cache.is_public(digest)
            assert await ask_worker(hm, tmp_path, wm, digest, len(model)) == model
