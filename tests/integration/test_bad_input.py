"""Bad input to `nydusify` (issue #2): a clear error naming the layer or file, a
non-zero exit, and no target tag; or, where containerd's unpack accepts the input
(symlinks leading out of the root, parents that are no directory), a safe conversion
equal to what containerd makes of it.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import requests

from converter.check import check as check_images
from rafs import blob as rblob
from rafs.errors import FormatError, IntegrityError
from tests.helpers import images as im
from tests.helpers import trees as tr

from .conftest import ContainerdUnpackError, blob_path, layout_tags, nydusify, reader_tree, replace_layer_blob

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

MALICIOUS = im.malicious_layers()

# case -> fragments the error message must contain (besides the layer's name)
REJECTED = {
    "dotdot": ["b'../escape'", "escapes the root"],
    "dotdot_nested": ["b'a/../../escape'", "escapes the root"],
    "absolute": ["absolute path", "b'/etc/x'"],
    "hardlink_missing": ["hardlink b'hl'", "b'does/not/exist'", "does not exist"],
    "hardlink_outside": ["b'../../etc/passwd'", "escapes the root"],
    "huge_size_truncated": ["unreadable layer"],
    "truncated_gzip": ["unreadable layer"],
    "corrupt_gzip": ["unreadable layer", "CRC check failed"],
}


@pytest.fixture(scope="module")
def bad_sources(workdir):
    layout = workdir / "malicious"
    return {name: im.build_oci_layout(layout, name, layers) for name, layers in MALICIOUS.items()}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_bad_layer_is_rejected_without_a_tag(case, bad_sources, tmp_path):
    src = bad_sources[case]
    target = tmp_path / "target"
    r = nydusify("convert", "--source", src.ref, "--target", f"oci:{target}:nydus", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    bad_layer = src.manifest.layers[1].digest
    assert r.stderr.startswith("nydusify convert: error: ") and f"layer 1 ({bad_layer})" in r.stderr, r.stderr
    for fragment in REJECTED[case]:
        assert fragment in r.stderr, r.stderr
    assert layout_tags(target) == []
    assert not any((target / "blobs" / "sha256").iterdir()), "a failed conversion uploaded blobs"


def test_damaged_deflate_data_is_rejected(tmp_path):
    """A bit flip in the deflate block headers (not caught by the CRC but by inflate itself)."""
    src = im.build_oci_layout(tmp_path / "src", "t", MALICIOUS["corrupt_gzip"][:1] +
                              [im.Layer(MALICIOUS["corrupt_gzip"][1].entries)])
    data = bytearray(blob_path(src.layout, src.manifest.layers[1].digest).read_bytes())
    data[20] ^= 0xFF
    digest = replace_layer_blob(src, 1, bytes(data))
    target = tmp_path / "target"
    r = nydusify("convert", "--source", src.ref, "--target", f"oci:{target}:nydus", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"layer 1 ({digest}): unreadable layer (BadGzipFile: corrupt gzip data" in r.stderr, r.stderr
    assert layout_tags(target) == []


def test_missing_blob_is_named(workdir, tmp_path):
    src = im.build_oci_layout(tmp_path / "src", "t", [[im.Entry.file("a", b"a\n")],
                                                    [im.Entry.file("b", b"b\n")]])
    missing = src.manifest.layers[1].digest
    blob_path(src.layout, missing).unlink()
    target = tmp_path / "target"
    r = nydusify("convert", "--source", src.ref, "--target", f"oci:{target}:nydus", check=False)
    assert r.returncode == 1 and missing in r.stderr and "not found" in r.stderr, r.stderr
    assert layout_tags(target) == []


def test_failed_conversion_leaves_no_registry_tag(bad_sources, registry_session):
    target = f"{registry_session.host}/bad/truncated:nydus"
    r = nydusify("convert", "--source", bad_sources["truncated_gzip"].ref, "--target", target,
                 "--plain-http", check=False)
    assert "unreadable layer" in r.stderr
    tags = requests.get(f"{registry_session.url}/v2/bad/truncated/tags/list", timeout=10)
    assert tags.status_code == 404 or "nydus" not in (tags.json().get("tags") or []), tags.text
    assert requests.head(f"{registry_session.url}/v2/bad/truncated/manifests/nydus", timeout=10).status_code == 404


# --------------------------------------------------------------------------- symlinks out of the root

# A tar may put entries below a symlink. containerd applies each layer into a fresh
# upper dir: a symlink of the same layer is followed inside the root (an absolute target
# or too many '..' stop at the root) and stays; an undeclared parent that is a symlink
# or a file of a lower layer becomes a directory holding only the new layer's entries
# (umoci follows lower symlinks instead; the converter follows containerd). The converter
# writes nothing to disk, so nothing can escape; the converted tree must equal containerd's.
D, F, S = im.Entry.dir, im.Entry.file, im.Entry.symlink
SYMLINK_PARENTS = {
    "symlink_escape": MALICIOUS["symlink_escape"],
    "symlink_escape_relative": MALICIOUS["symlink_escape_relative"],
    "lower_layer_link": [[D("usr"), D("usr/lib"), F("usr/lib/a", b"a\n"), S("lib", "usr/lib")],
                         [F("lib/b", b"b\n")]],
    "lower_layer_absolute_chain": [[D("usr"), D("usr/lib"), S("lib", "/usr/lib"), S("lib64", "lib")],
                                   [F("lib64/sub/c", b"c\n")]],
    "dangling_link_in_same_layer": [[D("etc")], [S("opt", "../srv/opt"), F("opt/x", b"x\n")]],
    "whiteout_through_lower_link": [[D("usr"), D("usr/lib", mode=0o711), F("usr/lib/a", b"a\n"),
                                     F("usr/lib/keep", b"k\n"), S("lib", "usr/lib")], [im.Entry.whiteout("lib/a")]],
    "link_to_file": [[D("etc"), F("etc/passwd", b"p\n"), S("pw", "etc/passwd")], [F("pw/x", b"x\n")]],
    "file_in_lower_layer": [[F("f", b"f\n")], [F("f/x", b"x\n")]],
}
# ... and where the path loops, or leads to a non-directory of the same layer, containerd (and
# umoci) refuse the layer, so do we.
NOT_A_DIRECTORY = {
    "symlink_loop": ([[S("a", "b"), S("b", "a")], [F("a/x", b"x\n")]], "too many levels of symbolic links"),
    "file_in_same_layer": ([[D("etc")], [F("f", b"f\n"), F("f/x", b"x\n")]], "b'f' is not a directory"),
}


@pytest.mark.parametrize("case", sorted(SYMLINK_PARENTS))
def test_symlink_parents_stay_inside_the_root(case, workdir, tmp_path, containerd_unpack):
    src = im.build_oci_layout(workdir / "symlinks", case, SYMLINK_PARENTS[case])
    host_before = os.path.lexists("/tmp/evil")
    target = f"oci:{tmp_path / 'target'}:nydus"
    nydusify("convert", "--source", src.ref, "--target", target, check=True)
    expected = containerd_unpack(src)
    actual = reader_tree(target)
    # containerd stamps directories it creates or fills with the current time
    tr.assert_trees_equal(expected, actual, ignore=("dir_mtime",))
    assert os.path.lexists("/tmp/evil") == host_before
    if case == "symlink_escape":
        assert actual[b"link"].target == b"/tmp" and actual[b"tmp/evil"].type == "file"
    if case == "lower_layer_link":          # the lower symlink became a dir with only the new file
        assert actual[b"lib"].type == "dir" and b"lib/a" not in actual and b"usr/lib/b" not in actual
    if case == "whiteout_through_lower_link":   # ... with the attributes of the dir it led to
        assert actual[b"lib"].mode == 0o40711 and b"usr/lib/a" in actual and not actual[b"lib"].links
    nydusify("check", "--source", src.ref, "--target", target, check=True)


@pytest.mark.parametrize("case", sorted(NOT_A_DIRECTORY))
def test_parent_that_is_not_a_directory_is_rejected(case, workdir, tmp_path, containerd_unpack):
    layers, message = NOT_A_DIRECTORY[case]
    src = im.build_oci_layout(workdir / "not-a-dir", case, layers)
    with pytest.raises(ContainerdUnpackError):
        containerd_unpack(src)
    with pytest.raises(tr.UmociError):
        tr.umoci_unpack(src.layout, case, tmp_path / "bundle")
    target = tmp_path / "target"
    r = nydusify("convert", "--source", src.ref, "--target", f"oci:{target}:nydus", check=False)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert f"layer 1 ({src.manifest.layers[1].digest}): tar entry b'" in r.stderr and "/x'" in r.stderr, r.stderr
    assert layout_tags(target) == []


def test_symlink_escape_in_a_kernel_mount(workdir, tmp_path, kernel_mount):
    src = im.build_oci_layout(workdir / "symlinks", "escape", MALICIOUS["symlink_escape"])
    target = f"oci:{tmp_path / 'target'}:nydus"
    nydusify("convert", "--source", src.ref, "--target", target, check=True)
    nydusify("export", target, tmp_path / "export", check=True)
    devs = sorted((tmp_path / "export" / "devices").iterdir(), key=lambda p: int(p.name))
    mnt = kernel_mount(tmp_path / "export" / "image.boot", devs)
    assert os.readlink(mnt / "link") == "/tmp"
    assert sorted(os.listdir(mnt)) == ["etc", "link", "tmp"]
    assert (mnt / "tmp" / "evil").read_bytes() == b"evil\n"


# --------------------------------------------------------------------------- bootstraps and blobs that lie

def test_inspect_rejects_garbage_bootstrap(tmp_path, busybox_image, convert_once, workdir):
    garbage = tmp_path / "garbage.boot"
    garbage.write_bytes(os.urandom(3 * 4096))
    r = nydusify("inspect", garbage, check=False)
    assert r.returncode == 1 and "not a RAFS bootstrap" in r.stderr and "nor a blob with a ToC" in r.stderr \
        and "Traceback" not in r.stderr, r.stderr

    short = tmp_path / "short.boot"
    short.write_bytes(b"RAFSBOOT")
    assert "too short" in nydusify("inspect", short, check=False).stderr

    # a real bootstrap whose EROFS superblock magic is broken
    boot, _ = convert_once(busybox_image).export(workdir / "export-busybox")
    bad = bytearray(boot.read_bytes())
    struct.pack_into("<I", bad, 1024, 0x12345678)
    p = tmp_path / "bad-erofs-magic.boot"
    p.write_bytes(bytes(bad))
    r = nydusify("inspect", "--json", p, check=False)
    assert r.returncode == 1 and "magic" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr

    # ... and one cut short (its superblock intact): the bootstrap reader says what is wrong
    cut = tmp_path / "cut.boot"
    cut.write_bytes(boot.read_bytes()[:8192])
    r = nydusify("inspect", "--json", cut, check=False)
    assert r.returncode == 1 and r.stderr.startswith("nydusify inspect: error: ") \
        and "Traceback" not in r.stderr, r.stderr


def _converted_copy(conv, dest):
    shutil.copytree(conv.layout, dest)
    idx = json.loads((dest / "index.json").read_text())
    manifest = json.loads(blob_path(dest, idx["manifests"][0]["digest"]).read_bytes())
    return manifest["layers"][0]["digest"]


def _toc(data: bytes) -> tuple[int, list[rblob.TocEntry]]:
    """(offset of the ToC entries, the entries) of a blob."""
    toc = rblob.read_toc(lambda off, n: bytes(data[off:off + n]), len(data))
    return len(data) - 512 - 128 * len(toc), toc


@pytest.mark.parametrize("toc_too", [False, True], ids=["ci-only", "ci-and-toc"])
def test_lying_blob_metadata_is_caught(toc_too, busybox_image, convert_once, tmp_path):
    """Rewrite chunk 0's entry in a converted blob's compression-info array and fix up nothing else
    (or also the ToC's sha256 of that member): check names the blob and the member that lies,
    whatever else the lie keeps consistent. Readers trust the bootstrap's chunk table, not the
    blob's own metadata, so export still gets every chunk right."""
    conv = convert_once(busybox_image)
    dest = tmp_path / "lying"
    digest = _converted_copy(conv, dest)
    p = blob_path(dest, digest)
    data = bytearray(p.read_bytes())
    toc_at, toc = _toc(bytes(data))
    meta = next(e for e in toc if e.name == "blob.meta")
    # ci v1 entry 0, second u64: compressed offset bits 0-39, (size - 1) low 20 bits at 44-63
    comp = struct.unpack_from("<Q", data, meta.compressed_offset + 8)[0]
    struct.pack_into("<Q", data, meta.compressed_offset + 8, comp - (1 << 44))     # one byte shorter
    if toc_too:
        import hashlib
        i = toc.index(meta)
        ci = bytes(data[meta.compressed_offset:meta.compressed_offset + meta.compressed_size])
        struct.pack_into("32s", data, toc_at + 128 * i + 24, hashlib.sha256(ci).digest())
    p.write_bytes(bytes(data))
    ref = f"oci:{dest}:nydus"
    r = nydusify("check", "--source", busybox_image.ref, "--target", ref, check=False)
    assert r.returncode == 1 and f"blob {digest}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    if toc_too:
        assert "ToC hashes to" in r.stderr and "blob table expects" in r.stderr, r.stderr
    else:
        assert "blob.meta does not match its sha256 in the ToC" in r.stderr, r.stderr
    with pytest.raises((IntegrityError, FormatError), match=digest):
        check_images(busybox_image.ref, ref)
    nydusify("export", ref, tmp_path / "export", check=True)
    good, _ = conv.export(tmp_path / "export-good")
    assert [f.read_bytes() for f in sorted((tmp_path / "export" / "devices").iterdir())] == \
        [f.read_bytes() for f in sorted((good.parent / "devices").iterdir())]


def test_chunk_table_that_disagrees_with_the_blob_is_caught(busybox_image, convert_once):
    """A bootstrap whose chunk table names the wrong ci entry for a chunk (its bytes still verify):
    check's comparison with the blob's own ci array catches it."""
    import dataclasses
    from converter.check import verify_blobs
    from converter.nydus_image import load_from_store
    from rafs.image.store import open_store
    conv = convert_once(busybox_image)
    with open_store(conv.ref) as store:
        image = load_from_store(store)
        verify_blobs(image)                              # as written: fine
        info = image.bootstrap.meta.blobs[0]
        assert len(info.entries) > 1
        info.entries[0] = dataclasses.replace(info.entries[0], index=info.entries[1].index)
        with pytest.raises(IntegrityError, match=f"blob sha256:{info.blob_id}: ci entry {info.entries[1].index} says"):
            verify_blobs(image)


def test_inspect_json_needs_no_blob(busybox_image, convert_once, tmp_path):
    """inspect reads the bootstrap only: a blob that lies does not stop it (check is what verifies)."""
    conv = convert_once(busybox_image)
    dest = tmp_path / "no-blob"
    digest = _converted_copy(conv, dest)
    blob_path(dest, digest).unlink()
    info = json.loads(nydusify("inspect", "--json", f"oci:{dest}:nydus", check=True).stdout)
    assert "sha256:" + info["blobs"][0]["id"] == digest
    r = nydusify("check", "--source", busybox_image.ref, "--target", f"oci:{dest}:nydus", check=False)
    assert digest in r.stderr and "not found" in r.stderr, r.stderr
