"""The node's configuration: one TOML file, every key with a default and a comment.

The settings are declared once, below, as the fields of one frozen dataclass per section
(`NodeSettings`, `HardwareSettings`, ...). Each field carries its default, a comment for
the rendered config file and what values it allows; `SETTINGS` is the same information as a
flat table of `Setting` rows, which everything else (loading, validation, the environment
variable names, `render_config`, `p2pfleet config show`) is derived from.

Where a value comes from, highest precedence first:

1. the command line (`Override`s given to `load_config`),
2. the environment: ``P2PFLEET_<SECTION>_<KEY>``, e.g. ``P2PFLEET_NODE_NETWORK=test``;
   lists are comma-separated, booleans are true/false/yes/no/on/off/1/0,
3. the config file (``<data dir>/config.toml`` unless told otherwise),
4. the defaults declared here.

Environment variables named ``P2PFLEET_<SECTION>_...`` for a known section are reserved: one
that names no setting is an error (a typo must not be silently ignored). Any invalid value,
unknown key or unknown section raises `ConfigError`, naming the key (``section.key``), where
the value came from, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import textwrap
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tomli_w

from ..names import NetworkIdError, check_network

ENV_PREFIX = "P2PFLEET_"
DEFAULT = "default"

# Type names used in the table (derived from the dataclass annotations).
STR, INT, FLOAT, BOOL, LIST = "str", "int", "float", "bool", "list"
_TYPE_OF = {str: STR, int: INT, float: FLOAT, bool: BOOL, tuple[str, ...]: LIST}
_TYPE_WORDS = {STR: "a string", INT: "an integer", FLOAT: "a number", BOOL: "true or false",
               LIST: "a list of strings"}
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class ConfigError(Exception):
    """A configuration value, key, section or file is not acceptable.

    `key` is the dotted setting name (``node.network``) when one is concerned, `source` where
    the value came from (``file /x/config.toml``, ``env P2PFLEET_NODE_NETWORK``,
    ``option --network``), `value` the offending value and `allowed` what would be accepted.
    """

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None,
                 value: Any = None, allowed: str | None = None):
        super().__init__(message)
        self.key = key
        self.source = source
        self.value = value
        self.allowed = allowed


# ---------------------------------------------------------------------------------------------
# Value checks used by the table. Each raises ValueError(reason) for a bad value.

def _check_network(value: str) -> None:
    try:
        check_network(value)
    except NetworkIdError:
        raise ValueError("not a valid network id") from None


def _multiaddr_error(text: str) -> str | None:
    from multiaddr import Multiaddr  # light; a dependency of libp2p

    try:
        Multiaddr(text)
    except Exception as exc:  # the multiaddr package raises several types
        return str(exc).split(" (string:")[0]
    return None


def _check_listen(values: tuple[str, ...]) -> None:
    for i, text in enumerate(values):
        why = _multiaddr_error(text)
        if why is not None:
            raise ValueError(f"item {i + 1} {text!r} is not a multiaddr: {why}")
        if "/p2p/" in text:
            raise ValueError(f"item {i + 1} {text!r}: a listen address names no peer id")


def _check_bootstrap(values: tuple[str, ...]) -> None:
    for i, text in enumerate(values):
        why = _multiaddr_error(text)
        if why is not None:
            raise ValueError(f"item {i + 1} {text!r} is not a multiaddr: {why}")
        if "/p2p/" not in text and not text.startswith("/dnsaddr/"):
            raise ValueError(f"item {i + 1} {text!r} names no peer (add /p2p/<peer id>)")


def _check_peer_ids(values: tuple[str, ...]) -> None:
    from ..identity import key_from_peer_id

    for i, text in enumerate(values):
        try:
            key_from_peer_id(text)
        except ValueError:
            raise ValueError(f"item {i + 1} {text!r} is not an Ed25519 peer id") from None


def _check_hostport(value: str) -> None:
    if not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError("not host:port")


_HEX_RE = re.compile(r"(?:[0-9a-f]{2}){0,32}")


def _check_hw_class(value: str) -> None:
    if not _HEX_RE.fullmatch(value):
        raise ValueError("not lower-case hex of at most 32 bytes")


# ---------------------------------------------------------------------------------------------
# The table.

@dataclass(frozen=True)
class Setting:
    """One row of the settings table."""

    section: str
    key: str
    type: str  # STR, INT, FLOAT, BOOL or LIST
    default: Any
    comment: str
    choices: tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    check: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)
    allowed_text: str | None = None  # what `check` accepts, in words

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def env_var(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.key.upper()}"

    @property
    def allowed(self) -> str:
        """What values are allowed, in words."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        text = self.allowed_text or _TYPE_WORDS[self.type]
        bounds = []
        if self.min is not None:
            bounds.append(f">= {_num(self.min)}")
        if self.max is not None:
            bounds.append(f"<= {_num(self.max)}")
        return text + (" " + " and ".join(bounds) if bounds else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _setting(default: Any, comment: str, *, choices: Iterable[str] | None = None,
             min: float | None = None, max: float | None = None,
             check: Callable[[Any], None] | None = None, allowed: str | None = None) -> Any:
    meta = {"comment": comment, "choices": tuple(choices) if choices is not None else None,
            "min": min, "max": max, "check": check, "allowed_text": allowed}
    return field(default=default, metadata={"p2pfleet": meta})


@dataclass(frozen=True)
class NodeSettings:
    network: str = _setting(
        "main", "The network to join. Nodes only ever talk to nodes of the same network, so "
        "test fleets and the production network never mix.",
        check=_check_network, allowed="1-32 of a-z, 0-9 and '-', starting and ending with a "
        "letter or digit")
    listen: tuple[str, ...] = _setting(
        ("/ip4/0.0.0.0/tcp/4001",), "Multiaddrs to listen on.",
        check=_check_listen, allowed="a list of multiaddrs such as '/ip4/0.0.0.0/tcp/4001'")
    bootstrap: tuple[str, ...] = _setting(
        (), "Peers to contact first, as multiaddrs ending in /p2p/<peer id> (or /dnsaddr/ "
        "names). Empty: only peers found by mDNS (if enabled) or given on the command line.",
        check=_check_bootstrap,
        allowed="a list of multiaddrs ending in /p2p/<peer id>, or /dnsaddr/ names")
    mdns: bool = _setting(
        False, "Find peers on the local network with mDNS (announces this node on the LAN).")
    dht_mode: str = _setting(
        "auto", "DHT mode: 'auto' serves the DHT (and relays for others) once this node is "
        "stable, 'server' always, 'client' never (behind NAT or on a metered link).",
        choices=("auto", "server", "client"))
    dht_server_after_s: float = _setting(
        600.0, "Stable means reachable (AutoNAT) for this long without a flip, seconds; each "
        "drop to unreachable in the last hour doubles it (up to 8 times). 0 together with "
        "dht_server_uptime_s = 0: serve unless found unreachable (a LAN or test fleet).",
        min=0, max=86400)
    dht_server_uptime_s: float = _setting(
        1800.0, "Stable also means in the mesh this long without interruption, seconds.",
        min=0, max=86400)
    log_level: str = _setting(
        "warning", "How much to log.", choices=("error", "warning", "info", "debug"))
    event_log: bool = _setting(
        False, "Write every event the vehicle policy receives, with its decisions, to <data "
        "dir>/logs/events.jsonl, and the ledger's receipt decisions to credit-events.jsonl "
        "beside it (one JSON line each), for `p2pfleet sim replay` or a bug report.")
    info_opt_in: bool = _setting(
        False, "Answer node-info requests from explorers (software version, uptime, "
        "counters). Off: such requests are refused.")
    publish_private_addrs: bool = _setting(
        False, "Put private and loopback addresses in the public capacity record. Only for "
        "test networks on one machine or LAN: on a real network they tell strangers about "
        "your home network.")
    relay_only: bool = _setting(
        False, "Relay-only mode: never publish or hand out this node's own addresses; peers "
        "reach it only through its relay (no AutoNAT dial-back, no hole punching). Peers it "
        "dials itself still see the address it dials from.")
    metrics_listen: str = _setting(
        "127.0.0.1:9464", "Serve Prometheus metrics on this host:port (empty: off). Keep it on "
        "localhost unless a firewall guards it: the page shows the node's state.",
        check=_check_hostport, allowed="empty or host:port, e.g. 127.0.0.1:9464")
    state_jitter_s: float = _setting(
        60.0, "Delay joining the mesh by a random 0..this many seconds after the car becomes "
        "eligible, so the public record is no precise log of when the car is home.",
        min=0, max=3600)
    blob_cache_mb: int = _setting(
        2048, "Most disk space (MiB) for cached models, inputs and outputs in the data "
        "dir's cache/; the least recently used go first, never those in use.", min=16)
    peer_budget_mb_per_minute: float = _setting(
        8.0, "Most bytes (MB, 10^6) one peer may send unasked (gossip, DHT and other requests) "
        "in a minute. A peer over it is cut off and none of its bytes count toward "
        "policy.daily_transfer_cap_mb.", min=0.1, max=10_000)
    peer_budget_mb_per_day: float = _setting(
        64.0, "Most bytes (MB) one peer may send unasked in a day (at least the per-minute "
        "budget).", min=0.1, max=1_000_000)


@dataclass(frozen=True)
class HardwareSettings:
    hw_class: str = _setting(
        "", "Hardware class (hex), a hint publishers use to spread replicas across "
        "hardware. Empty: measured at start.",
        check=_check_hw_class, allowed="empty, or lower-case hex of at most 32 bytes")
    bench: float = _setting(
        0.0, "Benchmark score in samples per second. 0: measured at start.",
        min=0, max=1e9)
    cores: int = _setting(
        0, "CPU cores inference may use. 0: all of them.", min=0, max=4096)
    memory_mb: int = _setting(
        0, "Memory inference may use, in MiB. 0: chosen from the machine's memory.",
        min=0, max=16 * 1024 * 1024)
    max_run_s: float = _setting(
        3600.0, "Longest wall-clock time one lease may run in the sandbox, validation and "
        "loading included, seconds; a longer run ends as a timeout whatever deadline the "
        "publisher set.", min=1, max=7 * 86400)


@dataclass(frozen=True)
class PublishersSettings:
    allow: tuple[str, ...] = _setting(
        (), "Publishers (peer ids) this node works for.",
        check=_check_peer_ids, allowed="a list of Ed25519 peer ids (12D3KooW...)")
    serve_anyone: bool = _setting(
        False, "Also work for publishers not in 'allow' (chosen by their announced jobs "
        "and payment record).")
    unpaid_cap: int = _setting(
        1000, "Stop working for a publisher once this much work (credit units) is "
        "delivered but not yet paid by a receipt.", min=0)
    retry_base_s: float = _setting(
        60.0, "Resend an undelivered result after this long at first, seconds; doubling up "
        "to 4 h. Also the first back-off after a publisher had no work.", min=0.1, max=14400)
    unpaid_time_cap_h: float = _setting(
        4.0, "Also stop working for a publisher once this much compute time (hours) is "
        "delivered but not yet paid by a receipt (a publisher could promise tiny credit).",
        min=0)


@dataclass(frozen=True)
class PublishingSettings:
    request_interval_s: float = _setting(
        10.0, "answer one work request per worker identity this often at most, s.",
        min=0, max=3600)
    min_lease_s: float = _setting(
        600.0, "shortest lease deadline, s (leases last ~3x the expected compute "
        "time, at least this).", min=1, max=86400)
    cross_class_wait_s: float = _setting(
        60.0, "how long a shard waits for a replica from another hardware class "
        "before taking one of the same class, s.", min=0, max=86400)
    announce_interval_s: float = _setting(
        15.0, "re-announce live jobs this often, s.", min=1, max=3600)
    established_results: int = _setting(
        10, "accepted results before a worker identity counts as established "
        "(may compute a shard's second replica).", min=0, max=100000)
    established_age_h: float = _setting(
        24.0, "hours since a worker's first accepted result before it counts as "
        "established.", min=0, max=8760)
    stall_wait_s: float = _setting(
        30.0, "how long a shard that no asking worker may take waits before the publisher "
        "computes it itself (or, with self_compute off, relaxes one replica rule), s.",
        min=0.1, max=86400)
    self_compute: bool = _setting(
        True, "compute audit replicas and stalled shards on this machine (never paid); "
        "off: stalled shards are decided under relaxed replica rules instead.")
    forget_ended_after_s: float = _setting(
        600.0, "let an ended job's records go from the publisher's memory this long after "
        "it ended, s (its status and outputs are then read from the job store; late results "
        "for it are acknowledged and paid nothing).", min=0, max=30 * 86400)


@dataclass(frozen=True)
class RecordsSettings:
    capacity_lifetime_s: int = _setting(
        900, "Lifetime of this node's capacity record in the DHT, seconds. At least 300 "
        "(10x the allowed 30 s clock skew), at most one hour.", min=300, max=3600)
    republish_s: int = _setting(
        300, "Republish the capacity record this often, seconds (and on every state "
        "change). At most half of capacity_lifetime_s.", min=60, max=1800)
    leaving_lifetime_s: int = _setting(
        300, "Lifetime of the short 'leaving' record published when the node leaves the "
        "mesh, seconds (at least 10x the 30 s clock skew).", min=300, max=3600)


def _check_hhmm(value: str) -> None:
    if value and not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
        raise ValueError("not a time of day HH:MM")


def _check_windows(values: tuple[str, ...]) -> None:
    for i, text in enumerate(values):
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d", text):
            raise ValueError(f"item {i + 1} {text!r} is not a window HH:MM-HH:MM")


@dataclass(frozen=True)
class VehicleSettings:
    provider: str = _setting(
        "static", "Where the node learns the car's state: 'static' (the values below), "
        "'trace' (replay a trace file, specs/vehicle-trace-format.md), 'vehicle_api' (the "
        "car maker's API, [vehicle_api]), 'json_command' or 'json_endpoint' (a program or "
        "URL printing the state as JSON, [json_source]), 'power_supply' (this machine's "
        "battery and mains, [power_supply]), 'ocpp' (your charger, [ocpp]); "
        "specs/vehicle-providers.md.",
        choices=("static", "trace", "vehicle_api", "json_command", "json_endpoint",
                 "power_supply", "ocpp"))
    trace: str = _setting(
        "", "Trace file for provider 'trace': a path, builtin:<name> for a shipped trace "
        "(commuter-day, flappy-plug, metered-network, hot-day), or survey:<car> for one of "
        "the 200 shipped survey car-weeks (0-199, docs/traces.md).")
    trace_speedup: float = _setting(
        1.0, "Replay speed of the trace (60: an hour per minute; for tests and demos).",
        min=0.001, max=1e6)
    parked: bool = _setting(True, "Static provider: the car is parked.")
    plugged_in: bool = _setting(True, "Static provider: the car is plugged in.")
    soc_pct: float = _setting(80.0, "Static provider: state of charge, %.", min=0, max=100)
    charge_limit_pct: float = _setting(
        90.0, "Static provider: the car's own charge limit, %.", min=1, max=100)
    network: str = _setting(
        "ethernet", "The network the node is on (static provider; the live providers too, "
        "unless their source reports it).",
        choices=("wifi", "ethernet", "cellular", "none"))
    metered: str = _setting(
        "unknown", "Is the network metered? 'unknown' counts as metered, so the node computes "
        "only once you say 'no' (static and live providers, as for network).",
        choices=("yes", "no", "unknown"))
    departure_daily: str = _setting(
        "", "Static provider: planned daily departure, local HH:MM (empty: none).",
        check=_check_hhmm, allowed="empty or HH:MM")


@dataclass(frozen=True)
class VehicleApiSettings:
    base_url: str = _setting(
        "", "The Tesla Fleet API's regional base URL, e.g. "
        "https://fleet-api.prd.eu.vn.cloud.tesla.com (Europe) or "
        "https://fleet-api.prd.na.vn.cloud.tesla.com (North America).")
    vehicle: str = _setting("", "The car's VIN (or Fleet API vehicle id).")
    token_file: str = _setting(
        "", "File holding the Fleet API access token, mode 0600 (refused if others can read "
        "it). Read before every request, so a refresher may replace it.")
    poll_s: float = _setting(
        60.0, "Ask whether the car is online, asleep or offline this often, s (never wakes it).",
        min=1, max=3600)
    idle_poll_s: float = _setting(
        1800.0, "Read an awake car that is neither charging nor driving at most this often, s, "
        "so it can fall asleep (it needs about 15 min without data requests).", min=60,
        max=86400)
    asleep_max_age_s: float = _setting(
        43200.0, "How long a sleeping car's last reading holds, s (a car cannot be driven or "
        "unplugged without waking).", min=0, max=7 * 86400)
    timeout_s: float = _setting(20.0, "Longest time for one read, s.", min=1, max=300)


@dataclass(frozen=True)
class JsonSourceSettings:
    command: tuple[str, ...] = _setting(
        (), "Provider 'json_command': the command and its arguments (no shell), printing one "
        "JSON object of vehicle state fields (specs/vehicle-providers.md).")
    url: str = _setting(
        "", "Provider 'json_endpoint': the http:// or https:// URL answering that object.")
    interval_s: float = _setting(30.0, "Read it this often, s.", min=0.2, max=3600)
    timeout_s: float = _setting(10.0, "Longest time for one read, s.", min=0.1, max=300)
    max_kb: int = _setting(64, "Largest answer, KiB.", min=1, max=1024)


@dataclass(frozen=True)
class PowerSupplySettings:
    root: str = _setting(
        "/sys/class/power_supply", "The kernel's power_supply class directory.")
    interval_s: float = _setting(10.0, "Read it this often, s.", min=1, max=3600)


@dataclass(frozen=True)
class PolicySettings:
    battery_floor_pct: float = _setting(
        60.0, "Compute only with the battery at or above this %. The floor used is at most "
        "the car's charge limit minus charge_limit_margin_pct, so it never flaps at the limit.",
        min=0, max=100)
    charge_limit_margin_pct: float = _setting(
        5.0, "How far below the car's charge limit the floor must sit, %.", min=0, max=50)
    max_battery_temp_c: float = _setting(40.0, "Stop above this battery temperature, C.",
                                         min=-40, max=100)
    max_cabin_temp_c: float = _setting(45.0, "Stop above this cabin temperature, C.",
                                       min=-40, max=100)
    require_unmetered: bool = _setting(
        True, "Compute only on a network known to be unmetered (never burn mobile data).")
    quiet_hours: tuple[str, ...] = _setting(
        (), "Local time windows without computing, e.g. [\"22:00-06:00\"] (may wrap midnight).",
        check=_check_windows, allowed="a list of HH:MM-HH:MM windows")
    excluded_tariff_windows: tuple[str, ...] = _setting(
        (), "Local time windows of expensive electricity, e.g. [\"17:00-20:00\"].",
        check=_check_windows, allowed="a list of HH:MM-HH:MM windows")
    departure_margin_s: float = _setting(
        3600.0, "Stop this many seconds before the planned departure.", min=0, max=86400)
    resume_after_s: float = _setting(
        300.0, "Start only after all vehicle conditions held this long, seconds (hysteresis).",
        min=0, max=86400)
    cpu_share: float = _setting(
        0.5, "Share of the CPU inference may use (0..1].", min=0.01, max=1)
    max_threads: int = _setting(2, "Most threads inference may use.", min=1, max=1024)
    daily_energy_budget_wh: float = _setting(
        2000.0, "Energy the node may use per day, Wh (0: no budget). Estimated as "
        "power_w x cpu_share x busy time unless the car or charger meters it.", min=0)
    daily_transfer_cap_mb: float = _setting(
        500.0, "Bytes the node may send and receive per day, MB (0: no cap).", min=0)
    power_w: float = _setting(
        60.0, "The computer's draw at full load, W (for energy estimates).", min=1, max=100000)
    leaving_flush_cap_kb: int = _setting(
        64, "KiB the node may send to flush results and receipts while leaving.", min=0,
        max=1048576)


def _check_ocpp_password(value: str) -> None:
    if value and not (16 <= len(value) <= 40 and value.isprintable() and value.isascii()):
        raise ValueError("not 16 to 40 printable ASCII characters (OCPP security profile 1)")


def _check_cp_ids(values: tuple[str, ...]) -> None:
    for i, text in enumerate(values):
        if not 1 <= len(text) <= 48 or "/" in text or " " in text or not text.isprintable():
            raise ValueError(f"item {i + 1} {text!r} is not a charge point id")
    if len(set(values)) != len(values):
        raise ValueError("an id is listed twice")


@dataclass(frozen=True)
class OcppSettings:
    listen: str = _setting(
        "127.0.0.1:9000", "Provider 'ocpp': where the node's OCPP central system listens "
        "for your charger, host:port. Loopback by default: give your home network address "
        "(and a password) so the charger can reach it.",
        check=_check_hostport, allowed="host:port, e.g. 192.168.1.20:9000")
    charge_point_ids: tuple[str, ...] = _setting(
        (), "The charge point ids of your chargers (as set in each charger). Any other id is "
        "refused at the handshake.", check=_check_cp_ids,
        allowed="a list of ids of 1-48 printable characters, no '/' or space")
    password: str = _setting(
        "", "HTTP Basic auth password the charger must send (OCPP security profiles 1 and "
        "2, the charger's AuthorizationKey). Required with profile 2, and with profile 1 "
        "unless listen is a loopback address; unused with profile 3.",
        check=_check_ocpp_password, allowed="empty, or 16 to 40 printable ASCII characters")
    security_profile: int = _setting(
        1, "OCPP security profile: 1 ws:// and the password (in clear: warned about beyond "
        "loopback), 2 wss:// (TLS) and the password, 3 wss:// and a client certificate "
        "whose CN is the charge point id.", min=1, max=3)
    tls_cert_file: str = _setting(
        "", "Profiles 2 and 3: the node's TLS certificate, PEM (the chargers must trust it).")
    tls_key_file: str = _setting("", "Profiles 2 and 3: its private key, PEM, mode 0600.")
    client_ca_file: str = _setting(
        "", "Profile 3: the CA certificate(s), PEM, that sign your chargers' certificates.")
    heartbeat_s: int = _setting(
        60, "Heartbeat interval the charger is asked for, seconds.", min=10, max=3600)
    silent_after_s: float = _setting(
        180.0, "A charger silent this long leaves the car without a state (the node stops "
        "computing), seconds; above heartbeat_s.", min=20, max=86400)


SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "hardware": HardwareSettings,
    "publishers": PublishersSettings,
    "publishing": PublishingSettings,
    "records": RecordsSettings,
    "vehicle": VehicleSettings,
    "vehicle_api": VehicleApiSettings,
    "json_source": JsonSourceSettings,
    "power_supply": PowerSupplySettings,
    "policy": PolicySettings,
    "ocpp": OcppSettings,
}

