"""Small traffic probes to run inside test-bed hosts; each prints JSON lines.

  tcp-sink --listen IP:PORT          accept connections; per connection, after EOF:
                                     {"peer": [ip, port], "bytes": n, "seconds": s}
  tcp-send --to IP:PORT --bytes N    send N bytes ({"ok": true, ...} or {"ok": false,
           [--bind-port P]           "error": ...} and exit 1 when it cannot connect)
  tcp-echo --listen IP:PORT          echo every connection's bytes back
  tcp-rtt --to IP:PORT --rounds N    {"min_rtt_ms": ...} of N one-byte round trips
  udp-sink --listen IP:PORT          count datagrams until none came for --idle seconds:
                                     {"datagrams": n}
  udp-send --to IP:PORT --count N    send N datagrams

Servers print `listening IP:PORT` first.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time


def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ip:port")
    return host, int(port)


def _out(obj: object) -> None:
    print(json.dumps(obj) if not isinstance(obj, str) else obj, flush=True)


def _listen(addr: tuple[str, int], kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if kind == socket.SOCK_DGRAM:
        # room for every datagram even if the sink is not scheduled for a while, so only
        # the bed's loss rule drops any (root may exceed net.core.rmem_max)
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", socket.SO_RCVBUF),
                        8 << 20)
    sock.bind(addr)
    if kind == socket.SOCK_STREAM:
        sock.listen(16)
    _out("listening %s:%d" % sock.getsockname())
    return sock


def tcp_sink(args: argparse.Namespace) -> None:
    server = _listen(args.listen)

    def drain(conn: socket.socket, peer: tuple[str, int]) -> None:
        start, total = time.monotonic(), 0
        with conn:
            while data := conn.recv(65536):
                total += len(data)
        _out({"peer": list(peer), "bytes": total, "seconds": time.monotonic() - start})

    while True:
        conn, peer = server.accept()
        threading.Thread(target=drain, args=(conn, peer), daemon=True).start()


def tcp_send(args: argparse.Namespace) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.bind_port:
        sock.bind(("0.0.0.0", args.bind_port))
    sock.settimeout(args.timeout)
    try:
        sock.connect(args.to)
    except OSError as exc:
        _out({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    sock.settimeout(None)
    start, block, left = time.monotonic(), b"x" * 65536, args.bytes
    while left > 0:
        left -= sock.send(block[:left])
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # the sink closes after it has counted everything
    _out({"ok": True, "sent": args.bytes, "local": list(sock.getsockname()),
          "seconds": time.monotonic() - start})


def tcp_echo(args: argparse.Namespace) -> None:
    server = _listen(args.listen)

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def tcp_rtt(args: argparse.Namespace) -> None:
    sock = socket.create_connection(args.to, timeout=args.timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    for _ in range(args.rounds):
        start = time.monotonic()
        sock.sendall(b"x")
        if not sock.recv(1):
            break
        rtts.append((time.monotonic() - start) * 1000)
    _out({"min_rtt_ms": min(rtts), "rounds": len(rtts)})


def udp_sink(args: argparse.Namespace) -> None:
    sock = _listen(args.listen, socket.SOCK_DGRAM)
    count = 0
    sock.settimeout(None)
    while True:
        try:
            sock.recv(2048)
        except TimeoutError:
            break
        count += 1
        sock.settimeout(args.idle)
    _out({"datagrams": count})


def udp_send(args: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(args.count):
        sock.sendto(i.to_bytes(4, "big") * 16, args.to)
        if i % 50 == 49:
            time.sleep(0.001)  # pace the burst: no drops in socket buffers, only the rule's
    _out({"sent": args.count})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, fn in (("tcp-sink", tcp_sink), ("tcp-echo", tcp_echo), ("udp-sink", udp_sink)):
        p = sub.add_parser(name)
        p.add_argument("--listen", type=_addr, required=True)
        p.add_argument("--idle", type=float, default=2.0)
        p.set_defaults(fn=fn)
    for name, fn in (("tcp-send", tcp_send), ("tcp-rtt", tcp_rtt), ("udp-send", udp_send)):
        p = sub.add_parser(name)
        p.add_argument("--to", type=_addr, required=True)
        p.add_argument("--bytes", type=int, default=0)
        p.add_argument("--bind-port", type=int, default=0)
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--count", type=int, default=100)
        p.add_argument("--timeout", type=float, default=5.0)
        p.set_defaults(fn=fn)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
