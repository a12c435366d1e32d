"""Properties of output comparison (p2pfleet/exec/outputs.py, specs/verification.md section
2): symmetric; judged per sample, so a sample wrong beyond the tolerance by its own
magnitude is rejected whatever the other samples hold (issue 12: one huge sample once
hid every other sample's error); perturbations the size of honest noise are accepted."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfleet.exec.outputs import (
    HONEST_NOISE,
    SCALE_FLOOR,
    TOLERANCE,
    compare_outputs,
    sample_errors,
)

float_dtypes = st.sampled_from([np.float32, np.float64])
shapes = st.tuples(st.integers(1, 12), st.integers(1, 6)) | st.tuples(
    st.integers(1, 6), st.integers(1, 3), st.integers(1, 4))
#: per-sample magnitudes from far below the floor to far above anything a model gives
exponents = st.integers(-12, 30)


@st.composite
def shards(draw, dtype=None):
    """A float tensor whose samples (rows of axis 0) have wildly different magnitudes."""
    dt = np.dtype(draw(float_dtypes) if dtype is None else dtype)
    shape = draw(shapes)
    unit = draw(hnp.arrays(np.float64, shape, elements=st.floats(-1, 1, allow_nan=False)))
    mags = np.array([10.0 ** draw(exponents) for _ in range(shape[0])])
    a = (unit * mags.reshape((-1,) + (1,) * (len(shape) - 1))).astype(dt)
    return a


def row_scale(a: np.ndarray, i: int) -> float:
    return max(float(np.abs(a[i].astype(np.float64)).max()), SCALE_FLOOR)


def row_error(a: np.ndarray, b: np.ndarray, i: int) -> float:
    """The sample's error by the spec's formula, written out independently."""
    x, y = a[i].astype(np.float64).ravel(), b[i].astype(np.float64).ravel()
    diff = max(abs(p - q) for p, q in zip(x, y))
    if diff == 0:
        return 0.0
    return diff / max(max(abs(v) for v in x), max(abs(v) for v in y), SCALE_FLOOR)


any_floats = st.sampled_from([np.float16, np.float32, np.float64]).flatmap(
    lambda dt: st.tuples(
        hnp.arrays(dt, st.shared(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), key="s")),
        hnp.arrays(dt, st.shared(hnp.array_shapes(min_dims=0, max_dims=3, max_side=4), key="s"))))


@settings(max_examples=300)
@given(any_floats, st.booleans())
def test_comparison_is_symmetric(pair, near):
    a, b = pair
    if near:  # also pairs that are close, where the tolerance decides
        with np.errstate(all="ignore"):
            b = (a * (1 + 1e-5)).astype(a.dtype)
    assert compare_outputs({"y": a}, {"y": b}) == compare_outputs({"y": b}, {"y": a})
    ea, eb = sample_errors(a, b), sample_errors(b, a)
    assert np.array_equal(ea, eb)


@settings(max_examples=300)
@given(shards(), st.data())
def test_a_sample_off_by_more_than_the_tolerance_is_rejected_whatever_the_others_hold(a, data):
    n = a.shape[0]
    r = data.draw(st.integers(0, n - 1), label="wrong sample")
    j = data.draw(st.integers(0, a[r].size - 1), label="element")
    f = data.draw(st.floats(1.01, 1000.0), label="times the tolerance")
    b = a.copy()
    flat = b[r].reshape(-1)
    flat[j] = flat[j] + f * TOLERANCE * row_scale(a, r) * (1 if flat[j] >= 0 else -1)
    b[r] = flat.reshape(b[r].shape)
    assume(row_error(a, b, r) > TOLERANCE)  # rounding to the dtype kept the error
    assert not compare_outputs({"y": a}, {"y": b}).within_tolerance
    # whatever the other samples hold (in both results), and however large they are
    others = [i for i in range(n) if i != r]
    for i in others:
        e = data.draw(exponents, label=f"magnitude of sample {i}")
        fill = data.draw(st.floats(-1, 1, allow_nan=False), label=f"value of sample {i}")
        a[i] = b[i] = a.dtype.type(fill * 10.0 ** e)
    assert row_error(a, b, r) > TOLERANCE
    got = compare_outputs({"y": a}, {"y": b})
    assert not got.within_tolerance and got.max_norm_error > TOLERANCE
    assert sample_errors(a, b)[r] > TOLERANCE
    # and the attack of issue 12: the wrong sample beside one far larger sample
    if others:
        a[others[0]] = b[others[0]] = a.dtype.type(np.finfo(a.dtype).max / 4)
        assert not compare_outputs({"y": a}, {"y": b}).within_tolerance


@settings(max_examples=300)
@given(shards(), st.data())
def test_noise_the_size_of_honest_noise_is_accepted(a, data):
    u = data.draw(hnp.arrays(np.float64, a.shape, elements=st.floats(-1, 1, allow_nan=False)),
                  label="noise")
    scale = np.array([row_scale(a, i) for i in range(len(a))]).reshape((-1,) + (1,) * (a.ndim - 1))
    b = (a.astype(np.float64) + u * HONEST_NOISE * scale).astype(a.dtype)
    got = compare_outputs({"y": a}, {"y": b})
    assert got.within_tolerance, got
    # rounding to the dtype moves it a little, never near the tolerance
    assert got.max_norm_error <= 1.1 * HONEST_NOISE


@settings(max_examples=200)
@given(shards(), st.data())
def test_a_sample_is_judged_by_itself_alone(a, data):
    """The error of a sample does not depend on any other sample: each is compared as if it
    were a shard of its own."""
    b = a.copy()
    for i in range(len(a)):
        if data.draw(st.booleans(), label=f"change sample {i}"):
            k = data.draw(st.floats(0.5, 2.0), label=f"factor {i}")
            b[i] = (a[i].astype(np.float64) * k).astype(a.dtype)
    errs = sample_errors(a, b)
    for i in range(len(a)):
        alone = sample_errors(a[i:i + 1], b[i:i + 1])[0]
        assert errs[i] == alone
        assert math.isclose(errs[i], row_error(a, b, i), rel_tol=1e-12, abs_tol=0.0)
