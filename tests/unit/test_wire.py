"""Envelope sealing and opening: the check order, the errors and the fields they name."""

from __future__ import annotations

import msgpack
import pytest

from p2pfleet.identity import Identity
from p2pfleet.store.state import NodeState
from p2pfleet.wire import errors as E
from p2pfleet.wire.envelope import (
    MAX_CLOCK_SKEW_MS,
    MAX_ENVELOPE,
    open_envelope,
    pack_envelope,
    seal,
    signed_bytes,
)
from p2pfleet.wire.kinds import (
    HOUR_MS,
    Capacity,
    LeaseBatch,
    Lease,
    NoWork,
    Receipt,
)
from p2pfleet.wire.rotation import check_rotation, make_rotation

NET = "unit"
NOW = 1_800_000_000_000
ALICE = Identity.from_seed(b"alice")
BOB = Identity.from_seed(b"bob")


def capacity(**over) -> Capacity:
    fields = dict(seq=NOW, exp=NOW + 600_000, sw_version="0.1.0", state="available",
                  hw_class=b"\x01" * 32, cores=4, memory_mb=2048, bench=120.5,
                  providers=("CPUExecutionProvider",), ort_version="1.32.0", slots=2, addrs=())
    fields.update(over)
    return Capacity(**fields)


def lease(**over) -> Lease:
    fields = dict(lease_id=b"L" * 16, job_id=b"J" * 16, shard=3, model_digest=b"m" * 32,
                  model_size=1000, input_digest=b"i" * 32, input_size=5000, input_sources=(),
                  token=b"t" * 32, deadline_ms=60_000, micro_batch=32, opt_level="basic",
                  provider="CPUExecutionProvider", ort_versions=">=1.32", samples=256,
                  first_batch=0, credit=10)
    fields.update(over)
    return Lease(**fields)


def resign(kind: str, body_obj: dict, version: int = 1, network: str = NET, who=ALICE) -> bytes:
    body = msgpack.packb(body_obj, use_bin_type=True)
    sig = who.sign(signed_bytes(network, kind, version, body))
    return pack_envelope(network, kind, version, who.public_key, body, sig)


def test_round_trip_keeps_exact_body_and_signer():
    raw = seal(capacity(), ALICE, NET)
    opened = open_envelope(raw, NET, now_ms=NOW)
    assert opened.body == capacity()
    assert opened.signer == ALICE.public_key
    assert opened.kind == "capacity" and opened.version == 1
    assert opened.raw == raw


def test_nested_struct_round_trip():
    batch = LeaseBatch(req_id=b"r" * 16, exp=NOW + 1000, worker=BOB.public_key,
                       leases=(lease(), lease(shard=4)))
    assert open_envelope(seal(batch, ALICE, NET), NET, now_ms=NOW).body == batch


def test_oversized_envelope_is_refused_before_parsing():
    with pytest.raises(E.Oversized) as err:
        open_envelope(b"\x00" * (MAX_ENVELOPE + 1), NET)
    assert err.value.field == "envelope"


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x97" + b"\xc0" * 7])
def test_garbage_is_a_malformed_envelope(data):
    with pytest.raises(E.MalformedEnvelope):
        open_envelope(data, NET)


def test_other_network_names_both_networks():
    raw = seal(capacity(), ALICE, "other")
    with pytest.raises(E.WrongNetwork, match="'other'.*'unit'"):
        open_envelope(raw, NET)


def test_relabelled_network_fails_the_signature():
    opened = open_envelope(seal(capacity(), ALICE, "other"), "other")
    forged = pack_envelope(NET, "capacity", 1, opened.signer, opened.body_bytes, opened.signature)
    with pytest.raises(E.BadSignature):
        open_envelope(forged, NET)


