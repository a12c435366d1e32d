from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfleet.live import datadir as D
from p2pfleet.live.config import load_config, parse_config_text
from p2pfleet.live.datadir import DataDir, DataDirError, default_data_dir, open_data_dir
from p2pfleet.identity import Identity, load_key, save_key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_data_dir(tmp_path):
    assert default_data_dir({"P2PFLEET_DATA_DIR": str(tmp_path / "x"), "XDG_DATA_HOME": "/xdg"}) \
        == tmp_path / "x"
    assert default_data_dir({"XDG_DATA_HOME": "/xdg", "HOME": "/home/u"}) == Path("/xdg/p2pfleet")
    assert default_data_dir({"XDG_DATA_HOME": "rel", "HOME": "/home/u"}) \
        == Path("/home/u/.local/share/p2pfleet")
    assert default_data_dir({"HOME": "/home/u"}) == Path("/home/u/.local/share/p2pfleet")
    assert DataDir().root == Path(os.environ["XDG_DATA_HOME"]) / "p2pfleet"  # conftest


def test_create_makes_the_whole_layout(data_dir):
    with open_data_dir(data_dir) as dd:
        assert dd.locked
        assert mode(data_dir) == 0o700
        assert dd.format_file.read_text() == "p2pfleet-data-dir 1\n"
        for sub in (dd.logs_dir, dd.cache_dir, dd.rotations_dir, dd.retired_dir):
            assert sub.is_dir() and mode(sub) == 0o700
        assert parse_config_text(dd.config_file.read_text()) == {}  # commented defaults
        assert load_config(dd.config_file, env={}).node.network == "main"
        assert dd.lock_file.read_text() == f"{os.getpid()}\n"
        assert mode(dd.lock_file) == 0o600
        with dd.open_state() as state:
            assert state.next_sequence("capacity", 5) == 5
        assert dd.state_file.exists()
        assert not dd.has_key()
    assert not dd.locked
    assert dd.lock_file.read_text() == ""  # released: names nobody


def test_existing_open_dir_is_made_private(data_dir):
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    with open_data_dir(data_dir):
        assert mode(data_dir) == 0o700


def test_upgrade_from_0_empty_dir(data_dir):
    data_dir.mkdir()
    assert DataDir(data_dir).read_format() == 0
    with open_data_dir(data_dir, create=False) as dd:
        assert dd.read_format() == 1 and dd.retired_dir.is_dir()


def test_upgrade_from_0_keeps_a_key_from_before_format(data_dir):
    ident = Identity.from_seed(b"old node")
    save_key(data_dir / "key", ident)
    dd = DataDir(data_dir)
    assert dd.read_format() == 0
    with dd.open(create=False):
        assert dd.read_format() == 1
        assert load_key(dd.key_file).peer_id == ident.peer_id
        assert dd.config_file.exists() and dd.rotations_dir.is_dir()


def test_interrupted_upgrade_resumes(data_dir):
    data_dir.mkdir()
    (data_dir / "logs").mkdir()
    (data_dir / "config.toml").write_text('[node]\nnetwork = "kept"\n')
    (data_dir / ".FORMAT.tmp-123").write_text("p2pfleet-data-dir 1\n")
    with open_data_dir(data_dir) as dd:
        assert dd.read_format() == 1
        assert load_config(dd.config_file, env={}).node.network == "kept"  # not overwritten


