"""DHT record validation for the p2pfleet namespace.

Keys look like /p2pfleet/<network>/node/1/<peer-id> (see p2pfleet.names). py-libp2p's
NamespacedValidator dispatches on the first path element ("p2pfleet"); this validator then
accepts only keys of our network and known record types, and only values that are signed
envelopes of the right kind, signed by the very peer the key names, unexpired, within
size. So each identity can store exactly one record per type: that is the per-peer quota
on the DHT value store.

Capacity records (`node` keys) are ordered by sequence number against a high-water mark per
key (core.records; held by the node state, so it survives restarts): every record whose
signature verifies raises the mark, expired ones too (a higher seq proves the older records
replaced); a record below the mark is stale (refused, nobody punished: replays are normal),
and a different record at the mark's seq is equivocation (refused; the signer, not whoever
forwarded it, is reported). `guard_served_values` keeps a DHT server from serving a held
value below the mark.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from libp2p.records.validator import Validator

from ..core.records import Order, compare, mark_keep_until

from ..identity import peer_id_from_key
from ..names import Names
from ..store.state import MemoryMarks, RecordMark
from ..wire import errors as E
from ..wire.envelope import MAX_CLOCK_SKEW_MS, Opened, open_envelope
from ..wire.kinds import KINDS

log = logging.getLogger(__name__)

# DHT key type -> the one envelope kind allowed under it.
RECORD_KINDS = {"node": "capacity", "rotation": "key_rotation"}
ORDERED = {"node"}  # key types whose records carry seq and are ordered by it


class RecordRejected(ValueError):
    """A DHT key or value we will not store or believe; the message says why. The peer
    that sent it is at fault unless a subclass says otherwise."""


class RecordStale(RecordRejected):
    """Older than a record already seen for the key (a replay or an outdated holder):
    refused, nobody punished (identity-and-wire.md, `stale-record`)."""


class RecordEquivocation(RecordRejected):
    """A second, different record with the seq of one already seen: its signer is at
    fault (reported through `on_equivocation`), not the peer that forwarded it."""


class RecordMarks(Protocol):
    def record_mark(self, key: str) -> RecordMark | None: ...
    def raise_mark(self, key: str, mark: RecordMark) -> None: ...


# (signer's peer id, key, the envelope held at the mark, the different one just seen)
EquivocationFn = Callable[[str, str, bytes, bytes], None]


def _now_ms(clock: Callable[[], float]) -> int:
    return int(clock() * 1000)


def _digest(opened: Opened) -> bytes:
    return hashlib.sha256(opened.body_bytes).digest()


class FleetRecordValidator(Validator):
    def __init__(self, names: Names, clock: Callable[[], float] = time.time, *,
                 marks: RecordMarks | None = None,
                 on_equivocation: EquivocationFn | None = None):
        self.names = names
        self.clock = clock
        self.marks: RecordMarks = marks if marks is not None else MemoryMarks()
        self.on_equivocation = on_equivocation

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

    def _open(self, key: str, value: bytes) -> tuple[Opened, RecordRejected | None]:
        """Open a value signed by the peer its key names; the second item says why it is
        not current (expired), or is None. Anything else wrong raises RecordRejected."""
        rtype, peer_id = self.parse_key(key)
        kinds = {RECORD_KINDS[rtype]}
        expired: RecordRejected | None = None
        try:
            try:
                opened = open_envelope(value, self.names.network, now_ms=_now_ms(self.clock),
                                       kinds=kinds)
            except E.Expired as exc:
                # authentic but not current: its seq still orders the key's records
                opened = open_envelope(value, self.names.network, kinds=kinds)
                expired = RecordRejected(f"{key[:80]}: {exc}")
        except E.WireError as exc:
            raise RecordRejected(f"{key[:80]}: {exc}") from None
        if peer_id_from_key(opened.signer) != peer_id:
            raise RecordRejected(f"{key[:80]}: signed by {peer_id_from_key(opened.signer)}, "
                                 "not the peer the key names")
        return opened, expired

    def open(self, key: str, value: bytes) -> Opened:
        """Open a current value (checks of `validate` without the ordering)."""
        opened, expired = self._open(key, value)
        if expired is not None:
            raise expired
        return opened

    def _order(self, key: str, opened: Opened) -> Order:
        """Order an authentic record against the key's mark; a newer one raises the mark,
        a different one at the mark's seq is reported as the signer's equivocation."""
        if self.parse_key(key)[0] not in ORDERED:
            return Order.NEWER
        mark = self.marks.record_mark(key)
        seq, digest = opened.body.seq, _digest(opened)
        order = compare(mark.seq if mark else None, mark.body_digest if mark else None,
                        seq, digest)
        if order is Order.NEWER:
            now_ms = _now_ms(self.clock)
            keep = mark_keep_until(seq, opened.body.exp, now_ms,
                                   KINDS[opened.kind].max_lifetime_ms, MAX_CLOCK_SKEW_MS)
            if keep >= now_ms:  # else every record it could stop has expired anyway
                self.marks.raise_mark(key, RecordMark(seq, digest, opened.raw, keep))
        elif order is Order.EQUIVOCATION and mark is not None and self.on_equivocation:
            self.on_equivocation(peer_id_from_key(opened.signer), key, mark.envelope, opened.raw)
        return order

    def check(self, key: str, value: bytes) -> Opened:
        """Validate one incoming value; the RecordRejected subclass raised says whose fault."""
        opened, expired = self._open(key, value)
        order = self._order(key, opened)
        if expired is not None:
            raise expired
        if order is Order.STALE:
            raise RecordStale(f"{key[:80]}: seq {opened.body.seq} is below seq "
                              f"{self.marks.record_mark(key).seq} seen before")
        if order is Order.EQUIVOCATION:
            raise RecordEquivocation(f"{key[:80]}: a different record with seq "
                                     f"{opened.body.seq} was seen before")
        return opened

    def validate(self, key: str, value: bytes) -> None:
        self.check(key, value)

    def authentic(self, key: str, value: bytes) -> bool:
        """Whether `value` is a current record of `key`, signed by the peer the key names
        (newer or older than others: ordering is `newest`'s job). What a get's quorum counts."""
        try:
            self.open(key, value)
        except RecordRejected:
            return False
        return True

    def newest(self, key: str, values: list[bytes]) -> tuple[int | None, Opened] | None:
        """The newest current record for `key`: the index among `values` (None when it is
        the one held at the mark and none of `values`) and its opened form; None when the
        newest record seen is expired, or nothing valid was seen. Every value that opens,
        expired or not, is ordered against the mark first."""
        if self.parse_key(key)[0] not in ORDERED:
            return self._first_valid(key, values)
        current: list[tuple[int, Opened]] = []
        for i, value in enumerate(values):
            try:
                opened, expired = self._open(key, value)
            except RecordRejected as exc:
                log.info("discarding a record under %s: %s", key[:80], exc)
                continue
            self._order(key, opened)
            if expired is None:
                current.append((i, opened))
        mark = self.marks.record_mark(key)
        if mark is None:
            return None
        for i, opened in current:
            if opened.body.seq == mark.seq and _digest(opened) == mark.body_digest:
                return i, opened
        try:
            return None, self.open(key, mark.envelope)
        except RecordRejected:
            return None  # the newest record seen has expired: no current record

    def _first_valid(self, key: str, values: list[bytes]) -> tuple[int, Opened] | None:
        """Unordered types (rotation statements): the first valid value is kept."""
        for i, value in enumerate(values):
            try:
                return i, self.open(key, value)
            except RecordRejected as exc:
                log.info("discarding a record under %s: %s", key[:80], exc)
        return None

    def select(self, key: str, values: list[bytes]) -> int:
        best = self.newest(key, values)
        return best[0] if best is not None and best[0] is not None else 0

    def below_mark(self, key: str, value: bytes) -> bool:
        """Whether a held value is older than (or conflicts with) the key's mark. Reads
        only: serving must not change what we hold."""
        try:
            if self.parse_key(key)[0] not in ORDERED:
                return False
            opened = open_envelope(value, self.names.network, kinds={RECORD_KINDS["node"]})
        except (RecordRejected, E.WireError):
            return False  # not ours to judge here: it was validated when stored
        mark = self.marks.record_mark(key)
        if mark is None:
            return False
        order = compare(mark.seq, mark.body_digest, opened.body.seq, _digest(opened))
        return order in (Order.STALE, Order.EQUIVOCATION)


def guard_served_values(value_store: Any, validator: FleetRecordValidator) -> None:
    """Make py-libp2p's value store hide a held value below its key's mark, from GET_VALUE
    answers and from the PUT handler's comparison alike (its handlers read `get`)."""
    get = value_store.get

    def get_newest(key: bytes) -> Any:
        record = get(key)
        if record is None:
            return None
        try:
            text = key.decode("utf-8")
        except UnicodeDecodeError:
            return record
        if validator.below_mark(text, bytes(record.value)):
            log.debug("not serving a value below the mark under %s", text[:80])
            return None
        return record

    value_store.get = get_newest
