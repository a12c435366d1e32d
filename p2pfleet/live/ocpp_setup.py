"""Builds the OCPP provider (`p2pfleet.vehicle.ocpp`) from the node's [ocpp] and [vehicle]
settings; config.py has already checked each value and their combination."""

from __future__ import annotations

from typing import Any

from ..vehicle.ocpp import OcppProvider, OcppSettings
from ..vehicle.providers import StaticProvider
from .config import Config, ConfigError


def make_ocpp_provider(config: Config) -> OcppProvider:
    """The chargers report parked, plugged in, charging or full, state of charge and energy;
    the network, whether it is metered, the car's charge limit and a daily departure come
    from [vehicle] (a charger cannot know them)."""
    v, o = config.vehicle, config.ocpp
    base: dict[str, Any] = {
        "charge_limit_pct": v.charge_limit_pct, "network": v.network,
        "metered": {"yes": True, "no": False, "unknown": None}[v.metered],
    }
    if v.departure_daily:
        base["departure_daily"] = v.departure_daily
    host, _, port = o.listen.rpartition(":")
    try:
        settings = OcppSettings(charge_point_ids=tuple(o.charge_point_ids), host=host.strip("[]"),
                                port=int(port), password=o.password, heartbeat_s=o.heartbeat_s,
                                silent_after_s=o.silent_after_s)
    except ValueError as exc:
        raise ConfigError(f"[ocpp]: {exc}", key="ocpp") from None
    return OcppProvider(settings, StaticProvider.from_config(base, where="config [vehicle]"))


__all__ = ["make_ocpp_provider"]
