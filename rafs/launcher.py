"""The one mount daemon launcher: spawn, build the caches, start, report, run.

Every entry point that runs a `rafs.daemon.MountDaemon` goes through here:

    nydusify mount             converter/mount_cli.py   foreground or --daemon; "mounted REF at MNT: ..."
    python -m snapshotter.mountd                        always detached; one JSON line for the snapshotter
    testbed's P2P node driver  p2pcluster.py            foreground, with a fault; "READY MODE LISTEN"

An entry point declares the mount options with `add_mount_options` (the options and their help live
here only) and calls `launch` with what is its own: how to open its image (raw bootstrap, blob backend,
description), how its blob caches are built (a `CacheBuilder`) and the line that reports a ready mount.

Cache builders: `DIRECT_CACHES` reads the backend straight through the blob cache; P2P's
(`p2p.cli.MOUNT_CACHES`, peers first) lives in `p2p/` and is handed in by the caller, since `rafs`
imports no other package of pynydus. A caller that must not import `p2p` either (the converter) names
it instead, `load_cache_builder("p2p.cli:MOUNT_CACHES")`. A builder adds its own command-line options
(`add_mount_options(parser, caches=...)`) and builds a CacheManager from the backend, the mount's
`CacheConfig` (`MOUNT_CACHE_OPTIONS`) and the parsed arguments.

`launch(args, open_image, report=...)`:

1. makes the paths absolute (a detached daemon changes to "/") and parses the `--mirror` specs into
   `args.mirrors` (`MirrorConfig`s, for `open_image`'s registry backend: `BackendConfig(mirrors=...)`);
   with `detach`, forks a daemon in its own session (`spawn_daemon`, log in the state dir): the
   launching process waits for its report, prints it and leaves, 0 if the mount is ready, 1 if not;
2. in the daemon: opens the image, builds the caches, makes and starts the `MountDaemon`; an error is
   reported to the launching process as "PREFIX: error: ..." and raised;
3. prints `report(daemon)` and hands it to the launching process (which may be gone: serve anyway);
4. serves until unmounted, then prints "unmounted MOUNTPOINT: WHY".

This module imports only the standard library until a launch: the snapshotter's launcher (and P2P's
command line, which names `CacheBuilder`) should not pay for the daemon's imports to parse options.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["MOUNT_CACHE_OPTIONS", "CacheBuilder", "DIRECT_CACHES", "load_cache_builder", "add_mount_options",
           "launch", "spawn_daemon"]

# Blob cache settings for mounts (rafs.storage.factory.CacheConfig keywords): no blind readahead
# to merge_size in the cache; a miss is widened over the chunks after it by the link's measured
# bandwidth-delay product (neighbours in a blob are usually read next; amplify.py); RafsFs reads
# ahead of sequential streams, with big merged requests.
MOUNT_CACHE_OPTIONS = {"readahead": False, "amplify": "auto", "merge_size": 4 << 20}

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# --------------------------------------------------------------------------- cache builders

@dataclass(frozen=True)
class CacheBuilder:
    """How a mount daemon's blob caches are built: `build(backend, cache_cfg, args)` returns the
    CacheManager (the daemon owns and closes it); `add_options(parser)` declares the command-line
    options `build` reads from `args`."""
    build: Callable[[Any, Any, Any], Any]
    add_options: Callable[[Any], None] | None = None


def _direct_caches(backend, cache_cfg, args):
    from .storage.factory import build_cache_manager
    return build_cache_manager(cache_cfg, backend)


DIRECT_CACHES = CacheBuilder(_direct_caches)


def load_cache_builder(spec: str) -> CacheBuilder:
    """The CacheBuilder named by `spec`, "package.module:NAME" (imported now)."""
    module, sep, name = spec.partition(":")
    if not sep:
        raise ValueError(f"cache builder {spec!r}: want MODULE:NAME")
    builder = getattr(importlib.import_module(module), name)
    if not isinstance(builder, CacheBuilder):
        raise TypeError(f"cache builder {spec!r} is a {type(builder).__name__}, not a CacheBuilder")
    return builder


# --------------------------------------------------------------------------- options

def add_mount_options(parser, *, caches: CacheBuilder = DIRECT_CACHES, cache_dir_default: str | None = None,
                      require_state: bool = False) -> None:
    """Declare the mount options `launch` reads: --mode, --cache-dir (required without a default),
    --prefetch-all, --run-dir, --pid-file (both required with `require_state`), --mirror (repeatable),
    --metrics-address, and those of `caches`.
    The image and the mountpoint are the entry point's own."""
    from .daemon import MODES
    from .learned import DEFAULT_WINDOW, LEARN_MODES
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="erofs: kernel EROFS over FUSE blob files; fuse: all in FUSE; "
                             "auto (default): erofs where the kernel supports it")
    parser.add_argument("--cache-dir", default=cache_dir_default, required=cache_dir_default is None,
                        help="blob cache" + (f" (default {cache_dir_default})" if cache_dir_default else ""))
    parser.add_argument("--cache-max-size", metavar="SIZE", default="0",
                        help="disk limit of the blob cache, e.g. 64M or 2G (default 0: none); past it the least "
                             "recently used chunks no read is using are evicted (fetched again when read)")
    parser.add_argument("--cache-limit-root", metavar="DIR", default=None,
                        help="the directory --cache-max-size covers, shared with the other daemons under it "
                             "(default: --cache-dir; the snapshotter passes its cache root)")
    parser.add_argument("--prefetch-all", action="store_true", help="fetch whole blobs in the background")
    parser.add_argument("--learn", choices=LEARN_MODES, default="auto",
                        help="learned prefetch (rafs.learned), for images without a prefetch list of their own: "
                             "auto (default): prefetch what earlier starts of the image read, and publish this "
                             "start's reads (next to the image, and in the cache dir); use: prefetch, never "
                             "publish; off: neither")
    parser.add_argument("--learn-window", type=float, default=DEFAULT_WINDOW, metavar="SECONDS",
                        help=f"the seconds from the first read that count as the start (default {DEFAULT_WINDOW:g})")
    parser.add_argument("--run-dir", required=require_state,
                        help="state directory root (default $PYNYDUS_RUN_DIR or /run/pynydus)")
    parser.add_argument("--pid-file", required=require_state, help="write the daemon's pid here")
    parser.add_argument("--mirror", action="append", default=[], metavar="SPEC",
                        help="a registry mirror tried before the registry, repeatable, in order: a URL "
                             "(http://127.0.0.1:65001), KEY=VALUE,... with nydusd's mirror keys (host, "
                             "header=NAME:VALUE, auth_through, ping_url, health_check_interval, failure_limit) "
                             "or a JSON object; see rafs/storage/backend/mirror.py")
    parser.add_argument("--holder", choices=("auto", "on", "off"), default="auto",
                        help="detached mounts: keep the FUSE connection in a holder process that restarts a "
                             "dead daemon on it (failover, hot upgrade); auto (default): on for root")
    parser.add_argument("--metrics-address", metavar="HOST:PORT",
                        help="serve Prometheus metrics of this mount at http://HOST:PORT/metrics "
                             "(port 0: a free one, shown by stats)")
    if caches.add_options is not None:
        caches.add_options(parser)


