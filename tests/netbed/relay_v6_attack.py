"""Run inside a bed namespace: Sybil identities from many addresses of one IPv6 /64 ask one
relay (net/relay_limits.LimitedRelay on a plain py-libp2p host) for reservations, then an
honest peer from another /64 asks for one. Prints one JSON line:
{"granted": n, "honest": bool, "refused": {...}}.

    relay_v6_attack.py RELAY_IP HONEST_IP ATTACKER_IP...
"""

from __future__ import annotations

import json
import sys
from contextlib import AsyncExitStack

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode, to_proto_status
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from p2pfleet.net.relay import LIMITS
from p2pfleet.net.relay_limits import LimitedRelay

OK = to_proto_status(StatusCode.OK)


async def reserve_from(stack: AsyncExitStack, ip: str, tag: bytes, relay_addr, relay_id) -> bool:
    host = new_host(key_pair=create_new_key_pair(tag.ljust(32, b"\0")))
    await stack.enter_async_context(host.run([multiaddr.Multiaddr(f"/ip6/{ip}/tcp/0")]))
    await host.get_network().dial_addr(relay_addr, relay_id, (ip, 0))
    stream = await host.new_stream(relay_id, [HOP])
    with trio.fail_after(15):
        await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
        reply = await read_delimited_msg(stream, HopMessage)
    return reply.status == OK


async def main(relay_ip: str, honest_ip: str, attacker_ips: list[str]) -> None:
    relay_host = new_host(key_pair=create_new_key_pair(b"relay".ljust(32, b"\0")))
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(
            relay_host.run([multiaddr.Multiaddr(f"/ip6/{relay_ip}/tcp/0")]))
        relay = LimitedRelay(relay_host, limits=LIMITS, allow_hop=True)
        await stack.enter_async_context(background_trio_service(relay))
        await relay.event_started.wait()
        relay_id = relay_host.get_id()
        relay_addr = relay_host.get_addrs()[0].decapsulate(multiaddr.Multiaddr(f"/p2p/{relay_id}"))
        granted = 0
        for i, ip in enumerate(attacker_ips):
            granted += await reserve_from(stack, ip, b"sybil%d" % i, relay_addr, relay_id)
        honest = await reserve_from(stack, honest_ip, b"honest", relay_addr, relay_id)
        print(json.dumps({"granted": granted, "honest": honest, "refused": dict(relay.refused)}),
              flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3:])
