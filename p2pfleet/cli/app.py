"""Plumbing shared by all commands: the App context object, --json, output, errors.

Every command gets the `App` (``@pass_app``), which knows the data dir, the config file and
the command-line config overrides, and loads the effective `Config` on demand. Commands
that print data take ``@json_option`` and print through `App.emit`, so ``--json`` works the
same everywhere (also given before the command: ``p2pfleet --json key show``).

Expected failures (`EXPECTED_ERRORS`) raised anywhere in a command are printed as one line,
``error: <message>``, on stderr with exit code 2; never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..live.config import Config, ConfigError, Override, load_config
from ..live.datadir import DataDir, DataDirError
from ..identity import KeyFileError
from ..names import NetworkIdError
from ..store.db import StoreError
from ..wire.errors import WireError

EXIT_ERROR = 2

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    KeyFileError, ConfigError, DataDirError, StoreError, WireError, NetworkIdError, OSError,
)


class CliError(click.ClickException):
    """An expected failure: printed as 'error: ...' on stderr, exit code 2."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc)
        if exc.filename:
            return f"{exc.filename}: {what}"
        return what
    return str(exc) or type(exc).__name__


def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


@dataclass
class App:
    """What the global options say, and the effective config (loaded when first asked)."""

    data_dir_option: Path | None = None
    config_option: Path | None = None
    overrides: dict[str, Override] = field(default_factory=dict)
    json: bool = False
    _config: Config | None = None

    @property
    def data_dir(self) -> DataDir:
        return DataDir(self.data_dir_option)

    @property
    def config_file(self) -> Path:
        if self.config_option is not None:
            return self.config_option.expanduser().absolute()
        return self.data_dir.config_file

    def config(self) -> Config:
        """The effective config: options > environment > config file > defaults."""
        if self._config is None:
            # An explicitly given --config file must exist; the data dir's may be missing.
            self._config = load_config(self.config_file, overrides=self.overrides,
                                       missing_ok=self.config_option is None)
        return self._config

    def emit(self, data: Any, human: Callable[[], None] | str | None = None) -> None:
        """Print `data` as JSON with --json, else call `human` (or print it, if a string)."""
        if self.json or human is None:
            click.echo(json.dumps(data, indent=2, default=_json_default))
        elif isinstance(human, str):
            click.echo(human)
        else:
            human()


def _json_default(value: Any) -> Any:
    if isinstance(value, (Path,)):
        return str(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


pass_app = click.make_pass_decorator(App, ensure=True)


def _set_json(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(App).json = True


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add --json to a command (the flag is stored on the App, not passed)."""
    return click.option("--json", "json_flag", is_flag=True, expose_value=False,
                        callback=_set_json, is_eager=True,
                        help="Print machine-readable JSON.")(fn)


def console():
    """A rich console for human output (no wrapping of long ids when piped)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, file=sys.stdout)
