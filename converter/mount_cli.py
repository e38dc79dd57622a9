"""`nydusify mount | umount | stats`: a converted image, lazily, at a mountpoint.

    nydusify mount REF MOUNTPOINT [--mode auto|fuse|erofs] [--cache-dir DIR] [--prefetch-all]
                   [--plain-http] [--platform P] [--blob-dir DIR] [--daemon [--pid-file F]]
                   [--mirror SPEC ...] [--metrics-address HOST:PORT]
    nydusify umount MOUNTPOINT
    nydusify stats MOUNTPOINT [--json] [--files]

REF is a registry reference (blobs are read with HTTP Range requests, same
auth as convert) or `oci:DIR[:TAG]` (blobs read from the layout), or a local
bootstrap file with `--blob-dir DIR` (blob files named by blob id, as nydusd's
localfs backend), or a blob file carrying its own bootstrap. The mount
is up once the bootstrap is fetched; chunks are fetched, verified and cached
in --cache-dir when read. The daemon itself is `rafs.daemon.MountDaemon`, run by `rafs.launcher`
(as every mount daemon); its caches are built by P2P's builder, named here (`P2P_CACHES`) and
loaded by the launcher: the converter imports no p2p module.
"""
from __future__ import annotations

import json
import os
import sys

from rafs.api import ApiClient
from rafs.errors import RafsError
from rafs.image.refs import parse_ref
from rafs.image.store import RegistryStore, open_store
from rafs.launcher import add_mount_options, launch, load_cache_builder
from rafs.mounttab import request_umount, request_upgrade, state_paths
from rafs.storage.backend import LocalFsBackend
from rafs.storage.factory import BackendConfig, build_backend, store_hosts

from .nydus_image import load_from_store, open_local

DEFAULT_CACHE_DIR = "/var/lib/pynydus/cache"
P2P_CACHES = "p2p.cli:MOUNT_CACHES"      # straight to the backend, or peers first with --p2p-* options


def add_parsers(sub, common, add_blob_dir=None) -> None:
    m = sub.add_parser("mount", help="mount a converted image lazily at MOUNTPOINT")
    m.add_argument("ref", help="HOST/REPO:TAG or oci:DIR[:TAG] of a converted image, or a local bootstrap "
                               "file (with --blob-dir) or blob file carrying its own bootstrap")
    m.add_argument("mountpoint")
    m.add_argument("--daemon", action="store_true", help="detach; return once the mount is ready")
    if add_blob_dir is not None:
        add_blob_dir(m)
    add_mount_options(m, caches=load_cache_builder(P2P_CACHES), cache_dir_default=DEFAULT_CACHE_DIR)
    common(m)

    u = sub.add_parser("umount", help="unmount MOUNTPOINT and stop its daemon (or clear a stale mount)")
    u.add_argument("mountpoint")
    u.add_argument("--run-dir", help="state directory root")

    g = sub.add_parser("upgrade", help="hot upgrade: a freshly started daemon (the code on disk now) takes over "
                                       "MOUNTPOINT's FUSE connection; nothing is unmounted")
    g.add_argument("mountpoint")
    g.add_argument("--run-dir", help="state directory root")
    g.add_argument("--timeout", type=float, default=60.0)

    s = sub.add_parser("stats", help="what the daemon of MOUNTPOINT fetched, cached and served")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true")
    s.add_argument("--files", action="store_true",
                   help="the access audit: each file read, when first (since the first read), which ranges")
    s.add_argument("--run-dir", help="state directory root")


def open_image(ref: str, *, plain_http: bool = False, platform: str | None = None,
               blob_dir: str | None = None, mirrors=(), hosts_dir: str | None = None):
    """(raw bootstrap, blob backend, description) of a converted image reference, or of a local
    bootstrap or blob file (`nydus_image.open_local`) whose blobs are files in `blob_dir`. `mirrors`
    (`MirrorConfig`s) are tried before the registry, for the manifest and bootstrap as for blob chunks."""
    if mirrors and (os.path.isfile(ref) or parse_ref(ref).kind == "oci"):
        raise ValueError(f"--mirror goes with a registry reference; {ref} is not one")
    if os.path.isfile(ref):
        image = open_local(ref, blob_dir)
        if image.backend is None:
            raise ValueError(f"{ref} is a bootstrap file: give --blob-dir DIR, the folder of its blob files")
        return image.raw_bootstrap, image.backend, {"ref": os.path.abspath(ref), "backend": image.backend.name}
    if blob_dir is not None:
        raise ValueError(f"--blob-dir goes with a local bootstrap or blob file; {ref} is not a file")
    r = parse_ref(ref)
    if mirrors:
        opened = RegistryStore(r, hosts=store_hosts(r.host, mirrors, hosts_dir=hosts_dir, plain_http=plain_http))
    else:
        opened = open_store(r, plain_http=plain_http, hosts_dir=hosts_dir)
    with opened as store:
        image = load_from_store(store, platform)
        if r.kind == "oci":
            backend = LocalFsBackend(r.path)
        else:
            host, repo = r.endpoint
            backend = build_backend(BackendConfig(kind="registry", host=host, repo=repo, plain_http=plain_http,
                                                  mirrors=list(mirrors), hosts_dir=hosts_dir))
    desc = {"ref": str(r), "backend": backend.name}
    return image.raw_bootstrap, backend, desc


