"""Pure protocol state machines: no I/O, no clock reads, no randomness of their own.

Time and randomness are passed in by the caller (the libp2p runtime or the simulator).
Nothing in this package may import from the rest of p2pfleet except `p2pfleet.wire` types.
"""
