"""Media types and annotations of OCI, Docker and nydusify-compatible images: each defined here once."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

#: Indexes (manifest lists): one image manifest per platform.
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
#: Image manifests (config + layers).
IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
#: Everything a registry serves under ``/v2/<repo>/manifests/``.
MANIFEST_TYPES = INDEX_TYPES | IMAGE_MANIFEST_TYPES
#: The ``Accept`` header of a manifest request.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

#: A Nydus RAFS v6 data blob layer (chunk data, ci array, ToC).
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
NYDUS_LAYER_TYPES = (NYDUS_BLOB,)
#: Layer annotations of a Nydus image (containerd forwards them to the snapshotter as labels).
ANNOTATION_BLOB = "containerd.io/snapshot/nydus-blob"
ANNOTATION_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANNOTATION_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
#: The bootstrap's path inside the bootstrap layer's tar.
BOOTSTRAP_NAME = "image/image.boot"

#: The tag of an entry of an OCI layout's index.json.
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
