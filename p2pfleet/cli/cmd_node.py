"""`p2pfleet node init|start|status|pause|resume|stop` and `p2pfleet peers`."""

from __future__ import annotations

from typing import Any

import click

from ..live.config import build_config, parse_config_text, render_config, validate_value
from ..live.datadir import utc_stamp, write_atomic
from ..identity import Identity, load_key
from .app import App, CliError, json_option, pass_app


@click.group("node")
def node_group() -> None:
    """Set up and run a volunteer node."""


@node_group.command("init")
@click.option("--network", "network", default=None, metavar="NETWORK",
              help="Network to join, written into config.toml (default: 'main', or the global "
                   "--network).")
@click.option("--allow", "allow", multiple=True, metavar="PEER_ID",
              help="A publisher to work for (repeatable), written into config.toml.")
@click.option("--serve-anyone", "--anyone", "serve_anyone", is_flag=True, default=None,
              help="Also work for publishers not allowed by --allow.")
@click.option("--force", is_flag=True,
              help="Replace an existing key with a new one (the old key is kept in keys-retired/).")
@json_option
@pass_app
def node_init(app: App, network: str | None, allow: tuple[str, ...],
              serve_anyone: bool | None, force: bool) -> None:
    """Create the data dir, a new node key and a commented config.toml.

    Settings given here are written into config.toml; other settings already there are
    kept (a config.toml you edited is backed up first). An existing key is never
    overwritten without --force, and even then it is moved to keys-retired/, not deleted.
    """
    # What to write into the config file, validated before anything is created.
    chosen: dict[str, Any] = {}
    if network is None and "node.network" in app.overrides:
        network = app.overrides["node.network"].value
    if network is not None:
        chosen["node.network"] = validate_value("node.network", network, "option --network")
    if allow:
        chosen["publishers.allow"] = validate_value("publishers.allow", list(allow),
                                                    "option --allow")
    if serve_anyone:
        chosen["publishers.serve_anyone"] = True

    with app.data_dir.open(create=True, lock=True) as dd:
        if dd.has_key() and not force:
            current = dd.peek_key()
            who = f" (peer id {current.peer_id})" if current else ""
            raise CliError(
                f"{dd.key_file} already exists{who}: this data dir is initialised. Use --force "
                f"to replace the key (the old key is kept in {dd.retired_dir}), or --data-dir "
                f"for another node")

        # The config file: merge the chosen settings into what the file already sets.
        cfg_path = dd.config_file if app.config_option is None else app.config_file
        backup = None
        existing_text = cfg_path.read_text(encoding="utf-8") if cfg_path.exists() else None
        source = f"file {cfg_path}"
        existing = parse_config_text(existing_text, source) if existing_text is not None else {}
        merged = {**existing, **chosen}
        new_text = render_config(merged)
        write_config = existing_text is None or (chosen and new_text != existing_text and
                                                 any(existing.get(k) != v for k, v in chosen.items()))
        # Check the effective config (file + environment + options) before writing anything.
        overrides = {k: v for k, v in app.overrides.items()
                     if not (k == "node.network" and "node.network" in chosen)}
        effective = build_config(parse_config_text(new_text, source), file=cfg_path,
                                 overrides=overrides)
        if write_config:
            if existing_text is not None and existing_text != render_config():
                backup = cfg_path.with_name(f"{cfg_path.name}.bak-{utc_stamp()}")
                write_atomic(backup, existing_text, 0o644, overwrite=False)
            write_atomic(cfg_path, new_text, 0o644)

        ident = Identity.generate()
        retired = dd.install_key(ident)
        with dd.open_state():
            pass  # creates state.sqlite with its current schema

    data = {
        "peer_id": ident.peer_id,
        "key_file": str(dd.key_file),
        "data_dir": str(dd.root),
        "config_file": str(cfg_path),
        "network": effective.node.network,
        "retired_key": str(retired) if retired else None,
        "config_backup": str(backup) if backup else None,
        "publishers": publisher_mode(effective.publishers.allow,
                                     effective.publishers.serve_anyone),
    }
    lines = [
        f"initialised a p2pfleet node in {dd.root}",
        f"  peer id:  {ident.peer_id}",
        f"  key file: {dd.key_file}",
        f"  config:   {cfg_path} (network {effective.node.network})",
    ]
    lines.append(f"  publishers: {data['publishers']['text']}")
    if retired:
        lines.append(f"  the previous key was moved to {retired}")
    if backup:
        lines.append(f"  the previous config.toml was saved as {backup}")
    lines.append("Back up the key now, e.g. 'p2pfleet key export --out FILE --passphrase-prompt': "
                 "it is your node's identity and credit, and cannot be recovered if lost.")
    app.emit(data, "\n".join(lines))


