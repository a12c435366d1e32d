"""What the explorer proves itself, and what publishers report (pure: no I/O, no clock).

`check_copies` looks at every copy of one peer's capacity record that DHT peers returned
in their GET_VALUE replies, before any validator saw them, and finds:

- `wrong_key`: a value under `/p2pfleet/<net>/node/1/<peer>` that verifies but is signed by
  another key (proof: the envelope, and the peer that served it over an authenticated
  connection);
- `equivocation`: two valid records of the peer with the same `seq` and different bodies
  (proof: both envelopes, each signed by the peer itself).

`open_publisher_evidence` opens an `evidence` envelope heard on the evidence topic: it is a
claim signed by a publisher, shown attributed to that publisher, never as the explorer's own
finding. Its proofs are checked only for being signed by the accused (identity-and-wire.md,
section 14).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..identity import peer_id_from_key
from ..wire import errors as E
from ..wire.envelope import MAX_CLOCK_SKEW_MS, Opened, open_envelope

VERIFIED_BY_EXPLORER = "explorer"


@dataclass(frozen=True)
class Finding:
    """One piece of evidence. `verified_by` is "explorer" or the peer id of the publisher
    whose signed report it is (then it is that publisher's claim, not a fact)."""

    kind: str            # wrong_key | equivocation | conflicting_results | failed_known_answer | wrong_result
    accused: str         # peer id
    verified_by: str
    detail: str
    served_by: tuple[str, ...] = ()  # peers whose replies carried the proof (DHT findings)
    proofs: tuple[bytes, ...] = ()   # complete envelopes

    def key(self) -> tuple:
        return (self.kind, self.accused, self.verified_by, self.proofs)


@dataclass
class RecordCheck:
    """The outcome for one peer's key: the newest valid record and what was wrong."""

    newest: Opened | None = None
    expired: bool = False  # the newest valid copy is past exp + skew
    findings: list[Finding] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (served by, why)


def check_copies(network: str, peer_id: str, copies: dict[str, bytes], now_ms: int) -> RecordCheck:
    """Check every copy of `peer_id`'s capacity record; `copies` maps server peer id to value."""
    out = RecordCheck()
    valid: list[tuple[str, Opened]] = []
    wrong: dict[bytes, tuple[Opened, list[str]]] = {}
    for server, value in sorted(copies.items()):
        try:
            # expiry is judged below: an expired record still says the peer is offline
            opened = open_envelope(value, network, kinds={"capacity"})
        except E.WireError as exc:
            out.invalid.append((server, str(exc)))
            continue
        signer = peer_id_from_key(opened.signer)
        if signer != peer_id:
            wrong.setdefault(opened.raw, (opened, []))[1].append(server)
            continue
        valid.append((server, opened))
    for raw, (opened, servers) in wrong.items():
        signer = peer_id_from_key(opened.signer)
        # who put it there is unknown; what is proven: these servers returned it under the
        # key, and `signer` signed it. A node serving its own key's record wrongly signed is
        # the accused; otherwise the servers are.
        accused = peer_id if peer_id in servers else servers[0]
        out.findings.append(Finding(
            "wrong_key", accused, VERIFIED_BY_EXPLORER,
            f"a capacity record under the key of {peer_id} is signed by {signer}, "
            f"served by {', '.join(servers)}", tuple(servers), (raw,)))
    by_seq: dict[int, dict[bytes, tuple[Opened, list[str]]]] = {}
    for server, opened in valid:
        by_seq.setdefault(opened.body.seq, {}).setdefault(opened.body_bytes, (opened, []))[1].append(server)
    for seq, bodies in sorted(by_seq.items()):
        if len(bodies) > 1:
            versions = list(bodies.values())
            servers = tuple(s for _o, ss in versions for s in ss)
            out.findings.append(Finding(
                "equivocation", peer_id, VERIFIED_BY_EXPLORER,
                f"{len(versions)} different capacity records with seq {seq}, all signed by "
                f"{peer_id}", servers, tuple(o.raw for o, _s in versions[:4])))
    if valid:
        # newest wins; at equal seq keep the first (core.records' order)
        newest = max(valid, key=lambda sv: sv[1].body.seq)[1]
        out.newest = newest
        out.expired = now_ms > newest.body.exp + MAX_CLOCK_SKEW_MS
    return out


def equivocation_between(peer_id: str, held: Opened, new: Opened) -> Finding | None:
    """Two records of one peer seen at different times: same seq, different bodies?"""
    if held.body.seq == new.body.seq and held.body_bytes != new.body_bytes:
        return Finding("equivocation", peer_id, VERIFIED_BY_EXPLORER,
                       f"2 different capacity records with seq {new.body.seq}, both signed by "
                       f"{peer_id} (seen at different times)", (), (held.raw, new.raw))
    return None


class EvidenceRefused(ValueError):
    """An evidence report we do not show; the message says why."""


def open_publisher_evidence(network: str, data: bytes, now_ms: int) -> Finding:
    """Open a publisher's `evidence` report; raises EvidenceRefused naming what is wrong."""
    try:
        opened = open_envelope(data, network, now_ms=now_ms, kinds={"evidence"})
    except E.WireError as exc:
        raise EvidenceRefused(f"evidence report refused: {exc}") from None
    body = opened.body
    for i, proof in enumerate(body.proofs):
        try:
            # proofs are old by nature: no expiry or replay checks
            inner = open_envelope(bytes(proof), network)
        except E.WireError as exc:
            raise EvidenceRefused(f"evidence proof {i} does not open: {exc}") from None
        if inner.signer != body.accused:
            raise EvidenceRefused(f"evidence proof {i} is not signed by the accused")
    publisher = peer_id_from_key(opened.signer)
    note = body.note[:200]
    return Finding(body.claim, peer_id_from_key(body.accused), publisher,
                   f"reported by publisher {publisher} for job {body.job_id.hex()}"
                   + (f": {note}" if note else ""), (), tuple(bytes(p) for p in body.proofs))
