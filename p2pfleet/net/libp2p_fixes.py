"""Named fixes for py-libp2p 0.8.1, all in one place.

Each fix names the upstream problem it covers (see notes/libp2p.md in the team notes) and
has a test in tests/integration/test_libp2p_fixes.py that fails without it. They are small
enough to send upstream. pyproject.toml pins the exact py-libp2p version they were
written against; `check_version` refuses to run on another.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import trio

PINNED_LIBP2P = "0.8.1"
log = logging.getLogger(__name__)

IDLE_TIMEOUT = "idle timeout"
ViolationFn = Callable[[Any, str, str], None]  # (peer_id, protocol, reason)


class Libp2pVersionError(RuntimeError):
    pass


def check_version() -> None:
    found = version("libp2p")
    if found != PINNED_LIBP2P:
        raise Libp2pVersionError(
            f"p2pfleet's network fixes are written for libp2p {PINNED_LIBP2P}, found {found}; "
            "install the pinned version (pip install -e .)"
        )


# --- Fix 1: KadDHT ignores `protocol_prefix` on the wire ----------------------------------
# Upstream: kad_dht/common.py defines PROTOCOL_ID = "/ipfs/kad/1.0.0" and every module
# imports the constant, so `KadDHT(protocol_prefix=...)` changes nothing on the wire and a
# private DHT silently joins the public IPFS protocol. We rebind the constant in every
# module that imported it. It is process-wide: one DHT protocol per process.

_DHT_MODULES = ("common", "kad_dht", "value_store", "peer_routing", "provider_store")
_dht_protocol: str | None = None


def set_dht_protocol(protocol_id: str) -> None:
    global _dht_protocol
    if _dht_protocol is not None and _dht_protocol != protocol_id:
        raise RuntimeError(
            f"this process already speaks DHT protocol {_dht_protocol}; "
            f"run one network per process (asked for {protocol_id})"
        )
    import importlib

    for name in _DHT_MODULES:
        module = importlib.import_module(f"libp2p.kad_dht.{name}")
        module.PROTOCOL_ID = protocol_id  # type: ignore[attr-defined]
    _dht_protocol = protocol_id


# --- Fix 2: one bad stream kills the host ---------------------------------------------------
# Upstream: an exception in any stream handler (e.g. GossipSub's reader raising protobuf
# DecodeError on random bytes) propagates through the connection and swarm nurseries up
# to host.run(), ending the process. We wrap every handler registered on the host: a
# failure resets that stream and reports the peer; the host lives on.
#
# --- Fix 3: inbound streams without a read timeout ------------------------------------------
# Upstream: inbound DHT streams have no read or idle timeout and the DHT serves at most 12
# inbound streams at once, so 12 stalled streams deny DHT service to everyone. Handlers
# registered with an idle timeout get a stream whose reads fail after that long.


class _IdleTimeoutStream:
    """A stream proxy whose read() gives up after `timeout` seconds without data."""

    def __init__(self, stream: Any, timeout: float):
        self._stream = stream
        self._timeout = timeout
        self.timed_out = False  # the handler may swallow the error (the DHT's does)

    async def read(self, n: int | None = None) -> bytes:
        try:
            with trio.fail_after(self._timeout):
                return await self._stream.read(n)
        except trio.TooSlowError:
            self.timed_out = True
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _peer_of(stream: Any) -> Any:
    try:
        return stream.muxed_conn.peer_id
    except AttributeError:
        return None


def guard_handler(handler: Callable[[Any], Awaitable[None]], protocol: str,
                  on_violation: ViolationFn, idle_timeout: float | None) -> Callable[[Any], Awaitable[None]]:
    async def guarded(stream: Any) -> None:
        wrapped = _IdleTimeoutStream(stream, idle_timeout) if idle_timeout else stream
        try:
            await handler(wrapped)
            if isinstance(wrapped, _IdleTimeoutStream) and wrapped.timed_out:
                raise trio.TooSlowError
        except Exception as exc:  # noqa: BLE001 - anything a peer can trigger must stop here
            reason = IDLE_TIMEOUT if isinstance(exc, trio.TooSlowError) else f"{type(exc).__name__}: {exc}"
            log.debug("stream %s from %s failed: %s", protocol, _peer_of(stream), reason)
            on_violation(_peer_of(stream), protocol, reason[:200])
            try:
                await stream.reset()
            except Exception:  # noqa: BLE001 - the stream may already be gone
                pass

    return guarded


def guard_stream_handlers(host: Any, on_violation: ViolationFn,
                          idle_timeouts: dict[str, float] | None = None) -> None:
    """Wrap every handler registered on `host` from now on (call before starting services)."""
    original = host.set_stream_handler
    timeouts = dict(idle_timeouts or {})

    def set_stream_handler(protocol_id: Any, handler: Callable[[Any], Awaitable[None]]) -> None:
        original(protocol_id, guard_handler(handler, str(protocol_id), on_violation,
                                            timeouts.get(str(protocol_id))))

    host.set_stream_handler = set_stream_handler


# --- Fix 4: inbound connection slots leak --------------------------------------------------
# Upstream: Swarm._do_handle_inbound_connection holds its inbound slot until the whole
# swarm stops ("intentional barrier: await self.manager.wait_finished()"), not until the
# connection closes. After (max_connections - min_connections) inbound connections have
# come and gone, every new inbound connection is refused, for good: ~120 connect/
# disconnect cycles lock a node out. We hold the slot only while the connection lives.


async def _wait_connection_closed(swarm: Any, muxed_conn: Any) -> None:
    for conns in list(swarm.connections.values()):
        for conn in conns:
            if getattr(conn, "muxed_conn", None) is muxed_conn:
                await conn.event_closed.wait()
                return


def fix_inbound_slot_leak(swarm: Any) -> None:
    from libp2p.abc import IMuxedConn
    from libp2p.network.connection.raw_connection import RawConnection

    original = swarm._do_handle_inbound_connection

    async def handle(read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
        if isinstance(read_write_closer, IMuxedConn):  # QUIC and such: upstream path
            await original(read_write_closer, maddr, failure_event)
            return
        remote = swarm._build_remote_multiaddr(read_write_closer)
        if remote is not None and not await swarm.connection_gate.is_allowed(remote):
            try:
                await read_write_closer.close()
            except Exception:  # noqa: BLE001
                pass
            return
        raw_conn = None
        try:
            raw_conn = RawConnection(read_write_closer, False)
            muxed_conn = await swarm.upgrade_inbound_raw_conn(raw_conn, maddr)
            await _wait_connection_closed(swarm, muxed_conn)
        except Exception as exc:  # noqa: BLE001 - a failed handshake must not escape
            log.debug("inbound connection failed: %s", exc)
            try:
                await (raw_conn or read_write_closer).close()
            except Exception:  # noqa: BLE001
                pass

    swarm._do_handle_inbound_connection = handle
