"""Canonical encoding of named tensors, the output digest, and output comparison.

Pure functions, no I/O. The same encoding serves a shard's outputs (what a worker hashes
and returns) and, if a publisher likes, its inputs.

Canonical tensor encoding, version 1 (the "P2PFTEN1" layout)
-----------------------------------------------------------
All integers are unsigned little-endian. The encoding of a set of named tensors is:

    magic      8 bytes   ASCII "P2PFTEN1"
    count      u32       number of tensors (0 .. 4096)
    then, for each tensor, in ascending order of the UTF-8 bytes of its name
    (plain bytewise order; names are unique, 1 .. 1024 bytes of valid UTF-8):
      name_len u16       length of the name in bytes
      name     name_len  the name, UTF-8
      dtype    u8        ONNX TensorProto element type code (table below)
      ndim     u8        number of dimensions (0 .. 32)
      dims     ndim x u64  the shape, outermost first
      nbytes   u64       length of the data: product(dims) x itemsize
      data     nbytes    the elements in C (row-major) order, each little-endian

    code  numpy    itemsize          code  numpy    itemsize
       1  float32  4                    7  int64    8
       2  uint8    1                    9  bool     1 (0x00 or 0x01 only)
       3  int8     1                   10  float16  2 (IEEE 754 binary16)
       4  uint16   2                   11  float64  8
       5  int16    2                   12  uint32   4
       6  int32    4                   13  uint64   8

Floats are their IEEE 754 bit patterns, unchanged: -0.0 and 0.0 differ, NaN payloads are
kept. Strings, bfloat16, complex numbers and non-tensor values (sequences, maps) are not
encodable. Nothing follows the last tensor. The encoding of a given set of tensors is
unique, so equal bytes mean equal tensors, bit for bit.

The *digest* of a set of tensors is SHA-256 of that encoding. A shard's *output digest*
is the digest of its outputs (every micro-batch's outputs concatenated along axis 0, see
runner.py); a *batch digest* is the digest of one micro-batch's outputs alone.

Comparison (verification fallback)
----------------------------------
`compare_outputs(a, b)` says whether two results agree when their digests differ. Names,
dtypes and shapes must be equal. Integer and bool tensors must match exactly. For float
tensors the non-finite values (NaN, +inf, -inf) must sit at the same places with the same
kind, and the error is judged **per sample**: axis 0 is the sample axis (a scalar is one
sample), and for sample i, with a_i and b_i its row of the tensor in the two results (the
finite values only), the *sample error* is

    e_i = max |a_i - b_i| / max(max |a_i|, max |b_i|, SCALE_FLOOR)     (0 when a_i == b_i)

computed in float64: each sample against its own magnitude, never against the largest
value of the shard (a shard-wide scale let a cheater corrupt the small samples of a shard
holding one huge one: issue 12). `SCALE_FLOOR` is absolute, so near-zero rows do not turn
honest rounding into a huge relative error. A tensor agrees when every e_i <= the
tolerance; `normalised_max_error` is the largest e_i, `max_norm_error` the largest over all
tensors. Where a sample is a single element (outputs of shape [N]) this is per element.
Measured per sample (tools/measure_tolerance.py, its last run in
tools/measure_tolerance.last.json; specs/verification.md section 2): honest differences
stay <= 9.1e-6 (HONEST_NOISE: micro-batch 1 against 64; optimisation levels <= 4.6e-6,
onnxruntime 1.19.2 against 1.32 <= 3.0e-6, emulated AVX/AVX2 CPUs against AVX-512 <= 8.5e-7);
weights rounded to fp16 give a shard error (its largest sample error) >= 6.3e-4
(FP16_CHEAT), and exceed the tolerance on 85-100% of the samples of four of the five zoo
models (magika: 1.6%). `TOLERANCE = 3e-5` sits 3.3x above the worst honest noise and 21x
below the fp16 cheat. A per-element rule (each value against itself) would not hold
honest noise: logits near zero differ by up to 1.9e-4 of their own value across CPUs. For
float16 outputs, whose own rounding is coarser, the tolerance is at least 4 x float16
epsilon. A tolerance check alone cannot catch every cheap substitute (one small classifier
could not tell fp16 from honest; magika's shards are caught by their few sensitive
samples): it is one input to the quorum, next to known answers and trust.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

MAGIC = b"P2PFTEN1"
MAX_TENSORS = 4096
MAX_NAME_BYTES = 1024
MAX_NDIM = 32

#: Tolerance on the per-sample error of float outputs (see the module docstring).
TOLERANCE = 3e-5
#: A sample's scale is at least this much (absolute): a sample whose values are all below it
#: is compared with the absolute tolerance TOLERANCE x SCALE_FLOOR (3e-8). The smallest
#: sample magnitude of the models measured is 0.17 (probabilities): it never acts there.
SCALE_FLOOR = 1e-3
#: Largest honest per-sample error measured (tools/measure_tolerance.py: magika, a
#: micro-batch of 1 against 64), for reference.
HONEST_NOISE = 9.1e-6
#: Smallest per-shard error of the fp16-weights cheat measured (tools/measure_tolerance.py:
#: mlp784, 256 samples), for reference.
FP16_CHEAT = 6.3e-4

# ONNX TensorProto element type codes <-> numpy dtypes (little-endian).
_CODE_TO_DTYPE: dict[int, np.dtype] = {
    1: np.dtype("<f4"), 2: np.dtype("u1"), 3: np.dtype("i1"), 4: np.dtype("<u2"),
    5: np.dtype("<i2"), 6: np.dtype("<i4"), 7: np.dtype("<i8"), 9: np.dtype("?"),
    10: np.dtype("<f2"), 11: np.dtype("<f8"), 12: np.dtype("<u4"), 13: np.dtype("<u8"),
}
_KIND_SIZE_TO_CODE = {(dt.kind, dt.itemsize): code for code, dt in _CODE_TO_DTYPE.items()}
#: Names of the dtypes the encoding carries, e.g. for error messages.
SUPPORTED_DTYPES = tuple(str(dt.newbyteorder("=")) for dt in _CODE_TO_DTYPE.values())

_HEAD = struct.Struct("<8sI")
_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")


class EncodingError(ValueError):
    """Tensors that cannot be encoded, or bytes that are not a canonical encoding."""


def dtype_code(dtype: np.dtype) -> int:
    """ONNX element type code of a numpy dtype; EncodingError if not encodable."""
    dt = np.dtype(dtype)
    code = _KIND_SIZE_TO_CODE.get((dt.kind, dt.itemsize))
    if code is None:
        raise EncodingError(f"dtype {dt} is not encodable (supported: {', '.join(SUPPORTED_DTYPES)})")
    return code


def _check_name(name: object) -> bytes:
    if not isinstance(name, str):
        raise EncodingError(f"tensor name must be a str, got {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EncodingError(f"tensor name {name!r} is not valid UTF-8") from e
    if not 1 <= len(raw) <= MAX_NAME_BYTES:
        raise EncodingError(f"tensor name must have 1..{MAX_NAME_BYTES} UTF-8 bytes, got {len(raw)}")
    return raw


def canonical_array(value: object) -> np.ndarray:
    """`value` as a C-contiguous little-endian array of an encodable dtype (bools as 0/1)."""
    if not isinstance(value, np.ndarray):
        raise EncodingError(f"tensor must be a numpy array, got {type(value).__name__}")
    code = dtype_code(value.dtype)
    if value.ndim > MAX_NDIM:
        raise EncodingError(f"tensor has {value.ndim} dimensions, at most {MAX_NDIM} allowed")
    if code == 9:
        # numpy bools are one byte each, but a view of other bytes can hold values other than 0/1.
        return np.asarray(value.view(np.uint8) != 0, order="C")
    return np.asarray(value, dtype=_CODE_TO_DTYPE[code], order="C")


def _sorted_items(tensors: Mapping[str, np.ndarray]) -> list[tuple[bytes, np.ndarray]]:
    if not isinstance(tensors, Mapping):
        raise EncodingError(f"tensors must be a mapping name -> array, got {type(tensors).__name__}")
    if len(tensors) > MAX_TENSORS:
        raise EncodingError(f"{len(tensors)} tensors, at most {MAX_TENSORS} allowed")
    items = [(_check_name(k), canonical_array(v)) for k, v in tensors.items()]
    items.sort(key=lambda kv: kv[0])
    return items


def _encoded_parts(tensors: Mapping[str, np.ndarray]) -> Iterable[bytes | memoryview]:
    items = _sorted_items(tensors)
    yield _HEAD.pack(MAGIC, len(items))
    for raw_name, arr in items:
        header = bytearray(_U16.pack(len(raw_name)))
        header += raw_name
        header += bytes((dtype_code(arr.dtype), arr.ndim))
        for d in arr.shape:
            header += _U64.pack(d)
        header += _U64.pack(arr.nbytes)
        yield bytes(header)
        if arr.nbytes:
            yield memoryview(arr).cast("B")


def encode_tensors(tensors: Mapping[str, np.ndarray]) -> bytes:
    """The canonical encoding of named tensors (layout in the module docstring)."""
    return b"".join(_encoded_parts(tensors))


def tensors_digest(tensors: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of the canonical encoding, without building the encoding in memory."""
    h = hashlib.sha256()
    for part in _encoded_parts(tensors):
        h.update(part)
    return h.digest()


