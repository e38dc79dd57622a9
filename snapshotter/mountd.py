"""Start one RAFS mount daemon (``rafs.daemon.MountDaemon``) for the snapshotter.

    python -m snapshotter.mountd --bootstrap ROOT/snapshots/7/fs/image/image.boot \\
        --ref 127.0.0.1:5000/app:v1 --mountpoint ROOT/rafs/<key>/mnt --cache-dir CACHE \\
        --run-dir ROOT/rafs/run --pid-file ROOT/rafs/<key>/daemon.pid [--mode auto] [--plain-http]

Unlike ``nydusify mount REF``, the bootstrap comes from the file containerd
unpacked (the bootstrap layer's snapshot), so starting a mount costs no
registry request; only the blobs are read from the registry, chunk by chunk.
The process forks a detached daemon (own session: it outlives the
snapshotter) and exits 0 once the mount is usable, printing one line (mode,
pid), or 1 with the reason.

Start time is on a container's (or, with ``mount_at = "pull"``, the pull's)
path, so this module imports only what the daemon needs: the P2P package
(~30 ms of imports) only when a ``--p2p-*`` option asks for it, and the
launching process leaves with ``os._exit`` once it has reported (interpreter
teardown is ~20 ms of nothing useful).

    python -m snapshotter.mountd --standby [--root ROOT] [--p2p] [--probe-erofs]

starts a *standby* launcher: it imports everything a start needs (~150 ms of
interpreter start and imports), prints ``ready``, then blocks reading one JSON
line on stdin: the argument list of one start above, which it then performs
exactly as a fresh launcher would. EOF instead (the snapshotter is gone) ends
it. The snapshotter keeps one ready (lazy.py, standby.py), so a mount's start
costs only the daemon's own work. The daemon it forks keeps the standby's
command line, where ``--root`` names the snapshotter it belongs to.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parser(p2p: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m snapshotter.mountd")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--ref", required=True, help="HOST/REPO[:TAG|@DIGEST] the blobs are read from")
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--pid-file", required=True)
    p.add_argument("--mode", default="auto", choices=["auto", "fuse", "erofs"])
    p.add_argument("--plain-http", action="store_true")
    p.add_argument("--prefetch-all", action="store_true")
    p.add_argument("--docker-config", default=None, help="dir holding config.json (registry credentials)")
    p.add_argument("--description", default="{}", help="JSON shown by the daemon's stats API")
    if p2p:
        from p2p.cli import add_mount_options
        add_mount_options(p)
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    # the P2P options (and the p2p package behind them) only when asked for, or for --help
    p2p = any(a.startswith("--p2p") or a in ("-h", "--help") for a in argv)
    return _parser(p2p).parse_args(argv)


def standby(opts: list[str]) -> int:
    """Import what a start needs, say ``ready``, then do the one start asked for on stdin (see above)."""
    import logging  # noqa: F401
    import converter.refs  # noqa: F401
    import rafs.api  # noqa: F401
    import rafs.blobfs  # noqa: F401
    import rafs.daemon  # noqa: F401
    import rafs.fuse  # noqa: F401
    import rafs.storage.factory  # noqa: F401
    if "--p2p" in opts:
        import p2p.cli  # noqa: F401
    if "--probe-erofs" in opts:
        # the daemon forked from here asks the same kernel: keep a "yes" (a mount that fails anyway still
        # falls back to fuse in auto mode); a "no" is asked again at the start (erofs may be loaded by then)
        from rafs.kmount import erofs_file_backed_supported
        if not erofs_file_backed_supported():
            erofs_file_backed_supported.cache_clear()
    print("ready", flush=True)
    request = sys.stdin.readline()
    if not request.strip():
        return 0
    return main(json.loads(request))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--standby"]:
        return standby(argv[1:])
    args = _parse(argv)
    from rafs.daemon import MountConfig, MountDaemon, spawn_daemon, state_paths

    with open(args.bootstrap, "rb") as f:        # read before forking: errors reach the caller
        raw = f.read()
    paths = state_paths(args.mountpoint, args.run_dir)
    pid, result = spawn_daemon(paths.log)
    if pid is not None:                          # the launcher: report and leave
        ok, message = result
        print(message, flush=True)
        sys.stderr.flush()
        os._exit(0 if ok else 1)
    notify = result
    try:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from converter.refs import parse_ref
        from rafs.daemon import MOUNT_CACHE_OPTIONS
        from rafs.storage.factory import BackendConfig, CacheConfig, build_backend, build_cache_manager
        ref = parse_ref(args.ref)
        host, repo = ref.host, ref.repo
        if host in ("docker.io", "index.docker.io"):
            host = "registry-1.docker.io"
            repo = repo if "/" in repo else "library/" + repo
        backend = build_backend(BackendConfig(kind="registry", host=host, repo=repo, plain_http=args.plain_http,
                                              docker_config_dir=args.docker_config))
        os.makedirs(args.cache_dir, mode=0o700, exist_ok=True)
        cache_cfg = CacheConfig(dir=args.cache_dir, **MOUNT_CACHE_OPTIONS)
        if hasattr(args, "p2p_listen"):
            from p2p.cli import mount_caches
            caches = mount_caches(backend, cache_cfg, args)
        else:
            caches = build_cache_manager(cache_cfg, backend)
        desc = {"ref": args.ref, "backend": backend.name, "cache_dir": os.path.abspath(args.cache_dir),
                "bootstrap": os.path.abspath(args.bootstrap), **json.loads(args.description)}
        try:
            daemon = MountDaemon(raw, caches, MountConfig(mountpoint=args.mountpoint, mode=args.mode,
                                                          prefetch_all=args.prefetch_all, run_dir=args.run_dir,
                                                          pid_file=args.pid_file, description=desc))
        except BaseException:
            caches.close()
            raise
        mode = daemon.start()
    except BaseException as e:
        notify(False, f"mount daemon: error: {e}")
        raise
    message = json.dumps({"mode": mode, "reason": daemon.mode_reason, "pid": os.getpid(),
                          "mountpoint": daemon.mountpoint, "api": paths.api_sock})
    print(message, flush=True)
    try:
        notify(True, message)
    except OSError:      # the launcher is gone (killed): serve anyway; the snapshotter adopts a healthy mount
        print("the launching process is gone; serving anyway", flush=True)
    why = daemon.run()
    print(f"unmounted {daemon.mountpoint}: {why}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
