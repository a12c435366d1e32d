"""Named fixes for py-libp2p 0.8.1, all in one place.

Each fix names the upstream problem it covers (see notes/libp2p.md in the team notes) and
has a test that fails without it: fixes 1-4 and 6 in tests/integration/test_libp2p_fixes.py,
fixes 7-10 in tests/integration/test_hostile.py (fix 5 lives in dht_lookup.py, fix 11 in
dht_providers.py, fixes 12-13 in state_limits.py, tested in test_hostile_state.py, fix 14 in
dht_find_node.py, fix 15 in dht_slots.py, tested with fix 16 in test_hostile_dht.py; fix 20 in
test_libp2p_fixes.py and, against a relay, tests/netbed/test_relay_ipv6.py; fixes 22-28 in
test_libp2p_fixes.py, fix 21 living in conn_trim.py (tested in test_conn_trim.py) and fix 23
in dht_refresh.py). They are small
enough to send upstream. pyproject.toml pins the exact py-libp2p version they were
written against; `check_version` refuses to run on another.
"""

from __future__ import annotations

import logging
import ipaddress
import math
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
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


OVER_BUDGET = "over its inbound byte budget"
MeterFn = Callable[[Any, int], "str | None"]


class _OverBudget(Exception):
    pass


class _MeteredStream:
    """A stream proxy that reports each read's size to `meter(peer, n)` and fails the read
    once the meter names a reason (the peer is over its byte budget: core/peer_budget.py)."""

    def __init__(self, stream: Any, meter: MeterFn):
        self._stream = stream
        self._meter = meter

    async def read(self, n: int | None = None) -> bytes:
        data = await self._stream.read(n)
        why = self._meter(_peer_of(self._stream), len(data))
        if why is not None:
            raise _OverBudget(f"{OVER_BUDGET}: {why}")
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _peer_of(stream: Any) -> Any:
    try:
        return stream.muxed_conn.peer_id
    except AttributeError:
        return None


def guard_handler(handler: Callable[[Any], Awaitable[None]], protocol: str,
                  on_violation: ViolationFn, idle_timeout: float | None,
                  meter: MeterFn | None = None) -> Callable[[Any], Awaitable[None]]:
    async def guarded(stream: Any) -> None:
        inner = _MeteredStream(stream, meter) if meter is not None else stream
        wrapped = _IdleTimeoutStream(inner, idle_timeout) if idle_timeout else inner
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
                          idle_timeouts: dict[str, float] | None = None,
                          meter: MeterFn | None = None,
                          unmetered: set[str] | frozenset[str] = frozenset()) -> None:
    """Wrap every handler registered on `host` from now on (call before starting services);
    with `meter`, every byte read by a handler is reported to it (see _MeteredStream),
    except on the `unmetered` protocols."""
    original = host.set_stream_handler
    timeouts = dict(idle_timeouts or {})

    def set_stream_handler(protocol_id: Any, handler: Callable[[Any], Awaitable[None]]) -> None:
        metered = meter if str(protocol_id) not in unmetered else None
        original(protocol_id, guard_handler(handler, str(protocol_id), on_violation,
                                            timeouts.get(str(protocol_id)), metered))

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


# --- Fix 7: stream handlers swallow peer errors, and a started frame may stall forever ------
# Upstream: KadDHT's inbound handler turns every peer error (undecodable bytes, a 100 MB
# length prefix, garbage protobuf, a forged or oversized record in PUT_VALUE) into a quiet
# stream reset; GossipSub does the same with an RPC over its size cap and with a frame cut
# off by EOF, and identify/push logs and drops whatever it got. No exception reaches fix 2,
# so a peer can send garbage forever at no cost to its score. And a frame, once started,
# has no deadline: a GossipSub stream (long-lived, so it must not have an idle timeout) can
# hold a partial frame, its buffer and its reader task for as long as the connection lives.
# We give each such handler a stream that follows the varint-length-prefixed framing of
# what the handler reads: a frame over `max_frame` is refused at its length prefix (before
# its body is buffered), a frame must be complete `deadline_s` after its first byte (time
# between frames is not limited), a frame cut off by EOF is noted, and each complete frame
# can be inspected (`inspect` returns why it is an offence, or None). The first offence is
# reported for the stream's peer and the stream is reset.

TRUNCATED_FRAME = "frame cut off by end of stream"
MAX_DHT_FRAME = 64 * 1024        # upstream: 4 MiB; our records are a few KiB
MAX_IDENTIFY_FRAME = 8 * 1024    # upstream: 1 MiB
IDENTIFY_PUSH = "/ipfs/id/push/1.0.0"


@dataclass(frozen=True)
class FrameRules:
    max_frame: int
    deadline_s: float | None = None          # a started frame must complete within this
    inspect: Callable[[bytes], str | None] | None = None


