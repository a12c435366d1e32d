#!/usr/bin/env python3
"""Benchmark blob transfer: the `blob` protocol against a bare libp2p stream and plain TCP.

One run, one process, loopback (127.0.0.1 serves, 127.0.0.2 fetches), the same bytes:

1. blob: `BlobService.fetch` of an N MiB public blob (default 64) from a node that holds it
   (signed 256 KiB `blob_chunk`s, every chunk checked, the whole blob hash-checked and
   written into the fetcher's cache; the cache file fsynced);
2. libp2p: the same bytes written in 256 KiB pieces on a bare stream of the same two
   py-libp2p hosts (TCP + Noise + Yamux), read to EOF, no framing or checks;
3. tcp: the same bytes over a plain trio TCP socket.

Each is run `--repeat` times after one warm-up (the warm-up also lets the server hash its
file once); MB/s = 10^6 bytes per second of wall clock, from the request to the last byte.
Both ends share one Python process (and its GIL) in every case, so the ratio compares the
protocols, not the scheduling. JSON goes to stdout (and --out FILE); progress to stderr.

    tools/bench_blob.py                  # 64 MiB, 3 runs each
    tools/bench_blob.py --mib 16 --repeat 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

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

METHOD = ("two py-libp2p hosts in one process on loopback; best and median of --repeat "
          "interleaved runs after a warm-up; MB/s = 10^6 bytes / wall-clock s from request "
          "to last byte; cpu_seconds = process CPU time (all threads, both ends) per run")
NETWORK = "bench"
RAW_PROTOCOL = TProtocol("/p2pfleet-bench/raw/1.0.0")
PIECE = 256 * 1024


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1)


async def bench(mib: int, repeat: int, workdir: Path) -> dict:
    data = os.urandom(mib * 1024 * 1024)
    digest = hashlib.sha256(data).digest()
    size = len(data)
    results: dict[str, list[float]] = {"blob": [], "libp2p": [], "tcp": []}
    cpu: dict[str, list[float]] = {"blob": [], "libp2p": [], "tcp": []}
    async with trio.open_nursery() as nursery:
        meshes = []
        for i in range(2):
            mesh = Mesh(Identity.from_seed(f"bench-blob-{i}".encode()),
                        MeshSettings(network=NETWORK, listen=(f"/ip4/127.0.0.{i + 1}/tcp/0",),
                                     seed=i))
            await nursery.start(mesh.run)
            meshes.append(mesh)
        server, client = meshes
        await client.connect(server.listen_addrs()[0])
        serve = BlobService(server, BlobCache(workdir / "server", 2 * size))
        serve.install()
        serve.cache.put(digest, data, public=True)
        fetch = BlobService(client, BlobCache(workdir / "client", 2 * size))

        async def raw_handler(stream) -> None:
            view = memoryview(data)
            for off in range(0, size, PIECE):
                await stream.write(bytes(view[off:off + PIECE]))
            await stream.close()

        server.host.set_stream_handler(RAW_PROTOCOL, raw_handler)
        server_id = ID.from_base58(server.identity.peer_id)

        async def run_blob() -> float:
            fetch.cache.remove(digest)
            t0 = time.perf_counter()
            got = await fetch.fetch(digest, size, [server.identity.peer_id], public=True,
                                    timeout=600)
            dt = time.perf_counter() - t0
            assert len(got) == size
            return dt

        async def run_libp2p() -> float:
            t0 = time.perf_counter()
            stream = await client.host.new_stream(server_id, [RAW_PROTOCOL])
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

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]

        async def tcp_server(stream) -> None:
            view = memoryview(data)
            async with stream:
                for off in range(0, size, PIECE):
                    await stream.send_all(view[off:off + PIECE])

        nursery.start_soon(trio.serve_listeners, tcp_server, listeners)

        async def run_tcp() -> float:
            t0 = time.perf_counter()
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            n = 0
            async with stream:
                while True:
                    chunk = await stream.receive_some(1 << 20)
                    if not chunk:
                        break
                    n += len(chunk)
            dt = time.perf_counter() - t0
            assert n == size, n
            return dt

        runs = {"blob": run_blob, "libp2p": run_libp2p, "tcp": run_tcp}
        for name, fn in runs.items():
            await fn()  # warm-up
        for r in range(repeat):
            for name, fn in runs.items():  # interleaved, so drift hits all alike
                c0 = time.process_time()
                dt = await fn()
                cpu[name].append(time.process_time() - c0)
                results[name].append(dt)
                log(f"run {r + 1}/{repeat} {name}: {mbps(size, dt)} MB/s")
        nursery.cancel_scope.cancel()
    best = {k: mbps(size, min(v)) for k, v in results.items()}
    median = {k: mbps(size, sorted(v)[len(v) // 2]) for k, v in results.items()}
    ratio = round(best["blob"] / best["libp2p"], 3)
    return {
        "bytes": size,
        "repeat": repeat,
        "mb_per_s_best": best,
        "mb_per_s_median": median,
        "seconds": {k: [round(x, 3) for x in v] for k, v in results.items()},
        "cpu_seconds": {k: [round(x, 3) for x in v] for k, v in cpu.items()},
        "cpu_ms_per_mib_best": {k: round(min(v) * 1000 / (size / 2**20), 2) for k, v in cpu.items()},
        "blob_vs_libp2p": ratio,
        "blob_vs_libp2p_median": round(median["blob"] / median["libp2p"], 3),
        "targets": [{"name": "blob MB/s >= 0.8 x bare libp2p stream", "target": 0.8,
                     "value": ratio, "met": ratio >= 0.8}],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="blob size in MiB (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each (default 3)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    if args.mib < 1 or args.repeat < 1:
        ap.error("--mib and --repeat must be >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-blob-") as tmp:
        result = trio.run(bench, args.mib, args.repeat, Path(tmp))
    out = {
        "benchmark": "blob",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": B.machine_info(),
        "method": METHOD,
        **result,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
