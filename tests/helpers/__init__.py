"""Shared test helpers.

* ``tests.helpers.registry`` -- a real docker-registry on 127.0.0.1 (``run_registry``,
  ``Registry.access_log``), ``skopeo_copy``, ``make_htpasswd``, ``write_docker_config``.
* ``tests.helpers.images`` -- test-image factory (OCI layouts from a declarative spec).
* ``tests.helpers.trees`` -- tree oracle.

Import the submodule you need; this package imports nothing eagerly.
"""
