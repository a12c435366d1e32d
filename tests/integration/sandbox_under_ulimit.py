"""Run by test_sandbox_caps under lower inherited limits (ulimit -v / -t, as systemd's
LimitAS / LimitCPU or a container would set them): open a node's sandbox pool with its
default settings and run the zoo's digits model through it. Prints one JSON line."""

from __future__ import annotations

import hashlib
import json
import logging
import sys

import trio

from p2pfleet.live.config import Config
from p2pfleet.exec.runner import run_shard
from p2pfleet.exec.sandbox import open_sandbox_pool, sandbox_config
from p2pfleet.wire.kinds import Lease
from p2pfleet.zoo import digits


async def main() -> dict:
    model, name, make_inputs = digits()
    lease = Lease(lease_id=b"l" * 16, job_id=b"j" * 16, shard=0,
                  model_digest=hashlib.sha256(model).digest(), model_size=len(model),
                  input_digest=b"\0" * 32, input_size=0, input_sources=(), token=b"t" * 16,
                  deadline_ms=120_000, micro_batch=8, opt_level="all",
                  provider="CPUExecutionProvider", ort_versions="", samples=16,
                  first_batch=0, credit=1)
    cfg = sandbox_config(Config())
    async with open_sandbox_pool(cfg) as pool:
        box = await pool.get(b"publisher")
        out = await run_shard(box, lease, model, {name: make_inputs(16)})
    return {"status": out.status, "reason": out.reason, "detail": out.detail,
            "memory_mb": cfg.memory_mb, "cpu_hard_s": cfg.cpu_hard_s}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(trio.run(main)))
