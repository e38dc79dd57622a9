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
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from p2p.cli import add_mount_options as add_p2p_options, mount_caches


def _parser() -> argparse.ArgumentParser:
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
    add_p2p_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rafs.daemon import MountConfig, MountDaemon, spawn_daemon, state_paths

    with open(args.bootstrap, "rb") as f:        # read before forking: errors reach the caller
        raw = f.read()
    paths = state_paths(args.mountpoint, args.run_dir)
    pid, result = spawn_daemon(paths.log)
    if pid is not None:
        ok, message = result
        print(message, flush=True)
        return 0 if ok else 1
    notify = result
    try:
        import logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from converter.refs import parse_ref
        from rafs.daemon import MOUNT_CACHE_OPTIONS
        from rafs.storage.factory import BackendConfig, CacheConfig, build_backend
        ref = parse_ref(args.ref)
        host, repo = ref.host, ref.repo
        if host in ("docker.io", "index.docker.io"):
            host = "registry-1.docker.io"
            repo = repo if "/" in repo else "library/" + repo
        backend = build_backend(BackendConfig(kind="registry", host=host, repo=repo, plain_http=args.plain_http,
                                              docker_config_dir=args.docker_config))
        os.makedirs(args.cache_dir, mode=0o700, exist_ok=True)
        caches = mount_caches(backend, CacheConfig(dir=args.cache_dir, **MOUNT_CACHE_OPTIONS), args)
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
    notify(True, message)
    why = daemon.run()
    print(f"unmounted {daemon.mountpoint}: {why}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
