"""Blob exchange over the `blob` stream protocol (v2): serve and fetch content-addressed blobs.

The exchange (specs/work-and-leases.md, sections 5 and 9): the fetcher sends one signed
`blob_request` per stream and closes its write side; the holder answers with one signed
`blob_manifest` (total size, chunk size, codec, the BLAKE3 hash and wire length of every
chunk), then the wire bytes of the chunks from the one holding the requested offset on, back
to back and unsigned, then closes. A holder that cannot or will not serve closes without a
manifest (a missing blob and a refused one look the same to the requester).

Serving: public blobs (models) to any peer, private ones (inputs, outputs) only when the
`authorize(peer, digest, token)` hook says yes; the request's signer must be the stream's
remote peer; at most `max_serves_per_peer` streams per peer at once. A blob the cache does
not hold, or drops as damaged when it is about to be served, is offered to the optional
`recover(peer, digest, token)` hook: the holder of a durable copy (a publisher's job store)
stores it in the cache again if that peer may have it, and it is served as if never lost. The blob's encoding
(chunks, codec, hashes: `BlobCache.encoding`) is built once per blob and kept beside it;
chunks are read ahead (a few in flight; from the page cache on the event loop, else in a
worker thread) and each written within `write_timeout`, the muxer's window giving
back-pressure; the optional `may_send(n)` hook
(the node's daily transfer cap) is asked before each chunk with its wire length.

Fetching: sources are tried one after another in the order of `core.fetch.order_sources`
(DHT providers by standing when asked, then the named sources: the publisher last); each
may be waited on only for its share of the fetch's budget and only while it keeps ahead of
the minimum rate (`core.fetch.source_until`, `core.fetch.Pace`). A transfer that breaks
off, or a source that is abandoned, resumes at the offset reached from the next source (the
bytes are kept in memory and, every few MiB, in the cache's partial file, so a restart
resumes too). The manifest is
checked against the request and the expected size (`wire.blobcodec.plan`), every chunk
against the manifest's hash before it is decoded (its raw size bounded before any
decompression) and written, and the whole blob is hash-checked before it is returned or
cached (its SHA-256 is computed as the bytes arrive, in the worker thread that writes
them). A source that breaks the protocol, trickles, or delivers bytes that do not hash to
the digest is penalised in the mesh's reputation and marked in the node's `SourceScores`,
so it is not asked first again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID

from ..core import fetch as rules
from ..identity import peer_id_from_key
from ..store.blobcache import BlobCache, BlobCorrupt, CacheFull
from ..wire import blobcodec
from ..wire.envelope import encode_body, open_envelope, pack_envelope, seal, signed_bytes
from ..wire.errors import WireError
from ..wire.kinds import BY_CLASS, KINDS, BlobManifest, BlobRequest
from . import dht_providers
from .mesh import Mesh, MeshError
from .relay import is_relayed
from .streams import (
    FRAME_OVERHEAD,
    ChunkReader,
    StreamClosed,
    StreamError,
    close_quietly,
    read_envelope,
    read_exactly,
    remote_peer,
    reset_quietly,
    write_envelope,
)

log = logging.getLogger(__name__)

Authorizer = Callable[[str, bytes, bytes | None], bool]
Recoverer = Callable[[str, bytes, bytes | None], Awaitable[bool]]
BudgetHook = Callable[[int], bool]

MAX_CHUNK = blobcodec.CHUNK_SIZE
REQUEST_CAP = KINDS["blob_request"].max_body + FRAME_OVERHEAD
MANIFEST_CAP = KINDS["blob_manifest"].max_body + FRAME_OVERHEAD
READ_AHEAD = 4  # chunks read (fetcher) or prepared (holder) ahead of the one being handled
# bytes of compressed chunks decoded, and of manifests signed or checked, on the event loop
# (more go to a worker thread)
INLINE_BYTES = 64 * 1024
WRITE_BATCH = 2 * 1024 * 1024  # bytes of a download hashed and written at once, at least
MAX_LENGTH = 2**32 - 1
MESSAGE_LIFETIME_MS = 60_000
RELAYED_ONLY = ("our only connection to it is relayed, and blobs never cross a relay "
                "(fetch from the publisher or a directly connected holder)")
# streams.py raises "oversized" for a frame over the cap; the reputation table calls that
# an invalid message (reachability-and-discovery.md, section 8)
_OFFENCES = {"oversized": "invalid-message"}


class FastSealer:
    """`seal`, byte for byte, with OpenSSL's Ed25519 (through `cryptography`, which
    py-libp2p's Noise already needs): on a large body (a manifest of a big model) it signs
    2-3x faster than PyNaCl (which hashes twice and copies the message). Ed25519
    signatures are deterministic, so the bytes are the same."""

    def __init__(self, identity: Any, network: str):
        self.identity = identity
        self.network = network
        self._key = Ed25519PrivateKey.from_private_bytes(identity.seed)

    def seal(self, body: Any) -> bytes:
        spec = BY_CLASS[type(body)]
        raw = encode_body(body)
        if len(raw) > spec.max_body:
            raise ValueError(f"{spec.name} body is {len(raw)} bytes, cap {spec.max_body}")
        sig = self._key.sign(signed_bytes(self.network, spec.name, spec.major, raw))
        return pack_envelope(self.network, spec.name, spec.major, self.identity.public_key,
                             raw, sig)


class BlobError(Exception):
    """A blob could not be fetched: names the digest, the source(s) and why."""

    def __init__(self, digest: bytes, source: str, reason: str):
        self.digest, self.source, self.reason = digest, source, reason
        super().__init__(f"blob {digest.hex()[:16]} from {source}: {reason}")


class _Fault(Exception):
    """The source broke the protocol: penalise it with `offence`."""

    def __init__(self, offence: str, reason: str):
        super().__init__(reason)
        self.offence = offence


class _Failed(Exception):
    """The source did not deliver (refused, unreachable, went away): no one's fault."""


