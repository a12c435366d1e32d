"""`p2pfleet key show|export|import|rotate|verify-rotation`: the node's identity key."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from ..live.datadir import write_atomic
from ..identity import SEALED_TAG, Identity, KeyFileError, decode_key, encode_key, load_key
from ..wire.errors import WireError
from .app import App, CliError, json_option, pass_app, warn

MAX_KEY_FILE = 64 * 1024


def iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")


def passphrase_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--passphrase-file / --passphrase-env / --passphrase-prompt (at most one)."""
    fn = click.option("--passphrase-prompt", is_flag=True,
                      help="Ask for the passphrase on the terminal.")(fn)
    fn = click.option("--passphrase-env", metavar="VAR",
                      help="Read the passphrase from environment variable VAR.")(fn)
    fn = click.option("--passphrase-file", type=click.Path(dir_okay=False, path_type=Path),
                      help="Read the passphrase from the first line of this file.")(fn)
    return fn


def get_passphrase(passphrase_file: Path | None, passphrase_env: str | None,
                   passphrase_prompt: bool, *, confirm: bool) -> str | None:
    given = [x for x in (passphrase_file, passphrase_env, passphrase_prompt or None) if x is not None]
    if len(given) > 1:
        raise click.UsageError("give at most one of --passphrase-file, --passphrase-env, "
                               "--passphrase-prompt")
    if passphrase_file is not None:
        try:
            text = passphrase_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CliError(f"cannot read passphrase file {passphrase_file}: {why}") from None
        passphrase = text.splitlines()[0] if text.splitlines() else ""
        where = f"passphrase file {passphrase_file}"
    elif passphrase_env is not None:
        if passphrase_env not in os.environ:
            raise CliError(f"environment variable {passphrase_env} (--passphrase-env) is not set")
        passphrase = os.environ[passphrase_env]
        where = f"environment variable {passphrase_env}"
    elif passphrase_prompt:
        passphrase = click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm,
                                  err=True)
        where = "the prompt"
    else:
        return None
    if not passphrase:
        raise CliError(f"the passphrase from {where} is empty")
    return passphrase


def read_key_file(path: Path, passphrase: str | None) -> Identity:
    """Decode a key file given on the command line (an export or backup)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_KEY_FILE + 1)
    except IsADirectoryError:
        raise CliError(f"{path} is a directory, not a key file") from None
    if len(raw) > MAX_KEY_FILE:
        raise KeyFileError(f"{path}: too large for a key file")
    text = raw.decode("ascii", errors="replace")
    if passphrase is None and SEALED_TAG in text:
        raise KeyFileError(f"{path}: the key is sealed with a passphrase; give it with "
                           "--passphrase-file, --passphrase-env or --passphrase-prompt")
    return decode_key(text, passphrase, source=str(path))


@click.group("key")
def key_group() -> None:
    """Show, back up, restore and rotate the node's key (its identity and credit)."""


@key_group.command("show")
@json_option
@pass_app
def key_show(app: App) -> None:
    """Show the node's peer id, public key and fingerprint."""
    dd = app.data_dir.open(create=False, lock=False)
    ident = load_key(dd.key_file)
    data = {
        "peer_id": ident.peer_id,
        "public_key": ident.public_key.hex(),
        "fingerprint": ident.fingerprint(),
        "key_file": str(dd.key_file),
        "retired_keys": [str(p) for p in dd.retired_keys()],
    }
    app.emit(data, "\n".join([
        f"peer id:     {ident.peer_id}",
        f"public key:  {ident.public_key.hex()}",
        f"fingerprint: {ident.fingerprint()}",
        f"key file:    {dd.key_file}",
    ] + ([f"retired:     {len(data['retired_keys'])} older key(s) in {dd.retired_dir}"]
         if data["retired_keys"] else [])))


@key_group.command("export")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="File to write (created 0600; an existing file is never overwritten).")
@passphrase_options
@json_option
@pass_app
def key_export(app: App, out: Path, passphrase_file: Path | None, passphrase_env: str | None,
               passphrase_prompt: bool) -> None:
    """Write a backup copy of the key, sealed with a passphrase if one is given."""
    passphrase = get_passphrase(passphrase_file, passphrase_env, passphrase_prompt, confirm=True)
    dd = app.data_dir.open(create=False, lock=False)
    ident = load_key(dd.key_file)
    out = out.expanduser().absolute()
    try:
        write_atomic(out, encode_key(ident, passphrase), 0o600, overwrite=False)
    except FileExistsError:
        raise CliError(
            f"{out} already exists; refusing to overwrite it (choose another --out)") from None
    if passphrase is None:
        warn(f"{out} is not encrypted: anyone who reads it can use your key and credit. "
             "Prefer --passphrase-prompt, and store the file safely.")
    data = {"peer_id": ident.peer_id, "file": str(out), "sealed": passphrase is not None}
    app.emit(data, f"exported the key of {ident.peer_id} to {out}"
                   f" ({'sealed with a passphrase' if passphrase else 'NOT encrypted'})")


