"""The one exception family a wire decoder may raise.

Every decode failure is a `WireError` naming the field (a dotted path into the message,
or an envelope part) and the reason. Two branches tell callers what to do:

- `Unsupported`: a kind or version this node does not know. Ignore it; never punish the
  sender, so protocol upgrades need no flag day.
- `Invalid`: malformed, forged, expired, replayed or oversized. Drop it and score the
  sender down.

`code` is a stable, language-neutral string used in protocol/vectors. `punish` says whether
the peer that delivered the message should be scored down: not for unsupported messages
(upgrades), nor for replays and stale records, which honest peers deliver too (a resent
result whose acknowledgement was lost, a record gossiped twice).
"""

from __future__ import annotations


class WireError(Exception):
    """Base class: something about a message on the wire is unacceptable."""

    code = "wire-error"
    punish = True

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{self.code}: {field}: {reason}")


class Unsupported(WireError):
    """A kind or version we do not speak: ignore, do not punish."""

    code = "unsupported"
    punish = False


class UnsupportedKind(Unsupported):
    code = "unsupported-kind"


class UnsupportedVersion(Unsupported):
    code = "unsupported-version"


class Invalid(WireError):
    """The sender broke the protocol (or someone forged or replayed its message)."""

    code = "invalid"


class Oversized(Invalid):
    code = "oversized"


class MalformedEnvelope(Invalid):
    code = "malformed-envelope"


class WrongNetwork(Invalid):
    code = "wrong-network"


class BadSignature(Invalid):
    code = "bad-signature"


class InvalidBody(Invalid):
    """The signed body fails msgpack decoding or the strict schema of its kind."""

    code = "invalid-body"


class Expired(Invalid):
    code = "expired"


class NotYetValid(Invalid):
    """Issued too far in the future for the allowed clock skew."""

    code = "not-yet-valid"


class Replay(Invalid):
    code = "replay"
    punish = False  # drop; on a direct stream answer as the first time


class StaleRecord(Invalid):
    """A record whose sequence number is not newer than the one already held."""

    code = "stale-record"
    punish = False


ALL_ERRORS: tuple[type[WireError], ...] = (
    UnsupportedKind,
    UnsupportedVersion,
    Oversized,
    MalformedEnvelope,
    WrongNetwork,
    BadSignature,
    InvalidBody,
    Expired,
    NotYetValid,
    Replay,
    StaleRecord,
)