class _Pacer:
    """A source's `core.fetch.Pace` driving a cancel scope: the scope's deadline follows the
    pace's, so a source that falls behind the minimum rate is cancelled wherever it is
    (dialling, waiting for a frame)."""

    def __init__(self, fetch_rules: rules.FetchRules):
        self.rules = fetch_rules
        self.pace = rules.Pace.started(trio.current_time(), fetch_rules)
        self.scope = trio.CancelScope(deadline=self.pace.deadline)

    def took(self, n: int) -> None:
        self.pace = self.pace.took(n, trio.current_time(), self.rules)
        self.scope.deadline = self.pace.deadline


class _Flusher:
    """Hashes (SHA-256) and writes a download's new bytes in a worker thread,
    WRITE_BATCH bytes or more at a time and one batch at a time, while more arrive."""

    def __init__(self, part: Any, nursery: trio.Nursery):
        self.part = part
        self.nursery = nursery
        self.busy = False

    def poke(self) -> None:
        if not self.busy and self.part.unwritten >= WRITE_BATCH:
            self.busy = True
            self.nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            await trio.to_thread.run_sync(self.part.write_pending)
        finally:
            self.busy = False


@dataclass(frozen=True)
class Served:
    peer: str
    digest: bytes
    offset: int
    sent: int  # raw bytes of the blob past `offset` sent
    wire: int = 0  # bytes of chunks sent (encoded)


@dataclass
class BlobStats:
    served_requests: int = 0
    served_bytes: int = 0
    served_wire_bytes: int = 0
    refused: Counter = field(default_factory=Counter)  # reason -> count
    fetched_bytes: int = 0
    fetched_wire_bytes: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=64))  # Served
    last_failures: list = field(default_factory=list)  # why sources failed, last fetch