# --------------------------------------------------------------------------- launch

def held_fd() -> tuple[int, bool, int | None] | None:
    """(fuse fd, adopt, notify fd) when this process is a mount daemon started by a holder (rafs.holder)."""
    fd = os.environ.get("PYNYDUS_FUSE_FD")
    if not fd:
        return None
    notify = os.environ.get("PYNYDUS_NOTIFY_FD")
    return int(fd), os.environ.get("PYNYDUS_FUSE_ADOPT") == "1", int(notify) if notify else None


def holder_wanted(args) -> bool:
    """Whether a detached mount runs under a holder (failover, hot upgrade): --holder auto (default) is
    yes for root (mount(2) of FUSE needs it); PYNYDUS_HOLDER=0/1 overrides auto."""
    want = getattr(args, "holder", "auto") or "auto"
    if want == "auto":
        env = os.environ.get("PYNYDUS_HOLDER")
        if env in ("0", "1"):
            return env == "1"
        return os.geteuid() == 0 and os.path.exists("/dev/fuse")
    return want == "on"


def spawn_holder(state_dir: str, log_path: str, relaunch: list[str]) -> tuple[int, tuple[bool, str]]:
    """Start `python -m rafs.holder` (own session) running `relaunch` as the mount daemon; returns
    (holder pid, (ok, message)) once the first daemon has reported."""
    import subprocess
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    r, w = os.pipe()
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("PYNYDUS_FUSE_FD", "PYNYDUS_FUSE_ADOPT",
                                                            "PYNYDUS_NOTIFY_FD", "PYNYDUS_HOLDER_PID")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        p = subprocess.Popen([sys.executable, "-m", "rafs.holder", "--state", state_dir, "--log", log_path,
                              "--report-fd", str(w), "--", *relaunch], pass_fds=(w,), start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
    finally:
        os.close(w)
        os.close(out)
    return p.pid, _read_report(r, log_path)


def _read_report(r: int, log_path: str) -> tuple[bool, str]:
    """The (ok, message) the daemon (or its holder) writes to pipe `r` once the mount is ready or failed;
    if it died without one, the tail of its log says why."""
    chunks = []
    while b := os.read(r, 65536):
        chunks.append(b)
    os.close(r)
    try:
        msg = json.loads(b"".join(chunks))
        return bool(msg["ok"]), str(msg["message"])
    except (ValueError, KeyError, TypeError):
        tail = ""
        try:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-2000:]
        except OSError:
            pass
        return False, f"the daemon exited before the mount was ready\n{tail}"


