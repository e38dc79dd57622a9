"""The snapshotter interface (containerd's ``snapshots.Snapshotter``) and its lifecycle contract.

Terms
-----
* **key** names an *active* or *view* snapshot: a writable (active) or
  read-only (view) filesystem that a caller mounts.
* **name** names a *committed* snapshot: an immutable layer, the parent of
  other snapshots. Keys and names share one namespace.
* **parent** is always a committed snapshot's name ("" for none).

Lifecycle
---------
Active snapshots never become committed in place: ``commit(name, key)``
creates the committed snapshot ``name`` with the content of active ``key``
and removes ``key``. A view can never be committed. A snapshot that has
children cannot be removed.

Importing a layer (what containerd's unpacker does)::

    mounts = prepare("ns/1/extract-<nanos> <chainID>", parent="<parent chain name>")
    # containerd mounts `mounts` and applies the layer tar
    commit("ns/2/<chainID>", "ns/1/extract-<nanos> <chainID>")

Running a container::

    mounts = prepare("ns/7/<container id>", parent="<top layer name>")   # rw rootfs
    ... remove("ns/7/<container id>")   # by containerd's GC, then cleanup()

Remote (lazy) layers
--------------------
A ``prepare`` carrying the label ``containerd.io/snapshot.ref`` (the layer's
chain ID) for a layer the snapshotter can serve without its content (a nydus
blob layer) commits a snapshot named after that label at once and raises
AlreadyExists; containerd then finds it with ``walk`` + ``stat`` and never
downloads the layer. Only then, and only with that label, is AlreadyExists an
answer to a fresh key (containerd treats it as an error otherwise).

Errors are the classes of ``snapshotter.errors``: NotFound, AlreadyExists,
FailedPrecondition, InvalidArgument.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from rafs.image import media

from .mounts import Mount

# -- labels (containerd and nydus conventions)
LABEL_SNAPSHOT_REF = "containerd.io/snapshot.ref"            # target chain ID of an unpack
LABEL_PREFIX = "containerd.io/snapshot/"                      # inherited labels containerd forwards
LABEL_CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
LABEL_CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
LABEL_CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
LABEL_CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
LABEL_NYDUS_BLOB = media.ANNOTATION_BLOB                      # the layer annotations, forwarded as labels
LABEL_NYDUS_BOOTSTRAP = media.ANNOTATION_BOOTSTRAP
LABEL_REMOTE = "containerd.io/snapshot/remote"               # set by us on lazily "committed" layers
LABEL_MAX_BYTES = 4096                                       # containerd's label validation limit


class Kind(enum.IntEnum):
    """Values as on the wire (containerd.services.snapshots.v1.Kind)."""
    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass
class Info:
    name: str
    parent: str = ""
    kind: Kind = Kind.UNKNOWN
    created_ns: int = 0
    updated_ns: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Usage:
    size: int = 0      # bytes
    inodes: int = 0


class Snapshotter(Protocol):
    """What ``service.py`` serves. Every method may raise the classes of ``snapshotter.errors``."""

    def stat(self, key: str) -> Info: ...

    def update(self, info: Info, fieldpaths: list[str]) -> Info:
        """Only labels can change: no paths (replace all labels), ``labels`` or ``labels.<k>``
        (set; an empty value deletes). Any other path: InvalidArgument. Bumps ``updated``."""

    def usage(self, key: str) -> Usage:
        """Cheap: recorded at commit for committed snapshots; the upper dir for active ones."""

    def mounts(self, key: str) -> list[Mount]:
        """Mounts of an active or view snapshot (FailedPrecondition for a committed one)."""

    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]: ...

    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]: ...

    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        """Labels are replaced by ``labels``; created == updated == now."""

    def remove(self, key: str) -> None:
        """Metadata now; disk space now or at ``cleanup``. FailedPrecondition with children."""

    def walk(self, fn: Callable[[Info], None], filters: list[str] | None = None) -> None:
        """Call ``fn`` for every snapshot matching any of ``filters`` (containerd filter syntax)."""

    def cleanup(self) -> None:
        """Reclaim what removed snapshots left behind (dirs, lazy mounts, cache)."""

    def close(self) -> None: ...


def iter_walk(sn: Snapshotter, filters: list[str] | None = None) -> Iterator[Info]:
    out: list[Info] = []
    sn.walk(out.append, filters)
    return iter(out)
