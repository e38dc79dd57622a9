"""Benchmark inputs that are built once and cached: conversions and workload read sets.

* `Converter`: `nydusify convert` registry -> registry, timed, with the
  converted image summarised by `nydusify inspect --json`.  A conversion is
  reused while its target tag exists and its key (source manifest digest,
  options, and a hash of the converter/format source) is unchanged.
* `record_workload`: runs a workload once on a fresh lazy mount (erofs mode,
  chrooted, under strace) and reads back what it touched from the page cache
  of the read-only mount (mmap + mincore on every regular file: with a fresh
  mount, a resident page is a page the workload read).  From that: the files
  it opened in first-use order with the byte ranges of the pages it touched
  (the `--prefetch-patterns` list, `PATH<TAB>OFF+LEN,...`), the bytes it
  read (page level, default readahead), and the chunks those pages live in,
  uncompressed and compressed (the physical limit's numerator), from the
  bootstrap and the blobs' TOCs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from rafs.image.media import MANIFEST_ACCEPT
from rafs.osutil import atomic_write
from testbed.process import free_port, run

from .sysutil import PAGE, Cleanup, bind_mount, mount, resident_pages, run_root, umount, umount_all_below
from .workloads import Workload, wait_http

log = logging.getLogger("benchmarks.prepare")

REPO_ROOT = Path(__file__).resolve().parents[1]


def nydusify(*args, timeout: float = 3600, netns=None, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "converter.cli", *map(str, args)], timeout=timeout, netns=netns,
               check=check, cwd=REPO_ROOT)


def code_hash() -> str:
    """Hash of the sources that decide what a conversion produces."""
    h = hashlib.sha256()
    files = sorted((REPO_ROOT / "converter").glob("*.py")) + sorted((REPO_ROOT / "rafs" / "erofs").glob("*.py"))
    files += [REPO_ROOT / "rafs" / n for n in ("blob.py", "bootstrap.py", "compress.py", "digest.py", "tree.py")]
    for p in files:
        if p.exists() and p.name not in ("mount_cli.py", "demo.py", "cli.py"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def manifest_digest(host: str, repo: str, tag: str) -> str | None:
    """The manifest digest a plain-http registry serves for repo:tag, or None."""
    s = requests.Session()
    s.trust_env = False
    r = s.head(f"http://{host}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}, timeout=30)
    if r.status_code != 200:
        return None
    return r.headers.get("Docker-Content-Digest")


def split_ref(ref: str) -> tuple[str, str, str]:
    host, _, rest = ref.partition("/")
    repo, _, tag = rest.rpartition(":")
    return host, repo, tag


class Converter:
    """Conversions into the suite's registry, cached in STATE/conversions.json."""

    def __init__(self, state_dir: Path, registry_host: str):
        self.state_file = state_dir / "conversions.json"
        self.host = registry_host
        self.db = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.code = code_hash()

    def _save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_file, json.dumps(self.db, indent=1, sort_keys=True))

    def convert(self, source: str, target: str, *, chunk_dict: str | None = None,
                prefetch_file: str | None = None, force: bool = False) -> dict:
        """Convert (or reuse) and return {seconds, digest, summary, ...}."""
        src_digest = manifest_digest(*split_ref(source))
        if src_digest is None:
            raise RuntimeError(f"{source}: not in the registry")
        pf_hash = hashlib.sha256(Path(prefetch_file).read_bytes()).hexdigest()[:16] if prefetch_file else ""
        cd_digest = manifest_digest(*split_ref(chunk_dict)) if chunk_dict else ""
        key = "|".join([src_digest, self.code, pf_hash, cd_digest or ""])
        tgt_host, tgt_repo, tgt_tag = split_ref(target)
        rec = self.db.get(f"{tgt_repo}:{tgt_tag}")
        have = manifest_digest(tgt_host, tgt_repo, tgt_tag)
        if not force and rec and rec.get("key") == key and have and have == rec.get("digest"):
            return rec
        args = ["convert", "--source", source, "--target", target, "--plain-http"]
        if chunk_dict:
            args += ["--chunk-dict", chunk_dict]
        if prefetch_file:
            args += ["--prefetch-patterns", prefetch_file]
        log.info("converting %s -> %s%s%s", source, target, f" (chunk dict {chunk_dict})" if chunk_dict else "",
                 " (prefetch list)" if prefetch_file else "")
        t0 = time.monotonic()
        r = nydusify(*args)
        seconds = time.monotonic() - t0
        summary = json.loads(nydusify("inspect", "--plain-http", "--json", target).stdout)
        rec = {"key": key, "source": source, "source_digest": src_digest, "target": target,
               "digest": manifest_digest(tgt_host, tgt_repo, tgt_tag), "seconds": round(seconds, 2),
               "chunk_dict": chunk_dict, "prefetch": bool(prefetch_file), "summary": summary,
               "stdout": r.stdout.strip()[-500:], "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.db[f"{tgt_repo}:{tgt_tag}"] = rec
        self._save()
        return rec


# --------------------------------------------------------------------------- read sets

@dataclass
class MountedImage:
    """A lazy mount + an overlay (writable, like a container's rootfs) on the suite's fast disk."""
    mountpoint: Path
    merged: Path
    pid: int | None
    run_dir: Path


def mount_lazy(ref: str, base: Path, *, mode: str, cache_dir: Path, run_dir: Path, cleanup: Cleanup,
               netns: str | None = None, overlay: bool = True, extra: list[str] = (),
               learn: str = "off") -> MountedImage:
    """`nydusify mount --daemon` + an overlay with upper/work under `base`; undo registered with `cleanup`.

    `learn` is the mount's learned prefetch (`--learn`, rafs.learned): off unless a mode asks for it,
    so no mode publishes a record another mode (or a later run of the same mode) would prefetch by:
    only `erofs+learned` measures learned prefetch.
    """
    mnt, upper, work, merged = (base / n for n in ("lower", "upper", "work", "rootfs"))
    for d in (mnt, upper, work, merged, cache_dir, run_dir):
        d.mkdir(parents=True, exist_ok=True)
    pid_file = base / "daemon.pid"

    def stop_daemon():
        nydusify("umount", str(mnt), "--run-dir", str(run_dir), check=False, timeout=60)
        umount(mnt)
    cleanup.push(stop_daemon, f"nydusify umount {mnt}")
    nydusify("mount", ref, str(mnt), "--mode", mode, "--cache-dir", str(cache_dir), "--plain-http", "--daemon",
             "--pid-file", str(pid_file), "--run-dir", str(run_dir), "--learn", learn, *extra, netns=netns,
             timeout=300)
    pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
    if overlay:
        mount("overlay", "overlay", merged, f"lowerdir={mnt},upperdir={upper},workdir={work}")
        cleanup.push(lambda: umount(merged), f"umount {merged}")
    return MountedImage(mnt, merged if overlay else mnt, pid, run_dir)


def learned_reset(ref: str) -> None:
    """`nydusify learned reset REF`: an empty learned-prefetch record next to the image, so the next
    `--learn auto` start learns afresh (and a `--learn use` start before it prefetches nothing)."""
    nydusify("learned", "reset", ref, "--plain-http", timeout=120)


def daemon_stats(m: MountedImage) -> dict:
    r = nydusify("stats", str(m.mountpoint), "--json", "--run-dir", str(m.run_dir), check=False, timeout=30)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"error": (r.stderr or r.stdout)[-300:]}


