"""`p2pfleet ledger [--export csv|json --out FILE]` and `p2pfleet ledger verify FILE`.

The owner's view of the node's ledger (specs/credit.md, section 4): per publisher, credit
promised, paid and unpaid in that publisher's own units (never summed across publishers),
results, compute time and energy, overall and per day. Every stored receipt's signature is
checked again on each run, and that it pays this node. An export holds each receipt's fields
and its complete signed envelope (hex), and names the worker that exported it (with the key
rotation statements linking its older keys), so anyone with the publisher's public key can
verify it offline, as `p2pfleet ledger verify FILE` does: a receipt that pays another
worker is no part of the exporter's contribution and fails.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import click

from ..live.datadir import write_atomic
from ..identity import key_from_peer_id, peer_id_from_key
from .app import App, CliError, json_option, pass_app
from .cmd_key import iso_ms

EXPORT_FORMAT = "p2pfleet-receipts-2"  # 2: names the exporting worker and its rotations
OLD_FORMATS = ("p2pfleet-receipts-1",)  # readable, with --worker (they name no worker)
EXPORT_COLUMNS = ("publisher", "publisher_key", "network", "lease_id", "job_id", "shard",
                  "worker", "output_digest", "credit", "at_ms", "at", "received_ms", "envelope",
                  "exported_by")
MAX_EXPORT_FILE = 256 * 1024 * 1024


@dataclass(frozen=True)
class Checked:
    """A receipt checked from its envelope: its fields, or why it failed."""

    row: dict[str, Any]
    error: str | None


def _receipt_fields(opened: Any) -> dict[str, Any]:
    """An export row from a verified receipt envelope (everything comes from the envelope)."""
    b = opened.body
    return {
        "publisher": peer_id_from_key(opened.signer), "publisher_key": opened.signer.hex(),
        "network": opened.network, "lease_id": b.lease_id.hex(), "job_id": b.job_id.hex(),
        "shard": b.shard, "worker": peer_id_from_key(b.worker),
        "output_digest": b.output_digest.hex(), "credit": b.credit, "at_ms": b.at,
        "at": iso_ms(b.at), "envelope": opened.raw.hex(),
    }


def check_envelope(envelope: bytes, network: str, claimed: dict[str, Any]) -> Checked:
    """Open a receipt envelope for `network` and compare it with what a row claims."""
    from ..wire.envelope import open_envelope
    from ..wire.errors import WireError

    try:
        opened = open_envelope(envelope, network, kinds={"receipt"})
    except WireError as exc:
        return Checked(claimed, f"signature or format: {exc}")
    actual = _receipt_fields(opened)
    for key, value in actual.items():
        if key in claimed and key != "at" and str(claimed[key]) != str(value):
            return Checked(claimed, f"{key} is {claimed[key]!r} but the signed receipt says "
                                    f"{value!r}")
    return Checked({**claimed, **actual}, None)


@dataclass(frozen=True)
class Export:
    """A receipts export as read: its rows, the worker that exported it (None: not named,
    an export of format 1) and the key rotation statements it carries."""

    rows: list[dict[str, Any]]
    worker: str | None
    rotations: list[bytes]


def _rotation_edges(statements: Iterable[bytes], networks: set[str]) -> list[tuple[bytes, bytes]]:
    """(old key, new key) of each key rotation statement; CliError for one that does not
    verify on any of `networks`."""
    from ..wire.envelope import open_envelope
    from ..wire.errors import WireError
    from ..wire.rotation import check_rotation

    edges = []
    for i, statement in enumerate(statements, start=1):
        why = "no network to check it on"
        for network in sorted(networks):
            try:
                opened = open_envelope(statement, network, kinds={"key_rotation"})
                edges.append((opened.signer, check_rotation(opened).new_key))
                break
            except WireError as exc:
                why = str(exc)
        else:
            raise CliError(f"key rotation statement {i} does not verify: {why}")
    return edges


def _foreign(checked: Checked, keys: frozenset[bytes], exporter: str) -> Checked:
    """`checked`, failed if its receipt pays another worker than `exporter` (whose `keys`
    are its key and the keys it rotated from)."""
    if checked.error:
        return checked
    named = checked.row["worker"]
    if key_from_peer_id(named) in keys:
        return checked
    return Checked(checked.row, f"receipt for lease {checked.row['lease_id']} names worker "
                                f"{named}, not the exporting worker {exporter}"
                                + (" nor a key it rotated from" if len(keys) > 1 else ""))


def _own_keys(dd: Any, network: str) -> tuple[str | None, list[bytes], frozenset[bytes]]:
    """This node's peer id, its key rotation statements and the keys it was paid under."""
    from ..core.credit import worker_keys

    me = dd.peek_key()
    if me is None:
        return None, [], frozenset()
    statements = []
    if dd.rotations_dir.is_dir():
        statements = [f.read_bytes() for f in sorted(dd.rotations_dir.glob("*.bin"))]
    try:
        edges = _rotation_edges(statements, {network})
    except CliError:
        edges = []  # a damaged statement links nothing (receipts of that key then fail)
        statements = []
    return me.peer_id, statements, worker_keys(me.public_key, edges)


