"""`p2pfleet node dashboard`: the owner's dashboard, served on loopback only.

Each page load asks the running node for its status over the control socket (as `node
status` does) and reads the ledger (as `ledger` does); it shows nothing else. See
p2pfleet/dashboard/ for the page and the server.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from .app import App, CliError, pass_app
from .cmd_ledger import _summary_json
from .cmd_node import _control_path, node_group

HAND_BACKS_SHOWN = 20


def gather(app: App) -> dict[str, Any]:
    """The dashboard's document (p2pfleet/dashboard/page.py) for this data dir, now."""
    from ..identity import peer_id_from_key
    from ..live.control import ControlError, request
    from ..store.ledger import Ledger
    from ..wire.envelope import open_envelope
    from ..wire.errors import WireError

    now = time.time()
    tz_offset_s = time.localtime(now).tm_gmtoff
    doc: dict[str, Any] = {"now": now, "tz_offset_s": tz_offset_s, "status": None,
                           "status_error": None, "ledger": {"publishers": []}, "hand_backs": []}
    try:
        reply = request(_control_path(app), "status")
        doc["status"] = {k: v for k, v in reply.items() if k != "ok"}
    except ControlError as exc:
        doc["status_error"] = str(exc)
    dd = app.data_dir.open(create=False, lock=False)
    me = dd.peek_key()
    doc["peer_id"] = me.peer_id if me else ""
    doc["network"] = network = app.config().node.network
    if dd.ledger_file.exists():
        with Ledger(dd.ledger_file) as ledger:
            doc["ledger"]["publishers"] = [
                _summary_json(s) for s in ledger.summary(int(now * 1000),
                                                         tz_offset_s=tz_offset_s)]
            for pub, lease_id, job_id, shard, created_ms, env in ledger.hand_back_rows(
                    HAND_BACKS_SHOWN):
                try:
                    body = open_envelope(env, network, kinds={"hand_back"}).body
                    reason, done = body.reason, body.done
                except WireError as exc:
                    reason, done = f"unreadable hand-back ({exc})", "?"
                doc["hand_backs"].append({
                    "at": created_ms / 1000, "publisher": peer_id_from_key(pub),
                    "job_id": job_id.hex(), "shard": shard, "reason": reason, "done": done})
    return doc


@node_group.command("dashboard")
@click.option("--bind", default="127.0.0.1", show_default=True, metavar="ADDRESS",
              help="Loopback address to listen on (127.0.0.1 or ::1; nothing else is allowed).")
@click.option("--port", type=click.IntRange(0, 65535), default=8470, show_default=True,
              help="Port (0: any free port).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the page once to this file and exit instead of serving it.")
@pass_app
def node_dashboard(app: App, bind: str, port: int, out: Path | None) -> None:
    """Show the node in a browser: computing or not and why, when that may change, the
    battery and plug timeline, data used against the daily cap, results, credit and kWh per
    publisher and day, and recent hand-backs.

    Read-only, and on loopback only: open the printed address (it holds a secret path, so
    other users of this machine cannot read the page). Stop with Ctrl-C.
    """
    from ..dashboard.page import build_page
    from ..dashboard.serve import BindError, Dashboard

    def render() -> str:
        return build_page(gather(app))

    if out is not None:
        from ..live.datadir import write_atomic

        write_atomic(out, render(), 0o600)
        click.echo(f"wrote the dashboard to {out}")
        return
    try:
        dash = Dashboard(bind, port, render)
    except BindError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot listen on {bind} port {port}: {exc.strerror or exc} "
                       "(try --port 0)") from None
    click.echo(f"dashboard at {dash.url}", nl=True)
    import sys

    sys.stdout.flush()
    try:
        dash.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        dash.server.server_close()
