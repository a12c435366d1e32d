"""`p2pfleet job ...`: publish work to the fleet from the command line.

`job submit MODEL INPUTS` runs an embedded publisher (`p2pfleet.sdk`) in the foreground:
it shards and stores the job, announces it, leases shards to the nodes that ask, verifies
their results and pays receipts, with a progress bar, until the job is done; then it prints
the report and, with --out, writes the outputs. Ctrl-C (or a kill) leaves the job in the
store: `job resume JOB` carries on with nothing accepted lost and nothing recomputed.
`job status`, `job results` and `job cancel` work from another terminal, while the publisher
runs (through its control socket) or not (from its store).

The publisher keeps its own key and store in <data dir>/publisher (or --publisher-dir), apart
from the node's, so a machine can run a node and publish at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .app import App, CliError, console, json_option, pass_app

PUBLISHER_SUBDIR = "publisher"


def _pub_dir(app: App, given: Path | None) -> Path:
    return given if given is not None else app.data_dir.root / PUBLISHER_SUBDIR


def _net(app: App, listen: tuple[str, ...], bootstrap: tuple[str, ...],
         event_log: Path | None = None) -> dict:
    """connect() arguments from the config ([node] network and bootstrap, [publishing])."""
    from ..core.scheduler import SchedulerSettings
    from ..core.trust import TrustSettings
    from ..publisher import PublisherSettings

    cfg = app.config()
    p = cfg.publishing
    sched = SchedulerSettings(
        request_interval_ms=int(p.request_interval_s * 1000),
        min_deadline_ms=int(p.min_lease_s * 1000),
        cross_class_wait_ms=int(p.cross_class_wait_s * 1000),
        stall_wait_ms=int(p.stall_wait_s * 1000),
        trust=TrustSettings(established_accepted=p.established_results,
                            established_age_ms=int(p.established_age_h * 3_600_000)))
    return {"network": cfg.node.network,
            "listen": list(listen) or ["/ip4/0.0.0.0/tcp/0"],
            "bootstrap": list(bootstrap) + list(cfg.node.bootstrap),
            "settings": PublisherSettings(scheduler=sched, event_log=event_log,
                                          announce_interval_s=p.announce_interval_s,
                                          self_audit=p.self_compute,
                                          forget_ended_after_s=p.forget_ended_after_s)}


publisher_dir_option = click.option(
    "--publisher-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="The publisher's own directory (key, job store, blobs). Default: <data dir>/publisher.")


def _network_options(fn: Any) -> Any:
    fn = click.option("--event-log", type=click.Path(dir_okay=False, path_type=Path),
                      default=None, help="Append every scheduler event to this file (JSON "
                      "lines), for replay.")(fn)
    fn = click.option("--listen", multiple=True, metavar="MULTIADDR",
                      help="Listen here (repeatable). Default: any address, a free port.")(fn)
    fn = click.option("--bootstrap", multiple=True, metavar="MULTIADDR",
                      help="A node to contact first, /.../p2p/<peer id> (repeatable; added to "
                           "node.bootstrap).")(fn)
    fn = click.option("--trust", multiple=True, metavar="PEER_ID",
                      help="A worker trusted from the start, e.g. your own machine "
                           "(repeatable): a shard's second replica only goes to trusted or "
                           "established identities.")(fn)
    return fn


def _wait_options(fn: Any) -> Any:
    fn = click.option("--timeout", type=click.FloatRange(min=1), default=None,
                      help="Stop waiting (the job stays in the store) after this many "
                           "seconds.")(fn)
    fn = click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                      help="Write the outputs here when done (<output>.npy and "
                           "results.jsonl).")(fn)
    return fn


@click.group("job")
def job_group() -> None:
    """Publish inference jobs: submit, status, results, resume, cancel, serve."""


@job_group.command("submit")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("inputs", type=click.Path(exists=True, path_type=Path))
@click.option("--shard-size", type=click.IntRange(1), default=256, show_default=True,
              help="Samples per shard.")
@click.option("--micro-batch", type=click.IntRange(1), default=64, show_default=True,
              help="Samples per micro-batch (every replica runs exactly this).")
@click.option("--quorum", type=click.IntRange(1, 255), default=2, show_default=True,
              help="Agreeing results needed per shard.")
@click.option("--max-replicas", type=click.IntRange(0), default=0,
              help="Replicas per shard at most (0: 2 x quorum + 4).")
@click.option("--deadline", "deadline_s", type=click.FloatRange(min=1), default=None,
              help="Cancel the job if not done after this many seconds.")
@click.option("--credit-rate", type=click.IntRange(1), default=1, show_default=True,
              help="Credit units paid per sample.")
@click.option("--budget", type=click.IntRange(0), default=None, help="Credit the job may spend at most.")
@_wait_options
@_network_options
@publisher_dir_option
@json_option
@pass_app
def job_submit(app: App, model: Path, inputs: Path, shard_size: int, micro_batch: int,
               quorum: int, max_replicas: int, deadline_s: float | None, credit_rate: int,
               budget: int | None, out: Path | None, timeout: float | None,
               listen: tuple[str, ...], bootstrap: tuple[str, ...], trust: tuple[str, ...],
               event_log: Path | None, publisher_dir: Path | None) -> None:
    """Submit MODEL (.onnx) over INPUTS (.npy, or .npz with one array per model input) and
    publish it until done."""
    async def start(client: Any) -> Any:
        job = await client.submit(model, inputs, shard_size=shard_size, micro_batch=micro_batch,
                                  quorum=quorum, max_replicas=max_replicas,
                                  deadline_s=deadline_s, credit_rate=credit_rate, budget=budget)
        click.echo(f"job {job.id} submitted by publisher {client.peer_id} "
                   f"({job.samples()} samples, {job.status().shards} shards)", err=True)
        return job

    _publish_until_done(app, start, out, timeout, trust,
                        _pub_dir(app, publisher_dir), _net(app, listen, bootstrap, event_log))


def _publish_until_done(app: App, start: Any, out: Path | None, timeout: float | None,
                        trust: tuple[str, ...], pub_dir: Path, net: dict) -> None:
    """Run an embedded publisher; `start(client)` gives the job; wait, export, report."""
    import trio

    from ..sdk import connect
    from ..sdk.client import SdkError
    from ..sdk.inputs import InputError

    async def main() -> dict:
        async with connect(pub_dir, trusted=trust, **net) as client:
            job = await start(client)
            try:
                report = await job.wait(progress=None if not app.json else False, timeout=timeout)
            except trio.TooSlowError:
                report = job.report()
            files = job.export(out) if out is not None else []
            return {"report": report.to_dict(), "files": [str(f) for f in files], "table": report}

    try:
        result = trio.run(main)
    except (SdkError, InputError) as exc:
        raise CliError(str(exc)) from None
    table = result.pop("table")
    app.emit(result, lambda: (console().print(table),
                              [click.echo(f"wrote {f}") for f in result["files"]]))


@job_group.command("resume")
@click.argument("job_id")
@_wait_options
@_network_options
@publisher_dir_option
@json_option
@pass_app
def job_resume(app: App, job_id: str, out: Path | None, timeout: float | None,
               listen: tuple[str, ...], bootstrap: tuple[str, ...], trust: tuple[str, ...],
               event_log: Path | None, publisher_dir: Path | None) -> None:
    """Carry on publishing a stored job (after Ctrl-C, a crash or a kill) until done."""
    async def start(client: Any) -> Any:
        job = client.job(job_id)
        st = job.status()
        click.echo(f"job {job.id}: {st.accepted} of {st.shards} shards already accepted",
                   err=True)
        return job

    _publish_until_done(app, start, out, timeout, trust,
                        _pub_dir(app, publisher_dir), _net(app, listen, bootstrap, event_log))


@job_group.command("serve")
@_network_options
@publisher_dir_option
@pass_app
def job_serve(app: App, listen: tuple[str, ...], bootstrap: tuple[str, ...],
              trust: tuple[str, ...], event_log: Path | None,
              publisher_dir: Path | None) -> None:
    """Run the publisher until Ctrl-C: it serves the stored live jobs and takes new ones
    from `p2pfleet.sdk.attach` and `job status/cancel` on this machine."""
    import signal

    import trio

    from ..sdk import connect

    async def main() -> None:
        async with connect(_pub_dir(app, publisher_dir), trusted=trust,
                           **_net(app, listen, bootstrap, event_log)) as client:
            click.echo(f"publisher {client.peer_id} listening on "
                       f"{', '.join(client.listen_addrs())}; jobs in the store: "
                       f"{len(client.jobs())}", err=True)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    return

    trio.run(main)


def _live(app: App, publisher_dir: Path | None) -> Path | None:
    sock = _pub_dir(app, publisher_dir) / "control.sock"
    return sock if sock.exists() else None


@job_group.command("status")
@click.argument("job_id", required=False)
@publisher_dir_option
@json_option
@pass_app
def job_status(app: App, job_id: str | None, publisher_dir: Path | None) -> None:
    """Jobs in the publisher's store: shards accepted, replicas, nodes, evidence."""
    from ..live.control import ControlError, request
    from ..sdk.client import SdkError, job_view, open_offline

    jobs: list[dict] | None = None
    running = False
    sock = _live(app, publisher_dir)
    if sock is not None:
        try:
            jobs = request(sock, "status")["jobs"]
            running = True
        except ControlError:
            jobs = None
    if jobs is None:
        try:
            with open_offline(_pub_dir(app, publisher_dir)) as pub:
                jobs = [job_view(pub, j) for j in pub.store.job_ids()]
        except SdkError as exc:
            raise CliError(str(exc)) from None
    if job_id is not None:
        jobs = [j for j in jobs if j["job_id"].startswith(job_id.lower())]
        if not jobs:
            raise CliError(f"no job {job_id} in the publisher's store")

    def human() -> None:
        from rich.table import Table

        t = Table(title="jobs" + (" (publisher running)" if running else " (publisher not running)"))
        for col in ("job", "state", "accepted", "failed", "shards", "replicas", "nodes",
                    "rejected", "evidence", "credit paid"):
            t.add_column(col)
        for j in jobs:
            t.add_row(j["job_id"][:16], j["state"] + (f" ({j['waiting']})" if j["waiting"] else ""),
                      str(j["accepted"]), str(j["failed"]), str(j["shards"]), str(j["replicas"]),
                      str(j["nodes"]), str(j["rejected"]), str(j["evidence"]), str(j["credit_paid"]))
        console().print(t)
        for j in jobs:  # stalled shards are never decided silently (work-and-leases.md, 4)
            if j.get("self_computed"):
                click.echo(f"job {j['job_id'][:16]}: {j['self_computed']} shard(s) computed by "
                           f"the publisher (no eligible worker could take them)")
            if j.get("relaxed"):
                click.echo(f"job {j['job_id'][:16]}: {j['relaxed']} shard(s) stalled and "
                           f"decided under relaxed replica rules (marked in `job results`)")

    app.emit({"running": running, "jobs": jobs}, human)


