"""Builds the live vehicle state providers from the node's config (`vehicle.provider` and
its section), with errors that name the key to fix (specs/vehicle-providers.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..vehicle.generic import JsonCommandProvider, JsonEndpointProvider
from ..vehicle.live import PolledProvider
from ..vehicle.power_supply import PowerSupplyProvider
from ..vehicle.tesla import FleetApiProvider
from .config import Config, ConfigError

LIVE_PROVIDERS = ("vehicle_api", "json_command", "json_endpoint", "power_supply")


def _need(value: str | tuple, key: str, what: str) -> None:
    if not value:
        raise ConfigError(f"vehicle.provider needs {key}: {what}", key=key, value=value)


def link_defaults(config: Config) -> dict[str, Any]:
    """The node's own network and metering, for sources that do not report them."""
    v = config.vehicle
    return {"network": v.network, "metered": {"yes": True, "no": False, "unknown": None}[v.metered]}


def make_live_provider(config: Config) -> PolledProvider:
    kind = config.vehicle.provider
    defaults = link_defaults(config)
    try:
        if kind == "vehicle_api":
            a = config.vehicle_api
            _need(a.base_url, "vehicle_api.base_url", "the Fleet API's regional base URL")
            _need(a.vehicle, "vehicle_api.vehicle", "the car's VIN")
            _need(a.token_file, "vehicle_api.token_file", "the file holding the access token")
            return FleetApiProvider(a.base_url, a.vehicle, Path(a.token_file).expanduser(),
                                    poll_s=a.poll_s, idle_poll_s=a.idle_poll_s,
                                    asleep_max_age_s=a.asleep_max_age_s, timeout_s=a.timeout_s,
                                    defaults=defaults)
        j = config.json_source
        if kind == "json_command":
            _need(j.command, "json_source.command", "the command (and arguments) to run")
            return JsonCommandProvider(j.command, interval_s=j.interval_s, timeout_s=j.timeout_s,
                                       max_bytes=j.max_kb * 1024, defaults=defaults)
        if kind == "json_endpoint":
            _need(j.url, "json_source.url", "the URL to read")
            return JsonEndpointProvider(j.url, interval_s=j.interval_s, timeout_s=j.timeout_s,
                                        max_bytes=j.max_kb * 1024, defaults=defaults)
        if kind == "power_supply":
            p = config.power_supply
            root = Path(p.root).expanduser()
            if not root.is_dir():
                raise ConfigError(f"power_supply.root {p.root!r} is not a directory (this "
                                  "machine has no power_supply class?)", key="power_supply.root",
                                  value=p.root)
            return PowerSupplyProvider(root, interval_s=p.interval_s, defaults=defaults)
    except ValueError as exc:  # a value the provider refuses (a malformed URL, ...)
        section = {"vehicle_api": "vehicle_api", "power_supply": "power_supply"}.get(kind, "json_source")
        raise ConfigError(f"[{section}]: {exc}", key=section) from None
    raise ConfigError(f"vehicle.provider {kind!r} is not a live provider", key="vehicle.provider",
                      value=kind, allowed=", ".join(LIVE_PROVIDERS))


__all__ = ["LIVE_PROVIDERS", "make_live_provider", "link_defaults"]