class LayoutDigester:
    """`tensors_digest` for many micro-batches of one known output layout, without
    re-deriving the encoding's headers for each: the sandbox's shared-memory path checks
    every micro-batch against the layout before its digest is taken, and a shard of small
    micro-batches spends more time building headers than hashing data otherwise.

    `layout`: (name, dtype, shape beyond axis 0) of every output. `digest(outs, rows)` is
    tensors_digest(outs) for arrays of exactly these names, dtypes and shapes (rows, *tail),
    C-contiguous and little-endian; anything else falls back to tensors_digest. Bool
    outputs always fall back (their bytes are canonicalised to 0/1)."""

    def __init__(self, layout: Iterable[tuple[str, np.dtype, tuple[int, ...]]]):
        items = []
        for name, dtype, tail in layout:
            dt = np.dtype(dtype).newbyteorder("<")
            items.append((_check_name(name), name, dt, tuple(int(d) for d in tail)))
        items.sort(key=lambda it: it[0])
        self._items = items
        self._usable = len(items) <= MAX_TENSORS and len(items) > 0 and \
            all(dt.kind != "b" and len(tail) + 1 <= MAX_NDIM for _r, _n, dt, tail in items)
        self._heads: dict[int, list[bytes]] = {}

    def _headers(self, rows: int) -> list[bytes]:
        heads = self._heads.get(rows)
        if heads is None:
            heads = []
            for k, (raw, _name, dt, tail) in enumerate(self._items):
                header = bytearray(_HEAD.pack(MAGIC, len(self._items))) if k == 0 else bytearray()
                header += _U16.pack(len(raw)) + raw + bytes((dtype_code(dt), 1 + len(tail)))
                for d in (rows, *tail):
                    header += _U64.pack(d)
                header += _U64.pack(rows * math.prod(tail) * dt.itemsize)
                heads.append(bytes(header))
            if len(self._heads) < 4:
                self._heads[rows] = heads
        return heads

    def digest(self, outs: Mapping[str, np.ndarray], rows: int) -> bytes:
        if not self._usable or len(outs) != len(self._items):
            return tensors_digest(outs)
        arrays = []
        for _raw, name, dt, tail in self._items:
            a = outs.get(name)
            if not (isinstance(a, np.ndarray) and a.dtype == dt and a.shape == (rows, *tail)
                    and a.flags.c_contiguous):
                return tensors_digest(outs)
            arrays.append(a)
        h = hashlib.sha256()
        for head, a in zip(self._headers(rows), arrays):
            h.update(head)
            if a.nbytes:
                h.update(memoryview(a).cast("B"))
        return h.digest()


