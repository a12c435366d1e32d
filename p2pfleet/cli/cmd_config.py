"""`p2pfleet config show|check|default`."""

from __future__ import annotations

import click

from ..live.config import SETTINGS, render_config, toml_value
from .app import App, console, json_option, pass_app


@click.group("config")
def config_group() -> None:
    """Show and check the node's configuration."""


@config_group.command("show")
@json_option
@pass_app
def config_show(app: App) -> None:
    """Show the effective configuration and where each value comes from."""
    cfg = app.config()
    values = cfg.to_dict()
    if values["ocpp"]["password"]:  # a credential: shown as set, never printed
        values["ocpp"]["password"] = "<hidden>"
    data = {
        "config_file": str(app.config_file),
        "config_file_exists": app.config_file.exists(),
        "values": values,
        "sources": dict(cfg.sources),
    }

    def human() -> None:
        from rich.table import Table

        con = console()
        note = "" if app.config_file.exists() else " (does not exist: defaults apply)"
        con.print(f"config file: {app.config_file}{note}")
        table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
        table.add_column("setting", no_wrap=True)
        table.add_column("value", overflow="fold")
        table.add_column("source", overflow="fold")
        for s in SETTINGS:
            value = values[s.section][s.key]
            src = cfg.sources[s.name]
            if src.startswith("file "):
                src = "config file"
            table.add_row(s.name, " ".join(toml_value(value).split()),
                          src if src != "default" else "[dim]default[/dim]")
        con.print(table)

    app.emit(data, human)


@config_group.command("check")
@json_option
@pass_app
def config_check(app: App) -> None:
    """Validate the config file, environment and options; exit 2 with the error if invalid."""
    cfg = app.config()
    from_file = sorted(k for k, v in cfg.sources.items() if v.startswith("file "))
    from_env = sorted(k for k, v in cfg.sources.items() if v.startswith("env "))
    data = {"ok": True, "config_file": str(app.config_file),
            "config_file_exists": app.config_file.exists(),
            "set_in_file": from_file, "set_in_environment": from_env,
            "network": cfg.node.network}
    if app.config_file.exists():
        text = (f"ok: {app.config_file} is valid ({_count(from_file, 'setting')} set in it, "
                f"{len(from_env)} from the environment; network {cfg.node.network})")
    else:
        text = (f"ok: no config file at {app.config_file}, defaults apply "
                f"({_count(from_env, 'setting')} from the environment; network {cfg.node.network})")
    app.emit(data, text)


@config_group.command("default")
def config_default() -> None:
    """Print the fully commented default config file."""
    click.echo(render_config(), nl=False)



def _count(items: list[str], noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"
