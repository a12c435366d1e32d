#!/usr/bin/env python3
"""Benchmark blob transfer: the `blob` protocol (v2) against a bare libp2p stream, and the
wire bytes of the zoo models' inputs.

The holder runs in a child process (127.0.0.1), the fetcher in this one (127.0.0.2), so each
end has its own interpreter and CPU clock; same bytes, same two py-libp2p hosts:

1. blob: `BlobService.fetch` of an N MiB public blob (default 64, incompressible) from the
   child that holds it (one signed manifest, raw 256 KiB chunks each BLAKE3-checked, the
   whole blob SHA-256-checked and written into the fetcher's cache, not fsynced);
2. libp2p: the same bytes written in 256 KiB pieces on a bare stream of the same two hosts
   (TCP + Noise + Yamux), read to EOF, no framing or checks.

Each is run `--repeat` times, interleaved, after one warm-up (the warm-up also lets the
holder build its stored encoding once); MB/s = 10^6 bytes per second of wall clock, from
the request to the last byte; CPU seconds per MB on each end = that process's CPU time
(all threads) over the run / MB moved (deleting the fetcher's copy from the run before
is not part of the run). Then, without a network, the zoo models' input
blobs (`exec.outputs.encode_tensors` of 256 samples, as the publisher shards them) are
encoded as a holder would (`wire.blobcodec.encode_blob`): raw and wire bytes per sample and
the codec chosen. JSON goes to stdout (and --out FILE); progress to stderr.

    tools/bench_blob.py                  # 64 MiB, 3 runs each
    tools/bench_blob.py --mib 16 --repeat 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import trio

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import benchlib as B  # noqa: E402
from libp2p.custom_types import TProtocol  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402

from p2pfleet.identity import Identity  # noqa: E402
from p2pfleet.net.blobs import BlobService  # noqa: E402
from p2pfleet.net.mesh import Mesh, MeshSettings  # noqa: E402
from p2pfleet.store.blobcache import BlobCache  # noqa: E402

METHOD = ("holder in a child process, fetcher in this one, two py-libp2p hosts on loopback; "
          "best and median of --repeat interleaved runs after a warm-up; MB/s = 10^6 bytes / "
          "wall-clock s from request to last byte; cpu_s_per_mb = each process's CPU time "
          "(all threads) over the run per 10^6 bytes moved")
NETWORK = "bench"
RAW_PROTOCOL = TProtocol("/p2pfleet-bench/raw/1.0.0")
PIECE = 256 * 1024
ZOO_SAMPLES = 256


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


def blob_bytes(mib: int) -> bytes:
    return np.random.default_rng(0).bytes(mib * 1024 * 1024)


async def holder(mib: int, workdir: Path) -> None:
    """The child: hold the blob, serve `blob` and the raw protocol, answer "cpu" on stdin
    with this process's CPU seconds, stop at EOF."""
    data = blob_bytes(mib)
    digest = hashlib.sha256(data).digest()
    async with trio.open_nursery() as nursery:
        mesh = Mesh(Identity.from_seed(b"bench-blob-0"),
                    MeshSettings(network=NETWORK, listen=("/ip4/127.0.0.1/tcp/0",), seed=0))
        await nursery.start(mesh.run)
        serve = BlobService(mesh, BlobCache(workdir / "server", 2 * len(data)))
        serve.install()
        serve.cache.put(digest, data, public=True)

        async def raw_handler(stream) -> None:
            view = memoryview(data)
            for off in range(0, len(data), PIECE):
                await stream.write(view[off:off + PIECE])  # a view, as blob's holder writes
            await stream.close()

        mesh.host.set_stream_handler(RAW_PROTOCOL, raw_handler)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        print(json.dumps({"addr": mesh.listen_addrs()[0], "digest": digest.hex()}), flush=True)
        buf = b""
        while True:
            got = await stdin.receive_some(64)
            if not got:
                break
            buf += got
            while b"\n" in buf:
                _line, buf = buf.split(b"\n", 1)
                print(json.dumps({"cpu": time.process_time()}), flush=True)
        nursery.cancel_scope.cancel()


class Child:
    def __init__(self, proc) -> None:
        self.proc = proc
        self.buf = b""

    async def line(self) -> dict:
        while b"\n" not in self.buf:
            got = await self.proc.stdout.receive_some(4096)
            if not got:
                raise RuntimeError("the holder process ended")
            self.buf += got
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def cpu(self) -> float:
        await self.proc.stdin.send_all(b"cpu\n")
        return (await self.line())["cpu"]


