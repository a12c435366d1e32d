"""Certificates made by the test itself (the `cryptography` package) for the OCPP TLS
tests: a CA, the node's server certificate for 127.0.0.1, chargers' client certificates
(CN = charge point id) signed by that CA or self-signed, written as PEM files (keys 0600)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, data: bytes, mode: int) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def make_cert(directory: Path, name: str, cn: str, *, issuer: Pem | None = None,
              ca: bool = False, server_ip: str | None = None) -> Pem:
    """A P-256 certificate for `cn`, signed by `issuer` (self-signed without one), written
    as <name>.pem and <name>-key.pem (0600) in `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    if issuer is None:
        sign_key, issuer_name = key, _name(cn)
    else:
        sign_key = serialization.load_pem_private_key(issuer.key.read_bytes(), None)
        issuer_name = x509.load_pem_x509_certificate(issuer.cert.read_bytes()).subject
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server_ip is not None:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(server_ip)), x509.DNSName("localhost")]),
            critical=False)
    cert = b.sign(sign_key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    return Pem(
        cert=_write(directory / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM),
                    0o644),
        key=_write(directory / f"{name}-key.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), 0o600))


@dataclass(frozen=True)
class Pki:
    """The owner's PKI for one test: the node's certificate (signed by `ca`) and a CA for
    chargers' certificates."""

    directory: Path
    ca: Pem
    server: Pem

    def client(self, cp_id: str, *, self_signed: bool = False) -> Pem:
        return make_cert(self.directory, f"client-{cp_id}-{'self' if self_signed else 'ca'}",
                         cp_id, issuer=None if self_signed else self.ca)

    def charger_context(self, client: Pem | None = None) -> ssl.SSLContext:
        """What a charger uses: trusts the node's CA, presents `client` if given."""
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        if client is not None:
            ctx.load_cert_chain(client.cert, client.key)
        return ctx


def make_pki(directory: Path) -> Pki:
    ca = make_cert(directory, "ca", "p2pfleet test CA", ca=True)
    server = make_cert(directory, "node", "p2pfleet-node", issuer=ca, server_ip="127.0.0.1")
    return Pki(directory, ca, server)
