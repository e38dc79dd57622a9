"""Mount benchmark: a lazily mounted image against the same tree on native disk, in erofs and fuse modes.

    python -m benchmarks.mount [--workdir DIR] [--entries 50000] [--big-mib 1024] [--modes erofs fuse]
                               [--repeat 3] [--json FILE]

One tree is written to native disk (DIR/native: >= --entries small files,
symlinks and directories, plus one --big-mib file of 2:1 compressible data),
packed as an OCI image, pushed to a docker-registry on 127.0.0.1 and
converted (1 MiB chunks, zstd). Then, per mode (each mount made by
`nydusify mount --daemon`, as users do):

  (a) cold lazy read of one small file: fresh cache, fresh mount; time of open + read
      (and of the mount itself, bootstrap fetch included);
  (b) warm metadata walk: os.walk + lstat of every entry, after one walk warmed the
      kernel's caches (best of --repeat);
  (c) warm sequential read of the big file: its chunks are in the blob cache, its page
      cache (and the cache files') evicted with posix_fadvise(DONTNEED) — no global
      drop_caches — then read with 1 MiB reads; "hot" = read again from the page cache;
  (d) cold sequential read of the big file: fresh cache, every chunk fetched from the
      registry; compared with the backend's own speed (one streaming GET of the blob);
  (e) sequential read of the big file after a remount on that warm cache (a container restart):
      in erofs mode the cached chunks are in the kernel's page cache before the read (stored at
      mount), so no request should reach the daemon; the requests it answered are reported.

Native numbers use the same tree and the same eviction. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import requests

from benchmarks.prereq import require
from rafs.image import media

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = "/var/tmp/pynydus-mountbench"
MiB = 1 << 20
HELLO = "etc/hello.txt"
BIG = "big/blob-data"


# --------------------------------------------------------------------------- the tree

def build_tree(root: Path, entries: int, big_mib: int) -> dict:
    """The native tree (reused when its stamp matches); returns its description."""
    stamp = root / ".stamp"
    want = {"entries": entries, "big_mib": big_mib, "version": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return want
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    (root / "etc").mkdir(parents=True)
    (root / HELLO).write_text("hello from the mount benchmark\n")
    per_dir = 100
    dirs = -(-entries // per_dir)
    n = 0
    for d in range(dirs):
        dd = root / "meta" / f"d{d // 50:02d}" / f"d{d:04d}"
        dd.mkdir(parents=True)
        for i in range(per_dir):
            if i % 10 == 9:
                os.symlink(f"f{i - 1:03d}", dd / f"l{i:03d}")
            else:
                (dd / f"f{i:03d}").write_bytes(os.urandom(50 + (i * 37 + d) % 2000))
            n += 1
    (root / "big").mkdir()
    with open(root / BIG, "wb") as f:                    # hex text: ~2:1 for zstd
        for _ in range(big_mib):
            f.write(base64.b16encode(os.urandom(MiB // 2)))
    stamp.write_text(json.dumps(want))
    return want


def count_entries(root: Path) -> int:
    n = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        n += len(dirnames) + len(filenames)
    return n


def build_layout(tree: Path, layout: Path) -> str:
    """An OCI layout with one uncompressed tar layer of `tree`; returns oci:DIR:bench."""
    import hashlib
    if (layout / "index.json").exists():
        return f"oci:{layout}:bench"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = layout / "layer.tar"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(os.listdir(tree)):
            if not name.startswith("."):
                tf.add(tree / name, arcname=name)
    h = hashlib.sha256()
    with open(tmp, "rb") as f:
        while b := f.read(8 * MiB):
            h.update(b)
    digest = h.hexdigest()
    size = tmp.stat().st_size
    os.replace(tmp, blobs / digest)

    def put(obj) -> dict:
        data = json.dumps(obj, separators=(",", ":")).encode()
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": "sha256:" + d, "size": len(data)}

    config = put({"architecture": "amd64", "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": ["sha256:" + digest]}})
    manifest = put({"schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
                    "config": {"mediaType": media.OCI_CONFIG, **config},
                    "layers": [{"mediaType": media.OCI_LAYER_TAR,
                                "digest": "sha256:" + digest, "size": size}]})
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": media.OCI_MANIFEST, **manifest,
        "annotations": {media.ANNOTATION_REF_NAME: "bench"}}]}))
    return f"oci:{layout}:bench"


# --------------------------------------------------------------------------- measurements

def evict(path: Path) -> None:
    """Drop `path`'s pages from the page cache (clean pages only; nothing else is touched)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: Path) -> tuple[float, int]:
    buf = bytearray(MiB)
    n = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while k := os.readv(fd, [buf]):
            n += k
    finally:
        os.close(fd)
    return time.perf_counter() - t0, n


