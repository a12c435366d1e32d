"""A TCP relay that adds latency: every chunk is forwarded `--delay-ms` after it arrived.

The test bed's kernel has no netem qdisc, so links get their latency here, in user space.
Each direction keeps its byte order; a bounded queue per direction gives back-pressure.
Prints `listening <ip>:<port>` once it accepts connections.
"""

from __future__ import annotations

import argparse
import sys

import trio

CHUNK = 65536
QUEUE = 256  # chunks in flight per direction


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, delay: float) -> None:
    send, recv = trio.open_memory_channel(QUEUE)

    async def reader() -> None:
        async with send:
            while data := await src.receive_some(CHUNK):
                await send.send((trio.current_time() + delay, data))

    async def writer() -> None:
        async with recv:
            async for due, data in recv:
                await trio.sleep_until(due)
                await dst.send_all(data)
        await dst.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(writer)


async def _serve(client: trio.SocketStream, to: tuple[str, int], delay: float) -> None:
    try:
        async with client, await trio.open_tcp_stream(*to) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, server, delay)
                nursery.start_soon(_pump, server, client, delay)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # one side went away: the connection ends, the relay goes on


def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected ip:port")
    return host, int(port)


async def main(listen: tuple[str, int], to: tuple[str, int], delay: float) -> None:
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
    ip, port = listeners[0].socket.getsockname()[:2]
    print(f"listening {ip}:{port}", flush=True)
    await trio.serve_listeners(lambda s: _serve(s, to, delay), listeners)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_addr, required=True, help="ip:port (port 0: any)")
    parser.add_argument("--to", type=_addr, required=True, help="ip:port to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    args = parser.parse_args()
    if args.delay_ms < 0:
        sys.exit(f"--delay-ms {args.delay_ms}: must be >= 0")
    trio.run(main, args.listen, args.to, args.delay_ms / 1000)