SECTION_COMMENTS: dict[str, str] = {
    "node": "The node on the network.",
    "hardware": "What this machine offers. Measured at start where left at 0 or empty.",
    "publishers": "Whom this node computes for.",
    "publishing": "When you publish jobs ('p2pfleet job ...'): how the publisher schedules.",
    "records": "Records this node publishes in the DHT.",
    "vehicle": "Where the car's state comes from.",
    "vehicle_api": "Provider 'vehicle_api': the Tesla Fleet API (specs/vehicle-providers.md).",
    "json_source": "Providers 'json_command' and 'json_endpoint': any source printing JSON.",
    "power_supply": "Provider 'power_supply': this machine's battery and mains (Linux).",
    "policy": "When the car may compute. The node never drains, heats or burns data.",
    "ocpp": "Provider 'ocpp': your charger reports the car (specs/vehicle-providers.md).",
}


def _build_table() -> tuple[Setting, ...]:
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata["p2pfleet"]
            rows.append(Setting(section=section, key=f.name, type=_TYPE_OF[hints[f.name]],
                                default=f.default, **meta))
    return tuple(rows)


SETTINGS: tuple[Setting, ...] = _build_table()
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
BY_ENV: dict[str, Setting] = {s.env_var: s for s in SETTINGS}


def setting(name: str) -> Setting:
    """The table row for ``section.key``; ConfigError (with a suggestion) if unknown."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown setting {name!r}{_suggest_name(name)}", key=name,
                          allowed="one of " + ", ".join(BY_NAME)) from None


# ---------------------------------------------------------------------------------------------
# The result.

@dataclass(frozen=True)
class Config:
    """The effective configuration: typed, immutable, with where each value came from."""

    node: NodeSettings = field(default_factory=NodeSettings)
    hardware: HardwareSettings = field(default_factory=HardwareSettings)
    publishers: PublishersSettings = field(default_factory=PublishersSettings)
    publishing: PublishingSettings = field(default_factory=PublishingSettings)
    records: RecordsSettings = field(default_factory=RecordsSettings)
    vehicle: VehicleSettings = field(default_factory=VehicleSettings)
    vehicle_api: VehicleApiSettings = field(default_factory=VehicleApiSettings)
    json_source: JsonSourceSettings = field(default_factory=JsonSourceSettings)
    power_supply: PowerSupplySettings = field(default_factory=PowerSupplySettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    ocpp: OcppSettings = field(default_factory=OcppSettings)
    # "section.key" -> "default" | "file <path>" | "env <VAR>" | "option <--opt>"
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(
        {name: DEFAULT for name in BY_NAME}), compare=False, repr=False)
    file: Path | None = field(default=None, compare=False)  # the file read, if any

    def get(self, name: str) -> Any:
        s = setting(name)
        return getattr(getattr(self, s.section), s.key)

    def source(self, name: str) -> str:
        setting(name)
        return self.sources.get(name, DEFAULT)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (lists, not tuples), e.g. for JSON or TOML."""
        out: dict[str, dict[str, Any]] = {}
        for s in SETTINGS:
            value = self.get(s.name)
            out.setdefault(s.section, {})[s.key] = list(value) if s.type == LIST else value
        return out


