"""Key rotation: the old key names its successor, the new key countersigns.

The statement is a `key_rotation` envelope signed by the old key. Its `new_key_sig` is the
new key's signature over
    "p2pfleet/<network>/key_rotation_accept/v1" || 0x00 || old_key || new_key || at (u64 BE)
so nobody can name someone else's key as their successor. Credit and trust earned by the
old key carry over to the new one; a rotation with reason "compromised" tells publishers to
stop accepting anything the old key signs after `at`.
"""

from __future__ import annotations

from ..identity import Identity, verify_signature
from . import errors as E
from .envelope import Opened, seal
from .kinds import KeyRotation


def acceptance_bytes(network: str, old_key: bytes, new_key: bytes, at_ms: int) -> bytes:
    return (f"p2pfleet/{network}/key_rotation_accept/v1".encode() + b"\x00" + old_key + new_key
            + at_ms.to_bytes(8, "big"))


def make_rotation(old: Identity, new: Identity, network: str, at_ms: int,
                  reason: str = "scheduled") -> bytes:
    if old.public_key == new.public_key:
        raise ValueError("a key cannot rotate to itself")
    countersig = new.sign(acceptance_bytes(network, old.public_key, new.public_key, at_ms))
    body = KeyRotation(new_key=new.public_key, at=at_ms, reason=reason, new_key_sig=countersig)
    return seal(body, old, network)


def check_rotation(opened: Opened) -> KeyRotation:
    """Semantic checks of an opened key_rotation envelope (signature already verified)."""
    body: KeyRotation = opened.body
    if body.new_key == opened.signer:
        raise E.InvalidBody("body.new_key", "names the signing key itself")
    if not verify_signature(body.new_key, acceptance_bytes(opened.network, opened.signer,
                                                           body.new_key, body.at), body.new_key_sig):
        raise E.BadSignature("body.new_key_sig", "the new key did not countersign this rotation")
    return body
