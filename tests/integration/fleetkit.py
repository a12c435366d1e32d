"""Fixtures for in-process fleets of real py-libp2p hosts on loopback (a few per test)."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import trio

from p2pfleet.identity import Identity
from p2pfleet.net.mesh import Mesh, MeshSettings

NETWORK = "itest"  # one DHT protocol per process (see net/libp2p_fixes.py)


def settings(i: int, **over) -> MeshSettings:
    base = dict(network=NETWORK, listen=(f"/ip4/127.0.0.{i + 1}/tcp/0",), heartbeat_s=0.5,
                dht_idle_timeout_s=2.0, seed=i)
    base.update(over)
    return MeshSettings(**base)


class ShiftedClock:
    """The wall clock plus an offset a test moves forward, to age records without waiting:
    our rules read time through it; py-libp2p's own timers still read time.time()."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@asynccontextmanager
async def fleet(n: int, *, state_dir=None, clock=time.time, **over):
    """Start n meshes; node i>0 bootstraps from node 0. Yields the list of meshes."""
    from p2pfleet.store.state import NodeState

    async with trio.open_nursery() as nursery:
        meshes = []
        for i in range(n):
            state = NodeState(state_dir / f"state-{i}.sqlite") if state_dir else None
            mesh = Mesh(Identity.from_seed(f"itest-node-{i}".encode()), settings(i, **over), state,
                        clock=clock)
            await nursery.start(mesh.run)
            meshes.append(mesh)
        for mesh in meshes[1:]:
            await mesh.connect(meshes[0].listen_addrs()[0])
        try:
            yield meshes
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def hosts(addresses: list[str], name: str):
    """One mesh per IPv4 address (seeded identities `name-i`); all dial the first.
    Addresses may repeat: several hosts behind one address listen on other ports."""
    async with trio.open_nursery() as nursery:
        out = []
        for i, addr in enumerate(addresses):
            mesh = Mesh(Identity.from_seed(f"{name}-{i}".encode()),
                        settings(i, listen=(f"/ip4/{addr}/tcp/0",)))
            await nursery.start(mesh.run)
            out.append(mesh)
        for mesh in out[1:]:
            await mesh.connect(out[0].listen_addrs()[0])
        try:
            yield out
        finally:
            nursery.cancel_scope.cancel()


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll (real time: py-libp2p's timers read time.time()) until predicate() is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await trio.sleep(interval)