def chroot_env(config: dict) -> list[str]:
    env = list((config.get("config") or {}).get("Env") or [])
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return env + ["HOME=/root"]


def run_chrooted(rootfs: Path, wl: Workload, env: list[str], cleanup: Cleanup, *, trace: Path | None = None,
                 timeout: float = 300) -> tuple[float, str]:
    """Run `wl` chrooted in `rootfs` (with /proc, /dev, /tmp); returns (seconds to ready, output)."""
    mounted = []
    undo = cleanup.push(lambda: [umount(p) for p in reversed(mounted)], f"umount chroot mounts in {rootfs}")
    try:
        for sub, how in (("proc", "proc"), ("dev", "bind"), ("tmp", "tmpfs")):
            target = rootfs / sub
            target.mkdir(exist_ok=True)
            if how == "proc":
                mount("proc", "proc", target)
            elif how == "bind":
                bind_mount("/dev", target)
            else:
                mount("tmpfs", "tmpfs", target, "mode=1777")
            mounted.append(target)
        port = free_port() if wl.server else None
        cmd = ["chroot", str(rootfs), "/usr/bin/env", "-i", *env, *wl.command(port)]
        if not (rootfs / "usr/bin/env").exists():
            cmd = ["chroot", str(rootfs), "/bin/env", "-i", *env, *wl.command(port)]
        if trace is not None:
            cmd = ["strace", "-f", "-qq", "-y", "-e", "trace=open,openat,openat2,execve", "-o", str(trace), *cmd]
        t0 = time.monotonic()
        if wl.server:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
            try:
                ok = wait_http(port, t0 + timeout, alive=lambda: proc.poll() is None)
                dt = time.monotonic() - t0
                if not ok:
                    raise RuntimeError(f"{wl.name}: server did not answer on port {port}")
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                out = proc.communicate(timeout=30)[0].decode(errors="replace")
            return dt, out
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                           stdin=subprocess.DEVNULL)
        dt = time.monotonic() - t0
        if r.returncode != 0 or (wl.expect and wl.expect not in r.stdout):
            raise RuntimeError(f"{wl.name}: rc={r.returncode}, stdout={r.stdout[-500:]!r}, stderr={r.stderr[-1000:]!r}")
        return dt, r.stdout
    finally:
        cleanup.pop_run(undo)


