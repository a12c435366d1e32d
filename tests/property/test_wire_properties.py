"""Property tests of the wire layer: envelopes, signatures, dedup, record ordering.

Bodies are drawn by strategies derived generically from the wire types of each kind
(`p2pfleet.wire.samples.body_strategy`), bounded so they always fit the kind's `max_body`.

More examples: P2PFLEET_PROPERTY_EXAMPLES=500 pytest tests/property (the default keeps the
file well under 30 s).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from p2pfleet.core.records import Order, compare, next_sequence
from p2pfleet.names import NETWORK_PATTERN
from p2pfleet.store.state import NodeState
from p2pfleet.wire import errors as E
from p2pfleet.wire import samples as S
from p2pfleet.wire.envelope import (
    MAX_CLOCK_SKEW_MS,
    encode_body,
    open_envelope,
    pack_envelope,
    seal,
    signed_bytes,
)
from p2pfleet.wire.kinds import KINDS, MAJOR
from p2pfleet.wire.rotation import acceptance_bytes, check_rotation, make_rotation

EXAMPLES = int(os.environ.get("P2PFLEET_PROPERTY_EXAMPLES", "25"))
NET = S.SAMPLE_NETWORK
SIGNER = S.sample_identity("property")
ALL_KINDS = sorted(KINDS)
RECORD_KINDS = sorted(k for k, s in KINDS.items() if s.record)
EXPIRING = sorted(k for k, s in KINDS.items() if s.max_lifetime_ms is not None)
# What open_envelope deduplicates by message id: kinds that expire and are not records.
DEDUPED = sorted(k for k in EXPIRING if not KINDS[k].record)

common = settings(max_examples=EXAMPLES, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
networks = st.from_regex(NETWORK_PATTERN, fullmatch=True)


def valid_now(spec, body) -> int:
    """A receive time at which `body` is within its lifetime (and not dated in the future)."""
    for name in ("exp", "at"):  # no kind has both
        value = getattr(body, name, None)
        if value is not None:
            return value
    return S.SAMPLE_NOW_MS


@st.composite
def kind_and_body(draw, kinds=ALL_KINDS):
    name = draw(st.sampled_from(kinds))
    return KINDS[name], draw(S.body_strategy(name))


def unpack(env: bytes) -> list:
    return msgpack.unpackb(env, raw=False)


# ---------------------------------------------------------------------------------------
# samples

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_samples_are_valid_and_fit(kind):
    spec = KINDS[kind]
    for body in (S.sample_body(kind), S.large_body(kind)):
        assert len(encode_body(body)) <= spec.max_body
        opened = open_envelope(seal(body, SIGNER, NET), NET, now_ms=valid_now(spec, body))
        assert opened.body == body
    # the sample is deterministic
    assert S.sample_envelope(kind) == S.sample_envelope(kind)


def test_sample_rotation_and_evidence_are_semantically_valid():
    opened = open_envelope(S.sample_envelope("key_rotation"), NET)
    assert check_rotation(opened).new_key == S.sample_identity("successor").public_key
    evidence = open_envelope(S.sample_envelope("evidence"), NET).body
    proof = open_envelope(evidence.proofs[0], NET)
    assert proof.signer == evidence.accused and proof.kind == "result"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_bounded_strategy_always_fits(kind):
    assert S.struct_max_size(KINDS[kind].cls, S.fitting_scale(kind)) <= KINDS[kind].max_body


# ---------------------------------------------------------------------------------------
# round trip

@pytest.mark.parametrize("kind", ALL_KINDS)
@common
@given(data=st.data())
def test_round_trip(kind, data):
    spec = KINDS[kind]
    body = data.draw(S.body_strategy(kind), label="body")
    env = seal(body, SIGNER, NET)
    opened = open_envelope(env, NET, now_ms=valid_now(spec, body))
    assert opened.body == body
    assert type(opened.body) is spec.cls
    assert (opened.kind, opened.version, opened.network) == (kind, MAJOR, NET)
    assert opened.signer == SIGNER.public_key
    assert opened.body_bytes == encode_body(body)
    assert opened.raw == env
    # encoding is deterministic: sealing again gives the very same bytes (Ed25519 too)
    assert seal(opened.body, SIGNER, NET) == env


# ---------------------------------------------------------------------------------------
# a signature never verifies as another kind, version or network

@common
@given(kb=kind_and_body(), other=st.sampled_from(ALL_KINDS))
def test_relabelled_kind_never_verifies(kb, other):
    spec, body = kb
    assume(other != spec.name)
    _, net, _, version, signer, body_bytes, sig = unpack(seal(body, SIGNER, NET))
    forged = pack_envelope(net, other, version, signer, body_bytes, sig)
    # The size cap of the claimed kind is checked before the signature; otherwise the
    # signature (over the claimed kind's domain tag) must fail. It never reaches the schema.
    expected = E.Oversized if len(body_bytes) > KINDS[other].max_body else E.BadSignature
    with pytest.raises(expected):
        open_envelope(forged, NET, now_ms=valid_now(spec, body))


@common
@given(kb=kind_and_body(), bogus=st.text(max_size=32).filter(lambda k: k not in KINDS),
       version=st.integers(min_value=1, max_value=2**64 - 1))
def test_unknown_kind_or_version_is_unsupported(kb, bogus, version):
    spec, body = kb
    _, net, kind, _, signer, body_bytes, sig = unpack(seal(body, SIGNER, NET))
    assume(len(bogus.encode()) <= 32)
    with pytest.raises(E.UnsupportedKind):
        open_envelope(pack_envelope(net, bogus, MAJOR, signer, body_bytes, sig), NET)
    if version != MAJOR:
        with pytest.raises(E.UnsupportedVersion):
            open_envelope(pack_envelope(net, kind, version, signer, body_bytes, sig), NET)
    # a domain tag of another major version never verifies this signature either
    assert not _verifies(signer, signed_bytes(net, kind, MAJOR + 1, body_bytes), sig)


@common
@given(kb=kind_and_body(), other_net=networks, other_kind=st.sampled_from(ALL_KINDS))
def test_relabelled_network_never_verifies(kb, other_net, other_kind):
    spec, body = kb
    assume(other_net != NET)
    _, net, kind, version, signer, body_bytes, sig = unpack(seal(body, SIGNER, NET))
    moved = pack_envelope(other_net, kind, version, signer, body_bytes, sig)
    # A node of the other network: the label matches, the signature does not.
    with pytest.raises(E.BadSignature):
        open_envelope(moved, other_net, now_ms=valid_now(spec, body))
    # A node of the original network refuses the label before looking at the signature.
    with pytest.raises(E.WrongNetwork):
        open_envelope(moved, NET)
    # Moving both the network and the kind does not help.
    both = pack_envelope(other_net, other_kind, version, signer, body_bytes, sig)
    expected = E.Oversized if len(body_bytes) > KINDS[other_kind].max_body else E.BadSignature
    with pytest.raises(expected):
        open_envelope(both, other_net)


@common
@given(kb=kind_and_body(), seed=st.binary(min_size=1, max_size=8))
def test_other_signer_never_verifies(kb, seed):
    spec, body = kb
    _, net, kind, version, _, body_bytes, sig = unpack(seal(body, SIGNER, NET))
    other = S.sample_identity("other:" + seed.hex())
    with pytest.raises(E.BadSignature):
        open_envelope(pack_envelope(net, kind, version, other.public_key, body_bytes, sig), NET)


def _verifies(signer: bytes, message: bytes, sig: bytes) -> bool:
    from p2pfleet.identity import verify_signature

    return verify_signature(signer, message, sig)


# ---------------------------------------------------------------------------------------
# tampering: any single flipped byte is refused with a WireError, never anything else

@settings(max_examples=EXAMPLES * 8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(kb=kind_and_body(), data=st.data())
def test_any_single_byte_flip_is_refused(kb, data):
    spec, body = kb
    env = seal(body, SIGNER, NET)
    index = data.draw(st.integers(min_value=0, max_value=len(env) - 1), label="index")
    mask = data.draw(st.integers(min_value=1, max_value=255), label="mask")
    flipped = bytearray(env)
    flipped[index] ^= mask
    # pytest.raises(WireError) lets any other exception through (and fails the test);
    # a success would mean a different byte string verified: a forgery or malleability.
    with pytest.raises(E.WireError):
        open_envelope(bytes(flipped), NET, now_ms=valid_now(spec, body))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_byte_flip_of_the_sample_is_refused(kind):
    """Exhaustive over positions (3 masks each) for the deterministic sample of each kind."""
    env = S.sample_envelope(kind, SIGNER)
    codes = set()
    for index in range(len(env)):
        for mask in (0x01, 0x80, 0xFF):
            flipped = bytearray(env)
            flipped[index] ^= mask
            with pytest.raises(E.WireError) as info:
                open_envelope(bytes(flipped), NET, now_ms=S.SAMPLE_NOW_MS)
            codes.add(info.value.code)
    assert {"bad-signature", "malformed-envelope"} <= codes


# ---------------------------------------------------------------------------------------
# replay: refused, also after a restart; forget_expired forgets only what cannot be valid

@common
@given(kb=kind_and_body(DEDUPED), later=st.integers(min_value=0, max_value=30 * 24 * 3_600_000))
def test_replay_refused_across_restart_and_forget_expired(kb, later):
    spec, body = kb
    if hasattr(body, "exp"):  # node clocks stay far below 2**63 ms (SQLite INTEGER)
        body = dataclasses.replace(body, exp=min(body.exp, 2**62))
    env = seal(body, SIGNER, NET)
    now = valid_now(spec, body)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state.sqlite"
        with NodeState(path) as state:
            open_envelope(env, NET, now_ms=now, dedup=state)
            with pytest.raises(E.Replay):
                open_envelope(env, NET, now_ms=now, dedup=state)
        with NodeState(path) as state:  # restart
            with pytest.raises(E.Replay):
                open_envelope(env, NET, now_ms=now, dedup=state)
            then = now + later
            state.forget_expired(then)
        with NodeState(path) as state:  # and another restart
            if body.exp + MAX_CLOCK_SKEW_MS >= then:
                expected = E.Replay  # still remembered
            else:
                expected = E.Expired  # forgotten, but can no longer be valid anyway
            with pytest.raises(expected):
                open_envelope(env, NET, now_ms=then, dedup=state)


def _seen_rows(state: NodeState) -> int:
    return state.conn.execute("SELECT count(*) FROM seen").fetchone()[0]


@pytest.mark.parametrize("kind", sorted(set(KINDS) - set(EXPIRING)))
def test_kinds_kept_as_proof_are_not_deduplicated_by_the_wire(kind):
    """Kinds that never expire (receipts, evidence, rotations) are not remembered by the
    dedup store (it would grow without bound); their own stores are idempotent. A repeat
    is accepted as the very same message, and nothing is written to the dedup table."""
    env = S.sample_envelope(kind, SIGNER)
    now = valid_now(KINDS[kind], S.sample_body(kind))
    with tempfile.TemporaryDirectory() as tmp, NodeState(Path(tmp) / "s.sqlite") as state:
        first = open_envelope(env, NET, now_ms=now, dedup=state)
        again = open_envelope(env, NET, now_ms=now, dedup=state)
        assert first == again
        assert _seen_rows(state) == 0


@common
@given(kb=kind_and_body(RECORD_KINDS), times=st.lists(st.integers(0, 2 * MAX_CLOCK_SKEW_MS),
                                                      min_size=2, max_size=4))
def test_records_are_not_deduplicated_by_the_wire(kb, times):
    """Records are ordered by sequence number (core/records.py), not deduplicated: the same
    record fetched again from the DHT or re-gossiped opens every time, also after a restart,
    and nothing is written to the dedup table. Ordering then calls it the same record."""
    spec, body = kb
    body = dataclasses.replace(body, exp=min(body.exp, 2**62))
    env = seal(body, SIGNER, NET)
    now = valid_now(spec, body)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.sqlite"
        opened = []
        for delta in times:
            with NodeState(path) as state:  # a restart between copies changes nothing
                opened.append(open_envelope(env, NET, now_ms=max(0, now - delta), dedup=state))
                assert _seen_rows(state) == 0
        assert all(o == opened[0] for o in opened)
        first = opened[0]
        assert compare(first.body.seq, first.body_bytes, first.body.seq,
                       first.body_bytes) is Order.SAME


@common
@given(kind=st.sampled_from(DEDUPED), data=st.data())
def test_dedup_outlives_every_acceptable_receive_time(kind, data):
    """Whatever now_ms a message is accepted at, its dedup entry outlives that acceptance
    window: forget_expired(t) for any t at which the message would still be accepted never
    drops it."""
    spec = KINDS[kind]
    body = data.draw(S.body_strategy(kind))
    # Node clocks stay far below 2**63 ms (SQLite INTEGER).
    body = dataclasses.replace(body, exp=min(body.exp, 2**62))
    env = seal(body, SIGNER, NET)
    lo, hi = body.exp - spec.max_lifetime_ms - MAX_CLOCK_SKEW_MS, body.exp + MAX_CLOCK_SKEW_MS
    first = data.draw(st.integers(min_value=max(0, lo), max_value=hi), label="first")
    second = data.draw(st.integers(min_value=first, max_value=hi), label="second")
    with tempfile.TemporaryDirectory() as tmp, NodeState(Path(tmp) / "s.sqlite") as state:
        open_envelope(env, NET, now_ms=first, dedup=state)
        state.forget_expired(second)
        with pytest.raises(E.Replay):
            open_envelope(env, NET, now_ms=second, dedup=state)


# ---------------------------------------------------------------------------------------
# sequence numbers: a restored key still publishes newer records

@common
@given(kind=st.sampled_from(RECORD_KINDS), data=st.data(),
       start=st.integers(min_value=1_600_000_000_000, max_value=2_000_000_000_000),
       gaps=st.lists(st.integers(min_value=0, max_value=600_000), min_size=1, max_size=12),
       restore_after=st.integers(min_value=1, max_value=30 * 24 * 3_600_000))
def test_restored_key_publishes_newer_records(kind, data, start, gaps, restore_after):
    spec = KINDS[kind]
    identity = S.sample_identity("restored")
    stream = f"{kind}/self"
    published = []  # (seq, body bytes)
    with tempfile.TemporaryDirectory() as tmp:
        t = start
        with NodeState(Path(tmp) / "old.sqlite") as old:
            for gap in gaps:
                t += gap
                seq = old.next_sequence(stream, t)
                body = data.draw(S.body_strategy(kind))
                body = type(body)(**{**body.__dict__, "seq": seq})
                opened = open_envelope(seal(body, identity, NET), NET)
                published.append((opened.body.seq, opened.body_bytes))
        seqs = [s for s, _ in published]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        # Sequences run ahead of the clock by at most the records of one millisecond burst:
        assert max(seqs) <= t + len(gaps) - 1
        # The data dir is lost; the key (identity) is restored from backup.
        now = t + len(gaps) - 1 + restore_after
        with NodeState(Path(tmp) / "new.sqlite") as fresh:
            seq = fresh.next_sequence(stream, now)
        body = data.draw(S.body_strategy(kind))
        body = type(body)(**{**body.__dict__, "seq": seq})
        new = open_envelope(seal(body, identity, NET), NET)
        for held_seq, held_bytes in published:
            assert compare(held_seq, held_bytes, new.body.seq, new.body_bytes) is Order.NEWER
            assert compare(new.body.seq, new.body_bytes, held_seq, held_bytes) is Order.STALE


@common
@given(start=st.integers(min_value=0, max_value=2**50),
       times=st.lists(st.integers(min_value=-10**9, max_value=10**9), min_size=1, max_size=20))
def test_persisted_sequences_only_move_forward(start, times):
    """Across restarts and a clock that jumps back and forth, allocated sequences increase."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.sqlite"
        seqs = []
        for i, delta in enumerate(times):
            now = max(0, start + delta)
            with NodeState(path) as state:
                seq = state.next_sequence("capacity/self", now)
            assert seq >= now
            seqs.append(seq)
        assert all(b > a for a, b in zip(seqs, seqs[1:]))


