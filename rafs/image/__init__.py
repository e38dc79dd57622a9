"""Where images live: references, platforms, media types, digests, the image store
(OCI layouts and registries) and the registry client.

    refs.py      image references (``oci:DIR[:TAG]``, ``HOST/REPO[:TAG][@DIGEST]``), Docker Hub aliasing
    platform.py  ``Platform`` (os/arch/variant, matching), the host's platform
    media.py     every media type and annotation pynydus reads or writes
    digests.py   what a valid ``sha256:<hex>`` digest and a blob id are
    store.py     ``ImageStore``: one interface over OCI layouts and registry repositories
    auth.py      registry credentials (docker's config.json, credential helpers) and auth challenges / tokens
    client.py    ``RegistryClient``: the OCI distribution API (requests, redirects, the retry loop)
    stream.py    the verified stream (a blob's sha256 checked at EOF)

The converter, the snapshotter and the mount daemon all see images through this
package; nothing here imports the rest of ``rafs`` except ``rafs.errors`` and
``rafs.osutil``, so the format layer may use ``media`` and ``digests`` freely.
This ``__init__`` imports nothing: take what you need from the modules.
"""