def publisher_mode(allow: tuple[str, ...], serve_anyone: bool) -> dict[str, Any]:
    """Which publishers the node works for, as a mode and a sentence for the owner."""
    if serve_anyone:
        mode = "anyone"
        text = ("works for anyone announcing jobs" +
                (f", preferring the {len(allow)} allowed" if allow else "") +
                " (stops serving a publisher whose unpaid work passes publishers.unpaid_cap)")
    elif allow:
        mode = "allowlist"
        text = f"works only for the {len(allow)} allowed: {', '.join(allow)}"
    else:
        mode = "none"
        text = ("works for NO publisher yet: set publishers.allow (peer ids) or "
                "publishers.serve_anyone = true in config.toml")
    return {"mode": mode, "allow": list(allow), "text": text}


# --- running a node ------------------------------------------------------------------------

def _control_path(app: App):
    return app.data_dir.root / "control.sock"


@node_group.command("start")
@click.option("--listen", "listen", multiple=True, metavar="MULTIADDR",
              help="Listen here instead of node.listen (repeatable).")
@click.option("--bootstrap", "bootstrap", multiple=True, metavar="MULTIADDR",
              help="A peer to contact first, /.../p2p/<peer id> (repeatable; added to "
                   "node.bootstrap).")
@click.option("--vehicle-trace", "trace", default=None, metavar="FILE",
              help="Replay this vehicle trace (or builtin:<name>, or survey:<car> 0-199) "
                   "instead of the configured provider.")
@click.option("--trace-speedup", type=float, default=None,
              help="Replay speed of the trace (60: an hour per minute).")
@click.option("--cheat", default=None, hidden=True, metavar="fp16|strategic:N",
              help="Demos and tests of verification only: compute with fp16-rounded weights "
                   "(always, or after N honest results).")
@pass_app
def node_start(app: App, listen: tuple[str, ...], bootstrap: tuple[str, ...],
               trace: str | None, trace_speedup: float | None, cheat: str | None) -> None:
    """Run the node until Ctrl-C or SIGTERM (or 'p2pfleet node stop').

    The node computes only while the vehicle policy allows it; otherwise it stays out of
    the mesh entirely. 'p2pfleet node status' says why.
    """
    import trio

    from ..live.config import Override
    from ..live.logs import setup_logging
    from ..net.mesh import MeshError
    from ..live.node import Node, NodeError

    if cheat is not None:
        from ..live.cheats import check_cheat

        try:
            check_cheat(cheat)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    if trace is not None:
        app.overrides["vehicle.provider"] = Override("trace", "--vehicle-trace")
        app.overrides["vehicle.trace"] = Override(trace, "--vehicle-trace")
    if trace_speedup is not None:
        app.overrides["vehicle.trace_speedup"] = Override(trace_speedup, "--trace-speedup")
    for name, values, option in (("node.listen", listen, "--listen"),
                                 ("node.bootstrap", bootstrap, "--bootstrap")):
        if values:
            validate_value(name, list(values), f"option {option}")
    config = app.config()
    with app.data_dir.open(create=False, lock=True) as dd:
        if not dd.has_key():
            raise CliError(f"{dd.root} has no key: run 'p2pfleet node init' first")
        identity = load_key(dd.key_file)
        setup_logging(dd.logs_dir, config.node.log_level)
        with dd.open_state() as state:
            try:
                node = Node(identity, config, state, control_path=_control_path(app),
                            bootstrap=bootstrap, listen=listen or None, cache_dir=dd.cache_dir,
                            ledger_path=dd.ledger_file, cheat=cheat or "",
                            event_log=(dd.logs_dir / "events.jsonl"
                                       if config.node.event_log else None))
            except (NodeError, ValueError) as exc:
                raise CliError(str(exc)) from None
            click.echo(f"node {identity.peer_id} on network {config.node.network}; "
                       f"control socket {_control_path(app)}", err=True)
            try:
                trio.run(node.run)
            except BaseExceptionGroup as group:
                expected = _first_expected(group, (NodeError, MeshError))
                if expected is None:
                    raise
                raise CliError(str(expected)) from None
            except (NodeError, MeshError) as exc:
                raise CliError(str(exc)) from None
    click.echo("node stopped", err=True)


