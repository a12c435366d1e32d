"""Every message kind of protocol major version 1, with all its fields.

A kind is a frozen dataclass registered with `@kind(...)`. The registry gives, per kind:
its name (part of the signature's domain tag), its major version, the largest body it may
have, how long it may live (messages and records carry `exp`, Unix ms; kinds that are
kept as proof, such as receipts, do not expire), and whether it is a sequence-ordered
record. protocol/schemas/ is generated from these declarations.

Conventions: peers are named by their 32-byte Ed25519 public key; digests are SHA-256
(32 bytes); ids are 16 random bytes; times are Unix milliseconds; durations are
milliseconds and timed on the receiver's own monotonic clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import (
    U8,
    U16,
    U32,
    Bytes,
    Enum,
    Float,
    ListOf,
    Optional,
    Struct,
    Text,
    UInt,
    wire_field,
)

MAJOR = 1
KiB = 1024
MiB = 1024 * KiB
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS

# Reused field types.
PeerKey = Bytes(32, min=32)
Digest = Bytes(32, min=32)
Id16 = Bytes(16, min=16)
TimeMs = UInt()
Seq = UInt()
Addrs = ListOf(Text(256, min=1), max=8)
SwVersion = Text(32, min=1, pattern=r"[0-9A-Za-z.+\-]+")
HwClass = Bytes(32)
Providers = ListOf(Text(64, min=1, pattern=r"[A-Za-z0-9_]+"), max=8)
OrtVersion = Text(32, min=1, pattern=r"[0-9A-Za-z.+\-]+")
Reason = Text(256)

NODE_STATES = ("available", "busy", "paused", "leaving")
OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class KindSpec:
    name: str
    major: int
    cls: type
    max_body: int
    max_lifetime_ms: int | None  # None: never expires (kept as proof)
    record: bool  # sequence-ordered, newest wins
    dated: bool  # has an `at` (Unix ms) that may not lie in the future beyond the skew


KINDS: dict[str, KindSpec] = {}
BY_CLASS: dict[type, KindSpec] = {}


def kind(name: str, *, max_body: int, max_lifetime_ms: int | None, record: bool = False,
         dated: bool = False):
    def register(cls: type) -> type:
        if dated and "at" not in cls.__dataclass_fields__:
            raise TypeError(f"{name}: a dated kind needs an 'at' field")
        spec = KindSpec(name, MAJOR, cls, max_body, max_lifetime_ms, record, dated)
        KINDS[name] = spec
        BY_CLASS[cls] = spec
        return cls

    return register


@kind("capacity", max_body=2 * KiB, max_lifetime_ms=HOUR_MS, record=True)
@dataclass(frozen=True)
class Capacity:
    """A node's public capacity record, stored in the DHT under its peer id."""

    seq: int = wire_field(Seq, "sequence number: newest wins")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    sw_version: str = wire_field(SwVersion, "software version of the node")
    state: str = wire_field(Enum(*NODE_STATES), "coarse state; leaving: about to go offline")
    hw_class: bytes = wire_field(HwClass, "hardware class: digest of canary outputs (a hint)")
    cores: int = wire_field(UInt(U16), "CPU cores the owner lets the node use")
    memory_mb: int = wire_field(UInt(U32), "memory the node may use, MiB")
    bench: float = wire_field(Float(), "reference benchmark, samples/s")
    providers: tuple = wire_field(Providers, "ONNX Runtime execution providers offered")
    ort_version: str = wire_field(OrtVersion, "onnxruntime version the node runs")
    slots: int = wire_field(UInt(U16), "concurrent shards the node takes")
    addrs: tuple = wire_field(Addrs, "public multiaddrs; empty when only reachable via relay")


@dataclass(frozen=True)
class Requirements:
    """What a node needs to take a job's work."""

    min_memory_mb: int = wire_field(UInt(U32), "least memory per shard, MiB")
    providers: tuple = wire_field(Providers, "execution providers allowed (empty: CPU)")
    min_sw_version: str = wire_field(SwVersion, "oldest node software accepted")
    ort_versions: str = wire_field(Text(64), "allowed onnxruntime version range, PEP 440")


@kind("job", max_body=4 * KiB, max_lifetime_ms=HOUR_MS, record=True)
@dataclass(frozen=True)
class JobAnnouncement:
    """A publisher announces a job (not its shards) on the jobs gossip topic."""

    seq: int = wire_field(Seq, "sequence number of this announcement: newest wins")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    job_id: bytes = wire_field(Id16, "job id, chosen by the publisher")
    model_digest: bytes = wire_field(Digest, "SHA-256 of the ONNX model bytes")
    model_size: int = wire_field(UInt(), "model size, bytes")
    requirements: Requirements = wire_field(Struct(Requirements), "node requirements")
    credit_rate: int = wire_field(UInt(), "credit units paid per compute unit")
    quorum: int = wire_field(UInt(U8, min=1), "agreeing results needed per shard")
    shards_total: int = wire_field(UInt(U32), "shards in the job")
    shards_left: int = wire_field(UInt(U32), "shards not yet accepted")
    addrs: tuple = wire_field(Addrs, "where the publisher takes work requests")


