"""The bed itself: reachability, NAT behaviour, bandwidth, loss and latency."""

from __future__ import annotations

import pytest
from bedkit import TOKENS, probe, read_json, serve

import netbed

KB = 1024


@pytest.fixture(scope="module")
def bed():
    reason = netbed.missing()
    if reason:
        pytest.skip(reason)
    with netbed.Bed() as b:
        TOKENS.append(b.token)
        b.public("a")
        b.public("b")
        b.behind(b.nat_router("rp", mode="preserve"), "np")
        b.behind(b.nat_router("rr", mode="random"), "nr")
        yield b


def test_public_hosts_reach_each_other(bed):
    a, b = bed.hosts["a"], bed.hosts["b"]
    sink, addr = serve(b, "tcp-sink", "--listen", f"{b.ip}:0")
    sent = probe(a, "tcp-send", "--to", f"{addr[0]}:{addr[1]}", "--bytes", str(100 * KB))
    assert sent["ok"], sent
    got = read_json(sink)
    assert got["bytes"] == 100 * KB and got["peer"][0] == a.ip


def test_no_route_to_the_real_uplink(bed):
    a, n = bed.hosts["a"], bed.hosts["np"]
    for host in (a, n):
        routes = host.run(["ip", "route", "get", "1.1.1.1"], check=False)
        assert routes.returncode != 0 or "via 10.77." in routes.stdout, routes.stdout
        # the NAT router itself has no default route, so nothing leaves the bed
        assert probe(host, "tcp-send", "--to", "1.1.1.1:80", "--timeout", "2")["ok"] is False


def test_nated_host_reaches_public_host_from_the_routers_address(bed):
    a, n = bed.hosts["a"], bed.hosts["np"]
    sink, addr = serve(a, "tcp-sink", "--listen", f"{a.ip}:0")
    assert probe(n, "tcp-send", "--to", f"{addr[0]}:{addr[1]}", "--bytes", "10")["ok"]
    assert read_json(sink)["peer"][0] == n.router.ip


@pytest.mark.parametrize("nated", ["np", "nr"])
def test_public_host_cannot_dial_nated_host(bed, nated):
    """Neither at the router's public address nor at the private one, even with a route."""
    a, n = bed.hosts["a"], bed.hosts[nated]
    sink, addr = serve(n, "tcp-sink", "--listen", "0.0.0.0:0")
    port = addr[1]
    # the same listener is reachable inside the private network: it really listens
    assert probe(n.router, "tcp-send", "--to", f"{n.ip}:{port}", "--bytes", "1")["ok"]
    assert probe(a, "tcp-send", "--to", f"{n.router.ip}:{port}", "--timeout", "3")["ok"] is False
    assert probe(a, "tcp-send", "--to", f"{n.ip}:{port}", "--timeout", "3")["ok"] is False
    net = str(n.router.lan)
    a.run(["ip", "route", "add", net, "via", n.router.ip])
    try:  # a route to the private network: the router's forward chain still drops it
        assert probe(a, "tcp-send", "--to", f"{n.ip}:{port}", "--timeout", "3")["ok"] is False
    finally:
        a.run(["ip", "route", "del", net])


@pytest.mark.parametrize("router", ["rp", "rr"])
def test_router_drops_unsolicited_syn_without_a_reset(bed, router):
    """A SYN to a NAT router's own address that no mapping expects is dropped (the dial
    times out), never refused: a RST would end an early hole-punch SYN's mapping."""
    a, r = bed.hosts["a"], bed.hosts[router]
    sent = probe(a, "tcp-send", "--to", f"{r.ip}:4001", "--timeout", "2")
    assert sent["ok"] is False and "timeout" in sent["error"].lower(), sent


@pytest.mark.parametrize("nated, preserved", [("np", True), ("nr", False)])
def test_nat_mode_decides_whether_the_source_port_survives(bed, nated, preserved):
    """Seen from the public side: port-preserving NAT keeps the host's source port (what
    hole punching needs), the symmetric NAT picks random ones."""
    a, n = bed.hosts["a"], bed.hosts[nated]
    sink, addr = serve(a, "tcp-sink", "--listen", f"{a.ip}:0")
    kept = []
    for src_port in (41001, 41002, 41003):
        assert probe(n, "tcp-send", "--to", f"{addr[0]}:{addr[1]}", "--bytes", "1",
                     "--bind-port", str(src_port))["ok"]
        seen = read_json(sink)["peer"]
        assert seen[0] == n.router.ip
        kept.append(seen[1] == src_port)
    assert all(kept) if preserved else not any(kept), kept


