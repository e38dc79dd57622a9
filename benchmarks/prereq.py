"""What a benchmark entry point needs, checked before it does any work.

    require("python -m benchmarks.lazy_start", tools=["debootstrap", "skopeo"], modules=["matplotlib"])

Missing system tools (looked up on PATH, as the suite runs them) and Python modules end the program
with one line that names them and the command that installs them (exit status 1), instead of a
traceback after minutes of work. `bash .ci/setup` installs all of them.
"""
from __future__ import annotations

import ctypes.util
import importlib.util
import shutil
from typing import Iterable

# tool -> the Debian 12 package that ships it
APT = {
    "debootstrap": "debootstrap", "umoci": "umoci", "skopeo": "skopeo", "docker-registry": "docker-registry",
    "containerd": "containerd", "ctr": "containerd", "runc": "runc", "mkfs.ext4": "e2fsprogs",
    "ip": "iproute2", "tc": "iproute2", "nsenter": "util-linux", "unshare": "util-linux", "mount": "mount",
    "losetup": "mount", "curl": "curl", "strace": "strace", "zstd": "zstd", "gzip": "gzip", "chroot": "coreutils",
    "truncate": "coreutils", "bash": "bash", "busybox": "busybox-static", "libfuse3": "fuse3",
}
# Python module -> the pyproject.toml extra that declares it
EXTRA = {"matplotlib": "bench"}
SETUP = "bash .ci/setup"

def _have_tool(tool: str) -> bool:
    if tool == "libfuse3":                      # a library (mfusepy loads it), not a command
        return bool(ctypes.util.find_library("fuse3") or ctypes.util.find_library("fuse"))
    return shutil.which(tool) is not None


def _have_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing(tools: Iterable[str] = (), modules: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(missing tools, missing modules), each in the order asked, without duplicates."""
    tools, modules = list(dict.fromkeys(tools)), list(dict.fromkeys(modules))
    return [t for t in tools if not _have_tool(t)], [m for m in modules if not _have_module(m)]


def message(prog: str, tools: list[str], modules: list[str]) -> str:
    """The one line for what is missing: names, then the commands that install them."""
    how = []
    apt = sorted({APT.get(t, t) for t in tools})
    if apt:
        how.append("apt-get install " + " ".join(apt))
    extras = sorted({EXTRA.get(m, m) for m in modules})
    if extras:
        how.append(f"python3 -m pip install -e '.[{','.join(extras)}]'")
    names = [f"`{t}`" for t in tools] + [f"python module {m}" for m in modules]
    return f"{prog}: missing {', '.join(names)}; install with `{SETUP}` (or: {' && '.join(how)})"


def require(prog: str, tools: Iterable[str] = (), modules: Iterable[str] = ()) -> None:
    """Exit (status 1, one line on stderr) when any of `tools` or `modules` is missing."""
    t, m = missing(tools, modules)
    if t or m:
        raise SystemExit(message(prog, t, m))
