"""Shared test helpers (the processes tests and benchmarks both start are in `testbed`).

* ``tests.helpers.images`` -- test images: testbed's image factory plus ready-made specs.
* ``tests.helpers.trees`` -- tree oracle.
* ``tests.helpers.mounts`` -- lazy mounts for tests; ``tests.helpers.nginx`` -- a pull-through cache;
  ``tests.helpers.nydus_rules`` -- Nydus's format rules; ``tests.helpers.cri`` -- CRI calls.

Import the submodule you need; this package imports nothing eagerly.
"""