def defaults() -> Config:
    return Config()


@dataclass(frozen=True)
class Override:
    """A value given on the command line, with the option that gave it (for messages)."""

    value: Any
    option: str = "command line"


# ---------------------------------------------------------------------------------------------
# Parsing and validation of single values.

def describe_source(source: str) -> str:
    """A source tag ("env X", "file P", "option --x", "default") in words."""
    kind, _, rest = source.partition(" ")
    if kind == "env":
        return f"environment variable {rest}"
    if kind == "file":
        return rest
    return source


def _fail(s: Setting, value: Any, source: str, reason: str) -> ConfigError:
    return ConfigError(f"{s.name} = {_show(value)} (from {describe_source(source)}): {reason}; "
                       f"allowed: {s.allowed}",
                       key=s.name, source=source, value=value, allowed=s.allowed)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _typed(s: Setting, value: Any, source: str) -> Any:
    """Check a value that already has a type (TOML, or a typed command-line value)."""
    t = s.type
    if t == BOOL:
        ok = type(value) is bool
    elif t == INT:
        ok = type(value) is int
    elif t == FLOAT:
        ok = type(value) in (int, float)
        if ok:
            value = float(value)
            if not math.isfinite(value):
                raise _fail(s, value, source, "must be a finite number")
    elif t == STR:
        ok = type(value) is str
    else:  # LIST
        ok = isinstance(value, (list, tuple)) and all(type(v) is str for v in value)
        if ok:
            value = tuple(value)
    if not ok:
        hint = ""
        if isinstance(value, str) and t != STR:
            hint = " (remove the quotes)"
        elif t == LIST and isinstance(value, str):
            hint = ' (write a list: ["..."])'
        raise _fail(s, value, source,
                    f"expected {_TYPE_WORDS[t]}, got {type(value).__name__}{hint}")
    return value


