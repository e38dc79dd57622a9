"""A real registry for tests: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1.

The registry itself lives in ``converter.localregistry`` (the README's demo uses
it too); this module re-exports it for tests and adds test-only helpers:
``skopeo_copy`` and ``write_docker_config``.

    with run_registry(tmp_path) as reg:          # or the `registry` / `registry_session` fixtures
        reg.host                                 # "127.0.0.1:PORT"
        n = reg.mark()
        ...
        gets = reg.blob_gets(since=n)            # GET /v2/<repo>/blobs/<digest> entries
        sum(e.bytes for e in gets)               # body bytes the registry served
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Mapping

from converter.localregistry import (REGISTRY_BIN, AccessLogEntry, Registry, free_port,
                                     make_htpasswd, parse_access_log, push_image, run_registry)

__all__ = ["REGISTRY_BIN", "AccessLogEntry", "Registry", "free_port", "make_htpasswd", "parse_access_log",
           "push_image", "run_registry", "skopeo_copy", "write_docker_config"]


def write_docker_config(config_dir: str | os.PathLike, auths: Mapping[str, tuple[str, str]]) -> Path:
    """``config_dir/config.json`` with ``auths[host].auth`` = base64(user:password)."""
    import base64
    d = Path(config_dir)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"auths": {h: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()} for h, (u, p) in auths.items()}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"


def skopeo_copy(src: str, dst: str, *, all_images: bool = False, preserve_digests: bool = True,
                src_creds: str | None = None, dest_creds: str | None = None, authfile: str | None = None,
                extra: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    """``skopeo copy`` with TLS verification off (plain-http loopback registries) and no signature policy."""
    cmd = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false"]
    if all_images:
        cmd.append("--all")
    if preserve_digests:
        cmd.append("--preserve-digests")
    if src_creds:
        cmd += ["--src-creds", src_creds]
    if dest_creds:
        cmd += ["--dest-creds", dest_creds]
    if authfile:
        cmd += ["--authfile", authfile]
    cmd += [*extra, src, dst]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}{r.stdout}")
    return r
