"""The publisher SDK: submit a model and inputs to the fleet, get verified outputs back.

    async with connect("pub-data", network="main", bootstrap=[...]) as client:
        job = await client.submit("model.onnx", {"x": array}, shard_size=256, quorum=2)
        async for part in job.results():          # input order; order="completed" also works
            use(part.first_sample, part.outputs)
        report = await job.wait()

`connect` runs an embedded publisher (a libp2p host, the publisher engine, its SQLite job
store and blob cache) in the publisher's own data directory; `run_job` does all of it from
synchronous code. A job survives the process: `client.job(job_id)` (or `p2pfleet job
resume`) picks it up from the store with nothing accepted lost and nothing recomputed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from ..live.control import serve_control
from ..live.datadir import DataDir
from ..identity import Identity, key_from_peer_id, load_key, peer_id_from_key, save_key
from ..net.blobs import BlobService
from ..net.mesh import Mesh, MeshSettings
from ..net.reachability import warn_while_private
from ..publisher import JobSpec, JobStatus, Publisher, PublisherError, PublisherSettings
from ..store.blobcache import BlobCache
from ..wire.kinds import Requirements
from .inputs import InputError, load_inputs, load_model

POLL_S = 0.2
# py-libp2p logs routine peer errors at WARNING; without a handler of the application's
# own they would reach stderr through logging's last resort. Applications that configure
# logging still receive them.
logging.getLogger("libp2p").addHandler(logging.NullHandler())
STORE_NAME = "jobs.sqlite"
SUBMIT_OPTIONS = ("shard_size", "micro_batch", "quorum", "max_replicas", "max_error",
                  "deadline_s", "credit_rate", "budget", "opt_level", "ort_versions",
                  "min_memory_mb", "known_answer_rate", "recheck_rate", "audit_rate")
CONTROL_NAME = "control.sock"


class SdkError(Exception):
    """A publisher operation failed; the message says what to do."""


@dataclass(frozen=True)
class ShardResult:
    """Verified outputs of one shard: samples [first_sample, first_sample + rows).

    `revised`: this shard was given before, but a worker whose result helped accept it was
    excluded since (verification.md, section 8), so it was verified again: these outputs
    replace the earlier ones.

    `fallback`: "" for a shard verified under the usual rules; "publisher" when no eligible
    worker could take it and the publisher computed it itself (its own result decided it);
    else the replica rules relaxed for it, e.g. "reissue,prefix" (work-and-leases.md,
    section 4, "Stalled shards")."""

    shard: int
    first_sample: int
    outputs: dict[str, np.ndarray]
    revised: bool = False
    fallback: str = ""

    @property
    def rows(self) -> int:
        return int(next(iter(self.outputs.values())).shape[0]) if self.outputs else 0


@dataclass(frozen=True)
class JobReport:
    """What became of a job (also printed at the end of `job submit`)."""

    job_id: str
    state: str
    shards: int
    accepted: int
    failed: int
    replicas: int
    rejected: int
    nodes: int
    samples: int
    elapsed_s: float
    samples_per_s: float
    credit_paid: int
    budget: int | None
    evidence: list[dict] = field(default_factory=list)
    waiting: str = ""
    self_computed: int = 0     # stalled shards the publisher computed itself
    relaxed: int = 0           # stalled shards decided under relaxed replica rules

    @property
    def replication(self) -> float:
        """Replicas issued per accepted shard (1.0: every shard computed once)."""
        return self.replicas / self.accepted if self.accepted else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "replication": round(self.replication, 3)}

    def table(self) -> Any:
        from rich.table import Table

        t = Table(title=f"job {self.job_id[:16]}", show_header=False)
        rows = [
            ("state", self.state + (f" ({self.waiting})" if self.waiting else "")),
            ("shards accepted / failed / total", f"{self.accepted} / {self.failed} / {self.shards}"),
            ("replicas issued", f"{self.replicas} ({self.replication:.2f} per accepted shard)"),
            ("results rejected", str(self.rejected)),
            ("nodes that computed", str(self.nodes)),
            ("throughput", f"{self.samples_per_s:,.1f} samples/s over {self.elapsed_s:.1f} s"),
            ("credit paid", f"{self.credit_paid}" + (f" of {self.budget}" if self.budget else "")),
            ("evidence reports", str(len(self.evidence))),
        ]
        if self.self_computed or self.relaxed:
            rows.append(("stalled shards", f"{self.self_computed} computed by the publisher, "
                                           f"{self.relaxed} under relaxed rules"))
        for e in self.evidence:
            rows.append(("  excluded", f"{e['accused'][:20]}... {e['claim']}"))
        for k, v in rows:
            t.add_row(k, v)
        return t


class Job:
    """A submitted job. Obtain from `Client.submit` or `Client.job`."""

    def __init__(self, publisher: Publisher, job_id: bytes, started: float):
        self.publisher = publisher
        self.job_id = job_id
        self.started = started

    @property
    def id(self) -> str:
        return self.job_id.hex()

    @property
    def _pub(self) -> Publisher:
        return self.publisher

    def status(self) -> JobStatus:
        return self._pub.status(self.job_id)

    def _rows(self) -> list[tuple[int, int]]:
        return [tuple(r) for r in self._pub._meta[self.job_id]["real_rows"]]

    def samples(self) -> int:
        rows = self._rows()
        return rows[-1][1] if rows else 0

    def finished(self) -> bool:
        return self.status().state != "live"

    async def results(self, order: str = "input") -> AsyncIterator[ShardResult]:
        """Accepted shards' outputs as they are verified: in input order (`"input"`, each
        shard once all before it are out) or `"completed"` (as soon as accepted). Ends when
        the job is done, failed or cancelled (failed shards are skipped: see the report)."""
        if order not in ("input", "completed"):
            raise ValueError("order must be 'input' or 'completed'")
        given: dict[int, bytes | None] = {}  # shard -> the accepted lease it was given from
        rows = self._rows()
        next_shard = 0
        while True:
            done_before = self.finished()
            accepted = dict(self._pub.shard_outputs(self.job_id))
            recs = self._pub.shard_records(self.job_id)
            accepted = {i: outs for i, outs in accepted.items()
                        if given.get(i, b"") != recs[i].accepted_lease}
            failed = {i for i, sh in enumerate(recs) if sh.status == "failed"}
            for i in sorted(set(accepted) & set(given)):  # verified again after an exclusion
                given[i] = recs[i].accepted_lease
                yield ShardResult(i, rows[i][0], accepted.pop(i), revised=True,
                                  fallback=recs[i].fallback)
            if order == "completed":
                for i in sorted(accepted):
                    given[i] = recs[i].accepted_lease
                    yield ShardResult(i, rows[i][0], accepted[i], fallback=recs[i].fallback)
            else:
                while next_shard < len(rows):
                    if next_shard in accepted:
                        given[next_shard] = recs[next_shard].accepted_lease
                        yield ShardResult(next_shard, rows[next_shard][0], accepted[next_shard],
                                          fallback=recs[next_shard].fallback)
                    elif next_shard not in failed:
                        break
                    next_shard += 1
            if done_before:
                return
            with trio.move_on_after(POLL_S):  # a shard's change wakes it at once
                await self._pub.changed(self.job_id).wait()

    def outputs(self) -> dict[str, np.ndarray]:
        """All outputs in sample order (every shard must be accepted)."""
        try:
            return self._pub.outputs(self.job_id)
        except PublisherError as exc:
            raise SdkError(str(exc)) from None

    async def wait(self, *, progress: bool | None = None, timeout: float | None = None) -> JobReport:
        """Wait until the job is done (or `timeout` s, then SdkError); a rich progress bar
        on a terminal (`progress=None`), or always/never."""
        show = sys.stderr.isatty() if progress is None else progress
        with trio.fail_after(timeout if timeout is not None else math.inf):
            if show:
                await self._wait_with_bar()
            else:
                while not self.finished():
                    await trio.sleep(POLL_S)
        return self.report()

    async def _wait_with_bar(self) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        st = self.status()
        with Progress(TextColumn("[bold]job {task.fields[job]}"), BarColumn(),
                      MofNCompleteColumn(), TextColumn("shards  {task.fields[info]}"),
                      TimeElapsedColumn(), transient=False) as bar:
            task = bar.add_task("job", total=st.shards, job=self.id[:8], info="")
            while True:
                st = self.status()
                bar.update(task, completed=st.accepted + st.failed,
                           info=f"{st.live} running, {st.workers} nodes, {st.rejected} rejected"
                                + (f", {st.waiting}" if st.waiting else ""))
                if st.state != "live":
                    return
                await trio.sleep(POLL_S)

    def report(self) -> JobReport:
        st = self.status()
        elapsed = max(1e-9, time.time() - self.started)
        done_samples = sum(r.rows for r in self._accepted_now())
        evidence = [{"accused": peer_id_from_key(accused), "claim": claim,
                     "envelope_hex": env.hex()}
                    for accused, claim, env in self._pub.store.evidence(self.job_id)]
        return JobReport(
            job_id=self.id, state=st.state, shards=st.shards, accepted=st.accepted,
            failed=st.failed, replicas=st.leases, rejected=st.rejected, nodes=st.workers,
            samples=done_samples, elapsed_s=round(elapsed, 3),
            samples_per_s=round(done_samples / elapsed, 3), credit_paid=st.credit_paid,
            budget=st.budget, evidence=evidence, waiting=st.waiting,
            self_computed=st.self_computed, relaxed=st.relaxed)

    def _accepted_now(self) -> list[ShardResult]:
        rows = self._rows()
        recs = self._pub.shard_records(self.job_id)
        return [ShardResult(i, rows[i][0], outs, fallback=recs[i].fallback)
                for i, outs in self._pub.shard_outputs(self.job_id)]

    def export(self, out_dir: str | Path) -> list[Path]:
        """Write the accepted outputs: `<output>.npy` per model output (all shards must be
        accepted) and `results.jsonl` (one line per sample: index and outputs as lists,
        for every accepted shard, and `fallback` where its shard stalled, as in ShardResult).
        Returns the files written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        parts = self._accepted_now()
        st = self.status()
        if st.accepted == st.shards and parts:  # the parts are every shard, in order
            whole = {n: np.concatenate([p.outputs[n] for p in parts], axis=0)
                     for n in parts[0].outputs}
            for name, arr in whole.items():
                path = out / f"{_safe(name)}.npy"
                np.save(path, arr, allow_pickle=False)
                written.append(path)
        lines = out / "results.jsonl"
        with open(lines, "w", encoding="utf-8") as f:
            for part in parts:
                for r in range(part.rows):
                    row = {"index": part.first_sample + r,
                           **{n: a[r].tolist() for n, a in part.outputs.items()}}
                    if part.fallback:
                        row["fallback"] = part.fallback
                    f.write(json.dumps(row) + "\n")
        written.append(lines)
        return written

    async def cancel(self) -> None:
        self._pub.cancel(self.job_id)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "output"