def scan_resident(root: Path) -> dict[str, tuple[int, list[int]]]:
    """{/path: (size, resident page indexes)} for every regular file under `root` with pages cached."""
    out = {}
    rootlen = len(str(root))
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            try:
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                size, pages = resident_pages(p)
            except OSError:
                continue
            if pages:
                out[p[rootlen:] or "/"] = (size, pages)
    return out


_TRACE_RE = re.compile(r'^\d+\s+(?:open|openat|openat2|execve)\(.*?\)\s+=\s+(\d+)<(?P<path>[^>]*)>')
_EXEC_RE = re.compile(r'^\d+\s+execve\("(?P<path>[^"]*)"')


def trace_order(trace: Path, merged: Path) -> list[str]:
    """Paths (inside the image) in first-open order, from `strace -y` output."""
    prefix = str(merged)
    seen, out = set(), []
    if not trace.exists():
        return out
    for line in trace.read_text(errors="replace").splitlines():
        m = _TRACE_RE.match(line)
        if not m:
            continue
        p = m.group("path")
        if p.startswith(prefix + "/"):
            rel = p[len(prefix):]
            if rel not in seen:
                seen.add(rel)
                out.append(rel)
    return out


def page_ranges(size: int, pages: list[int]) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) of runs of consecutive resident pages, clipped to `size`."""
    runs: list[list[int]] = []
    for pg in sorted(pages):
        if runs and runs[-1][1] == pg:
            runs[-1][1] = pg + 1
        else:
            runs.append([pg, pg + 1])
    return [(a * PAGE, min(b * PAGE, size) - a * PAGE) for a, b in runs if a * PAGE < size]


def prefetch_line(path: str, size: int, pages: list[int]) -> str | None:
    """A --prefetch-patterns line for the pages of `path` the workload touched: the whole file as
    PATH, else PATH<TAB>OFFSET+LENGTH,...; None for a name the file format cannot carry."""
    if "\t" in path or "\n" in path or "\r" in path:
        return None
    ranges = page_ranges(size, pages)
    if ranges == [(0, size)]:
        return path
    return path + "\t" + ",".join(f"{o}+{n}" for o, n in ranges)


def chunk_costs(ref: str, touched: dict[str, tuple[int, list[int]]]) -> dict:
    """Chunks holding the touched pages: count, uncompressed and compressed bytes (registry's view)."""
    from converter.nydus_image import open_nydus_image
    chunks: set[tuple[int, int]] = set()
    unc = comp = 0
    with open_nydus_image(ref, plain_http=True) as image:
        boot = image.bootstrap
        readers: dict[int, object] = {}
        for path, (size, pages) in touched.items():
            nid = boot.resolve(path.encode("utf-8", "surrogateescape"))
            if nid is None:
                continue
            for off, length in page_ranges(size, pages):
                for ext in boot.file_extents(nid, off, length):
                    if ext.blob_index < 0:
                        continue
                    rd = readers.get(ext.blob_index)
                    if rd is None:
                        rd = readers[ext.blob_index] = image.blob_reader(ext.blob_index)
                    for e in rd.chunks_for_range(ext.blob_offset, ext.length):
                        k = (ext.blob_index, e.uncompressed_offset)
                        if k not in chunks:
                            chunks.add(k)
                            unc += e.uncompressed_size
                            comp += e.compressed_size
    return {"chunks": len(chunks), "chunk_bytes": unc, "chunk_compressed_bytes": comp}


def set_read_ahead(mountpoint: Path, kb: int) -> int | None:
    """Set the readahead of the bdi behind a (FUSE) mount; returns the old value (None: cannot)."""
    dev = os.stat(mountpoint).st_dev
    p = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        old = int(p.read_text())
        p.write_text(str(kb))
        return old
    except OSError:
        return None


def record_workload(ref: str, wl: Workload, config: dict, base: Path, out_dir: Path, cleanup: Cleanup,
                    *, mode: str = "fuse") -> dict:
    """Run `wl` once on a fresh lazy mount of `ref` and record what it read (cached in out_dir).

    The mount is in fuse mode with the kernel's readahead for it set to 0, so a resident page is a
    page the workload itself touched (mmap faults and reads), not one the kernel or the daemon read
    ahead: the read set does not depend on how the daemon is tuned.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if base.exists():
        umount_all_below(base)
        shutil.rmtree(base)
    inner = Cleanup()
    try:
        m = mount_lazy(ref, base, mode=mode, cache_dir=base / "cache", run_dir=run_root() / "record", cleanup=inner)
        ra = set_read_ahead(m.mountpoint, 0) if mode == "fuse" else None
        trace = base / "strace.out"
        use_strace = shutil.which("strace") is not None
        seconds, output = run_chrooted(m.merged, wl, chroot_env(config), inner, trace=trace if use_strace else None)
        touched = scan_resident(m.mountpoint)
        order = trace_order(trace, m.merged) if use_strace else []
        stats = daemon_stats(m)
    finally:
        inner.close()
        shutil.rmtree(run_root() / "record", ignore_errors=True)
    rest = sorted((p for p in touched if p not in set(order)), key=lambda p: -len(touched[p][1]))
    # exec'd binaries and the ELF interpreter never show as opens, and run first: put them first
    # Only the touched pages of each file (merged into ranges): whole files over-fetch a lot
    # (a 47 MB libnode.so of which a few MB are read).
    lines = (prefetch_line(p, *touched[p]) for p in rest + [p for p in order if p in touched])
    prefetch = [line for line in lines if line is not None]
    read_bytes = sum(min(size, len(pages) * PAGE) for size, pages in touched.values())
    rec = {
        "ref": ref, "workload": wl.name, "image": wl.image, "mode": mode, "read_ahead_kb": 0 if ra is not None else None,
        "seconds_traced": round(seconds, 3),
        "files": len(touched), "file_bytes": sum(size for size, _ in touched.values()), "read_bytes": read_bytes,
        **chunk_costs(ref, touched),
        "daemon_bytes_fetched": stats.get("bytes_fetched"), "output": output[-200:],
        "prefetch_list": prefetch,
    }
    (out_dir / f"{wl.name}.json").write_text(json.dumps(rec, indent=1))
    (out_dir / f"{wl.name}.prefetch").write_text("\n".join(prefetch) + "\n")
    shutil.rmtree(base, ignore_errors=True)
    return rec