def walk(root: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return time.perf_counter() - t0, n


def best_walk(root: Path, repeat: int) -> tuple[float, int]:
    walk(root)                                           # warm the kernel's caches
    runs = [walk(root) for _ in range(repeat)]
    return min(t for t, _ in runs), runs[0][1]


def nydusify(*args) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "converter.cli", *map(str, args)], cwd=REPO_ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nydusify {' '.join(map(str, args))}: {r.stdout}{r.stderr}")
    return r


class Mount:
    def __init__(self, ref: str, mnt: Path, mode: str, cache: Path, run_dir: Path):
        self.mnt, self.cache, self.run_dir = mnt, cache, run_dir
        mnt.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        nydusify("mount", ref, mnt, "--mode", mode, "--cache-dir", cache, "--run-dir", run_dir,
                 "--plain-http", "--daemon", "--learn", "off")
        self.mount_s = time.perf_counter() - t0

    def stats(self) -> dict:
        return json.loads(nydusify("stats", self.mnt, "--json", "--run-dir", self.run_dir).stdout)

    def evict_cache_files(self) -> None:
        for p in self.cache.glob("*.blob"):
            evict(p)

    def close(self) -> None:
        nydusify("umount", self.mnt, "--run-dir", self.run_dir)


def fresh(path: Path) -> Path:
    if path.exists():
        subprocess.run(["rm", "-rf", str(path)], check=True)
    return path


def bench_mode(mode: str, ref: str, work: Path, native: Path, repeat: int, blob_digest: str,
               registry) -> dict:
    out: dict = {"mode": mode}
    run_dir = work / "run"
    # (a) cold lazy read of one small file
    m = Mount(ref, fresh(work / f"mnt-{mode}"), mode, fresh(work / f"cache-{mode}"), run_dir)
    try:
        t0 = time.perf_counter()
        (m.mnt / HELLO).read_bytes()
        out["a_cold_small_read_s"] = time.perf_counter() - t0
        out["a_mount_s"] = m.mount_s
        out["a_fetched_bytes"] = m.stats()["backend_bytes"]
        # (d) cold sequential read of the big file (every chunk from the registry)
        mark = registry.mark()
        secs, n = read_all(m.mnt / BIG)
        out["d_cold_seq_MBps"] = n / secs / 1e6
        out["d_cold_registry_bytes"] = sum(e.bytes for e in registry.blob_gets(since=mark))
        st = m.stats()
        out["d_fetch_latency_ms"] = st["fetch_latency_ms"]
        out["d_largest_request"] = st["requests_served"]["largest_request"]
        # (b) warm metadata walk
        out["b_walk_s"], out["b_entries"] = best_walk(m.mnt, repeat)
        # (c) warm sequential read: chunks cached, page caches evicted
        speeds = []
        for _ in range(repeat):
            evict(m.mnt / BIG)
            m.evict_cache_files()
            secs, n = read_all(m.mnt / BIG)
            speeds.append(n / secs / 1e6)
        out["c_warm_seq_MBps"] = max(speeds)
        secs, n = read_all(m.mnt / BIG)
        out["c_hot_seq_MBps"] = n / secs / 1e6
        st = m.stats()
        out["cache_disk_bytes"] = st["cache"]["disk_bytes"]
    finally:
        m.close()
    # (e) warm remount: a fresh mount over that (partial) cache. In erofs mode the cached chunks are
    # stored into the kernel's page cache of the blob files after the mount (a complete cache would be
    # the EROFS device itself): the read should not reach the daemon
    m = Mount(ref, work / f"mnt-{mode}", mode, work / f"cache-{mode}", run_dir)
    try:
        st = m.stats()
        deadline = time.monotonic() + 60
        while st["cache"].get("kernel_fill") == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
            st = m.stats()
        out["e_mount_s"] = m.mount_s
        out["e_kernel_stored_bytes"] = st["cache"].get("kernel_stored_bytes", 0)
        before = st["requests_served"]
        secs, n = read_all(m.mnt / BIG)
        out["e_remount_seq_MBps"] = n / secs / 1e6
        after = m.stats()["requests_served"]
        out["e_requests"] = after["blob_reads"] + after["file_reads"] - before["blob_reads"] - before["file_reads"]
    finally:
        m.close()
    return out


