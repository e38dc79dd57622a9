"""The README's main job: build the sample image, convert it, check it, inspect it.

python3 -m converter.demo [--workdir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from .check import check
from .convert import ConvertOptions, convert
from .inspect import render, summarize
from .nydus_image import open_nydus_image
from .sample import build_sample_layout


def _step(title: str):
    print(f"== {title}", flush=True)
    return time.monotonic()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m converter.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where to build (default: a temporary directory, removed afterwards)")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="pynydus-demo-")
    try:
        t = _step("building the sample OCI image from local files")
        source = build_sample_layout(os.path.join(workdir, "source"), "sample")
        print(f"   {source} ({time.monotonic() - t:.1f} s)")

        t = _step("nydusify convert")
        target = f"oci:{os.path.join(workdir, 'nydus')}:sample"
        results = convert(source, target, ConvertOptions(progress=True))
        r = results[0]
        size = sum(b.info.compressed_size for b in r.blobs)
        print(f"   {target}: {len(r.blobs)} blobs, {size / 1e6:.1f} MB from {r.source_bytes / 1e6:.1f} MB "
              f"of gzip layers ({time.monotonic() - t:.1f} s)")

        t = _step("nydusify check")
        problems, stats = check(source, target)
        if problems:
            print("   check FAILED:\n" + "\n".join("   " + p for p in problems[:50]))
            return 1
        print(f"   OK: {stats['entries']} entries equal, {stats['chunks_verified']} chunks verified "
              f"({time.monotonic() - t:.1f} s)")

        _step("nydusify inspect")
        with open_nydus_image(target) as image:
            print("   " + render(summarize(image)).replace("\n", "\n   "))
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