def decode_tensors(data: bytes, *, max_elements: int | None = None) -> dict[str, np.ndarray]:
    """Parse a canonical encoding strictly: EncodingError on anything that `encode_tensors`
    would not have produced (bad magic, unsorted or duplicate names, bad UTF-8, unknown
    dtype, a length that does not match the shape, bool bytes other than 0/1, trailing
    bytes). Arrays are read-only views of `data` where possible. `max_elements` caps the
    total element count."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    n = len(view)
    if n < _HEAD.size:
        raise EncodingError(f"encoding too short: {n} bytes")
    magic, count = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise EncodingError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if count > MAX_TENSORS:
        raise EncodingError(f"{count} tensors, at most {MAX_TENSORS} allowed")
    pos = _HEAD.size
    out: dict[str, np.ndarray] = {}
    prev: bytes | None = None
    total_elements = 0

    def need(k: int, what: str) -> None:
        if pos + k > n:
            raise EncodingError(f"truncated at byte {pos}: {what} needs {k} bytes, {n - pos} left")

    for i in range(count):
        need(2, "name length")
        (name_len,) = _U16.unpack_from(view, pos)
        pos += 2
        if not 1 <= name_len <= MAX_NAME_BYTES:
            raise EncodingError(f"tensor {i}: name length {name_len} not in 1..{MAX_NAME_BYTES}")
        need(name_len, "name")
        raw_name = bytes(view[pos:pos + name_len])
        pos += name_len
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EncodingError(f"tensor {i}: name is not valid UTF-8") from e
        if prev is not None and raw_name <= prev:
            raise EncodingError(f"tensor {i}: name {name!r} is not after {prev.decode()!r} "
                                "(names must be unique and sorted by UTF-8 bytes)")
        prev = raw_name
        need(2, "dtype and ndim")
        code, ndim = view[pos], view[pos + 1]
        pos += 2
        dt = _CODE_TO_DTYPE.get(code)
        if dt is None:
            raise EncodingError(f"tensor {name!r}: unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise EncodingError(f"tensor {name!r}: {ndim} dimensions, at most {MAX_NDIM}")
        need(8 * ndim + 8, "shape and length")
        shape = tuple(_U64.unpack_from(view, pos + 8 * k)[0] for k in range(ndim))
        pos += 8 * ndim
        (nbytes,) = _U64.unpack_from(view, pos)
        pos += 8
        elements = math.prod(shape)
        if elements * dt.itemsize != nbytes:
            raise EncodingError(f"tensor {name!r}: {nbytes} data bytes do not fit shape {shape} "
                                f"of {dt} ({elements * dt.itemsize} expected)")
        total_elements += elements
        if max_elements is not None and total_elements > max_elements:
            raise EncodingError(f"more than {max_elements} elements in total")
        need(nbytes, "data")
        try:
            arr = np.frombuffer(view[pos:pos + nbytes], dtype=dt).reshape(shape)
        except ValueError as e:  # dimensions numpy cannot represent
            raise EncodingError(f"tensor {name!r}: shape {shape} not representable ({e})") from None
        pos += nbytes
        if code == 9 and arr.size and arr.view(np.uint8).max() > 1:
            raise EncodingError(f"tensor {name!r}: bool bytes must be 0 or 1")
        out[name] = arr
    if pos != n:
        raise EncodingError(f"{n - pos} trailing bytes after {count} tensors")
    return out


# Outputs are tensors; these names say what is meant at the call site.
encode_outputs = encode_tensors
decode_outputs = decode_tensors
output_digest = tensors_digest


def batch_digests(batches: Iterable[Mapping[str, np.ndarray]]) -> list[bytes]:
    """The digest of each micro-batch's outputs, in order."""
    return [tensors_digest(b) for b in batches]


