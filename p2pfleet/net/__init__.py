"""The libp2p runtime: host, DHT records, gossip, stream protocols, py-libp2p fixes."""
