"""The node's data directory: layout, format version and upgrades, and the one-node lock.

Layout (the directory itself is 0700)::

    <data dir>/
      FORMAT          "p2pfleet-data-dir <version>\\n": the layout version (current: 1)
      config.toml     the node's configuration (`p2pfleet.live.config`), fully commented
      key             the node's Ed25519 key, 0600 (`p2pfleet.identity.save_key/load_key`)
      state.sqlite    seen messages and record sequences (`p2pfleet.store.state.NodeState`)
      ledger.sqlite   leases, reports, receipts and energy per publisher
                      (`p2pfleet.store.ledger.Ledger`)
      node.lock       held with flock(2) by the process using the directory; holds its pid
      logs/           log files
      cache/          downloaded models and blobs (safe to delete while the node is stopped)
      rotations/      key rotation statements written by `p2pfleet key rotate`,
                      <UTC time>-<old peer id>.bin (signed `key_rotation` envelopes)
      keys-retired/   keys replaced by rotation, import or `node init --force`, 0600,
                      <UTC time>-<peer id>.key; never deleted by p2pfleet

Default location: ``$P2PFLEET_DATA_DIR``, else ``$XDG_DATA_HOME/p2pfleet``, else
``~/.local/share/p2pfleet``.

Format versions. FORMAT names the layout version. Opening a directory for writing brings
it up to `FORMAT_VERSION` by running the registered upgrade steps N -> N+1 in order (each is
idempotent; FORMAT is rewritten after each step, so an interrupted upgrade resumes). A
directory without FORMAT that is empty or holds only parts of the layout (a key file from
before FORMAT existed, say) is version 0. A directory with a newer FORMAT than this code
knows is refused: it was written by newer software. A non-empty directory that is not a
data dir is refused too (nothing is created in, or chmodded on, somebody's home directory).

The lock. Two processes must never share a data dir (two nodes would sign with one key and
race on the state database). `DataDir.open(lock=True)` takes an exclusive, non-blocking
flock(2) on node.lock and writes its pid into it; a second process gets a `DataDirError`
naming that pid. The lock is released by `close()` or when the process dies, so a lock file
left behind by a crashed process does not block. The descriptor is not inherited by
executed children (O_CLOEXEC).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..identity import Identity, KeyFileError, decode_key, save_key

if TYPE_CHECKING:
    from ..store.state import NodeState

FORMAT_VERSION = 1
FORMAT_MAGIC = "p2pfleet-data-dir"

FORMAT_NAME = "FORMAT"
CONFIG_NAME = "config.toml"
KEY_NAME = "key"
STATE_NAME = "state.sqlite"
LEDGER_NAME = "ledger.sqlite"
LOCK_NAME = "node.lock"
LOGS_NAME = "logs"
CACHE_NAME = "cache"
ROTATIONS_NAME = "rotations"
RETIRED_NAME = "keys-retired"

# Everything that may appear in a data dir of any version (SQLite adds -wal and -shm).
LAYOUT_NAMES = frozenset({
    FORMAT_NAME, CONFIG_NAME, KEY_NAME, STATE_NAME, STATE_NAME + "-wal", STATE_NAME + "-shm",
    LOCK_NAME, LOGS_NAME, CACHE_NAME, ROTATIONS_NAME, RETIRED_NAME,
    LEDGER_NAME, LEDGER_NAME + "-wal", LEDGER_NAME + "-shm",
})
_SUBDIRS = (LOGS_NAME, CACHE_NAME, ROTATIONS_NAME, RETIRED_NAME)


class DataDirError(Exception):
    """The data dir is missing, foreign, newer than this software, in use, or unusable."""


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """$P2PFLEET_DATA_DIR, else $XDG_DATA_HOME/p2pfleet, else ~/.local/share/p2pfleet."""
    env = os.environ if env is None else env
    if env.get("P2PFLEET_DATA_DIR"):
        return Path(env["P2PFLEET_DATA_DIR"]).expanduser().absolute()
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative paths
        return Path(xdg) / "p2pfleet"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "share" / "p2pfleet"


def utc_stamp(ms: int | None = None) -> str:
    """A sortable UTC time for file names: 20250131T235959.123Z."""
    ms = int(time.time() * 1000) if ms is None else ms
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644, *,
                 overwrite: bool = True) -> None:
    """Write a file so readers see the old or the new content, never a part.

    The file has `mode` from its first byte. With overwrite=False an existing file is not
    replaced (FileExistsError), checked atomically.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError if path exists
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Upgrades: UPGRADES[n] turns a version-n directory into a version-(n+1) one.

UPGRADES: dict[int, Callable[["DataDir"], None]] = {}


UpgradeStep = Callable[["DataDir"], None]


def upgrade_step(from_version: int) -> Callable[[UpgradeStep], UpgradeStep]:
    """Register the step that turns a version-`from_version` dir into the next version."""

    def register(fn: UpgradeStep) -> UpgradeStep:
        if from_version in UPGRADES:
            raise ValueError(f"two upgrade steps from data-dir format {from_version}")
        UPGRADES[from_version] = fn
        return fn

    return register


