"""Learned prefetch: what earlier starts of an image read, in order, used by the next mount as its prefetch list.

No rebuild, no hand-made list. A mount logs its reads (`rafs.access.AccessLog`); once its start
window is over (or at unmount) the chunks read in that window, in first-access order, become a
`LearnedRecord`, merged with the record already published and published again:

* next to the image, in its own repository (a registry, or an OCI layout), as an OCI artifact
  manifest tagged `sha256-<hex of the bootstrap>.prefetch` (docker-registry 2.8 stores it: the
  config is the empty descriptor, the one layer is the record, `subject` names the image's
  manifest for registries with the referrers API);
* and on the node, in `<cache dir>/learned/<hex>.json` (a node without push rights still learns).

The bootstrap's digest names the record: the same filesystem under any tag or manifest shares it.
A record is data from the network like any other: its blob is digest-checked, its JSON checked
and bounded, every range checked against the bootstrap's blob table; the chunks it names are
fetched and verified like any read. A wrong or hostile record costs bandwidth, never correctness.

Operators: `--learn off|use|auto` per mount (snapshotter: `[prefetch] learn`), and
`nydusify learned show|pin|unpin|reset REF` (a pinned record is used but never merged into).
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from .access import merge_ranges
from .errors import FormatError, NotFound, RafsError
from .osutil import atomic_write

log = logging.getLogger(__name__)

SCHEMA = "pynydus.learned-prefetch.v1"
MEDIA_TYPE = "application/vnd.pynydus.learned-prefetch.v1+json"      # the record (the artifact's layer)
ARTIFACT_TYPE = "application/vnd.pynydus.learned-prefetch.v1"
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
EMPTY_JSON = b"{}"
TAG_SUFFIX = ".prefetch"
LEARN_MODES = ("auto", "use", "off")
DEFAULT_WINDOW = 30.0

MAX_RECORD_BYTES = 16 << 20      # a bigger record is refused (a hostile one cannot eat memory)
MAX_CHUNKS = 1 << 20
MAX_FILES = 1 << 18
WAVE_MS = 250                    # prefetch jobs: chunks first read within one wave go in one job


def record_key(raw_bootstrap: bytes) -> str:
    """The record's name: the hex sha256 of the (uncompressed) bootstrap."""
    return hashlib.sha256(raw_bootstrap).hexdigest()


def record_tag(key: str) -> str:
    return f"sha256-{key}{TAG_SUFFIX}"


# --------------------------------------------------------------------------- the record

