from __future__ import annotations

import os
import stat

import pytest

from p2pfleet.identity import (
    Identity,
    KeyFileError,
    decode_key,
    encode_key,
    key_from_peer_id,
    load_key,
    peer_id_from_key,
    save_key,
    verify_signature,
)


def test_key_file_is_0600_and_round_trips(tmp_path):
    ident = Identity.generate()
    path = tmp_path / "sub" / "key"
    save_key(path, ident)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(path).seed == ident.seed
    save_key(path, Identity.generate())  # replacing keeps 0600 and leaves no temp file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["key"]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused(tmp_path, mode):
    path = tmp_path / "key"
    save_key(path, Identity.generate())
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    assert f"chmod 600 {path}" in str(info.value) and f"{mode:04o}" in str(info.value)


def test_missing_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="no key file.*p2pfleet node init"):
        load_key(tmp_path / "key")


def test_passphrase_round_trip(tmp_path):
    ident = Identity.generate()
    path = tmp_path / "backup.key"
    save_key(path, ident, passphrase="correct horse")
    text = path.read_text()
    assert ident.seed.hex() not in text and "argon2id" in text
    assert load_key(path, passphrase="correct horse").seed == ident.seed
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_key(path, passphrase="wrong horse")
    with pytest.raises(KeyFileError, match="sealed with a passphrase"):
        load_key(path)


@pytest.mark.parametrize("text,why", [
    ("", "expected one key line, found 0"),
    ("hello\n", "not a p2pfleet key"),
    ("p2pfleet-key-v1 ed25519 zz\n", "not valid hex"),
    ("p2pfleet-key-v1 ed25519 abcd\n", "32 bytes, found 2"),
    ("p2pfleet-key-v1 ed25519 00\np2pfleet-key-v1 ed25519 00\n", "found 2"),
])
def test_malformed_key_files(text, why):
    with pytest.raises(KeyFileError, match=why):
        decode_key(text, source="k")


def test_plain_encoding_has_a_warning_header():
    ident = Identity.from_seed(b"x")
    text = encode_key(ident)
    assert text.startswith("# p2pfleet node key") and decode_key(text).seed == ident.seed


def test_peer_id_matches_libp2p():
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    for seed in (b"a", b"b", b"c"):
        ident = Identity.from_seed(seed)
        theirs = ID.from_pubkey(Ed25519PublicKey.from_bytes(ident.public_key)).to_base58()
        assert ident.peer_id == theirs == peer_id_from_key(ident.public_key)
        assert ident.peer_id.startswith("12D3KooW")
        assert key_from_peer_id(ident.peer_id) == ident.public_key


def test_key_from_peer_id_rejects_others():
    with pytest.raises(ValueError):
        key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # an RSA-era id
    with pytest.raises(ValueError):
        key_from_peer_id("0OIl")  # not base58


def test_sign_and_verify():
    ident = Identity.from_seed(b"s")
    sig = ident.sign(b"msg")
    assert verify_signature(ident.public_key, b"msg", sig)
    assert not verify_signature(ident.public_key, b"msh", sig)
    assert not verify_signature(b"short", b"msg", sig)
    assert len(ident.fingerprint()) == 16
