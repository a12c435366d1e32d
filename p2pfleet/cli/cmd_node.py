"""`p2pfleet node init` (and, later, the commands that run a node)."""

from __future__ import annotations

from typing import Any

import click

from ..config import build_config, parse_config_text, render_config, validate_value
from ..datadir import utc_stamp, write_atomic
from ..identity import Identity
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
@click.option("--serve-anyone", is_flag=True, default=None,
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
    }
    lines = [
        f"initialised a p2pfleet node in {dd.root}",
        f"  peer id:  {ident.peer_id}",
        f"  key file: {dd.key_file}",
        f"  config:   {cfg_path} (network {effective.node.network})",
    ]
    if retired:
        lines.append(f"  the previous key was moved to {retired}")
    if backup:
        lines.append(f"  the previous config.toml was saved as {backup}")
    lines.append("Back up the key now, e.g. 'p2pfleet key export --out FILE --passphrase-prompt': "
                 "it is your node's identity and credit, and cannot be recovered if lost.")
    app.emit(data, "\n".join(lines))
