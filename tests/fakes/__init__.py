"""Test doubles that inject faults the real components cannot produce on demand.

Tests use real components (a real docker-registry, real files) wherever they
can; a fake here exists only to make a fault happen: `faulty_http` is an HTTP
server answering 500 / resetting / stalling (a broken registry mirror or
proxy), `backends.FaultyBackend` wraps a real backend and fails or corrupts
chosen requests.
"""
