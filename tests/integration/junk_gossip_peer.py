"""Plain py-libp2p hosts, run as their own process (so their bytes are not counted by the node
under test): each of N fresh identities in turn (default 1) dials ADDR and sends well-framed
junk GossipSub RPCs until the node cuts it off or LIMIT bytes are sent in all. Prints the
bytes sent. Usage: junk_gossip_peer.py ADDR LIMIT [N]"""

import os
import sys

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.pb import rpc_pb2
from libp2p.utils.varint import encode_uvarint


async def main(addr: str, limit: int, identities: int) -> None:
    rpc = rpc_pb2.RPC(publish=[rpc_pb2.Message(topicIDs=["not-a-fleet-topic"],
                                               data=os.urandom(60_000))])
    body = rpc.SerializeToString()
    frame = encode_uvarint(len(body)) + body
    sent = 0
    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    for i in range(identities):
        seed = f"junk gossip peer {i}".encode() if i else b"junk gossip peer"
        host = new_host(key_pair=create_new_key_pair(seed.ljust(32, b"\0")[:32]))
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                await host.connect(info)
                while sent < limit:
                    stream = await host.new_stream(info.peer_id, [TProtocol("/meshsub/1.1.0")])
                    while sent < limit:
                        with trio.fail_after(10):
                            await stream.write(frame)
                        sent += len(frame)
            except Exception:  # noqa: BLE001 - cut off: what we want to see
                pass
    print(sent, flush=True)


trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