def _from_text(s: Setting, text: str, source: str) -> Any:
    """Parse a string from the environment or the command line."""
    t = s.type
    raw = text.strip()
    if t == STR:
        return text
    if t == LIST:
        return tuple(item.strip() for item in text.split(",") if item.strip())
    if t == BOOL:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _fail(s, text, source, "not a boolean (true/false, yes/no, on/off, 1/0)")
    try:
        value: Any = int(raw, 10) if t == INT else float(raw)
    except ValueError:
        raise _fail(s, text, source, f"not {_TYPE_WORDS[t]}") from None
    if t == FLOAT and not math.isfinite(value):
        raise _fail(s, text, source, "must be a finite number")
    return value


def _check(s: Setting, value: Any, source: str, raw: Any = None) -> Any:
    """Range, choice and custom checks of a typed value; returns the value.

    `raw`: the value as given (a string from the environment), shown in errors."""
    shown = value if raw is None else raw
    if s.choices is not None and value not in s.choices:
        raise _fail(s, shown, source, "not an allowed value")
    if s.min is not None and value < s.min:
        raise _fail(s, shown, source, f"too small (minimum {_num(s.min)})")
    if s.max is not None and value > s.max:
        raise _fail(s, shown, source, f"too large (maximum {_num(s.max)})")
    if s.check is not None:
        try:
            s.check(value)
        except ValueError as exc:
            raise _fail(s, shown, source, str(exc)) from None
    return value


