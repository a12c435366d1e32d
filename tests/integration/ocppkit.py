"""A simulated OCPP 1.6J charge point for tests, built with the `ocpp` package's own
ChargePoint class over a real websocket. It runs in a thread with its own asyncio loop;
every method blocks until the central system answered, so it can be driven from plain
pytest code or from trio through `trio.to_thread.run_sync`."""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
from datetime import datetime, timezone
from typing import Any

from ocpp.v16 import ChargePoint, call

TIMEOUT_S = 10.0


def _ts() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class SimCharger:
    def __init__(self, url: str, cp_id: str, password: str = "", subprotocol: str = "ocpp1.6",
                 ssl_context: ssl.SSLContext | None = None):
        """`ssl_context` for a wss:// url: the CA the charger trusts and, for security
        profile 3, its client certificate."""
        self.url, self.cp_id, self.password, self.subprotocol = url, cp_id, password, subprotocol
        self.ssl_context = ssl_context
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.ws: Any = None
        self.cp: ChargePoint | None = None
        self._reader: Any = None

    def _run(self, coro: Any, timeout: float = TIMEOUT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # --- connection -----------------------------------------------------------------------
    def connect(self) -> None:
        """Open the websocket; raises websockets' InvalidStatus if the handshake is refused."""
        self._run(self._connect())

    async def _connect(self) -> None:
        from websockets.asyncio.client import connect

        headers = {}
        if self.password:
            token = base64.b64encode(f"{self.cp_id}:{self.password}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        self.ws = await connect(f"{self.url}/{self.cp_id}", subprotocols=[self.subprotocol],
                                additional_headers=headers, open_timeout=TIMEOUT_S,
                                **({"ssl": self.ssl_context} if self.ssl_context else {}))
        self.cp = ChargePoint(self.cp_id, self.ws)
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            await self.cp.start()
        except Exception:  # closed
            pass

    def close(self) -> None:
        if self.ws is not None:
            try:
                self._run(self.ws.close())
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def closed(self) -> bool:
        from websockets.protocol import State

        return self.ws is None or self.ws.protocol.state is State.CLOSED

    # --- messages -------------------------------------------------------------------------
    def send(self, payload: Any) -> Any:
        """One Call; returns the CallResult payload, or None for a CallError."""
        return self._run(self.cp.call(payload))

    def send_raw(self, text: str | bytes) -> None:
        self._run(self.ws.send(text))

    def boot(self) -> Any:
        return self.send(call.BootNotification(charge_point_model="Sim",
                                               charge_point_vendor="p2pfleet"))

    def heartbeat(self) -> Any:
        return self.send(call.Heartbeat())

    def status(self, status: str, connector_id: int = 1, error_code: str = "NoError") -> Any:
        return self.send(call.StatusNotification(connector_id=connector_id, error_code=error_code,
                                                 status=status, timestamp=_ts()))

    def start_transaction(self, meter_start: int, connector_id: int = 1) -> int:
        r = self.send(call.StartTransaction(connector_id=connector_id, id_tag="car",
                                            meter_start=meter_start, timestamp=_ts()))
        return r.transaction_id

    def stop_transaction(self, tx: int, meter_stop: int) -> Any:
        return self.send(call.StopTransaction(meter_stop=meter_stop, timestamp=_ts(),
                                              transaction_id=tx))

    def meter(self, tx: int | None, *, wh: float | None = None, w: float | None = None,
              soc: float | None = None, connector_id: int = 1) -> Any:
        sampled = []
        if wh is not None:
            sampled.append({"value": str(wh), "measurand": "Energy.Active.Import.Register",
                            "unit": "Wh"})
        if w is not None:
            sampled.append({"value": str(w), "measurand": "Power.Active.Import", "unit": "W"})
        if soc is not None:
            sampled.append({"value": str(soc), "measurand": "SoC", "unit": "Percent"})
        kw = {"transaction_id": tx} if tx is not None else {}
        return self.send(call.MeterValues(connector_id=connector_id,
                                          meter_value=[{"timestamp": _ts(),
                                                        "sampled_value": sampled}], **kw))


class SimCharger201(SimCharger):
    """The same over OCPP 2.0.1 (StatusNotification for the plug, TransactionEvent for the
    rest); one EVSE with one connector."""

    def __init__(self, url: str, cp_id: str, password: str = "",
                 ssl_context: ssl.SSLContext | None = None):
        super().__init__(url, cp_id, password, subprotocol="ocpp2.0.1", ssl_context=ssl_context)
        self.seq = 0

    async def _connect(self) -> None:
        from ocpp.v201 import ChargePoint as ChargePoint201

        await super()._connect()
        self._reader.cancel()
        self.cp = ChargePoint201(self.cp_id, self.ws)
        self._reader = asyncio.ensure_future(self._read())

    def boot(self) -> Any:
        from ocpp.v201 import call as c201

        return self.send(c201.BootNotification(
            charging_station={"model": "Sim", "vendor_name": "p2pfleet"}, reason="PowerUp"))

    def heartbeat(self) -> Any:
        from ocpp.v201 import call as c201

        return self.send(c201.Heartbeat())

    def connector(self, status: str, evse_id: int = 1) -> Any:
        from ocpp.v201 import call as c201

        return self.send(c201.StatusNotification(timestamp=_ts(), connector_status=status,
                                                 evse_id=evse_id, connector_id=1))

    def event(self, event_type: str, tx: str, state: str | None = None, *,
              wh: float | None = None, w: float | None = None, soc: float | None = None,
              evse_id: int = 1) -> Any:
        from ocpp.v201 import call as c201

        sampled = []
        if wh is not None:
            sampled.append({"value": wh, "measurand": "Energy.Active.Import.Register",
                            "unitOfMeasure": {"unit": "Wh"}})
        if w is not None:
            sampled.append({"value": w, "measurand": "Power.Active.Import"})
        if soc is not None:
            sampled.append({"value": soc, "measurand": "SoC", "unitOfMeasure": {"unit": "Percent"}})
        info = {"transaction_id": tx, **({"charging_state": state} if state else {})}
        self.seq += 1
        kw = {"meter_value": [{"timestamp": _ts(), "sampled_value": sampled}]} if sampled else {}
        return self.send(c201.TransactionEvent(
            event_type=event_type, timestamp=_ts(), trigger_reason="ChargingStateChanged",
            seq_no=self.seq, transaction_info=info, evse={"id": evse_id, "connector_id": 1},
            **kw))
