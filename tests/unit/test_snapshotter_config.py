"""snapshotter.config: the TOML file, and what it hands each mount daemon."""
from __future__ import annotations

import pytest

from p2p.cli import add_mount_options, mount_config
from snapshotter.config import load_config
from snapshotter.mountd import build_parser as mountd_parser


def _write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_p2p_section_becomes_daemon_options_the_daemon_understands(tmp_path):
    cfg = load_config(_write(tmp_path, '[p2p]\nlisten_host = "10.1.2.3"\ntracker = "10.1.2.1:7000"\n'
                                       'upload_rate = 1000000\n'))
    argv = cfg.p2p.daemon_args()
    args = mountd_parser().parse_args(["--bootstrap", "b", "--ref", "h:5000/r:t", "--mountpoint", "m",
                                       "--cache-dir", "c", "--run-dir", "r", "--pid-file", "p", *argv])
    p2p = mount_config(args)
    assert p2p.listen == "10.1.2.3:0" and p2p.tracker == "10.1.2.1:7000" and p2p.upload_rate == 1e6


def test_p2p_is_off_by_default(tmp_path):
    assert load_config(_write(tmp_path, "")).p2p.daemon_args() == []


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'listen'"):
        load_config(_write(tmp_path, '[p2p]\nlisten = "x"\n'))


def test_mount_options_parse_a_static_peer_list():
    import argparse
    ap = argparse.ArgumentParser()
    add_mount_options(ap)
    cfg = mount_config(ap.parse_args(["--p2p-listen", "127.0.0.1:0", "--p2p-peers", "a:1,b:2"]))
    assert [str(p) for p in cfg.peers] == ["a:1", "b:2"]


def test_mount_at(tmp_path):
    assert load_config(_write(tmp_path, "")).daemon.mount_at == "pull"
    assert load_config(_write(tmp_path, '[daemon]\nmount_at = "run"\n')).daemon.mount_at == "run"
    with pytest.raises(ValueError, match="mount_at 'later' is not one of pull, run"):
        load_config(_write(tmp_path, '[daemon]\nmount_at = "later"\n'))


def test_mountd_imports_p2p_only_when_asked():
    """The mount daemon's start is on the pull's / container's path: no P2P imports without P2P options."""
    import subprocess
    import sys
    from pathlib import Path
    base = ["--bootstrap", "b", "--ref", "h:5000/r:t", "--mountpoint", "m", "--cache-dir", "c", "--run-dir", "r",
            "--pid-file", "p"]
    code = ("import sys; from snapshotter.mountd import _parse; a = _parse(sys.argv[1:]); "
            "print('p2p' in sys.modules, getattr(a, 'p2p_tracker', None))")
    for extra, want in (([], "False None"), (["--p2p-tracker", "t:1"], "True t:1")):
        r = subprocess.run([sys.executable, "-c", code, *base, *extra], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[2])
        assert r.stdout.split() == want.split()


def test_standby(tmp_path):
    assert load_config(_write(tmp_path, "")).daemon.standby is True
    assert load_config(_write(tmp_path, "[daemon]\nstandby = false\n")).daemon.standby is False
    with pytest.raises(ValueError, match="daemon.standby 'false' is not true or false"):
        load_config(_write(tmp_path, '[daemon]\nstandby = "false"\n'))