@key_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@passphrase_options
@click.option("--force", is_flag=True,
              help="Replace a different installed key (it is kept in keys-retired/).")
@json_option
@pass_app
def key_import(app: App, file: Path, passphrase_file: Path | None, passphrase_env: str | None,
               passphrase_prompt: bool, force: bool) -> None:
    """Install a key from a backup made by 'key export'."""
    passphrase = get_passphrase(passphrase_file, passphrase_env, passphrase_prompt, confirm=False)
    ident = read_key_file(file, passphrase)
    with app.data_dir.open(create=True, lock=True) as dd:
        retired = None
        status = "installed"
        if dd.has_key():
            current = dd.peek_key()
            if current is not None and current.seed == ident.seed:
                status = "unchanged"
            elif not force:
                who = f"peer id {current.peer_id}" if current else "unreadable"
                raise CliError(
                    f"{dd.key_file} already holds a different key ({who}); --force replaces "
                    f"it (the current key is kept in {dd.retired_dir})")
        if status == "installed":
            retired = dd.install_key(ident)
    data = {"peer_id": ident.peer_id, "key_file": str(dd.key_file), "status": status,
            "retired_key": str(retired) if retired else None}
    lines = [f"{'imported' if status == 'installed' else 'already installed'}: {ident.peer_id}",
             f"key file: {dd.key_file}"]
    if retired:
        lines.append(f"previous key kept in {retired}")
    app.emit(data, "\n".join(lines))


@key_group.command("rotate")
@click.option("--reason", type=click.Choice(["scheduled", "compromised"]), default="scheduled",
              show_default=True,
              help="'compromised' tells publishers to refuse what the old key signs from now on.")
@json_option
@pass_app
def key_rotate(app: App, reason: str) -> None:
    """Replace the key with a new one, keeping a signed statement that links them.

    The old key signs the statement and the new key countersigns it, so credit and trust
    earned by the old key carry over. The old key is kept in keys-retired/.
    """
    from ..wire.envelope import open_envelope
    from ..wire.rotation import check_rotation, make_rotation

    network = app.config().node.network
    with app.data_dir.open(create=False, lock=True) as dd:
        old = load_key(dd.key_file)
        new = Identity.generate()
        at_ms = int(time.time() * 1000)
        statement = make_rotation(old, new, network, at_ms, reason)
        check_rotation(open_envelope(statement, network, kinds={"key_rotation"}))
        path = dd.save_rotation(old.peer_id, at_ms, statement)
        retired = dd.install_key(new, at_ms)
    data = {"old_peer_id": old.peer_id, "new_peer_id": new.peer_id, "network": network,
            "reason": reason, "at": iso_ms(at_ms), "statement": str(path),
            "retired_key": str(retired) if retired else None, "key_file": str(dd.key_file)}
    app.emit(data, "\n".join([
        f"rotated key ({reason}) on network {network}:",
        f"  old: {old.peer_id}",
        f"  new: {new.peer_id}",
        f"statement: {path}",
        f"old key kept in {retired}",
        "Keep the statement: it proves the new key succeeds the old one "
        "('p2pfleet key verify-rotation FILE'). Back up the new key too.",
    ]))


@key_group.command("verify-rotation")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
@pass_app
def key_verify_rotation(app: App, file: Path) -> None:
    """Check a key rotation statement and show which key succeeds which."""
    from ..identity import peer_id_from_key
    from ..wire.envelope import MAX_ENVELOPE, open_envelope
    from ..wire.errors import WrongNetwork
    from ..wire.rotation import check_rotation

    network = app.config().node.network
    with open(file, "rb") as fh:
        data = fh.read(MAX_ENVELOPE + 1)
    try:
        opened = open_envelope(data, network, kinds={"key_rotation"})
        body = check_rotation(opened)
    except WrongNetwork as exc:
        raise CliError(f"{file}: {exc} (give --network to check it for another network)") from None
    except WireError as exc:
        raise CliError(f"{file}: not a valid key rotation statement: {exc}") from None
    old_id, new_id = peer_id_from_key(opened.signer), peer_id_from_key(body.new_key)
    out = {"valid": True, "old_peer_id": old_id, "new_peer_id": new_id, "network": network,
           "reason": body.reason, "at": iso_ms(body.at), "at_ms": body.at, "file": str(file)}
    app.emit(out, "\n".join([
        f"valid key rotation ({body.reason}, {iso_ms(body.at)}, network {network}):",
        f"  {old_id} -> {new_id}",
    ]))