def test_signature_does_not_transfer_between_kinds():
    # A receipt body signed as a receipt, relabelled: must fail on the signature.
    r = Receipt(lease_id=b"L" * 16, job_id=b"J" * 16, shard=1, worker=BOB.public_key,
                output_digest=b"o" * 32, credit=5, at=NOW)
    opened = open_envelope(seal(r, ALICE, NET), NET)
    forged = pack_envelope(NET, "node_info", 1, opened.signer, opened.body_bytes, opened.signature)
    with pytest.raises(E.BadSignature):
        open_envelope(forged, NET)


def test_unknown_kind_and_newer_version_are_unsupported_not_invalid():
    with pytest.raises(E.UnsupportedKind) as err:
        open_envelope(resign("teleport", {"x": 1}), NET)
    assert not isinstance(err.value, E.Invalid)
    with pytest.raises(E.UnsupportedVersion):
        open_envelope(resign("capacity", {"x": 1}, version=2), NET)


def test_kind_filter_makes_other_kinds_unsupported():
    with pytest.raises(E.UnsupportedKind):
        open_envelope(seal(capacity(), ALICE, NET), NET, kinds={"job"})


def test_body_over_the_kinds_cap_is_oversized():
    with pytest.raises(E.Oversized) as err:
        open_envelope(resign("capacity", {"pad": b"x" * 5000}), NET)
    assert err.value.field == "body"


def test_seal_refuses_unregistered_types_and_oversized_bodies():
    with pytest.raises(TypeError):
        seal({"seq": 1}, ALICE, NET)
    with pytest.raises(ValueError, match="cap"):
        seal(capacity(addrs=tuple("/ip4/1.2.3.4/tcp/" + "9" * 240 for _ in range(8))), ALICE, NET)


@pytest.mark.parametrize(
    "mutate, field, reason",
    [
        (lambda b: b.pop("cores"), "body.cores", "missing field"),
        (lambda b: b.update(vin="WVW123"), "body.vin", "unknown field"),
        (lambda b: b.update(cores="4"), "body.cores", "expected an integer"),
        (lambda b: b.update(cores=True), "body.cores", "expected an integer"),
        (lambda b: b.update(cores=70_000), "body.cores", "outside"),
        (lambda b: b.update(state="asleep"), "body.state", "not one of"),
        (lambda b: b.update(bench=float("nan")), "body.bench", "not finite"),
        (lambda b: b.update(hw_class=b"x" * 33), "body.hw_class", "length 33"),
        (lambda b: b.update(providers=["CPU EP"]), "body.providers[0]", "does not match"),
        (lambda b: b.update(sw_version=b"0.1"), "body.sw_version", "expected a string"),
    ],
)
def test_schema_errors_name_the_field_and_reason(mutate, field, reason):
    body = msgpack.unpackb(msgpack.packb(
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in capacity().__dict__.items()},
        use_bin_type=True))
    mutate(body)
    with pytest.raises(E.InvalidBody) as err:
        open_envelope(resign("capacity", body), NET)
    assert err.value.field == field
    assert reason in err.value.reason


def test_nested_error_path_points_into_the_list():
    batch = LeaseBatch(req_id=b"r" * 16, exp=NOW + 1000, worker=BOB.public_key, leases=(lease(),))
    opened = open_envelope(seal(batch, ALICE, NET), NET)
    body = msgpack.unpackb(opened.body_bytes)
    body["leases"][0]["opt_level"] = "turbo"
    with pytest.raises(E.InvalidBody) as err:
        open_envelope(resign("lease_batch", body), NET)
    assert err.value.field == "body.leases[0].opt_level"


def test_floats_may_arrive_as_integers():
    body = {k: (list(v) if isinstance(v, tuple) else v) for k, v in capacity().__dict__.items()}
    body["bench"] = 120
    assert open_envelope(resign("capacity", body), NET).body.bench == 120.0


def test_body_that_is_not_a_map_or_not_msgpack():
    raw = pack_envelope(NET, "capacity", 1, ALICE.public_key, b"\xc1",
                        ALICE.sign(signed_bytes(NET, "capacity", 1, b"\xc1")))
    with pytest.raises(E.InvalidBody, match="not a msgpack value"):
        open_envelope(raw, NET)
    with pytest.raises(E.InvalidBody, match="expected a map"):
        open_envelope(resign("capacity", [1, 2]), NET)