def validate_value(name: str, value: Any, source: str = "command line") -> Any:
    """Parse (if a string for a non-string setting) and check one value; returns it typed."""
    s = setting(name)
    if isinstance(value, str) and s.type != STR:
        return _check(s, _from_text(s, value, source), source, raw=value)
    return _check(s, _typed(s, value, source), source)


# ---------------------------------------------------------------------------------------------
# Layers.

def closest_setting(name: str) -> Setting | None:
    """The setting a mistyped ``section.key`` most likely meant, if any."""
    section, _, key = name.partition(".")
    if section in SECTIONS and key:
        keys = [f.name for f in dataclasses.fields(SECTIONS[section])]
        match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        if match:
            return BY_NAME[f"{section}.{match[0]}"]
    if key:  # the right key in the wrong section?
        for s in SETTINGS:
            if s.key == key:
                return s
    match = difflib.get_close_matches(name, list(BY_NAME), n=1, cutoff=0.6)
    return BY_NAME[match[0]] if match else None


def _suggest_name(name: str) -> str:
    s = closest_setting(name)
    return f" (did you mean {s.name}?)" if s is not None else ""


def parse_config_text(text: str, source: str = "config file") -> dict[str, Any]:
    """The settings a config file's text sets: {"section.key": typed value}.

    Raises ConfigError for TOML syntax errors, unknown sections or keys, and bad values.
    `source` names the file in messages ("file /x/config.toml").
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}", source=source) from None
    problems: list[str] = []
    unknown: list[str] = []
    for section, table in data.items():
        if section not in SECTIONS:
            if isinstance(table, dict):
                match = difflib.get_close_matches(section, list(SECTIONS), n=1, cutoff=0.6)
                hint = f" (did you mean [{match[0]}]?)" if match else ""
                problems.append(f"unknown section [{section}]{hint}")
            else:
                problems.append(f"key {section!r} must be inside a section"
                                f"{_suggest_name('.' + section)}")
            unknown.append(section)
            continue
        if not isinstance(table, dict):
            problems.append(f"{section} must be a section ([{section}]), not a value")
            unknown.append(section)
            continue
        for key in table:
            if f"{section}.{key}" not in BY_NAME:
                problems.append(f"unknown key {section}.{key}{_suggest_name(f'{section}.{key}')}")
                unknown.append(f"{section}.{key}")
    if problems:
        known = ", ".join(SECTIONS)
        raise ConfigError(f"{source}: " + "; ".join(problems) + f" (sections: {known})",
                          key=", ".join(unknown), source=source,
                          allowed="the keys listed by 'p2pfleet config default'")
    values: dict[str, Any] = {}
    for section, table in data.items():
        for key, raw in table.items():
            s = BY_NAME[f"{section}.{key}"]
            values[s.name] = _check(s, _typed(s, raw, source), source)
    return values


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The settings a config file sets (see `parse_config_text`)."""
    path = Path(path)
    source = f"file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text", source=source) from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read it ({exc.strerror})", source=source) from None
    return parse_config_text(text, source)


