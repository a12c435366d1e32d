"""DHT record validation for the p2pfleet namespace.

Keys look like /p2pfleet/<network>/node/1/<peer-id> (see p2pfleet.names). py-libp2p's
NamespacedValidator dispatches on the first path element ("p2pfleet"); this validator then
accepts only keys of our network and known record types, and only values that are signed
envelopes of the right kind, signed by the very peer the key names, unexpired, within
size. So each identity can store exactly one record per type: that is the per-peer quota
on the DHT value store. `select` prefers the highest sequence number.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from libp2p.records.validator import Validator

from ..core.records import Order, compare

from ..identity import peer_id_from_key
from ..names import Names
from ..wire import errors as E
from ..wire.envelope import Opened, open_envelope

log = logging.getLogger(__name__)

# DHT key type -> the one envelope kind allowed under it.
RECORD_KINDS = {"node": "capacity", "rotation": "key_rotation"}


class RecordRejected(ValueError):
    """A DHT key or value we will not store or believe; the message says why."""


def _now_ms(clock: Callable[[], float]) -> int:
    return int(clock() * 1000)


class FleetRecordValidator(Validator):
    def __init__(self, names: Names, clock: Callable[[], float] = time.time):
        self.names = names
        self.clock = clock

    def parse_key(self, key: str) -> tuple[str, str]:
        """Return (record type, peer id) or raise RecordRejected."""
        parts = key.split("/")
        # ['', 'p2pfleet', network, type, '1', peer_id]
        if len(parts) != 6 or parts[0] != "" or parts[1] != "p2pfleet":
            raise RecordRejected(f"key {key[:80]!r} is not a p2pfleet record key")
        if parts[2] != self.names.network:
            raise RecordRejected(f"key {key[:80]!r} is for another network")
        if parts[3] not in RECORD_KINDS or parts[4] != "1":
            raise RecordRejected(f"key {key[:80]!r} names no record type we store")
        return parts[3], parts[5]

    def open(self, key: str, value: bytes) -> Opened:
        rtype, peer_id = self.parse_key(key)
        try:
            opened = open_envelope(value, self.names.network, now_ms=_now_ms(self.clock),
                                   kinds={RECORD_KINDS[rtype]})
        except E.WireError as exc:
            raise RecordRejected(f"{key[:80]}: {exc}") from None
        if peer_id_from_key(opened.signer) != peer_id:
            raise RecordRejected(f"{key[:80]}: signed by {peer_id_from_key(opened.signer)}, "
                                 "not the peer the key names")
        return opened

    def validate(self, key: str, value: bytes) -> None:
        self.open(key, value)

    def newest(self, key: str, values: list[bytes]) -> tuple[int, Opened] | None:
        """The index and opened form of the newest valid value (core.records ordering:
        a higher sequence wins; at equal sequence the first seen is kept), or None."""
        best: tuple[int, Opened] | None = None
        for i, value in enumerate(values):
            try:
                opened = self.open(key, value)
            except RecordRejected as exc:
                log.info("discarding a record under %s: %s", key[:80], exc)
                continue
            held = best[1] if best else None
            order = compare(_seq(held) if held else None, held.body_bytes if held else None,
                            _seq(opened), opened.body_bytes)
            if order is Order.NEWER:
                best = (i, opened)
        return best

    def select(self, key: str, values: list[bytes]) -> int:
        best = self.newest(key, values)
        return best[0] if best else 0


def _seq(opened: Opened) -> int:
    return getattr(opened.body, "seq", 0)  # key rotations carry no sequence