class BlobService:
    def __init__(self, mesh: Mesh, cache: BlobCache, *, authorize: Authorizer | None = None,
                 clock: Callable[[], float] = time.time,
                 may_send: BudgetHook | None = None, max_serves_per_peer: int = 4,
                 read_timeout: float = 10.0, write_timeout: float = 30.0,
                 scores: rules.SourceScores | None = None,
                 fetch_rules: rules.FetchRules = rules.RULES):
        self.mesh = mesh
        self.cache = cache
        self.authorize = authorize
        # stores a blob this cache lost again, if the peer may have it (set by a publisher)
        self.recover: Recoverer | None = None
        self.clock = clock
        self.may_send = may_send
        self.max_serves_per_peer = max_serves_per_peer
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.stats = BlobStats()
        # the node's standing of sources; the worker passes its own, so it outlives sessions
        self.scores = scores if scores is not None else rules.SourceScores()
        self.fetch_rules = fetch_rules
        self._serving: Counter = Counter()
        self._fetching: dict[bytes, trio.Lock] = {}
        self._provided: set[bytes] = set()
        self._sealer = FastSealer(mesh.identity, mesh.settings.network)

    @property
    def network(self) -> str:
        return self.mesh.settings.network

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # --- serving ---------------------------------------------------------------------------
    def install(self) -> None:
        self.mesh.set_handler("blob", self._serve)

    async def _serve(self, stream: Any) -> None:
        peer_id = remote_peer(stream)
        peer = str(peer_id)
        if is_relayed(stream):  # relays carry signalling only (specs/reachability-and-discovery.md §3)
            self.stats.refused["relayed connection"] += 1
            log.info("refused a blob request from %s: it came over a relayed connection", peer)
            await reset_quietly(stream)
            return
        if self._serving[peer] >= self.max_serves_per_peer:
            self.stats.refused["busy"] += 1
            await close_quietly(stream)
            return
        self._serving[peer] += 1
        try:
            await self._serve_one(stream, peer_id, peer)
        finally:
            self._serving[peer] -= 1
            if self._serving[peer] <= 0:
                del self._serving[peer]

    async def _serve_one(self, stream: Any, peer_id: Any, peer: str) -> None:
        try:
            raw = await read_envelope(stream, REQUEST_CAP, self.read_timeout)
            opened = open_envelope(raw, self.network, now_ms=self._now_ms(),
                                   kinds={"blob_request"})
        except StreamClosed:
            await close_quietly(stream)
            return
        except StreamError as exc:
            if exc.offence:
                self.mesh.penalize(peer_id, _OFFENCES.get(exc.offence, exc.offence),
                                   f"blob request: {exc}")
            await reset_quietly(stream)
            return
        except WireError as exc:
            if exc.punish:
                self.mesh.penalize(peer_id, "invalid-message", f"blob request: {exc}")
            self.stats.refused["bad request"] += 1
            await reset_quietly(stream)
            return
        if peer_id_from_key(opened.signer) != peer:
            self.mesh.penalize(peer_id, "invalid-message", "blob request signed by another peer")
            await reset_quietly(stream)
            return
        req: BlobRequest = opened.body
        reason = self._refusal(peer, req)
        if reason == "not held" and await self._recovered(peer, req):
            reason = self._refusal(peer, req)
        if reason:
            self.stats.refused[reason] += 1
            await close_quietly(stream)
            return
        enc = (self.cache.encoding_ready(req.digest)
               or await trio.to_thread.run_sync(self.cache.encoding, req.digest))
        if enc is None and await self._recovered(peer, req):  # dropped as damaged
            enc = await trio.to_thread.run_sync(self.cache.encoding, req.digest)
        if enc is None:  # dropped as corrupt, or evicted meanwhile
            self.stats.refused["gone"] += 1
            await close_quietly(stream)
            return
        self.stats.served_requests += 1
        m = blobcodec.manifest(enc, req_id=req.req_id, exp=self._now_ms() + MESSAGE_LIFETIME_MS,
                               digest=req.digest, offset=req.offset)
        stop = min(req.offset + req.length, enc.total_size)
        end = blobcodec.chunk_count(stop, enc.chunk_size) if stop > req.offset else m.first
        done = Served(peer, req.digest, req.offset, 0, 0)
        try:
            if len(m.hashes) + len(m.sizes) <= INLINE_BYTES:  # signing it costs < a thread hop
                frame = self._sealer.seal(m)
            else:
                frame = await trio.to_thread.run_sync(self._sealer.seal, m)
            await write_envelope(stream, frame, self.write_timeout)
            async with trio.open_nursery() as nursery:
                # chunks are read ahead while earlier ones are written
                send, recv = trio.open_memory_channel[tuple[memoryview, int]](READ_AHEAD - 1)
                nursery.start_soon(self._produce, send, req.digest, enc, m.first, end)
                async with recv:
                    async for wire, i in recv:
                        with trio.fail_after(self.write_timeout):
                            await stream.write(wire)
                        lo = max(i * enc.chunk_size, req.offset)
                        hi = min((i + 1) * enc.chunk_size, stop)
                        done = Served(peer, req.digest, req.offset, done.sent + hi - lo,
                                      done.wire + len(wire))
                        self.stats.served_bytes += hi - lo
                        self.stats.served_wire_bytes += len(wire)
        except (trio.TooSlowError, Exception) as exc:  # noqa: BLE001 - the fetcher went away
            log.debug("serving %s to %s stopped: %s", req.digest.hex()[:16], peer, exc)
            self.stats.recent.append(done)
            await reset_quietly(stream)
            return
        self.stats.recent.append(done)
        await close_quietly(stream)

    async def _produce(self, send: Any, digest: bytes, enc: blobcodec.Encoding, first: int,
                       end: int) -> None:
        """Read chunks `first` .. `end - 1` into `send`: on the event loop when the page
        cache holds them (a thread hop per chunk cost more than the read, the thread and
        the event loop then handing the GIL back and forth), else in a worker thread. Each
        is read into one of a ring of buffers: the muxer has copied a chunk into its frames
        when its write returns, and the channel and the writer hold at most READ_AHEAD."""
        at = enc.wire_offset(first)
        file = self.cache.open_wire(digest, enc)
        if file is None:
            self.stats.refused["gone"] += 1
            return
        biggest = max(enc.sizes[first:end], default=0)
        ring = [memoryview(bytearray(biggest)) for _ in range(min(READ_AHEAD + 1, end - first))]
        with file:
            async with send:
                for i in range(first, end):
                    n = enc.sizes[i]
                    if self.may_send is not None and not self.may_send(n):
                        self.stats.refused["transfer budget"] += 1
                        return
                    buf = ring[i % len(ring)]
                    try:
                        wire = self.cache.read_wire(digest, enc, at, n, file, into=buf,
                                                    cached_only=True)
                    except BlockingIOError:
                        wire = await trio.to_thread.run_sync(
                            lambda: self.cache.read_wire(digest, enc, at, n, file, into=buf))
                    if wire is None:  # dropped or evicted meanwhile
                        self.stats.refused["gone"] += 1
                        return
                    await send.send((wire, i))
                    at += n

    async def _recovered(self, peer: str, req: BlobRequest) -> bool:
        """The `recover` hook stored the blob in the cache again for this request."""
        if self.recover is None:
            return False
        try:
            return bool(await self.recover(peer, req.digest, req.token))
        except Exception:  # noqa: BLE001 - a failing hook serves nothing, as when lost
            log.exception("recovering blob %s failed", req.digest.hex()[:16])
            return False

    def _refusal(self, peer: str, req: BlobRequest) -> str | None:
        info = self.cache.info(req.digest)
        if info is None:
            return "not held"
        if req.offset > info.size:
            return "offset past the end"
        if not info.public:
            if self.authorize is None:
                return "private"
            try:
                if not self.authorize(peer, req.digest, req.token):
                    return "not authorized"
            except Exception:  # noqa: BLE001 - a failing hook refuses, it never serves
                log.exception("blob authorizer failed")
                return "not authorized"
        return None

    # --- fetching --------------------------------------------------------------------------
    async def fetch(self, digest: bytes, size: int, sources: Sequence[str], *,
                    token: bytes | None = None, public: bool = False,
                    use_providers: bool = False, timeout: float = 60.0,
                    budget_s: float | None = None, pinned: bool = False,
                    serve: bool | None = None) -> bytes:
        """The blob `digest` of `size` bytes, from the cache or from `sources` (peer ids or
        /p2p/ multiaddrs, asked in order, the last one last; DHT providers before them with
        `use_providers`, for public blobs only). Hash-checked; cached as `public` (and
        `pinned`). BlobError if no source delivers within `timeout` seconds.

        `budget_s`: the whole budget the per-source shares are fractions of (a worker passes
        its lease's fetch time, and as `timeout` what is left of it); default `timeout`.
        `serve`: cache it as public, served to any peer (default: `public`); a worker
        fetching a model it has not run yet passes False (public only after it ran)."""
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise ValueError(f"a blob digest is 32 bytes of SHA-256, got {digest!r:.80}")
        if size < 0:
            raise ValueError(f"blob size must be >= 0, got {size}")
        if use_providers and not public:
            raise ValueError("only public blobs (models) are looked up in the DHT; "
                             "inputs come from the sources a lease names")
        budget_end = trio.current_time() + timeout
        budget_s = timeout if budget_s is None else budget_s
        serve = public if serve is None else serve
        lock = self._fetching.setdefault(digest, trio.Lock())
        try:
            async with lock:
                cached = await self._cached(digest, size, serve, pinned)
                if cached is not None:
                    return cached
                failures: list[str] = []
                self.stats.last_failures = failures
                with trio.move_on_at(budget_end):
                    return await self._fetch(digest, size, sources, token, serve, pinned,
                                             use_providers, failures, budget_end, budget_s)
                raise BlobError(digest, "its sources", f"not complete within {timeout:.0f} s"
                                + (f" ({'; '.join(failures)})" if failures else ""))
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._fetching.pop(digest, None)

    async def _cached(self, digest: bytes, size: int, public: bool, pinned: bool) -> bytes | None:
        if not self.cache.has(digest):  # the usual case, without a thread hop
            return None
        data = await trio.to_thread.run_sync(self.cache.get, digest)
        if data is None:
            return None
        if len(data) != size:
            raise BlobError(digest, "the cache", f"the blob is {len(data)} bytes, "
                                                 f"not the {size} expected")
        if public or pinned:
            await trio.to_thread.run_sync(  # widens the flags only
                lambda: self.cache.put(digest, data, public=public, pinned=pinned))
        return data

    async def _fetch(self, digest: bytes, size: int, sources: Sequence[str],
                     token: bytes | None, public: bool, pinned: bool, use_providers: bool,
                     failures: list[str], budget_end: float, budget_s: float) -> bytes:
        providers: list[str] = []
        if use_providers:
            # the walk, too, must leave the last source its time
            until = rules.source_until(trio.current_time(), last=False, budget_end=budget_end,
                                       budget_s=budget_s, rules=self.fetch_rules)
            if until is not None:
                with trio.move_on_at(until) as walk:
                    try:
                        providers = await self.find_providers(digest)
                    except MeshError as exc:
                        failures.append(f"provider lookup: {exc}")
                if walk.cancelled_caught:
                    failures.append("provider lookup: not done within its share of the time")
        me = self.mesh.identity.peer_id
        banned = {p for p in providers if self.mesh.is_banned(p)}
        order = rules.order_sources(providers, sources, self.scores, self.clock(),
                                    exclude={me} | banned)
        queue = list(order)
        part = self.cache.partial(digest, size, public=public, pinned=pinned)
        # who sent which bytes of the download in `part`: (peer, start, end)
        held: list[tuple[str, int, int]] = (
            [("an earlier download", 0, part.offset)] if part.offset else [])
        suspects: list[rules.Contribution] = []  # bytes of dropped downloads, to compare later
        tried: set[str] = set()
        ask_last_again = True
        try:
            while True:
                if part.offset >= size:
                    senders = {p for p, _s, _e in held if p in tried}
                    snapshot = part.data if len(held) > 1 else b""  # finish() drops bad bytes
                    try:
                        data = await trio.to_thread.run_sync(part.finish)
                    except BlobCorrupt as exc:
                        who = sorted({p for p, _s, _e in held})
                        failures.append(f"{', '.join(who) or 'nobody'}: {exc}")
                        if len(held) == 1 and senders:
                            self._blame(held[0][0], digest, str(exc))
                        elif senders:
                            # several sources: none can be blamed yet. Keep a digest of what
                            # each sent, and ask the last source for a whole copy to compare
                            view = memoryview(snapshot)
                            suspects += [
                                rules.Contribution(p, a, b, hashlib.sha256(view[a:b]).digest())
                                for p, a, b in held if p in senders]
                            if ask_last_again and order and rules.peer_of(order[-1]) in tried:
                                ask_last_again = False
                                tried.discard(rules.peer_of(order[-1]))
                                queue.append(order[-1])
                        part = self.cache.partial(digest, size, public=public, pinned=pinned)
                        held = []
                        if size == 0:
                            break
                        continue
                    except CacheFull as exc:
                        log.warning("fetched blob not cached: %s", exc)
                        data = part.data
                    whole = held[0][0] if len(held) == 1 and held[0][0] in tried else None
                    self._settle(digest, data, suspects, whole)
                    if senders:
                        self.stats.fetched_bytes += size
                    return data
                if not queue:
                    break
                source = queue.pop(0)
                await self._ask(source, not queue, source in sources, part, token, tried,
                                held, failures, budget_end, budget_s)
        finally:
            part.close()
        raise BlobError(digest, ", ".join(sorted(tried)) or "no source",
                        "; ".join(failures) or "no source to fetch it from")

    async def _ask(self, source: str, last: bool, named: bool, part: Any, token: bytes | None,
                   tried: set[str], held: list[tuple[str, int, int]], failures: list[str],
                   budget_end: float, budget_s: float) -> None:
        """Fetch from one source what it delivers within its window and pace. `named`: a
        source the caller gave (the publisher, a seeder), not a provider found in the DHT."""
        fr = self.fetch_rules
        started = trio.current_time()
        until = rules.source_until(started, last=last, budget_end=budget_end,
                                   budget_s=budget_s, rules=fr)
        if until is None:
            failures.append(f"{source}: not asked, the time left is the last source's")
            return
        before = part.offset
        peer: str | None = None
        pacer = _Pacer(fr)
        with trio.move_on_at(until) as window:
            with pacer.scope:
                peer = await self._resolve(source, failures)
                if peer is None or peer in tried or peer == self.mesh.identity.peer_id:
                    return
                tried.add(peer)
                try:
                    await self._fetch_from(peer, part, token, pacer)
                except _Fault as fault:
                    self.mesh.penalize(ID.from_base58(peer), fault.offence,
                                       f"blob {part.digest.hex()[:16]}: {fault}")
                    self.scores.mark(peer, "slow" if fault.offence == "stalled-stream"
                                     else "lied", self.clock())
                    failures.append(f"{peer}: {fault}")
                except _Failed as exc:
                    self.scores.mark(peer, "failed", self.clock())
                    failures.append(f"{peer}: {exc}")
        if peer is not None and part.offset > before:
            held.append((peer, before, part.offset))
        took = trio.current_time() - started
        if part.offset >= part.total_size:
            return  # all delivered: a deadline that passed while the holder closed is no fault
        if pacer.scope.cancelled_caught:
            who = peer or rules.peer_of(source)
            why = (f"{part.offset - before} bytes in {took:.0f} s, under the minimum of "
                   f"{fr.min_rate_bps / 1024:g} KiB/s")
            if peer is None:
                self.scores.mark(who, "failed", self.clock())
            else:
                if not named:
                    # a publisher slowed by its many workers must not be banned by them
                    self.mesh.penalize(ID.from_base58(peer), "stalled-stream",
                                       f"blob {part.digest.hex()[:16]}: {why}")
                self.scores.mark(peer, "slow", self.clock())
            failures.append(f"{who}: too slow: {why}")
        elif window.cancelled_caught:
            failures.append(f"{peer or source}: its share of the time ({until - started:.0f} s) "
                            f"ran out at byte {part.offset} of {part.total_size}")

    def _blame(self, peer: str, digest: bytes, why: str) -> None:
        self.mesh.penalize(ID.from_base58(peer), "invalid-message",
                           f"blob {digest.hex()[:16]}: {why}")
        self.scores.mark(peer, "lied", self.clock())

    def _settle(self, digest: bytes, data: bytes, suspects: list[rules.Contribution],
                whole: str | None) -> None:
        """A copy verified: sources of dropped bytes that differ from it lied; `whole`, the
        one source that sent all of it, served well."""
        for peer in rules.disproved(suspects, data):
            self._blame(peer, digest, "its bytes differ from a copy that hashed to the digest")
        if whole is not None:
            self.scores.served(whole, self.clock())

    async def _resolve(self, source: str, failures: list[str]) -> str | None:
        if not source.startswith("/"):
            return source
        try:
            return await self.mesh.connect(source)
        except MeshError as exc:
            failures.append(str(exc))
            return None

    async def _fetch_from(self, peer: str, part: Any, token: bytes | None,
                          pacer: _Pacer) -> None:
        """Append what `peer` sends from `part.offset` on; raise _Fault or _Failed if it
        stops short of the end. Every chunk accepted is told to `pacer`."""
        size = part.total_size
        host = self.mesh.host
        conns = host.get_network().get_connections(ID.from_base58(peer)) if host else []
        if conns and all(is_relayed(c) for c in conns):  # the holder would refuse the stream
            raise _Failed(RELAYED_ONLY)
        try:
            stream = await self.mesh.open_stream(peer, "blob")
        except MeshError as exc:
            raise _Failed(str(exc).removeprefix(f"{peer}: ")) from None
        if is_relayed(stream):
            await reset_quietly(stream)
            raise _Failed(RELAYED_ONLY)
        req = BlobRequest(req_id=os.urandom(16), exp=self._now_ms() + MESSAGE_LIFETIME_MS,
                          digest=part.digest, offset=part.offset,
                          length=min(size - part.offset, MAX_LENGTH), token=token)
        try:
            await write_envelope(stream, seal(req, self.mesh.identity, self.network),
                                 self.write_timeout)
            await stream.close_write()
        except Exception as exc:  # noqa: BLE001 - a stream failure, nobody's fault
            await reset_quietly(stream)
            raise _Failed(f"sending the request: {type(exc).__name__}: {exc}") from None
        try:
            await self._receive(stream, peer, req, part, pacer)
        except BaseException:
            await reset_quietly(stream)  # shielded: also when the fetch is cancelled
            raise

    async def _receive(self, stream: Any, peer: str, req: BlobRequest, part: Any,
                       pacer: _Pacer) -> None:
        plan = await self._manifest(stream, peer, req, part.total_size)
        error: Exception | None = None
        reader_done = trio.Event()
        clean: list[bool] = []  # the holder closed right after its last chunk
        async with trio.open_nursery() as nursery:
            # chunks are read here while earlier ones are checked and decoded, all those
            # read meanwhile in one go (see _accept_all), and the download's SHA-256 and
            # file write run in a worker thread (_Flusher); at most READ_AHEAD chunks are
            # read ahead. The reader ends after the manifest's last chunk and the stream's
            # end, at a reset, or when we stop receiving; a holder that closed cleanly after
            # the last chunk is not reset.
            send, recv = trio.open_memory_channel[
                tuple[int, list[blobcodec.Buffer]] | StreamError](READ_AHEAD - 1)
            nursery.start_soon(self._read_chunks, stream, plan, send, reader_done, clean)
            flusher = _Flusher(part, nursery)
            try:
                async with recv:
                    index, end = plan.first, plan.end
                    while index < end:
                        batch = [await recv.receive()]
                        while (len(batch) < end - index
                               and not isinstance(batch[-1], StreamError)):
                            try:
                                batch.append(recv.receive_nowait())
                            except trio.WouldBlock:
                                break
                        item = batch[-1]
                        chunks = batch[:-1] if isinstance(item, StreamError) else batch
                        if chunks:
                            await self._accept_all(plan, chunks, part, pacer, flusher)
                            index += len(chunks)
                        if isinstance(item, StreamClosed):
                            raise _Failed(f"stopped at byte {part.offset} of {part.total_size}")
                        if isinstance(item, StreamError):
                            if item.offence:
                                raise _Fault(_OFFENCES.get(item.offence, item.offence),
                                             f"chunk {index}: {item}")
                            raise _Failed(f"at byte {part.offset} of {part.total_size}: {item}")
            except (_Fault, _Failed) as exc:
                error = exc
            if error is None:  # complete: an honest holder closes right after the last chunk
                with trio.move_on_after(2.0):
                    await reader_done.wait()
            if not clean:
                await reset_quietly(stream)  # read no further than the expected size
        if error is not None:
            raise error

    async def _manifest(self, stream: Any, peer: str, req: BlobRequest,
                        size: int) -> blobcodec.Plan:
        """Read and check the holder's manifest: the plan of the chunks that follow."""
        try:
            raw = await read_envelope(stream, MANIFEST_CAP, self.read_timeout)
        except StreamClosed:
            raise _Failed("refused or does not hold it") from None
        except StreamError as exc:
            if exc.offence:
                raise _Fault(_OFFENCES.get(exc.offence, exc.offence), f"manifest: {exc}") from None
            raise _Failed(f"manifest: {exc}") from None
        def opened_manifest() -> Any:
            return open_envelope(raw, self.network, now_ms=self._now_ms(),
                                 kinds={"blob_manifest"})

        try:
            if len(raw) <= INLINE_BYTES:  # checking it costs less than a thread hop
                opened = opened_manifest()
            else:
                opened = await trio.to_thread.run_sync(opened_manifest)
        except WireError as exc:
            if exc.punish:
                raise _Fault("invalid-message", f"manifest: {exc}") from None
            raise _Failed(f"manifest: {exc}") from None
        if peer_id_from_key(opened.signer) != peer:
            raise _Fault("invalid-message", "manifest signed by another peer")
        m: BlobManifest = opened.body
        try:
            return blobcodec.plan(m, req_id=req.req_id, digest=req.digest, offset=req.offset,
                                  length=req.length, expected_size=size)
        except blobcodec.ChunkViolation as exc:
            raise _Fault(exc.offence, f"manifest: {exc}") from None
        except blobcodec.SizeMismatch as exc:
            raise _Failed(str(exc)) from None

    async def _read_chunks(self, stream: Any, plan: blobcodec.Plan, send: Any,
                           done: trio.Event, clean: list[bool]) -> None:
        reader = ChunkReader(stream, sum(plan.wire_len(i) for i in plan.chunks()))
        try:
            async with send:
                for index in plan.chunks():
                    try:
                        wire = await reader.read_parts(plan.wire_len(index), self.read_timeout)
                    except StreamError as exc:
                        await send.send(exc)
                        return
                    await send.send((index, wire))
                try:  # the holder's clean close after its last chunk
                    await read_exactly(stream, 1, self.read_timeout)
                except StreamClosed:
                    clean.append(True)
                except StreamError:
                    pass
        except trio.BrokenResourceError:
            pass  # the fetcher stopped receiving
        finally:
            done.set()

    async def _accept_all(self, plan: blobcodec.Plan,
                          chunks: list[tuple[int, list[blobcodec.Buffer]]],
                          part: Any, pacer: _Pacer, flusher: "_Flusher") -> None:
        """Check, decode and append `chunks` in order; the chunks before one that fails are
        kept. Raw chunks (a BLAKE3 hash and a copy) and small ones are handled on the event
        loop: a worker thread per chunk cost more than that, as the thread and the event
        loop then hand the GIL back and forth. Decompression runs in a worker thread, and
        so does the whole blob's SHA-256 and the file write, in batches (`_Flusher`)."""
        before = part.offset
        wire: list[int] = []
        try:
            if (plan.enc.codec == "none"
                    or sum(plan.enc.raw_len(i) for i, _w in chunks) <= INLINE_BYTES):
                self._accept(plan, chunks, part, wire)
            else:
                await trio.to_thread.run_sync(self._accept, plan, chunks, part, wire)
        finally:
            self.stats.fetched_wire_bytes += sum(wire)
            if part.offset > before:
                pacer.took(part.offset - before)
        flusher.poke()

    @staticmethod
    def _accept(plan: blobcodec.Plan, chunks: list[tuple[int, list[blobcodec.Buffer]]],
                part: Any, wire: list[int]) -> None:
        """Check each chunk against the manifest (BLAKE3), decode it and append it to the
        download; the wire length of each accepted goes to `wire`."""
        for index, parts in chunks:
            try:
                raw = plan.decode_parts(index, parts)
            except blobcodec.ChunkViolation as exc:
                raise _Fault(exc.offence, f"chunk {index}: {exc}") from None
            for piece in raw:
                part.append(piece)
            wire.append(sum(map(len, parts)))

    # --- DHT providers (public blobs only) ------------------------------------------------
    async def provide(self, digest: bytes) -> int:
        """Announce this node in the DHT as a provider of the public blob `digest` (a
        model), and keep re-announcing it from `run` while it stays cached. Returns to how
        many peers the announcement went: none from a relay-only node, which is reached
        only through relays, and blobs never cross a relay (specs/reachability-and-discovery.md
        §3, §5)."""
        if not self.cache.is_public(digest):
            raise ValueError(f"blob {digest.hex()[:16]} is not a public blob in the cache; "
                             "only models are announced")
        if self.mesh.dht is None:
            raise MeshError("the mesh is not running")
        if self.mesh.settings.relay_only:
            log.debug("not announcing blob %s: relay-only nodes serve no blobs", digest.hex()[:16])
            return 0
        self._provided.add(digest)
        return await dht_providers.provide(
            self.mesh.dht, dht_providers.provider_key(self.mesh.names, digest))

    async def find_providers(self, digest: bytes, limit: int = 8) -> list[str]:
        """Peer ids (not ours) that announced the blob `digest` in the DHT; their addresses
        go to the peerstore, so `fetch` can dial them."""
        if self.mesh.dht is None:
            raise MeshError("the mesh is not running")
        me = self.mesh.host.get_id()
        walk = await dht_providers.walk(
            self.mesh.dht, dht_providers.provider_key(self.mesh.names, digest), want=limit + 1)
        return [str(p) for p in walk.providers if p != me][:limit]

    async def run(self, *, reprovide_s: float = dht_providers.REPROVIDE_S,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Re-announce provided blobs every `reprovide_s` while they stay cached."""
        task_status.started()
        while True:
            await trio.sleep(reprovide_s)
            for digest in list(self._provided):
                if not self.cache.is_public(digest):
                    self._provided.discard(digest)
                    continue
                try:
                    await self.provide(digest)
                except (MeshError, ValueError) as exc:
                    log.info("re-announcing blob %s: %s", digest.hex()[:16], exc)