@kind("work_request", max_body=2 * KiB, max_lifetime_ms=5 * MINUTE_MS)
@dataclass(frozen=True)
class WorkRequest:
    """A node asks a publisher it chose for work."""

    req_id: bytes = wire_field(Id16, "request id, echoed in the reply")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    job_id: bytes | None = wire_field(Optional(Id16), "wanted job, or nil for any")
    hw_class: bytes = wire_field(HwClass, "hardware class of the node")
    sw_version: str = wire_field(SwVersion, "software version of the node")
    ort_version: str = wire_field(OrtVersion, "onnxruntime version the node runs")
    bench: float = wire_field(Float(), "reference benchmark, samples/s")
    cores: int = wire_field(UInt(U16), "cores available")
    memory_mb: int = wire_field(UInt(U32), "memory available, MiB")
    providers: tuple = wire_field(Providers, "execution providers offered")
    free_slots: int = wire_field(UInt(U16, min=1), "leases wanted at most")


@dataclass(frozen=True)
class Lease:
    """One replica of one shard, leased to one node, with pinned execution settings."""

    lease_id: bytes = wire_field(Id16, "lease id")
    job_id: bytes = wire_field(Id16, "job id")
    shard: int = wire_field(UInt(U32), "shard index within the job")
    model_digest: bytes = wire_field(Digest, "SHA-256 of the model")
    model_size: int = wire_field(UInt(), "model size, bytes")
    input_digest: bytes = wire_field(Digest, "SHA-256 of the shard's input blob")
    input_size: int = wire_field(UInt(), "input blob size, bytes")
    input_sources: tuple = wire_field(Addrs, "where to fetch the input (empty: the publisher)")
    token: bytes = wire_field(Bytes(64, min=16), "input access token bound to this lease")
    deadline_ms: int = wire_field(UInt(U32, min=1), "lease duration, ms, on the node's clock")
    micro_batch: int = wire_field(UInt(U32, min=1), "exact micro-batch size to run")
    opt_level: str = wire_field(Enum(*OPT_LEVELS), "ONNX Runtime graph optimisation level")
    provider: str = wire_field(Text(64, min=1, pattern=r"[A-Za-z0-9_]+"), "execution provider")
    ort_versions: str = wire_field(Text(64), "onnxruntime versions allowed, PEP 440 specifier")
    samples: int = wire_field(UInt(U32, min=1), "samples in the shard")
    first_batch: int = wire_field(UInt(U32), "micro-batch to start at (after a hand-back)")
    credit: int = wire_field(UInt(), "credit units paid when the result is accepted")


@kind("lease_batch", max_body=64 * KiB, max_lifetime_ms=5 * MINUTE_MS)
@dataclass(frozen=True)
class LeaseBatch:
    """A publisher's answer to a work request: up to N leases."""

    req_id: bytes = wire_field(Id16, "the work request answered")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    worker: bytes = wire_field(PeerKey, "the node the leases are for")
    leases: tuple = wire_field(ListOf(Struct(Lease), min=1, max=64), "the leases")


@kind("no_work", max_body=1 * KiB, max_lifetime_ms=5 * MINUTE_MS)
@dataclass(frozen=True)
class NoWork:
    """A publisher has no work for this request."""

    req_id: bytes = wire_field(Id16, "the work request answered")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    reason: str = wire_field(
        Enum("no_work", "not_eligible", "quota", "backoff", "excluded", "busy"), "why"
    )
    retry_after_ms: int = wire_field(UInt(U32), "ask again after this long, ms")


@kind("blob_request", max_body=1 * KiB, max_lifetime_ms=5 * MINUTE_MS)
@dataclass(frozen=True)
class BlobRequest:
    """Ask for a byte range of a content-addressed blob."""

    req_id: bytes = wire_field(Id16, "request id")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    digest: bytes = wire_field(Digest, "SHA-256 of the whole blob")
    offset: int = wire_field(UInt(), "first byte wanted")
    length: int = wire_field(UInt(U32, min=1), "bytes wanted at most")
    token: bytes | None = wire_field(Optional(Bytes(64, min=16)), "lease token (inputs only)")


