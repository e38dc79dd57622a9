"""snapshotter.config: the TOML file, and what it hands each mount daemon."""
from __future__ import annotations

import pytest

from p2p.cli import add_mount_options, mount_config
from snapshotter.config import load_config
from snapshotter.mountd import _parser as mountd_parser


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
