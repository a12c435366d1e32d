"""The real `p2pfleet` console script, run as a subprocess in temporary directories."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

P2PFLEET = Path(sys.executable).parent / "p2pfleet"
PUBLISHER = "12D3KooWQX9wb85MdrFGfNzKfTA1bAd3g3inyuqdcprJ4tj4wc1R"


def run(*args: str | Path, data_dir: Path | None = None, env: dict[str, str] | None = None,
        ok: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(P2PFLEET)]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    cmd += [str(a) for a in args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("P2PFLEET_")}
    full_env.update(env or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, input=input,
                          timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    if ok:
        assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
    return proc


def run_json(*args: str | Path, **kw) -> dict:
    return json.loads(run(*args, "--json", **kw).stdout)


def fails(*args: str | Path, **kw) -> str:
    """Run a command that must fail cleanly; return its one-line error."""
    proc = run(*args, ok=False, **kw)
    assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def mode(path: str | Path) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


def test_script_is_installed():
    assert P2PFLEET.exists(), f"no console script at {P2PFLEET}: pip install -e ."


def test_init_show_and_refuse_second_init(tmp_path):
    dd = tmp_path / "node"
    out = run("node", "init", "--network", "testnet", "--allow", PUBLISHER, data_dir=dd).stdout
    shown = run_json("key", "show", data_dir=dd)
    assert shown["peer_id"].startswith("12D3KooW") and shown["peer_id"] in out
    assert shown["key_file"] == str(dd / "key") and str(dd / "key") in out
    assert "Back up the key" in out
    assert len(shown["public_key"]) == 64 and len(shown["fingerprint"]) == 16
    assert mode(dd / "key") == 0o600 and mode(dd) == 0o700
    assert (dd / "FORMAT").read_text() == "p2pfleet-data-dir 1\n"
    assert (dd / "state.sqlite").exists()

    cfg = run_json("config", "show", data_dir=dd)
    assert cfg["values"]["node"]["network"] == "testnet"
    assert cfg["values"]["publishers"]["allow"] == [PUBLISHER]
    assert cfg["sources"]["node.network"] == f"file {dd / 'config.toml'}"
    assert cfg["sources"]["node.mdns"] == "default"
    assert "# mdns = false" in (dd / "config.toml").read_text()

    err = fails("node", "init", data_dir=dd)
    assert "already exists" in err and shown["peer_id"] in err and "--force" in err
    assert run_json("key", "show", data_dir=dd)["peer_id"] == shown["peer_id"]

    forced = run_json("node", "init", "--force", data_dir=dd)
    assert forced["peer_id"] != shown["peer_id"]
    assert forced["retired_key"].endswith(f"{shown['peer_id']}.key")
    assert mode(forced["retired_key"]) == 0o600
    assert forced["network"] == "testnet"  # the config was kept
    assert run_json("key", "show", data_dir=dd)["retired_keys"] == [forced["retired_key"]]


def test_init_rejects_bad_options_before_creating_anything(tmp_path):
    dd = tmp_path / "node"
    err = fails("node", "init", "--network", "Bad Net", data_dir=dd)
    assert "node.network = 'Bad Net'" in err and "option --network" in err and "allowed:" in err
    err = fails("node", "init", "--allow", "nobody", data_dir=dd)
    assert "publishers.allow" in err and "Ed25519 peer id" in err
    assert not dd.exists()


def test_export_import_round_trip(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    peer = run_json("node", "init", data_dir=a)["peer_id"]
    secret = tmp_path / "pass.txt"
    secret.write_text("correct horse battery staple\n")
    backup = tmp_path / "backup.key"

    out = run_json("key", "export", "--out", backup, "--passphrase-file", secret, data_dir=a)
    assert out == {"peer_id": peer, "file": str(backup), "sealed": True}
    assert mode(backup) == 0o600 and "argon2id" in backup.read_text()
    err = fails("key", "export", "--out", backup, "--passphrase-file", secret, data_dir=a)
    assert "already exists" in err

    imported = run_json("key", "import", backup, "--passphrase-env", "PW", data_dir=b,
                        env={"PW": "correct horse battery staple"})
    assert imported["peer_id"] == peer and imported["status"] == "installed"
    assert run_json("key", "show", data_dir=b)["peer_id"] == peer
    assert mode(b / "key") == 0o600

    err = fails("key", "import", backup, "--passphrase-env", "PW", data_dir=b, env={"PW": "wrong"})
    assert "wrong passphrase" in err
    err = fails("key", "import", backup, data_dir=b)
    assert "sealed with a passphrase" in err and "--passphrase-file" in err

    plain = tmp_path / "plain.key"
    proc = run("key", "export", "--out", plain, data_dir=a)
    assert "not encrypted" in proc.stderr and mode(plain) == 0o600
    assert run_json("key", "import", plain, data_dir=b)["status"] == "unchanged"

    other = tmp_path / "c"
    run("node", "init", data_dir=other)
    other_peer = run_json("key", "show", data_dir=other)["peer_id"]
    err = fails("key", "import", plain, data_dir=other)
    assert "different key" in err and other_peer in err and "--force" in err
    forced = run_json("key", "import", plain, "--force", data_dir=other)
    assert forced["peer_id"] == peer and forced["retired_key"].endswith(f"{other_peer}.key")


def test_rotate_then_verify(tmp_path):
    dd = tmp_path / "node"
    old = run_json("node", "init", "--network", "rotnet", data_dir=dd)["peer_id"]
    rot = run_json("key", "rotate", "--reason", "compromised", data_dir=dd)
    assert rot["old_peer_id"] == old and rot["new_peer_id"] != old
    assert rot["network"] == "rotnet" and rot["reason"] == "compromised"
    statement = Path(rot["statement"])
    assert statement.parent == dd / "rotations" and statement.name.endswith(f"-{old}.bin")
    assert run_json("key", "show", data_dir=dd)["peer_id"] == rot["new_peer_id"]
    assert Path(rot["retired_key"]).name.endswith(f"{old}.key") and mode(rot["retired_key"]) == 0o600

    # anyone can check the statement, with no data dir of their own
    other = tmp_path / "nobody"
    checked = run_json("--network", "rotnet", "key", "verify-rotation", statement, data_dir=other)
    assert checked["valid"] is True
    assert (checked["old_peer_id"], checked["new_peer_id"]) == (old, rot["new_peer_id"])
    assert checked["reason"] == "compromised" and checked["at"] == rot["at"]
    human = run("key", "verify-rotation", statement, data_dir=dd).stdout
    assert f"{old} -> {rot['new_peer_id']}" in human
    assert not other.exists()

    err = fails("key", "verify-rotation", statement, data_dir=other)  # network "main"
    assert "wrong-network" in err and "rotnet" in err and "--network" in err
    tampered = tmp_path / "tampered.bin"
    data = bytearray(statement.read_bytes())
    data[-1] ^= 1
    tampered.write_bytes(bytes(data))
    err = fails("key", "verify-rotation", tampered, data_dir=dd)
    assert "not a valid key rotation statement" in err and "bad-signature" in err
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00hello")
    assert "not a valid key rotation statement" in fails("key", "verify-rotation", garbage, data_dir=dd)


def test_config_show_check_and_bad_values(tmp_path):
    dd = tmp_path / "node"
    assert "defaults apply" in run("config", "check", data_dir=dd).stdout
    shown = run_json("config", "show", data_dir=dd,
                     env={"P2PFLEET_NODE_LISTEN": "/ip4/127.0.0.1/tcp/1,/ip4/127.0.0.1/tcp/2"})
    assert shown["values"]["node"]["listen"] == ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"]
    assert shown["sources"]["node.listen"] == "env P2PFLEET_NODE_LISTEN"
    assert not dd.exists()  # looking at the config creates nothing

    run("node", "init", data_dir=dd)
    check = run_json("config", "check", data_dir=dd)
    assert check["ok"] is True and check["network"] == "main"

    # command line > environment > file
    (dd / "config.toml").write_text('[node]\nlog_level = "info"\n')
    shown = run_json("-s", "node.log_level=debug", "config", "show", data_dir=dd,
                     env={"P2PFLEET_NODE_LOG_LEVEL": "error"})
    assert shown["values"]["node"]["log_level"] == "debug"
    assert shown["sources"]["node.log_level"] == "option --set node.log_level"
    human = run("config", "show", data_dir=dd, env={"COLUMNS": "200"}).stdout
    assert "node.log_level" in human and "config file" in human

    err = fails("config", "check", data_dir=dd, env={"P2PFLEET_NODE_DHT_MODE": "fast"})
    assert "node.dht_mode = 'fast'" in err and "P2PFLEET_NODE_DHT_MODE" in err
    assert "one of 'auto', 'server', 'client'" in err

    (dd / "config.toml").write_text("[records]\ncapacity_lifetime_s = 100\n")
    err = fails("config", "check", data_dir=dd)
    assert "records.capacity_lifetime_s = 100" in err and str(dd / "config.toml") in err
    assert ">= 300" in err
    assert "records.capacity_lifetime_s" in fails("config", "show", data_dir=dd)

    (dd / "config.toml").write_text('[node]\nnetwrok = "x"\n')
    assert "did you mean node.network?" in fails("config", "check", data_dir=dd)
    assert "did you mean node.network?" in fails("-s", "node.netwok=x", "config", "show")
    assert "did you mean P2PFLEET_NODE_MDNS?" in fails("config", "check",
                                                       env={"P2PFLEET_NODE_MDSN": "1"})
    assert "cannot read it" in fails("--config", tmp_path / "none.toml", "config", "check")

    default = run("config", "default").stdout
    assert "# network = \"main\"" in default and "P2PFLEET_RECORDS_REPUBLISH_S" in default


def test_errors_are_one_line_without_traceback(tmp_path):
    empty = tmp_path / "empty"
    assert "node init" in fails("key", "show", data_dir=empty)
    assert "node init" in fails("key", "rotate", data_dir=empty)
    empty.mkdir()
    assert "no key file" in fails("key", "show", data_dir=empty)
    assert "no key file" in fails("key", "export", "--out", tmp_path / "x", data_dir=empty)

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "not a p2pfleet data dir" in fails("node", "init", data_dir=foreign)

    node = tmp_path / "node"
    run("node", "init", data_dir=node)
    os.chmod(node / "key", 0o644)
    err = fails("key", "show", data_dir=node)
    assert f"chmod 600 {node / 'key'}" in err
    os.chmod(node / "key", 0o600)
    (node / "FORMAT").write_text("p2pfleet-data-dir 99\n")
    assert "newer" in fails("key", "show", data_dir=node)

    assert "No such file" in fails("key", "verify-rotation", tmp_path / "missing.bin")
    assert "empty" in fails("key", "export", "--out", tmp_path / "y", "--passphrase-env", "PW",
                            data_dir=node, env={"PW": ""})

    usage = run("key", "rotate", "--reason", "bored", ok=False)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_version_and_global_json():
    assert run("version").stdout.startswith("p2pfleet 0.1.0")
    info = run_json("version")
    assert info["p2pfleet"] == "0.1.0" and info["data_dir_format"] == 1
    assert json.loads(run("--json", "version").stdout) == info
    assert run("--version").stdout.strip() == "p2pfleet, version 0.1.0"


def test_a_data_dir_in_use_is_refused(tmp_path):
    dd = tmp_path / "node"
    run("node", "init", data_dir=dd)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from p2pfleet.live.datadir import DataDir; "
         "d = DataDir(sys.argv[1]).open(); print('locked', flush=True); sys.stdin.read()", str(dd)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = fails("key", "rotate", data_dir=dd)
        assert f"pid {holder.pid}" in err and "in use" in err
        run("key", "show", data_dir=dd)  # reading needs no lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    run("key", "rotate", data_dir=dd)