# ---------------------------------------------------------------------------------------
# compare() laws

seqs = st.integers(min_value=0, max_value=5)
bodies = st.sampled_from([b"", b"a", b"b", b"\x00" * 3])


@settings(max_examples=EXAMPLES * 8, deadline=None)
@given(a=st.tuples(seqs, bodies), b=st.tuples(seqs, bodies), c=st.tuples(seqs, bodies))
def test_compare_laws(a, b, c):
    ab, ba = compare(*a, *b), compare(*b, *a)
    flip = {Order.NEWER: Order.STALE, Order.STALE: Order.NEWER,
            Order.SAME: Order.SAME, Order.EQUIVOCATION: Order.EQUIVOCATION}
    assert ba is flip[ab]  # antisymmetry (SAME and EQUIVOCATION are symmetric)
    assert (ab is Order.SAME) == (a == b)  # SAME only for the identical record
    assert (ab is Order.EQUIVOCATION) == (a[0] == b[0] and a[1] != b[1])
    assert (ab is Order.NEWER) == (b[0] > a[0])  # ordered by sequence only, never by bytes
    if compare(*a, *b) is Order.NEWER and compare(*b, *c) is Order.NEWER:
        assert compare(*a, *c) is Order.NEWER  # transitive
    assert compare(None, None, *a) is Order.NEWER  # nothing held: take it