def concat_batches(batches: list[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate micro-batch outputs along axis 0, per output name. Every batch must have
    the same names, and per name the same dtype, rank >= 1 and shape beyond axis 0."""
    if not batches:
        return {}
    names = set(batches[0])
    out: dict[str, np.ndarray] = {}
    for name in sorted(names):
        first = batches[0][name]
        parts = []
        for k, b in enumerate(batches):
            if set(b) != names:
                raise EncodingError(f"micro-batch {k} has outputs {sorted(b)}, expected {sorted(names)}")
            a = b[name]
            if a.ndim == 0:
                raise EncodingError(f"output {name!r} is a scalar: cannot concatenate micro-batches")
            if a.dtype != first.dtype or a.shape[1:] != first.shape[1:]:
                raise EncodingError(f"output {name!r} of micro-batch {k}: {a.dtype}{list(a.shape)} "
                                    f"does not continue {first.dtype}{list(first.shape)}")
            parts.append(a)
        out[name] = _adjacent(parts) if len(parts) > 1 else parts[0]
    return out


def _adjacent(parts: list[np.ndarray]) -> np.ndarray:
    """np.concatenate(parts, axis=0), or, when the parts lie one after the other in the
    memory of one C-contiguous array (the sandbox's shared-memory path gives them so), a
    view of that memory: no copy."""
    base, first = parts[0].base, parts[0]
    if isinstance(base, np.ndarray) and base.flags.c_contiguous and first.ndim:
        origin = base.__array_interface__["data"][0]
        start = pos = first.__array_interface__["data"][0]
        for p in parts:
            if p.base is not base or not p.flags.c_contiguous or p.dtype != first.dtype or \
                    p.shape[1:] != first.shape[1:] or p.__array_interface__["data"][0] != pos:
                break
            pos += p.nbytes
        else:
            rows = sum(p.shape[0] for p in parts)
            return np.ndarray((rows, *first.shape[1:]), first.dtype, buffer=base,
                              offset=start - origin)
    return np.concatenate(parts, axis=0)


# --- comparison -------------------------------------------------------------------------
@dataclass(frozen=True)
class Agreement:
    """How two sets of outputs compare.

    exact: bit-identical (their digests are equal).
    max_norm_error: the largest sample error over float tensors (`sample_errors`; 0.0 when
      exact or there are no float tensors; inf when names, dtypes or shapes differ, an
      integer/bool tensor differs, or non-finite values do not line up).
    within_tolerance: the outputs agree for verification: exact, or every sample of every
      float tensor within the tolerance and everything else equal.
    """

    exact: bool
    max_norm_error: float
    within_tolerance: bool


def _rows64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(1, 1) if x.ndim == 0 else x.reshape(x.shape[0], math.prod(x.shape[1:]))


def sample_errors(a: np.ndarray, b: np.ndarray, floor: float = SCALE_FLOOR) -> np.ndarray:
    """The error of each sample (axis 0; a scalar is one sample), in float64:
    max|a_i-b_i| / max(max|a_i|, max|b_i|, floor) over the finite values of row i; inf for a
    row whose non-finite values differ in place or kind (NaN payloads are not compared).
    Same shape required (ValueError otherwise)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    ra, rb = _rows64(a), _rows64(b)
    n = ra.shape[0]
    if ra.shape[1] == 0:
        return np.zeros(n)
    fa, fb = np.isfinite(ra), np.isfinite(rb)
    finite = fa & fb
    bad = fa != fb
    if not finite.all():
        both = ~fa & ~fb
        na, nb = np.isnan(ra), np.isnan(rb)
        with np.errstate(invalid="ignore"):
            bad |= both & ~((na & nb) | (ra == rb))
        ra, rb = np.where(finite, ra, 0.0), np.where(finite, rb, 0.0)
    diff = np.abs(ra - rb).max(axis=1)
    scale = np.maximum(np.maximum(np.abs(ra).max(axis=1), np.abs(rb).max(axis=1)), floor)
    err = np.divide(diff, scale, out=np.zeros(n), where=diff > 0)
    err[bad.any(axis=1)] = math.inf
    return err


def normalised_max_error(a: np.ndarray, b: np.ndarray, floor: float = SCALE_FLOOR) -> float:
    """The largest sample error (`sample_errors`): 0.0 for no samples, inf if the shapes or
    the non-finite values differ."""
    if a.shape != b.shape:
        return math.inf
    err = sample_errors(a, b, floor)
    return float(err.max()) if err.size else 0.0


def tolerance_for(dtype: np.dtype, tolerance: float = TOLERANCE) -> float:
    """The tolerance applied to a float dtype: `tolerance`, at least 4 x its epsilon."""
    return max(tolerance, 4 * float(np.finfo(dtype).eps))


def compare_outputs(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *,
                    tolerance: float = TOLERANCE, floor: float = SCALE_FLOOR) -> Agreement:
    """Compare two results' outputs per sample (see the module docstring). Symmetric in a
    and b."""
    if set(a) != set(b):
        return Agreement(False, math.inf, False)
    exact = True
    worst = 0.0
    within = True
    for name in sorted(a):
        try:
            x, y = canonical_array(a[name]), canonical_array(b[name])
        except EncodingError:
            return Agreement(False, math.inf, False)
        if x.dtype != y.dtype or x.shape != y.shape:
            return Agreement(False, math.inf, False)
        if x.tobytes() == y.tobytes():
            continue
        exact = False
        if x.dtype.kind != "f":
            return Agreement(False, math.inf, False)
        err = normalised_max_error(x, y, floor)
        worst = max(worst, err)
        if not err <= tolerance_for(x.dtype, tolerance):
            within = False
    return Agreement(exact, 0.0 if exact else worst, within)


__all__ = [
    "MAGIC", "TOLERANCE", "SCALE_FLOOR", "HONEST_NOISE", "FP16_CHEAT", "SUPPORTED_DTYPES", "EncodingError",
    "Agreement", "dtype_code", "canonical_array", "encode_tensors", "decode_tensors",
    "tensors_digest", "LayoutDigester", "encode_outputs", "decode_outputs", "output_digest", "batch_digests",
    "concat_batches", "sample_errors", "normalised_max_error", "tolerance_for", "compare_outputs",
]