def _notify_fd(fd: int | None):
    def notify(ok: bool, message: str) -> None:
        nonlocal fd
        if fd is None:
            return
        try:
            os.write(fd, json.dumps({"ok": ok, "message": message}).encode())
        finally:
            os.close(fd)
            fd = None
    return notify


def launch(args, open_image: Callable[[], tuple[bytes, Any, dict]], *, report: Callable[[Any], str],
           caches: CacheBuilder = DIRECT_CACHES, detach: bool = False, error_prefix: str = "mount daemon",
           quick_exit: bool = False, relaunch: list[str] | None = None) -> int:
    """Mount an image with the options of `add_mount_options` in `args` (`args.mountpoint` too) and
    serve it until it is unmounted; returns the exit status (see the module's docstring).

    `open_image()` -> (raw bootstrap, blob backend, description shown by stats) runs in the daemon;
    the description gets "cache_dir" unless it has one. `report(daemon)` is the line that says the
    mount is ready. With `detach` the launching process returns once the daemon has reported, or
    with `quick_exit` leaves at once by `os._exit` (no interpreter teardown on a start's path)."""
    from .daemon import MountConfig, MountDaemon
    from .mounttab import state_paths
    from .storage.backend.mirror import parse_mirrors

    for name in ("mountpoint", "cache_dir", "run_dir", "pid_file", "cache_limit_root"):
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    args.mirrors = parse_mirrors(getattr(args, "mirror", None))     # MirrorConfigs for open_image's backend
    if getattr(args, "metrics_address", None):
        from .prometheus import check_address_free
        check_address_free(args.metrics_address)  # a typo or a taken port fails here, before anything is mounted
    if getattr(args, "cache_max_size", None):
        from .storage.cache.evict import parse_size
        parse_size(args.cache_max_size)           # likewise a bad size
    notify = None
    held = held_fd()
    if held is not None:                          # a daemon under a holder: serve its fd, here
        detach = False
        notify = _notify_fd(held[2])
        for k in ("PYNYDUS_NOTIFY_FD", "PYNYDUS_FUSE_ADOPT", "PYNYDUS_FUSE_FD"):
            os.environ.pop(k, None)
    elif detach and relaunch and holder_wanted(args):
        paths = state_paths(args.mountpoint, args.run_dir)
        pid, (ok, message) = spawn_holder(paths.dir, paths.log, relaunch)
        print(message, flush=True)
        if quick_exit:
            sys.stderr.flush()
            os._exit(0 if ok else 1)
        return 0 if ok else 1
    if detach:
        pid, result = spawn_daemon(state_paths(args.mountpoint, args.run_dir).log)
        if pid is not None:                       # the launching process: report and leave
            ok, message = result
            print(message, flush=True)
            if quick_exit:
                sys.stderr.flush()
                os._exit(0 if ok else 1)
            return 0 if ok else 1
        notify = result
    try:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)    # unless the entry point has set it up
        from .storage.factory import CacheConfig
        raw, backend, desc = open_image()
        manager = caches.build(backend, CacheConfig(dir=args.cache_dir, **MOUNT_CACHE_OPTIONS,
                                                    max_size=getattr(args, "cache_max_size", 0) or 0,
                                                    budget_root=getattr(args, "cache_limit_root", None) or ""),
                               args)
        desc = {**desc}
        desc.setdefault("cache_dir", args.cache_dir)
        try:
            daemon = MountDaemon(raw, manager, MountConfig(
                mountpoint=args.mountpoint, mode=args.mode, prefetch_all=args.prefetch_all,
                run_dir=args.run_dir, pid_file=args.pid_file, description=desc,
                fuse_fd=held[0] if held else None, adopt=bool(held and held[1]),
                learner=_learner(args, raw, desc), learn_window=getattr(args, "learn_window", 30.0)))
        except BaseException:
            manager.close()
            raise
        daemon.start()
        metrics = _serve_metrics(daemon, args.metrics_address) if getattr(args, "metrics_address", None) else None
    except BaseException as e:
        if notify:
            notify(False, f"{error_prefix}: error: {e}")
        raise
    message = report(daemon)
    print(message, flush=True)
    if notify:
        try:
            notify(True, message)
        except OSError:  # the launching process is gone (killed): serve anyway; a healthy mount is adopted
            print("the launching process is gone; serving anyway", flush=True)
    try:
        why = daemon.run()
    finally:
        if metrics is not None:
            metrics.close()
    print(f"unmounted {daemon.mountpoint}: {why}", flush=True)
    return 0


