"""gRPC stubs for the containerd and CRI APIs, compiled from the ``.proto`` files beside this module.

The ``.proto`` files here are pynydus's own, with containerd's (and CRI's) package
names and field numbers, so the wire format is containerd's. They are compiled
with grpcio-tools **on first import**, in-process, into a cache directory outside
the source tree (nothing generated is committed):

    $PYNYDUS_PROTO_CACHE or $XDG_CACHE_HOME/pynydus/proto or ~/.cache/pynydus/proto,
    falling back to $TMPDIR/pynydus-proto-<uid>

keyed by a hash of the ``.proto`` sources and the grpcio-tools/protobuf
versions. The compiled tree is built in a temporary directory and renamed into
place, so concurrent first imports (many snapshotter processes at once) are safe.
The cache directory is appended to this package's ``__path__``, so the generated
modules import as ``snapshotter.proto.containerd.services.snapshots.v1.snapshots_pb2``.

    from snapshotter.proto import snapshots_pb2, snapshots_pb2_grpc, mount_pb2
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import tempfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent.parent          # -I root: imports read "snapshotter/proto/..."

# short name -> generated module (relative to this package)
_MODULES = {
    "mount_pb2": "containerd.types.mount_pb2",
    "descriptor_pb2": "containerd.types.descriptor_pb2",
    "snapshots_pb2": "containerd.services.snapshots.v1.snapshots_pb2",
    "snapshots_pb2_grpc": "containerd.services.snapshots.v1.snapshots_pb2_grpc",
    "content_pb2": "containerd.services.content.v1.content_pb2",
    "content_pb2_grpc": "containerd.services.content.v1.content_pb2_grpc",
    "images_pb2": "containerd.services.images.v1.images_pb2",
    "images_pb2_grpc": "containerd.services.images.v1.images_pb2_grpc",
    "leases_pb2": "containerd.services.leases.v1.leases_pb2",
    "leases_pb2_grpc": "containerd.services.leases.v1.leases_pb2_grpc",
    "diff_pb2": "containerd.services.diff.v1.diff_pb2",
    "diff_pb2_grpc": "containerd.services.diff.v1.diff_pb2_grpc",
    "cri_pb2": "cri.runtime.v1.api_pb2",
    "cri_pb2_grpc": "cri.runtime.v1.api_pb2_grpc",
}


def _proto_files() -> list[Path]:
    return sorted(_HERE.rglob("*.proto"))


def _cache_base() -> Path:
    env = os.environ.get("PYNYDUS_PROTO_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "pynydus" / "proto"


def _key() -> str:
    import google.protobuf
    import grpc_tools
    h = hashlib.sha256()
    h.update(getattr(grpc_tools, "__version__", "").encode())
    try:
        from importlib.metadata import version
        h.update(version("grpcio-tools").encode())
    except Exception:
        pass
    h.update(google.protobuf.__version__.encode())
    for p in _proto_files():
        h.update(str(p.relative_to(_HERE)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _compile(out: Path) -> None:
    from grpc_tools import protoc
    try:
        from importlib.resources import files
        well_known = str(files("grpc_tools") / "_proto")
    except Exception:  # pragma: no cover
        import grpc_tools
        well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    sources = [str(p.relative_to(_ROOT)) for p in _proto_files()]
    args = ["grpc_tools.protoc", f"-I{_ROOT}", f"-I{well_known}",
            f"--python_out={out}", f"--grpc_python_out={out}", *sources]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"grpc_tools.protoc failed ({rc}) compiling {', '.join(sources)}")


def _ensure_compiled() -> Path:
    key = _key()
    bases = [_cache_base(), Path(tempfile.gettempdir()) / f"pynydus-proto-{os.getuid()}"]
    last_error: Exception | None = None
    for base in bases:
        final = base / key
        if (final / ".complete").exists():
            return final
        try:
            base.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
        except OSError as e:
            last_error = e
            continue
        try:
            _compile(tmp)
            (tmp / ".complete").write_text("ok\n")
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / ".complete").exists():   # lost a race with a half-built tree: replace it
                    shutil.rmtree(final, ignore_errors=True)
                    os.rename(tmp, final)
            return final
        except OSError as e:
            last_error = e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"cannot compile the gRPC protos into a cache directory: {last_error}")


_generated = _ensure_compiled() / "snapshotter" / "proto"
if str(_generated) not in __path__:
    __path__.append(str(_generated))


def __getattr__(name: str):
    target = _MODULES.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    mod = importlib.import_module(f"{__name__}.{target}")
    globals()[name] = mod
    return mod


__all__ = sorted(_MODULES)
