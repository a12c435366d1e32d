"""The OCPP provider: the node as a small local OCPP central system (1.6J and 2.0.1) for
the owner's charger(s), turning what they report into the car's state (specs/vehicle-providers.md).

charger.py   what one charger said (a plain state machine, no I/O, time passed in)
server.py    the websocket server, in its own thread and asyncio loop (the `ocpp` package)
provider.py  OcppProvider: the VehicleProvider the node polls, and the server's lifetime
"""

from .charger import ChargerTracker, ChargerView, ChargerViolation, OcppServerError
from .provider import OcppProvider, OcppSettings

# server.py (the `ocpp` package and websockets) loads when the provider runs
__all__ = ["ChargerTracker", "ChargerView", "ChargerViolation", "OcppProvider",
           "OcppSettings", "OcppServerError"]
