"""containerd proxy snapshotter (Snapshots gRPC service on a unix socket) serving RAFS images lazily.

Not built yet: see the containerd snapshotter issue.
"""
