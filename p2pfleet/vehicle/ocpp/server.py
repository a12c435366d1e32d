"""The node's small OCPP central system (1.6J and 2.0.1): a websocket server for the
owner's chargers.

It runs the `ocpp` package (asyncio, `websockets`) in a thread of its own with its own event
loop (`CentralSystemThread`); the node is trio. The two share only the trackers
(`charger.ChargerTracker`), always under the provider's lock, and the server tells the trio
side that something changed with `TrioToken.run_sync_soon` (thread-safe, never blocks).

Who may connect. The charger connects to ws://<host>:<port>/<charge point id> (any path
prefix; the last segment is the id) with subprotocol `ocpp1.6` or `ocpp2.0.1`. The
handshake is refused with HTTP 404 for an id not in the config, and with 401 unless the
HTTP Basic credentials are `<id>:<password>` when a password is configured (OCPP security
profile 1). With an `ssl_context` the server speaks only TLS (wss://): profile 2 is TLS
plus that password; profile 3 (`client_certs`) needs a client certificate signed by the
owner's CA (checked in the TLS handshake) whose subject CN or a SAN DNS name is the charge
point id of the URL, else HTTP 403 (tls.py). An address refused AUTH_FAILURES times within
AUTH_WINDOW_S gets HTTP 429 until the window passes, so guessing is slow. A newer
connection for an id replaces the older one (chargers reconnect over half-open sockets).

Bounds per connection: frames of at most MAX_FRAME_BYTES, a small receive queue, at most
RATE_PER_S messages per second on average (bursts of RATE_BURST): a charger over that is a
violation and is disconnected. Unparseable frames are violations too (the charger is then
not trusted for `violation_hold_s`); impossible values are answered with a CallError.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hmac
import itertools
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from ocpp.exceptions import NotImplementedError as OCPPNotImplemented
from ocpp.exceptions import NotSupportedError, OCPPError, PropertyConstraintViolationError
from ocpp.messages import MessageType, unpack
from ocpp.routing import on
from ocpp import v16, v201
from ocpp.v16 import call_result
from ocpp.v16.enums import Action, AuthorizationStatus, RegistrationStatus
from ocpp.v201 import call_result as r201
from ocpp.v201.enums import Action as A201

from .charger import ChargerTracker, ChargerViolation, OcppServerError
from .tls import certificate_names

log = logging.getLogger(__name__)
_quiet = logging.getLogger("p2pfleet.vehicle.ocpp.lib")  # the package logs every message
_quiet.setLevel(logging.CRITICAL)

SUBPROTOCOLS = ("ocpp1.6", "ocpp2.0.1")  # in order of preference when a charger offers both
MAX_FRAME_BYTES = 64 * 1024
MAX_QUEUE = 4
RATE_PER_S = 10.0
RATE_BURST = 50.0
AUTH_FAILURES = 5     # refused handshakes from one address within AUTH_WINDOW_S: it waits
AUTH_WINDOW_S = 60.0


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class _Bucket:
    """Token bucket on the loop's monotonic clock."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _Guarded:
    """What every charger connection shares, whatever its OCPP version: the rate limit,
    garbage and unasked answers, and tracker updates under the lock."""

    def __init__(self, cp_id: str, connection: Any, system: "CentralSystemThread"):
        super().__init__(cp_id, connection, logger=_quiet)
        self.system = system
        self.tracker = system.trackers[cp_id]
        self.bucket = _Bucket(system.rate_per_s, system.rate_burst)
        self._last_logged = ""

    def _update(self, fn: Callable[..., Any], *args: Any) -> None:
        """Apply one message to the tracker; an impossible value becomes a CallError."""
        with self.system.lock:
            try:
                fn(self.system.clock(), *args)
            except ChargerViolation as exc:
                err = exc
            else:
                err = None
        self.system.changed()
        if err is not None:
            self._log(f"charger {self.id}: {err}")
            raise PropertyConstraintViolationError(description=str(err)[:200])

    def _log(self, text: str) -> None:
        """A warning per new kind of trouble, not per message (a lying charger repeats)."""
        if text != self._last_logged:
            self._last_logged = text
            log.warning("%s", text)

    async def start(self) -> None:
        while True:
            message = await self._connection.recv()
            if not self.bucket.take():
                why = (f"flooding: more than {self.system.rate_per_s:g} messages/s "
                       f"(burst {self.system.rate_burst:g}); disconnected")
                self._update_quietly(why)
                await self._connection.close(1008, "too many messages")
                return
            await self.route_message(message)

    def _update_quietly(self, why: str) -> None:
        with self.system.lock:
            self.tracker.violated(self.system.clock(), why)
        self.system.changed()
        self._log(f"charger {self.id}: {why}")

    async def route_message(self, raw_msg: Any) -> None:
        try:
            if not isinstance(raw_msg, str):
                raise ValueError("a binary frame (OCPP-J frames are text)")
            msg = unpack(raw_msg)
        except (OCPPError, ValueError) as exc:
            self._update_quietly(f"garbage frame: {str(exc)[:80]}")
            return
        if msg.message_type_id != MessageType.Call:
            return  # the node sends no calls: an answer to none would only queue up unread
        self._action = str(getattr(msg, "action", ""))[:40]
        with self.system.lock:
            self.tracker.heard(self.system.clock())
        await super().route_message(raw_msg)


    async def _handle_call(self, msg: Any) -> Any:
        try:
            return await super()._handle_call(msg)
        except (OCPPNotImplemented, NotSupportedError):
            raise  # an action this node does not handle: answered, not held against it
        except OCPPError as exc:  # the payload does not match the action's schema
            self._update_quietly(f"malformed {self._action}: {str(exc)[:80]}")
            raise


