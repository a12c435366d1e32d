"""[ocpp] settings: what an owner writes to point a charger at the node, and clear errors
naming the key when it is wrong."""

from __future__ import annotations

import pytest

from p2pfleet.live.config import ConfigError, build_config, parse_config_text
from p2pfleet.live.ocpp_setup import make_ocpp_provider
from p2pfleet.vehicle.ocpp import OcppProvider


def config(text: str):
    return build_config(parse_config_text(text), env={})


def test_a_charger_on_loopback_needs_only_its_id():
    c = config('[vehicle]\nprovider = "ocpp"\nnetwork = "wifi"\nmetered = "no"\n'
               '[ocpp]\ncharge_point_ids = ["CP1"]\n')
    p = make_ocpp_provider(c)
    assert isinstance(p, OcppProvider)
    assert (p.settings.host, p.settings.port, p.settings.password) == ("127.0.0.1", 9000, "")
    assert p.base.state_at(0).network == "wifi"


def test_listening_beyond_loopback_needs_a_password():
    with pytest.raises(ConfigError, match="ocpp.listen = '192.168.1.20:9000' is not loopback, "
                                          "so ocpp.password must be set") as e:
        config('[vehicle]\nprovider = "ocpp"\n[ocpp]\nlisten = "192.168.1.20:9000"\n'
               'charge_point_ids = ["CP1"]\n')
    assert e.value.key == "ocpp.password"
    c = config('[vehicle]\nprovider = "ocpp"\n[ocpp]\nlisten = "192.168.1.20:9000"\n'
               'charge_point_ids = ["CP1"]\npassword = "0123456789abcdef"\n')
    assert make_ocpp_provider(c).settings.host == "192.168.1.20"


@pytest.mark.parametrize("body, key, words", [
    ('charge_point_ids = []', "ocpp.charge_point_ids", "ocpp.charge_point_ids is empty"),
    ('charge_point_ids = ["a/b"]', "ocpp.charge_point_ids", "not a charge point id"),
    ('charge_point_ids = ["A", "A"]', "ocpp.charge_point_ids", "listed twice"),
    ('charge_point_ids = ["A"]\nlisten = "nowhere"', "ocpp.listen", "host:port"),
    ('charge_point_ids = ["A"]\nheartbeat_s = 300\nsilent_after_s = 200',
     "ocpp.silent_after_s", "must be above ocpp.heartbeat_s"),
    ('charge_point_ids = ["A"]\nport = 9000', "ocpp.port", "unknown key ocpp.port"),
])
def test_bad_ocpp_settings_name_the_key(body, key, words):
    with pytest.raises(ConfigError, match=words) as e:
        config(f'[vehicle]\nprovider = "ocpp"\n[ocpp]\n{body}\n')
    assert key in (e.value.key or "")


TLS = '[vehicle]\nprovider = "ocpp"\n[ocpp]\ncharge_point_ids = ["CP1"]\n'


@pytest.mark.parametrize("body, key, words", [
    ('security_profile = 4', "ocpp.security_profile", "security_profile"),
    ('security_profile = 2\npassword = "0123456789abcdef"\ntls_key_file = "k.pem"',
     "ocpp.tls_cert_file", "security_profile = 2: ocpp.tls_cert_file names no file"),
    ('security_profile = 2\npassword = "0123456789abcdef"\ntls_cert_file = "c.pem"',
     "ocpp.tls_key_file", "ocpp.tls_key_file names no file"),
    ('security_profile = 2\ntls_cert_file = "c.pem"\ntls_key_file = "k.pem"',
     "ocpp.password", "ocpp.password must be set: profile 2 is TLS plus"),
    ('security_profile = 3\ntls_cert_file = "c.pem"\ntls_key_file = "k.pem"',
     "ocpp.client_ca_file", "ocpp.client_ca_file names no file"),
    ('security_profile = 3\ntls_cert_file = "c.pem"\ntls_key_file = "k.pem"\n'
     'client_ca_file = "ca.pem"\npassword = "0123456789abcdef"',
     "ocpp.password", "ocpp.password is not used with profile 3"),
    ('tls_cert_file = "c.pem"', "ocpp.security_profile", "is 1 \\(no TLS\\) but TLS files"),
])
def test_security_profile_settings_name_the_key(body, key, words):
    with pytest.raises(ConfigError, match=words) as e:
        config(TLS + body + "\n")
    assert e.value.key == key


def test_tls_files_are_checked_when_the_provider_is_made(tmp_path):
    cert, key = tmp_path / "node.pem", tmp_path / "node-key.pem"
    cert.write_text("not checked before the key's mode\n")
    key.write_text("secret\n")
    key.chmod(0o644)
    c = config(TLS + f'listen = "192.168.1.20:9000"\nsecurity_profile = 3\n'
               f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
               f'client_ca_file = "{tmp_path / "ca.pem"}"\n')  # beyond loopback, no password
    with pytest.raises(ConfigError, match=f"ocpp.tls_key_file: {key} has mode 0644") as e:
        make_ocpp_provider(c)
    assert e.value.key == "ocpp.tls_key_file"
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="not a PEM certificate and its matching") as e:
        make_ocpp_provider(c)
    assert e.value.key == "ocpp.tls_cert_file"


def test_profile_1_beyond_loopback_is_allowed_with_a_warning(caplog):
    c = config(TLS + 'listen = "192.168.1.20:9000"\npassword = "0123456789abcdef"\n')
    make_ocpp_provider(c)
    assert "password crosses your network in clear" in caplog.text
    caplog.clear()
    make_ocpp_provider(config(TLS))
    assert "in clear" not in caplog.text
