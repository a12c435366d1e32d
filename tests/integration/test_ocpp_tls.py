"""OCPP security profiles 2 and 3 over real TLS: the provider's central system with
certificates the test makes (certkit.py), and a simulated charge point (ocppkit.py)
connecting over wss://. Each refusal leaves the charger unconnected and the server up."""

from __future__ import annotations

import ssl

import pytest
import trio
from websockets.exceptions import InvalidMessage, InvalidStatus

from certkit import Pki, make_pki
from ocppkit import SimCharger, SimCharger201
from p2pfleet.vehicle.ocpp import OcppProvider, OcppSettings
from p2pfleet.vehicle.ocpp.tls import TlsSetupError, server_context
from p2pfleet.vehicle.providers import StaticProvider

PASSWORD = "correct-horse-battery"


def base() -> StaticProvider:
    return StaticProvider.from_config({"charge_limit_pct": 80.0, "network": "wifi",
                                       "metered": False})


@pytest.fixture
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki")


async def start(nursery: trio.Nursery, pki: Pki, profile: int) -> tuple[OcppProvider, str]:
    extra = {"password": PASSWORD} if profile == 2 else {"client_ca_file": str(pki.ca.cert)}
    settings = OcppSettings(charge_point_ids=("CP1", "CP2"), port=0, security_profile=profile,
                            tls_cert_file=str(pki.server.cert),
                            tls_key_file=str(pki.server.key), **extra)
    provider = OcppProvider(settings, base())
    host, port = await nursery.start(provider.run)
    return provider, f"wss://{host}:{port}/ocpp"


async def connect(charger: SimCharger) -> SimCharger:
    await trio.to_thread.run_sync(charger.connect)
    return charger


async def refused(charger: SimCharger) -> BaseException:
    """The connection attempt fails; what the client saw."""
    try:
        await trio.to_thread.run_sync(charger.connect)
    except Exception as exc:  # noqa: BLE001 - TLS alert, reset or HTTP status
        return exc
    finally:
        await trio.to_thread.run_sync(charger.close)
    raise AssertionError("the connection was accepted")


def never_connected(p: OcppProvider) -> bool:
    return "CP1 has not connected yet" in p.unavailable_why(0) and not p.system._current


async def test_profile_2_takes_the_password_over_tls_only(pki):
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, pki, 2)
        ctx = pki.charger_context()

        e = await refused(SimCharger(url, "CP1", "wrong-password-123", ssl_context=ctx))
        assert isinstance(e, InvalidStatus) and e.response.status_code == 401
        e = await refused(SimCharger(url, "CP1", ssl_context=ctx))
        assert isinstance(e, InvalidStatus) and e.response.status_code == 401
        # plain ws:// to the TLS listener: no handshake, no HTTP, nothing connects
        e = await refused(SimCharger(url.replace("wss://", "ws://"), "CP1", PASSWORD))
        assert isinstance(e, InvalidMessage), e
        assert never_connected(p)

        c = await connect(SimCharger(url, "CP1", PASSWORD, ssl_context=ctx))
        try:
            await trio.to_thread.run_sync(c.boot)
            await trio.to_thread.run_sync(c.status, "Preparing")
            s = p.state_at(0)
            assert (s.parked, s.plugged_in) == (True, True)
            tls = c.ws.transport.get_extra_info("ssl_object")
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        finally:
            await trio.to_thread.run_sync(c.close)
        # a TLS 1.2 charger gets one of the OCPP whitepaper's ECDHE-ECDSA AES-GCM suites
        ctx12 = pki.charger_context()
        ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
        c = await connect(SimCharger(url, "CP2", PASSWORD, ssl_context=ctx12))
        try:
            tls = c.ws.transport.get_extra_info("ssl_object")
            assert tls.version() == "TLSv1.2"
            assert tls.cipher()[0] in ("ECDHE-ECDSA-AES128-GCM-SHA256",
                                       "ECDHE-ECDSA-AES256-GCM-SHA384"), tls.cipher()
        finally:
            await trio.to_thread.run_sync(c.close)
        nursery.cancel_scope.cancel()


async def test_a_charger_that_does_not_trust_the_node_does_not_connect(pki, tmp_path):
    other = make_pki(tmp_path / "other")  # the node's certificate is not from this CA
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, pki, 2)
        e = await refused(SimCharger(url, "CP1", PASSWORD, ssl_context=other.charger_context()))
        assert isinstance(e, ssl.SSLCertVerificationError), e
        assert never_connected(p)
        nursery.cancel_scope.cancel()


async def test_profile_3_takes_only_a_certificate_for_the_charge_point_id(pki):
    async with trio.open_nursery() as nursery:
        p, url = await start(nursery, pki, 3)

        # signed by the owner's CA, but for another charge point: HTTP 403
        e = await refused(SimCharger(url, "CP1",
                                     ssl_context=pki.charger_context(pki.client("CP2"))))
        assert isinstance(e, InvalidStatus) and e.response.status_code == 403
        # the right CN, self-signed; and no certificate at all: the TLS handshake fails
        for client, password in ((pki.client("CP1", self_signed=True), ""), (None, ""),
                                 (None, PASSWORD)):  # nor is a password instead
            e = await refused(SimCharger(url, "CP1", password,
                                         ssl_context=pki.charger_context(client)))
            assert isinstance(e, InvalidMessage), e  # closed before any HTTP response
        assert never_connected(p)

        c = await connect(SimCharger201(url, "CP1",
                                        ssl_context=pki.charger_context(pki.client("CP1"))))
        try:
            await trio.to_thread.run_sync(c.boot)
            await trio.to_thread.run_sync(c.connector, "Occupied")
            s = p.state_at(0)
            assert (s.parked, s.plugged_in) == (True, True)
        finally:
            await trio.to_thread.run_sync(c.close)
        nursery.cancel_scope.cancel()


def test_the_key_file_must_be_private_and_every_file_readable(pki, tmp_path):
    ctx = server_context(pki.server.cert, pki.server.key, pki.ca.cert)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED

    pki.server.key.chmod(0o640)
    with pytest.raises(TlsSetupError, match=f"{pki.server.key} has mode 0640") as e:
        server_context(pki.server.cert, pki.server.key)
    assert e.value.key == "ocpp.tls_key_file"
    pki.server.key.chmod(0o600)

    missing = tmp_path / "nope.pem"
    for args, key in (((missing, pki.server.key), "ocpp.tls_cert_file"),
                      ((pki.server.cert, missing), "ocpp.tls_key_file"),
                      ((pki.server.cert, pki.server.key, missing), "ocpp.client_ca_file")):
        with pytest.raises(TlsSetupError, match=f"{missing} does not exist") as e:
            server_context(*args)
        assert e.value.key == key

    other = pki.client("CP1")  # a key that is not the certificate's
    with pytest.raises(TlsSetupError, match="not a PEM certificate and its matching"):
        server_context(pki.server.cert, other.key)
    with pytest.raises(TlsSetupError, match="ocpp.client_ca_file: .* holds no PEM CA"):
        server_context(pki.server.cert, pki.server.key, pki.server.key)