class _ChargePoint16(_Guarded, v16.ChargePoint):
    """OCPP 1.6J: every handler updates the charger's tracker."""

    @on(Action.boot_notification)
    def on_boot(self, charge_point_vendor: str, charge_point_model: str, **_: Any):
        self._update(self.tracker.boot, charge_point_vendor, charge_point_model)
        return call_result.BootNotification(current_time=_now_iso(),
                                            interval=self.system.heartbeat_s,
                                            status=RegistrationStatus.accepted)

    @on(Action.heartbeat)
    def on_heartbeat(self):
        self._update(lambda now: self.tracker.heard(now))
        return call_result.Heartbeat(current_time=_now_iso())

    @on(Action.status_notification)
    def on_status(self, connector_id: int, error_code: str, status: str, **_: Any):
        self._update(self.tracker.status, connector_id, status, error_code)
        return call_result.StatusNotification()

    @on(Action.authorize)
    def on_authorize(self, id_tag: str):
        # The charger is the owner's: the node authorises whoever the charger lets charge.
        return call_result.Authorize(id_tag_info={"status": AuthorizationStatus.accepted})

    @on(Action.start_transaction)
    def on_start(self, connector_id: int, id_tag: str, meter_start: int, timestamp: str,
                 **_: Any):
        tx = next(self.system.tx_ids)
        self._update(self.tracker.start_transaction, connector_id, meter_start, tx)
        return call_result.StartTransaction(transaction_id=tx,
                                            id_tag_info={"status": AuthorizationStatus.accepted})

    @on(Action.stop_transaction)
    def on_stop(self, meter_stop: int, timestamp: str, transaction_id: int, **_: Any):
        self._update(self.tracker.stop_transaction, transaction_id, meter_stop)
        return call_result.StopTransaction()

    @on(Action.meter_values)
    def on_meter_values(self, connector_id: int, meter_value: list, **kw: Any):
        samples = [s for mv in meter_value for s in mv.get("sampled_value", [])]
        self._update(self.tracker.meter_values, connector_id, kw.get("transaction_id"), samples)
        return call_result.MeterValues()

    @on(Action.data_transfer)
    def on_data_transfer(self, vendor_id: str, **_: Any):
        return call_result.DataTransfer(status="UnknownVendorId")

    @on(Action.firmware_status_notification)
    def on_firmware(self, status: str):
        return call_result.FirmwareStatusNotification()

    @on(Action.diagnostics_status_notification)
    def on_diagnostics(self, status: str):
        return call_result.DiagnosticsStatusNotification()


def _samples(meter_value: Any) -> list[dict]:
    if not isinstance(meter_value, list):
        return []
    return [s for mv in meter_value if isinstance(mv, dict)
            for s in mv.get("sampled_value", [])]


