"""`p2pfleet`: the root command group, global options and the console-script entry point."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..live.config import Override
from .app import EXPECTED_ERRORS, App, CliError, describe_error, json_option, pass_app


class RootGroup(click.Group):
    """Turns expected errors from any command into 'error: ...' and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise  # click handles a closed stdout (p2pfleet ... | head)
        except EXPECTED_ERRORS as exc:
            raise CliError(describe_error(exc)) from None


def _parse_set(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected SECTION.KEY=VALUE", param=param)
        out[key.strip()] = value
    return out


@click.group(cls=RootGroup, context_settings={"help_option_names": ["-h", "--help"],
                                               "max_content_width": 100})
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The node's data directory. Default: $P2PFLEET_DATA_DIR, else "
                   "$XDG_DATA_HOME/p2pfleet, else ~/.local/share/p2pfleet.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, envvar="P2PFLEET_CONFIG",
              help="Config file to read instead of <data dir>/config.toml [env P2PFLEET_CONFIG].")
@click.option("--network", default=None, metavar="NETWORK",
              help="Override node.network (the network id) for this command.")
@click.option("-s", "--set", "settings", multiple=True, metavar="SECTION.KEY=VALUE",
              callback=_parse_set,
              help="Override any setting for this command, e.g. -s node.log_level=debug "
                   "(lists comma-separated). Repeatable.")
@click.option("--json", "json_flag", is_flag=True, help="Print machine-readable JSON.")
@click.version_option(__version__, "-V", "--version", prog_name="p2pfleet")
@click.pass_context
def cli(ctx: click.Context, data_dir: Path | None, config_file: Path | None,
        network: str | None, settings: dict[str, str], json_flag: bool) -> None:
    """p2pfleet: peer-to-peer volunteer computing for ML inference.

    Settings come from, highest first: command-line options, the environment
    (P2PFLEET_<SECTION>_<KEY>), the config file, the defaults. See 'p2pfleet config show'.
    """
    app = ctx.ensure_object(App)
    app.data_dir_option = data_dir
    app.config_option = config_file
    app.json = app.json or json_flag
    overrides = {key: Override(value, f"--set {key}") for key, value in settings.items()}
    if network is not None:
        overrides["node.network"] = Override(network, "--network")
    app.overrides = overrides


@cli.command()
@json_option
@pass_app
def version(app: App) -> None:
    """Show the software, protocol and data-dir format versions."""
    from ..live.datadir import FORMAT_VERSION
    from ..wire.envelope import ENVELOPE_FORMAT
    from ..wire.kinds import MAJOR

    try:
        from importlib.metadata import version as dist_version

        libp2p = dist_version("libp2p")
    except Exception:
        libp2p = None
    data = {
        "p2pfleet": __version__,
        "protocol_major": MAJOR,
        "envelope_format": ENVELOPE_FORMAT,
        "data_dir_format": FORMAT_VERSION,
        "python": platform.python_version(),
        "libp2p": libp2p,
    }
    app.emit(data, f"p2pfleet {__version__} (protocol v{MAJOR}, data-dir format "
                   f"{FORMAT_VERSION}, python {data['python']}, libp2p {libp2p or 'not installed'})")


def _register() -> None:
    from .cmd_config import config_group
    from .cmd_job import job_group
    from .cmd_key import key_group
    from .cmd_ledger import ledger_group
    from .cmd_node import node_group, peers_command, record_command
    from . import cmd_dashboard  # noqa: F401  (adds 'node dashboard')

    cli.add_command(node_group)
    cli.add_command(peers_command)
    cli.add_command(record_command)
    cli.add_command(key_group)
    cli.add_command(config_group)
    from .cmd_explore import explore_command
    cli.add_command(explore_command)
    cli.add_command(ledger_group)
    cli.add_command(job_group)
    from .cmd_sim import sim_command
    cli.add_command(sim_command)


_register()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    try:
        cli.main(args=argv, prog_name="p2pfleet", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        click.echo(code, err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
