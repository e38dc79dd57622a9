"""Fixtures and helpers for the converter's end-to-end tests (issue #2).

Real components only: images are built by tests/helpers/images.py, applied by
`umoci unpack` (the independent oracle), converted by the `nydusify` CLI in a
subprocess, and read back by the kernel (file-backed EROFS mount of the
export), erofs-utils and our own Python reader (Bootstrap + blob readers).

Expensive things (source images, the umoci tree, conversions) are built once
per session; every mount is undone by the fixture that made it, even when the
test fails.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from converter.nydus_image import load_from_store
from rafs.image.store import open_store
from rafs.kmount import erofs_file_backed_supported, mount_erofs, umount
from tests.helpers import images as im
from tests.helpers import trees as tr

REPO = Path(__file__).resolve().parents[2]
KiB, MiB = 1 << 10, 1 << 20
AWKWARD_CHUNK = 64 * KiB        # the awkward image's repeated content is cut at this size

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (umoci unpack, mount)")
needs_umoci = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed")


# --------------------------------------------------------------------------- the CLI

def nydusify(*args, check: bool | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `nydusify ARGS` (python -m converter.cli) and return the finished process.

    check=True asserts exit 0, check=False asserts a non-zero exit; None asserts nothing.
    Failures show the command's stdout and stderr.
    """
    cmd = [sys.executable, "-m", "converter.cli", *map(str, args)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, errors="replace",
                       timeout=timeout, stdin=subprocess.DEVNULL)
    where = f"nydusify {' '.join(map(str, args))}: rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    if check is True:
        assert r.returncode == 0, where
    elif check is False:
        assert r.returncode != 0, "expected a failure\n" + where
    return r


def run(*args, ok: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, errors="replace", **kw)
    if ok:
        assert r.returncode == 0, f"{args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


# --------------------------------------------------------------------------- OCI layout peeking

def layout_tags(layout: str | os.PathLike) -> list[str]:
    """Tags an OCI layout's index.json publishes ([] if there is no index.json)."""
    import json
    p = Path(layout) / "index.json"
    if not p.exists():
        return []
    idx = json.loads(p.read_text())
    return [m.get("annotations", {}).get(im.REF_NAME) for m in idx.get("manifests", [])
            if m.get("annotations", {}).get(im.REF_NAME)]


def blob_path(layout: str | os.PathLike, digest: str) -> Path:
    return Path(layout) / "blobs" / "sha256" / digest.split(":", 1)[1]


def replace_layer_blob(image: im.ImageInfo, index: int, data: bytes) -> str:
    """Store `data` as layer `index`'s blob of single-manifest `image` and re-point its manifest
    and tag at it (the diff_id stays); returns the new layer digest."""
    import json
    layout = image.layout
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob_path(layout, digest).write_bytes(data)
    manifest = json.loads(blob_path(layout, image.manifest.digest).read_bytes())
    manifest["layers"][index].update(digest=digest, size=len(data))
    raw = json.dumps(manifest).encode()
    mdigest = "sha256:" + hashlib.sha256(raw).hexdigest()
    blob_path(layout, mdigest).write_bytes(raw)
    idx = json.loads((layout / "index.json").read_text())
    for m in idx["manifests"]:
        if m.get("annotations", {}).get(im.REF_NAME) == image.tag:
            m["digest"], m["size"] = mdigest, len(raw)
    (layout / "index.json").write_text(json.dumps(idx))
    return digest


def oci_path(ref: str) -> Path:
    """oci:DIR[:TAG] -> DIR."""
    rest = ref[len("oci:"):]
    head, _, tail = rest.rpartition(":")
    return Path(head if head and "/" not in tail else rest)


# --------------------------------------------------------------------------- the Python reader