def _stored_rows(ledger: Any, publisher: bytes | None, exporter: str | None = None,
                 keys: frozenset[bytes] = frozenset()) -> list[Checked]:
    out = []
    for r in ledger.receipt_rows(publisher):
        claimed = {
            "publisher": peer_id_from_key(r.publisher), "publisher_key": r.publisher.hex(),
            "network": r.network, "lease_id": r.lease_id.hex(), "job_id": r.job_id.hex(),
            "shard": r.shard, "worker": peer_id_from_key(r.worker),
            "output_digest": r.output_digest.hex(), "credit": r.credit, "at_ms": r.at_ms,
            "at": iso_ms(r.at_ms), "received_ms": r.received_ms, "envelope": r.envelope.hex(),
        }
        checked = check_envelope(r.envelope, r.network, claimed)
        out.append(_foreign(checked, keys, exporter) if exporter else checked)
    return out


def _hms(ms: int) -> str:
    s = ms // 1000
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _kwh(mwh: int) -> float:
    return mwh / 1_000_000


def _summary_json(s: Any) -> dict[str, Any]:
    return {
        "publisher": peer_id_from_key(s.publisher), "publisher_key": s.publisher.hex(),
        "leases": s.leases, "results_delivered": s.results_delivered,
        "results_pending": s.results_pending, "failures": s.failures,
        "hand_backs": s.hand_backs, "receipts": s.receipts,
        "conflicting_receipts": s.conflicting_receipts,
        "credit": {"promised": s.credit_promised, "paid": s.credit_paid,
                   "unpaid": s.unpaid.credit},
        "unpaid_compute_ms": s.unpaid.elapsed_ms, "compute_ms": s.compute_ms,
        "energy_kwh": {"metered": _kwh(s.metered_mwh), "estimated": _kwh(s.estimated_mwh)},
        "days": [{"day": d.day, "results": d.results, "credit_paid": d.credit_paid,
                  "compute_ms": d.compute_ms, "energy_kwh": {"metered": _kwh(d.metered_mwh),
                                                             "estimated": _kwh(d.estimated_mwh)}}
                 for d in s.days],
    }