def bench_native(native: Path, repeat: int) -> dict:
    out: dict = {"mode": "native"}
    evict(native / HELLO)
    t0 = time.perf_counter()
    (native / HELLO).read_bytes()
    out["a_cold_small_read_s"] = time.perf_counter() - t0
    out["b_walk_s"], out["b_entries"] = best_walk(native, repeat)
    speeds = []
    for _ in range(repeat):
        evict(native / BIG)
        secs, n = read_all(native / BIG)
        speeds.append(n / secs / 1e6)
    out["c_warm_seq_MBps"] = max(speeds)
    secs, n = read_all(native / BIG)
    out["c_hot_seq_MBps"] = n / secs / 1e6
    return out


def backend_speed(registry, repo: str, digest: str) -> float:
    """MB/s of one streaming GET of the whole blob: what the registry can give at most."""
    url = f"{registry.url}/v2/{repo}/blobs/{digest}"
    t0 = time.perf_counter()
    n = 0
    with requests.get(url, stream=True, timeout=60) as r:
        r.raise_for_status()
        for piece in r.iter_content(MiB):
            n += len(piece)
    return n / (time.perf_counter() - t0) / 1e6


def fetch_verify_ceiling(registry, ref: str, path: bytes, limit: int = 512 * MiB, threads: int = 4) -> float:
    """MB/s (uncompressed) of fetching the file's chunks with 4 MiB range GETs in `threads`
    threads and decompressing + verifying them in memory: the cold read's ceiling on this
    machine without FUSE, the page cache or the cache file."""
    from concurrent.futures import ThreadPoolExecutor

    from converter.nydus_image import open_nydus_image
    from rafs.compress import decompress
    from rafs.digest import digest as digest_of
    from rafs.image.client import RegistryClient
    with open_nydus_image(ref, plain_http=True) as image:
        boot = image.bootstrap
        nid = boot.resolve(path)
        ext = boot.file_extents(nid, 0, min(limit, boot.getattr(nid).size))[0]
        reader = image.blob_reader(ext.blob_index)
        blob = image.blob_digest(ext.blob_index)
        toc = [e for e in reader.entries if ext.blob_offset <= e.uncompressed_offset < ext.blob_offset + ext.length]
    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    client = RegistryClient(registry.host, repo, plain_http=True)
    groups, cur, size = [], [], 0
    for e in toc:
        if cur and size + e.compressed_size > 4 * MiB:
            groups.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e.compressed_size
    groups.append(cur)

    def work(group) -> int:
        start = group[0].compressed_offset
        data = client.read_range(blob, start, group[-1].compressed_end - start)
        n = 0
        for e in group:
            raw = data[e.compressed_offset - start:e.compressed_end - start]
            plain = decompress(reader.compressor, raw, e.uncompressed_size) if e.compressed else raw
            assert digest_of(reader.digester, plain) == e.digest
            n += len(plain)
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(work, groups))
    client.close()
    return n / (time.perf_counter() - t0) / 1e6


# --------------------------------------------------------------------------- report