@dataclass
class LearnedRecord:
    """Chunks read during starts of one image, in first-access order, and the files they belong to.

    `chunks`: (blob index into `blobs`, view offset, size, first access ms); `files`:
    (path, first access ms, [(offset, length)]) — the file-level view shown by inspect."""
    bootstrap: str                               # "sha256:<hex>"
    blobs: list[str] = field(default_factory=list)
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)
    files: list[tuple[str, int, list[tuple[int, int]]]] = field(default_factory=list)
    runs: int = 1
    pinned: bool = False
    updated: float = 0.0

    # ------------------------------------------------------------------ bytes
    def to_bytes(self) -> bytes:
        doc = {"schema": SCHEMA, "bootstrap": self.bootstrap, "blobs": self.blobs,
               "chunks": [list(c) for c in self.chunks],
               "files": [[p, t, [list(r) for r in rs]] for p, t, rs in self.files],
               "runs": self.runs, "pinned": self.pinned, "updated": round(self.updated, 3)}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "learned record") -> "LearnedRecord":
        """Parse and check a record (FormatError, naming `where`, if it is not one)."""
        if len(data) > MAX_RECORD_BYTES:
            raise FormatError(f"{where}: {len(data)} bytes, more than {MAX_RECORD_BYTES}")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise FormatError(f"{where}: not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise FormatError(f"{where}: schema is not {SCHEMA}")
        try:
            boot, blobs, chunks, files = doc["bootstrap"], doc["blobs"], doc["chunks"], doc.get("files", [])
            runs, pinned, updated = doc.get("runs", 1), doc.get("pinned", False), doc.get("updated", 0.0)
            ok = (isinstance(boot, str) and boot.startswith("sha256:") and isinstance(blobs, list)
                  and all(isinstance(b, str) and len(b) <= 128 for b in blobs) and isinstance(chunks, list)
                  and len(chunks) <= MAX_CHUNKS and isinstance(files, list) and len(files) <= MAX_FILES
                  and _is_int(runs) and runs >= 0 and isinstance(pinned, bool)
                  and isinstance(updated, (int, float)))
            if not ok:
                raise FormatError(f"{where}: bad header fields")
            cs = []
            for c in chunks:
                if not (isinstance(c, list) and len(c) == 4 and all(_is_int(x) and x >= 0 for x in c)
                        and c[0] < len(blobs) and c[2] > 0):
                    raise FormatError(f"{where}: bad chunk entry {c!r:.80}")
                cs.append(tuple(c))
            fs = []
            for f in files:
                if not (isinstance(f, list) and len(f) == 3 and isinstance(f[0], str) and _is_int(f[1])
                        and isinstance(f[2], list)
                        and all(isinstance(r, list) and len(r) == 2 and all(_is_int(x) and x >= 0 for x in r)
                                for r in f[2])):
                    raise FormatError(f"{where}: bad file entry {f!r:.80}")
                fs.append((f[0], f[1], [tuple(r) for r in f[2]]))
        except KeyError as e:
            raise FormatError(f"{where}: no {e.args[0]!r}") from None
        return cls(boot, list(blobs), cs, fs, runs, pinned, float(updated))

    # ------------------------------------------------------------------ combining
    def merge(self, newer: "LearnedRecord") -> "LearnedRecord":
        """This record and a newer run's: every chunk either read, each at its earliest first
        access (the order a start needs); files likewise. Runs add up; pinning is kept."""
        first: dict[tuple[str, int, int], int] = {}
        for rec in (self, newer):
            for b, off, size, t in rec.chunks:
                key = (rec.blobs[b], off, size)
                if key not in first or t < first[key]:
                    first[key] = t
        blobs: list[str] = []
        index: dict[str, int] = {}
        chunks = []
        for (bid, off, size), t in sorted(first.items(), key=lambda kv: (kv[1], kv[0])):
            if bid not in index:
                index[bid] = len(blobs)
                blobs.append(bid)
            chunks.append((index[bid], off, size, t))
        files: dict[str, list] = {}
        for rec in (self, newer):
            for path, t, ranges in rec.files:
                f = files.setdefault(path, [t, []])
                f[0] = min(f[0], t)
                f[1].extend(ranges)
        merged_files = [(p, f[0], _spans(f[1])) for p, f in sorted(files.items(), key=lambda kv: (kv[1][0], kv[0]))]
        return LearnedRecord(self.bootstrap, blobs, chunks[:MAX_CHUNKS], merged_files[:MAX_FILES],
                             self.runs + newer.runs, self.pinned or newer.pinned, max(self.updated, newer.updated))

    # ------------------------------------------------------------------ using
    def plan(self, boot) -> list[list[tuple[int, list[tuple[int, int]]]]]:
        """Prefetch waves for bootstrap `boot`: [[(blob index in the image, view ranges)]], in
        first-access order. Entries for blobs the image does not have, or out of a blob's view,
        are dropped; so is everything if the record is of another bootstrap."""
        by_id = {b.blob_id: i for i, b in enumerate(boot.meta.blobs)}
        sizes = [b.uncompressed_size for b in boot.meta.blobs]
        waves: list[dict[int, list[tuple[int, int]]]] = []
        wave_end = -1
        for b, off, size, t in self.chunks:
            i = by_id.get(self.blobs[b])
            if i is None or off >= sizes[i]:
                continue
            if t >= wave_end:
                waves.append({})
                wave_end = t + WAVE_MS
            waves[-1].setdefault(i, []).append((off, min(size, sizes[i] - off)))
        return [[(i, _spans(rs)) for i, rs in w.items()] for w in waves]

    def summary(self) -> dict:
        return {"bootstrap": self.bootstrap, "runs": self.runs, "pinned": self.pinned, "chunks": len(self.chunks),
                "bytes": sum(c[2] for c in self.chunks), "files": len(self.files),
                "last_access_ms": max((c[3] for c in self.chunks), default=0),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.updated)) if self.updated else None}


def _is_int(x) -> bool:
    return type(x) is int