@upgrade_step(0)
def _create_layout(dd: "DataDir") -> None:
    """0 -> 1: create the subdirectories and a commented default config.toml."""
    from .config import render_config

    for name in _SUBDIRS:
        _mkdir_private(dd.root / name)
    if not dd.config_file.exists():
        write_atomic(dd.config_file, render_config(), 0o644)


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o700)


# ---------------------------------------------------------------------------------------------

class DataDir:
    """One node's data directory.

    `DataDir(root)` only names paths. `open()` checks (and optionally creates, locks and
    upgrades) the directory; use it as a context manager, or call `close()`.
    """

    def __init__(self, root: Path | str | None = None):
        self.root = (default_data_dir() if root is None else Path(root).expanduser()).absolute()
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"DataDir({str(self.root)!r})"

    # paths -------------------------------------------------------------------------------------
    @property
    def format_file(self) -> Path:
        return self.root / FORMAT_NAME

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def key_file(self) -> Path:
        return self.root / KEY_NAME

    @property
    def state_file(self) -> Path:
        return self.root / STATE_NAME

    @property
    def ledger_file(self) -> Path:
        return self.root / LEDGER_NAME

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def logs_dir(self) -> Path:
        return self.root / LOGS_NAME

    @property
    def cache_dir(self) -> Path:
        return self.root / CACHE_NAME

    @property
    def rotations_dir(self) -> Path:
        return self.root / ROTATIONS_NAME

    @property
    def retired_dir(self) -> Path:
        return self.root / RETIRED_NAME

    # format ------------------------------------------------------------------------------------
    def read_format(self) -> int:
        """The directory's format version (0: none yet). Refuses foreign directories."""
        try:
            text = self.format_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return self._legacy_version()
        except OSError as exc:
            raise DataDirError(f"{self.format_file}: cannot read it ({exc.strerror})") from None
        parts = text.split()
        if len(parts) != 2 or parts[0] != FORMAT_MAGIC or not parts[1].isdigit():
            raise DataDirError(
                f"{self.format_file} is damaged: expected '{FORMAT_MAGIC} <version>', "
                f"found {text[:60]!r}")
        return int(parts[1])

    def _legacy_version(self) -> int:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return 0
        except NotADirectoryError:
            raise DataDirError(f"{self.root} is a file, not a data directory") from None
        except OSError as exc:
            raise DataDirError(f"{self.root}: cannot list it ({exc.strerror})") from None
        foreign = sorted(n for n in names if n not in LAYOUT_NAMES and not _is_tmp(n))
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise DataDirError(
                f"{self.root} is not empty and is not a p2pfleet data dir (no {FORMAT_NAME} "
                f"file; it holds {shown}); give an empty or new directory with --data-dir")
        return 0

    def _check_not_newer(self, version: int) -> None:
        if version > FORMAT_VERSION:
            from .. import __version__

            raise DataDirError(
                f"{self.root} has data-dir format {version}, newer than this p2pfleet "
                f"{__version__} understands (up to {FORMAT_VERSION}): it was written by newer "
                f"software. Upgrade p2pfleet, or give another --data-dir.")

    def _write_format(self, version: int) -> None:
        write_atomic(self.format_file, f"{FORMAT_MAGIC} {version}\n", 0o644)

    # open / close ------------------------------------------------------------------------------
    def open(self, *, create: bool = True, lock: bool = True, upgrade: bool | None = None) -> "DataDir":
        """Check the directory and get it ready; returns self.

        create: make the directory (0700) if it does not exist; otherwise a missing directory
        is an error. lock: take the one-node lock (see the module docstring). upgrade: bring
        the format up to date (default: when locking; upgrading without the lock is refused).
        Read-only users pass lock=False; they still get an error for a newer format.
        """
        upgrade = lock if upgrade is None else upgrade
        if upgrade and not lock:
            raise ValueError("upgrading a data dir needs its lock")
        if not self.root.exists():
            if not create:
                raise DataDirError(
                    f"no data dir at {self.root}: run 'p2pfleet node init' (or give --data-dir)")
            try:
                self.root.mkdir(mode=0o700, parents=True)
            except FileExistsError:
                pass  # created concurrently; checked below
            except OSError as exc:
                raise DataDirError(f"cannot create {self.root}: {exc.strerror}") from None
        if not self.root.is_dir():
            raise DataDirError(f"{self.root} is not a directory")
        version = self.read_format()  # refuses foreign dirs before anything is written
        self._check_not_newer(version)
        if not lock:
            return self
        try:
            if stat.S_IMODE(self.root.stat().st_mode) & 0o077:
                os.chmod(self.root, 0o700)
        except OSError as exc:
            raise DataDirError(
                f"{self.root}: cannot make it private (chmod 700): {exc.strerror}") from None
        self._acquire_lock()
        try:
            if upgrade:
                self._upgrade()
        except BaseException:
            self.close()
            raise
        return self

    def _upgrade(self) -> None:
        version = self.read_format()  # again, now under the lock
        self._check_not_newer(version)
        while version < FORMAT_VERSION:
            step = UPGRADES.get(version)
            if step is None:
                raise DataDirError(f"{self.root}: no upgrade from data-dir format {version}")
            try:
                step(self)
            except OSError as exc:
                raise DataDirError(
                    f"{self.root}: upgrading data-dir format {version} -> {version + 1} failed: "
                    f"{exc.strerror or exc} ({exc.filename or ''})") from None
            version += 1
            self._write_format(version)

    def close(self) -> None:
        """Release the lock (if held). Safe to call twice."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # a lock file left behind names nobody
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "DataDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def locked(self) -> bool:
        return self._lock_fd is not None

    # lock --------------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DataDirError(f"{self.lock_file}: cannot open the lock file ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            busy = exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES)
            holder = _read_holder(fd) if busy else None
            os.close(fd)
            if not busy:
                raise DataDirError(f"{self.lock_file}: cannot lock it ({exc.strerror})") from None
            who = f"pid {holder}" if holder else "pid unknown"
            raise DataDirError(
                f"{self.root} is in use by another p2pfleet process ({who}); stop it first, "
                f"or give another --data-dir") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is informational only
        self._lock_fd = fd

    def lock_holder(self) -> int | None:
        """The pid written in node.lock if another process holds the lock, else None."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return _read_holder(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def require_lock(self) -> None:
        if self._lock_fd is None:
            raise DataDirError(f"{self.root}: this needs the data dir opened with its lock")

    # keys --------------------------------------------------------------------------------------
    def has_key(self) -> bool:
        return self.key_file.exists()

    def peek_key(self) -> Identity | None:
        """The installed key, ignoring its file mode (to name or compare it); None if absent
        or unreadable. Use `identity.load_key` to actually use the key."""
        try:
            return decode_key(self.key_file.read_text(encoding="ascii", errors="replace"),
                              source=str(self.key_file))
        except (OSError, KeyFileError):
            return None

    def retire_key(self, now_ms: int | None = None) -> Path | None:
        """Move the installed key to keys-retired/<UTC time>-<peer id>.key (0600).

        Returns the new path, or None if there was no key. Needs the lock.
        """
        self.require_lock()
        if not self.key_file.exists():
            return None
        old = self.peek_key()
        label = old.peer_id if old is not None else "unreadable"
        _mkdir_private(self.retired_dir)
        base = f"{utc_stamp(now_ms)}-{label}"
        dest = self.retired_dir / f"{base}.key"
        n = 1
        while dest.exists():
            n += 1
            dest = self.retired_dir / f"{base}-{n}.key"
        os.chmod(self.key_file, 0o600)
        os.replace(self.key_file, dest)
        _fsync_dir(self.root)
        return dest

    def install_key(self, identity: Identity, now_ms: int | None = None) -> Path | None:
        """Make `identity` the node key, retiring a different key already installed.

        Returns where the previous key went (None: there was none, or it was the same key).
        """
        self.require_lock()
        retired = None
        current = self.peek_key() if self.key_file.exists() else None
        if self.key_file.exists() and (current is None or current.seed != identity.seed):
            retired = self.retire_key(now_ms)
        save_key(self.key_file, identity)
        return retired

    def retired_keys(self) -> list[Path]:
        if not self.retired_dir.is_dir():
            return []
        return sorted(self.retired_dir.glob("*.key"))

    # rotations ---------------------------------------------------------------------------------
    def rotation_file(self, old_peer_id: str, at_ms: int) -> Path:
        return self.rotations_dir / f"{utc_stamp(at_ms)}-{old_peer_id}.bin"

    def save_rotation(self, old_peer_id: str, at_ms: int, statement: bytes) -> Path:
        self.require_lock()
        _mkdir_private(self.rotations_dir)
        path = self.rotation_file(old_peer_id, at_ms)
        write_atomic(path, statement, 0o644, overwrite=False)
        return path

    # state -------------------------------------------------------------------------------------
    def open_state(self) -> "NodeState":
        """The node state database (created on first use). Needs the lock."""
        from ..store.state import NodeState

        self.require_lock()
        return NodeState(self.state_file)


def _is_tmp(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def _read_holder(fd: int) -> int | None:
    """The pid in a lock file (the holder writes it right after locking: retry briefly)."""
    for _ in range(20):
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def open_data_dir(root: Path | str | None = None, *, create: bool = True,
                  lock: bool = True) -> DataDir:
    """`DataDir(root).open(...)`; use as ``with open_data_dir(path) as dd: ...``."""
    return DataDir(root).open(create=create, lock=lock)


__all__ = [
    "DataDir", "DataDirError", "FORMAT_VERSION", "UPGRADES", "default_data_dir",
    "open_data_dir", "upgrade_step", "utc_stamp", "write_atomic",
]