def test_upgrade_steps_run_in_order(data_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(D, "FORMAT_VERSION", 3)
    monkeypatch.setitem(D.UPGRADES, 1, lambda dd: calls.append((1, dd.read_format())))
    monkeypatch.setitem(D.UPGRADES, 2, lambda dd: calls.append((2, dd.read_format())))
    with open_data_dir(data_dir) as dd:
        assert dd.format_file.read_text() == "p2pfleet-data-dir 3\n"
    assert calls == [(1, 1), (2, 2)]
    with open_data_dir(data_dir):  # already current: nothing runs
        pass
    assert len(calls) == 2
    with pytest.raises(ValueError, match="two upgrade steps"):
        D.upgrade_step(0)(lambda dd: None)


def test_missing_upgrade_step(data_dir, monkeypatch):
    monkeypatch.setattr(D, "FORMAT_VERSION", 2)
    with pytest.raises(DataDirError, match="no upgrade from data-dir format 1"):
        open_data_dir(data_dir)
    assert not DataDir(data_dir).locked


def test_newer_format_is_refused(data_dir):
    data_dir.mkdir()
    (data_dir / "FORMAT").write_text("p2pfleet-data-dir 7\n")
    for kwargs in ({}, {"lock": False}):
        with pytest.raises(DataDirError) as info:
            DataDir(data_dir).open(**kwargs)
        msg = str(info.value)
        assert "format 7" in msg and "newer" in msg and "Upgrade p2pfleet" in msg
        assert str(data_dir) in msg
    assert (data_dir / "FORMAT").read_text() == "p2pfleet-data-dir 7\n"
    assert not (data_dir / "node.lock").exists()


def test_damaged_format_is_refused(data_dir):
    data_dir.mkdir()
    (data_dir / "FORMAT").write_text("hello\n")
    with pytest.raises(DataDirError, match="FORMAT is damaged: expected 'p2pfleet-data-dir <version>'"):
        open_data_dir(data_dir)


def test_foreign_directory_is_refused_untouched(data_dir):
    data_dir.mkdir(mode=0o755)
    os.chmod(data_dir, 0o755)
    (data_dir / "thesis.tex").write_text("precious")
    with pytest.raises(DataDirError, match="is not empty and is not a p2pfleet data dir.*thesis.tex"):
        open_data_dir(data_dir)
    assert sorted(os.listdir(data_dir)) == ["thesis.tex"] and mode(data_dir) == 0o755


def test_missing_dir_without_create(data_dir):
    with pytest.raises(DataDirError, match="no data dir at .*p2pfleet node init"):
        DataDir(data_dir).open(create=False)
    assert not data_dir.exists()


def test_a_file_is_not_a_data_dir(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataDirError, match="not a directory"):
        open_data_dir(tmp_path / "f")


def test_lock_in_process_and_release(data_dir):
    first = open_data_dir(data_dir)
    with pytest.raises(DataDirError) as info:
        open_data_dir(data_dir)
    assert f"pid {os.getpid()}" in str(info.value) and "in use" in str(info.value)
    ro = DataDir(data_dir).open(lock=False)  # readers need no lock
    assert not ro.locked and ro.lock_holder() == os.getpid()
    first.close()
    first.close()  # twice is fine
    assert ro.lock_holder() is None
    with open_data_dir(data_dir) as again:
        assert again.locked


HOLDER = """
import sys
from p2pfleet.live.datadir import DataDir
dd = DataDir(sys.argv[1]).open()
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_held_by_another_process(data_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(data_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(DataDirError) as info:
            open_data_dir(data_dir)
        msg = str(info.value)
        assert f"pid {proc.pid}" in msg and str(data_dir) in msg and "stop it first" in msg
        assert DataDir(data_dir).lock_holder() == proc.pid
    finally:
        proc.kill()  # dies holding the lock: the file still names it
        proc.wait()
    assert (data_dir / "node.lock").read_text() == f"{proc.pid}\n"
    with open_data_dir(data_dir) as dd:  # a stale lock file does not block
        assert dd.locked and dd.lock_file.read_text() == f"{os.getpid()}\n"


def test_retire_and_install_key(data_dir):
    a, b = Identity.from_seed(b"a"), Identity.from_seed(b"b")
    with open_data_dir(data_dir) as dd:
        assert dd.retire_key() is None
        assert dd.install_key(a) is None
        assert dd.install_key(a) is None  # the same key: nothing retired
        retired = dd.install_key(b, now_ms=1_700_000_000_123)
        assert retired == dd.retired_dir / f"20231114T221320.123Z-{a.peer_id}.key"
        assert mode(retired) == 0o600 and load_key(retired).peer_id == a.peer_id
        assert load_key(dd.key_file).peer_id == b.peer_id
        os.chmod(dd.key_file, 0o644)  # even a leaked-permission key is kept, as 0600
        second = dd.retire_key(now_ms=1_700_000_000_123)
        assert second is not None and second.name.endswith(f"{b.peer_id}.key") and mode(second) == 0o600
        assert dd.retired_keys() == sorted([retired, second])
        assert not dd.has_key()
    with pytest.raises(DataDirError, match="needs the data dir opened with its lock"):
        DataDir(data_dir).open(lock=False).retire_key()


def test_rotation_files_are_never_overwritten(data_dir):
    with open_data_dir(data_dir) as dd:
        path = dd.save_rotation("12D3KooWx", 1_700_000_000_000, b"one")
        assert path.parent == dd.rotations_dir and path.read_bytes() == b"one"
        with pytest.raises(FileExistsError):
            dd.save_rotation("12D3KooWx", 1_700_000_000_000, b"two")
        assert path.read_bytes() == b"one"
        assert not [p for p in dd.rotations_dir.iterdir() if p.name.startswith(".")]


def test_write_atomic_mode(tmp_path):
    D.write_atomic(tmp_path / "s", "secret", 0o600)
    assert mode(tmp_path / "s") == 0o600 and (tmp_path / "s").read_text() == "secret"
    D.write_atomic(tmp_path / "s", b"new", 0o600)
    assert (tmp_path / "s").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
