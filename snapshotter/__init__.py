"""containerd proxy snapshotter (Snapshots gRPC service on a unix socket) serving RAFS images lazily.

    nydus-snapshotter --address SOCK --root DIR [--config FILE]     # cli.py

Modules: ``snapshots`` (the interface and its lifecycle contract, labels),
``core`` (the snapshotter: overlay snapshots + the lazy path), ``metastore``
(SQLite metadata), ``mounts`` (dirs and mounts), ``filters`` (containerd's
filter syntax), ``lazy`` + ``mountd`` (RAFS mount daemons), ``service`` (gRPC
handlers and error mapping), ``client`` (a Snapshots API client), ``rpull``
(lazy pull through containerd's API), ``status``, ``config``, ``errors``, and
``proto`` (containerd/CRI protos, compiled on first import).
"""