class _ChargePoint201(_Guarded, v201.ChargePoint):
    """OCPP 2.0.1: StatusNotification says whether a car is plugged in, TransactionEvent
    what it does (chargingState) and its meter values."""

    @on(A201.boot_notification)
    def on_boot(self, charging_station: dict, reason: str, **_: Any):
        self._update(self.tracker.boot, str(charging_station.get("vendor_name", "")),
                     str(charging_station.get("model", "")))
        return r201.BootNotification(current_time=_now_iso(), interval=self.system.heartbeat_s,
                                     status="Accepted")

    @on(A201.heartbeat)
    def on_heartbeat(self, **_: Any):
        self._update(lambda now: self.tracker.heard(now))
        return r201.Heartbeat(current_time=_now_iso())

    @on(A201.status_notification)
    def on_status(self, timestamp: str, connector_status: str, evse_id: int, connector_id: int,
                  **_: Any):
        self._update(self.tracker.connector_status, evse_id, connector_status)
        return r201.StatusNotification()

    @on(A201.authorize)
    def on_authorize(self, id_token: dict, **_: Any):
        return r201.Authorize(id_token_info={"status": "Accepted"})

    @on(A201.transaction_event)
    def on_transaction_event(self, event_type: str, timestamp: str, trigger_reason: str,
                             seq_no: int, transaction_info: dict, **kw: Any):
        evse = kw.get("evse") or {}
        self._update(self.tracker.transaction_event, evse.get("id", 1), event_type,
                     transaction_info.get("transaction_id"),
                     transaction_info.get("charging_state"), _samples(kw.get("meter_value")))
        return r201.TransactionEvent()

    @on(A201.meter_values)
    def on_meter_values(self, evse_id: int, meter_value: list, **_: Any):
        self._update(self.tracker.meter_values, evse_id, None, _samples(meter_value))
        return r201.MeterValues()

    @on(A201.notify_event)
    def on_notify_event(self, **_: Any):
        return r201.NotifyEvent()

    @on(A201.security_event_notification)
    def on_security_event(self, **_: Any):
        return r201.SecurityEventNotification()

    @on(A201.firmware_status_notification)
    def on_firmware(self, **_: Any):
        return r201.FirmwareStatusNotification()

    @on(A201.log_status_notification)
    def on_log_status(self, **_: Any):
        return r201.LogStatusNotification()


POINTS = {"ocpp1.6": _ChargePoint16, "ocpp2.0.1": _ChargePoint201}


