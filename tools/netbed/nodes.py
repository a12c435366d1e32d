"""Real `p2pfleet node start` processes inside test-bed hosts.

A node is a `LocalNode` (p2pfleet/live/localfleet.py, as the system tests use) whose command runs
under `ip netns exec`: it listens on its host's address, its control socket is a file in
its data dir, so the caller (in any namespace) talks to it as to a loopback node.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from p2pfleet.live.localfleet import FAST_TEST_SETTINGS, P2PFLEET, LocalNode, wait_for

from .bed import BedError, Host


def start_node(host: Host, data_root: Path, *, network: str = "netbed",
               bootstrap: list[str] = (), settings: dict[str, str] | None = None,
               index: int | None = None, timeout: float = 60.0) -> LocalNode:
    """Initialise a data dir under `data_root` and start a node in `host`; returns once the
    node listens (its `addr` is set). The bed stops it on exit."""
    index = len(host.bed.started_nodes) if index is None else index
    node = LocalNode(index, Path(data_root) / f"{host.name}-node", {**FAST_TEST_SETTINGS,
                     **(settings or {})}, ip=host.ip, prefix=tuple(host.cmd([])))
    node.data_dir.parent.mkdir(parents=True, exist_ok=True)
    init = subprocess.run([*P2PFLEET, "--data-dir", str(node.data_dir), "--json", "node", "init",
                           "--network", network], capture_output=True, text=True, timeout=60)
    if init.returncode != 0:
        raise BedError(f"node init for {host.name} failed: {init.stderr.strip()}")
    node.peer_id = json.loads(init.stdout)["peer_id"]
    node.start(network, list(bootstrap))
    host.procs.append(node.proc)
    host.bed.started_nodes.append(node)

    def listening() -> str | None:
        if not node.alive():
            raise BedError(f"node in {host.name} exited:\n{node.output()[-2000:]}")
        status = node.try_ask("status")
        return status["listen_addrs"][0] if status and status["listen_addrs"] else None

    node.addr = wait_for(listening, timeout, f"the node in {host.name} to listen")
    return node