def _spans(spans) -> list[tuple[int, int]]:
    """(offset, length) pairs, overlapping or touching ones joined, sorted."""
    return [(s, e - s) for s, e in merge_ranges((o, o + n) for o, n in spans)]


def record_from_log(boot, key: str, events, files: list[dict]) -> LearnedRecord | None:
    """This start's record: the chunks holding the blob `events` (ms, blob, offset, end) in
    first-access order, and the `files` audit (rafs.access.file_accesses). None if nothing was read."""
    blobs = boot.meta.blobs
    offsets = [[e.uncompressed_offset for e in b.entries] for b in blobs]
    seen: set[tuple[int, int]] = set()
    chunks = []
    used: dict[int, int] = {}
    for t, bi, off, end in events:
        if not 0 <= bi < len(blobs):
            continue
        es, keys = blobs[bi].entries, offsets[bi]
        k = max(0, bisect.bisect_right(keys, off) - 1)
        while k < len(es) and es[k].uncompressed_offset < end:
            e = es[k]
            if e.uncompressed_offset + e.uncompressed_size > off and (bi, k) not in seen:
                seen.add((bi, k))
                j = used.setdefault(bi, len(used))
                chunks.append((j, e.uncompressed_offset, e.uncompressed_size, t))
            k += 1
    if not chunks:
        return None
    ids = [None] * len(used)
    for bi, j in used.items():
        ids[j] = blobs[bi].blob_id
    return LearnedRecord(f"sha256:{key}", ids, chunks[:MAX_CHUNKS],
                         [(f["path"], f["first_access_ms"], [tuple(r) for r in f["ranges"]]) for f in files][:MAX_FILES],
                         runs=1, updated=time.time())


# --------------------------------------------------------------------------- where records live

class LocalRecords:
    """Records on this node: `<dir>/<key>.json`."""

    def __init__(self, directory: str):
        self.dir = directory

    @property
    def location(self) -> str:
        return self.dir

    def get(self, key: str) -> LearnedRecord | None:
        path = os.path.join(self.dir, f"{key}.json")
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_RECORD_BYTES + 1)
        except FileNotFoundError:
            return None
        return LearnedRecord.from_bytes(data, path)

    def put(self, key: str, rec: LearnedRecord) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        atomic_write(os.path.join(self.dir, f"{key}.json"), rec.to_bytes())


class ImageRecords:
    """Records next to an image, in its repository or OCI layout, as tagged OCI artifacts.

    `open_store(tag)` -> a `rafs.image.store.ImageStore` of the image's repository at that tag."""

    def __init__(self, open_store, location: str, subject: dict | None = None):
        self._open = open_store
        self.location = location
        self.subject = subject               # the image manifest's descriptor, if known

    def get(self, key: str) -> LearnedRecord | None:
        where = f"{self.location}:{record_tag(key)}"
        with self._open(record_tag(key)) as store:
            try:
                desc = store.resolve()
            except NotFound:
                return None
            manifest = store.get_json(desc.digest)
            layers = manifest.get("layers") if isinstance(manifest, dict) else None
            if not (isinstance(layers, list) and len(layers) == 1 and isinstance(layers[0], dict)
                    and layers[0].get("mediaType") == MEDIA_TYPE and isinstance(layers[0].get("digest"), str)
                    and _is_int(layers[0].get("size")) and 0 <= layers[0]["size"] <= MAX_RECORD_BYTES):
                raise FormatError(f"{where}: not a learned-prefetch artifact")
            data = store.get_bytes(layers[0]["digest"])         # digest-checked by the store
        rec = LearnedRecord.from_bytes(data, where)
        if rec.bootstrap != f"sha256:{key}":
            raise FormatError(f"{where}: the record is of bootstrap {rec.bootstrap}")
        return rec

    def put(self, key: str, rec: LearnedRecord) -> None:
        from .image.digests import sha256_digest
        data = rec.to_bytes()
        layer = {"mediaType": MEDIA_TYPE, "digest": sha256_digest(data), "size": len(data),
                 "annotations": {"org.opencontainers.image.title": "learned-prefetch.json"}}
        config = {"mediaType": EMPTY_MEDIA_TYPE, "digest": sha256_digest(EMPTY_JSON), "size": len(EMPTY_JSON)}
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE, "artifactType": ARTIFACT_TYPE,
                    "config": config, "layers": [layer],
                    "annotations": {"io.pynydus.learned.bootstrap": rec.bootstrap,
                                    "io.pynydus.learned.runs": str(rec.runs),
                                    "io.pynydus.learned.pinned": str(rec.pinned).lower()}}
        if self.subject:
            manifest["subject"] = self.subject
        with self._open(record_tag(key)) as store:
            store.put_bytes(config["digest"], EMPTY_JSON)
            store.put_bytes(layer["digest"], data)
            store.tag(json.dumps(manifest, separators=(",", ":")).encode(), MANIFEST_MEDIA_TYPE)