@job_group.command("results")
@click.argument("job_id")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for <output>.npy (when every shard is accepted) and results.jsonl.")
@publisher_dir_option
@json_option
@pass_app
def job_results(app: App, job_id: str, out: Path, publisher_dir: Path | None) -> None:
    """Write the verified outputs of a job accepted so far."""
    import time

    from ..sdk.client import Job, SdkError, open_offline

    try:
        with open_offline(_pub_dir(app, publisher_dir)) as pub:
            jid = _find(pub, job_id)
            job = Job(pub, jid, time.time())
            files = job.export(out)
            st = job.status()
    except SdkError as exc:
        raise CliError(str(exc)) from None
    data = {"job_id": jid.hex(), "accepted": st.accepted, "shards": st.shards,
            "files": [str(f) for f in files]}
    app.emit(data, lambda: [click.echo(f"wrote {f}") for f in files] and None
             or click.echo(f"{st.accepted} of {st.shards} shards accepted"))


def _find(pub: Any, job_id: str) -> bytes:
    matches = [j for j in pub.store.job_ids() if j.hex().startswith(job_id.lower())]
    if len(matches) != 1:
        raise CliError(f"no job {job_id} in the publisher's store" if not matches
                       else f"{job_id} matches {len(matches)} jobs: give more of the id")
    return matches[0]


@job_group.command("cancel")
@click.argument("job_id")
@publisher_dir_option
@json_option
@pass_app
def job_cancel(app: App, job_id: str, publisher_dir: Path | None) -> None:
    """Cancel a job: no more leases; the running publisher tells lease holders to stop."""
    from ..live.control import ControlError, request
    from ..sdk.client import SdkError, open_offline

    sock = _live(app, publisher_dir)
    how = "offline"
    try:
        with open_offline(_pub_dir(app, publisher_dir)) as pub:
            jid = _find(pub, job_id)
            if sock is None:
                pub.cancel(jid)
    except SdkError as exc:
        raise CliError(str(exc)) from None
    if sock is not None:
        try:
            reply = request(sock, "cancel", job_id=jid.hex())
        except ControlError as exc:
            raise CliError(f"the publisher did not answer: {exc}") from None
        if not reply.get("ok"):
            raise CliError(reply.get("error", "cancel refused"))
        how = "running publisher"
    app.emit({"job_id": jid.hex(), "cancelled": True, "via": how},
             f"job {jid.hex()} cancelled ({how})")
