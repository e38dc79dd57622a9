"""Start one RAFS mount daemon (``rafs.daemon.MountDaemon``) for the snapshotter.

    python -m snapshotter.mountd --bootstrap ROOT/snapshots/7/fs/image/image.boot \\
        --ref 127.0.0.1:5000/app:v1 --mountpoint ROOT/rafs/<key>/mnt --cache-dir CACHE \\
        --run-dir ROOT/rafs/run --pid-file ROOT/rafs/<key>/daemon.pid [--mode auto] [--plain-http] \\
        [--mirror '{"host": "http://127.0.0.1:65001", ...}' ...]

Unlike ``nydusify mount REF``, the bootstrap comes from the file containerd
unpacked (the bootstrap layer's snapshot), so starting a mount costs no
registry request; only the blobs are read from the registry, chunk by chunk.
The process forks a detached daemon (own session: it outlives the
snapshotter) and exits 0 once the mount is usable, printing one line (mode,
pid), or 1 with the reason.

The daemon is launched as every mount daemon is, by ``rafs.launcher``: this
module adds its image (the bootstrap file, the blobs from ``--ref``'s
registry), its cache builder (P2P's with ``--p2p-*`` options) and its report.

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


def _caches(p2p: bool):
    """The daemon's cache builder: P2P's (and the p2p package behind it) only when asked for."""
    if p2p:
        from p2p.cli import MOUNT_CACHES
        return MOUNT_CACHES
    from rafs.launcher import DIRECT_CACHES
    return DIRECT_CACHES


def build_parser(p2p: bool = True) -> argparse.ArgumentParser:
    from rafs.launcher import add_mount_options
    p = argparse.ArgumentParser(prog="python -m snapshotter.mountd")
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--ref", required=True, help="HOST/REPO[:TAG|@DIGEST] the blobs are read from")
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--plain-http", action="store_true")
    p.add_argument("--docker-config", default=None, help="dir holding config.json (registry credentials)")
    p.add_argument("--hosts-dir", default=None,
                   help="containerd's registry hosts directory (HOST[:PORT]/hosts.toml); default none")
    p.add_argument("--description", default="{}", help="JSON shown by the daemon's stats API")
    add_mount_options(p, caches=_caches(p2p), require_state=True)
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    # the P2P options (and the p2p package behind them) only when asked for, or for --help
    p2p = any(a.startswith("--p2p") or a in ("-h", "--help") for a in argv)
    return build_parser(p2p).parse_args(argv)


def standby(opts: list[str]) -> int:
    """Import what a start needs, say ``ready``, then do the one start asked for on stdin (see above)."""
    import logging  # noqa: F401
    import rafs.api  # noqa: F401
    import rafs.blobfs  # noqa: F401
    import rafs.daemon  # noqa: F401
    import rafs.fuse  # noqa: F401
    import rafs.image.refs  # noqa: F401
    import rafs.launcher  # noqa: F401
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


def _open_image(args, raw: bytes):
    """(raw bootstrap, blob backend, description) for `rafs.launcher.launch`: the bootstrap was read
    already; the blobs are read from the registry of --ref."""
    from rafs.image.refs import parse_ref
    from rafs.storage.factory import BackendConfig, build_backend
    host, repo = parse_ref(args.ref).endpoint
    backend = build_backend(BackendConfig(kind="registry", host=host, repo=repo, plain_http=args.plain_http,
                                          docker_config_dir=args.docker_config, mirrors=args.mirrors,
                                          hosts_dir=args.hosts_dir or None))
    os.makedirs(args.cache_dir, mode=0o700, exist_ok=True)
    return raw, backend, {"ref": args.ref, "backend": backend.name, "cache_dir": args.cache_dir,
                          "bootstrap": args.bootstrap, **json.loads(args.description)}


def _report(daemon) -> str:
    """The one line the snapshotter reads (lazy.py)."""
    return json.dumps({"mode": daemon.mode, "reason": daemon.mode_reason, "pid": os.getpid(),
                       "mountpoint": daemon.mountpoint, "api": daemon.paths.api_sock})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--standby"]:
        return standby(argv[1:])
    args = _parse(argv)
    from rafs.launcher import launch

    args.bootstrap = os.path.abspath(args.bootstrap)
    with open(args.bootstrap, "rb") as f:        # read before forking: errors reach the caller
        raw = f.read()
    return launch(args, lambda: _open_image(args, raw), caches=_caches(hasattr(args, "p2p_listen")),
                  report=_report, detach=True, quick_exit=True, error_prefix="mount daemon",
                  relaunch=[sys.executable, "-m", "snapshotter.mountd", *argv])


if __name__ == "__main__":
    sys.exit(main())