def _publisher_key(peer_id: str | None) -> bytes | None:
    if peer_id is None:
        return None
    try:
        return key_from_peer_id(peer_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--publisher") from None


def _export(rows: list[Checked], fmt: str, out: Path, exporter: str | None,
            rotations: list[bytes]) -> None:
    good = [{**c.row, "exported_by": exporter or ""} for c in rows]
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=EXPORT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(good)
        data = buf.getvalue()
    else:
        grouped: dict[str, list[dict[str, Any]]] = {}
        for row in good:
            grouped.setdefault(row["publisher"], []).append(
                {k: row[k] for k in EXPORT_COLUMNS if k not in ("publisher", "exported_by")})
        data = json.dumps({"format": EXPORT_FORMAT, "worker": exporter,
                           "rotations": [r.hex() for r in rotations],
                           "note": "credit units of different publishers are different "
                                   "currencies: never add them up",
                           "publishers": [{"publisher": p, "receipts": rs}
                                          for p, rs in grouped.items()]}, indent=2) + "\n"
    write_atomic(out, data, 0o644)


@click.group("ledger", invoke_without_command=True)
@click.option("--publisher", "publisher_id", default=None, metavar="PEER_ID",
              help="Only this publisher.")
@click.option("--export", "export_fmt", type=click.Choice(["csv", "json"]), default=None,
              help="Write the receipts (all fields and the signed envelope) to --out.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write the export to.")
@json_option
@pass_app
@click.pass_context
def ledger_group(ctx: click.Context, app: App, publisher_id: str | None,
                 export_fmt: str | None, out: Path | None) -> None:
    """Credit, results and energy per publisher, and every receipt's signature checked.

    Credit is shown in each publisher's own units and never added up across publishers.
    """
    if ctx.invoked_subcommand is not None:
        return
    if (export_fmt is None) != (out is None):
        raise click.UsageError("--export and --out go together")
    from ..store.ledger import Ledger

    publisher = _publisher_key(publisher_id)
    dd = app.data_dir.open(create=False, lock=False)
    now_ms = int(time.time() * 1000)
    tz_offset_s = time.localtime().tm_gmtoff
    me, rotations, keys = _own_keys(dd, app.config().node.network)
    if dd.ledger_file.exists():
        with Ledger(dd.ledger_file) as ledger:
            summaries = [s for s in ledger.summary(now_ms, tz_offset_s=tz_offset_s)
                         if publisher is None or s.publisher == publisher]
            checked = _stored_rows(ledger, publisher, me, keys)
    else:
        summaries, checked = [], []
    failed = [c for c in checked if c.error]
    if export_fmt is not None and out is not None:
        _export(checked, export_fmt, out, me, rotations)
    data = {
        "ledger": str(dd.ledger_file),
        "note": "credit is in each publisher's own units; never add them up",
        "publishers": [_summary_json(s) for s in summaries],
        "receipts_checked": len(checked),
        "receipts_failed": [{"publisher": c.row["publisher"], "lease_id": c.row["lease_id"],
                             "error": c.error} for c in failed],
        "exported": {"format": export_fmt, "file": str(out), "receipts": len(checked)}
        if export_fmt else None,
    }
    app.emit(data, lambda: _print_table(data))
    if failed:
        raise CliError(f"{len(failed)} of {len(checked)} stored receipts failed verification")


def _print_table(data: dict[str, Any]) -> None:
    from rich.table import Table

    from .app import console

    con = console()
    if not data["publishers"]:
        con.print(f"no work recorded yet in {data['ledger']}")
    for p in data["publishers"]:
        c = p["credit"]
        con.print(f"\n[bold]publisher {p['publisher']}[/bold]")
        con.print(f"  credit in this publisher's units: promised {c['promised']}, "
                  f"paid {c['paid']}, unpaid {c['unpaid']} (last 7 days; unpaid compute "
                  f"{_hms(p['unpaid_compute_ms'])})")
        con.print(f"  leases {p['leases']}, results delivered {p['results_delivered']} "
                  f"(pending {p['results_pending']}), failures {p['failures']}, hand-backs "
                  f"{p['hand_backs']}, receipts {p['receipts']}"
                  + (f" ({p['conflicting_receipts']} leases with conflicting receipts)"
                     if p["conflicting_receipts"] else ""))
        table = Table(show_edge=False, pad_edge=False)
        for name in ("day", "results", "credit paid", "compute", "kWh estimated",
                     "kWh metered"):
            table.add_column(name, justify="left" if name == "day" else "right")
        for d in p["days"]:
            e = d["energy_kwh"]
            table.add_row(d["day"], str(d["results"]), str(d["credit_paid"]),
                          _hms(d["compute_ms"]), f"{e['estimated']:.4f}", f"{e['metered']:.4f}")
        e = p["energy_kwh"]
        table.add_row("all days", str(p["results_delivered"]), str(c["paid"]),
                      _hms(p["compute_ms"]), f"{e['estimated']:.4f}", f"{e['metered']:.4f}",
                      style="bold")
        con.print(table)
    n, failed = data["receipts_checked"], data["receipts_failed"]
    if n:
        con.print(f"\n{n - len(failed)} of {n} stored receipts verify against their "
                  f"publisher's key")
    for f in failed:
        con.print(f"  [red]FAILED[/red] receipt for lease {f['lease_id']} from "
                  f"{f['publisher']}: {f['error']}")
    if data["exported"]:
        x = data["exported"]
        con.print(f"exported {x['receipts']} receipts as {x['format']} to {x['file']}")


def _read_export(file: Path) -> Export:
    with open(file, "rb") as fh:
        raw = fh.read(MAX_EXPORT_FILE + 1)
    if len(raw) > MAX_EXPORT_FILE:
        raise CliError(f"{file}: larger than {MAX_EXPORT_FILE} bytes")
    text = raw.decode("utf-8", errors="replace")
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
            if doc.get("format") not in (EXPORT_FORMAT, *OLD_FORMATS):
                raise ValueError(f"format is {doc.get('format')!r}, expected {EXPORT_FORMAT!r}")
            worker = doc.get("worker") if doc["format"] == EXPORT_FORMAT else None
            if worker is not None and not isinstance(worker, str):
                raise ValueError("'worker' is not a peer id")
            rotations = [bytes.fromhex(r) for r in doc.get("rotations") or []]
            rows = [{"publisher": group["publisher"], **r}
                    for group in doc["publishers"] for r in group["receipts"]]
            return Export(rows, worker, rotations)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CliError(f"{file}: not a receipts export ({exc})") from None
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as exc:
        raise CliError(f"{file}: not a receipts export ({exc})") from None
    if not rows and not text.startswith(",".join(EXPORT_COLUMNS[:2])):
        raise CliError(f"{file}: not a receipts export (neither JSON nor CSV with a "
                       f"'{EXPORT_COLUMNS[0]}' column)")
    for i, row in enumerate(rows, start=2):
        if "envelope" not in row or "network" not in row:
            raise CliError(f"{file}: line {i}: no 'envelope' or 'network' column")
    # Every row names the exporter; a row naming another was not exported with the rest.
    worker = (rows[0].get("exported_by") or None) if rows else None
    return Export(rows, worker, [])


def _exporter(export: Export, file: Path, worker_option: str | None) -> tuple[str, bytes]:
    """The worker whose contribution the export is, as peer id and key."""
    worker = export.worker
    if worker_option is not None and worker is not None and worker_option != worker:
        raise CliError(f"{file} was exported by {worker}, not by {worker_option}")
    worker = worker or worker_option
    if worker is None:
        raise CliError(f"{file} does not name the worker that exported it (an export of an "
                       "older version): give --worker PEER_ID")
    try:
        return worker, key_from_peer_id(worker)
    except ValueError as exc:
        raise CliError(f"{file}: the exporting worker {worker!r} is not a peer id ({exc})") from None


@ledger_group.command("verify")
@click.argument("file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--worker", "worker_option", default=None, metavar="PEER_ID",
              help="The worker whose contribution this must be (required for exports that "
                   "do not name it).")
@click.option("--rotation", "rotation_files", multiple=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A key rotation statement of the worker (repeatable): receipts paying a "
                   "key it rotated from count too. JSON exports carry them already.")
@json_option
@pass_app
def ledger_verify(app: App, file: Path, worker_option: str | None,
                  rotation_files: tuple[Path, ...]) -> None:
    """Verify an exported receipts file offline: every signature, that each row's fields
    are the signed ones, and that every receipt pays the worker that exported it (its key
    or one it rotated from). Needs no data dir and no network."""
    from ..core.credit import worker_keys
    from ..wire.envelope import MAX_ENVELOPE

    export = _read_export(file)
    exporter, exporter_key = _exporter(export, file, worker_option)
    statements = list(export.rotations)
    for f in rotation_files:
        with open(f, "rb") as fh:
            statements.append(fh.read(MAX_ENVELOPE + 1))
    networks = {str(row.get("network", "")) for row in export.rows}
    keys = worker_keys(exporter_key, _rotation_edges(statements, networks))
    checked = []
    for row in export.rows:
        if export.worker is not None and str(row.get("exported_by", export.worker)) != export.worker:
            checked.append(Checked(row, f"receipt for lease {row.get('lease_id')} was exported "
                                        f"by {row.get('exported_by')}, the rest by {export.worker}"))
            continue
        try:
            envelope = bytes.fromhex(str(row.get("envelope", "")))
        except ValueError:
            checked.append(Checked(row, "envelope is not hex"))
            continue
        checked.append(_foreign(check_envelope(envelope, str(row.get("network", "")), row),
                                keys, exporter))
    failed = [c for c in checked if c.error]
    per: dict[str, dict[str, int]] = {}
    best: dict[tuple[str, str], int] = {}
    for c in checked:
        if c.error:
            continue
        p = per.setdefault(c.row["publisher"], {"receipts": 0, "credit": 0})
        p["receipts"] += 1
        key = (c.row["publisher"], c.row["lease_id"])
        best[key] = max(best.get(key, 0), int(c.row["credit"]))
    for (pub, _), credit in best.items():
        per[pub]["credit"] += credit
    data = {
        "file": str(file), "worker": exporter,
        "receipts": len(checked), "valid": len(checked) - len(failed),
        "publishers": [{"publisher": p, **v} for p, v in per.items()],
        "failed": [{"lease_id": c.row.get("lease_id"), "publisher": c.row.get("publisher"),
                    "worker": c.row.get("worker"), "error": c.error} for c in failed],
    }

    def human() -> None:
        click.echo(f"{data['valid']} of {data['receipts']} receipts in {file} verify as "
                   f"the contribution of worker {exporter}")
        for p in data["publishers"]:
            click.echo(f"  {p['publisher']}: {p['receipts']} receipts, {p['credit']} credit "
                       f"units of this publisher (highest receipt per lease)")
        for f in data["failed"]:
            click.echo(f"  FAILED: lease {f['lease_id']} from {f['publisher']}: {f['error']}")

    app.emit(data, human)
    if failed:
        raise CliError(f"{len(failed)} of {len(checked)} receipts in {file} failed verification")
