"""Builds the OCPP provider (`p2pfleet.vehicle.ocpp`) from the node's [ocpp] and [vehicle]
settings; config.py has already checked each value and their combination."""

from __future__ import annotations

import logging
from typing import Any

from ..vehicle.ocpp import OcppProvider, OcppSettings
from ..vehicle.ocpp.tls import TlsSetupError
from ..vehicle.providers import StaticProvider
from .config import Config, ConfigError

log = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "::1", "localhost")


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
                                silent_after_s=o.silent_after_s,
                                security_profile=o.security_profile,
                                tls_cert_file=o.tls_cert_file, tls_key_file=o.tls_key_file,
                                client_ca_file=o.client_ca_file)
        provider = OcppProvider(settings,
                                StaticProvider.from_config(base, where="config [vehicle]"))
    except TlsSetupError as exc:
        raise ConfigError(str(exc), key=exc.key) from None
    except ValueError as exc:
        raise ConfigError(f"[ocpp]: {exc}", key="ocpp") from None
    if o.security_profile == 1 and settings.host not in LOOPBACK:
        # Allowed (most home wallboxes offer nothing else) but said: see specs, section 7.
        log.warning("ocpp.security_profile = 1 on %s: the charger's password crosses your "
                    "network in clear, and whoever reads it can pose as the charger; use "
                    "security_profile = 2 if the charger supports it", o.listen)
    return provider


__all__ = ["make_ocpp_provider"]
