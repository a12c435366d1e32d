"""The network test bed: hosts in Linux network namespaces, a switch, NAT routers, shaping.

Layout (all names carry a per-run token, so parallel runs never collide):

    nb<token>-pub           the "internet": one bridge `br0`, no addresses, no uplink
    nb<token>-<host>        a public host: eth0 (172.16.<n>.2/12) on the bridge
    nb<token>-<router>      a NAT router: wan (172.16.<n>.2/12) on the bridge, lan bridge
                            (10.77.<k>.1/24), nftables masquerade out of wan
    nb<token>-<host>        a host behind that router: eth0 (10.77.<k>.x/24), default
                            route via the router

Every veth pair is created inside the namespaces (`ip -n <ns> link add ... peer ... netns`),
so nothing is ever added to the root namespace and no namespace has a route to the machine's
real uplink. Leaving the context (normally, on an error, on Ctrl-C or SIGTERM) stops every
process started in the bed and deletes every namespace, which destroys its links.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The "internet": one switch, but every public host and router in a /24 of its own (as on
# the real internet), so rules keyed on network prefixes, such as the publishers' one
# replica per /24, see them as different networks. The /12 makes them all on-link.
PUBLIC_NET = ipaddress.ip_network("172.16.0.0/12")
NatMode = Literal["preserve", "random"]

# Source NAT of the router: "preserve" keeps the source port when it is free (the cone-like
# NAT hole punching needs), "random" picks a random port for every mapping (symmetric NAT).
_MASQUERADE = {"preserve": "masquerade", "random": "masquerade random,fully-random"}


class BedError(Exception):
    """A bed command failed, or the bed was used wrongly."""


def missing() -> str | None:
    """Why the bed cannot run here (None when it can): it needs root, `ip`, `nft` and
    network namespaces."""
    if sys.platform != "linux":
        return "the network test bed needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the network test bed needs root (to create network namespaces)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"the network test bed needs `{tool}` (apt-get install {package})"
    probe = f"nbprobe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(cmd: list[str], *, input: str | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, input=input)
    if proc.returncode != 0:
        raise BedError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


@dataclass
class Host:
    """One namespace of the bed. `ip` is its address on its own link (for a router, the
    public wan address)."""

    bed: "Bed"
    name: str
    ns: str
    ip: str
    kind: Literal["public", "router", "nat"]
    router: "Host | None" = None
    lan: ipaddress.IPv4Network | None = None  # a router's private network
    _next_lan_host: int = 2
    procs: list[subprocess.Popen] = field(default_factory=list)

    def cmd(self, argv: list[str]) -> list[str]:
        """`argv` wrapped to run inside this host's namespace."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def run(self, argv: list[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run `argv` in the host and wait for it (stdout and stderr captured as text)."""
        proc = subprocess.run(self.cmd(argv), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise BedError(f"`{' '.join(argv)}` in {self.name} exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-2000:]}")
        return proc

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` in the host; the bed stops it on exit."""
        proc = subprocess.Popen(self.cmd(argv), **kwargs)
        self.procs.append(proc)
        return proc

    def python(self, args: list[str], **kwargs) -> subprocess.Popen:
        """Start a Python program (script path and arguments, or ["-c", code]) in the host
        with this interpreter."""
        return self.popen([sys.executable, *args], **kwargs)

    def nft(self, script: str) -> None:
        _run(self.cmd(["nft", "-f", "-"]), input=script)

    def link(self) -> tuple[str, str]:
        """(namespace, interface) of the far end of this host's link: the switch port of a
        public host or router, the router's lan port of a host behind NAT."""
        far = self.bed.pub if self.kind != "nat" else self.router.ns
        return far, f"v{self.name}"[:15]


class Bed:
    """Context manager that builds and always tears down a network test bed."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(3)
        self.pub = f"nb{self.token}-pub"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self._next_public = 2
        self._next_lan = 1
        self._old_sigterm = None
        self.started_nodes: list = []  # LocalNodes started by nodes.start_node

    # -- building ------------------------------------------------------------------
    def __enter__(self) -> "Bed":
        reason = missing()
        if reason:
            raise BedError(reason)
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            # SIGTERM would end the process without running __exit__: turn it into an
            # exception so the namespaces are still removed.
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_exit)
        try:
            self._add_ns(self.pub)
            _run(["ip", "-n", self.pub, "link", "add", "name", "br0", "type", "bridge"])
            _run(["ip", "-n", self.pub, "link", "set", "br0", "up"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def _new_host(self, name: str, kind: str) -> Host:
        if not name or len(name) > 14 or not name.replace("-", "").isalnum():
            raise BedError(f"host name {name!r}: use 1-14 letters, digits or '-'")
        if name in self.hosts or name == "pub":
            raise BedError(f"host name {name!r} is already used in this bed")
        ns = f"nb{self.token}-{name}"
        self._add_ns(ns)
        host = Host(self, name, ns, "", kind)  # type: ignore[arg-type]
        self.hosts[name] = host
        return host

    def _wire(self, host: Host, far_ns: str, far_bridge: str, if_name: str) -> None:
        """A veth pair: `if_name` in the host, `v<name>` on `far_bridge` in `far_ns`."""
        port = f"v{host.name}"[:15]
        _run(["ip", "-n", far_ns, "link", "add", "name", port, "type", "veth",
              "peer", "name", if_name, "netns", host.ns])
        _run(["ip", "-n", far_ns, "link", "set", port, "master", far_bridge])
        _run(["ip", "-n", far_ns, "link", "set", port, "up"])
        _run(["ip", "-n", host.ns, "link", "set", if_name, "up"])

    def _public_ip(self) -> str:
        if self._next_public > 254:
            raise BedError(f"no more addresses in {PUBLIC_NET}")
        ip = f"172.16.{self._next_public}.2"
        self._next_public += 1
        return ip

    def public(self, name: str) -> Host:
        """A host on the switch with a public address."""
        host = self._new_host(name, "public")
        host.ip = self._public_ip()
        self._wire(host, self.pub, "br0", "eth0")
        _run(["ip", "-n", host.ns, "addr", "add", f"{host.ip}/{PUBLIC_NET.prefixlen}",
              "dev", "eth0"])
        return host

    def nat_router(self, name: str, mode: NatMode = "preserve") -> Host:
        """A NAT router on the switch: hosts behind it reach public hosts, never the other
        way round (its forward chain drops new connections coming in on wan, and its input
        chain drops, never refuses, new TCP and UDP flows to its own wan address)."""
        if mode not in _MASQUERADE:
            raise BedError(f"NAT mode {mode!r}: use one of {', '.join(_MASQUERADE)}")
        router = self._new_host(name, "router")
        router.ip = self._public_ip()
        self._wire(router, self.pub, "br0", "wan")
        _run(["ip", "-n", router.ns, "addr", "add", f"{router.ip}/{PUBLIC_NET.prefixlen}",
              "dev", "wan"])
        router.lan = ipaddress.ip_network(f"10.77.{self._next_lan}.0/24")
        self._next_lan += 1
        _run(["ip", "-n", router.ns, "link", "add", "name", "lan", "type", "bridge"])
        _run(["ip", "-n", router.ns, "addr", "add", f"{router.lan[1]}/24", "dev", "lan"])
        _run(["ip", "-n", router.ns, "link", "set", "lan", "up"])
        router.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        router.nft(f"""
table ip netbed_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" {_MASQUERADE[mode]}
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    iifname "lan" accept
    iifname "wan" ct state established,related accept
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    # a SYN (or datagram) to the router's own address that no mapping expects is dropped,
    # not answered with a RST or ICMP error, as home routers do: a peer's early
    # hole-punch SYN must not reach a port the router's kernel refuses
    iifname "wan" ct state new meta l4proto {{ tcp, udp }} drop
  }}
}}
""")
        return router

    def behind(self, router: Host, name: str) -> Host:
        """A host on `router`'s private network, routed through it."""
        if router.kind != "router" or router.lan is None:
            raise BedError(f"{router.name} is not a NAT router of this bed")
        host = self._new_host(name, "nat")
        host.router = router
        host.ip = str(router.lan[router._next_lan_host])
        router._next_lan_host += 1
        self._wire(host, router.ns, "lan", "eth0")
        _run(["ip", "-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
        _run(["ip", "-n", host.ns, "route", "add", "default", "via", str(router.lan[1])])
        return host

    # -- shaping -------------------------------------------------------------------
    def shape(self, host: Host, *, rate_mbit: float | None = None,
              loss_pct: int | None = None) -> None:
        """Shape `host`'s link in both directions: a token bucket (tbf) at `rate_mbit` on
        each end, and an nftables rule dropping `loss_pct` % of the packets the host sends
        and receives. (This kernel has no netem qdisc: latency comes from `delay_relay`.)"""
        if rate_mbit is not None:
            if not rate_mbit > 0:
                raise BedError(f"rate_mbit {rate_mbit!r}: must be > 0")
            far_ns, port = host.link()
            # burst: at least one MTU, ~5 ms of traffic; limit: ~50 ms of queue
            burst = max(3000, int(rate_mbit * 1e6 / 8 * 0.005))
            limit = max(2 * burst, int(rate_mbit * 1e6 / 8 * 0.05))
            for ns, dev in ((host.ns, "eth0" if host.kind != "router" else "wan"), (far_ns, port)):
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                      "tbf", "rate", f"{int(rate_mbit * 1000)}kbit", "burst", str(burst),
                      "limit", str(limit)])
        if loss_pct is not None:
            if not isinstance(loss_pct, int) or not 0 <= loss_pct <= 100:
                raise BedError(f"loss_pct {loss_pct!r}: must be a whole percentage 0..100")
            host.nft(f"""
table inet netbed_loss
delete table inet netbed_loss
table inet netbed_loss {{
  chain input {{ type filter hook input priority -10; numgen random mod 100 < {loss_pct} drop; }}
  chain output {{ type filter hook output priority -10; numgen random mod 100 < {loss_pct} drop; }}
}}
""")

    def delay_relay(self, host: Host, to: tuple[str, int], delay_ms: float,
                    port: int = 0) -> tuple[str, int]:
        """Start a TCP relay in `host`, listening on its address, that forwards to `to` and
        holds every chunk `delay_ms` in each direction. Returns the relay's (ip, port)."""
        script = Path(__file__).with_name("delay_relay.py")
        proc = host.python([str(script), "--listen", f"{host.ip}:{port}", "--to",
                            f"{to[0]}:{to[1]}", "--delay-ms", str(delay_ms)],
                           stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline().strip()
        if not line.startswith("listening "):
            proc.wait(10)
            raise BedError(f"delay relay in {host.name} did not start (exit {proc.returncode})")
        ip, _, bound = line.split()[1].rpartition(":")
        return ip, int(bound)

    # -- teardown ------------------------------------------------------------------
    def close(self) -> None:
        """Stop every process started in the bed and delete every namespace (their veth
        links and bridges go with them). Safe to call twice."""
        try:
            for host in self.hosts.values():
                for proc in host.procs:
                    _stop(proc)
            for ns in reversed(self.namespaces):
                # anything else still running in the namespace (e.g. a daemonised child)
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            self.namespaces.clear()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
                self._old_sigterm = None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
