#!/usr/bin/env python3
"""Connection churn against one node: many connect/disconnect cycles, then an honest peer.

A car fleet churns all the time; py-libp2p 0.8.1 leaked an inbound slot per connection
(fix 4 in p2pfleet/net/libp2p_fixes.py), so a node that had seen (max_connections -
min_connections) inbound connections refused every new one. This starts a node (and an
honest neighbour) in-process on loopback, has `--concurrency` raw py-libp2p hosts connect
and disconnect `--cycles` times in all (each from its own 127.0.4.x address), then starts
a fresh honest peer that must connect, read the node's DHT record and receive a job
announcement. The test suite runs ~150 cycles (tests/integration/test_hostile.py); this
runs thousands.

    tools/bench_churn.py --cycles 2000            # JSON on stdout
    tools/bench_churn.py --cycles 500 --out out/bench_churn.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import multiaddr  # noqa: E402
import trio  # noqa: E402
from libp2p import new_host  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: E402

from p2pfleet.identity import Identity  # noqa: E402
from p2pfleet.net.mesh import Mesh, MeshSettings, _close_swarm  # noqa: E402
from p2pfleet.wire.envelope import seal  # noqa: E402
from p2pfleet.wire.samples import sample_body  # noqa: E402

NETWORK = "bench"


def settings(i: int, args: argparse.Namespace) -> MeshSettings:
    return MeshSettings(network=NETWORK, listen=(f"/ip4/127.0.0.{i + 1}/tcp/0",),
                        heartbeat_s=0.5, dht_idle_timeout_s=2.0, seed=i,
                        max_connections=args.max_connections,
                        min_connections=args.min_connections)


async def honest_peer_served(victim: Mesh, args: argparse.Namespace) -> tuple[bool, str]:
    """A fresh peer connects, reads the victim's record and receives its announcement."""
    newcomer = Mesh(Identity.from_seed(b"bench newcomer"), settings(7, args))
    async with trio.open_nursery() as nursery:
        await nursery.start(newcomer.run)
        try:
            with trio.fail_after(30):
                await newcomer.connect(victim.listen_addrs()[0])
                now_ms = int(time.time() * 1000)
                record = dataclasses.replace(sample_body("capacity", now_ms, NETWORK), seq=now_ms)
                await victim.put_capacity(seal(record, victim.identity, NETWORK))
                got = await newcomer.get_capacity(victim.identity.peer_id)
                if got is None or got.signer != victim.identity.public_key:
                    return False, "the newcomer could not read the node's record"
                topic = victim.names.topic("jobs")
                while newcomer.host.get_id() not in victim.pubsub.router.mesh.get(topic, set()):
                    await trio.sleep(0.05)
                publisher = Identity.from_seed(os.urandom(8))
                job = seal(sample_body("job", now_ms, NETWORK), publisher, NETWORK)
                await victim.announce_job(job)
                opened = await newcomer.jobs.receive()
                if opened.signer != publisher.public_key:
                    return False, "the newcomer received another announcement"
                return True, ""
        except trio.TooSlowError:
            return False, "timed out"
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            return False, f"{type(exc).__name__}: {exc}"
        finally:
            nursery.cancel_scope.cancel()


async def run(args: argparse.Namespace) -> dict:
    async with trio.open_nursery() as nursery:
        victim = Mesh(Identity.from_seed(b"bench victim"), settings(0, args))
        await nursery.start(victim.run)
        neighbour = Mesh(Identity.from_seed(b"bench neighbour"), settings(1, args))
        await nursery.start(neighbour.run)
        await neighbour.connect(victim.listen_addrs()[0])
        info = info_from_p2p_addr(multiaddr.Multiaddr(victim.listen_addrs()[0]))
        swarm = victim.host.get_network()
        failures: list[str] = []
        done = 0

        async def churner(i: int, cycles: int) -> None:
            nonlocal done
            host = new_host(key_pair=create_new_key_pair(f"churner-{i}".encode().ljust(32, b"\0")))
            async with host.run([]):
                for _ in range(cycles):
                    try:
                        with trio.fail_after(10):
                            await host.get_network().dial_addr(
                                info.addrs[0], info.peer_id, source=(f"127.0.4.{i + 1}", 0))
                            await host.get_network().close_peer(info.peer_id)
                    except Exception as exc:  # noqa: BLE001 - counted, not fatal
                        failures.append(f"{type(exc).__name__}: {exc}"[:200])
                    done += 1
                    if args.progress and done % 250 == 0:
                        print(f"{done} cycles", file=sys.stderr, flush=True)
                await _close_swarm(host)

        start = time.monotonic()
        per, extra = divmod(args.cycles, args.concurrency)
        async with trio.open_nursery() as churn:
            for i in range(args.concurrency):
                churn.start_soon(churner, i, per + (1 if i < extra else 0))
        seconds = time.monotonic() - start
        with trio.move_on_after(10):
            while swarm._inbound_limiter.borrowed_tokens > 1:  # the neighbour's
                await trio.sleep(0.05)
        slots = int(swarm._inbound_limiter.borrowed_tokens)
        served, why = await honest_peer_served(victim, args)
        rm = swarm._resource_manager
        result = {
            "cycles": args.cycles,
            "seconds": round(seconds, 1),
            "cycles_per_second": round(args.cycles / seconds, 1) if seconds else None,
            "failed_cycles": len(failures),
            "first_failures": failures[:3],
            "honest_peer_served": "yes" if served else "no",
            "why_not_served": why or None,
            "inbound_slots_in_use_after": slots,
            "inbound_slots": int(swarm._inbound_limiter.total_tokens),
            "resource_manager_connections_after": getattr(rm, "_current_connections", None),
            "max_connections": args.max_connections,
            "min_connections": args.min_connections,
            "concurrency": args.concurrency,
        }
        nursery.cancel_scope.cancel()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=6,
                        help="churning hosts at once (keep below the inbound slots)")
    parser.add_argument("--max-connections", type=int, default=12)
    parser.add_argument("--min-connections", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--progress", action="store_true", help="progress on stderr")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # py-libp2p logs every refused dial
    result = trio.run(run, args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if result["honest_peer_served"] == "yes" and not result["failed_cycles"] else 1


if __name__ == "__main__":
    sys.exit(main())