def render(results: list[dict], backend_MBps: float, entries: int, big_mib: int, ceiling: float = 0.0) -> str:
    native = next(r for r in results if r["mode"] == "native")
    rows = [
        "| | native | " + " | ".join(r["mode"] for r in results if r["mode"] != "native") + " |",
        "|---|---|" + "---|" * (len(results) - 1),
    ]

    def row(label, key, fmt, ratio=None):
        cells = [fmt(native[key]) if key in native else "-"]
        for r in results:
            if r["mode"] == "native":
                continue
            v = r.get(key)
            cell = fmt(v) if v is not None else "-"
            if ratio and v is not None and key in native:
                cell += f" ({ratio(v, native[key])})"
            cells.append(cell)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")

    row("(a) mount, bootstrap fetched (s)", "a_mount_s", lambda v: f"{v:.2f}")
    row("(a) cold read of one small file (ms)", "a_cold_small_read_s", lambda v: f"{v * 1000:.1f}")
    row("(a) bytes fetched for it", "a_fetched_bytes", lambda v: f"{v:,}")
    row(f"(b) warm walk + lstat, {native['b_entries']:,} entries (s)", "b_walk_s", lambda v: f"{v:.3f}",
        lambda v, n: f"{v / n:.2f}x native")
    row(f"(c) warm seq. read {big_mib} MiB (MB/s)", "c_warm_seq_MBps", lambda v: f"{v:.0f}",
        lambda v, n: f"{100 * v / n:.0f}% of native")
    row("(c) hot seq. read, page cache (MB/s)", "c_hot_seq_MBps", lambda v: f"{v:.0f}",
        lambda v, n: f"{100 * v / n:.0f}%")
    row("(d) cold seq. read from the registry (MB/s)", "d_cold_seq_MBps", lambda v: f"{v:.0f}")
    row("(e) seq. read after a remount on the warm cache (MB/s)", "e_remount_seq_MBps", lambda v: f"{v:.0f}")
    row("(e) requests the daemon answered for it", "e_requests", lambda v: f"{v:,}")
    rows.append(f"\n(d) backend speed: one streaming GET of the blob from the registry: {backend_MBps:.0f} MB/s; "
                f"fetch (4 MiB ranges, 4 threads) + decompress + verify in memory: {ceiling:.0f} MB/s")
    for r in results:
        if r["mode"] != "native":
            lat = r.get("d_fetch_latency_ms", {})
            rows.append(f"    {r['mode']}: cold read = {100 * r['d_cold_seq_MBps'] / backend_MBps:.0f}% of it; "
                        f"largest read request {r.get('d_largest_request', 0) // 1024} KiB; fetch latency "
                        f"p50 {lat.get('p50')} ms p99 {lat.get('p99')} ms")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mount", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--entries", type=int, default=50_000)
    p.add_argument("--big-mib", type=int, default=1024)
    p.add_argument("--modes", nargs="+", default=["erofs", "fuse"], choices=["erofs", "fuse"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks.mount needs root (FUSE and kernel mounts)", file=sys.stderr)
        return 2
    require("python -m benchmarks.mount", ["docker-registry", "libfuse3"])
    sys.path.insert(0, str(REPO_ROOT))
    from converter.convert import ConvertOptions, convert
    from testbed.registry import Registry, push_image
    from converter.nydus_image import open_nydus_image

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    native = work / "native"
    t0 = time.monotonic()
    build_tree(native, args.entries, args.big_mib)
    layout = build_layout(native, work / f"layout-{args.entries}-{args.big_mib}")
    print(f"tree: {count_entries(native):,} entries + {args.big_mib} MiB file ({time.monotonic() - t0:.0f} s)",
          flush=True)
    reg = Registry(work / "registry").start()
    try:
        src = f"{reg.host}/bench/tree:src-{args.entries}-{args.big_mib}"
        dst = f"{reg.host}/bench/tree:nydus-{args.entries}-{args.big_mib}"
        t0 = time.monotonic()
        push_image(layout, src)
        convert(src, dst, ConvertOptions(plain_http=True))
        print(f"pushed and converted in {time.monotonic() - t0:.0f} s", flush=True)
        with open_nydus_image(dst, plain_http=True) as image:
            digest = image.blob_digest(0)
        backend = max(backend_speed(reg, "bench/tree", digest) for _ in range(2))
        ceiling = max(fetch_verify_ceiling(reg, dst, b"/" + BIG.encode()) for _ in range(2))
        results = [bench_native(native, args.repeat)]
        for mode in args.modes:
            print(f"mode {mode} ...", flush=True)
            results.append(bench_mode(mode, dst, work, native, args.repeat, digest, reg))
    finally:
        reg.stop()
    table = render(results, backend, args.entries, args.big_mib, ceiling)
    print(table)
    doc = {"results": results, "backend_MBps": backend, "fetch_verify_MBps": ceiling, "entries": args.entries, "big_mib": args.big_mib,
           "kernel": os.uname().release, "cpus": os.cpu_count(), "load": os.getloadavg()}
    out = Path(args.json) if args.json else work / "mount-bench.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"(JSON: {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