def reader_tree(ref: str, *, platform: str | None = None, plain_http: bool = False) -> tr.Tree:
    """Snapshot of a converted image as our Python reader sees it (same shape as trees.snapshot_tree).

    Walks the bootstrap's EROFS tree and reads every regular file through the
    verifying blob readers (file extents -> uncompressed blob ranges), so file
    contents come from the blobs, not from any metadata.
    """
    with open_store(ref, plain_http=plain_http) as store:
        image = load_from_store(store, platform)
        boot = image.bootstrap
        readers = [image.blob_reader(i) for i in range(len(boot.meta.blobs))]
        out: tr.Tree = {}
        by_nid: dict[int, list[bytes]] = {}
        for path, nid in boot.erofs.walk():
            info = boot.getattr(nid)
            rel = tr.ROOT if path == b"/" else path[1:]
            kind = tr._TYPE_OF[stat.S_IFMT(info.mode)]
            size = sha = target = rdev = None
            if kind == "file":
                h = hashlib.sha256()
                for ext in boot.file_extents(nid, 0, info.size):
                    if ext.blob_index < 0:
                        h.update(bytes(ext.length))
                    else:
                        h.update(readers[ext.blob_index].read_range(ext.blob_offset, ext.length))
                size, sha = info.size, h.hexdigest()
            elif kind == "symlink":
                target = boot.readlink(nid)
                size = len(target)
            elif kind in ("char", "block"):
                rdev = (os.major(info.rdev), os.minor(info.rdev))
            if kind != "dir":
                by_nid.setdefault(nid, []).append(rel)
            out[rel] = tr.EntryInfo(kind, info.mode, info.uid, info.gid,
                                    info.mtime * 10**9 + info.mtime_nsec, size, sha, target,
                                    boot.xattrs(nid), rdev)
        for paths in by_nid.values():
            if len(paths) > 1:
                group = tuple(sorted(paths))
                for p in paths:
                    out[p] = dataclasses.replace(out[p], links=group)
        return out


def exported_devices(out_dir: str | os.PathLike) -> list[str]:
    dev_dir = Path(out_dir) / "devices"
    return [str(dev_dir / n) for n in sorted(os.listdir(dev_dir), key=int)] if dev_dir.exists() else []


# --------------------------------------------------------------------------- fixtures: images

@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("convert-it")
    yield d
    im.remove_tree(d)


@pytest.fixture(scope="session")
def awkward_source(workdir):
    """awkward_source(chunk) -> (image, umoci tree): the awkward image (3 gzip layers, every
    file type and merge rule; file sizes and repeats around `chunk`) and what `umoci unpack`
    (the independent oracle) makes of it. Built once per chunk size."""
    if os.geteuid() != 0 or shutil.which("umoci") is None:
        pytest.skip("needs root and umoci")
    cache: dict[int, tuple[im.ImageInfo, tr.Tree]] = {}

    def get(chunk: int) -> tuple[im.ImageInfo, tr.Tree]:
        if chunk not in cache:
            image = im.build_awkward_layout(workdir / f"awkward-{chunk}", chunk_size=chunk)
            rootfs = tr.umoci_unpack(image.layout, image.tag, workdir / f"awkward-{chunk}-bundle")
            cache[chunk] = image, tr.snapshot_tree(rootfs)
        return cache[chunk]
    return get


@pytest.fixture(scope="session")
def awkward_image(awkward_source) -> im.ImageInfo:
    """The awkward image for 64 KiB chunks, tag `awkward`."""
    return awkward_source(AWKWARD_CHUNK)[0]


@pytest.fixture(scope="session")
def awkward_tree(awkward_source) -> tr.Tree:
    """`umoci unpack` of awkward_image, snapshotted."""
    return awkward_source(AWKWARD_CHUNK)[1]


@pytest.fixture(scope="session")
def busybox_image(workdir) -> im.ImageInfo:
    if not os.path.isfile("/bin/busybox"):
        pytest.skip("busybox-static not installed")
    return im.build_busybox_layout(workdir / "busybox")


# --------------------------------------------------------------------------- fixtures: conversions

