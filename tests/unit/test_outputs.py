"""Canonical tensor encoding, digests and output comparison (p2pfleet/exec/outputs.py)."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfleet.exec.outputs import (
    FP16_CHEAT,
    HONEST_NOISE,
    MAGIC,
    SCALE_FLOOR,
    TOLERANCE,
    Agreement,
    EncodingError,
    LayoutDigester,
    batch_digests,
    compare_outputs,
    concat_batches,
    decode_tensors,
    encode_tensors,
    normalised_max_error,
    output_digest,
    sample_errors,
    tensors_digest,
)

DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int16", "uint16", "int32",
          "uint32", "int64", "uint64", "bool"]

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: 1 <= len(s.encode()) <= 1024)
arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
tensor_sets = st.dictionaries(names, arrays, max_size=5)


# --- the byte layout, by hand -------------------------------------------------------------
def test_layout_matches_the_spec_byte_for_byte():
    t = {"b": np.array([[1, 2, 3]], dtype=np.int32), "a": np.array(1.5, dtype=np.float32)}
    expected = (MAGIC + struct.pack("<I", 2)
                + struct.pack("<H", 1) + b"a" + bytes([1, 0]) + struct.pack("<Q", 4)
                + struct.pack("<f", 1.5)
                + struct.pack("<H", 1) + b"b" + bytes([6, 2]) + struct.pack("<QQ", 1, 3)
                + struct.pack("<Q", 12) + struct.pack("<iii", 1, 2, 3))
    assert encode_tensors(t) == expected
    assert tensors_digest(t) == hashlib.sha256(expected).digest() == output_digest(t)


def test_known_vector_is_stable():
    # A fixed vector another implementation can check against.
    t = {"probs": np.array([[0.25, 0.75]], dtype=np.float32), "label": np.array([1], dtype=np.int64),
         "ok": np.array([True, False])}
    assert tensors_digest(t).hex() == hashlib.sha256(encode_tensors(t)).hexdigest()
    assert encode_tensors(t).hex() == (
        "50325046 54454e31 03000000"
        " 0500 6c6162656c 07 01 0100000000000000 0800000000000000 0100000000000000"
        " 0200 6f6b 09 01 0200000000000000 0200000000000000 0100"
        " 0500 70726f6273 01 02 0100000000000000 0200000000000000 0800000000000000"
        " 0000803e 0000403f").replace(" ", "")


def test_byte_order_layout_and_bool_normalisation_do_not_change_the_encoding():
    a = np.arange(12, dtype="<i4").reshape(3, 4)
    assert encode_tensors({"x": a}) == encode_tensors({"x": a.astype(">i4")})
    assert encode_tensors({"x": a}) == encode_tensors({"x": np.asfortranarray(a)})
    assert encode_tensors({"x": a[:, ::2]}) == encode_tensors({"x": np.ascontiguousarray(a[:, ::2])})
    odd = np.frombuffer(bytes([0, 1, 7]), dtype=np.uint8).view(np.bool_)
    assert decode_tensors(encode_tensors({"b": odd}))["b"].tolist() == [False, True, True]


def test_floats_are_bit_patterns():
    assert encode_tensors({"x": np.array([0.0], np.float32)}) != encode_tensors({"x": np.array([-0.0], np.float32)})


@pytest.mark.parametrize("bad", [
    {"x": np.array(["a"])}, {"x": np.array([1 + 2j])}, {"x": [1, 2]}, {"": np.zeros(1)},
    {1: np.zeros(1)}, {"x": np.zeros((1,) * 33)}, {"x": np.array([None])},
])
def test_unencodable_tensors_are_refused(bad):
    with pytest.raises(EncodingError):
        encode_tensors(bad)


def test_decoder_refuses_what_the_encoder_would_not_produce():
    good = encode_tensors({"a": np.zeros(2, np.float32), "b": np.ones(1, np.int8)})
    decode_tensors(good)
    for bad in [
        good + b"\0",                                  # trailing byte
        good[:-1],                                     # truncated
        b"P2PFTEN2" + good[8:],                        # magic
        good[:12] + struct.pack("<H", 1) + b"b" + good[15:],  # names out of order
    ]:
        with pytest.raises(EncodingError):
            decode_tensors(bad)
    bad_dtype = bytearray(encode_tensors({"a": np.zeros(1, np.float32)}))
    bad_dtype[15] = 8  # string
    with pytest.raises(EncodingError, match="dtype code 8"):
        decode_tensors(bytes(bad_dtype))
    bad_bool = bytearray(encode_tensors({"a": np.array([True])}))
    bad_bool[-1] = 2
    with pytest.raises(EncodingError, match="0 or 1"):
        decode_tensors(bytes(bad_bool))
    bad_len = bytearray(encode_tensors({"a": np.zeros(2, np.float32)}))
    bad_len[25:33] = struct.pack("<Q", 4)
    with pytest.raises(EncodingError):
        decode_tensors(bytes(bad_len))
    huge = MAGIC + struct.pack("<I", 1) + struct.pack("<H", 1) + b"a" + bytes([1, 2]) + struct.pack("<QQQ", 2**40, 2**40, 2**82 % 2**64)
    with pytest.raises(EncodingError):
        decode_tensors(huge)
    with pytest.raises(EncodingError, match="elements"):
        decode_tensors(encode_tensors({"a": np.zeros(100, np.uint8)}), max_elements=99)


# --- property tests -----------------------------------------------------------------------
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(tensor_sets)
def test_round_trip(tensors):
    data = encode_tensors(tensors)
    back = decode_tensors(data)
    assert list(back) == sorted(tensors, key=lambda n: n.encode())
    for name, arr in tensors.items():
        assert back[name].dtype == arr.dtype.newbyteorder("=") or back[name].dtype == arr.dtype
        assert back[name].shape == arr.shape
        assert back[name].tobytes() == np.ascontiguousarray(arr).tobytes()
    assert encode_tensors(back) == data
    assert tensors_digest(back) == tensors_digest(tensors) == hashlib.sha256(data).digest()


@settings(max_examples=200)
@given(tensor_sets)
def test_insertion_order_does_not_matter(tensors):
    reversed_ = dict(reversed(list(tensors.items())))
    assert encode_tensors(reversed_) == encode_tensors(tensors)


@settings(max_examples=200)
@given(tensor_sets, st.binary(max_size=64))
def test_decoder_never_crashes_on_mutations(tensors, noise):
    data = bytearray(encode_tensors(tensors))
    for i, b in enumerate(noise):
        if data:
            data[(i * 7919 + b) % len(data)] ^= b or 1
    try:
        back = decode_tensors(bytes(data))
    except EncodingError:
        return
    assert encode_tensors(back) == bytes(data)  # anything accepted is canonical


@settings(max_examples=200)
@given(tensor_sets)
def test_compare_with_itself_is_exact(tensors):
    assert compare_outputs(tensors, dict(tensors)) == Agreement(True, 0.0, True)


# --- micro-batches ------------------------------------------------------------------------
def test_concat_and_batch_digests():
    b1 = {"y": np.ones((2, 3), np.float32), "k": np.array([1, 2])}
    b2 = {"y": np.zeros((1, 3), np.float32), "k": np.array([3])}
    whole = concat_batches([b1, b2])
    assert whole["y"].shape == (3, 3) and whole["k"].tolist() == [1, 2, 3]
    assert batch_digests([b1, b2]) == [tensors_digest(b1), tensors_digest(b2)]
    with pytest.raises(EncodingError, match="scalar"):
        concat_batches([{"s": np.array(1.0)}, {"s": np.array(2.0)}])
    with pytest.raises(EncodingError, match="does not continue"):
        concat_batches([b1, {"y": np.zeros((1, 4), np.float32), "k": np.array([3])}])
    with pytest.raises(EncodingError, match="outputs"):
        concat_batches([b1, {"y": np.zeros((1, 3), np.float32)}])


# --- comparison ---------------------------------------------------------------------------
def _outputs(seed=0):
    rng = np.random.default_rng(seed)
    return {"logits": rng.standard_normal((64, 10)).astype(np.float32),
            "label": rng.integers(0, 10, 64)}


def test_layout_digester_is_tensors_digest():
    """The shared-memory path's per-batch digest is the protocol's batch digest, for any
    row count, and anything off the layout (or a bool) falls back to tensors_digest."""
    rng = np.random.default_rng(3)
    layout = [("probabilities", np.float32, (10,)), ("label", np.int64, ()), ("z", np.float16, (2, 3))]
    digester = LayoutDigester(layout)
    for rows in (0, 1, 7, 64, 7):
        outs = {n: (rng.standard_normal((rows, *t)) * 100).astype(dt) for n, dt, t in layout}
        assert digester.digest(outs, rows) == tensors_digest(outs)
    outs["label"] = outs["label"].astype(np.int32)  # off the layout
    assert digester.digest(outs, 7) == tensors_digest(outs)
    flags = {"ok": np.array([[3], [0]], np.uint8).view(bool)}
    assert LayoutDigester([("ok", np.bool_, (1,))]).digest(flags, 2) == tensors_digest(flags)


def test_honest_noise_agrees_and_fp16_cheat_does_not():
    ref = _outputs()
    scale = float(np.abs(ref["logits"]).max())
    rows = np.abs(ref["logits"]).max(axis=1, keepdims=True)  # each sample's own magnitude
    honest = dict(ref, logits=ref["logits"] + (HONEST_NOISE * rows).astype(np.float32) * np.sign(ref["logits"]))
    a = compare_outputs(ref, honest)
    assert not a.exact and a.within_tolerance and a.max_norm_error <= 1.05 * HONEST_NOISE
    cheat = dict(ref, logits=ref["logits"].astype(np.float16).astype(np.float32))
    c = compare_outputs(ref, cheat)
    assert not c.exact and not c.within_tolerance and c.max_norm_error > TOLERANCE
    worse = dict(ref, logits=ref["logits"] + np.float32(FP16_CHEAT * scale))
    assert not compare_outputs(ref, worse).within_tolerance
    assert HONEST_NOISE < TOLERANCE < FP16_CHEAT


def test_compare_is_symmetric():
    a, b = _outputs(0), _outputs(0)
    b["logits"] = b["logits"] * np.float32(1 + 1e-6)
    assert compare_outputs(a, b) == compare_outputs(b, a)


def test_integers_must_match_exactly():
    a, b = _outputs(), _outputs()
    b["label"] = b["label"].copy()
    b["label"][0] += 1
    assert compare_outputs(a, b) == Agreement(False, math.inf, False)


@pytest.mark.parametrize("change", ["name", "dtype", "shape", "missing"])
def test_structure_must_match(change):
    a = _outputs()
    b = dict(a)
    if change == "name":
        b["other"] = b.pop("label")
    elif change == "dtype":
        b["logits"] = b["logits"].astype(np.float64)
    elif change == "shape":
        b["logits"] = b["logits"].reshape(32, 20)
    else:
        del b["label"]
    assert compare_outputs(a, b) == Agreement(False, math.inf, False)


def test_non_finite_values_must_line_up():
    a = np.array([1.0, np.nan, np.inf, -2.0], np.float32)
    close = np.array([1.0 + 1e-7, np.nan, np.inf, -2.0], np.float32)
    assert normalised_max_error(a, close) < TOLERANCE
    assert compare_outputs({"x": a}, {"x": close}).within_tolerance
    for bad in ([1.0, 0.0, np.inf, -2.0], [1.0, np.nan, -np.inf, -2.0], [1.0, np.inf, np.nan, -2.0]):
        assert normalised_max_error(a, np.array(bad, np.float32)) == math.inf


def test_zero_and_empty_tensors():
    z = np.zeros((2, 0), np.float32)
    assert compare_outputs({"x": z}, {"x": z.copy()}).exact
    assert sample_errors(z, z).tolist() == [0.0, 0.0]
    assert normalised_max_error(np.zeros(3), np.zeros(3)) == 0.0
    assert normalised_max_error(np.zeros((0, 4)), np.ones((0, 4))) == 0.0


def test_near_zero_samples_are_judged_against_the_floor():
    """A sample whose values are all below SCALE_FLOOR is compared with the absolute
    tolerance TOLERANCE x SCALE_FLOOR: rounding noise on a zero output is no disagreement."""
    zero, tiny = np.zeros(3, np.float32), np.array([0, 0, 1e-30], np.float32)
    got = compare_outputs({"x": zero}, {"x": tiny})
    assert got.within_tolerance and got.max_norm_error == pytest.approx(1e-30 / SCALE_FLOOR)
    assert normalised_max_error(zero, tiny, floor=0.0) == 1.0  # without the floor
    a = np.full((1, 4), 1e-5)
    assert compare_outputs({"x": a}, {"x": a + 0.9 * TOLERANCE * SCALE_FLOOR}).within_tolerance
    assert not compare_outputs({"x": a}, {"x": a + 1.1 * TOLERANCE * SCALE_FLOOR}).within_tolerance


def test_each_sample_is_judged_by_its_own_magnitude():
    """Issue 12: one sample of a shard with outputs 1e6 times the others' once set the scale
    of the whole shard, and every other sample could be off by 50% unnoticed."""
    rng = np.random.default_rng(4)
    honest = rng.standard_normal((30, 8)).astype(np.float32) * 10
    honest[7] *= np.float32(1e6)
    cheat = honest.copy()
    small = np.abs(honest).max(axis=1) < 0.01 * np.abs(honest).max()
    cheat[small] *= np.float32(1.5)
    # the old rule's error: max |a - b| / max over the whole shard, well within 3e-5
    assert np.abs(cheat - honest).max() / np.abs(honest).max() < 3e-6
    got = compare_outputs({"y": honest}, {"y": cheat})
    assert not got.within_tolerance and got.max_norm_error == pytest.approx(0.5 / 1.5)
    errs = sample_errors(honest, cheat)
    assert errs[7] == 0.0 and errs[small] == pytest.approx(1 / 3)
    # one wrong sample is enough, wherever it is and whatever else the shard holds
    one = honest.copy()
    one[20] *= np.float32(1 + 2 * TOLERANCE)
    assert not compare_outputs({"y": honest}, {"y": one}).within_tolerance
    assert np.flatnonzero(sample_errors(honest, one) > TOLERANCE).tolist() == [20]


def test_scalars_are_one_sample_and_vectors_one_sample_per_element():
    assert sample_errors(np.array(2.0), np.array(2.0 * (1 + 1e-3))).shape == (1,)
    a = np.array([1e6, 1.0, -2.0])
    b = np.array([1e6, 1.5, -2.0])
    assert sample_errors(a, b).tolist() == [0.0, pytest.approx(1 / 3), 0.0]


def test_non_finite_values_are_checked_per_sample():
    a = np.array([[1.0, np.nan], [2.0, 3.0]], np.float32)
    b = np.array([[1.0, np.nan], [2.0, np.inf]], np.float32)
    assert sample_errors(a, b).tolist() == [0.0, math.inf]
    assert compare_outputs({"x": a}, {"x": b}) == Agreement(False, math.inf, False)


def test_float16_outputs_get_a_float16_sized_tolerance():
    a = np.linspace(-1, 1, 101).astype(np.float16)
    b = a.copy()
    b[3] = np.nextafter(b[3], np.float16(2))  # one ulp
    assert compare_outputs({"x": a}, {"x": b}).within_tolerance
