"""OCI image -> RAFS image conversion, registry / OCI-layout I/O and the `nydusify` CLI."""