def _learner(args, raw: bytes, desc: dict):
    """The mount's learned prefetch (rafs.learned): records on this node in <cache dir>/learned, and
    next to the image when it came from a registry or an OCI layout."""
    from .learned import Learner, LocalRecords, image_records, record_key
    mode = getattr(args, "learn", "auto")
    if mode == "off":
        return None
    ref = desc.get("ref") or ""
    remote = None
    if ref and not os.path.exists(ref):           # not a local bootstrap or blob file
        remote = image_records(ref, plain_http=getattr(args, "plain_http", False),
                               hosts_dir=getattr(args, "hosts_dir", None) or None,
                               config_dir=getattr(args, "docker_config", None))
    return Learner(mode, record_key(raw), LocalRecords(os.path.join(args.cache_dir, "learned")), remote)


def _serve_metrics(daemon, address: str):
    """Prometheus /metrics of `daemon` on `address` (rafs.prometheus); its URL goes into the daemon's
    description (stats). A failure stops the daemon: the mount was asked for with its metrics."""
    try:
        from .prometheus import MountCollector, serve_metrics
        server = serve_metrics(address, MountCollector(lambda: [daemon.stats()]))
    except BaseException:
        daemon.stop()
        raise
    daemon.cfg.description["metrics"] = server.url
    logging.getLogger(__name__).info("serving Prometheus metrics at %s", server.url)
    return server


def spawn_daemon(log_path: str) -> tuple[int | None, object]:
    """Fork a detached daemon. Call before any thread exists.

    In the child: returns (None, notify); the child calls notify(ok, message)
    once the mount is ready (or failed). Its stdio goes to `log_path`.
    In the parent: returns (child pid, (ok, message)) after the child
    notified, or (pid, (False, reason)) if it died first.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(null)
        os.close(out)
        os.chdir("/")

        def notify(ok: bool, message: str) -> None:
            nonlocal w
            if w < 0:
                return
            try:
                os.write(w, json.dumps({"ok": ok, "message": message}).encode())
            finally:
                os.close(w)
                w = -1
        return None, notify
    os.close(w)
    ok, message = _read_report(r, log_path)
    if not ok:
        try:
            os.waitpid(pid, os.WNOHANG)         # reap it if it is gone already
        except ChildProcessError:
            pass
    return pid, (ok, message)