def env_values(env: Mapping[str, str] | None = None) -> dict[str, tuple[Any, str]]:
    """Settings given in the environment: {"section.key": (typed value, "env VAR")}."""
    env = os.environ if env is None else env
    out: dict[str, tuple[Any, str]] = {}
    prefixes = {f"{ENV_PREFIX}{sec.upper()}_": sec for sec in SECTIONS}
    for var in sorted(env):
        s = BY_ENV.get(var)
        if s is None:
            for prefix, section in prefixes.items():
                if var.startswith(prefix):
                    key = var[len(prefix):].lower()
                    near = closest_setting(f"{section}.{key}")
                    hint = f" (did you mean {near.env_var}?)" if near is not None else ""
                    raise ConfigError(
                        f"environment variable {var} names no setting{hint}",
                        key=f"{section}.{key}", source=f"env {var}",
                        allowed=", ".join(x.env_var for x in SETTINGS if x.section == section))
            continue
        source = f"env {var}"
        out[s.name] = (_check(s, _from_text(s, env[var], source), source, raw=env[var]), source)
    return out


def _override_values(overrides: Mapping[str, Any] | None) -> dict[str, tuple[Any, str]]:
    out: dict[str, tuple[Any, str]] = {}
    for name, given in (overrides or {}).items():
        ov = given if isinstance(given, Override) else Override(given)
        source = "command line" if ov.option == "command line" else f"option {ov.option}"
        out[setting(name).name] = (validate_value(name, ov.value, source), source)
    return out


