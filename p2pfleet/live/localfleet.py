"""A local fleet of real `p2pfleet node start` processes on loopback.

Used by `make demo`, the benchmarks and the system tests. Node i listens on
127.0.<i+1>.1 (distinct /24 network prefixes, so publishers' one-replica-per-prefix rule
sees distinct peers; `ip` puts several nodes behind one prefix) on a port the OS picks; node 0 starts first and the others bootstrap from it. Each node has its own data
dir under `root`; settings are passed as `-s section.key=value` overrides. Nodes are asked
for their state through their control sockets.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .control import ControlError, request

P2PFLEET = [sys.executable, "-m", "p2pfleet.cli.main"]

# Settings that make a loopback test fleet start at once and show its addresses.
FAST_TEST_SETTINGS = {
    "vehicle.metered": "no",
    "policy.resume_after_s": "0",
    "node.state_jitter_s": "0",
    "node.publish_private_addrs": "true",
    "node.log_level": "info",
    "node.metrics_listen": "127.0.0.1:0",
    # a local fleet serves its DHT from the first second, not after 30 min of uptime
    "node.dht_server_after_s": "0",
    "node.dht_server_uptime_s": "0",
}


class FleetError(Exception):
    pass


@dataclass
class LocalNode:
    index: int
    data_dir: Path
    settings: dict[str, str]
    trace: str | None = None
    trace_speedup: float | None = None
    args: tuple[str, ...] = ()  # more `node start` options, e.g. ("--cheat", "fp16")
    ip: str = ""  # listen address; default 127.0.<index+1>.1
    prefix: tuple[str, ...] = ()  # runs the node inside it, e.g. ("ip", "netns", "exec", ns)
    proc: subprocess.Popen | None = None
    peer_id: str = ""
    addr: str = ""
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.data_dir.parent / f"node-{self.index}.out"
        self.ip = self.ip or f"127.0.{self.index + 1}.1"

    @property
    def control(self) -> Path:
        return self.data_dir / "control.sock"

    def ask(self, cmd: str, **args: Any) -> dict:
        return request(self.control, cmd, **args)

    def try_ask(self, cmd: str, **args: Any) -> dict | None:
        try:
            return self.ask(cmd, **args)
        except ControlError:
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, network: str, bootstrap: list[str]) -> None:
        cmd = [*self.prefix, *P2PFLEET, "--data-dir", str(self.data_dir)]
        for key, value in self.settings.items():
            cmd += ["-s", f"{key}={value}"]
        cmd += ["node", "start", "--listen", f"/ip4/{self.ip}/tcp/0"]
        for addr in bootstrap:
            cmd += ["--bootstrap", addr]
        if self.trace:
            cmd += ["--vehicle-trace", self.trace]
        if self.trace_speedup:
            cmd += ["--trace-speedup", str(self.trace_speedup)]
        cmd += list(self.args)
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        out.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise FleetError(f"node {self.index} did not stop within {timeout} s of {sig}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def socket_inodes(pid: int) -> set[str]:
    """Inode numbers of the sockets the process has open (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_sockets(pid: int, ignore: tuple[str, ...] = (), involving: str | None = None) -> int:
    """TCP sockets (any state) the process holds open, from /proc (Linux); `ignore` lists
    local "host:port" addresses not to count (e.g. the node's own metrics listener);
    `involving`: only sockets with this IPv4 address at either end."""
    ignored = {_proc_addr(a) for a in ignore}
    ip = _proc_addr(f"{involving}:0").partition(":")[0] if involving else None
    inodes = socket_inodes(pid)
    count = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[9] not in inodes or f[1] in ignored:
                continue
            if ip is None or ip in (f[1].partition(":")[0], f[2].partition(":")[0]):
                count += 1
    return count


def _proc_addr(host_port: str) -> str:
    """'127.0.0.1:9464' in /proc/net/tcp's notation ('0100007F:24F8')."""
    host, _, port = host_port.rpartition(":")
    packed = bytes(int(x) for x in host.split("."))[::-1]
    return f"{packed.hex().upper()}:{int(port):04X}"


def mesh_sockets(node: "LocalNode") -> int:
    """TCP sockets a node process holds, apart from its local metrics listener."""
    status = node.ask("status")
    ignore = (status["metrics_addr"],) if status.get("metrics_addr") else ()
    return tcp_sockets(node.proc.pid, ignore)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise FleetError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class LocalFleet:
    def __init__(self, root: Path, n: int, *, network: str = "localfleet",
                 settings: dict[str, str] | None = None,
                 traces: dict[int, str] | None = None, trace_speedup: float | None = None):
        self.root = Path(root)
        self.network = network
        base = {**FAST_TEST_SETTINGS, **(settings or {})}
        self.nodes = [LocalNode(i, self.root / f"node-{i}", dict(base),
                                trace=(traces or {}).get(i), trace_speedup=trace_speedup)
                      for i in range(n)]

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            proc = subprocess.run([*P2PFLEET, "--data-dir", str(node.data_dir), "--json", "node",
                                   "init", "--network", self.network],
                                  capture_output=True, text=True, timeout=60)
            if proc.returncode != 0:
                raise FleetError(f"node init failed: {proc.stderr.strip()}")
            import json
            node.peer_id = json.loads(proc.stdout)["peer_id"]

    def start(self, timeout: float = 60.0) -> None:
        self.init()
        first = self.nodes[0]
        first.start(self.network, [])
        first.addr = self.wait_addr(first, timeout)
        for node in self.nodes[1:]:
            node.start(self.network, [first.addr])
        for node in self.nodes[1:]:
            if node.trace is None:
                node.addr = self.wait_addr(node, timeout)
            else:  # a car may be out of the mesh: wait for its control socket only
                wait_for(lambda: self._check_alive(node) and node.try_ask("status"), timeout,
                         f"node {node.index} to answer")

    @staticmethod
    def _check_alive(node: LocalNode) -> bool:
        if not node.alive():
            raise FleetError(f"node {node.index} exited:\n{node.output()[-2000:]}")
        return True

    def wait_addr(self, node: LocalNode, timeout: float) -> str:
        def addr() -> str | None:
            self._check_alive(node)
            status = node.try_ask("status")
            return status["listen_addrs"][0] if status and status["listen_addrs"] else None
        return wait_for(addr, timeout, f"node {node.index} to listen")

    def stop(self) -> None:
        errors = []
        for node in reversed(self.nodes):
            try:
                node.stop()
            except FleetError as exc:
                errors.append(str(exc))
        if errors:
            raise FleetError("; ".join(errors))

    def __enter__(self) -> "LocalFleet":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
