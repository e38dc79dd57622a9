"""The snapshotter's own configuration (TOML), parsed here and only here.

    # /etc/nydus-snapshotter/config.toml  (every key optional)
    root = "/var/lib/nydus-snapshotter"
    address = "/run/nydus-snapshotter/snapshotter.sock"
    log_level = "info"                    # debug logs every RPC

    [daemon]
    mode = "auto"                         # auto | fuse | erofs  (auto: erofs when the kernel can)
    cache_dir = ""                        # default ROOT/cache; shared by every image (chunks dedup by blob)
    prefetch = false                      # fetch whole blobs in the background after mounting
    learn = "auto"                        # learned prefetch for images without a prefetch list: auto = prefetch
                                          # what earlier starts read and publish this start's reads (next to the
                                          # image in its registry, and in the cache dir); use = never publish; off
    learn_window = 30.0                   # seconds from a mount's first read that count as the start
    startup_timeout = 30.0                # seconds for a mount daemon to come up
    restart = true                        # watch mount daemons; restart a dead one and repair its mount
    run_dir = ""                          # daemon state + API sockets (default /run/nydus-snapshotter/<hash>)
    fallback = true                       # if an image cannot be mounted lazily, pull it in full instead
    command = []                          # mount daemon launcher; default [python, -m, snapshotter.mountd]
    mount_at = "pull"                     # pull: start an image's mount daemon when its bootstrap layer is
                                          # unpacked (in the background); run: when its first container starts
    standby = true                        # keep one pre-imported launcher ready (a start then skips ~0.15 s of
                                          # Python start + imports); only with the default command

    [backend]
    plain_http = []                       # registries spoken to over http ("127.0.0.1:5000"); true = all
    docker_config = ""                    # credentials file (default ~/.docker/config.json)
    hosts_dir = "/etc/containerd/certs.d" # containerd's registry hosts directory (HOST[:PORT]/hosts.toml:
                                          # server, ca, client, skip_verify, [host."…"] mirrors); "" = none

    [[backend.mirrors]]                   # none by default; repeatable, tried in order before the registry, by
    host = "http://127.0.0.1:65001"       # mount daemons and the full-pull fallback; nydusd's mirror keys
                                          # (rafs/storage/backend/mirror.py): a Dragonfly dfdaemon, nginx ...
    headers = { "X-Dragonfly-Registry" = "https://registry.example.com" }    # sent to the mirror only
    auth_through = false                  # true: the mirror authenticates itself (its own docker credentials)
    ping_url = ""                         # health check of a disabled mirror (default HOST/v2/)
    health_check_interval = 5             # seconds
    failure_limit = 5                     # failures in a row that disable it until the health check passes
    registries = []                       # only for images of these registries ("docker.io"); [] = all

    [p2p]                                 # share verified chunks with other nodes (README, P2P)
    listen_host = ""                      # e.g. "10.0.0.5": each image's daemon serves on a free port there
    tracker = ""                          # "HOST:PORT" of a `nydus-peer tracker`, or
    peers = []                            # a static list of peer "HOST:PORT"
    upload_rate = 0                       # bytes/s cap per daemon; 0 = none

    [cache]
    max_size = 0                          # disk limit of the whole cache dir ("20G", "512M"; 0 = none): every
                                          # image's blob cache and P2P payload files, one budget for the node;
                                          # past it the least recently used chunks no read is using are evicted
    gc_interval = 60.0                    # seconds between removals of cache dirs that belong to no image

    [metrics]
    address = ""                          # "HOST:PORT": Prometheus metrics of the node (every mount daemon
                                          # + the snapshotter's own) at http://HOST:PORT/metrics

Lazy mounts are per image (one mount daemon per bootstrap snapshot), all sharing
the one blob cache.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields

DEFAULT_ROOT = "/var/lib/nydus-snapshotter"
DEFAULT_ADDRESS = "/run/nydus-snapshotter/snapshotter.sock"
MODES = ("auto", "fuse", "erofs")
MOUNT_AT = ("pull", "run")
LEARN = ("auto", "use", "off")      # rafs.learned.LEARN_MODES (the config module imports no rafs)


@dataclass
class DaemonConfig:
    mode: str = "auto"
    cache_dir: str = ""
    prefetch: bool = False
    learn: str = "auto"            # rafs.learned: auto | use | off
    learn_window: float = 30.0
    startup_timeout: float = 30.0
    restart: bool = True
    run_dir: str = ""              # daemons' state (api sockets); default /run/nydus-snapshotter/<hash of root>
    fallback: bool = True          # a lazy mount that fails: download the blobs and unpack the tree instead
    command: list[str] = field(default_factory=list)   # mount daemon launcher (default: python -m snapshotter.mountd)
    mount_at: str = "pull"         # when a nydus image's mount starts: at pull (bootstrap committed) or first run
    standby: bool = True           # keep an idle, pre-imported mount daemon launcher ready (default command only)


@dataclass
class BackendConfig:
    plain_http: bool | list[str] = field(default_factory=list)
    docker_config: str = ""
    hosts_dir: str = "/etc/containerd/certs.d"              # containerd's hosts directory ("" = none)
    mirrors: list[dict] = field(default_factory=list)      # [[backend.mirrors]] tables

    def mirrors_for(self, host: str) -> list:
        """The `MirrorConfig`s for images of registry `host` (as the image reference writes it), in order."""
        from rafs.storage.backend.mirror import MirrorConfig
        out = []
        for i, table in enumerate(self.mirrors):
            if not isinstance(table, dict):
                raise ValueError(f"backend.mirrors[{i}] must be a table ([[backend.mirrors]])")
            table = dict(table)
            registries = table.pop("registries", [])
            if isinstance(registries, str):
                registries = [registries]
            if not isinstance(registries, list) or not all(isinstance(r, str) for r in registries):
                raise ValueError(f"backend.mirrors[{i}].registries must be a list of \"HOST[:PORT]\"")
            try:
                mirror = MirrorConfig.from_dict(table)
            except ValueError as e:
                raise ValueError(f"backend.mirrors[{i}]: {e}") from None
            if not registries or host in registries:
                out.append(mirror)
        return out

    def mirror_args(self, host: str) -> list[str]:
        """`--mirror` options of a mount daemon for an image of registry `host`."""
        return [a for m in self.mirrors_for(host) for a in ("--mirror", m.to_json())]

    def is_plain_http(self, host: str) -> bool:
        if self.plain_http is True:
            return True
        if isinstance(self.plain_http, list) and host in self.plain_http:
            return True
        # loopback registries are spoken to over plain http, as docker and containerd do
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        return name in ("localhost", "127.0.0.1", "[::1]")


@dataclass
class P2PConfig:
    listen_host: str = ""
    tracker: str = ""
    peers: list[str] = field(default_factory=list)
    upload_rate: float = 0

    def daemon_args(self) -> list[str]:
        """`nydusify mount`-style P2P options for one mount daemon; [] when P2P is off."""
        if not self.listen_host:
            return []
        args = ["--p2p-listen", f"{self.listen_host}:0", "--p2p-advertise", self.listen_host]
        if self.tracker:
            args += ["--p2p-tracker", self.tracker]
        if self.peers:
            args += ["--p2p-peers", ",".join(self.peers)]
        if self.upload_rate:
            args += ["--p2p-upload-rate", str(self.upload_rate)]
        return args


@dataclass
class CacheSection:
    max_size: int | str = 0        # bytes or "20G"; 0 = no limit
    gc_interval: float = 60.0      # seconds between orphan cache GCs

    @property
    def max_bytes(self) -> int:
        from rafs.storage.cache.evict import parse_size
        return parse_size(self.max_size)

    def daemon_args(self, cache_root: str) -> list[str]:
        """A mount daemon's options for the node's one limit: it covers `cache_root` (all images' caches
        and their P2P payload files), shared by every daemon under it (rafs/storage/cache/evict.py)."""
        if not self.max_bytes:
            return []
        return ["--cache-max-size", str(self.max_bytes), "--cache-limit-root", os.path.abspath(cache_root)]


@dataclass
class MetricsConfig:
    address: str = ""              # HOST:PORT of the Prometheus endpoint; "" = none


@dataclass
class Config:
    root: str = DEFAULT_ROOT
    address: str = DEFAULT_ADDRESS
    log_level: str = "info"
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    p2p: P2PConfig = field(default_factory=P2PConfig)
    cache: CacheSection = field(default_factory=CacheSection)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    @property
    def cache_dir(self) -> str:
        return self.daemon.cache_dir or os.path.join(self.root, "cache")


def _apply(obj, table: dict, where: str) -> None:
    names = {f.name: f for f in fields(obj)}
    for k, v in table.items():
        if k not in names:
            raise ValueError(f"{where}: unknown key {k!r} (known: {', '.join(sorted(names))})")
        cur = getattr(obj, k)
        if hasattr(cur, "__dataclass_fields__"):
            if not isinstance(v, dict):
                raise ValueError(f"{where}.{k} must be a table")
            _apply(cur, v, f"{where}.{k}")
        else:
            setattr(obj, k, v)


def load_config(path: str | None = None, **overrides) -> Config:
    cfg = Config()
    if path:
        with open(path, "rb") as f:
            _apply(cfg, tomllib.load(f), os.path.basename(path))
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    if cfg.daemon.mode not in MODES:
        raise ValueError(f"daemon.mode {cfg.daemon.mode!r} is not one of {', '.join(MODES)}")
    if cfg.daemon.mount_at not in MOUNT_AT:
        raise ValueError(f"daemon.mount_at {cfg.daemon.mount_at!r} is not one of {', '.join(MOUNT_AT)}")
    if cfg.daemon.learn not in LEARN:
        raise ValueError(f"daemon.learn {cfg.daemon.learn!r} is not one of {', '.join(LEARN)}")
    if not isinstance(cfg.metrics.address, str):
        raise ValueError(f"metrics.address {cfg.metrics.address!r} is not a \"HOST:PORT\" string")
    if cfg.metrics.address:
        from rafs.prometheus import parse_address
        parse_address(cfg.metrics.address)
    if not isinstance(cfg.daemon.standby, bool):      # "false" (a string) would read as true
        raise ValueError(f"daemon.standby {cfg.daemon.standby!r} is not true or false")
    if not isinstance(cfg.backend.hosts_dir, str):
        raise ValueError(f"backend.hosts_dir {cfg.backend.hosts_dir!r} is not a directory path (\"\" = none)")
    if not isinstance(cfg.backend.mirrors, list):
        raise ValueError("backend.mirrors must be an array of tables ([[backend.mirrors]])")
    cfg.backend.mirrors_for("")                       # every mirror checked now, not at a mount
    try:
        cfg.cache.max_bytes
    except ValueError as e:
        raise ValueError(f"cache.max_size: {e}") from None
    if not isinstance(cfg.cache.gc_interval, (int, float)) or cfg.cache.gc_interval <= 0:
        raise ValueError(f"cache.gc_interval {cfg.cache.gc_interval!r} is not a number of seconds > 0")
    return cfg