class _FramedStream:
    """A stream proxy that follows the length-prefixed frames read through it."""

    def __init__(self, stream: Any, rules: FrameRules):
        self._stream = stream
        self._rules = rules
        self._prefix = bytearray()
        self._left: int | None = None   # body bytes still to come in the current frame
        self._body = bytearray()
        self._deadline: float | None = None
        self.violation: str | None = None

    def _flag(self, reason: str) -> None:
        self.violation = self.violation or reason

    def _mid_frame(self) -> bool:
        return bool(self._prefix) or self._left is not None

    async def read(self, n: int | None = None) -> bytes:
        from libp2p.io.exceptions import IncompleteReadError
        from libp2p.network.stream.exceptions import StreamEOF

        try:
            if self._deadline is None:
                data = await self._stream.read(n)
            else:
                with trio.move_on_at(self._deadline):
                    data = await self._stream.read(n)
                    self._feed(data)
                    return data
                self._flag(IDLE_TIMEOUT)  # mapped to a stall, as for fix 3
                raise IncompleteReadError(f"frame not complete within {self._rules.deadline_s} s",
                                          expected_bytes=self._left or 1, received_bytes=1)
        except StreamEOF:
            if self._mid_frame():
                self._flag(TRUNCATED_FRAME)
            raise
        self._feed(data)
        return data

    def _feed(self, data: bytes) -> None:
        from libp2p.exceptions import ParseError
        from libp2p.io.exceptions import MessageTooLarge
        from libp2p.utils.varint import decode_uvarint

        if not data and self._mid_frame():
            self._flag(TRUNCATED_FRAME)
        i = 0
        while i < len(data):
            if self._left is None:  # in a length prefix
                if not self._prefix and self._rules.deadline_s is not None:
                    self._deadline = trio.current_time() + self._rules.deadline_s
                byte = data[i]
                i += 1
                self._prefix.append(byte)
                if byte & 0x80:
                    if len(self._prefix) >= 10:
                        self._flag("bad length prefix")
                        raise ParseError("varint length prefix over 64 bits")
                    continue
                length = decode_uvarint(bytes(self._prefix))
                self._prefix.clear()
                if length > self._rules.max_frame:
                    self._flag(f"{length}-byte frame over the {self._rules.max_frame}-byte cap")
                    raise MessageTooLarge(f"frame of {length} bytes, cap {self._rules.max_frame}")
                self._left = length
                if length == 0:
                    self._end_frame()
            else:
                take = min(self._left, len(data) - i)
                if self._rules.inspect is not None:
                    self._body += data[i:i + take]
                self._left -= take
                i += take
                if self._left == 0:
                    self._end_frame()

    def _end_frame(self) -> None:
        if self._rules.inspect is not None:
            reason = self._rules.inspect(bytes(self._body))
            if reason:
                self._flag(reason)
        self._left, self._body, self._deadline = None, bytearray(), None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def check_frames(host: Any, on_violation: ViolationFn, rules: dict[str, FrameRules]) -> None:
    """Give handlers of the protocols in `rules` a framed stream; report offences.

    Call after `guard_stream_handlers` (so exceptions still end at fix 2's guard) and
    before starting services."""
    original = host.set_stream_handler

    def wrap(handler: Callable[[Any], Awaitable[None]], protocol: str,
             frame_rules: FrameRules) -> Callable[[Any], Awaitable[None]]:
        async def framed_handler(stream: Any) -> None:
            framed = _FramedStream(stream, frame_rules)
            try:
                await handler(framed)
            except Exception:  # noqa: BLE001 - fix 2 reports it unless we already know why
                if framed.violation is None:
                    raise
            if framed.violation is not None:
                log.debug("stream %s from %s: %s", protocol, _peer_of(stream), framed.violation)
                on_violation(_peer_of(stream), protocol, framed.violation[:200])
                try:
                    await stream.reset()
                except Exception:  # noqa: BLE001 - the stream may already be gone
                    pass

        return framed_handler

    def set_stream_handler(protocol_id: Any, handler: Callable[[Any], Awaitable[None]]) -> None:
        frame_rules = rules.get(str(protocol_id))
        if frame_rules is not None:
            handler = wrap(handler, str(protocol_id), frame_rules)
        original(protocol_id, handler)

    host.set_stream_handler = set_stream_handler
    # new_host registers identify, identify/push and ping before anyone can wrap
    # set_stream_handler: register those of them we have rules for again, through the
    # wrappers (this one and fix 2's guard).
    for protocol_id, handler in list(host.get_mux().handlers.items()):
        if str(protocol_id) in rules:
            set_stream_handler(protocol_id, handler)


def kad_frame_inspector(
        check_record: Callable[[str, bytes], str | None]) -> Callable[[bytes], str | None]:
    """Inspect one inbound DHT request: undecodable, or a PUT_VALUE whose record
    `check_record(key, value)` calls an offence (it returns why, or None)."""
    from google.protobuf.message import DecodeError
    from libp2p.kad_dht.pb.kademlia_pb2 import Message

    def inspect(frame: bytes) -> str | None:
        message = Message()
        try:
            message.ParseFromString(frame)
        except DecodeError:
            return "undecodable DHT message"
        if message.type == Message.MessageType.PUT_VALUE and message.HasField("record"):
            try:
                key = message.record.key.decode("utf-8")
            except UnicodeDecodeError:
                return "PUT_VALUE key is not UTF-8"
            why = check_record(key, bytes(message.record.value))
            if why:
                return f"refused record: {why}"
        return None

    return inspect


def protobuf_frame_inspector(message_type: Any) -> Callable[[bytes], str | None]:
    from google.protobuf.message import DecodeError

    def inspect(frame: bytes) -> str | None:
        try:
            message_type().ParseFromString(frame)
        except DecodeError:
            return f"undecodable {message_type.__name__} message"
        return None

    return inspect


def identify_frame_inspector() -> Callable[[bytes], str | None]:
    from libp2p.identity.identify.pb.identify_pb2 import Identify

    return protobuf_frame_inspector(Identify)


# --- Fix 8: no per-IP limit on inbound handshakes or connections ----------------------------
# Upstream: each inbound TCP connection takes one of the swarm's (max_connections -
# min_connections) inbound slots before its handshake starts, and nothing limits how many
# one address may hold: ~300 sockets from one host that never send a byte hold every slot
# (each for inbound_upgrade_timeout, and the attacker simply reconnects), so honest peers
# cannot connect. What 0.8.1 offers does not cover it: ConnectionConfig's allow/deny lists
# are static; the resource manager's CIDRLimiter counts all addresses of a configured
# network together (not each address) and is consulted only after the inbound slot is
# taken; rcmgr's max_pending_inbound is never called by the swarm. We check the remote
# address before the slot is taken and close the socket at once when that address already
# has `max_pending` handshakes in progress or `max_open` inbound connections (pending ones
# included). IPv6 addresses count per /64 (one subscriber's prefix); IPv4 per address, so
# loopback test fleets on distinct 127.x.y.z addresses are distinct sources. A connection
# counts until its inbound handler returns, which with fix 4 is when it closes.


@dataclass
class PerIPLimits:
    max_pending: int = 4     # inbound handshakes in progress per source
    max_open: int = 16       # inbound connections per source (pending ones included)
    ipv6_prefix: int = 64