def _first_expected(group: BaseExceptionGroup, types: tuple[type, ...]) -> BaseException | None:
    """The first expected error in a (nested) exception group from the node's nurseries."""
    for exc in group.exceptions:
        if isinstance(exc, types):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_expected(exc, types)
            if found is not None:
                return found
    return None


def _ask(app: App, cmd: str, **args: Any) -> dict:
    from ..live.control import ControlError, request

    try:
        return request(_control_path(app), cmd, **args)
    except ControlError as exc:
        raise CliError(str(exc)) from None


def _print_status(app: App, reply: dict) -> None:
    data = {k: v for k, v in reply.items() if k != "ok"}

    def human() -> None:
        state = "computing" if data["computing"] else "not computing"
        mesh = f"in the mesh with {data['peers']} peers" if data["in_mesh"] else "out of the mesh"
        click.echo(f"{data['peer_id']} ({data['network']}): {state}, {mesh}")
        for line in data["why"]:
            click.echo(f"  {line}")
        if data.get("vehicle"):
            click.echo(f"  vehicle: {data['vehicle']}")
        if data["listen_addrs"]:
            click.echo(f"  listening on {', '.join(data['listen_addrs'])}")
        if data.get("dht_mode"):
            stable = f" ({data['stable_why']})" if data.get("stable_why") else ""
            click.echo(f"  reachability: {data['reachability']} ({data['reachability_why']}); "
                       f"DHT {data['dht_mode']}{stable}")
        if data["last_error"]:
            click.echo(f"  last error: {data['last_error']}")

    app.emit(data, human)


@node_group.command("status")
@json_option
@pass_app
def node_status(app: App) -> None:
    """Say whether the node computes, why (not), and when that may change."""
    _print_status(app, _ask(app, "status"))


@node_group.command("pause")
@json_option
@pass_app
def node_pause(app: App) -> None:
    """Stop computing now, hand back current work and leave the mesh until 'resume'."""
    _print_status(app, _ask(app, "pause"))


@node_group.command("resume")
@json_option
@pass_app
def node_resume(app: App) -> None:
    """Undo 'pause': compute again once the vehicle policy allows it."""
    _print_status(app, _ask(app, "resume"))


@node_group.command("stop")
@click.option("--after-current", is_flag=True,
              help="Let the running shard finish first (it needs no connection).")
@json_option
@pass_app
def node_stop(app: App, after_current: bool) -> None:
    """Stop the running node: it publishes a leaving record and exits."""
    reply = _ask(app, "stop", after_current=after_current)
    app.emit({"stopping": reply.get("stopping", False)}, "the node is stopping")


@click.command("peers")
@json_option
@pass_app
def peers_command(app: App) -> None:
    """List the peers the running node is connected to."""
    reply = _ask(app, "peers")
    data = {"in_mesh": reply["in_mesh"], "peers": reply["peers"]}

    def human() -> None:
        if not data["in_mesh"]:
            click.echo("the node is out of the mesh (see 'p2pfleet node status')")
            return
        click.echo(f"{len(data['peers'])} connected peers")
        for peer in data["peers"]:
            click.echo(f"  {peer}")

    app.emit(data, human)


@click.command("record")
@click.argument("peer_id")
@json_option
@pass_app
def record_command(app: App, peer_id: str) -> None:
    """Look up a peer's capacity record in the DHT, through the running node."""
    reply = _ask(app, "lookup", peer_id=peer_id)
    data = {k: v for k, v in reply.items() if k != "ok"}

    def human() -> None:
        if not data["found"]:
            click.echo(f"no valid record for {peer_id}")
            return
        r = data["record"]
        click.echo(f"{peer_id}: {r['state']}, software {r['sw_version']}, {r['cores']} cores, "
                   f"{r['memory_mb']} MiB, bench {r['bench']:g}/s, seq {r['seq']}")
        if r["addrs"]:
            click.echo(f"  addrs: {', '.join(r['addrs'])}")

    app.emit(data, human)