def _cross_check(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    if values["vehicle.provider"] == "ocpp":
        _check_ocpp(values, sources)
    if values["node.relay_only"] and values["node.mdns"]:
        raise ConfigError(
            f"node.relay_only = true (from {describe_source(sources['node.relay_only'])}) and "
            f"node.mdns = true (from {describe_source(sources['node.mdns'])}): mDNS announces "
            "this node's address on the LAN, which relay-only mode never does; turn one off",
            key="node.mdns", source=sources["node.mdns"], value=True, allowed="false")
    life, rep = values["records.capacity_lifetime_s"], values["records.republish_s"]
    if rep * 2 > life:
        s = BY_NAME["records.republish_s"]
        rep_from = describe_source(sources["records.republish_s"])
        life_from = describe_source(sources["records.capacity_lifetime_s"])
        raise ConfigError(
            f"records.republish_s = {rep} (from {rep_from}) must be at most half of "
            f"records.capacity_lifetime_s = {life} (from {life_from}), so a record is renewed "
            f"before it expires; allowed: {s.allowed} and <= capacity_lifetime_s / 2",
            key=s.name, source=sources["records.republish_s"], value=rep,
            allowed=f"<= {life // 2}")


def _check_ocpp(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    if not values["ocpp.charge_point_ids"]:
        raise ConfigError(
            "vehicle.provider = 'ocpp' but ocpp.charge_point_ids is empty: name your charger's "
            "charge point id", key="ocpp.charge_point_ids",
            source=sources["ocpp.charge_point_ids"], value=(), allowed="a list of ids")
    host = values["ocpp.listen"].rpartition(":")[0].strip("[]")
    if values["ocpp.security_profile"] == 1 and not values["ocpp.password"] \
            and host not in ("127.0.0.1", "::1", "localhost"):
        raise ConfigError(
            f"ocpp.listen = {values['ocpp.listen']!r} is not loopback, so ocpp.password must "
            "be set (the charger's AuthorizationKey, OCPP security profile 1): anyone on that "
            "network could otherwise pose as your charger", key="ocpp.password",
            source=sources["ocpp.password"], value="", allowed="a password")
    _check_ocpp_tls(values, sources)
    if values["ocpp.silent_after_s"] <= values["ocpp.heartbeat_s"]:
        raise ConfigError(
            f"ocpp.silent_after_s = {values['ocpp.silent_after_s']:g} must be above "
            f"ocpp.heartbeat_s = {values['ocpp.heartbeat_s']}", key="ocpp.silent_after_s",
            source=sources["ocpp.silent_after_s"], value=values["ocpp.silent_after_s"],
            allowed=f"> {values['ocpp.heartbeat_s']}")


def _check_ocpp_tls(values: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    profile = values["ocpp.security_profile"]
    rules = (  # (wrong, key, why, allowed)
        (profile >= 2 and not values["ocpp.tls_cert_file"], "ocpp.tls_cert_file",
         "names no file: TLS needs the node's certificate", "a PEM file"),
        (profile >= 2 and not values["ocpp.tls_key_file"], "ocpp.tls_key_file",
         "names no file: TLS needs the certificate's private key", "a PEM file, mode 0600"),
        (profile == 3 and not values["ocpp.client_ca_file"], "ocpp.client_ca_file",
         "names no file: profile 3 checks chargers' certificates against it", "a PEM file"),
        (profile == 2 and not values["ocpp.password"], "ocpp.password",
         "must be set: profile 2 is TLS plus the charger's password", "a password"),
        (profile == 3 and bool(values["ocpp.password"]), "ocpp.password",
         "is not used with profile 3 (the client certificate authenticates the charger): "
         "leave it empty", "empty"),
        (profile == 1 and any(values[k] for k in ("ocpp.tls_cert_file", "ocpp.tls_key_file",
                                                  "ocpp.client_ca_file")),
         "ocpp.security_profile", "is 1 (no TLS) but TLS files are set: set 2 or 3, or remove "
         "them", "2 or 3"),
    )
    for wrong, key, why, allowed in rules:
        if wrong:
            raise ConfigError(f"ocpp.security_profile = {profile}: {key} {why}", key=key,
                              source=sources[key], value=values[key], allowed=allowed)


def build_config(file_values: Mapping[str, Any] | None = None, *, file: Path | None = None,
                 env: Mapping[str, str] | None = None,
                 overrides: Mapping[str, Any] | None = None) -> Config:
    """Merge defaults < file values < environment < overrides into a Config."""
    values = {s.name: s.default for s in SETTINGS}
    sources = {s.name: DEFAULT for s in SETTINGS}
    file_source = f"file {file}" if file is not None else "config file"
    for name, value in (file_values or {}).items():
        values[name] = value
        sources[name] = file_source
    for layer in (env_values(env), _override_values(overrides)):
        for name, (value, source) in layer.items():
            values[name] = value
            sources[name] = source
    _cross_check(values, sources)
    sections = {
        section: cls(**{k: values[f"{section}.{k}"] for k in (f.name for f in dataclasses.fields(cls))})
        for section, cls in SECTIONS.items()
    }
    return Config(**sections, sources=MappingProxyType(sources), file=file)


def load_config(path: Path | str | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None, missing_ok: bool = True) -> Config:
    """The effective configuration.

    `path`: the config file (None: none). A missing file means "all defaults" unless
    `missing_ok` is false. `env`: the environment (default os.environ). `overrides`:
    {"section.key": value or Override(value, "--option")} from the command line; string
    values are parsed like environment values.
    """
    file_values: dict[str, Any] = {}
    file: Path | None = None
    if path is not None:
        path = Path(path)
        if path.exists() or not missing_ok:
            file_values = read_config_file(path)
            file = path
    return build_config(file_values, file=file, env=env, overrides=overrides)


# ---------------------------------------------------------------------------------------------
# Rendering.

HEADER = """\
# p2pfleet node configuration.
#
# Every setting is listed with its comment and its default. Lines starting with '# key ='
# show a default; remove the '# ' and change the value to set it. Unknown keys are errors.
#
# A setting can also come from the environment, P2PFLEET_<SECTION>_<KEY> (for example
# P2PFLEET_NODE_NETWORK=test; lists comma-separated), or from the command line.
# Precedence: command line > environment > this file > defaults.
# 'p2pfleet config show' prints the effective values and where each came from;
# 'p2pfleet config check' validates this file.
"""


def toml_value(value: Any) -> str:
    """A value as TOML (lists on one line when short)."""
    if isinstance(value, (list, tuple)):
        items = [toml_value(v) for v in value]
        one = "[" + ", ".join(items) + "]"
        if len(one) <= 72:
            return one
        return "[\n" + "".join(f"    {item},\n" for item in items) + "]"
    return tomli_w.dumps({"v": value}).strip()[len("v = "):]


def render_config(values: Mapping[str, Any] | None = None, *,
                  commented_defaults: bool = True) -> str:
    """The fully commented config file.

    Keys in `values` ({"section.key": value}) are written as set; every other key shows its
    default, commented out (or set, if `commented_defaults` is false). Loading the result
    gives `values` over the defaults.
    """
    values = dict(values or {})
    for name in values:
        setting(name)
    out = [HEADER]
    for section in SECTIONS:
        out.append(f"\n[{section}]\n")
        out.append(f"# {SECTION_COMMENTS[section]}\n")
        for s in (x for x in SETTINGS if x.section == section):
            out.append("\n")
            for line in textwrap.wrap(s.comment, 88):
                out.append(f"# {line}\n")
            about = f"Allowed: {s.allowed}."
            if s.name in values or not commented_defaults:  # the default is not shown below
                about += f" Default: {' '.join(toml_value(s.default).split())}."
            for line in textwrap.wrap(f"{about} Env: {s.env_var}", 88):
                out.append(f"# {line}\n")
            if s.name in values:
                out.append(f"{s.key} = {toml_value(validate_value(s.name, values[s.name]))}\n")
            else:
                line = f"{s.key} = {toml_value(s.default)}"
                if commented_defaults:
                    line = "\n".join("# " + ln for ln in line.split("\n"))
                out.append(line + "\n")
    return "".join(out)


__all__ = [
    "BY_ENV", "BY_NAME", "Config", "ConfigError", "HardwareSettings", "NodeSettings",
    "Override", "PublishersSettings", "RecordsSettings", "SECTIONS", "SETTINGS", "Setting",
    "build_config", "closest_setting", "defaults", "describe_source", "env_values",
    "load_config", "parse_config_text",
    "read_config_file", "render_config", "setting", "toml_value", "validate_value",
]
