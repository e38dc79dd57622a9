"""benchmarks.prereq: a missing tool or module is one line naming it and its install command, before any work."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import prereq

REPO = Path(__file__).resolve().parents[2]


def test_nothing_missing_passes():
    prereq.require("prog", ["sh"], ["json"])


def test_missing_tool_and_module_is_one_line_with_the_install_commands():
    with pytest.raises(SystemExit) as e:
        prereq.require("python -m benchmarks.x", ["sh", "debootstrap-not-here", "ip-not-here"],
                       ["json", "matplotlib_not_here"])
    msg = str(e.value.code)
    assert "\n" not in msg
    assert msg.startswith("python -m benchmarks.x: missing `debootstrap-not-here`, `ip-not-here`, "
                          "python module matplotlib_not_here")
    assert "bash .ci/setup" in msg and "apt-get install debootstrap-not-here ip-not-here" in msg
    assert "pip install -e '.[matplotlib_not_here]'" in msg


def test_known_tools_and_modules_name_their_package_and_extra():
    msg = prereq.message("p", ["debootstrap", "mkfs.ext4", "tc", "ip"], ["matplotlib"])
    assert "apt-get install debootstrap e2fsprogs iproute2 &&" in msg
    assert "python3 -m pip install -e '.[bench]'" in msg


def _run_main(module: str, args: list[str], *, path: str | None = None, hide: tuple = ()) -> subprocess.CompletedProcess:
    code = ("import runpy, sys\n"
            f"for m in {list(hide)!r}: sys.modules[m] = None\n"
            f"sys.argv = [{module!r}, *{args!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__')\n")
    env = dict(os.environ, PATH=path or os.environ["PATH"])
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(os.geteuid() != 0, reason="lazy_start checks root first")
def test_lazy_start_quick_names_a_missing_tool_before_any_work(tmp_path):
    """PATH without /usr/sbin (debootstrap, mkfs.ext4, ...): one line, no traceback, nothing created."""
    workdir = tmp_path / "wd"
    t0 = time.monotonic()
    r = _run_main("benchmarks.lazy_start", ["--quick", "--workdir", str(workdir), "--out", str(tmp_path / "out")],
                  path="/usr/local/bin:/usr/bin:/bin" if sys.executable.startswith("/usr/") else
                  f"{Path(sys.executable).parent}:/usr/bin:/bin")
    assert time.monotonic() - t0 < 30
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "missing `mkfs.ext4`" in lines[0] and "`debootstrap`" in lines[0], lines[0]
    assert "apt-get install" in lines[0] and "debootstrap" in lines[0] and "bash .ci/setup" in lines[0]
    assert not workdir.exists() and not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="lazy_start checks root first")
def test_lazy_start_names_a_missing_matplotlib_before_any_work(tmp_path):
    r = _run_main("benchmarks.lazy_start", ["--quick", "--workdir", str(tmp_path / "wd")], hide=("matplotlib",))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "python -m benchmarks.lazy_start: missing python module matplotlib; install with `bash .ci/setup` "
        "(or: python3 -m pip install -e '.[bench]')"], r.stderr
    assert not (tmp_path / "wd").exists()


def test_report_names_a_missing_matplotlib(tmp_path):
    r = _run_main("benchmarks.report", [str(tmp_path)], hide=("matplotlib",))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "missing python module matplotlib" in r.stderr and "'.[bench]'" in r.stderr