def source_address(host: str, ipv6_prefix: int = 64) -> str:
    """What counts as one source: an IPv4 address (an IPv4-mapped IPv6 one too) or an IPv6
    prefix; anything that is not an IP address is its own source."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{ipv6_prefix}", strict=False))
    return str(ip)


class InboundIPLimiter:
    def __init__(self, limits: PerIPLimits):
        self.limits = limits
        self.pending: Counter[str] = Counter()
        self.open: Counter[str] = Counter()
        self.refused = 0

    def source(self, host: str) -> str:
        return source_address(host, self.limits.ipv6_prefix)

    def try_admit(self, source: str) -> bool:
        if (self.pending[source] >= self.limits.max_pending
                or self.open[source] >= self.limits.max_open):
            self.refused += 1
            return False
        self.pending[source] += 1
        self.open[source] += 1
        return True

    def handshake_done(self, admission: list[Any]) -> None:
        source, pending = admission
        if pending:
            admission[1] = False
            self._drop(self.pending, source)

    def release(self, admission: list[Any]) -> None:
        self.handshake_done(admission)
        self._drop(self.open, admission[0])

    @staticmethod
    def _drop(counter: Counter[str], source: str) -> None:
        counter[source] -= 1
        if counter[source] <= 0:
            del counter[source]


_admission: ContextVar[list[Any] | None] = ContextVar("p2pfleet_inbound_admission", default=None)


def limit_inbound_per_ip(swarm: Any, limits: PerIPLimits | None = None, *,
                         refuse: Callable[[str], str | None] | None = None) -> InboundIPLimiter:
    """Install per-source limits on `swarm`'s inbound connections; returns the limiter
    (its `limits` may be changed while the swarm runs). `refuse(source)` says why a source
    gets no connection at all for now (e.g. it overran its byte budget), else None."""
    from libp2p.abc import IMuxedConn

    limiter = InboundIPLimiter(limits or PerIPLimits())
    handle_inbound = swarm._handle_inbound_connection
    upgrade_inbound = swarm.upgrade_inbound_raw_conn

    async def handle(read_write_closer: Any, maddr: Any) -> None:
        remote = None
        if not isinstance(read_write_closer, IMuxedConn):  # QUIC and such: upstream path
            try:
                remote = read_write_closer.get_remote_address()
            except Exception:  # noqa: BLE001 - no address: not limited
                remote = None
        if remote is None:
            await handle_inbound(read_write_closer, maddr)
            return
        source = limiter.source(str(remote[0]))
        if refuse is not None and (why := refuse(source)) is not None:
            limiter.refused += 1
            log.debug("inbound connection from %s refused: %s", source, why)
            try:
                await read_write_closer.close()
            except Exception:  # noqa: BLE001
                pass
            return
        if not limiter.try_admit(source):
            log.debug("inbound connection from %s refused: per-source limit", source)
            try:
                await read_write_closer.close()
            except Exception:  # noqa: BLE001
                pass
            return
        admission = [source, True]
        token = _admission.set(admission)
        try:
            await handle_inbound(read_write_closer, maddr)
        finally:
            _admission.reset(token)
            limiter.release(admission)

    async def upgrade(raw_conn: Any, maddr: Any) -> Any:
        muxed_conn = await upgrade_inbound(raw_conn, maddr)
        admission = _admission.get()
        if admission is not None:
            limiter.handshake_done(admission)
        return muxed_conn

    swarm._handle_inbound_connection = handle
    swarm.upgrade_inbound_raw_conn = upgrade
    return limiter


# --- Loopback fleets: dial from the address we listen on ----------------------------------
# Not an upstream bug: py-libp2p dials from a source the kernel picks, and on loopback that
# is 127.0.0.1 whatever the destination, so a test fleet whose nodes listen on distinct
# 127.x.y.z addresses looks like one host to per-source limits (fix 8): a bootstrap node
# would refuse the 17th local node. A node that listens on one specific loopback address
# dials loopback destinations from it, as if it were its own host.


def dial_loopback_from(host: Any, source_ip: str) -> bool:
    """Bind outbound TCP dials to loopback destinations to `source_ip` (a loopback
    address); returns whether it applied. (Not the transport's own dial_with_source: its
    socket leaks when the dial is cancelled; trio's open_tcp_stream closes it.)"""
    from libp2p.io.trio import TrioTCPStream
    from libp2p.network.connection.raw_connection import RawConnection
    from libp2p.transport.exceptions import OpenConnectionError
    from libp2p.transport.tcp.tcp import TCP

    source = ipaddress.ip_address(source_ip)
    if source.version != 4 or not source.is_loopback:
        return False
    applied = False
    for transport in host.get_network().transport_manager.get_transports():
        if not isinstance(transport, TCP):
            continue
        plain_dial = transport.dial

        async def dial(maddr: Any, _plain: Any = plain_dial) -> Any:
            try:
                ip = maddr.value_for_protocol("ip4")
                port = int(maddr.value_for_protocol("tcp"))
                loopback = ipaddress.ip_address(ip).is_loopback
            except Exception:  # noqa: BLE001 - not ip4/tcp: dial as usual
                loopback = False
            if not loopback:
                return await _plain(maddr)
            try:
                stream = await trio.open_tcp_stream(ip, port, local_address=source_ip)
            except OSError as exc:
                raise OpenConnectionError(f"cannot dial {maddr} from {source_ip}: {exc}") from exc
            return RawConnection(TrioTCPStream(stream), True)

        transport.dial = dial
        applied = True
    return applied


# --- Fix 9: GossipSub score weights P4 and P5 have the opposite sign to the spec ------------
# Upstream: PeerScorer.topic_score does `s -= p4.weight * invalid_messages` and score() does
# `score -= behaviour_penalty * p5_weight`, where the GossipSub v1.1 spec (and go- and
# rust-libp2p) add weight * counter with a negative weight. Parameters written to the spec
# (P4 weight -10) raise a peer's score with every invalid message it sends, so the score
# gates never fire for it. Write the spec's weight through this.


def spec_penalty_weight(spec_weight: float) -> float:
    """The weight py-libp2p 0.8.1 needs for a P4/P5 weight given as the spec writes it."""
    if spec_weight > 0:
        raise ValueError("GossipSub v1.1 penalty weights (P4, P5) are negative")
    return -spec_weight


# --- Fix 10: topic validators can only accept or reject ------------------------------------
# Upstream: a pubsub topic validator returns a bool; False scores the forwarder down (P4)
# and caches the verdict. go- and rust-libp2p have a third answer, "ignore": drop the
# message without forwarding it and without blaming whoever relayed it, for messages that
# are not invalid but unwanted (e.g. over their publisher's rate; a relay that forwarded
# them within the rate it saw is not at fault). `ignore(forwarder, msg)` is asked first for
# messages on `topic` (not for our own publishes, nor for what the upstream drops anyway:
# blacklisted forwarders, messages seen before, forwarders under the publish threshold);
# True drops the message silently.

IgnoreFn = Callable[[Any, Any], bool]


def add_validation_ignore(pubsub: Any, topic: str, ignore: IgnoreFn) -> None:
    push_msg = pubsub.push_msg

    def upstream_drops(forwarder: Any, msg: Any) -> bool:  # cheap checks, before ours
        if pubsub.is_peer_blacklisted(forwarder) or pubsub._is_msg_seen(msg):
            return True
        scorer = getattr(pubsub.router, "scorer", None)
        return scorer is not None and not scorer.allow_publish(forwarder, list(msg.topicIDs))

    async def push_msg_or_ignore(forwarder: Any, msg: Any) -> None:
        if (topic in msg.topicIDs and forwarder != pubsub.my_id
                and not upstream_drops(forwarder, msg) and ignore(forwarder, msg)):
            return
        await push_msg(forwarder, msg)

    pubsub.push_msg = push_msg_or_ignore


# --- Fix 16: a flood of new addresses takes every inbound slot -------------------------------
# Upstream: the swarm's (max_connections - min_connections) inbound slots go to whoever
# comes first. Fix 8 bounds what one address holds, not what many hold: forty addresses
# with 119 connections locked out honest newcomers and the fleet's own peers. We keep
# `fraction` of the inbound slots for known sources: addresses of peers in our routing
# table or of peers we dialled (the peer id is not known before the handshake, the address
# is). Connections from other addresses (handshakes included) may hold the rest. When that
# share is full, a new one prunes the newest connection of the share that sent nothing
# useful (its peer neither got into our routing table, as a DHT request puts it, nor was
# dialled by us) and is at least `grace_s` old, so a newcomer has time to prove useful;
# with none to prune, the new connection is closed at once. Newest first: connections that
# have lasted are more likely the fleet's. An address whose connection was pruned gets no
# unreserved slot for `cooldown_s` while the share is full: flooders re-dialling at once
# would otherwise keep every connection younger than the grace, and newcomers out. A pruned
# peer is reported (`on_prune`): the bytes of a connection we dropped as useless do not
# count toward the owner's transfer cap (core/peer_budget.py).
# With no idle one to prune, the oldest connection of the share that has had `settle_s` to
# learn from us goes instead, unless it carries work (a stream other than GossipSub's, the
# DHT's or identify push's) or is one of our GossipSub mesh peers: a node a fleet joins
# through serves each newcomer for a while and lets it go, rather than serving the first
# ones for good and refusing the rest (issue 15: at 200 hosts a bootstrap node's share held
# the first joiners, each useful since its first DHT request, and 62 hosts found no peer
# for 30 s). The one let go stays in our routing table, so its address is a known source
# and it comes back through the reserved slots. A flood of useful-looking connections can
# thus push settled honest ones out of the share, never out of the reserve.


@dataclass(frozen=True)
class InboundReserve:
    fraction: float = 0.25   # of the inbound slots, kept for known sources
    grace_s: float = 10.0    # a new connection is not pruned before this
    cooldown_s: float = 60.0  # a pruned address waits this long for another unreserved slot
    settle_s: float = 60.0   # a useful connection may go for a newcomer after this

    def __post_init__(self) -> None:
        if (not 0 <= self.fraction < 1 or self.grace_s < 0 or self.cooldown_s < 0
                or self.settle_s < self.grace_s):
            raise ValueError("InboundReserve needs 0 <= fraction < 1, grace_s >= 0, "
                             f"cooldown_s >= 0 and settle_s >= grace_s, got "
                             f"fraction={self.fraction}, grace_s={self.grace_s}, "
                             f"cooldown_s={self.cooldown_s}, settle_s={self.settle_s}")


@dataclass
class _Unknown:
    source: str
    since: float
    muxed_conn: Any = None
    gone: trio.Event = field(default_factory=trio.Event)


SOURCES_TTL_S = 1.0  # known sources are rebuilt at most this often
MAX_ADDR_SOURCES = 16384  # parsed addresses remembered (a source per address bytes)


class InboundReservation:
    """Counts inbound connections from unknown sources and prunes them (see fix 16)."""

    def __init__(self, swarm: Any, reserve: InboundReserve, known_peers: Callable[[], Any],
                 is_known: Callable[[Any], bool], source_of: Callable[[str], str],
                 on_prune: Callable[[Any], None] | None = None,
                 busy: Callable[[Any], bool] = lambda conn: False,
                 keep: Callable[[Any], bool] = lambda peer: False):
        self.swarm = swarm
        self.on_prune = on_prune
        self._busy = busy
        self._keep = keep
        self.reserve = reserve
        self._known_peers = known_peers
        self._is_known = is_known
        self._source_of = source_of
        self.dialled: OrderedDict[Any, None] = OrderedDict()  # peers we dialled, newest last
        self.unknown: list[_Unknown] = []
        self.cooling: dict[str, float] = {}  # source -> until (trio time)
        self.pruned = 0
        self.refused = 0
        self._sources: tuple[float, set[str]] = (-math.inf, set())
        self._addr_sources: dict[bytes, tuple[str, ...]] = {}  # address bytes -> sources

    @property
    def cap(self) -> int:
        total = int(self.swarm._inbound_limiter.total_tokens)
        return total - math.ceil(total * self.reserve.fraction)

    def remember_dialled(self, peer: Any) -> None:
        self.dialled[peer] = None
        self.dialled.move_to_end(peer)
        while len(self.dialled) > 4096:
            self.dialled.popitem(last=False)

    def known(self, peer: Any) -> bool:
        return peer in self.dialled or self._is_known(peer)

    def known_sources(self) -> set[str]:
        """The source addresses of our routing table's and dialled peers, rebuilt at most
        once per `SOURCES_TTL_S`: rebuilding walks every such peer's addresses (2-12 ms at a
        busy bootstrap node), and a bare TCP connect from anyone asks for it."""
        now = trio.current_time()
        built_at, sources = self._sources
        if now - built_at < SOURCES_TTL_S:
            return sources
        sources = self._build_known_sources()
        self._sources = (now, sources)
        return sources

    def _build_known_sources(self) -> set[str]:
        peerstore = self.swarm.peerstore
        sources: set[str] = set()
        for peer in [*self._known_peers(), *self.dialled]:
            try:
                addrs = peerstore.addrs(peer)
            except Exception:  # noqa: BLE001 - a peer without addresses
                continue
            for addr in addrs:
                sources.update(self._sources_of_addr(addr))
        return sources

    def _sources_of_addr(self, addr: Any) -> tuple[str, ...]:
        """An address's sources, remembered by its bytes: parsing it (`value_for_protocol`,
        an exception for the absent family) took ~15 us, ~6 ms per rebuild at a host that
        dialled 200 peers, and a busy host rebuilds every second."""
        try:
            raw = addr.to_bytes()
        except Exception:  # noqa: BLE001 - not a multiaddr: parsed below, not remembered
            raw = None
        found = self._addr_sources.get(raw) if raw is not None else None
        if found is not None:
            return found
        names = []
        for proto in ("ip4", "ip6"):
            try:
                names.append(self._source_of(addr.value_for_protocol(proto)))
            except Exception:  # noqa: BLE001 - not this protocol
                pass
        found = tuple(names)
        if raw is not None:
            if len(self._addr_sources) >= MAX_ADDR_SOURCES:
                self._addr_sources.clear()  # rare (that many distinct addresses): start over
            self._addr_sources[raw] = found
        return found

    def cooling_down(self, source: str, now: float) -> bool:
        for gone in [s for s, until in self.cooling.items() if until <= now]:
            del self.cooling[gone]
        return source in self.cooling

    def prunable(self, now: float) -> _Unknown | None:
        """The newest idle newcomer past its grace; else the oldest settled connection that
        carries no work and is not kept (see fix 16)."""
        candidates = [u for u in self.unknown
                      if u.muxed_conn is not None and now - u.since >= self.reserve.grace_s
                      and not self.known(getattr(u.muxed_conn, "peer_id", None))]
        if candidates:
            return max(candidates, key=lambda u: u.since)
        settled = [u for u in self.unknown
                   if u.muxed_conn is not None and now - u.since >= self.reserve.settle_s
                   and not self._keep(getattr(u.muxed_conn, "peer_id", None))
                   and not any(self._busy(conn) for conn in self._conns_of(u))]
        return min(settled, key=lambda u: u.since, default=None)

    def _conns_of(self, entry: _Unknown) -> list[Any]:
        return [conn for conns in list(self.swarm.connections.values()) for conn in conns
                if getattr(conn, "muxed_conn", None) is entry.muxed_conn]

    async def close(self, entry: _Unknown) -> None:
        for conn in self._conns_of(entry):
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - it may already be closing
                pass
        with trio.move_on_after(5.0):  # its slot comes back when its handler returns (fix 4)
            await entry.gone.wait()


_unknown_entry: ContextVar[_Unknown | None] = ContextVar("p2pfleet_unknown_inbound", default=None)


def reserve_inbound_slots(swarm: Any, reserve: InboundReserve, known_peers: Callable[[], Any],
                          is_known: Callable[[Any], bool], source_of: Callable[[str], str],
                          on_prune: Callable[[Any], None] | None = None,
                          busy: Callable[[Any], bool] = lambda conn: False,
                          keep: Callable[[Any], bool] = lambda peer: False,
                          ) -> InboundReservation:
    """Install fix 16 on `swarm` (after fixes 4 and 8). `known_peers()` lists the peers
    whose addresses are known sources (our routing table's), `is_known(peer)` says whether
    a connected peer is worth keeping, `source_of(ip)` names an address's source (fix 8's
    rule); `busy(conn)`: the connection carries work; `keep(peer)`: never let it go for a
    newcomer; peers we dial are remembered here."""
    from libp2p.abc import IMuxedConn, INotifee
    from libp2p.rcmgr import Direction

    reservation = InboundReservation(swarm, reserve, known_peers, is_known, source_of, on_prune,
                                     busy, keep)
    handle_inbound = swarm._handle_inbound_connection
    upgrade_inbound = swarm.upgrade_inbound_raw_conn

    async def handle(read_write_closer: Any, maddr: Any) -> None:
        remote = None
        if not isinstance(read_write_closer, IMuxedConn):
            try:
                remote = read_write_closer.get_remote_address()
            except Exception:  # noqa: BLE001 - no address: not counted
                remote = None
        if remote is None or reservation.cap <= 0:
            await handle_inbound(read_write_closer, maddr)
            return
        source = source_of(str(remote[0]))
        if source in reservation.known_sources():
            await handle_inbound(read_write_closer, maddr)
            return
        if len(reservation.unknown) >= reservation.cap:
            now = trio.current_time()
            victim = None if reservation.cooling_down(source, now) else reservation.prunable(now)
            if victim is None:
                reservation.refused += 1
                log.debug("inbound connection from %s refused: the unreserved slots are full",
                          source)
                try:
                    await read_write_closer.close()
                except Exception:  # noqa: BLE001
                    pass
                return
        else:
            victim = None
        entry = _Unknown(source, trio.current_time())
        reservation.unknown.append(entry)  # before any await: concurrent arrivals count it
        token = _unknown_entry.set(entry)
        try:
            if victim is not None:
                reservation.unknown.remove(victim)  # the new one takes its place
                reservation.cooling[victim.source] = now + reserve.cooldown_s
                reservation.pruned += 1
                log.debug("pruning the newest idle inbound connection from %s for one from %s",
                          victim.source, source)
                peer = getattr(victim.muxed_conn, "peer_id", None)
                if peer is not None and reservation.on_prune is not None:
                    reservation.on_prune(peer)
                await reservation.close(victim)
            await handle_inbound(read_write_closer, maddr)
        finally:
            _unknown_entry.reset(token)
            if entry in reservation.unknown:
                reservation.unknown.remove(entry)
            entry.gone.set()

    async def upgrade(raw_conn: Any, maddr: Any) -> Any:
        muxed_conn = await upgrade_inbound(raw_conn, maddr)
        entry = _unknown_entry.get()
        if entry is not None:
            entry.muxed_conn = muxed_conn
        return muxed_conn

    class _Dialled(INotifee):
        """Remembers the peers of our outbound connections."""

        async def connected(self, network: Any, conn: Any) -> None:
            if getattr(conn, "direction", None) == Direction.OUTBOUND:
                reservation.remember_dialled(conn.muxed_conn.peer_id)

        async def opened_stream(self, *_: Any) -> None: ...
        async def closed_stream(self, *_: Any) -> None: ...
        async def disconnected(self, *_: Any) -> None: ...
        async def listen(self, *_: Any) -> None: ...
        async def listen_close(self, *_: Any) -> None: ...

    swarm._handle_inbound_connection = handle
    swarm.upgrade_inbound_raw_conn = upgrade
    swarm.register_notifee(_Dialled())
    return reservation


# --- Fix 17: the auto-dialler aims far above the connections a car wants -------------------
# Upstream: the swarm's AutoConnector dials, every 30 s and after each disconnect, towards the
# midpoint of the low and high watermarks (56 connections with ours, 16 and 96), taking any
# peer the peerstore holds an address for: peers a DHT walk met once, bootstrap peers we
# just released. Each connection costs ~32 ms of CPU on both ends (Noise, identify,
# GossipSub streams) and bytes of a car's metered link; a 50-host formation in one process
# took 260 CPU-s with it and 204 without (one run each, busy machine). We let it dial only
# while we hold fewer than `target`
# connections (the low watermark), and only as many peers as bring us back to it.

def limit_auto_dial(swarm: Any, target: int) -> None:
    connector = getattr(swarm, "auto_connector", None)
    if connector is None:
        return
    maybe_connect = connector.maybe_connect
    candidate_peers = connector._get_candidate_peers

    def room() -> int:
        return target - swarm.get_total_connections() - len(connector._in_flight_dials)

    async def maybe_connect_below_target() -> None:
        if room() > 0:
            await maybe_connect()

    async def candidates_within_room() -> list[Any]:
        return (await candidate_peers())[:max(0, room())]

    connector.maybe_connect = maybe_connect_below_target
    connector._get_candidate_peers = candidates_within_room


# --- Fix 20: an IPv6 connection has no remote address ----------------------------------------
# Upstream: TrioTCPStream.get_remote_address accepts only a 2-tuple from getpeername, but an
# IPv6 socket gives (host, port, flowinfo, scope_id): every IPv6 connection reports None.
# Fix 8, fix 15, fix 16 and the relay's per-address limits treat "no address" as "not
# limited" (or lump every IPv6 peer into one source), so an IPv6 attacker
# escaped all of them. We return (host, port) for both families. Process-wide and harmless to
# repeat: applied when this module is imported, so no limit can run without it.

def _peer_address(stream: Any) -> tuple[str, int] | None:
    try:
        addr = stream.stream.socket.getpeername()
    except (AttributeError, OSError):  # no socket, or closed: as upstream, no address
        return None
    if not isinstance(addr, tuple) or len(addr) not in (2, 4):
        return None
    stream._cached_remote_address = (str(addr[0]), int(addr[1]))  # as upstream: for teardown
    return stream._cached_remote_address


def fix_ipv6_socket_addresses() -> None:
    from libp2p.io.trio import TrioTCPStream

    if getattr(TrioTCPStream, "_p2pfleet_fix_20", False):
        return
    upstream = TrioTCPStream.get_remote_address

    def get_remote_address(self: Any) -> tuple[str, int] | None:
        return upstream(self) or _peer_address(self)

    TrioTCPStream.get_remote_address = get_remote_address
    TrioTCPStream._p2pfleet_fix_20 = True


fix_ipv6_socket_addresses()


# --- Fix 22: a write cancelled after its Noise encryption kills the connection ----------------
# Upstream: the Noise writer encrypts a message (using up the next nonce) and then awaits the
# socket's write lock and send_all, both of which raise Cancelled at their first checkpoint
# when the writer's deadline passed meanwhile. The message is never sent, the next one goes
# out with the following nonce, and the peer fails to decrypt it (NoiseInvalidMessage) and
# drops the connection. Every DHT request runs under a deadline, so on a busy host (event
# loop 50 ms to 2 s late) this ended hundreds of healthy connections a minute: at 203 hosts on
# two cores, ~390 in 90 s ended with NoiseInvalidMessage at one end and ~850 with a bare
# socket close at the other, and their walks dialled them all again at ~65 ms of CPU each
# (issue 15). Now a cancellation still stops a write before it encrypts; once it has, the
# message is written whole (shielded), or the connection is closed if the socket does not
# take it within WHOLE_WRITE_TIMEOUT_S (a peer that stopped reading). Process-wide, applied
# when this module is imported, like fix 20.

WHOLE_WRITE_TIMEOUT_S = 10.0


def fix_noise_write_cancellation() -> None:
    from libp2p.io.exceptions import ConnectionClosedError
    from libp2p.security.noise.io import NoiseTransportReadWriter

    if getattr(NoiseTransportReadWriter, "_p2pfleet_fix_22", False):
        return
    upstream = NoiseTransportReadWriter.write_msg

    async def write_msg(self: Any, msg: bytes, prefix_encoded: bool = False) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # no nonce used yet: a plain cancel
        with trio.CancelScope(shield=True,
                              deadline=trio.current_time() + WHOLE_WRITE_TIMEOUT_S) as scope:
            await upstream(self, msg, prefix_encoded)
        if scope.cancelled_caught:  # part of a message may be on the wire: nothing can follow
            with trio.CancelScope(shield=True):
                await self.read_writer.close()
            raise ConnectionClosedError(
                f"a Noise message was not written within {WHOLE_WRITE_TIMEOUT_S:g} s: "
                f"connection closed")

    NoiseTransportReadWriter.write_msg = write_msg
    NoiseTransportReadWriter._p2pfleet_fix_22 = True


fix_noise_write_cancellation()


# --- Fix 24: multistream-select waits a round trip before it names the protocol --------------
# Upstream: the client writes the multistream header, waits for the listener's header, and
# only then writes the protocol and waits again: two round trips before a stream carries a
# byte, for every stream (each DHT request that finds no pooled stream, identify, GossipSub)
# and twice more when a connection is upgraded (security, then muxer). Each read and write in
# py-libp2p passes several locks, every one a trip through the event loop, so on a busy host
# (loop 50 ms late) a negotiation took seconds: at 203 hosts on two cores, 3,300 of ~4,900
# GET_VALUE requests in two minutes timed out while negotiating a stream on a connection that
# was already open (tools/bench_dht.py, BENCH_DHT_DIALS; as many with this fix: the round trip
# saved is not what is missing there). Now the client writes the header and its first protocol
# together and then reads both answers, as go-multistream's SelectProtoOrFail does; a
# listener reads them one after the other either way. A refusal ("na") falls back to
# upstream's one-by-one selection for the other protocols.
# Process-wide, applied when this module is imported.

def lazy_multistream_select() -> None:
    from libp2p.io.exceptions import IOException
    from libp2p.protocol_muxer.exceptions import (
        MultiselectClientError,
        MultiselectCommunicatorError,
        ProtocolNotSupportedError,
    )
    from libp2p.protocol_muxer.multiselect import MULTISELECT_PROTOCOL_ID, PROTOCOL_NOT_FOUND_MSG
    from libp2p.protocol_muxer.multiselect_client import (
        DEFAULT_NEGOTIATE_TIMEOUT,
        MultiselectClient,
        is_valid_handshake,
    )
    from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
    from libp2p.utils import encode_delim

    if getattr(MultiselectClient, "_p2pfleet_fix_24", False):
        return
    upstream = MultiselectClient.select_one_of

    async def select_one_of(self: Any, protocols: Any, communicator: Any,
                            negotiate_timeout: int = DEFAULT_NEGOTIATE_TIMEOUT) -> Any:
        if not protocols or type(communicator) is not MultiselectCommunicator:
            return await upstream(self, protocols, communicator, negotiate_timeout)
        first, rest = protocols[0], list(protocols[1:])
        with trio.move_on_after(negotiate_timeout):
            try:
                try:  # what communicator.write turns into its own error, as there
                    await communicator.read_writer.write(
                        encode_delim(MULTISELECT_PROTOCOL_ID.encode())
                        + encode_delim(str(first).encode()))
                except (IOException, AssertionError, ValueError) as error:
                    raise MultiselectCommunicatorError("write failed") from error
                header = await communicator.read()
                if not is_valid_handshake(header):
                    raise MultiselectClientError(
                        f"multiselect protocol ID mismatch: expected "
                        f"{MULTISELECT_PROTOCOL_ID}, got {header!r}")
                answer = await communicator.read()
            except MultiselectCommunicatorError as error:
                raise MultiselectClientError(f"negotiation failed: {error}") from error
            if answer == str(first):
                return first
            if answer != PROTOCOL_NOT_FOUND_MSG:
                raise MultiselectClientError(
                    f"unrecognized response: {answer!r}, expected {str(first)!r} or "
                    f"{PROTOCOL_NOT_FOUND_MSG!r}, protocol={first}")
            for protocol in rest:  # the handshake is done: upstream's per-protocol step
                try:
                    return await self.try_select(communicator, protocol)
                except ProtocolNotSupportedError:
                    continue
            raise MultiselectClientError(
                f"protocols not supported by the peer: {[str(p) for p in protocols]}")
        raise MultiselectClientError(
            f"response timed out after {negotiate_timeout}s, protocols tried: "
            f"{[str(p) for p in protocols]}")

    MultiselectClient.select_one_of = select_one_of
    MultiselectClient._p2pfleet_fix_24 = True


lazy_multistream_select()


# --- Fix 25: yamux answers every read with a WINDOW_UPDATE frame -----------------------------
# Upstream's receive-window bookkeeping sends credit back after every read that takes bytes
# (its "partial slack" and "release on read" paths), so every message costs a second frame
# the other way: a DHT request read as a one-byte varint and a body sent two WINDOW_UPDATE
# frames back, each Noise-encrypted, written, read, decrypted and handled under the stream's
# window lock at the far end. go-yamux and rust-yamux send credit only once the bytes read
# since the last update reach half the window (go-yamux `sendWindowUpdate`), so a small
# request/answer stream never sends one. Now we do the same: a read sends an update only when
# the window has shrunk by at least half its target (then growing it back to the target, with
# upstream's auto-tuning), and costs no lock otherwise. The sender never waits for credit
# while we keep reading: it always holds at least half a window.
# Process-wide, applied when this module is imported.

def lean_yamux_window_updates() -> None:
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    if getattr(YamuxStream, "_p2pfleet_fix_25", False):
        return

    def credit_due(stream: Any) -> int:
        buffered = len(stream.conn.stream_buffers.get(stream.stream_id, b""))
        owed = stream.target_recv_window - (stream.recv_window + buffered)
        return owed if owed >= max(stream.target_recv_window // 2, 1) else 0

    async def send_credit_when_due(self: Any, *, bytes_read: int = 0) -> None:
        if not credit_due(self):
            return
        async with self.window_lock:
            if not credit_due(self):  # another reader of this stream sent it meanwhile
                return
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            increment = self._grow_to_delta(buffered)
            increment += self._apply_autotune_epoch(buffered)
        await self.send_window_update(increment, skip_lock=True)

    YamuxStream._auto_tune_and_send_window_update = send_credit_when_due
    YamuxStream._p2pfleet_fix_25 = True


lean_yamux_window_updates()


# --- Fix 26: a task per notifee for every stream opened and closed ---------------------------
# The swarm tells its notifees (identify, GossipSub, the tag store, ours) of every stream
# opened and closed by starting a nursery with one task per notifee, though every notifee
# here ignores stream events: five task spawns and a nursery per stream end, ~8 % of an idle
# host's CPU (py-spy, 20 hosts refreshing their tables). go-libp2p calls notifees inline.
# Now stream events are delivered to each notifee in turn in the caller's task, a notifee's
# exception still logged and isolated as upstream does; connection events are unchanged.
# Process-wide, applied when this module is imported.

_INLINE_EVENTS = frozenset({"opened_stream", "closed_stream"})


def inline_stream_notifications() -> None:
    from libp2p.network import swarm as swarm_module

    Swarm = swarm_module.Swarm
    if getattr(Swarm, "_p2pfleet_fix_26", False):
        return
    upstream = Swarm._notify

    async def notify(self: Any, method: str, *args: Any) -> None:
        if method not in _INLINE_EVENTS:
            return await upstream(self, method, *args)
        for notifee in list(self.notifees):
            try:
                await getattr(notifee, method)(self, *args)
            except Exception:
                swarm_module.logger.exception("Notifee %s.%s raised",
                                              type(notifee).__name__, method)

    Swarm._notify = notify
    Swarm._p2pfleet_fix_26 = True


inline_stream_notifications()


# --- Fix 27: every RPC rebuilds our signed peer record and re-verifies every peer's ---------
# py-libp2p puts the sender's signed peer record in every DHT and GossipSub RPC, and one per
# peer in every FIND_NODE answer (up to k = 20). To send, `env_to_send_in_RPC` rebuilds the
# host's advertised addresses (parsing multiaddrs) and re-serialises the record every time,
# ~11 % of a DHT request's CPU (py-spy, GET_VALUE between two hosts); to receive,
# `consume_envelope` parses and Ed25519-verifies each record again though the same few
# hundred records circulate all day. Now our record's bytes are kept for
# SELF_RECORD_TTL_S (addresses that change reach the record within that time, as upstream
# re-issues it when they differ), and a record whose exact bytes verified before is not
# verified again (bounded LRU of VERIFIED_RECORDS entries: a flood of distinct valid records
# only evicts; an invalid record is checked every time, as before).
# Process-wide, applied when this module is imported.

SELF_RECORD_TTL_S = 1.0
VERIFIED_RECORDS = 4096
_PEER_RECORD_DOMAIN = "libp2p-peer-record"


def cache_signed_peer_records() -> None:
    import importlib
    import time
    import weakref

    from libp2p.peer import envelope as envelope_module, peerstore as peerstore_module

    if getattr(peerstore_module, "_p2pfleet_fix_27", False):
        return
    upstream_send = peerstore_module.env_to_send_in_RPC
    upstream_consume = envelope_module.consume_envelope
    sent: weakref.WeakKeyDictionary[Any, tuple[float, bytes]] = weakref.WeakKeyDictionary()
    verified: OrderedDict[bytes, tuple[Any, Any]] = OrderedDict()

    def env_to_send_in_RPC(host: Any) -> tuple[bytes, bool]:
        now = time.monotonic()
        kept = sent.get(host)
        if kept is not None and now - kept[0] < SELF_RECORD_TTL_S:
            return kept[1], False
        data, fresh = upstream_send(host)
        sent[host] = (now, data)
        return data, fresh

    def consume_envelope(data: bytes, domain: str) -> tuple[Any, Any]:
        if domain != _PEER_RECORD_DOMAIN:
            return upstream_consume(data, domain)
        key = bytes(data)
        hit = verified.get(key)
        if hit is not None:
            verified.move_to_end(key)
            return hit
        hit = upstream_consume(key, domain)  # raises on a bad signature: nothing kept
        verified[key] = hit
        if len(verified) > VERIFIED_RECORDS:
            verified.popitem(last=False)
        return hit

    for name in ("libp2p.identity.identify.identify", "libp2p.identity.update",
                 "libp2p.pubsub.pubsub", "libp2p.pubsub.gossipsub", "libp2p.pubsub.floodsub",
                 "libp2p.pubsub.utils", "libp2p.kad_dht.utils", "libp2p.kad_dht.kad_dht",
                 "libp2p.kad_dht.value_store", "libp2p.kad_dht.provider_store",
                 "libp2p.kad_dht.peer_routing", "libp2p.relay.circuit_v2.utils",
                 "libp2p.relay.circuit_v2.discovery", "libp2p.peer.peerstore",
                 "libp2p.peer.envelope"):
        module = importlib.import_module(name)
        if getattr(module, "env_to_send_in_RPC", None) is upstream_send:
            module.env_to_send_in_RPC = env_to_send_in_RPC  # type: ignore[attr-defined]
        if getattr(module, "consume_envelope", None) is upstream_consume:
            module.consume_envelope = consume_envelope  # type: ignore[attr-defined]
    peerstore_module._p2pfleet_fix_27 = True  # type: ignore[attr-defined]


cache_signed_peer_records()


# --- Fix 28: every yamux read takes the connection's stream lock -----------------------------
# `Yamux.read_stream` takes the connection-wide `streams_lock` for every read, even when the
# bytes asked for are already buffered, and a trio lock is a checkpoint: each read is a pass
# through the run queue, and py-libp2p reads lengths one byte at a time, so a DHT message
# costs a dozen passes per end (50-80 ms each on a busy host: issue 15), and a read waits
# behind any task holding the lock for the whole connection. Now a read of a stream that
# has bytes buffered and is neither reset nor fully closed takes them without the lock (no
# await between the checks and the take: trio runs one task at a time); every other case
# (empty buffer, end of stream, reset, shutdown) goes through upstream's locked path.
# Process-wide, applied when this module is imported.

def lock_free_buffered_reads() -> None:
    from libp2p.stream_muxer.yamux.yamux import Yamux

    if getattr(Yamux, "_p2pfleet_fix_28", False):
        return
    upstream = Yamux.read_stream

    async def read_stream(self: Any, stream_id: int, n: int = -1) -> bytes:
        buffer = self.stream_buffers.get(stream_id)
        stream = self.streams.get(stream_id)
        if (not buffer or stream is None or stream.reset_received or stream.closed
                or self.event_shutting_down.is_set()):
            return await upstream(self, stream_id, n)
        if n is None or n < 0 or n >= len(buffer):
            data = bytes(buffer)
            buffer.clear()
        else:
            data = bytes(buffer[:n])
            del buffer[:n]
        return data

    Yamux.read_stream = read_stream
    Yamux._p2pfleet_fix_28 = True


lock_free_buffered_reads()