def test_expiry_allows_the_clock_skew_and_no_more():
    raw = seal(capacity(exp=NOW), ALICE, NET)
    open_envelope(raw, NET, now_ms=NOW + MAX_CLOCK_SKEW_MS)
    with pytest.raises(E.Expired) as err:
        open_envelope(raw, NET, now_ms=NOW + MAX_CLOCK_SKEW_MS + 1)
    assert err.value.field == "body.exp"


def test_lifetime_beyond_the_kinds_limit_is_refused():
    raw = seal(capacity(exp=NOW + HOUR_MS + MAX_CLOCK_SKEW_MS + 1), ALICE, NET)
    with pytest.raises(E.Expired, match="longer than the capacity limit"):
        open_envelope(raw, NET, now_ms=NOW)


def test_kinds_kept_as_proof_never_expire():
    r = Receipt(lease_id=b"L" * 16, job_id=b"J" * 16, shard=1, worker=BOB.public_key,
                output_digest=b"o" * 32, credit=5, at=NOW)
    open_envelope(seal(r, ALICE, NET), NET, now_ms=NOW + 10 * 365 * 24 * HOUR_MS)


def test_replay_is_refused_and_remembered_across_restart(tmp_path):
    raw = seal(NoWork(req_id=b"r" * 16, exp=NOW + 60_000, reason="quota", retry_after_ms=1000),
               ALICE, NET)
    with NodeState(tmp_path / "state.sqlite") as state:
        open_envelope(raw, NET, now_ms=NOW, dedup=state)
        with pytest.raises(E.Replay):
            open_envelope(raw, NET, now_ms=NOW + 1, dedup=state)
    with NodeState(tmp_path / "state.sqlite") as state:
        with pytest.raises(E.Replay):
            open_envelope(raw, NET, now_ms=NOW + 2, dedup=state)


def test_records_are_ordered_by_sequence_not_deduplicated(tmp_path):
    raw = seal(capacity(), ALICE, NET)
    with NodeState(tmp_path / "state.sqlite") as state:
        open_envelope(raw, NET, now_ms=NOW, dedup=state)
        open_envelope(raw, NET, now_ms=NOW + 1, dedup=state)  # the DHT hands it out again


def test_rejected_message_is_not_remembered(tmp_path):
    raw = seal(NoWork(req_id=b"r" * 16, exp=NOW, reason="quota", retry_after_ms=1000), ALICE, NET)
    with NodeState(tmp_path / "state.sqlite") as state:
        with pytest.raises(E.Expired):
            open_envelope(raw, NET, now_ms=NOW + HOUR_MS, dedup=state)
        open_envelope(raw, NET, now_ms=NOW, dedup=state)  # not marked as seen by the refusal
        with pytest.raises(E.Replay):
            open_envelope(raw, NET, now_ms=NOW, dedup=state)


def test_key_rotation_needs_the_new_keys_countersignature():
    raw = make_rotation(ALICE, BOB, NET, NOW, "compromised")
    body = check_rotation(open_envelope(raw, NET, now_ms=NOW))
    assert body.new_key == BOB.public_key and body.reason == "compromised"
    carol = Identity.from_seed(b"carol")
    forged_body = {"new_key": carol.public_key, "at": NOW, "reason": "scheduled",
                   "new_key_sig": body.new_key_sig}
    with pytest.raises(E.BadSignature) as err:
        check_rotation(open_envelope(resign("key_rotation", forged_body), NET))
    assert err.value.field == "body.new_key_sig"
    with pytest.raises(ValueError):
        make_rotation(ALICE, ALICE, NET, NOW)


def test_dedup_requires_a_clock():
    with pytest.raises(TypeError):
        open_envelope(seal(capacity(), ALICE, NET), NET, dedup=object())