def _mount(args) -> int:
    # --daemon forks and changes to "/": relative paths are taken from here, before (the launcher does
    # its own options)
    if getattr(args, "blob_dir", None):
        args.blob_dir = os.path.abspath(args.blob_dir)
    if getattr(args, "hosts_dir", None):
        args.hosts_dir = os.path.abspath(args.hosts_dir)
    if os.path.isfile(args.ref):
        args.ref = os.path.abspath(args.ref)

    def report(daemon) -> str:
        return (f"mounted {daemon.cfg.description['ref']} at {daemon.mountpoint}: mode {daemon.mode} "
                f"({daemon.mode_reason}); pid {os.getpid()}, stats: nydusify stats {daemon.mountpoint}"
                + (f", metrics: {daemon.cfg.description['metrics']}" if "metrics" in daemon.cfg.description else ""))
    return launch(args, lambda: open_image(args.ref, plain_http=args.plain_http, platform=args.platform,
                                           blob_dir=getattr(args, "blob_dir", None), mirrors=args.mirrors,
                                           hosts_dir=getattr(args, "hosts_dir", None) or None),
                  caches=load_cache_builder(P2P_CACHES), detach=args.daemon, report=report,
                  error_prefix="nydusify mount",
                  relaunch=[sys.executable, "-m", "converter.cli", *args.argv] if getattr(args, "argv", None) else None)


def _upgrade(args) -> int:
    print(request_upgrade(args.mountpoint, timeout=args.timeout, run_dir_override=args.run_dir))
    return 0


def _umount(args) -> int:
    print(request_umount(args.mountpoint, run_dir_override=args.run_dir))
    return 0


def _stats(args) -> int:
    paths = state_paths(args.mountpoint, args.run_dir)
    if not os.path.exists(paths.api_sock):
        raise RafsError(f"no pynydus daemon serves {args.mountpoint} (no {paths.api_sock})")
    client = ApiClient(paths.api_sock)
    if args.files:
        files = client.files()
        print(json.dumps(files, indent=2) if args.json else render_files(files))
        return 0
    st = client.stats()
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else render_stats(st))
    return 0


def render_files(files: list[dict]) -> str:
    """One line per file read, in first-access order: seconds since the first read, bytes, path, ranges."""
    lines = [f"{'first s':>8} {'reads':>6} {'bytes':>12}  path  [offset+length ...]"]
    for f in files:
        rs = f["ranges"]
        shown = " ".join(f"{o}+{n}" for o, n in rs[:6]) + (" ..." if len(rs) > 6 else "")
        lines.append(f"{f['first_access_ms'] / 1000:8.3f} {f['reads']:6d} {f['bytes']:12,d}  {f['path']}  [{shown}]")
    lines.append(f"{len(files)} files, {sum(f['bytes'] for f in files):,} bytes read")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def render_stats(st: dict) -> str:
    lat = st.get("fetch_latency_ms", {})
    cache = st.get("cache", {})
    return "\n".join([
        f"mountpoint  {st['mountpoint']}  ({st['mode']} mode, pid {st['pid']}, up {st['uptime_s']:.1f} s)",
        f"image       {st.get('ref', '?')}  ({st['blobs']} blobs, {_mb(st['image_bytes'])} compressed)",
        f"fetched     {_mb(st['bytes_fetched'])} of chunks in {st['requests']} requests "
        f"({st['request_errors']} failed), {_mb(st.get('backend_bytes', 0))} from the backend in all; "
        f"prefetch {_mb(st['prefetch_bytes'])} ({st['prefetch']})",
        f"chunks      {st['chunks_hit']} hit, {st['chunks_missed']} missed, {st['chunks_fetched']} "
        f"fetched, {st['verify_failures']} failed verification",
        f"latency     p50 {lat.get('p50', 0)} ms, p90 {lat.get('p90', 0)} ms, p99 {lat.get('p99', 0)} ms, "
        f"max {lat.get('max', 0)} ms ({lat.get('count', 0)} fetches)",
        _render_link(st.get("link") or {}),
        _render_learned(st.get("learned"), st.get("access") or {}),
        f"cache       {_mb(cache.get('disk_bytes', 0))} on disk, {cache.get('chunks_ready', 0)}/"
        f"{cache.get('chunks_total', 0)} chunks of open blobs ready; served {_mb(st['bytes_read'])}",
        (f"limit       {_mb(cache.get('limit_root_bytes', 0))} of {_mb(cache['max_size'])} used under "
         f"{cache.get('limit_root')}; {cache.get('evictions', 0)} chunks evicted"
         if cache.get("max_size") else f"limit       none; {cache.get('evictions', 0)} chunks evicted")
        + (f"; NOT CACHING: {cache['write_error']}" if cache.get("write_error") else ""),
    ])


def _render_learned(learned: dict | None, access: dict) -> str:
    files = f"{access.get('files_read', 0)} files read (nydusify stats MNT --files)" if access else ""
    if learned is None:
        return f"learned     off; {files}"
    rec = learned.get("record")
    used = (f"prefetching {rec['chunks']} chunks ({_mb(rec['bytes'])}) learned from {rec['runs']} start(s), "
            f"{learned['source']}" if rec else "no record yet")
    return f"learned     {learned['mode']}: {used}; published: {learned.get('published') or 'not yet'}; {files}"


def _render_link(link: dict) -> str:
    if link.get("latency_ms") is None:
        return f"link        not measured yet; a miss is widened to {_mb(link.get('amplify_bytes', 0))}"
    return (f"link        {link['latency_ms']:.1f} ms + {link['bandwidth_mbit']:.0f} Mbit/s per request "
            f"(fit of {link['samples']} fetches); a miss is widened to {_mb(link['amplify_bytes'])}")


COMMANDS = {"mount": _mount, "umount": _umount, "stats": _stats, "upgrade": _upgrade}