async def bench(mib: int, repeat: int, workdir: Path) -> dict:
    size = mib * 1024 * 1024
    results: dict[str, list[float]] = {"blob": [], "libp2p": []}
    cpu: dict[str, dict[str, list[float]]] = {k: {"sender": [], "receiver": []} for k in results}
    proc = await trio.lowlevel.open_process(
        [sys.executable, __file__, "--holder", "--mib", str(mib), "--workdir", str(workdir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    child = Child(proc)
    try:
        hello = await child.line()
        digest = bytes.fromhex(hello["digest"])
        async with trio.open_nursery() as nursery:
            client = Mesh(Identity.from_seed(b"bench-blob-1"),
                          MeshSettings(network=NETWORK, listen=("/ip4/127.0.0.2/tcp/0",), seed=1))
            await nursery.start(client.run)
            server_peer = await client.connect(hello["addr"])
            fetch = BlobService(client, BlobCache(workdir / "client", 2 * size))

            async def run_blob() -> float:
                t0 = time.perf_counter()
                got = await fetch.fetch(digest, size, [server_peer], public=True, timeout=600)
                dt = time.perf_counter() - t0
                assert len(got) == size
                return dt

            async def run_libp2p() -> float:
                t0 = time.perf_counter()
                stream = await client.host.new_stream(ID.from_base58(server_peer), [RAW_PROTOCOL])
                n = 0
                while True:
                    try:
                        chunk = await stream.read(1 << 20)
                    except EOFError:  # libp2p's StreamEOF
                        break
                    if not chunk:
                        break
                    n += len(chunk)
                dt = time.perf_counter() - t0
                await stream.close()
                assert n == size, n
                return dt

            runs = {"blob": run_blob, "libp2p": run_libp2p}
            # before each run, not timed: the fetcher's copy from the run before goes
            setup = {"blob": lambda: fetch.cache.remove(digest), "libp2p": lambda: None}
            for name, fn in runs.items():
                setup[name]()
                await fn()  # warm-up
            for r in range(repeat):
                for name, fn in runs.items():  # interleaved, so drift hits all alike
                    setup[name]()
                    s0, c0 = await child.cpu(), time.process_time()
                    dt = await fn()
                    c1, s1 = time.process_time(), await child.cpu()
                    cpu[name]["sender"].append(s1 - s0)
                    cpu[name]["receiver"].append(c1 - c0)
                    results[name].append(dt)
                    log(f"run {r + 1}/{repeat} {name}: {mbps(size, dt)} MB/s")
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(10, shield=True):
            await proc.stdin.aclose()
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
    best = {k: mbps(size, min(v)) for k, v in results.items()}
    median = {k: mbps(size, sorted(v)[len(v) // 2]) for k, v in results.items()}
    ratio = round(best["blob"] / best["libp2p"], 3)
    mb = size / 1e6
    return {
        "bytes": size,
        "repeat": repeat,
        "mb_per_s_best": best,
        "mb_per_s_median": median,
        "seconds": {k: [round(x, 3) for x in v] for k, v in results.items()},
        "cpu_s_per_mb_median": {k: {end: round(sorted(v)[len(v) // 2] / mb, 5)
                                    for end, v in ends.items()} for k, ends in cpu.items()},
        "blob_vs_libp2p": ratio,
        "blob_vs_libp2p_median": round(median["blob"] / median["libp2p"], 3),
        "targets": [{"name": "blob v2 MB/s >= 0.8 x bare libp2p stream", "target": 0.8,
                     "value": ratio, "met": ratio >= 0.8}],
    }


def zoo_wire_bytes(names: list[str]) -> dict:
    """Raw and wire bytes per sample of each zoo model's input blob of ZOO_SAMPLES samples."""
    from p2pfleet import zoo
    from p2pfleet.exec.outputs import encode_tensors
    from p2pfleet.wire import blobcodec

    out = {}
    for name in names:
        _model, x_name, inputs = zoo.MODELS[name]()
        blob = encode_tensors({x_name: inputs(ZOO_SAMPLES)})
        t0 = time.process_time()
        enc, _wire = blobcodec.encode_blob(blob)
        out[name] = {"samples": ZOO_SAMPLES, "raw_bytes_per_sample": round(len(blob) / ZOO_SAMPLES, 1),
                     "wire_bytes_per_sample": round(enc.wire_size / ZOO_SAMPLES, 1),
                     "wire_over_raw": round(enc.wire_size / len(blob), 3), "codec": enc.codec,
                     "encode_cpu_s_per_mb": round((time.process_time() - t0) / (len(blob) / 1e6), 4)}
        log(f"zoo {name}: {out[name]}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="blob size in MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each (default 3)")
    ap.add_argument("--zoo", default="digits,mlp784,small,magika",
                    help="zoo models whose input wire bytes to report (comma-separated; '' none)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument("--holder", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mib < 1 or args.repeat < 1:
        ap.error("--mib and --repeat must be >= 1")
    if args.holder:
        trio.run(holder, args.mib, args.workdir)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-blob-") as tmp:
        result = trio.run(bench, args.mib, args.repeat, Path(tmp))
    out = {
        "benchmark": "blob",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": B.machine_info(),
        "method": METHOD,
        **result,
        "zoo_inputs": zoo_wire_bytes([n for n in args.zoo.split(",") if n]),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
