"""TLS for the node's OCPP central system: OCPP security profiles 2 (TLS with a server
certificate, chargers send HTTP Basic auth) and 3 (TLS with client certificates).

`server_context` reads the owner's PEM files, refusing a key file others can read or change
(the node key's rule) and naming the file that is wrong; `certificate_names` gives the names
a verified charger certificate is for (its subject CN and SAN DNS names), which the server
compares with the charge point id in the URL (security profile 3).
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path
from typing import Any


class TlsSetupError(ValueError):
    """A certificate, key or CA file is missing, unreadable, not private, or not PEM.
    `key` is the setting that names the file."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def _readable(path: Path, key: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise TlsSetupError(f"{key}: {path} does not exist", key) from None
    except OSError as exc:
        raise TlsSetupError(f"{key}: cannot read {path} ({exc.strerror})", key) from None


def _private(path: Path, key: str) -> None:
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise TlsSetupError(
            f"{key}: {path} has mode {mode:04o}: others can read or change the node's TLS "
            f"key; run 'chmod 600 {path}' (and make a new key if others had access)", key)


def server_context(cert_file: Path, key_file: Path,
                   client_ca_file: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ server context. With `client_ca_file` (profile 3) a charger must present
    a certificate that CA signed, or the handshake fails."""
    cert_file, key_file = Path(cert_file), Path(key_file)
    _readable(cert_file, "ocpp.tls_cert_file")
    _readable(key_file, "ocpp.tls_key_file")
    _private(key_file, "ocpp.tls_key_file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TlsSetupError(
            f"ocpp.tls_cert_file / ocpp.tls_key_file: {cert_file} and {key_file} are not a "
            f"PEM certificate and its matching private key ({exc.reason or exc})",
            "ocpp.tls_cert_file") from None
    if client_ca_file is not None:
        client_ca_file = Path(client_ca_file)
        _readable(client_ca_file, "ocpp.client_ca_file")
        try:
            ctx.load_verify_locations(cafile=client_ca_file)
        except ssl.SSLError as exc:
            raise TlsSetupError(f"ocpp.client_ca_file: {client_ca_file} holds no PEM CA "
                                f"certificate ({exc.reason or exc})",
                                "ocpp.client_ca_file") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def certificate_names(peercert: dict[str, Any] | None) -> set[str]:
    """The subject CN(s) and SAN DNS names of a verified peer certificate
    (`SSLObject.getpeercert()`); empty without one."""
    if not peercert:
        return set()
    names = {value for rdn in peercert.get("subject", ()) for (name, value) in rdn
             if name == "commonName"}
    names |= {value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"}
    return names


__all__ = ["TlsSetupError", "server_context", "certificate_names"]