@settings(max_examples=EXAMPLES * 8, deadline=None)
@given(last=st.none() | st.integers(min_value=0, max_value=2**62),
       now=st.integers(min_value=0, max_value=2**62))
def test_next_sequence_law(last, now):
    seq = next_sequence(last, now)
    assert seq >= now
    if last is not None:
        assert seq > last
        assert seq == max(last + 1, now)


# ---------------------------------------------------------------------------------------
# key rotation countersignature

@common
@given(at=st.integers(min_value=0, max_value=2**64 - 1), other_net=networks,
       reason=st.sampled_from(["scheduled", "compromised"]), shift=st.integers(1, 2**20))
def test_rotation_countersignature_is_bound(at, other_net, reason, shift):
    old, new = S.sample_identity("rot-old"), S.sample_identity("rot-new")
    body = check_rotation(open_envelope(make_rotation(old, new, NET, at, reason), NET))
    assert body.new_key == new.public_key and body.at == at
    Rotation = KINDS["key_rotation"].cls
    bad_sigs = [
        new.sign(acceptance_bytes(NET, old.public_key, new.public_key, (at + shift) % 2**64)),
        new.sign(acceptance_bytes(other_net, old.public_key, new.public_key, at)),
        old.sign(acceptance_bytes(NET, old.public_key, new.public_key, at)),
    ]
    if other_net == NET:
        bad_sigs.pop(1)
    for sig in bad_sigs:
        stmt = Rotation(new_key=new.public_key, at=at, reason=reason, new_key_sig=sig)
        with pytest.raises(E.BadSignature):
            check_rotation(open_envelope(seal(stmt, old, NET), NET))
    self_rot = Rotation(new_key=old.public_key, at=at, reason=reason, new_key_sig=bad_sigs[0])
    with pytest.raises(E.InvalidBody):
        check_rotation(open_envelope(seal(self_rot, old, NET), NET))


@pytest.mark.parametrize("kind", EXPIRING)
def test_far_future_exp_with_dedup_raises_only_wire_errors(kind):
    """exp may be any u64; keep-until is clamped to SQLite's signed 64-bit INTEGER.
    Deduplicated kinds refuse the second copy as a replay; records (ordered by sequence
    number, not deduplicated) open it again and leave the dedup table empty."""
    spec = KINDS[kind]
    body = dataclasses.replace(S.sample_body(kind), exp=2**64 - 1)
    env = seal(body, SIGNER, NET)
    with tempfile.TemporaryDirectory() as tmp, NodeState(Path(tmp) / "s.sqlite") as state:
        now = 2**64 - 1 - spec.max_lifetime_ms // 2
        first = open_envelope(env, NET, now_ms=now, dedup=state)
        if kind in DEDUPED:
            assert _seen_rows(state) == 1
            with pytest.raises(E.Replay):
                open_envelope(env, NET, now_ms=now, dedup=state)
        else:
            assert spec.record
            assert open_envelope(env, NET, now_ms=now, dedup=state) == first
            assert _seen_rows(state) == 0
