"""`nydus-peer`: the P2P tracker, and a look at a tracker or a peer.

    nydus-peer tracker --listen 0.0.0.0:7000 [--interval 5] [--claim-ttl 30]
    nydus-peer status  --tracker HOST:PORT [BLOB_ID]     # tracker stats, or who holds a blob
    nydus-peer status  --peer HOST:PORT                  # what a node shares
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

import requests

from rafs.launcher import CacheBuilder

from .protocol import API_PREFIX, normalize_addr
from .service import P2PConfig
from .tracker import DEFAULT_CLAIM_TTL, DEFAULT_INTERVAL, TrackerServer, TrackerState


# --------------------------------------------------------------------------- for daemons

def add_mount_options(parser) -> None:
    """The P2P options of a mount daemon (`nydusify mount ... --p2p-listen ...`, the snapshotter's
    `python -m snapshotter.mountd`: `snapshotter.config.P2PConfig.daemon_args` writes them)."""
    g = parser.add_argument_group("p2p", "share chunks with peers (see README, P2P)")
    g.add_argument("--p2p-listen", metavar="HOST:PORT",
                   help="serve verified chunks to peers on this address")
    g.add_argument("--p2p-advertise", metavar="HOST[:PORT]",
                   help="address peers should dial (default: the --p2p-listen address; a host "
                        "alone takes the listening port, e.g. with --p2p-listen 0.0.0.0:0)")
    g.add_argument("--p2p-tracker", metavar="HOST:PORT", help="tracker (nydus-peer tracker)")
    g.add_argument("--p2p-peers", metavar="LIST",
                   help="comma-separated static peer list HOST:PORT,... (instead of a tracker)")
    g.add_argument("--p2p-upload-rate", metavar="BYTES/S", type=float, default=0,
                   help="cap on bytes/s served to peers (default: no cap)")
    g.add_argument("--p2p-upload-slots", metavar="N", type=int, default=None,
                   help="concurrent uploads to peers (default 8)")
    g.add_argument("--p2p-wait", metavar="SECONDS", type=float, default=None,
                   help="longest wait for a peer that is fetching a chunk (default 10)")


def mount_config(args) -> P2PConfig | None:
    """The P2PConfig of parsed `add_mount_options` arguments; None if P2P is not asked for."""
    if not (args.p2p_listen or args.p2p_tracker or args.p2p_peers):
        return None
    kw = {}
    if args.p2p_upload_slots is not None:
        kw["upload_slots"] = args.p2p_upload_slots
    if args.p2p_wait is not None:
        kw["wait_timeout"] = args.p2p_wait
    return P2PConfig(listen=args.p2p_listen, advertise=args.p2p_advertise,
                     tracker=args.p2p_tracker, peers=args.p2p_peers or [],
                     upload_rate=args.p2p_upload_rate, **kw)


def mount_caches(backend, cache_cfg, args):
    """A mount daemon's blob caches: straight to `backend`, or peers first when `args` asks for P2P."""
    p2p_cfg = mount_config(args)
    if p2p_cfg is None:
        from rafs.storage.factory import build_cache_manager
        return build_cache_manager(cache_cfg, backend)
    from .service import p2p_cache_manager
    return p2p_cache_manager(backend, cache_cfg, p2p_cfg)


# The cache builder of mount daemons that may share with peers (`rafs.launcher`): the P2P options, and
# peers first when they ask for it. `nydusify mount` names it ("p2p.cli:MOUNT_CACHES"): the converter
# does not import p2p.
MOUNT_CACHES = CacheBuilder(build=mount_caches, add_options=add_mount_options)


# --------------------------------------------------------------------------- nydus-peer


def _tracker(args) -> int:
    state = TrackerState(interval=args.interval, claim_ttl=args.claim_ttl)
    server = TrackerServer(args.listen, state)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"nydus-peer tracker listening on {server.url} (epoch {state.epoch})", flush=True)
    try:
        stop.wait()
    finally:
        server.close()
    return 0


def _status(args) -> int:
    s = requests.Session()
    s.trust_env = False
    if args.tracker:
        base = f"http://{normalize_addr(args.tracker)}{API_PREFIX}"
        url = f"{base}/blobs/{args.blob}" if args.blob else f"{base}/stats"
    elif args.peer:
        url = f"http://{normalize_addr(args.peer)}{API_PREFIX}/blobs"
    else:
        print("nydus-peer status: give --tracker or --peer", file=sys.stderr)
        return 2
    try:
        r = s.get(url, timeout=5)
        r.raise_for_status()
    except requests.RequestException as e:
        print(f"nydus-peer status: {url}: {e}", file=sys.stderr)
        return 1
    print(json.dumps(r.json(), indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nydus-peer", description="pynydus P2P chunk distribution")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tracker", help="run the tracker")
    t.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    t.add_argument("--interval", type=float, default=DEFAULT_INTERVAL,
                   help="seconds between the nodes' full announcements (told to nodes)")
    t.add_argument("--claim-ttl", type=float, default=DEFAULT_CLAIM_TTL,
                   help="seconds a 'fetching' claim lives unless the node reports back")
    st = sub.add_parser("status", help="show a tracker's or a peer's state")
    st.add_argument("--tracker")
    st.add_argument("--peer")
    st.add_argument("blob", nargs="?")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "tracker":
            return _tracker(args)
        return _status(args)
    except ValueError as e:
        print(f"nydus-peer: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
