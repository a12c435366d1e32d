from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from p2pfleet.live import config as C
from p2pfleet.live.config import Config, ConfigError, Override, load_config, parse_config_text
from p2pfleet.identity import Identity

PEER = Identity.from_seed(b"publisher").peer_id
PEER2 = Identity.from_seed(b"publisher-2").peer_id


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


# --- the table --------------------------------------------------------------------------------

def test_every_setting_has_a_comment_a_valid_default_and_an_env_var():
    assert len(C.SETTINGS) == len(BAD_FILE_VALUES)
    for s in C.SETTINGS:
        assert s.comment.strip(), s.name
        assert C.validate_value(s.name, s.default) == s.default
        assert s.env_var == f"P2PFLEET_{s.section.upper()}_{s.key.upper()}"
        assert s.allowed


def test_defaults_are_typed_and_frozen():
    cfg = load_config(None, env={})
    assert cfg == Config() == C.defaults()
    assert cfg.node.network == "main"
    assert cfg.node.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert cfg.node.bootstrap == () and cfg.node.mdns is False
    assert cfg.node.dht_mode == "auto" and cfg.node.log_level == "warning"
    assert cfg.hardware.bench == 0.0 and isinstance(cfg.hardware.bench, float)
    assert cfg.publishers.unpaid_cap == 1000
    assert cfg.records.capacity_lifetime_s == 900 and cfg.records.republish_s == 300
    assert all(cfg.source(s.name) == "default" for s in C.SETTINGS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node.network = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.node = C.NodeSettings()  # type: ignore[misc]
    assert cfg.to_dict()["node"]["listen"] == ["/ip4/0.0.0.0/tcp/4001"]


# --- precedence: command line > environment > file > defaults --------------------------------

PRECEDENCE = [
    # name, file (TOML), env text, cli value, expected file / env / cli values
    ("node.network", '"filenet"', "envnet", "clinet", "filenet", "envnet", "clinet"),
    ("node.listen", '["/ip4/127.0.0.1/tcp/1"]', "/ip4/127.0.0.1/tcp/2, /ip4/127.0.0.1/tcp/3",
     ["/ip4/127.0.0.1/tcp/4"], ("/ip4/127.0.0.1/tcp/1",),
     ("/ip4/127.0.0.1/tcp/2", "/ip4/127.0.0.1/tcp/3"), ("/ip4/127.0.0.1/tcp/4",)),
    ("node.mdns", "true", "no", "yes", True, False, True),
    ("hardware.bench", "12", "3.5", 7.25, 12.0, 3.5, 7.25),
    ("hardware.cores", "2", "4", "8", 2, 4, 8),
    ("publishers.allow", f'["{PEER}"]', f"{PEER},{PEER2}", [PEER2], (PEER,), (PEER, PEER2),
     (PEER2,)),
    ("node.dht_mode", '"client"', "server", "auto", "client", "server", "auto"),
]


@pytest.mark.parametrize("name,file_v,env_v,cli_v,want_file,want_env,want_cli", PRECEDENCE,
                         ids=[p[0] for p in PRECEDENCE])
def test_precedence(tmp_path, name, file_v, env_v, cli_v, want_file, want_env, want_cli):
    s = C.BY_NAME[name]
    path = write(tmp_path, f"[{s.section}]\n{s.key} = {file_v}\n")
    env = {s.env_var: env_v}
    cli = {name: Override(cli_v, "--opt")}

    assert load_config(tmp_path / "missing.toml", env={}).get(name) == s.default

    cfg = load_config(path, env={})
    assert cfg.get(name) == want_file and cfg.source(name) == f"file {path}"
    assert cfg.file == path

    cfg = load_config(path, env=env)
    assert cfg.get(name) == want_env and cfg.source(name) == f"env {s.env_var}"

    cfg = load_config(path, env=env, overrides=cli)
    assert cfg.get(name) == want_cli and cfg.source(name) == "option --opt"

    cfg = load_config(None, env={}, overrides={name: cli_v})  # cli over defaults alone
    assert cfg.get(name) == want_cli and cfg.source(name) == "command line"

    others = [x.name for x in C.SETTINGS if x.name != name]
    assert all(cfg.source(o) == "default" for o in others)


def test_env_list_and_bool_forms():
    env = {"P2PFLEET_NODE_BOOTSTRAP": "", "P2PFLEET_NODE_MDNS": "ON",
           "P2PFLEET_NODE_INFO_OPT_IN": "0", "P2PFLEET_PUBLISHERS_SERVE_ANYONE": "True"}
    cfg = load_config(None, env=env)
    assert cfg.node.bootstrap == () and cfg.source("node.bootstrap") == "env P2PFLEET_NODE_BOOTSTRAP"
    assert cfg.node.mdns is True and cfg.node.info_opt_in is False
    assert cfg.publishers.serve_anyone is True


def test_unrelated_env_vars_are_ignored():
    cfg = load_config(None, env={"P2PFLEET_DATA_DIR": "/x", "PATH": "/bin", "P2PFLEETX": "1"})
    assert cfg == Config()


def test_missing_file_is_defaults_unless_required(tmp_path):
    assert load_config(tmp_path / "nope.toml", env={}).file is None
    with pytest.raises(ConfigError, match="nope.toml: cannot read it"):
        load_config(tmp_path / "nope.toml", env={}, missing_ok=False)


# --- validation errors name the key, the source, the value and what is allowed ----------------

BAD_FILE_VALUES = {
    "node.network": ('"Main Net"', "1-32 of a-z"),
    "node.listen": ('["/ip4/300.0.0.1/tcp/1"]', "multiaddrs"),
    "node.bootstrap": ('["/ip4/1.2.3.4/tcp/4001"]', "/p2p/<peer id>"),
    "node.mdns": ('"yes"', "true or false"),
    "node.dht_mode": ('"fast"', "one of 'auto', 'server', 'client'"),
    "node.log_level": ('"trace"', "one of 'error', 'warning', 'info', 'debug'"),
    "node.info_opt_in": ("1", "true or false"),
    "hardware.hw_class": ('"XYZ"', "hex of at most 32 bytes"),
    "hardware.bench": ("-1.0", "a number >= 0"),
    "hardware.cores": ("-2", "an integer >= 0 and <= 4096"),
    "hardware.memory_mb": ("1.5", "an integer >= 0"),
    "hardware.max_run_s": ("0.5", "a number >= 1 and <= 604800"),
    "publishers.allow": ('["not-a-peer"]', "Ed25519 peer ids"),
    "publishers.serve_anyone": ('"false"', "true or false"),
    "publishers.unpaid_cap": ("-5", "an integer >= 0"),
    "publishers.retry_base_s": ("0", ">= 0.1"),
    "node.event_log": ('"sometimes"', "true or false"),
    "publishing.request_interval_s": ("-1", ">= 0"),
    "publishing.min_lease_s": ("0", ">= 1"),
    "publishing.cross_class_wait_s": ("-1", ">= 0"),
    "publishing.announce_interval_s": ("0", ">= 1"),
    "publishing.established_results": ("-1", "an integer >= 0"),
    "publishing.established_age_h": ("-1", ">= 0"),
    "publishing.stall_wait_s": ("0", ">= 0.1"),
    "publishing.self_compute": ('"maybe"', "true or false"),
    "publishing.forget_ended_after_s": ("-1", ">= 0"),
    "publishers.unpaid_time_cap_h": ("-1", "a number >= 0"),
    "records.capacity_lifetime_s": ("60", "an integer >= 300 and <= 3600"),
    "records.republish_s": ("5", "an integer >= 60"),
    "records.leaving_lifetime_s": ("30", "an integer >= 300"),
    "node.publish_private_addrs": ('"no"', "true or false"),
    "node.relay_only": ('"no"', "true or false"),
    "node.state_jitter_s": ("-1", "a number >= 0"),
    "node.dht_server_after_s": ("-5", "a number >= 0"),
    "node.dht_server_uptime_s": ("86401", "<= 86400"),
    "node.blob_cache_mb": ("8", "an integer >= 16"),
    "node.peer_budget_mb_per_minute": ("0", "a number >= 0.1 and <= 10000"),
    "node.peer_budget_mb_per_day": ("0.01", "a number >= 0.1"),
    "node.metrics_listen": ('"localhost"', "empty or host:port"),
    "vehicle.provider": ('"obd"', "one of 'static', 'trace'"),
    "vehicle.trace": ("3", "a string"),
    "vehicle.trace_speedup": ("0", "a number >= 0.001"),
    "vehicle.parked": ('"yes"', "true or false"),
    "vehicle.plugged_in": ("0", "true or false"),
    "vehicle.soc_pct": ("101", "a number >= 0 and <= 100"),
    "vehicle.charge_limit_pct": ("0", "a number >= 1 and <= 100"),
    "vehicle.network": ('"5g"', "one of 'wifi', 'ethernet', 'cellular', 'none'"),
    "vehicle.metered": ("false", "one of 'yes', 'no', 'unknown'"),
    "vehicle.departure_daily": ('"7:30"', "empty or HH:MM"),
    "vehicle_api.base_url": ("1", "a string"),
    "vehicle_api.vehicle": ("[]", "a string"),
    "vehicle_api.token_file": ("false", "a string"),
    "vehicle_api.poll_s": ("0.5", "a number >= 1 and <= 3600"),
    "vehicle_api.idle_poll_s": ("10", "a number >= 60"),
    "vehicle_api.asleep_max_age_s": ("-1", "a number >= 0"),
    "vehicle_api.timeout_s": ("0", "a number >= 1"),
    "json_source.command": ('"cat x"', "a list of strings"),
    "json_source.url": ("80", "a string"),
    "json_source.interval_s": ("0", "a number >= 0.2"),
    "json_source.timeout_s": ("1000", "<= 300"),
    "json_source.max_kb": ("0", "an integer >= 1"),
    "power_supply.root": ("1", "a string"),
    "power_supply.interval_s": ("0", "a number >= 1"),
    "ocpp.listen": ('"nowhere"', "host:port"),
    "ocpp.charge_point_ids": ('["a b"]', "a list of ids"),
    "ocpp.password": ('"short"', "16 to 40 printable ASCII"),
    "ocpp.heartbeat_s": ("1", "an integer >= 10"),
    "ocpp.silent_after_s": ("1", "a number >= 20"),
    "ocpp.security_profile": ("0", "an integer >= 1 and <= 3"),
    "ocpp.tls_cert_file": ("1", "a string"),
    "ocpp.tls_key_file": ("[]", "a string"),
    "ocpp.client_ca_file": ("false", "a string"),
    "policy.battery_floor_pct": ("120", "a number >= 0 and <= 100"),
    "policy.charge_limit_margin_pct": ("60", "a number >= 0 and <= 50"),
    "policy.max_battery_temp_c": ('"hot"', "a number"),
    "policy.max_cabin_temp_c": ("200", "<= 100"),
    "policy.require_unmetered": ('"true"', "true or false"),
    "policy.quiet_hours": ('["22-06"]', "HH:MM-HH:MM windows"),
    "policy.excluded_tariff_windows": ('"17:00-20:00"', "HH:MM-HH:MM windows"),
    "policy.departure_margin_s": ("-5", "a number >= 0"),
    "policy.resume_after_s": ("1e9", "<= 86400"),
    "policy.cpu_share": ("0", "a number >= 0.01 and <= 1"),
    "policy.max_threads": ("0", "an integer >= 1"),
    "policy.daily_energy_budget_wh": ("-1", "a number >= 0"),
    "policy.daily_transfer_cap_mb": ("-1", "a number >= 0"),
    "policy.power_w": ("0", "a number >= 1"),
    "policy.leaving_flush_cap_kb": ("1.5", "an integer >= 0"),
}


def test_bad_values_cover_every_setting():
    assert set(BAD_FILE_VALUES) == set(C.BY_NAME)


@pytest.mark.parametrize("name", sorted(BAD_FILE_VALUES))
def test_bad_file_value_is_named(tmp_path, name):
    s = C.BY_NAME[name]
    raw, allowed = BAD_FILE_VALUES[name]
    path = write(tmp_path, f"[{s.section}]\n{s.key} = {raw}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    err = info.value
    msg = str(err)
    assert name in msg and str(path) in msg and allowed in msg, msg
    assert err.key == name and err.source == f"file {path}" and err.allowed == s.allowed


@pytest.mark.parametrize("name,text", [
    ("node.dht_mode", "fast"), ("hardware.cores", "many"), ("hardware.bench", "nan"),
    ("node.mdns", "maybe"), ("records.capacity_lifetime_s", "10"), ("node.network", "UPPER"),
    ("publishers.allow", "12D3KooWnope"),
])
def test_bad_env_value_is_named(name, text):
    s = C.BY_NAME[name]
    with pytest.raises(ConfigError) as info:
        load_config(None, env={s.env_var: text})
    msg = str(info.value)
    assert name in msg and f"environment variable {s.env_var}" in msg
    assert repr(text) in msg and s.allowed in msg
    assert info.value.value == text


def test_bad_option_value_is_named():
    with pytest.raises(ConfigError) as info:
        load_config(None, env={}, overrides={"node.log_level": Override("loud", "--set node.log_level")})
    msg = str(info.value)
    assert "node.log_level = 'loud'" in msg and "option --set node.log_level" in msg
    assert "one of 'error', 'warning', 'info', 'debug'" in msg


def test_wrong_toml_type_hints():
    with pytest.raises(ConfigError, match=r"expected an integer, got str \(remove the quotes\)"):
        parse_config_text('[hardware]\ncores = "4"\n')
    with pytest.raises(ConfigError, match=r"expected a list of strings, got str"):
        parse_config_text('[node]\nlisten = "/ip4/0.0.0.0/tcp/1"\n')
    with pytest.raises(ConfigError, match="expected an integer, got bool"):
        parse_config_text("[hardware]\ncores = true\n")
    assert parse_config_text("[hardware]\nbench = 3\n") == {"hardware.bench": 3.0}


def test_republish_must_be_at_most_half_the_lifetime(tmp_path):
    path = write(tmp_path, "[records]\ncapacity_lifetime_s = 300\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"P2PFLEET_RECORDS_REPUBLISH_S": "200"})
    msg = str(info.value)
    assert "records.republish_s = 200" in msg and "records.capacity_lifetime_s = 300" in msg
    assert "environment variable P2PFLEET_RECORDS_REPUBLISH_S" in msg and str(path) in msg
    assert load_config(path, env={"P2PFLEET_RECORDS_REPUBLISH_S": "150"}).records.republish_s == 150


# --- unknown keys and sections ----------------------------------------------------------------

@pytest.mark.parametrize("text,expect", [
    ('[node]\nnetwrok = "x"\n', "unknown key node.netwrok (did you mean node.network?)"),
    ("[hardware]\nmdns = true\n", "unknown key hardware.mdns (did you mean node.mdns?)"),
    ("[publishers]\nalow = []\n", "did you mean publishers.allow?"),
    ("[nodes]\nnetwork = 'x'\n", "unknown section [nodes] (did you mean [node]?)"),
    ("network = 'x'\n", "key 'network' must be inside a section (did you mean node.network?)"),
    ("[zzz]\n", "unknown section [zzz] (sections: node, hardware, publishers, publishing, records, vehicle, "),
])
def test_unknown_keys_are_errors_with_suggestions(text, expect):
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, "file /x/config.toml")
    assert expect in str(info.value)
    assert str(info.value).startswith("file /x/config.toml: ")


def test_all_unknown_keys_are_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_config_text("[node]\nfoo = 1\nbar = 2\n")
    assert "node.foo" in str(info.value) and "node.bar" in str(info.value)
    assert info.value.key == "node.foo, node.bar"


def test_unknown_env_var_in_a_section_namespace_is_an_error():
    with pytest.raises(ConfigError, match="P2PFLEET_NODE_NETWRK names no setting "
                                          r"\(did you mean P2PFLEET_NODE_NETWORK\?\)"):
        load_config(None, env={"P2PFLEET_NODE_NETWRK": "x"})


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown setting 'node.log_levle' \(did you mean node.log_level\?\)"):
        load_config(None, env={}, overrides={"node.log_levle": "info"})


def test_toml_syntax_error_names_the_file(tmp_path):
    path = write(tmp_path, "[node\nnetwork = 1\n")
    with pytest.raises(ConfigError, match=f"file {path}: not valid TOML"):
        load_config(path, env={})


# --- rendering --------------------------------------------------------------------------------

def test_rendered_default_config_round_trips(tmp_path):
    text = C.render_config()
    assert parse_config_text(text) == {}  # every default is shown commented out
    assert load_config(write(tmp_path, text), env={}) == Config()
    for s in C.SETTINGS:
        assert f"# {s.key} = " in text and s.env_var in text and f"[{s.section}]" in text
        assert s.comment.split()[0] in text

    full = C.render_config(commented_defaults=False)
    values = parse_config_text(full)
    assert set(values) == set(C.BY_NAME)
    assert C.build_config(values) == Config()
    assert all(C.BY_NAME[n].default == v for n, v in values.items())


def test_rendered_config_with_values(tmp_path):
    chosen = {"node.network": "test", "publishers.allow": [PEER, PEER2],
              "publishers.serve_anyone": True, "hardware.bench": 2.5}
    text = C.render_config(chosen)
    assert parse_config_text(text) == {"node.network": "test", "publishers.allow": (PEER, PEER2),
                                       "publishers.serve_anyone": True, "hardware.bench": 2.5}
    flat = " ".join(line.lstrip("# ") for line in text.splitlines())
    assert 'Default: "main".' in flat  # a set key still shows its default in the comment
    cfg = load_config(write(tmp_path, text), env={})
    assert cfg.node.network == "test" and cfg.publishers.allow == (PEER, PEER2)
    with pytest.raises(ConfigError, match="node.network"):
        C.render_config({"node.network": "Bad!"})


def test_relay_only_and_mdns_exclude_each_other():
    with pytest.raises(ConfigError, match="node.relay_only = true .* node.mdns = true .*mDNS "
                                          "announces this node's address"):
        C.build_config(overrides={"node.relay_only": True, "node.mdns": True})
    assert C.build_config(overrides={"node.relay_only": True}).node.relay_only