def image_records(ref: str, *, plain_http: bool = False, hosts_dir: str | None = None,
                  config_dir: str | None = None, subject: dict | None = None) -> ImageRecords | None:
    """The records of image `ref` (a registry or oci: reference), or None for other sources."""
    from .image.refs import parse_ref
    from .image.store import open_store
    try:
        r = parse_ref(ref)
    except Exception:
        return None
    base = r.path if r.kind == "oci" else f"{r.host}/{r.repo}"

    def opener(tag: str):
        target = f"oci:{r.path}:{tag}" if r.kind == "oci" else f"{r.host}/{r.repo}:{tag}"
        # short timeouts, one retry: a record is never worth holding up a mount's start or its unmount
        kw = {"timeout": (3, 5), "retries": 1} if r.kind == "registry" else {}
        if config_dir and r.kind == "registry":
            kw["config_dir"] = config_dir
        return open_store(parse_ref(target), plain_http=plain_http, hosts_dir=hosts_dir, **kw)
    return ImageRecords(opener, base, subject)


# --------------------------------------------------------------------------- in the mount daemon

class Learner:
    """A mount's learned prefetch: load the record before the start, publish this start's after it."""

    def __init__(self, mode: str, key: str, local: LocalRecords | None, remote: ImageRecords | None):
        if mode not in LEARN_MODES:
            raise ValueError(f"learn must be one of {', '.join(LEARN_MODES)}, got {mode!r}")
        self.mode, self.key, self.local, self.remote = mode, key, local, remote
        self.state: dict = {"mode": mode, "source": None, "published": None}
        self._lock = threading.Lock()
        self._published = False

    def load(self) -> LearnedRecord | None:
        """The record to prefetch by: the published one, else this node's (errors are logged:
        a mount never fails for its record)."""
        if self.mode == "off":
            return None
        for name, store in (("image", self.remote), ("node", self.local)):
            if store is None:
                continue
            try:
                rec = store.get(self.key)
            except (RafsError, OSError) as e:
                log.warning("learned prefetch: cannot read the record at %s: %s", store.location, e)
                self.state[f"{name}_error"] = str(e)
                continue
            if rec is not None:
                self.state.update(source=f"{name}: {store.location}", **{"record": rec.summary()})
                return rec
        return None

    def publish(self, boot, events, files: list[dict]) -> None:
        """Merge this start's reads into the records (once per mount); never raises."""
        if self.mode != "auto":
            return
        with self._lock:                         # a second caller waits for the first, then leaves
            if self._published:
                return
            self._published = True
            self._publish(boot, events, files)

    def _publish(self, boot, events, files: list[dict]) -> None:
        mine = record_from_log(boot, self.key, events, files)
        if mine is None:
            self.state["published"] = "nothing read"
            return
        done = []
        for name, store in (("node", self.local), ("image", self.remote)):
            if store is None:
                continue
            try:
                try:
                    old = store.get(self.key)
                except FormatError as e:             # not a record: this start's replaces it
                    log.warning("learned prefetch: replacing the bad record at %s: %s", store.location, e)
                    old = None
                if old is not None and old.pinned:
                    done.append(f"{name}: pinned, kept")
                    continue
                store.put(self.key, old.merge(mine) if old is not None else mine)
                done.append(f"{name}: {old.runs + 1 if old else 1} runs")
            except (RafsError, OSError) as e:
                log.warning("learned prefetch: cannot publish to %s: %s", store.location, e)
                done.append(f"{name}: failed: {e}")
        self.state["published"] = "; ".join(done)
        self.state["published_chunks"] = len(mine.chunks)


def replace_pinned(rec: LearnedRecord, pinned: bool) -> LearnedRecord:
    return dataclasses.replace(rec, pinned=pinned, updated=time.time())
