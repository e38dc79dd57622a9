"""Conversion throughput: `nydusify convert` against the work it cannot avoid.

    python -m benchmarks.convert                       # the sample image (testbed.sample)
    python -m benchmarks.convert --source oci:DIR:TAG  # or HOST/REPO:TAG (--plain-http)
    python -m benchmarks.convert --profile out.prof    # + cProfile of one conversion (this process only:
                                                       #   layers are read by worker processes)

Reports, for one platform's manifest:

* conversion throughput in MB/s of plain (uncompressed tar) layer data: a full
  `convert()` to a fresh OCI layout in a temp dir, best of --repeat runs;
* the baseline on the same layer files: per layer, sequentially,
  `gzip -dc LAYER | zstd -3 >/dev/null` (`zstd -dc` / `cat` for zstd / plain
  layers) -- decompressing and recompressing every byte once is the least any
  converter must do -- and the ratio convert / baseline (goal: <= 1.2, GOAL_RATIO);
* the dedup ratio (chunk bytes referenced / stored once) and converted vs source sizes.

Registry sources are downloaded once for the baseline; their conversion times
include fetching the layers again.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass

import zstandard

from converter.convert import ConvertOptions, convert
from converter.inspect import summarize
from converter.nydus_image import load_from_store
from testbed.sample import build_sample_layout
from rafs.blob import CHUNK_SIZE_DEFAULT, validate_chunk_size
from rafs.image.store import OciLayoutStore, open_store

from .prereq import require

MB = 1e6
GOAL_RATIO = 1.2            # issue 15: conversion within 1.2x of `gzip -dc | zstd -3` on every image


@dataclass
class Layer:
    digest: str
    media_type: str
    size: int            # compressed (as stored)
    path: str            # a local file holding it
    plain: int = 0       # uncompressed tar bytes


@dataclass
class Result:
    source: str
    layers: int
    source_bytes: int
    plain_bytes: int
    convert_s: list[float]
    baseline_s: list[float]
    convert_cpu_s: list[float]      # user + sys of this process (all its threads) and its worker processes
    baseline_cpu_s: list[float]     # user + sys of the gzip/zstd processes
    converted_bytes: int
    blob_bytes: int
    bootstrap_bytes: int
    blobs: int
    chunks: int
    dedup_ratio: float
    chunk_size: int
    compressor: str

    @property
    def convert_best(self) -> float:
        return min(self.convert_s)

    @property
    def baseline_best(self) -> float:
        return min(self.baseline_s)

    @property
    def ratio(self) -> float:
        return self.convert_best / self.baseline_best

    def render(self) -> str:
        mbs = lambda s: self.plain_bytes / MB / s  # noqa: E731
        med = statistics.median
        return "\n".join([
            f"source        {self.source}",
            f"layers        {self.layers}: {self.source_bytes / MB:.1f} MB compressed, "
            f"{self.plain_bytes / MB:.1f} MB plain tar",
            f"convert       best {self.convert_best:.2f} s = {mbs(self.convert_best):.1f} MB/s plain "
            f"(median {med(self.convert_s):.2f} s of {len(self.convert_s)})",
            f"baseline      best {self.baseline_best:.2f} s = {mbs(self.baseline_best):.1f} MB/s plain "
            f"(gzip -dc | zstd -3 per layer; median {med(self.baseline_s):.2f} s)",
            f"ratio         convert / baseline = {self.ratio:.2f}x (goal <= {GOAL_RATIO}x: "
            f"{'met' if self.ratio <= GOAL_RATIO else 'MISSED'}); CPU time "
            f"{min(self.convert_cpu_s):.2f} s vs {min(self.baseline_cpu_s):.2f} s = "
            f"{min(self.convert_cpu_s) / min(self.baseline_cpu_s):.2f}x",
            f"dedup         ratio {self.dedup_ratio} (chunk bytes referenced / stored once)",
            f"converted     {self.converted_bytes / MB:.1f} MB = {self.blobs} blobs {self.blob_bytes / MB:.1f} MB"
            f" ({self.chunks} chunks) + bootstrap layer {self.bootstrap_bytes / MB:.2f} MB; "
            f"source {self.source_bytes / MB:.1f} MB ({self.converted_bytes / self.source_bytes:.2f}x)",
            f"settings      chunk size {self.chunk_size}, compressor {self.compressor}, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end",
        ])


def _local_layers(ref: str, platform: str | None, plain_http: bool, workdir: str) -> list[Layer]:
    """The manifest's layers as local files (an OCI layout's own blob files, or downloads)."""
    with open_store(ref, plain_http=plain_http) as store:
        entries = store.manifests_for(store.resolve(), platform)
        if not entries:
            raise SystemExit(f"{ref}: no manifest for platform {platform}")
        manifest = store.get_json(entries[0][1].digest)
        out = []
        for layer in manifest["layers"]:
            digest = layer["digest"]
            if isinstance(store, OciLayoutStore):
                path = store.blob_path(digest)
            else:
                path = os.path.join(workdir, digest.split(":", 1)[1])
                with store.open_blob(digest) as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            out.append(Layer(digest, layer.get("mediaType", ""), layer["size"], path))
    for layer in out:
        layer.plain = _plain_size(layer.path)
    return out


def _plain_size(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head[:2] == b"\x1f\x8b":
            d, n = zlib.decompressobj(16 + zlib.MAX_WBITS), 0
            while block := f.read(1 << 20):
                n += len(d.decompress(block))
                while d.unused_data:            # concatenated gzip members
                    rest = d.unused_data
                    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    n += len(d.decompress(rest))
            return n + len(d.flush())
        if head == b"\x28\xb5\x2f\xfd":
            n = 0
            with zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as r:
                while block := r.read(1 << 20):
                    n += len(block)
            return n
        return os.fstat(f.fileno()).st_size


def _decompressor(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return "gzip -dc"
    if head == b"\x28\xb5\x2f\xfd":
        return "zstd -dcq"
    return "cat"


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def baseline(layers: list[Layer]) -> tuple[float, float]:
    """(seconds, CPU seconds) for `DECOMPRESS LAYER | zstd -3 >/dev/null`, layer after layer."""
    require("the baseline", ["bash", "gzip", "zstd"])
    cpu, start = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    for layer in layers:
        cmd = f"set -eo pipefail; {_decompressor(layer.path)} \"$1\" | zstd -3 -q -c >/dev/null"
        subprocess.run(["bash", "-c", cmd, "bash", layer.path], check=True)
    return time.perf_counter() - start, _cpu(resource.RUSAGE_CHILDREN) - cpu


def convert_once(source: str, opts: ConvertOptions, workdir: str,
                 profile: str | None = None) -> tuple[float, float, str]:
    """One conversion into a fresh OCI layout; returns (seconds, CPU seconds, layout dir)."""
    target_dir = tempfile.mkdtemp(prefix="target-", dir=workdir)
    target = f"oci:{target_dir}:bench"
    prof = cProfile.Profile() if profile else None
    # CPU of this process and of the worker processes it reaped (layers convert in processes)
    cpu, start = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    if prof:
        prof.enable()
    convert(source, target, opts)
    if prof:
        prof.disable()
    elapsed = time.perf_counter() - start
    cpu = _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - cpu
    if prof:
        prof.dump_stats(profile)
    return elapsed, cpu, target_dir


def run(source: str | None, *, platform: str | None = None, plain_http: bool = False,
        chunk_size: int = CHUNK_SIZE_DEFAULT, compressor: str = "zstd", repeat: int = 3,
        profile: str | None = None, workdir: str | None = None) -> Result:
    own_tmp = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="pynydus-bench-convert-")
    try:
        if source is None:
            source = build_sample_layout(os.path.join(workdir, "sample"))
        layers = _local_layers(source, platform, plain_http, workdir)
        opts = ConvertOptions(chunk_size=chunk_size, compressor=compressor, platform=platform,
                              plain_http=plain_http)
        convert_s, baseline_s, convert_cpu, baseline_cpu, target_dir = [], [], [], [], None
        for _ in range(repeat):
            # alternate, so both see the same page-cache and machine-load conditions
            elapsed, cpu = baseline(layers)
            baseline_s.append(elapsed)
            baseline_cpu.append(cpu)
            elapsed, cpu, out = convert_once(source, opts, workdir)
            convert_s.append(elapsed)
            convert_cpu.append(cpu)
            if target_dir is not None:
                shutil.rmtree(target_dir, ignore_errors=True)
            target_dir = out
        if profile:
            _, _, out = convert_once(source, opts, workdir, profile)
            shutil.rmtree(out, ignore_errors=True)
        with open_store(f"oci:{target_dir}:bench") as store:
            image = load_from_store(store)
            summary = summarize(image)
            manifest = image.manifest
        blob_bytes = sum(b["compressed_size"] for b in summary["blobs"])
        boot_bytes = manifest["layers"][-1]["size"]
        return Result(source=source, layers=len(layers), source_bytes=sum(l.size for l in layers),
                      plain_bytes=sum(l.plain for l in layers), convert_s=convert_s, baseline_s=baseline_s,
                      convert_cpu_s=convert_cpu, baseline_cpu_s=baseline_cpu,
                      converted_bytes=blob_bytes + boot_bytes, blob_bytes=blob_bytes,
                      bootstrap_bytes=boot_bytes, blobs=len(summary["blobs"]),
                      chunks=sum(b["chunks"] for b in summary["blobs"]),
                      dedup_ratio=summary["dedup"]["ratio"],
                      chunk_size=chunk_size, compressor=compressor)
    finally:
        if own_tmp:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="image to convert (oci:DIR[:TAG] or HOST/REPO:TAG); default: the sample image")
    p.add_argument("--platform", help="os/arch of a multi-platform source (default: the first)")
    p.add_argument("--plain-http", action="store_true")
    p.add_argument("--chunk-size", default=str(CHUNK_SIZE_DEFAULT), type=validate_chunk_size)
    p.add_argument("--compressor", choices=["zstd", "lz4", "none"], default="zstd")
    p.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts (default 3)")
    p.add_argument("--profile", metavar="FILE", help="also cProfile one more conversion into FILE and print its top")
    p.add_argument("--workdir", help="keep temporary files here (default: a temp dir, removed)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    # the baseline pipes each layer through gzip/zstd; the default source is the busybox sample image
    require("python -m benchmarks.convert", ["bash", "gzip", "zstd"] + ([] if args.source else ["busybox"]))
    result = run(args.source, platform=args.platform, plain_http=args.plain_http, chunk_size=args.chunk_size,
                 compressor=args.compressor, repeat=max(1, args.repeat), profile=args.profile,
                 workdir=args.workdir)
    if args.json:
        print(json.dumps({**asdict(result), "ratio": round(result.ratio, 3), "goal_ratio": GOAL_RATIO,
                          "goal_met": result.ratio <= GOAL_RATIO,
                          "convert_mb_s": round(result.plain_bytes / MB / result.convert_best, 1),
                          "baseline_mb_s": round(result.plain_bytes / MB / result.baseline_best, 1)}, indent=2))
    else:
        print(result.render())
    if args.profile:
        print(f"\nprofile of one conversion ({args.profile}), top 25 by cumulative time:", file=sys.stderr)
        pstats.Stats(args.profile, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
