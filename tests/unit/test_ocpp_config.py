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
