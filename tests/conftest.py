"""Shared pytest fixtures.  Add yours below; keep each fixture's cleanup in a finally/yield."""

from __future__ import annotations

import pytest

from testbed.registry import Registry, run_registry


@pytest.fixture
def registry(tmp_path_factory) -> Registry:
    """A fresh real docker-registry on 127.0.0.1 for one test (free to stop/restart it)."""
    with run_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_session(tmp_path_factory) -> Registry:
    """One real docker-registry shared by the session: use unique repository names per test."""
    with run_registry(tmp_path_factory.mktemp("registry-session")) as reg:
        yield reg
