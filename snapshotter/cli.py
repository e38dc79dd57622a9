"""``nydus-snapshotter``: the containerd proxy snapshotter and its client commands.

    nydus-snapshotter [--address SOCK] [--root DIR] [--config FILE] [--log-level L]   # serve
    nydus-snapshotter rpull --address CONTAINERD_SOCK [--namespace NS] [--plain-http] [--hosts-dir DIR]
                            [--mirror SPEC ...] REF
    nydus-snapshotter status [--root DIR | --config FILE] [--json]

Configuration files are parsed here (config.py); the rest of the package takes
typed arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from .config import load_config

log = logging.getLogger("nydus-snapshotter")


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydus-snapshotter",
                                description="containerd proxy snapshotter serving nydus (RAFS) images lazily. "
                                            "Subcommands: rpull, status (see `nydus-snapshotter rpull -h`).")
    p.add_argument("--address", help="unix socket to serve the Snapshots API on")
    p.add_argument("--root", help="state directory (snapshots, metadata, mounts, cache)")
    p.add_argument("--config", help="TOML configuration file")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--no-lazy", action="store_true",
                   help="plain overlay snapshotter: never serve layers lazily")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(argv: list[str]) -> int:
    args = _serve_parser().parse_args(argv)
    cfg = load_config(args.config, root=args.root, address=args.address, log_level=args.log_level)
    _setup_logging(cfg.log_level)
    from .core import NydusSnapshotter
    from .service import serve as grpc_serve
    lazy = None
    if not args.no_lazy:
        from .lazy import RafsMounts
        lazy = RafsMounts(cfg)
    sn = NydusSnapshotter(cfg.root, lazy=lazy, mount_at=cfg.daemon.mount_at)
    metrics = None
    if cfg.metrics.address:                 # the node's Prometheus endpoint (metrics.py)
        from .metrics import serve as serve_metrics
        try:
            metrics = serve_metrics(cfg.metrics.address, sn.store, lazy)
        except BaseException:
            sn.close()
            raise
        log.info("serving Prometheus metrics at %s", metrics.url)
    if lazy is not None:
        lazy.start_standby()         # before recovery, whose re-mounts use it too
    try:
        sn.recover()
    except Exception:
        log.exception("recovering lazy mounts")
    server = grpc_serve(sn, cfg.address)
    write_runtime(cfg, lazy)
    log.info("serving containerd.services.snapshots.v1.Snapshots on %s (root %s, lazy %s)", cfg.address, cfg.root,
             "off" if lazy is None else f"{cfg.daemon.mode} mode, mounts start at {cfg.daemon.mount_at}")
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: stopping (lazy mounts stay up for the next start)", signum)
        stop.set()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if lazy is not None:
        lazy.start_monitor(sn)
    stop.wait()
    if metrics is not None:
        metrics.close()
    server.stop(grace=3).wait()
    if lazy is not None:
        lazy.stop_monitor()
    sn.close()
    if lazy is not None:
        lazy.close()                 # after sn.close(): no start in flight needs the standby any more
    return 0


RUNTIME_FILE = "runtime.json"


def write_runtime(cfg, lazy) -> None:
    """ROOT/runtime.json: where this snapshotter serves and caches (read by `status --root`)."""
    import os

    from rafs.osutil import atomic_write
    data = {"pid": os.getpid(), "address": os.path.abspath(cfg.address), "cache_dir": os.path.abspath(cfg.cache_dir),
            "run_dir": lazy.run_dir if lazy is not None else "", "mode": cfg.daemon.mode if lazy else "off"}
    atomic_write(os.path.join(cfg.root, RUNTIME_FILE), json.dumps(data))


def _status_config(args):
    import os
    cfg = load_config(args.config, root=args.root)
    if not args.config:
        try:
            with open(os.path.join(cfg.root, RUNTIME_FILE)) as f:
                rt = json.load(f)
            cfg.address = rt.get("address") or cfg.address
            cfg.daemon.cache_dir = rt.get("cache_dir") or cfg.daemon.cache_dir
            cfg.daemon.run_dir = rt.get("run_dir") or cfg.daemon.run_dir
        except (OSError, ValueError):
            pass
    return cfg


def rpull(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nydus-snapshotter rpull",
                                description="Pull an image into containerd with the remote-snapshot labels, "
                                            "so a nydus image is served lazily (like `ctr-remote images rpull`).")
    p.add_argument("--address", "-a", default="/run/containerd/containerd.sock", help="containerd's socket")
    p.add_argument("--namespace", "-n", default="default")
    p.add_argument("--snapshotter", default="nydus", help="the proxy plugin's name in containerd's config")
    p.add_argument("--plain-http", action="store_true", help="speak http to the registry")
    p.add_argument("--hosts-dir", default="/etc/containerd/certs.d",
                   help="containerd's registry hosts directory (HOST[:PORT]/hosts.toml), as `ctr --hosts-dir`; "
                        "default /etc/containerd/certs.d; '' reads none")
    p.add_argument("--skip-verify", "-k", action="store_true",
                   help="skip verifying the registry's TLS certificate (and speak HTTP to it if it answers so)")
    p.add_argument("--platform", default=None, help="e.g. linux/amd64 (default: this machine's)")
    p.add_argument("--mirror", action="append", default=[], metavar="SPEC",
                   help="a registry mirror read through first, repeatable: as a mount daemon's --mirror "
                        "(a URL, KEY=VALUE,... with nydusd's mirror keys, or JSON)")
    p.add_argument("ref")
    args = p.parse_args(argv)
    _setup_logging("info")
    from rafs.storage.backend.mirror import parse_mirrors

    from .rpull import rpull as do_rpull
    result = do_rpull(args.address, args.ref, namespace=args.namespace, snapshotter=args.snapshotter,
                      plain_http=args.plain_http, platform=args.platform, hosts_dir=args.hosts_dir or None,
                      insecure=args.skip_verify, mirrors=parse_mirrors(args.mirror))
    print(result.summary())
    return 0


def status(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nydus-snapshotter status",
                                description="Images (lazy / full / failed), lazy mounts, bytes fetched, cache use.")
    p.add_argument("--root", help="the snapshotter's state directory")
    p.add_argument("--config", help="the snapshotter's TOML configuration")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cfg = _status_config(args)
    from .status import collect, render
    st = collect(cfg)
    print(json.dumps(st, indent=2) if args.json else render(st))
    return 0


def upgrade_daemons(argv: list[str]) -> int:
    """Hot upgrade: every running mount daemon is replaced by a freshly started one (the code on disk
    now) on the same FUSE connection, through its holder; nothing is unmounted, readers only pause."""
    p = argparse.ArgumentParser(prog="nydus-snapshotter upgrade-daemons", description=upgrade_daemons.__doc__)
    p.add_argument("--root", help="the snapshotter's state directory")
    p.add_argument("--config", help="the snapshotter's TOML configuration")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each new daemon")
    args = p.parse_args(argv)
    cfg = _status_config(args)
    from rafs.errors import RafsError
    from rafs.mounttab import request_upgrade

    from . import metastore as ms
    from .lazy import RafsMounts
    from .mounts import Layout
    layout = Layout(cfg.root)
    if not layout.db_path.exists():
        print(f"nydus-snapshotter upgrade-daemons: no metadata at {layout.db_path}", file=sys.stderr)
        return 1
    store = ms.MetaStore(layout.db_path, readonly=True)
    try:
        with store.transaction() as tx:
            rows = [r for r in ms.list_rafs_mounts(tx) if r.state == "mounted"]
    finally:
        store.close()
    lazy = RafsMounts(cfg)
    lazy.layout = layout
    failed = 0
    for row in rows:
        try:
            print(request_upgrade(str(lazy.mountpoint(row.key)), timeout=args.timeout, run_dir_override=lazy.run_dir))
        except (RafsError, OSError) as e:
            failed += 1
            print(f"{row.image_ref} ({row.key}): {e}", file=sys.stderr)
    print(f"upgraded {len(rows) - failed} of {len(rows)} mount daemons")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"rpull": rpull, "status": status, "upgrade-daemons": upgrade_daemons}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return serve(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from rafs.errors import RafsError

        from .errors import SnapshotterError
        if isinstance(e, (SnapshotterError, RafsError, ValueError, OSError)):
            print(f"nydus-snapshotter: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
