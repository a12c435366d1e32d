"""A publisher and a fleet of real nodes in the bed, and a verified job between them.

`start_fleet` starts `p2pfleet node start` in each host (the first is every other's
bootstrap node); `submit` starts `p2pfleet job submit` in the publisher's host, listening on
its bed address. Used by tests/netbed and tools/bench_net.py.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from p2pfleet.live.localfleet import LocalNode, wait_for

from .bed import Host
from .nodes import start_node

NETWORK = "netbed"
NODE_SETTINGS = {"publishers.serve_anyone": "true", "publishers.retry_base_s": "1",
                 "policy.max_threads": "1"}
PUBLISHING = {"publishing.request_interval_s": "0.2", "publishing.min_lease_s": "20",
              "publishing.cross_class_wait_s": "1", "publishing.announce_interval_s": "2"}


def start_fleet(hosts: Sequence[Host], root: Path, settings: dict[str, str] | None = None,
                timeout: float = 90.0) -> list[LocalNode]:
    """One node per host; returns once every node is in the mesh."""
    nodes: list[LocalNode] = []
    for host in hosts:
        boot = [nodes[0].addr] if nodes else []
        nodes.append(start_node(host, root, network=NETWORK, bootstrap=boot,
                                settings={**NODE_SETTINGS, **(settings or {})}))
    for node in nodes[1:]:
        wait_for(lambda n=node: (n.try_ask("status") or {}).get("in_mesh"), timeout,
                 f"node {node.index} to be in the mesh")
    return nodes


def publisher_argv(pub_root: Path, listen: str, model: Path, inputs: Path, out: Path,
                   bootstrap: str, *options: str) -> list[str]:
    """The `p2pfleet job submit --json --out <out>` command line of a test publisher;
    `options` are more `job submit` options (shard size, quorum, --trust ...)."""
    argv = [sys.executable, "-m", "p2pfleet.cli.main", "--data-dir", str(pub_root),
            "--network", NETWORK]
    for key, value in PUBLISHING.items():
        argv += ["-s", f"{key}={value}"]
    return argv + ["job", "submit", str(model), str(inputs), "--json", "--out", str(out),
                   "--listen", listen, "--bootstrap", bootstrap, *options]


def submit(pub: Host, pub_root: Path, model: Path, inputs: Path, out: Path,
           bootstrap: str, *options: str) -> subprocess.Popen:
    """`publisher_argv` run in the publisher's host, listening on its bed address (stdout
    and stderr piped as text)."""
    argv = publisher_argv(pub_root, f"/ip4/{pub.ip}/tcp/0", model, inputs, out, bootstrap,
                          *options)
    return pub.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     env={**os.environ, "PYTHONUNBUFFERED": "1"})


def accepted_in_store(pub_root: Path) -> int:
    """Shards the publisher has accepted so far, read from its job store (0 before it
    exists)."""
    path = Path(pub_root) / "publisher" / "jobs.sqlite"
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return db.execute("select count(*) from shards where status='accepted'").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0
