"""Workloads of the lazy-start suite: a command, the image it runs on, and a clear end condition.

A one-shot workload is *ready* when its process exits 0 with the expected
output (HelloBench's "first useful output" for a command); a server is ready
when it answers on its port.  `NAME@IMAGE` runs a workload on another image
(`py-numpy@pysci`, `echo@busybox`).
"""
from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass, replace

_HELLO_C = r'#include <stdio.h>\nint main(void){puts("hi from gcc");return 0;}\n'


@dataclass(frozen=True)
class Workload:
    name: str
    image: str
    argv: tuple[str, ...]
    expect: str | None = None          # substring of stdout that proves it worked
    server: bool = False               # ready = answers HTTP on 127.0.0.1:{port}
    doc: str = ""

    def on(self, image: str) -> "Workload":
        return replace(self, name=f"{self.name.split('@')[0]}@{image}", image=image)

    def command(self, port: int | None = None) -> list[str]:
        return [a.replace("{port}", str(port)) for a in self.argv]

    @property
    def shell(self) -> str:
        """The command as one would type it (for reports)."""
        def q(a: str) -> str:
            return a if a and all(c.isalnum() or c in "-_./=:{}" for c in a) else "'" + a.replace("'", "'\\''") + "'"
        return " ".join(q(a) for a in self.argv)


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("echo", "minbase", ("sh", "-c", "echo hello"), "hello", doc="shell builtin"),
    Workload("py-print", "python", ("python3", "-c", "print(1)"), "1"),
    Workload("py-numpy", "numpy", ("python3", "-c", "import numpy; print('numpy', numpy.__version__)"), "numpy"),
    Workload("py-sci", "pysci", ("python3", "-c", "import numpy, scipy.linalg, pandas; print('sci ok')"), "sci ok"),
    Workload("node", "node", ("node", "-e", "console.log(1)"), "1"),
    Workload("gcc-version", "gcc", ("gcc", "--version"), "gcc"),
    Workload("gcc-compile", "gcc", ("sh", "-c", f"printf '{_HELLO_C}' >/tmp/h.c && gcc -O2 -o /tmp/h /tmp/h.c && /tmp/h"),
             "hi from gcc", doc="compile and run hello.c"),
    Workload("http-server", "python", ("python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"),
             server=True, doc="ready when GET / answers"),
)}

# the default set (one per image, plus the server)
DEFAULT_WORKLOADS = ["echo", "py-print", "py-numpy", "py-sci", "node", "gcc-version", "gcc-compile", "http-server"]
QUICK_WORKLOADS = ["py-print", "py-numpy"]


def resolve(names: list[str], extra_images: set[str] = frozenset()) -> list[Workload]:
    """Workload names (optionally NAME@IMAGE) -> Workload objects."""
    out = []
    for n in names:
        base, _, image = n.partition("@")
        if base not in WORKLOADS:
            raise ValueError(f"unknown workload {base!r} (known: {', '.join(WORKLOADS)})")
        w = WORKLOADS[base]
        out.append(w.on(image) if image else w)
    return out


def wait_http(port: int, deadline: float, alive=lambda: True) -> bool:
    """Poll http://127.0.0.1:port/ until it answers (any HTTP status) or `deadline` (monotonic) passes."""
    url = f"http://127.0.0.1:{port}/"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                r.read(1)
                return True
        except urllib.error.HTTPError:
            return True
        except (OSError, ValueError):
            if not alive():
                return False
            time.sleep(0.005)
    return False