@dataclass
class Converted:
    source: im.ImageInfo
    ref: str                  # oci:DIR:TAG of the converted image
    layout: Path
    stdout: str

    def export(self, out_dir: Path) -> tuple[Path, list[str]]:
        """`nydusify export` once into out_dir; returns (image.boot, devices)."""
        if not (out_dir / "image.boot").exists():
            nydusify("export", self.ref, out_dir, check=True)
        return out_dir / "image.boot", exported_devices(out_dir)


@pytest.fixture(scope="session")
def convert_once(workdir):
    """convert_once(source_image, *cli_args) -> Converted; each distinct conversion runs once a session."""
    cache: dict[tuple, Converted] = {}

    def convert(source: im.ImageInfo, *args) -> Converted:
        key = (source.ref, *map(str, args))
        if key not in cache:
            layout = workdir / f"nydus-{len(cache)}"
            ref = f"oci:{layout}:nydus"
            r = nydusify("convert", "--source", source.ref, "--target", ref, *args, check=True)
            cache[key] = Converted(source, ref, layout, r.stdout)
        return cache[key]
    return convert


# --------------------------------------------------------------------------- fixtures: mounts

@pytest.fixture
def kernel_mount(tmp_path):
    """kernel_mount(image.boot, devices) -> mountpoint (file-backed EROFS); unmounted after the test, even on failure."""
    if os.geteuid() != 0 or not erofs_file_backed_supported():
        pytest.skip("needs root and a kernel with file-backed EROFS mounts (Linux >= 6.12)")
    done: list[Path] = []

    def mount(image, devices) -> Path:
        mnt = tmp_path / f"mnt{len(done)}"
        mnt.mkdir()
        mount_erofs(image, devices, mnt)
        done.append(mnt)
        return mnt
    yield mount
    errors = []
    for mnt in reversed(done):
        try:
            umount(mnt)
        except OSError:
            try:
                umount(mnt, lazy=True)
            except OSError as e:
                errors.append(e)
    assert not errors, errors


# --------------------------------------------------------------------------- containerd's own unpack

class ContainerdUnpackError(RuntimeError):
    """containerd refused to unpack the image (its message in str())."""


@pytest.fixture(scope="session")
def containerd_unpack(tmp_path_factory, registry_session):
    """containerd_unpack(image) -> the tree a container of `image` sees after containerd's unpack.

    The reference the converter follows: the image is pushed to the session registry, pulled
    by a private containerd 1.6 (overlayfs snapshotter, which applies every layer into its own
    upper dir), mounted with `ctr images mount` and snapshotted; every mount and the image are
    removed again, even on failure. Raises ContainerdUnpackError when containerd refuses the
    image. Directories containerd creates or changes get the current time as mtime.
    """
    if os.geteuid() != 0 or shutil.which("ctr") is None or not os.path.exists("/usr/bin/containerd"):
        pytest.skip("needs root and containerd (bash .ci/setup)")
    from testbed.containerd import run_containerd, unmount_under
    from testbed.registry import skopeo_copy
    work = tmp_path_factory.mktemp("ctd-unpack")
    with run_containerd(work / "ctd") as ctd:
        seen: dict[str, tr.Tree] = {}

        def unpack(image: im.ImageInfo) -> tr.Tree:
            if image.ref in seen:
                return seen[image.ref]
            n = len(seen)
            ref = f"{registry_session.host}/unpack/{image.tag.lower()}-{n}:v1"
            skopeo_copy(image.ref, f"docker://{ref}")
            r = ctd.ctr("images", "pull", "--plain-http", ref, check=False, timeout=120)
            if r.returncode != 0:
                ctd.ctr("images", "rm", ref, check=False)
                raise ContainerdUnpackError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.stdout)
            mnt = work / f"mnt{n}"
            mnt.mkdir()
            try:
                ctd.ctr("images", "mount", ref, mnt)
                seen[image.ref] = tr.snapshot_tree(mnt)
            finally:
                ctd.ctr("images", "unmount", mnt, check=False)
                unmount_under(mnt)
                ctd.ctr("images", "rm", ref, check=False)
            return seen[image.ref]
        yield unpack
