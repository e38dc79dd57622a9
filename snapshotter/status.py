"""``nydus-snapshotter status``: what the snapshotter serves, read from its state (works while it is down).

Per image: ``lazy`` (nydus blob layers answered as remote snapshots, RAFS
mounted on demand), ``full`` (ordinary layers unpacked by containerd) or
``failed`` (with the reason). Per lazy mount: mode, daemon pid and liveness,
restarts, bytes fetched from the registry, requests, cache hits, the cache's
disk use and evictions (from the daemon's stats API). The node's cache: disk use
(blocks really used), the limit (`[cache] max_size`, 0 = none) and evictions.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

from . import metastore as ms
from .config import Config
from .lazy import RafsMounts
from .mounts import Layout, dir_usage
from .standby import standby_pid
from .snapshots import LABEL_REMOTE, Kind


def _listening(address: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(address)
        return True
    except OSError:
        return False
    finally:
        s.close()


def collect(cfg: Config) -> dict:
    layout = Layout(cfg.root)
    out: dict = {"root": str(layout.root), "address": cfg.address, "serving": _listening(cfg.address),
                 "cache_dir": cfg.cache_dir, "cache_max_size": cfg.cache.max_bytes, "cache_evictions": 0,
                 "images": [], "mounts": [], "snapshots": {}}
    if not layout.db_path.exists():
        out["error"] = f"no metadata at {layout.db_path}"
        return out
    store = ms.MetaStore(layout.db_path, readonly=True)
    try:
        with store.transaction() as tx:
            infos: list = []
            ms.walk(tx, infos.append)
            images = ms.list_images(tx)
            rows = ms.list_rafs_mounts(tx)
            users = ms.rafs_users(tx)
            names = ms.id_map(tx)
    finally:
        store.close()
    counts = {k.label: 0 for k in (Kind.ACTIVE, Kind.VIEW, Kind.COMMITTED)}
    for i in infos:
        counts[i.kind.label] = counts.get(i.kind.label, 0) + 1
    counts["remote"] = sum(1 for i in infos if LABEL_REMOTE in i.labels)
    counts["total"] = len(infos)
    out["snapshots"] = counts
    lazy = RafsMounts(cfg)
    lazy.layout = layout
    out["standby_pid"] = standby_pid(lazy.standby_pid_file())
    fetched_by_image: dict[str, int] = {}
    for row in rows:
        info = lazy.daemon_info(row.key)
        st = lazy.stats(row.key) if info else None
        cache = Path(cfg.cache_dir) / row.key
        m = {"key": row.key, "image": row.image_ref, "mountpoint": row.mountpoint, "state": row.state,
             "mode": (st or {}).get("mode") or row.mode, "pid": (info or {}).get("pid") or row.pid,
             "daemon_alive": info is not None, "restarts": row.restarts, "error": row.error,
             "started_by_standby": (info or {}).get("standby"),
             "bootstrap_snapshots": sorted(names.get(s, f"(removed #{s})") for s, k in users.items()
                                           if k == row.key),
             "cache_bytes": dir_usage(cache)[0] if cache.exists() else 0}
        if st:
            m.update({k: st.get(k) for k in ("bytes_fetched", "requests", "request_errors", "chunks_hit",
                                              "chunks_missed", "chunks_fetched", "verify_failures", "bytes_read",
                                              "image_bytes", "prefetch")})
            fetched_by_image[row.image_ref] = fetched_by_image.get(row.image_ref, 0) + (st.get("bytes_fetched") or 0)
            cst = st.get("cache") or {}
            m["evictions"] = cst.get("evictions", 0)
            m["cache_write_error"] = cst.get("write_error")
            out["cache_evictions"] += m["evictions"] or 0
        out["mounts"].append(m)
    for ref, status, detail, updated in images:
        out["images"].append({"ref": ref, "status": status, "detail": detail,
                              "updated": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(updated / 1e9)),
                              "bytes_fetched": fetched_by_image.get(ref)})
    cache_root = Path(cfg.cache_dir)
    out["cache_bytes"] = dir_usage(cache_root)[0] if cache_root.exists() else 0
    return out


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} MB"


def render(st: dict) -> str:
    lines = [f"nydus-snapshotter  root {st['root']}  socket {st['address']} "
             f"({'serving' if st['serving'] else 'NOT serving'})"]
    if st.get("error"):
        return "\n".join(lines + [st["error"]])
    s = st["snapshots"]
    lines.append(f"snapshots  {s.get('total', 0)} ({s.get('committed', 0)} committed, {s.get('active', 0)} active, "
                 f"{s.get('view', 0)} view; {s.get('remote', 0)} remote nydus layers)")
    limit = st.get("cache_max_size") or 0
    lines.append(f"cache      {st['cache_dir']}  {_mb(st['cache_bytes'])} on disk"
                 + (f" of {_mb(limit)} limit" if limit else " (no limit)")
                 + f", {st.get('cache_evictions', 0)} chunks evicted")
    if st.get("standby_pid"):
        lines.append(f"standby    mount daemon launcher pid {st['standby_pid']}, ready")
    lines.append("")
    lines.append("IMAGE" + " " * 43 + "STATUS  FETCHED     DETAIL")
    for im in st["images"]:
        lines.append(f"{im['ref'][:47]:<48}{im['status']:<8}{_mb(im['bytes_fetched']):<12}{im['detail']}")
    if not st["images"]:
        lines.append("(none)")
    lines.append("")
    lines.append("MOUNT             MODE   PID      ALIVE  RESTARTS  FETCHED     REQS   HIT/MISS     CACHE       IMAGE")
    for m in st["mounts"]:
        hm = f"{m.get('chunks_hit', '-')}/{m.get('chunks_missed', '-')}"
        lines.append(f"{m['key']:<18}{(m['mode'] or '-'):<7}{m['pid']:<9}{'yes' if m['daemon_alive'] else 'NO':<7}"
                     f"{m['restarts']:<10}{_mb(m.get('bytes_fetched')):<12}{str(m.get('requests', '-')):<7}"
                     f"{hm:<13}{_mb(m['cache_bytes']):<12}{m['image']}")
        if m.get("evictions"):
            lines.append(f"    {m['evictions']} cache chunks evicted")
        if m.get("cache_write_error"):
            lines.append(f"    cache not written: {m['cache_write_error']} (reads served from memory)")
        if m["state"] == "failed" and m["error"]:
            lines.append(f"    failed: {m['error'].splitlines()[-1]}")
    if not st["mounts"]:
        lines.append("(none)")
    return "\n".join(lines)


__all__ = ["collect", "render"]
