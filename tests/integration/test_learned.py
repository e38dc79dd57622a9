"""Learned prefetch and the access audit (rafs.learned, rafs.access), with a real docker-registry.

Node A mounts an image nobody has started before, reads some files and unmounts: the record of
what it read is published next to the image. Node B (a fresh cache) mounts the same image and
fetches exactly that before anyone reads; its reads then cost no request. The registry's access
log, not only our counters, says what was fetched. Records that are wrong or hostile cost
bandwidth only; operators can inspect, pin, reset and turn learning off.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from rafs.errors import RafsError
from rafs.learned import LearnedRecord, record_key, record_tag
from tests.helpers.mounts import (LAZY_CHUNK, MODES, blob_digests, convert_into, data_gets,  # noqa: F401
                                  lazy_source, mounter)
from tests.helpers.mounts import nydusify as _run

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE and kernel mounts)"),
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")]

KiB = 1024
# far apart in the blob, so neither kernel readahead nor a shared 64 KiB granule reorders them
READS = [("many/f30", 0, None), ("data/r1", 700 * KiB, 50 * KiB), ("prefetch/p2", 0, None),
         ("data/r3", 0, 10)]


def nydusify(*args, check: bool | None = None):
    """The CLI; check=True asserts exit 0, False a failure."""
    r = _run(*args)
    if check is not None:
        assert (r.returncode == 0) == check, f"nydusify {args}: rc={r.returncode}\n{r.stdout}{r.stderr}"
    return r


def read_all(m, source) -> None:
    for path, off, n in READS:
        want = source.expected(path)
        with open(m.path / path, "rb") as f:
            f.seek(off)
            got = f.read(n if n is not None else -1)
        assert got == want[off:off + n if n is not None else None], path


def learned(ref: str, *args) -> dict:
    r = nydusify("learned", "show", ref, "--plain-http", "--json", *args, check=True)
    return json.loads(r.stdout)


def audit(m) -> list[dict]:
    r = nydusify("stats", m.path, "--run-dir", m.run_dir, "--files", "--json", check=True)
    return json.loads(r.stdout)


def is_subsequence(want: list, got: list) -> bool:
    it = iter(got)
    return all(w in it for w in want)


def image_key(ref: str) -> str:
    from converter.nydus_image import open_nydus_image
    with open_nydus_image(ref, plain_http=True) as image:
        return record_key(image.raw_bootstrap)


@pytest.mark.parametrize("mode", MODES)
def test_one_start_teaches_the_next_node(mode, mounter, lazy_source, registry_session):
    ref = convert_into(registry_session, lazy_source.ref, f"learned/teach-{mode}")
    digests = blob_digests(ref)
    r = nydusify("learned", "show", ref, "--plain-http", check=False)      # nothing yet: says so, fails
    assert "no learned prefetch record" in r.stderr, r.stderr

    a = mounter.mount(ref, mode=mode, learn="auto")
    read_all(a, lazy_source)
    files = audit(a)                                # the audit: which files, when, which ranges
    paths = [f["path"] for f in files]
    assert is_subsequence(["/" + p for p, _, _ in READS], paths), paths
    r1 = next(f for f in files if f["path"] == "/data/r1")
    assert any(o <= 700 * KiB and 750 * KiB <= o + n for o, n in r1["ranges"]), r1
    assert all(f["first_access_ms"] >= 0 for f in files)
    assert [f["first_access_ms"] for f in files] == sorted(f["first_access_ms"] for f in files)
    text = nydusify("stats", a.path, "--run-dir", a.run_dir, "--files", check=True).stdout
    assert "/prefetch/p2" in text and "files," in text
    a.umount()                                      # publishes: the start was shorter than its window

    rec = learned(ref, "--files")
    assert rec["runs"] == 1 and not rec["pinned"] and rec["chunks"] > 0
    assert rec["tag"] == record_tag(image_key(ref))
    assert is_subsequence(["/" + p for p, _, _ in READS], [f["path"] for f in rec["files"]])
    assert "learned" in nydusify("inspect", ref, "--plain-http", check=True).stdout
    if mode == "fuse":         # the record as a prefetch list: converted again, the chunks move to the blob's head
        listing = nydusify("learned", "show", ref, "--plain-http", "--patterns", check=True).stdout
        lines = [ln.split("\t") for ln in listing.splitlines() if not ln.startswith("#")]
        assert is_subsequence(["/" + p for p, _, _ in READS], [ln[0] for ln in lines]), listing
        listing_file = a.cache_dir.parent / "learned-patterns.txt"
        listing_file.write_text(listing)
        laid = ref.rsplit(":", 1)[0] + ":laid-out"
        nydusify("convert", "--source", ref.replace("learned/teach-fuse", "learned/teach-fuse-src"),
                 "--target", laid, "--plain-http", "--chunk-size", "64K", "--prefetch-patterns", listing_file,
                 check=True)
        info = json.loads(nydusify("inspect", laid, "--plain-http", "--json", check=True).stdout)
        assert [ln[0] for ln in lines] == [p.split("\t")[0] for p in info["prefetch"]][:len(lines)], info["prefetch"]

    mark = registry_session.mark()
    b = mounter.mount(ref, mode=mode, learn="auto")            # another node: a fresh cache
    st = b.wait_stats(lambda s: s["prefetch"] == "done")
    assert st["prefetch"] == "done" and st["bytes_read"] == 0, st
    assert st["learned"]["source"].startswith("image: "), st["learned"]
    assert st["learned"]["record"]["chunks"] == rec["chunks"]
    assert st["prefetch_bytes"] >= rec["chunks"] * 4096 and st["chunks_fetched"] >= rec["chunks"]
    prefetched = sum(e.bytes for e in data_gets(registry_session, mark, digests))
    assert prefetched == st["backend_bytes"] > 0

    mark = registry_session.mark()
    read_all(b, lazy_source)                        # everything the start needs is here already:
    after = b.stats()                               # no read waits for a fetch
    assert after["chunks_missed"] == st["chunks_missed"] and after["chunks_hit"] > st["chunks_hit"], after
    if mode == "erofs":                             # (fuse mode reads ahead of a sequential file reader)
        assert data_gets(registry_session, mark, digests) == []
    b.umount()
    assert learned(ref)["runs"] == 2                # merged, not replaced


def test_pin_reset_and_off(mounter, lazy_source, registry_session, tmp_path):
    ref = convert_into(registry_session, lazy_source.ref, "learned/pin")
    a = mounter.mount(ref, mode="fuse", learn="auto")
    read_all(a, lazy_source)
    a.umount()
    first = learned(ref, "--files")

    out = nydusify("learned", "pin", ref, "--plain-http", check=True).stdout
    assert "pinned" in out
    b = mounter.mount(ref, mode="fuse", learn="auto")
    assert (b.path / "many/f01").read_bytes() == lazy_source.expected("many/f01")   # not in the record
    b.umount()
    pinned = learned(ref, "--files")
    assert pinned["pinned"] and pinned["runs"] == 1 and pinned["files"] == first["files"]  # kept as it was

    nydusify("learned", "unpin", ref, "--plain-http", check=True)
    c = mounter.mount(ref, mode="fuse", learn="auto")
    assert (c.path / "many/f01").read_bytes() == lazy_source.expected("many/f01")
    c.umount()
    merged = learned(ref, "--files")
    assert merged["runs"] == 2 and "/many/f01" in [f["path"] for f in merged["files"]]

    nydusify("learned", "reset", ref, "--plain-http", "--pin", check=True)
    gone = learned(ref)
    assert gone["chunks"] == 0 and gone["pinned"] and gone["runs"] == 0
    d = mounter.mount(ref, mode="fuse", learn="auto")
    st = d.wait_stats(lambda s: s["prefetch"] == "done")
    assert st["prefetch_bytes"] == 0 and st["bytes_fetched"] == 0
    d.umount()

    # off: the record is neither read nor written (no request for its tag at all)
    mark = registry_session.mark()
    e = mounter.mount(ref, mode="fuse", learn="off")
    read_all(e, lazy_source)
    st = e.stats()
    assert "learned" not in st and st["prefetch"] == "none"
    e.umount()
    assert not [x for x in registry_session.access_log(mark) if ".prefetch" in x.path]
    assert learned(ref)["runs"] == 0


def _push_record(ref: str, rec: LearnedRecord) -> None:
    from rafs.learned import image_records
    image_records(ref, plain_http=True).put(rec.bootstrap.split(":", 1)[1], rec)


def test_a_hostile_record_costs_bandwidth_never_correctness(mounter, lazy_source, registry_session):
    ref = convert_into(registry_session, lazy_source.ref, "learned/hostile")
    key = image_key(ref)
    from converter.nydus_image import open_nydus_image
    with open_nydus_image(ref, plain_http=True) as image:
        blob = image.bootstrap.meta.blobs[0]
    # chunks of another blob, ranges past the blob's end, a bogus size: all dropped; one real chunk kept
    rec = LearnedRecord(f"sha256:{key}", [blob.blob_id, "ab" * 32],
                        [(1, 0, 4096, 0), (0, blob.uncompressed_size + 4096, 4096, 1), (0, 0, 1 << 40, 2),
                         (0, LAZY_CHUNK * 3, LAZY_CHUNK, 3)], runs=7)
    _push_record(ref, rec)
    digests = blob_digests(ref)
    mark = registry_session.mark()
    m = mounter.mount(ref, mode="fuse", learn="use")
    st = m.wait_stats(lambda s: s["prefetch"] == "done")
    assert st["prefetch"] == "done" and st["verify_failures"] == 0
    # the whole blob at most (the 1 TiB range is clipped to the blob), verified like any read
    assert 0 < sum(e.bytes for e in data_gets(registry_session, mark, digests)) <= blob.compressed_size
    for p in lazy_source.files:
        assert (m.path / p).read_bytes() == lazy_source.expected(p), p
    m.umount()
    assert learned(ref)["runs"] == 7                 # learn=use never publishes

    # not a record at all: the mount works, stats say why nothing was prefetched
    from rafs.learned import image_records
    records = image_records(ref, plain_http=True)
    with records._open(record_tag(key)) as store:
        from rafs.image.digests import sha256_digest
        junk = b'{"schema": "pynydus.learned-prefetch.v1", "bootstrap": 5}'
        layer = {"mediaType": "application/vnd.pynydus.learned-prefetch.v1+json", "digest": sha256_digest(junk),
                 "size": len(junk)}
        store.put_bytes(layer["digest"], junk)
        store.put_bytes(sha256_digest(b"{}"), b"{}")
        store.tag(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                              "config": {"mediaType": "application/vnd.oci.empty.v1+json",
                                         "digest": sha256_digest(b"{}"), "size": 2},
                              "layers": [layer]}).encode(), "application/vnd.oci.image.manifest.v1+json")
    m2 = mounter.mount(ref, mode="erofs" if "erofs" in MODES else "fuse", learn="auto")
    st = m2.wait_stats(lambda s: s["prefetch"] == "done")
    assert st["learned"].get("image_error", "").endswith(".prefetch: no 'blobs'"), st["learned"]
    assert st["prefetch_bytes"] == 0
    assert (m2.path / "data/r0").read_bytes() == lazy_source.expected("data/r0")
    m2.umount()
    # the bad record is replaced by this start's (it could not be merged into)
    assert learned(ref)["runs"] == 1


# --------------------------------------------------------------------------- through containerd

needs_containerd = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("containerd", "ctr", "runc")) or not os.path.isfile("/bin/busybox"),
    reason="needs containerd, runc (apt) and busybox-static")


@needs_containerd
def test_a_container_start_teaches_the_next_node(registry_session, tmp_path):
    """Two nodes, each containerd + nydus-snapshotter with learning on (its default); node A runs a
    container of an image nobody started before; node B, fresh, prefetches what A's start read before
    its own container starts, and the container's reads fetch nothing more."""
    import hashlib
    import time
    import uuid

    from converter.convert import ConvertOptions, convert
    from rafs.api import ApiClient
    from rafs.mounttab import state_paths
    from snapshotter.lazy import default_run_dir
    from testbed.containerd import Containerd, SnapshotterProcess, running_node
    from tests.helpers import images as im

    big = im.random(3 << 20, seed=77)
    layers = im.busybox_image_layers() + [[im.Entry.dir("data"), im.Entry.file("data/big", big),
                                           im.Entry.file("data/unread", im.random(2 << 20, seed=78))]]
    layout = im.build_oci_layout(tmp_path / "layout", "bb", layers, config_overrides=im.BUSYBOX_CONFIG)
    host, repo = registry_session.host, f"learned-{uuid.uuid4().hex[:8]}"
    ref = f"{host}/{repo}:nydus"
    convert(layout.ref, ref, ConvertOptions(plain_http=True, chunk_size=64 << 10))
    digests = blob_digests(ref)
    cmd = ("sh", "-c", "cat /etc/hello.txt; head -c 1000000 /data/big | md5sum")
    want = im.BUSYBOX_HELLO.decode() + hashlib.md5(big.read()[:1000000]).hexdigest() + "  -\n"
    config = {"daemon": {"learn": "auto", "learn_window": 2.0}}

    def stats(snap) -> dict:
        mounts = snap.status()["mounts"]           # the mount starts in the background at pull
        assert len(mounts) <= 1, mounts
        if not mounts or not mounts[0].get("mountpoint"):
            return {}
        try:
            return ApiClient(state_paths(mounts[0]["mountpoint"], default_run_dir(snap.root)).api_sock).stats()
        except (OSError, RafsError):               # the daemon's API is not up yet
            return {}

    def rpull(snap, ctd) -> None:
        r = snap.cli("rpull", "--address", ctd.address, "--namespace", ctd.namespace, "--plain-http",
                     "--hosts-dir", "", ref, timeout=120)
        assert r.returncode == 0, f"rpull failed:\n{r.stdout}\n{r.stderr}\n{snap.log()[-3000:]}"

    snap = SnapshotterProcess(tmp_path / "a" / "snap", config=config)
    with running_node(snap, Containerd(tmp_path / "a" / "ctd", snapshotter=snap, cri=False)) as (snap, ctd):
        rpull(snap, ctd)
        assert ctd.ctr_run(ref, "a1", *cmd).stdout == want
        deadline = time.monotonic() + 30                  # published 2 s after the start's first read
        while nydusify("learned", "show", ref, "--plain-http").returncode != 0:
            assert time.monotonic() < deadline, stats(snap).get("learned")
            time.sleep(0.2)
    rec = learned(ref, "--files")
    paths = [f["path"] for f in rec["files"]]
    assert "/data/big" in paths and "/data/unread" not in paths, paths

    mark = registry_session.mark()
    snap = SnapshotterProcess(tmp_path / "b" / "snap", config=config)
    with running_node(snap, Containerd(tmp_path / "b" / "ctd", snapshotter=snap, cri=False)) as (snap, ctd):
        rpull(snap, ctd)                                  # the mount starts at pull, and its prefetch
        deadline = time.monotonic() + 30
        while (st := stats(snap)).get("prefetch") != "done":
            assert time.monotonic() < deadline, st
            time.sleep(0.1)
        assert st["learned"]["source"].startswith("image: ") and st["bytes_read"] == 0, st
        assert st["backend_bytes"] >= 1000000 // 2       # at least the part of /data/big that was read
        mark = registry_session.mark()
        assert ctd.ctr_run(ref, "b1", *cmd).stdout == want
        assert data_gets(registry_session, mark, digests) == []


