"""`p2pfleet explore`: see the fleet's peers, capacity, jobs and evidence.

One crawl printed as a table (or `--json`); `--watch` crawls again every `--interval`
seconds; `--serve` runs the web dashboard, JSON API and /metrics on 127.0.0.1 while crawling.
The explorer joins as a light client (p2pfleet/explorer/crawler.py): it needs no data dir
and no key, only a bootstrap address (from `--bootstrap` or the config's node.bootstrap).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from .app import App, CliError, console, json_option, pass_app


@click.command("explore")
@click.option("--bootstrap", "bootstrap", multiple=True, metavar="ADDR",
              help="Peer to start from, /ip4/.../tcp/.../p2p/<peer id> (repeatable; "
                   "default: the config's node.bootstrap).")
@click.option("--network", default=None, help="Network id (default: the config's node.network).")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Most seconds one crawl may take.")
@click.option("--watch", is_flag=True, help="Crawl again every --interval seconds.")
@click.option("--interval", type=float, default=15.0, show_default=True,
              help="Seconds between crawls with --watch or --serve.")
@click.option("--serve", is_flag=True, help="Serve the web dashboard on 127.0.0.1.")
@click.option("--port", type=int, default=8787, show_default=True,
              help="Port of the web dashboard (0: any free port).")
@click.option("--sample-cap", type=int, default=256, show_default=True,
              help="Read the records of at most this many peers per crawl (a random sample "
                   "on bigger networks; the output says so).")
@json_option
@pass_app
def explore_command(app: App, bootstrap: tuple[str, ...], network: str | None, timeout: float,
                    watch: bool, interval: float, serve: bool, port: int, sample_cap: int) -> None:
    """Map the network: peers, states, capacity, jobs and proven misbehaviour."""
    import trio

    from ..live.config import _check_bootstrap
    from ..explorer.crawler import CrawlSettings, Crawler

    config = app.config()
    network = network or config.node.network
    bootstrap = bootstrap or tuple(config.node.bootstrap)
    try:
        _check_bootstrap(bootstrap)
    except ValueError as exc:
        raise CliError(f"--bootstrap: {exc}") from None
    if not 0 <= port <= 65535:
        raise CliError(f"--port {port}: not a TCP port (0-65535)")
    if interval <= 0:
        raise CliError(f"--interval {interval}: must be positive")
    try:
        settings = CrawlSettings(network=network, bootstrap=bootstrap, timeout_s=timeout,
                                 sample_cap=sample_cap)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # peers going away is normal here
    crawler = Crawler(settings)
    try:
        trio.run(_run, app, crawler, watch, serve, interval, port)
    except KeyboardInterrupt:
        pass
    except BaseExceptionGroup as group:
        os_error = _first(group, OSError)
        if os_error is None:
            raise
        where = f"the dashboard on 127.0.0.1:{port}" if serve else "the explorer"
        raise CliError(f"{where}: {os_error.strerror or os_error}") from None


def _first(group: BaseException, kind: type) -> Any:
    """The first exception of `kind` in a (nested) exception group, or None."""
    if isinstance(group, kind):
        return group
    for exc in getattr(group, "exceptions", ()):
        found = _first(exc, kind)
        if found is not None:
            return found
    return None


async def _run(app: App, crawler: Any, watch: bool, serve: bool, interval: float, port: int) -> None:
    import trio

    from ..explorer import views
    from ..explorer.web import WebApp, serve as serve_web

    async with trio.open_nursery() as nursery:
        await nursery.start(crawler.run)
        if serve:
            web = WebApp(lambda: crawler.last.to_json() if crawler.last else None,
                         title=f"p2pfleet explorer: {crawler.names.network}")
            url = await nursery.start(serve_web, web, "127.0.0.1", port)
            print(f"explorer dashboard at {url}", flush=True)
        while True:
            snap = await crawler.crawl()
            if snap.discovered == 0:
                print("warning: no peer answered (check --bootstrap and --network)",
                      file=sys.stderr, flush=True)
            doc = snap.to_json()
            if app.json:
                print(json.dumps(doc, indent=None if (watch or serve) else 2), flush=True)
            elif not serve:
                con = console()
                if not con.is_terminal:  # piped: do not squeeze the table into 80 columns
                    con.width = max(con.width, 140)
                if watch:
                    con.clear()
                con.print(views.render(doc))
            if not (watch or serve):
                break
            await trio.sleep(interval)
        nursery.cancel_scope.cancel()
