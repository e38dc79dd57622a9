"""Media types and annotations of OCI, Docker and nydusify-compatible images."""

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
NYDUS_LAYER_TYPES = (NYDUS_BLOB,)
ANNOTATION_BLOB = "containerd.io/snapshot/nydus-blob"
ANNOTATION_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANNOTATION_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
BOOTSTRAP_NAME = "image/image.boot"