def test_a_registry_gone_at_unmount_costs_the_record_not_the_unmount(mounter, lazy_source, tmp_path):
    """The registry stops between the start and the unmount: the unmount is prompt, the record is
    kept on the node, and the next mount on the node prefetches from it."""
    import time

    from testbed.registry import run_registry
    with run_registry(tmp_path / "reg") as reg:
        ref = convert_into(reg, lazy_source.ref, "learned/gone")
        a = mounter.mount(ref, mode="fuse", learn="auto", cache_dir=tmp_path / "cache")
        read_all(a, lazy_source)
        reg.stop()
        t0 = time.monotonic()
        a.umount()
        assert time.monotonic() - t0 < 30
        log = mounter.daemon_log(a.path)
        assert "cannot publish" in log, log
        kept = list((tmp_path / "cache" / "learned").glob("*.json"))
        assert len(kept) == 1 and LearnedRecord.from_bytes(kept[0].read_bytes()).chunks, kept
        reg.start()
        b = mounter.mount(ref, mode="fuse", learn="use", cache_dir=tmp_path / "cache2")
        st = b.wait_stats(lambda s: s["prefetch"] == "done")
        assert st["learned"]["source"] is None                 # the registry has none, this node's cache neither
        b.umount()
        c = mounter.mount(ref, mode="fuse", learn="use", cache_dir=tmp_path / "cache")
        st = c.wait_stats(lambda s: s["prefetch"] == "done")
        assert st["learned"]["source"].startswith("node: "), st["learned"]
        assert st["learned"]["record"]["runs"] == 1
        c.umount()
