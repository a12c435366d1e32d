"""A user-space Ethernet bridge between two interfaces that holds every frame `--delay-ms`.

This kernel has no netem qdisc (and no fq, etf or nfqueue), so a link gets its latency
here: `linkdelay.delay_link` moves a host's address onto one end of a new veth pair and runs
this program between the other end and the host's real link. Every frame, whatever the
protocol (TCP of libp2p, ARP, UDP), crosses it in both directions, in order.

The packet sockets use PACKET_VNET_HDR: each frame comes with its virtio-net header (GSO and
checksum-offload state) and is sent on with it, so the kernel still segments and checksums
large TCP frames; no ethtool is needed. A direction holding more than `--queue-bytes` drops
new frames, as a router's full buffer would. Prints `bridging` once it runs.
"""

from __future__ import annotations

import argparse
import collections
import select
import socket
import sys
import time

SOL_PACKET = 263
ETH_P_ALL = 0x0003
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23  # never read back the frames this bridge sends
FRAME = 65536 + 64


def _open(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((ifname, ETH_P_ALL))
    sock.setblocking(False)
    return sock


def run(a: str, b: str, delay: float, queue_bytes: int) -> None:
    socks = {a: _open(a), b: _open(b)}
    other = {a: b, b: a}
    # per destination: frames (due time, bytes) in arrival order; the delay is constant, so
    # each queue is sorted by due time
    queues: dict[str, collections.deque] = {a: collections.deque(), b: collections.deque()}
    held = {a: 0, b: 0}
    by_fd = {s.fileno(): name for name, s in socks.items()}
    print("bridging", flush=True)
    while True:
        now = time.monotonic()
        for dst, q in queues.items():
            while q and q[0][0] <= now:
                _due, frame = q.popleft()
                held[dst] -= len(frame)
                try:
                    socks[dst].send(frame)
                except OSError:
                    pass  # e.g. the link went down: the frame is lost, as on a wire
        due = min((q[0][0] for q in queues.values() if q), default=None)
        timeout = None if due is None else max(0.0, due - time.monotonic())
        ready, _, _ = select.select(list(by_fd), [], [], timeout)
        now = time.monotonic()
        for fd in ready:
            src = by_fd[fd]
            dst = other[src]
            while True:
                try:
                    frame = socks[src].recv(FRAME)
                except BlockingIOError:
                    break
                if held[dst] + len(frame) > queue_bytes:
                    continue  # full buffer: tail drop
                queues[dst].append((now + delay, frame))
                held[dst] += len(frame)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--between", nargs=2, required=True, metavar="IFNAME",
                        help="the two interfaces to bridge")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    parser.add_argument("--queue-bytes", type=int, default=8 << 20,
                        help="bytes held per direction before frames are dropped")
    args = parser.parse_args()
    if args.delay_ms < 0:
        sys.exit(f"--delay-ms {args.delay_ms}: must be >= 0")
    run(args.between[0], args.between[1], args.delay_ms / 1000, args.queue_bytes)
