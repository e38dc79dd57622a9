"""The modes of the lazy-start suite: one cold start each, timed from "pull requested" to "ready".

    overlayfs        containerd's own overlayfs snapshotter: `ctr images pull` (fetch all, unpack) + run
    fuse             pynydus fuse mode: lazy mount (bootstrap only) + run; chunks fetched on read
    erofs            pynydus erofs mode: kernel EROFS over the FUSE blob files
    fuse+prefetch    fuse with the image converted with the workload's prefetch list
    erofs+prefetch   erofs with the image converted with the workload's prefetch list
    erofs+learned    erofs on a node after one earlier run anywhere in the cluster: the image's learned
                     prefetch record (rafs.learned) reset, one untimed run on another node (the host,
                     unshaped, `--learn auto`) publishes it to the registry at unmount, then the timed
                     cold start as in erofs mode with `--learn use` (the snapshotter runner: its own
                     snapshotter `nydus-erofs-learnuse`, `[daemon] learn = "use"`)
    warm             erofs mode with a blob cache filled by an earlier run of the same workload
    p2p              a second node, cold, fetching from a warm peer (needs the p2p backend in the mount daemon)

Learned prefetch is off (`--learn off`, `[daemon] learn = "off"`) in every mode but erofs+learned:
a record one mode published would otherwise prefetch for the next.

Every cold mode starts from a cold node: containerd has no image, content or
snapshot (asserted); the blob cache and the daemon's state dir are new and
empty; the files involved were never read on this node (fresh files on a
fresh loop-mounted ext4, fresh mounts).  Only the registry's own files stay
in the page cache ("warm registry", the same for every mode).

Runners (how pynydus modes get a container):

    ctr          `nydusify mount --daemon` (in the link's netns) + an overlay + `ctr run --rootfs`:
                 the same runc/containerd start path as (a)
    snapshotter  `nydus-snapshotter rpull` + `ctr run --snapshotter nydus-MODE`: the containerd path
    chroot       `nydusify mount` + overlay + chroot (no containerd at all: the test's cheap path)

Timings per run (seconds, wall clock, including each CLI's start-up):
    pull_s    pull requested -> image usable (ctr images pull | lazy mount up | rpull done)
    create_s  image usable -> task started (containerd's /tasks/start event): container, snapshot
              (lazy mount for the snapshotter runner), runc create + start; part of ready_s
    ready_s   image usable -> ready: `ctr run` until the workload is ready
              (one-shot: exit 0 with the expected output; server: answers HTTP)
    total_s   pull requested -> ready
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from testbed.process import free_port, run

from .ctd import Containerd
from .netshape import ShapedLink
from .prepare import chroot_env, daemon_stats, learned_reset, mount_lazy, nydusify, run_chrooted
from .sysutil import Cleanup, load_average, run_root, umount_all_below
from .workloads import Workload, wait_http

log = logging.getLogger("benchmarks.modes")

MODES = ["overlayfs", "fuse", "erofs", "fuse+prefetch", "erofs+prefetch", "erofs+learned", "warm", "p2p"]
LAZY_MODES = {"fuse": ("fuse", False), "erofs": ("erofs", False),
              "fuse+prefetch": ("fuse", True), "erofs+prefetch": ("erofs", True)}


_SEQ = itertools.count(1)


class Skip(Exception):
    """This mode cannot run here; the reason goes into the results."""


@dataclass
class Bench:
    """What every run needs: where, which registry and link, which containerd."""
    workdir: Path
    fast: Path                                  # loop-mounted ext4: containerd root + pynydus caches
    registry: object                            # testbed.registry.Registry
    link: ShapedLink
    cleanup: Cleanup
    ctd: Containerd | None = None
    runner: str = "ctr"
    configs: dict = field(default_factory=dict)           # image -> OCI config (env)
    records: dict = field(default_factory=dict)           # (image, workload) -> read-set record
    tags: dict = field(default_factory=dict)              # (image, variant) -> repo:tag in the registry
    erofs_ok: bool = True
    timeout: float = 600.0
    snapshotters: dict = field(default_factory=dict)      # fs mode -> ctd.NydusSnapshotter

    def ref(self, image: str, variant: str) -> str:
        return f"{self.link.registry_host}/{self.tags[(image, variant)]}"

    def next_id(self, what: str) -> str:
        """Unique for the whole process (container ids key containerd's events; a Bench is per link)."""
        return f"pnb{os.getpid()}-{next(_SEQ)}-{what}"

    def fresh_dir(self, name: str) -> Path:
        d = self.fast / "runs" / name
        if d.exists():
            umount_all_below(d)
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d


# --------------------------------------------------------------------------- running the workload

def _env_args(env: list[str]) -> list[str]:
    out = []
    for e in env:
        out += ["--env", e]
    return out


def ctr_run(b: Bench, wl: Workload, *, image_ref: str | None = None, rootfs: Path | None = None,
            snapshotter: str | None = None, env: list[str] | None = None) -> dict:
    """The workload as a containerd container (`ctr run`); returns create_s, ready_s, output.

    `ctr run` (which keeps the command's own flags in place, unlike `ctr containers create`, whose
    argument reordering turns a workload's `-c` into ctr's --config) does create + start + wait in
    one client call; create_s (container + snapshot + task created and started) is when containerd
    published the task's /tasks/start event (`ctr events`, read in the background), so it is part
    of ready_s.  One-shot: `ctr run --rm`, ready at exit; server: `ctr run -d`, ready when the port
    answers, then killed and deleted.
    """
    assert b.ctd is not None
    cid = b.next_id("c")
    port = free_port() if wl.server else None
    flags = ["--net-host"]
    if snapshotter:
        flags += ["--snapshotter", snapshotter]
    if rootfs is not None:
        flags += [*_env_args(env or []), "--rootfs"]
        target = [str(rootfs), cid]
    else:
        target = [image_ref, cid]
    t0 = time.monotonic()
    try:
        if wl.server:
            b.ctd.ctr("run", "-d", *flags, *target, *wl.command(port), timeout=b.timeout)
            ok = wait_http(port, time.monotonic() + b.timeout,
                           alive=lambda: cid in b.ctd.ctr("tasks", "ls", "-q", check=False).stdout.split())
            t2 = time.monotonic()
            out = f"answered on port {port}" if ok else ""
            if not ok:
                raise RuntimeError(f"{wl.name}: server never answered on port {port}")
        else:
            r = b.ctd.ctr("run", "--rm", *flags, *target, *wl.command(port), check=False, timeout=b.timeout)
            t2 = time.monotonic()
            out = r.stdout
            if r.returncode != 0 or (wl.expect and wl.expect not in r.stdout):
                raise RuntimeError(f"{wl.name}: rc={r.returncode} stdout={r.stdout[-300:]!r} "
                                   f"stderr={r.stderr[-800:]!r}")
    finally:
        if wl.server or cid in b.ctd.ctr("containers", "ls", "-q", check=False).stdout.split():
            b.ctd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
            for _ in range(100):
                if b.ctd.ctr("tasks", "delete", cid, check=False, timeout=30).returncode == 0 or \
                        cid not in b.ctd.ctr("tasks", "ls", "-q", check=False).stdout.split():
                    break
                time.sleep(0.05)
            b.ctd.ctr("containers", "delete", cid, check=False, timeout=60)
    started = b.ctd.event_time("/tasks/start", cid)
    return {"create_s": (started - t0) if started and t0 <= started <= t2 else None, "ready_s": t2 - t0, "ready_at": t2,
            "output": out.strip()[-200:]}


def run_on_rootfs(b: Bench, wl: Workload, rootfs: Path, env: list[str]) -> dict:
    """The workload on a prepared rootfs, through the bench's runner (ctr --rootfs or chroot)."""
    if b.runner == "chroot" or b.ctd is None:
        t0 = time.monotonic()
        dt, out = run_chrooted(rootfs, wl, env, b.cleanup, timeout=b.timeout)
        return {"create_s": None, "ready_s": dt, "ready_at": t0 + dt, "output": out.strip()[-200:]}
    return ctr_run(b, wl, rootfs=rootfs, env=env)


def _log_id(b: Bench) -> tuple | None:
    try:
        st = os.stat(b.registry.access_log_path)
        return st.st_dev, st.st_ino
    except OSError:
        return None


def _mark(b: Bench) -> tuple[int, tuple | None]:
    """Where the registry's access log is now: its entry count and which file it is."""
    return b.registry.mark(), _log_id(b)


def _registry_delta(b: Bench, mark: tuple[int, tuple | None]) -> dict:
    """Bytes and requests the registry served since `mark` (its access log). If the log file was
    replaced or truncated meanwhile (another process started a registry on the same work dir: the
    suite's start removes the log), the counts are unknown (None), never a wrong 0."""
    n, ident = mark
    entries = b.registry.access_log()
    if _log_id(b) != ident or len(entries) < n:
        log.warning("the registry's access log was replaced during the run: registry bytes unknown")
        return {"fetched_bytes": None, "requests": None, "blob_requests": None, "blob_bytes": None,
                "registry_log": "replaced during the run (another process on the same --workdir?)"}
    entries = entries[n:]
    blobs = [e for e in entries if e.is_blob_get]
    return {"fetched_bytes": sum(e.bytes for e in entries), "requests": len(entries),
            "blob_requests": len(blobs), "blob_bytes": sum(e.bytes for e in blobs)}


def _base_row(b: Bench, wl: Workload, mode: str, repeat: int) -> dict:
    rec = b.records.get((wl.image, wl.name), {})
    return {"image": wl.image, "workload": wl.name, "mode": mode, "link": b.link.spec.name, "repeat": repeat,
            "pull_s": None, "create_s": None, "ready_s": None, "total_s": None, "fetched_bytes": None,
            "requests": None, "read_bytes": rec.get("read_bytes"), "chunk_bytes": rec.get("chunk_bytes"),
            "chunk_compressed_bytes": rec.get("chunk_compressed_bytes"),
            "load_1m": round(load_average()[0], 2), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


# --------------------------------------------------------------------------- (a) overlayfs

def run_overlayfs(b: Bench, wl: Workload, repeat: int) -> dict:
    if b.ctd is None:
        raise Skip("no containerd (runner chroot)")
    row = _base_row(b, wl, "overlayfs", repeat)
    ref = b.ref(wl.image, "oci")
    b.ctd.remove_all()
    b.ctd.assert_cold()
    os.sync()
    mark = _mark(b)
    t0 = time.monotonic()
    b.ctd.ctr("images", "pull", "--plain-http", ref, netns=b.link.netns, timeout=b.timeout)
    t1 = time.monotonic()
    res = ctr_run(b, wl, image_ref=ref)
    total = res["ready_at"] - t0          # a server's teardown is not part of it
    row.update(_registry_delta(b, mark))
    again = ctr_run(b, wl, image_ref=ref)              # the same, image local and page cache hot
    b.ctd.remove_all()
    row.update({"runner": "ctr", "pull_s": t1 - t0, "create_s": res["create_s"], "ready_s": res["ready_s"],
                "total_s": total, "rerun_s": again["ready_s"], "output": res["output"]})
    return row


# --------------------------------------------------------------------------- (b)-(d) lazy

def _lazy_once(b: Bench, wl: Workload, *, ref: str, mode: str, cache_dir: Path, name: str,
               learn: str = "off") -> dict:
    """Mount `ref` lazily, run the workload, read the daemon's stats, unmount. Timed."""
    base = b.fresh_dir(name)
    inner = Cleanup()
    try:
        t0 = time.monotonic()
        run_dir = run_root() / "d" / name
        m = mount_lazy(ref, base, mode=mode, cache_dir=cache_dir, run_dir=run_dir, cleanup=inner,
                       netns=b.link.netns, learn=learn)
        t1 = time.monotonic()
        res = run_on_rootfs(b, wl, m.merged, chroot_env(b.configs[wl.image]))
        total = res["ready_at"] - t0          # a server's teardown is not part of it
        stats = daemon_stats(m)
    finally:
        inner.close()
        shutil.rmtree(run_root() / "d" / name, ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)
    return {"pull_s": t1 - t0, "create_s": res["create_s"], "ready_s": res["ready_s"], "total_s": total,
            "output": res["output"], "daemon": _trim_stats(stats)}


def _trim_stats(st: dict) -> dict:
    keys = ("mode", "mode_reason", "bytes_fetched", "backend_bytes", "requests", "bytes_read", "chunks_hit",
            "chunks_missed", "chunks_fetched", "prefetch", "prefetch_bytes", "prefetch_requests", "prefetch_files",
            "fetch_latency_ms", "verify_failures", "request_errors", "learned", "error")
    out = {k: st[k] for k in keys if k in st}
    if "cache" in st:
        out["cache_disk_bytes"] = st["cache"].get("disk_bytes")
    if "requests_served" in st:
        out["requests_served"] = st["requests_served"]
    return out


def lazy_mode(mode_name: str):
    fsmode, prefetch = LAZY_MODES[mode_name]

    def run_mode(b: Bench, wl: Workload, repeat: int) -> dict:
        if fsmode == "erofs" and not b.erofs_ok:
            raise Skip("kernel without file-backed EROFS mounts")
        variant = f"pf:{wl.name}" if prefetch else "nydus"
        if (wl.image, variant) not in b.tags:
            raise Skip(f"no {variant} conversion of {wl.image}")
        row = _base_row(b, wl, mode_name, repeat)
        if b.runner == "snapshotter":
            return _via_snapshotter(b, wl, row, fsmode, variant)
        cache = b.fast / "cache" / b.next_id("cache")
        mark = _mark(b)
        try:
            res = _lazy_once(b, wl, ref=b.ref(wl.image, variant), mode=fsmode, cache_dir=cache,
                             name=b.next_id(mode_name.replace("+", "-")))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        row.update(_registry_delta(b, mark))
        row.update({"runner": b.runner, **res})
        return row
    return run_mode


def _via_snapshotter(b: Bench, wl: Workload, row: dict, fsmode: str, variant: str, snap_key: str | None = None) -> dict:
    snap = b.snapshotters.get(snap_key or fsmode)
    if snap is None:
        raise Skip(f"no nydus snapshotter for {snap_key or fsmode}")
    ref = b.ref(wl.image, variant)
    b.ctd.remove_all()
    how = snap.reset(b.link.netns, b.ctd)
    b.ctd.assert_cold(snap.name)
    os.sync()
    mark = _mark(b)
    t0 = time.monotonic()
    snap.rpull(b.ctd, ref, timeout=b.timeout)
    t1 = time.monotonic()
    res = ctr_run(b, wl, image_ref=ref, snapshotter=snap.name)
    total = res["ready_at"] - t0          # a server's teardown is not part of it
    row.update(_registry_delta(b, mark))
    raw = snap.stats()
    stats = trim_snapshotter_status(raw, ref)
    daemon = _snapshotter_daemon_stats(stats)
    if getattr(snap, "learn", "off") != "off":         # what `status` trims: the daemon's own stats
        for m in raw.get("mounts") or []:
            if m.get("image") == ref and m.get("key"):
                full = snap.daemon_stats(m["key"]) or {}
                daemon.update({k: full[k] for k in ("prefetch", "prefetch_bytes", "prefetch_requests", "learned",
                                                     "error") if k in full})
    row.update({"runner": "snapshotter", "pull_s": t1 - t0, "create_s": res["create_s"], "ready_s": res["ready_s"],
                "total_s": total, "output": res["output"], "daemon": daemon,
                "snapshotter": stats, "cold_by": how})
    again = ctr_run(b, wl, image_ref=ref, snapshotter=snap.name)
    row["rerun_s"] = again["ready_s"]
    b.ctd.remove_all()
    return row


def trim_snapshotter_status(st: dict, ref: str | None = None) -> dict:
    """What the report needs of `nydus-snapshotter status --json`: the image and mount of `ref`."""
    keep_i = ("ref", "status", "detail", "bytes_fetched")
    keep_m = ("image", "mode", "state", "restarts", "error", "bytes_fetched", "requests", "bytes_read",
              "cache_bytes", "chunks_fetched", "prefetch")
    images = [i for i in st.get("images") or [] if ref is None or i.get("ref") == ref]
    mounts = [m for m in st.get("mounts") or [] if ref is None or m.get("image") == ref]
    return {"images": [{k: i.get(k) for k in keep_i} for i in images],
            "mounts": [{k: m.get(k) for k in keep_m} for m in mounts],
            **({"error": st["error"]} if "error" in st else {})}


def _snapshotter_daemon_stats(st: dict) -> dict:
    mounts = st.get("mounts") or []
    out = {}
    for m in mounts:
        d = m.get("stats") or m
        for k in ("bytes_fetched", "bytes_read", "requests", "chunks_fetched"):
            if isinstance(d.get(k), (int, float)):
                out[k] = out.get(k, 0) + d[k]
    return out


# --------------------------------------------------------------------------- erofs+learned

def learned_summary(ref: str) -> dict:
    """`nydusify learned show REF --json`: the record next to the image (chunks, bytes, runs)."""
    r = nydusify("learned", "show", ref, "--plain-http", "--json", check=False, timeout=120)
    try:
        return json.loads(r.stdout)
    except ValueError:
        return {"error": (r.stderr or r.stdout).strip()[-300:]}


def prime_learned(b: Bench, wl: Workload, ref: str, fsmode: str) -> dict:
    """"One earlier run anywhere in the cluster": the image's record reset, then a mount on the host
    (unshaped, fresh cache, `--learn auto`) runs the workload once and publishes what it read to the
    registry at unmount.  Not timed; returns the published record's summary."""
    learned_reset(ref)
    name = b.next_id("learnprime")
    cache = b.fast / "cache" / name
    inner = Cleanup()
    try:
        m = mount_lazy(ref, b.fresh_dir(name), mode=fsmode, cache_dir=cache, run_dir=run_root() / "d" / name,
                       cleanup=inner, learn="auto")
        run_on_rootfs(b, wl, m.merged, chroot_env(b.configs[wl.image]))
    finally:
        inner.close()                                   # unmount: the daemon publishes its record
        shutil.rmtree(run_root() / "d" / name, ignore_errors=True)
        shutil.rmtree(b.fast / "runs" / name, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    rec = learned_summary(ref)
    if not rec.get("chunks") or not rec.get("runs"):
        raise RuntimeError(f"the priming run published no learned record for {ref}: {rec}")
    return {k: rec.get(k) for k in ("chunks", "bytes", "files", "runs", "tag") if k in rec}


def run_learned(b: Bench, wl: Workload, repeat: int) -> dict:
    if not b.erofs_ok:
        raise Skip("kernel without file-backed EROFS mounts")
    if (wl.image, "nydus") not in b.tags:
        raise Skip(f"no conversion of {wl.image}")
    if b.runner == "snapshotter" and "erofs+learned" not in b.snapshotters:
        raise Skip("no nydus snapshotter with [daemon] learn = \"use\"")
    row = _base_row(b, wl, "erofs+learned", repeat)
    row["learned_prime"] = prime_learned(b, wl, f"{b.registry.host}/{b.tags[(wl.image, 'nydus')]}", "erofs")
    if b.runner == "snapshotter":
        _via_snapshotter(b, wl, row, "erofs", "nydus", snap_key="erofs+learned")
    else:
        cache = b.fast / "cache" / b.next_id("cache")
        mark = _mark(b)
        try:
            res = _lazy_once(b, wl, ref=b.ref(wl.image, "nydus"), mode="erofs", cache_dir=cache,
                             name=b.next_id("erofs-learned"), learn="use")
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        row.update(_registry_delta(b, mark))
        row.update({"runner": b.runner, **res})
    d = row.get("daemon") or {}
    learned = d.get("learned") or {}
    row["learned"] = {"source": learned.get("source"), "record": learned.get("record"),
                      "prefetch": d.get("prefetch"), "prefetch_bytes": d.get("prefetch_bytes"),
                      "prefetch_requests": d.get("prefetch_requests")}
    if not learned.get("record"):
        raise RuntimeError(f"the timed start used no learned record: daemon stats {d}")
    return row


# --------------------------------------------------------------------------- (e) warm

def run_warm(b: Bench, wl: Workload, repeat: int) -> dict:
    fsmode = "erofs" if b.erofs_ok else "fuse"
    if (wl.image, "nydus") not in b.tags:
        raise Skip(f"no conversion of {wl.image}")
    row = _base_row(b, wl, "warm", repeat)
    cache = b.fast / "cache" / b.next_id("warmcache")
    ref = b.ref(wl.image, "nydus")
    try:
        _lazy_once(b, wl, ref=ref, mode=fsmode, cache_dir=cache, name=b.next_id("prime"))
        mark = _mark(b)
        res = _lazy_once(b, wl, ref=ref, mode=fsmode, cache_dir=cache, name=b.next_id("warm"))
        row.update(_registry_delta(b, mark))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    row.update({"runner": "chroot" if b.runner == "chroot" else "ctr", "fs_mode": fsmode, **res})
    return row


# --------------------------------------------------------------------------- (f) p2p

@functools.lru_cache(maxsize=1)
def p2p_supported() -> str | None:
    """None if `nydusify mount` can serve and fetch chunks from peers, else why not."""
    r = run([sys.executable, "-m", "converter.cli", "mount", "--help"], check=False,
            cwd=Path(__file__).resolve().parents[1])
    if "--p2p-peers" in r.stdout and "--p2p-listen" in r.stdout:
        return None
    return "the mount daemon has no p2p options yet (`nydusify mount --help` lists no --p2p-listen/--p2p-peers)"


def run_p2p(b: Bench, wl: Workload, repeat: int) -> dict:
    """A cold node B (in the link's netns) whose daemon asks a warm peer A first, then the registry.

    A runs on the host, mounts the image straight from the registry (not timed), runs the workload
    once so its cache holds what the workload reads, and serves it on `--p2p-listen`.  B is the
    timed cold start with `--p2p-peers A`.  On shaped links only the registry's port is shaped:
    A and B talk over an unshaped 10 Gbit/s class (a LAN beside the WAN link).
    """
    why = p2p_supported()
    if why:
        raise Skip(why)
    if (wl.image, "nydus") not in b.tags:
        raise Skip(f"no conversion of {wl.image}")
    fsmode = "erofs" if b.erofs_ok else "fuse"
    row = _base_row(b, wl, "p2p", repeat)
    env = chroot_env(b.configs[wl.image])
    peer = f"{b.link.host_ip}:{free_port(b.link.host_ip)}"
    names = {n: b.next_id(n) for n in ("peerA", "nodeB")}
    caches = {n: b.fast / "cache" / names[n] for n in names}
    inner = Cleanup()
    try:
        a = mount_lazy(f"{b.registry.host}/{b.tags[(wl.image, 'nydus')]}", b.fresh_dir(names["peerA"]),
                       mode=fsmode, cache_dir=caches["peerA"], run_dir=run_root() / "d" / names["peerA"],
                       cleanup=inner, extra=["--p2p-listen", peer])
        run_on_rootfs(b, wl, a.merged, env)                       # A is warm now
        mark = _mark(b)
        t0 = time.monotonic()
        m = mount_lazy(b.ref(wl.image, "nydus"), b.fresh_dir(names["nodeB"]), mode=fsmode,
                       cache_dir=caches["nodeB"], run_dir=run_root() / "d" / names["nodeB"], cleanup=inner,
                       netns=b.link.netns, extra=["--p2p-peers", peer])
        t1 = time.monotonic()
        res = run_on_rootfs(b, wl, m.merged, env)
        total = res["ready_at"] - t0          # a server's teardown is not part of it
        stats_b, stats_a = daemon_stats(m), daemon_stats(a)
        row.update(_registry_delta(b, mark))
    finally:
        inner.close()
        for n in names.values():
            shutil.rmtree(run_root() / "d" / n, ignore_errors=True)
            shutil.rmtree(b.fast / "runs" / n, ignore_errors=True)
        for c in caches.values():
            shutil.rmtree(c, ignore_errors=True)
    row.update({"runner": "chroot" if b.runner == "chroot" or b.ctd is None else "ctr", "fs_mode": fsmode,
                "pull_s": t1 - t0, "create_s": res["create_s"], "ready_s": res["ready_s"], "total_s": total,
                "output": res["output"], "daemon": _trim_stats(stats_b),
                "p2p": {"node": (stats_b.get("storage") or {}).get("p2p") or stats_b.get("p2p"),
                        "peer": (stats_a.get("storage") or {}).get("p2p") or stats_a.get("p2p")}})
    return row


RUNNERS = {"overlayfs": run_overlayfs, "fuse": lazy_mode("fuse"), "erofs": lazy_mode("erofs"),
           "fuse+prefetch": lazy_mode("fuse+prefetch"), "erofs+prefetch": lazy_mode("erofs+prefetch"),
           "erofs+learned": run_learned, "warm": run_warm, "p2p": run_p2p}


def run_mode(b: Bench, mode: str, wl: Workload, repeat: int) -> dict:
    """One run; failures and skips become rows too (ok=False, error/skipped), never silently dropped."""
    try:
        row = RUNNERS[mode](b, wl, repeat)
        row["ok"] = True
        return row
    except Skip as e:
        row = _base_row(b, wl, mode, repeat)
        row.update({"ok": False, "skipped": str(e)})
        return row
    except Exception as e:  # noqa: BLE001 - a failed run is a result, the suite goes on
        log.exception("%s / %s / %s failed", wl.name, mode, b.link.spec.name)
        row = _base_row(b, wl, mode, repeat)
        row.update({"ok": False, "error": f"{type(e).__name__}: {e}"[-2000:]})
        return row