class Client:
    """An embedded publisher; use `connect` to get one."""

    def __init__(self, identity: Identity, mesh: Mesh, publisher: Publisher, blobs: BlobService):
        self.identity = identity
        self.mesh = mesh
        self.publisher = publisher
        self.blobs = blobs

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def listen_addrs(self) -> list[str]:
        return self.mesh.listen_addrs()

    async def submit(self, model: bytes | str | Path, inputs: Any, *, shard_size: int = 256,
                     micro_batch: int = 64, quorum: int = 2, max_replicas: int = 0,
                     max_error: int = 3, deadline_s: float | None = None, credit_rate: int = 1,
                     budget: int | None = None, preprocess: Callable[[Path], Any] | None = None,
                     opt_level: str = "all", ort_versions: str = "",
                     min_memory_mb: int = 0, known_answer_rate: float = 1.0,
                     recheck_rate: float = 0.07, audit_rate: float = 0.05) -> Job:
        """Shard, store and announce a job; returns at once (see `Job.wait`/`results`).

        `max_replicas`: replicas a shard may get at most (0: 2 x quorum + 4); `deadline_s`:
        cancel the job if it is not done by then; `credit_rate`: credit per sample;
        `budget`: credit the job may spend at most. Inputs: see `sdk.inputs.load_inputs`."""
        from ..publisher import JobSpecError

        model_bytes = load_model(model)
        arrays = load_inputs(inputs, model_bytes, preprocess=preprocess)
        spec = JobSpec(model=model_bytes, inputs=arrays, shard_size=shard_size,
                       micro_batch=min(micro_batch, shard_size), quorum=quorum,
                       max_error=max_error, max_total=max_replicas, credit_rate=credit_rate,
                       budget=budget, opt_level=opt_level, ort_versions=ort_versions,
                       requirements=Requirements(min_memory_mb, (), "0.0.0", ort_versions),
                       known_answer_rate=known_answer_rate, recheck_rate=recheck_rate,
                       audit_rate=audit_rate)
        try:
            job_id = await self.publisher.submit_async(spec)  # shards off the event loop
        except JobSpecError as exc:
            raise SdkError(str(exc)) from None
        job = Job(self.publisher, job_id, time.time())
        if deadline_s is not None:
            self._nursery.start_soon(self._deadline, job, deadline_s)
        return job

    async def _deadline(self, job: Job, deadline_s: float) -> None:
        with trio.move_on_after(deadline_s):
            while not job.finished():
                await trio.sleep(POLL_S)
            return
        await job.cancel()

    def job(self, job_id: str | bytes) -> Job:
        """A stored job (resumed: its open shards are leased again)."""
        try:
            jid = bytes.fromhex(job_id) if isinstance(job_id, str) else job_id
        except ValueError:
            raise SdkError(f"{job_id!r} is not a job id (32 hex digits)") from None
        try:
            self.publisher.resume(jid)
        except PublisherError as exc:
            raise SdkError(str(exc)) from None
        return Job(self.publisher, jid, time.time())

    def jobs(self) -> list[str]:
        return [j.hex() for j in self.publisher.store.job_ids()]

    async def _control(self, request: dict) -> dict:
        """`p2pfleet job status|cancel` from another terminal reach the running publisher."""
        cmd = request.get("cmd")
        try:
            if cmd == "status":
                return {"ok": True, "jobs": [job_view(self.publisher, bytes.fromhex(j))
                                             for j in self.jobs()],
                        "peer_id": self.peer_id, "listen_addrs": self.listen_addrs()}
            if cmd == "cancel":
                self.publisher.cancel(bytes.fromhex(str(request.get("job_id", ""))))
                return {"ok": True}
            if cmd == "submit":  # from an attached client on this machine (sdk.attach)
                options = {k: v for k, v in dict(request.get("options") or {}).items()
                           if k in SUBMIT_OPTIONS}
                job = await self.submit(Path(str(request["model"])), Path(str(request["inputs"])),
                                        **options)
                return {"ok": True, "job_id": job.id}
        except (ValueError, KeyError, TypeError, PublisherError, SdkError, InputError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": f"unknown command {cmd!r}; known: status, cancel, submit"}


def job_view(publisher: Publisher, job_id: bytes) -> dict:
    """A job's status as plain data (CLI tables and --json)."""
    st = publisher.status(job_id)
    return {"job_id": job_id.hex(), "state": st.state, "shards": st.shards,
            "accepted": st.accepted, "failed": st.failed, "replicas": st.leases, "live": st.live,
            "rejected": st.rejected, "nodes": st.workers, "evidence": st.evidence,
            "credit_paid": st.credit_paid, "budget": st.budget, "waiting": st.waiting,
            "self_computed": st.self_computed, "relaxed": st.relaxed}


@contextmanager
def open_offline(data_dir: str | Path) -> Iterator[Publisher]:
    """The publisher's store without a network (status, results, cancel while no publisher
    runs): a Publisher whose mesh is never started."""
    dd = DataDir(Path(data_dir))
    if not (dd.root / STORE_NAME).exists():
        raise SdkError(f"no publisher job store in {dd.root} (submit a job first)")
    identity = load_key(dd.key_file)
    mesh = Mesh(identity, MeshSettings(network="offline", listen=()))
    publisher = Publisher(identity, mesh, dd.root / STORE_NAME, None)
    try:
        yield publisher
    finally:
        publisher.close()


def with_trusted(settings: PublisherSettings, trusted: Sequence[str]) -> PublisherSettings:
    if not trusted:
        return settings
    keys = frozenset(key_from_peer_id(p) for p in trusted)
    sched = settings.scheduler
    trust = dataclasses.replace(sched.trust, trusted=sched.trust.trusted | keys)
    return dataclasses.replace(settings, scheduler=dataclasses.replace(sched, trust=trust))


def open_publisher_dir(data_dir: str | Path) -> tuple[DataDir, Identity]:
    """The publisher's data dir, locked, with its key (made on first use)."""
    dd = DataDir(Path(data_dir)).open(create=True, lock=True)
    if not dd.key_file.exists():
        save_key(dd.key_file, Identity.generate())
    return dd, load_key(dd.key_file)


@asynccontextmanager
async def connect(data_dir: str | Path, *, network: str = "main",
                  listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",), bootstrap: Sequence[str] = (),
                  settings: PublisherSettings | None = None, cache_mb: int = 2048,
                  trusted: Sequence[str] = (),
                  mesh_overrides: dict | None = None) -> AsyncIterator[Client]:
    """Start an embedded publisher in `data_dir` (created if new) and yield a `Client`.

    `trusted`: peer ids of workers this publisher trusts from the start (its own machines):
    a new network has no established identities, and a shard's second replica only goes to
    an established or trusted one (specs/work-and-leases.md, section 4)."""
    settings = with_trusted(settings or PublisherSettings(), trusted)
    dd, identity = open_publisher_dir(data_dir)
    try:
        mesh = Mesh(identity, MeshSettings(network=network, listen=tuple(listen),
                                           bootstrap=tuple(bootstrap), **(mesh_overrides or {})))
        cache = BlobCache(dd.cache_dir / "blobs", cache_mb * 2**20)
        blobs = BlobService(mesh, cache)
        blobs.install()
        publisher = Publisher(identity, mesh, dd.root / STORE_NAME, blobs, settings=settings)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(mesh.run)
                # a publisher must be reachable (specs/reachability-and-discovery.md §3)
                nursery.start_soon(warn_while_private, mesh.reachable, "publisher")
                await nursery.start(publisher.run)
                nursery.start_soon(blobs.run)
                client = Client(identity, mesh, publisher, blobs)
                client._nursery = nursery
                await nursery.start(serve_control, dd.root / CONTROL_NAME, client._control)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            publisher.close()
            cache.close()
    finally:
        dd.close()


def run_job(model: bytes | str | Path, inputs: Any, *, data_dir: str | Path,
            network: str = "main", bootstrap: Sequence[str] = (),
            listen: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",), trusted: Sequence[str] = (),
            settings: PublisherSettings | None = None, progress: bool | None = None,
            timeout: float | None = None, **submit: Any) -> tuple[dict[str, np.ndarray], JobReport]:
    """Synchronous helper for scripts: submit, wait, return (outputs, report). Arguments as
    `connect` and `Client.submit`."""
    async def main() -> tuple[dict[str, np.ndarray], JobReport]:
        async with connect(data_dir, network=network, bootstrap=bootstrap, listen=listen,
                           trusted=trusted, settings=settings) as client:
            job = await client.submit(model, inputs, **submit)
            report = await job.wait(progress=progress, timeout=timeout)
            return job.outputs(), report

    return trio.run(main)


class AttachedClient:
    """A client of a publisher already running on this machine (`p2pfleet job serve`, or a
    `job submit` in another terminal), through its control socket and its store."""

    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir)
        self.socket = self.data_dir / CONTROL_NAME

    def _ask(self, cmd: str, **args: Any) -> dict:
        from ..live.control import ControlError, request

        try:
            reply = request(self.socket, cmd, timeout=120.0, **args)
        except ControlError as exc:
            raise SdkError(f"no publisher running in {self.data_dir}: {exc}") from None
        if not reply.get("ok"):
            raise SdkError(reply.get("error", f"{cmd} refused"))
        return reply

    def submit(self, model: bytes | str | Path, inputs: Any, **options: Any) -> str:
        """Submit (the model and inputs are handed over as files in the publisher's
        directory); returns the job id."""
        import uuid

        unknown = set(options) - set(SUBMIT_OPTIONS)
        if unknown:
            raise SdkError(f"unknown submit options {sorted(unknown)}")
        model_bytes = load_model(model)
        arrays = load_inputs(inputs, model_bytes)
        inbox = self.data_dir / "incoming"
        inbox.mkdir(mode=0o700, exist_ok=True)
        name = uuid.uuid4().hex
        model_path, inputs_path = inbox / f"{name}.onnx", inbox / f"{name}.npz"
        model_path.write_bytes(model_bytes)
        np.savez(inputs_path, **arrays)
        try:
            return self._ask("submit", model=str(model_path), inputs=str(inputs_path),
                             options=options)["job_id"]
        finally:
            model_path.unlink(missing_ok=True)
            inputs_path.unlink(missing_ok=True)

    def status(self, job_id: str | None = None) -> list[dict]:
        jobs = self._ask("status")["jobs"]
        return [j for j in jobs if job_id is None or j["job_id"] == job_id]

    def cancel(self, job_id: str) -> None:
        self._ask("cancel", job_id=job_id)

    def wait(self, job_id: str, *, timeout: float | None = None, poll_s: float = 0.5) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            found = self.status(job_id)
            if not found:
                raise SdkError(f"the publisher has no job {job_id}")
            if found[0]["state"] != "live":
                return found[0]
            if deadline is not None and time.monotonic() > deadline:
                raise SdkError(f"job {job_id} not done within {timeout} s")
            time.sleep(poll_s)

    def export(self, job_id: str, out_dir: str | Path) -> list[Path]:
        """Write the job's accepted outputs (read from the publisher's store)."""
        with open_offline(self.data_dir) as pub:
            return Job(pub, bytes.fromhex(job_id), time.time()).export(out_dir)


def attach(data_dir: str | Path) -> AttachedClient:
    """Attach to the publisher running in `data_dir` (synchronous API)."""
    client = AttachedClient(data_dir)
    client._ask("status")  # fails now, clearly, if nothing runs there
    return client