# Blob v2 (specs/work-and-leases.md, sections 5 and 9): one signed manifest per stream, then
# the chunks' wire bytes unsigned, each checked against the manifest's hash for it.
BLOB_CODECS = ("none", "zstd", "zstd-shuffle4")
BLOB_MIN_CHUNK = 1 * KiB
BLOB_MAX_CHUNK = 1 * MiB
BLOB_MAX_CHUNKS = 16_384


@kind("blob_manifest", max_body=608 * KiB, max_lifetime_ms=5 * MINUTE_MS)
@dataclass(frozen=True)
class BlobManifest:
    """The holder's answer to a `blob_request`: how the blob is cut into chunks and encoded,
    and the hash of each chunk's wire bytes. The chunks follow on the stream, unsigned."""

    req_id: bytes = wire_field(Id16, "the request answered")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    digest: bytes = wire_field(Digest, "SHA-256 of the whole blob (its raw bytes)")
    total_size: int = wire_field(UInt(), "size of the whole blob, raw bytes")
    chunk_size: int = wire_field(UInt(BLOB_MAX_CHUNK, min=BLOB_MIN_CHUNK),
                                 "raw bytes per chunk (the last one may be shorter)")
    codec: str = wire_field(Enum(*BLOB_CODECS), "how chunks are encoded on the wire")
    first: int = wire_field(UInt(U32), "index of the first chunk sent on this stream")
    hashes: bytes = wire_field(Bytes(32 * BLOB_MAX_CHUNKS),
                               "BLAKE3-256 of each chunk's wire bytes, concatenated")
    sizes: bytes = wire_field(Bytes(4 * BLOB_MAX_CHUNKS),
                              "wire length of each chunk: unsigned 32-bit big-endian, concatenated")


@kind("progress", max_body=16 * KiB, max_lifetime_ms=HOUR_MS)
@dataclass(frozen=True)
class Progress:
    """Micro-batches of a lease finished so far."""

    lease_id: bytes = wire_field(Id16, "lease id")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    done: int = wire_field(UInt(U32), "micro-batches finished")
    total: int = wire_field(UInt(U32, min=1), "micro-batches in the shard")
    batch_digests: tuple = wire_field(ListOf(Digest, max=256), "output digest per finished micro-batch")


@kind("hand_back", max_body=16 * KiB, max_lifetime_ms=DAY_MS)
@dataclass(frozen=True)
class HandBack:
    """A node gives a lease back early, with what it finished."""

    lease_id: bytes = wire_field(Id16, "lease id")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    reason: str = wire_field(
        Enum("unplugged", "departure", "policy", "shutdown", "overloaded"), "why"
    )
    done: int = wire_field(UInt(U32), "micro-batches finished")
    batch_digests: tuple = wire_field(ListOf(Digest, max=256), "output digest per finished micro-batch")
    output_digest: bytes | None = wire_field(Optional(Digest), "digest of the finished outputs blob")


@kind("result", max_body=256 * KiB + 2 * KiB, max_lifetime_ms=7 * DAY_MS)
@dataclass(frozen=True)
class Result:
    """A signed result, bound to the worker (signer), lease, model, input and output."""

    lease_id: bytes = wire_field(Id16, "lease id")
    exp: int = wire_field(TimeMs, "expiry, Unix ms: nodes retry until then")
    job_id: bytes = wire_field(Id16, "job id")
    shard: int = wire_field(UInt(U32), "shard index")
    model_digest: bytes = wire_field(Digest, "SHA-256 of the model run")
    input_digest: bytes = wire_field(Digest, "SHA-256 of the input run")
    output_digest: bytes = wire_field(Digest, "SHA-256 of the canonical output encoding")
    output_size: int = wire_field(UInt(), "size of the canonical outputs, bytes")
    batch_digests: tuple = wire_field(ListOf(Digest, max=256), "output digest per micro-batch")
    hw_class: bytes = wire_field(HwClass, "hardware class of the worker")
    ort_version: str = wire_field(OrtVersion, "onnxruntime version that computed it")
    elapsed_ms: int = wire_field(UInt(U32), "compute time, ms")
    energy_mwh: int = wire_field(UInt(U32), "estimated energy, milliwatt-hours")
    output: bytes | None = wire_field(Optional(Bytes(256 * KiB)), "outputs inline, or nil: fetch as blob")


@kind("failed", max_body=2 * KiB, max_lifetime_ms=7 * DAY_MS)
@dataclass(frozen=True)
class FailedResult:
    """A lease could not be computed."""

    lease_id: bytes = wire_field(Id16, "lease id")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    reason: str = wire_field(
        Enum("crash", "out_of_memory", "timeout", "invalid_model", "input_error", "fetch_failed",
             "internal"),
        "what failed",
    )
    detail: str = wire_field(Reason, "human-readable detail")


