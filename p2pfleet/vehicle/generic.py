"""Generic live providers, for any car, charger or machine p2pfleet has no client for:

- `JsonCommandProvider`: runs a command (no shell) whose stdout is one JSON object;
- `JsonEndpointProvider`: HTTP GET of a URL (typically a loopback endpoint of a home
  automation box) answering one JSON object.

The object's keys are the `VehicleState` fields (specs/vehicle-providers.md, section 3):
unknown keys, missing required ones, wrong types and impossible values are refused, naming
the field; `network` and `metered` default to the node's own `[vehicle]` settings (a program
reading a car rarely knows the node's link). Both are size- and time-limited: at most
`max_bytes` of output, the whole read within the provider's `timeout_s`.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx
import trio

from .live import PolledProvider, ProviderError
from .state import VehicleState, VehicleStateError, state_from_mapping

MAX_JSON_BYTES = 64 * 1024


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_state_json(data: bytes, where: str, *, defaults: Mapping[str, Any] | None = None) -> VehicleState:
    """A VehicleState from one JSON object (see the module docstring). Raises ProviderError
    naming `where` and the field."""
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constants)
    except UnicodeDecodeError:
        raise ProviderError(f"{where}: output is not UTF-8") from None
    except ValueError as exc:
        raise ProviderError(f"{where}: not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProviderError(f"{where}: must print one JSON object, got {type(obj).__name__}")
    values = {**(defaults or {}), **obj}
    dep = values.get("departure_at")
    if isinstance(dep, str):
        try:
            dt = datetime.fromisoformat(dep)
        except ValueError:
            raise ProviderError(f"{where}: departure_at: not an ISO 8601 date-time: {dep!r}") from None
        if dt.tzinfo is None:
            raise ProviderError(f"{where}: departure_at: {dep!r} has no UTC offset")
        values["departure_at"] = dt.timestamp()
    try:
        return state_from_mapping(values, where)
    except VehicleStateError as exc:
        raise ProviderError(str(exc)) from None


class JsonCommandProvider(PolledProvider):
    """Runs `argv` every `interval_s`; its stdout must be one JSON object (module docstring).
    A non-zero exit, more than `max_bytes` of output or no exit within `timeout_s` fails
    the read (the process is killed)."""

    name = "command"

    def __init__(self, argv: Sequence[str], *, interval_s: float = 30.0, timeout_s: float = 10.0,
                 max_bytes: int = MAX_JSON_BYTES, defaults: Mapping[str, Any] | None = None,
                 max_age_s: float | None = None):
        super().__init__(interval_s=interval_s, timeout_s=timeout_s, max_age_s=max_age_s)
        if not argv or not all(isinstance(a, str) and a for a in argv):
            raise ValueError("command: argv must be a non-empty list of non-empty strings")
        self.argv = tuple(argv)
        self.max_bytes = int(max_bytes)
        self.defaults = dict(defaults or {})

    async def read(self) -> VehicleState:
        try:
            proc = await trio.lowlevel.open_process(
                list(self.argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL)
        except OSError as exc:
            raise ProviderError(f"command: cannot run {self.argv[0]!r}: "
                                f"{exc.strerror or exc}") from None
        try:
            out = bytearray()
            assert proc.stdout is not None
            while chunk := await proc.stdout.receive_some(16384):
                out += chunk
                if len(out) > self.max_bytes:
                    raise ProviderError(f"command: printed more than {self.max_bytes} bytes")
            code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()
            with trio.CancelScope(shield=True):
                await proc.stdout.aclose()
        if code != 0:
            raise ProviderError(f"command: exit status {code}")
        return parse_state_json(bytes(out), "command output", defaults=self.defaults)


class JsonEndpointProvider(PolledProvider):
    """HTTP GET `url` every `interval_s`; a 200 answer with one JSON object (module
    docstring). Another status, more than `max_bytes`, or no complete answer within
    `timeout_s` fails the read."""

    name = "endpoint"

    def __init__(self, url: str, *, interval_s: float = 30.0, timeout_s: float = 10.0,
                 max_bytes: int = MAX_JSON_BYTES, defaults: Mapping[str, Any] | None = None,
                 max_age_s: float | None = None):
        super().__init__(interval_s=interval_s, timeout_s=timeout_s, max_age_s=max_age_s)
        try:
            parsed = httpx.URL(url)
        except Exception:
            raise ValueError(f"endpoint: url {url!r} is not a URL") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"endpoint: url {url!r} must be http:// or https:// with a host")
        self.url = url
        self.max_bytes = int(max_bytes)
        self.defaults = dict(defaults or {})

    async def read(self) -> VehicleState:
        body = await get_capped(self.url, self.max_bytes, "endpoint")
        return parse_state_json(body, "endpoint answer", defaults=self.defaults)


class HttpStatusError(ProviderError):
    """The server answered with a status the caller does not accept."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def get_capped(url: str, max_bytes: int, who: str, headers: Mapping[str, str] | None = None,
                     ok: tuple[int, ...] = (200,)) -> bytes:
    """GET `url`, returning the body; at most `max_bytes` are read. Errors are ProviderError
    naming `who`. The caller bounds the total time (a trickling server is cut off there)."""
    try:
        async with httpx.AsyncClient(timeout=None, follow_redirects=False, trust_env=False) as client:
            # identity: a compressed answer could expand far past the cap in one chunk
            async with client.stream("GET", url, headers={"Accept-Encoding": "identity",
                                                          **(headers or {})}) as resp:
                if resp.status_code not in ok:
                    raise HttpStatusError(resp.status_code, f"{who}: HTTP {resp.status_code}"
                                          f"{' ' + resp.reason_phrase if resp.reason_phrase else ''}")
                declared = resp.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise ProviderError(f"{who}: answer of {declared} bytes is over the "
                                        f"{max_bytes}-byte limit")
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise ProviderError(f"{who}: answer over the {max_bytes}-byte limit")
                return bytes(body)
    except httpx.HTTPError as exc:
        raise ProviderError(f"{who}: {type(exc).__name__}: {exc}"[:200]) from None


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


__all__ = ["JsonCommandProvider", "JsonEndpointProvider", "parse_state_json", "get_capped",
           "HttpStatusError",
           "MAX_JSON_BYTES"]
