"""The test bed: real processes and images for the tests, the benchmarks and the README's demo.

* `testbed.process` -- run a command, spawn / stop a process (by pid, never by name), free ports.
* `testbed.registry` -- a real docker-registry on 127.0.0.1 (access log parsed), push / skopeo copy.
* `testbed.containerd` -- a private containerd and our snapshotter as processes.
* `testbed.netns` -- a small private network of namespaces (`NetLab`), for multi-node runs.
* `testbed.p2pcluster` -- P2P nodes (mount daemons with a peer port), in a NetLab or on the host.
* `testbed.images` -- the image factory: OCI layouts from a declarative spec.
* `testbed.sample` -- the built-in sample image (busybox + this machine's Python stdlib, zoneinfo, Perl).
* `testbed.demo` -- the README's main job: `python3 -m testbed.demo`.

Tests and benchmarks import this package; it imports neither of them (only the product: rafs,
converter, snapshotter, p2p). Import the submodule you need; this package imports nothing eagerly.
"""