def test_shaping_limits_throughput_to_about_the_rate(bed):
    a, b = bed.hosts["a"], bed.hosts["b"]
    s = bed.public("s")
    bed.shape(s, rate_mbit=2)  # 250 KB/s each way
    size = 750 * KB  # 3 s at the rate
    sink, addr = serve(b, "tcp-sink", "--listen", f"{b.ip}:0")
    assert probe(s, "tcp-send", "--to", f"{addr[0]}:{addr[1]}", "--bytes", str(size))["ok"]
    shaped = read_json(sink)
    assert shaped["bytes"] == size
    # bytes moved can never beat the rate (plus the bucket's burst): a lower bound on time
    # that a slow machine only makes safer
    rate = 2e6 / 8
    assert shaped["bytes"] <= rate * shaped["seconds"] * 1.2 + 64 * KB, shaped
    # and shaping does not starve it: at least a tenth of the rate
    assert shaped["bytes"] >= rate * shaped["seconds"] * 0.1, shaped
    # the same transfer from an unshaped host beats the shaped rate by far
    sink2, addr2 = serve(b, "tcp-sink", "--listen", f"{b.ip}:0")
    assert probe(a, "tcp-send", "--to", f"{addr2[0]}:{addr2[1]}", "--bytes", str(size))["ok"]
    free = read_json(sink2)
    assert free["bytes"] > rate * free["seconds"] * 2, free


def test_loss_rule_drops_packets(bed):
    a = bed.hosts["a"]
    lossy = bed.public("l")
    count = 1000
    sink, addr = serve(lossy, "udp-sink", "--listen", f"{lossy.ip}:0")
    probe(a, "udp-send", "--to", f"{addr[0]}:{addr[1]}", "--count", str(count))
    clean = read_json(sink)["datagrams"]
    assert clean == count  # nothing lost before the rule
    bed.shape(lossy, loss_pct=30)
    sink, addr = serve(lossy, "udp-sink", "--listen", f"{lossy.ip}:0")
    probe(a, "udp-send", "--to", f"{addr[0]}:{addr[1]}", "--count", str(count))
    got = read_json(sink)["datagrams"]
    # 30 % loss of 1000: 700 +- 15 (one sigma); these bounds are > 6 sigma away
    assert 500 < got < 900, got


def test_delay_relay_adds_latency(bed):
    a, b = bed.hosts["a"], bed.hosts["b"]
    echo, addr = serve(b, "tcp-echo", "--listen", f"{b.ip}:0")
    relay = bed.delay_relay(a, addr, delay_ms=50)
    out = probe(a, "tcp-rtt", "--to", f"{relay[0]}:{relay[1]}", "--rounds", "3")
    # each round trip crosses the relay twice (50 ms each way): never faster than 100 ms
    assert out["rounds"] == 3 and out["min_rtt_ms"] >= 100, out


def test_netem_is_missing_on_this_kernel_or_usable(bed):
    """The bed takes latency from delay_relay because netem is not there on every kernel
    (not on the one it was written on); this records which case this machine is."""
    a = bed.hosts["a"]
    tried = a.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], check=False)
    if tried.returncode == 0:
        a.run(["tc", "qdisc", "del", "dev", "lo", "root"])
    else:
        assert "unknown" in tried.stderr.lower() or "not" in tried.stderr.lower(), tried.stderr


def test_bad_arguments_are_named(bed):
    with pytest.raises(netbed.BedError, match="NAT mode 'cone'"):
        bed.nat_router("rx", mode="cone")
    with pytest.raises(netbed.BedError, match="loss_pct 101"):
        bed.shape(bed.hosts["a"], loss_pct=101)
    with pytest.raises(netbed.BedError, match="already used"):
        bed.public("a")
    with pytest.raises(netbed.BedError, match="not a NAT router"):
        bed.behind(bed.hosts["a"], "x")
