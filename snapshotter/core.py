"""The snapshotter: overlayfs snapshots (containerd's design) plus lazy RAFS images.

    sn = NydusSnapshotter(root)                       # ordinary overlay snapshotter
    sn = NydusSnapshotter(root, lazy=RafsMounts(...)) # + nydus images served lazily

Every method is one metadata transaction (metastore.py) around filesystem work
(mounts.py): new snapshot dirs are made in a temp dir and renamed into place
before the transaction commits, so a crash leaves at most an orphan dir that
``cleanup`` deletes.

The lazy path (see snapshots.py for the contract):
* Prepare of a nydus *blob* layer (labels ``containerd.io/snapshot.ref`` +
  ``containerd.io/snapshot/nydus-blob=true`` + an image reference) commits an
  empty snapshot named after the chain ID at once and raises AlreadyExists:
  containerd never downloads the blob.
* The *bootstrap* layer (``nydus-bootstrap=true``) is unpacked normally; its
  snapshot holds ``image/image.boot``.
* An active/view snapshot whose parent chain holds a bootstrap snapshot gets
  the bootstrap's RAFS mount (lazy.py: one mount daemon per image) as the
  lowerdir in place of the bootstrap and the blob layers below it.
* With ``mount_at="pull"`` (the default) that mount is started when the
  bootstrap snapshot is committed, in a background thread, so Commit returns at
  once and the daemon comes up while containerd finishes the pull: the first
  container's Prepare then finds it ready instead of paying for the start.
  Both take the bootstrap's mount lock, so there is never a second daemon; a
  failed early start only records the failure (the container's ``ensure``
  retries and falls back as usual); Remove of the bootstrap and ``close`` wait
  for a start in flight, so nothing it makes is left behind.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable, Protocol

from rafs.image import media

from . import metastore as ms
from .errors import AlreadyExists, SnapshotterError
from .filters import compile_filters
from .mounts import Layout, Mount, build_mounts, dir_usage, overlay_index_off, remove_dir
from .snapshots import (LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST, LABEL_NYDUS_BLOB, LABEL_NYDUS_BOOTSTRAP,
                        LABEL_REMOTE, LABEL_SNAPSHOT_REF, Info, Kind, Usage)

log = logging.getLogger("nydus-snapshotter")

BOOTSTRAP_PATH = media.BOOTSTRAP_NAME           # in the bootstrap layer's snapshot


class LazyMounts(Protocol):
    """The lazy side (lazy.py); the core only needs these."""

    def ensure(self, sid: int, image_ref: str, bootstrap: Path, *, fallback: bool = True) -> Path:
        """A healthy RAFS mount of bootstrap snapshot ``sid`` (started, re-attached or repaired);
        ``fallback=False``: raise Unavailable instead of pulling the image in full."""

    def release(self, sid: int) -> None:
        """The bootstrap snapshot is gone: unmount, stop the daemon, free what only it used."""

    def cleanup(self, live_ids: set[int]) -> None:
        """Release mounts whose bootstrap snapshot no longer exists; prune the cache."""

    def recover(self, wanted: dict[int, tuple[str, Path]]) -> None:
        """After a restart: re-attach or re-mount every wanted mount (sid -> (image ref, bootstrap))."""


class NydusSnapshotter:
    def __init__(self, root: str | os.PathLike, *, lazy: LazyMounts | None = None, mount_at: str = "pull",
                 on_event: Callable[[str, dict], None] | None = None):
        self.layout = Layout(root)
        self.layout.ensure()
        self.store = ms.MetaStore(self.layout.db_path)
        self.lazy = lazy
        if lazy is not None and hasattr(lazy, "bind"):
            lazy.bind(self.store, self.layout)
        self.index_off = overlay_index_off()
        self._on_event = on_event or (lambda kind, data: None)
        self.mount_at = mount_at       # "pull": start a bootstrap's RAFS mount at its commit; "run": on first use
        self._mount_locks: dict[int, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._early: dict[str, threading.Thread] = {}     # bootstrap snapshot name -> its mount start in flight
        self._closing = False

    def close(self) -> None:
        """Wait for mount starts in flight (a daemon that comes up stays up, recorded for the next start)."""
        with self._locks_lock:
            self._closing = True
            early = list(self._early.values())
        for t in early:
            t.join()
        self.store.close()

    # -- queries ---------------------------------------------------------------------------
    def stat(self, key: str) -> Info:
        with self.store.transaction() as tx:
            return ms.get_info(tx, key)[1]

    def update(self, info: Info, fieldpaths: list[str]) -> Info:
        with self.store.transaction(write=True) as tx:
            return ms.update_info(tx, info, fieldpaths)

    def usage(self, key: str) -> Usage:
        with self.store.transaction() as tx:
            sid, kind, size, inodes = ms.usage(tx, key)
        if kind == Kind.ACTIVE or size < 0:
            size, inodes = dir_usage(self.layout.fs(sid))
        return Usage(size, inodes)

    def walk(self, fn: Callable[[Info], None], filters: list[str] | None = None) -> None:
        match = compile_filters(filters)
        out: list[Info] = []
        with self.store.transaction() as tx:
            ms.walk(tx, out.append, match)
        for info in out:           # call back outside the transaction (the caller may stream)
            fn(info)

    def mounts(self, key: str) -> list[Mount]:
        with self.store.transaction() as tx:
            snap = ms.get_snapshot(tx, key)
            lazy = self._lazy_base(tx, snap.parent_ids)
        return self._mounts(snap, lazy)

    # -- creation ----------------------------------------------------------------------------
    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        labels = dict(labels or {})
        if self.lazy is not None and labels.get(LABEL_SNAPSHOT_REF) and labels.get(LABEL_NYDUS_BLOB) == "true":
            if labels.get(LABEL_CRI_IMAGE_REF):
                self._prepare_remote(key, parent, labels)     # raises AlreadyExists
            why = (f"nydus blob layer without {LABEL_CRI_IMAGE_REF}: cannot be served lazily; containerd will "
                   "try to unpack it and fail (set disable_snapshot_annotations = false in containerd's CRI "
                   "config, or pull with `nydus-snapshotter rpull`)")
            log.error("layer %s: %s", labels[LABEL_SNAPSHOT_REF], why)
            with self.store.transaction(write=True) as tx:
                ms.set_image_status(tx, f"(unknown image with layer {labels[LABEL_SNAPSHOT_REF]})", "failed", why)
        return self._create(Kind.ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        return self._create(Kind.VIEW, key, parent, dict(labels or {}))

    def _create(self, kind: Kind, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        with self.store.transaction(write=True) as tx:
            snap = ms.create(tx, kind, key, parent, labels)
            owner = self.layout.fs(snap.parent_ids[0]) if snap.parent_ids else None
            tmp = self.layout.new_snapshot_dir(kind == Kind.ACTIVE, owner)
            try:
                self.layout.publish(tmp, snap.id)
            except BaseException:
                remove_dir(tmp)
                raise
            lazy = self._lazy_base(tx, snap.parent_ids)
            image_ref = labels.get(LABEL_CRI_IMAGE_REF)
            if image_ref and labels.get(LABEL_SNAPSHOT_REF) and not labels.get(LABEL_NYDUS_BOOTSTRAP) \
                    and not labels.get(LABEL_NYDUS_BLOB):
                self._note_full(tx, image_ref)
        try:
            return self._mounts(snap, lazy)
        except BaseException:
            try:
                self.remove(key)
            except SnapshotterError:
                pass
            raise

    def _prepare_remote(self, key: str, parent: str, labels: dict[str, str]) -> None:
        target = labels[LABEL_SNAPSHOT_REF]
        image_ref = labels[LABEL_CRI_IMAGE_REF]
        with self.store.transaction(write=True) as tx:
            existing = ms.find_info(tx, target)
            if existing is not None:
                raise AlreadyExists(f"target snapshot {target!r} already exists")
            snap = ms.create(tx, Kind.ACTIVE, key, parent, labels)
            tmp = self.layout.new_snapshot_dir(False)
            self.layout.publish(tmp, snap.id)
            ms.commit(tx, key, target, {**labels, LABEL_REMOTE: "remote snapshot"}, usage=(0, 0))
            ms.set_image_status(tx, image_ref, "lazy", "blob layers served on demand; bootstrap pending")
        log.info("layer %s of %s: nydus blob, served lazily (prepare answered AlreadyExists; blob %s not "
                 "downloaded)", target, image_ref, labels.get(LABEL_CRI_LAYER_DIGEST, "?"))
        self._on_event("remote-layer", {"image": image_ref, "chain_id": target})
        raise AlreadyExists(f"target snapshot {target!r}: lazily served nydus blob layer")

    def _note_full(self, tx, image_ref: str) -> None:
        cur = ms.get_image_status(tx, image_ref)
        if cur is None or cur[0] != "full":
            ms.set_image_status(tx, image_ref, "full", "ordinary layers: unpacked by containerd (full pull)")
            log.info("image %s: ordinary OCI layer, full pull", image_ref)

    # -- commit / remove -----------------------------------------------------------------
    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        labels = dict(labels or {})
        with self.store.transaction() as tx:
            sid = ms.get_info(tx, key)[0]
        size_inodes = dir_usage(self.layout.fs(sid))
        mount_now = None
        with self.store.transaction(write=True) as tx:
            sid = ms.commit(tx, key, name, labels, size_inodes)
            if labels.get(LABEL_NYDUS_BOOTSTRAP) == "true":
                ref = labels.get(LABEL_CRI_IMAGE_REF, "")
                boot = self.layout.fs(sid) / BOOTSTRAP_PATH
                if not boot.is_file():
                    log.error("bootstrap layer %s has no %s", name, BOOTSTRAP_PATH)
                    if ref:
                        ms.set_image_status(tx, ref, "failed", f"bootstrap layer holds no {BOOTSTRAP_PATH}")
                elif ref:
                    early = self.lazy is not None and self.mount_at == "pull"
                    ms.set_image_status(tx, ref, "lazy", "bootstrap unpacked; RAFS " +
                                        ("mounting" if early else "mounted on first container"))
                    log.info("image %s: bootstrap unpacked (%d bytes), lazy", ref, boot.stat().st_size)
                    if early:
                        mount_now = (name, sid, ref, boot)
        if mount_now is not None:
            self._mount_early(*mount_now)

    def _mount_early(self, name: str, sid: int, image_ref: str, boot: Path) -> None:
        """Start bootstrap ``sid``'s RAFS mount in the background (mount_at="pull")."""
        t = threading.Thread(target=self._early_mount, args=(name, sid, image_ref, boot), daemon=True,
                             name=f"mount-at-pull-{sid}")
        with self._locks_lock:
            if self._closing:
                return
            self._early[name] = t
            t.start()         # under the lock: remove()/close() never see a registered thread not yet started

    def _early_mount(self, name: str, sid: int, image_ref: str, boot: Path) -> None:
        try:
            with self._mount_lock(sid):
                if self._closing:         # shutting down: the first container starts it instead
                    return
                log.info("image %s: starting its lazy mount at pull (bootstrap snapshot %d)", image_ref, sid)
                self.lazy.ensure(sid, image_ref, boot, fallback=False)
        except Exception as e:      # recorded; the first container's ensure retries (and falls back)
            last = (str(e).splitlines() or [type(e).__name__])[-1]
            log.warning("image %s: lazy mount at pull failed (%s); a container start retries it", image_ref, last)
            try:
                with self.store.transaction(write=True) as tx:
                    ms.set_image_status(tx, image_ref, "failed", f"lazy mount at pull failed: {last}; "
                                                                 "retried when a container starts")
            except Exception:
                log.exception("recording the failed lazy mount of %s", image_ref)
        finally:
            with self._locks_lock:
                self._early.pop(name, None)

    def remove(self, key: str) -> None:
        with self._locks_lock:
            early = self._early.get(key)
        if early is not None:      # this bootstrap's mount is starting: let it finish, then free it below
            early.join()
        with self.store.transaction(write=True) as tx:
            sid, kind = ms.remove(tx, key)
            retired = self.layout.retire(sid)
            was_lazy = self.lazy is not None and ms.rafs_user_key(tx, sid) is not None
        with self._locks_lock:
            self._mount_locks.pop(sid, None)
        if was_lazy:
            try:
                self.lazy.release(sid)
            except Exception as e:   # cleanup() retries
                log.warning("releasing the RAFS mount of removed snapshot %s: %s", key, e)
        if retired is not None:
            try:
                remove_dir(retired)
            except OSError as e:
                log.warning("removing %s (left for cleanup): %s", retired, e)

    def cleanup(self) -> None:
        with self.store.transaction() as tx:
            live = set(ms.id_map(tx))
        for d in self.layout.orphans(live):
            try:
                remove_dir(d)
            except OSError as e:
                log.warning("cleanup: cannot remove %s: %s", d, e)
        if self.lazy is not None:
            self.lazy.cleanup(live)

    # -- lazy helpers ---------------------------------------------------------------------
    def _lazy_base(self, tx, parent_ids: list[int]) -> tuple[int, int, str] | None:
        """(index in parent_ids, bootstrap sid, image ref) of the nearest bootstrap parent."""
        if self.lazy is None:
            return None
        for i, pid in enumerate(parent_ids):
            info = ms.info_by_id(tx, pid)
            if info is not None and info.labels.get(LABEL_NYDUS_BOOTSTRAP) == "true" \
                    and info.labels.get(LABEL_CRI_IMAGE_REF):
                return i, pid, info.labels[LABEL_CRI_IMAGE_REF]
        return None

    def _mount_lock(self, sid: int) -> threading.Lock:
        with self._locks_lock:
            return self._mount_locks.setdefault(sid, threading.Lock())

    def _mounts(self, snap: ms.Snapshot, lazy: tuple[int, int, str] | None) -> list[Mount]:
        lowers = [self.layout.fs(p) for p in snap.parent_ids]
        if lazy is not None:
            i, boot_sid, image_ref = lazy
            with self._mount_lock(boot_sid):
                mnt = self.lazy.ensure(boot_sid, image_ref, self.layout.fs(boot_sid) / BOOTSTRAP_PATH)
            lowers = lowers[:i] + [mnt]
        active = snap.kind == Kind.ACTIVE
        return build_mounts(active=active, upper=self.layout.fs(snap.id),
                            work=self.layout.work(snap.id) if active else None, lowers=lowers,
                            index_off=self.index_off)

    def recover(self) -> None:
        """Re-attach or re-mount every RAFS mount a live snapshot still needs (startup)."""
        if self.lazy is None:
            return
        wanted: dict[int, tuple[str, Path]] = {}
        with self.store.transaction() as tx:
            for sid in ms.rafs_users(tx):
                info = ms.info_by_id(tx, sid)
                if info is not None and info.labels.get(LABEL_CRI_IMAGE_REF):
                    wanted[sid] = (info.labels[LABEL_CRI_IMAGE_REF], self.layout.fs(sid) / BOOTSTRAP_PATH)
            live = set(ms.id_map(tx))
        self.lazy.recover(wanted)
        self.lazy.cleanup(live)