class CentralSystemThread:
    """The websocket server in its own thread and asyncio loop. `start()` returns once it
    listens (or raises OcppServerError); `stop()` closes every connection and joins."""

    def __init__(self, trackers: Mapping[str, ChargerTracker], lock: threading.Lock, *,
                 host: str, port: int, password: str = "", heartbeat_s: int = 60,
                 clock: Callable[[], float] = time.time,
                 on_change: Callable[[], None] = lambda: None,
                 rate_per_s: float = RATE_PER_S, rate_burst: float = RATE_BURST,
                 ssl_context: ssl.SSLContext | None = None, client_certs: bool = False):
        if client_certs and ssl_context is None:
            raise ValueError("client certificates (security profile 3) need an ssl_context")
        self.trackers, self.lock = dict(trackers), lock
        self.host, self.port, self.password = host, port, password
        self.ssl_context, self.client_certs = ssl_context, client_certs
        self.heartbeat_s, self.clock, self.on_change = heartbeat_s, clock, on_change
        self.rate_per_s, self.rate_burst = rate_per_s, rate_burst
        self.tx_ids = itertools.count(int(time.time()) % 1_000_000 * 1000 + 1)
        self.bound: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._current: dict[str, Any] = {}  # id -> its live connection
        self._failures: dict[str, collections.deque] = {}  # address -> refused handshakes
        self.points: dict[str, _Guarded] = {}  # id -> its handler (for tests' eyes)
        self._thread = threading.Thread(target=self._main, name="ocpp-central-system",
                                        daemon=True)

    def changed(self) -> None:
        try:
            self.on_change()
        except Exception:  # noqa: BLE001 - the trio side is gone (shutting down)
            pass

    # --- lifecycle (called from the node's side) ------------------------------------------
    def start(self, timeout: float = 10.0) -> tuple[str, int]:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise OcppServerError(f"OCPP server on {self.host}:{self.port} did not start")
        if self._error is not None:
            raise OcppServerError(f"OCPP server (ocpp.listen) cannot listen on "
                                  f"{self.host}:{self.port}: "
                                  f"{getattr(self._error, 'strerror', None) or self._error}")
        assert self.bound is not None
        return self.bound

    def stop(self, timeout: float = 5.0) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop already ended
                pass
        self._thread.join(timeout)

    # --- the thread -----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        from websockets.asyncio.server import serve

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self._handle, self.host, self.port, subprotocols=list(SUBPROTOCOLS),
                         process_request=self._check_request, max_size=MAX_FRAME_BYTES,
                         max_queue=MAX_QUEUE, open_timeout=10, close_timeout=2,
                         ping_interval=None, logger=_quiet, ssl=self.ssl_context) as server:
            sock = next(iter(server.sockets))
            self.bound = sock.getsockname()[:2]
            self._ready.set()
            await self._stop.wait()

    def _check_request(self, connection: Any, request: Any) -> Any:
        ip = str((connection.remote_address or ("?",))[0])
        if self._failed_recently(ip) >= AUTH_FAILURES:
            return connection.respond(429, "too many failed attempts: wait a minute\n")
        cp_id = request.path.rstrip("/").rsplit("/", 1)[-1]
        if cp_id not in self.trackers:
            log.warning("OCPP: refused unknown charge point id %r", cp_id[:60])
            self._failed(ip)
            return connection.respond(404, "unknown charge point id\n")
        if self.client_certs and not self._cert_is_for(connection, cp_id):
            log.warning("OCPP: refused charge point %s: its client certificate is for "
                        "another id", cp_id)
            self._failed(ip)
            return connection.respond(403, "client certificate is not for this id\n")
        if self.password and not self._authorized(cp_id, request.headers.get("Authorization")):
            log.warning("OCPP: refused charge point %s: wrong or missing credentials", cp_id)
            self._failed(ip)
            response = connection.respond(401, "credentials required\n")
            response.headers["WWW-Authenticate"] = 'Basic realm="p2pfleet"'
            return response
        return None

    @staticmethod
    def _cert_is_for(connection: Any, cp_id: str) -> bool:
        """Profile 3: the verified client certificate names this charge point id."""
        tls = connection.transport.get_extra_info("ssl_object")
        return tls is not None and cp_id in certificate_names(tls.getpeercert())

    def _failed_recently(self, ip: str) -> int:
        times = self._failures.get(ip)
        now = time.monotonic()
        while times and now - times[0] > AUTH_WINDOW_S:
            times.popleft()
        return len(times) if times else 0

    def _failed(self, ip: str) -> None:
        """Count a refused handshake; guessing passwords gets slow (bounded memory)."""
        if ip not in self._failures and len(self._failures) >= 256:
            del self._failures[next(iter(self._failures))]
        self._failures.setdefault(ip, collections.deque(maxlen=AUTH_FAILURES)).append(
            time.monotonic())

    def _authorized(self, cp_id: str, header: str | None) -> bool:
        if not header or not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return hmac.compare_digest(user.encode(), cp_id.encode()) & hmac.compare_digest(
            password.encode(), self.password.encode())

    async def _handle(self, connection: Any) -> None:
        cp_id = connection.request.path.rstrip("/").rsplit("/", 1)[-1]
        if connection.subprotocol not in POINTS:
            await connection.close(1002, "subprotocol ocpp1.6 or ocpp2.0.1 required")
            return
        old = self._current.get(cp_id)
        if old is not None:
            await old.close(1000, "replaced by a newer connection")
        self._current[cp_id] = connection
        tracker = self.trackers[cp_id]
        with self.lock:
            tracker.on_connect(self.clock())
        self.changed()
        cp = self.points[cp_id] = POINTS[connection.subprotocol](cp_id, connection, self)
        try:
            await cp.start()
        except Exception as exc:  # noqa: BLE001 - closed, reset, too large: all end it
            log.info("charger %s disconnected: %s", cp_id, exc)
        finally:
            if self._current.get(cp_id) is connection:
                del self._current[cp_id]
                with self.lock:
                    tracker.on_disconnect(self.clock())
                self.changed()


__all__ = ["CentralSystemThread", "OcppServerError", "SUBPROTOCOLS", "MAX_FRAME_BYTES",
           "RATE_PER_S", "RATE_BURST"]