@kind("receipt", max_body=1 * KiB, max_lifetime_ms=None, dated=True)
@dataclass(frozen=True)
class Receipt:
    """A publisher's signed payment for an accepted result. Kept forever as proof."""

    lease_id: bytes = wire_field(Id16, "lease id")
    job_id: bytes = wire_field(Id16, "job id")
    shard: int = wire_field(UInt(U32), "shard index")
    worker: bytes = wire_field(PeerKey, "the node paid")
    output_digest: bytes = wire_field(Digest, "the accepted output")
    credit: int = wire_field(UInt(), "credit units")
    at: int = wire_field(TimeMs, "acceptance time, Unix ms")


MAX_RECEIPTS_ASKED = 64  # lease ids in one receipt_request, and receipts in one answer


@kind("receipt_request", max_body=2 * KiB, max_lifetime_ms=5 * MINUTE_MS)
@dataclass(frozen=True)
class ReceiptRequest:
    """A worker asks a publisher, on `report`, for its receipts: a worker that cannot be
    dialled (NAT) never gets the receipts pushed on `notice`."""

    req_id: bytes = wire_field(Id16, "request id, fresh for every request")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    lease_ids: tuple = wire_field(ListOf(Id16, max=MAX_RECEIPTS_ASKED),
                                  "leases whose receipts are wanted; empty: every undelivered one")


@kind("cancel", max_body=8 * KiB, max_lifetime_ms=DAY_MS)
@dataclass(frozen=True)
class Cancel:
    """A publisher withdraws leases (or a whole job)."""

    job_id: bytes = wire_field(Id16, "job id")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    lease_ids: tuple = wire_field(ListOf(Id16, max=256), "leases withdrawn; empty: the whole job")
    reason: str = wire_field(Reason, "why")


@kind("node_info", max_body=2 * KiB, max_lifetime_ms=HOUR_MS, record=True)
@dataclass(frozen=True)
class NodeInfo:
    """What an opted-in node tells the explorer about itself. Nothing private."""

    seq: int = wire_field(Seq, "sequence number")
    exp: int = wire_field(TimeMs, "expiry, Unix ms")
    sw_version: str = wire_field(SwVersion, "software version")
    state: str = wire_field(Enum(*NODE_STATES), "coarse state")
    uptime_s: int = wire_field(UInt(), "seconds since start")
    shards_done: int = wire_field(UInt(), "shards finished, all publishers")
    results_accepted: int = wire_field(UInt(), "results accepted, all publishers")


@kind("evidence", max_body=1 * MiB - 4 * KiB, max_lifetime_ms=None, dated=True)
@dataclass(frozen=True)
class Evidence:
    """A publisher's signed report that a peer misbehaved, with the signed proof."""

    accused: bytes = wire_field(PeerKey, "the peer accused")
    job_id: bytes = wire_field(Id16, "job concerned")
    claim: str = wire_field(
        Enum("conflicting_results", "failed_known_answer", "wrong_result"), "what is claimed"
    )
    proofs: tuple = wire_field(ListOf(Bytes(512 * KiB, min=1), min=1, max=4),
                               "the accused's own signed envelopes")
    expected_digest: bytes | None = wire_field(Optional(Digest), "known-answer output digest, if any")
    at: int = wire_field(TimeMs, "report time, Unix ms")
    note: str = wire_field(Reason, "human-readable detail")


@kind("key_rotation", max_body=1 * KiB, max_lifetime_ms=None, dated=True)
@dataclass(frozen=True)
class KeyRotation:
    """The old key (signer) names its successor; the new key countersigns."""

    new_key: bytes = wire_field(PeerKey, "the successor's public key")
    at: int = wire_field(TimeMs, "statement time, Unix ms")
    reason: str = wire_field(Enum("scheduled", "compromised"), "why the key is retired")
    new_key_sig: bytes = wire_field(Bytes(64, min=64), "new key's signature, see specs/identity-and-wire.md")


__all__ = [
    "KINDS", "BY_CLASS", "KindSpec", "MAJOR", "Capacity", "Requirements", "JobAnnouncement",
    "WorkRequest", "Lease", "LeaseBatch", "NoWork", "BlobRequest", "BlobManifest", "Progress",
    "HandBack", "Result", "FailedResult", "Receipt", "ReceiptRequest", "MAX_RECEIPTS_ASKED",
    "Cancel", "NodeInfo", "Evidence",
    "KeyRotation", "NODE_STATES", "OPT_LEVELS", "BLOB_CODECS", "BLOB_MIN_CHUNK",
    "BLOB_MAX_CHUNK", "BLOB_MAX_CHUNKS",
]
