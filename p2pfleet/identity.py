"""Node identity: an Ed25519 key (PyNaCl), its libp2p peer id, and the key file.

The key is what a node's credit and trust are bound to, so the file is written 0600 and a
key file that others can read is refused. Keys can be exported (optionally sealed with a
passphrase, Argon2id + XSalsa20-Poly1305) and imported for backup. Rotation statements live
in `p2pfleet.wire.rotation`.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import base58
import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.signing
import nacl.utils

KEY_HEADER = "# p2pfleet node key (Ed25519). Keep it secret and backed up: it holds your credit.\n"
PLAIN_TAG = "p2pfleet-key-v1 ed25519"
SEALED_TAG = "p2pfleet-key-v1 ed25519-argon2id-secretbox"

# libp2p PublicKey protobuf for Ed25519: field 1 (KeyType) = 1, field 2 (Data) = 32 bytes.
_LIBP2P_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])


class KeyFileError(Exception):
    """A key file is missing, unreadable by policy, malformed, or its passphrase is wrong."""


def peer_id_bytes(public_key: bytes) -> bytes:
    """The libp2p peer id of an Ed25519 key: an identity multihash of its protobuf encoding."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    proto = _LIBP2P_ED25519_PREFIX + public_key
    return bytes([0x00, len(proto)]) + proto


def peer_id_from_key(public_key: bytes) -> str:
    """The base58btc peer id string libp2p shows for this key (starts with 12D3KooW)."""
    return base58.b58encode(peer_id_bytes(public_key)).decode("ascii")


def key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of `peer_id_from_key`; ValueError for anything but an Ed25519 peer id."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as exc:
        raise ValueError(f"{peer_id!r} is not base58") from exc
    if len(raw) != 38 or raw[:6] != bytes([0x00, 0x24]) + _LIBP2P_ED25519_PREFIX:
        raise ValueError(f"{peer_id!r} is not an Ed25519 libp2p peer id")
    return raw[6:]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 signing identity."""

    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> "Identity":
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        """Deterministic identity, for tests and test vectors only."""
        return cls(nacl.signing.SigningKey(hashlib.sha256(seed).digest()))

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def peer_id(self) -> str:
        return peer_id_from_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def fingerprint(self) -> str:
        """A short checksum of the public key for humans comparing backups."""
        return hashlib.sha256(self.public_key).hexdigest()[:16]


def _write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 from the first byte (never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def encode_key(identity: Identity, passphrase: str | None = None) -> str:
    if passphrase is None:
        return KEY_HEADER + f"{PLAIN_TAG} {identity.seed.hex()}\n"
    salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
    box_key = nacl.pwhash.argon2id.kdf(
        nacl.secret.SecretBox.KEY_SIZE, passphrase.encode(), salt,
        opslimit=nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
        memlimit=nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
    )
    sealed = nacl.secret.SecretBox(box_key).encrypt(identity.seed)
    return KEY_HEADER + f"{SEALED_TAG} {salt.hex()} {bytes(sealed).hex()}\n"


def decode_key(text: str, passphrase: str | None = None, *, source: str = "key") -> Identity:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) != 1:
        raise KeyFileError(f"{source}: expected one key line, found {len(lines)}")
    parts = lines[0].split()
    tag = " ".join(parts[:2])
    try:
        if tag == PLAIN_TAG and len(parts) == 3:
            seed = bytes.fromhex(parts[2])
        elif tag == SEALED_TAG and len(parts) == 4:
            if passphrase is None:
                raise KeyFileError(f"{source}: the key is sealed with a passphrase; none was given")
            salt, sealed = bytes.fromhex(parts[2]), bytes.fromhex(parts[3])
            box_key = nacl.pwhash.argon2id.kdf(
                nacl.secret.SecretBox.KEY_SIZE, passphrase.encode(), salt,
                opslimit=nacl.pwhash.argon2id.OPSLIMIT_MODERATE,
                memlimit=nacl.pwhash.argon2id.MEMLIMIT_MODERATE,
            )
            try:
                seed = nacl.secret.SecretBox(box_key).decrypt(sealed)
            except nacl.exceptions.CryptoError:
                raise KeyFileError(f"{source}: wrong passphrase (or the file is damaged)") from None
        else:
            raise KeyFileError(f"{source}: not a p2pfleet key (expected '{PLAIN_TAG} <hex>')")
    except ValueError:
        raise KeyFileError(f"{source}: the key is not valid hex") from None
    if len(seed) != 32:
        raise KeyFileError(f"{source}: an Ed25519 seed is 32 bytes, found {len(seed)}")
    return Identity(nacl.signing.SigningKey(seed))


def save_key(path: Path, identity: Identity, passphrase: str | None = None) -> None:
    _write_private(Path(path), encode_key(identity, passphrase))


def check_private(path: Path) -> None:
    """Refuse a key file that anyone but its owner can read or write."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path} has mode {mode:04o}: others can read or change your key. "
            f"Run 'chmod 600 {path}' (and consider the key leaked if others had access)."
        )


def load_key(path: Path, passphrase: str | None = None) -> Identity:
    path = Path(path)
    if not path.exists():
        raise KeyFileError(f"{path}: no key file (run 'p2pfleet node init' first)")
    check_private(path)
    return decode_key(path.read_text(encoding="ascii", errors="replace"), passphrase, source=str(path))
