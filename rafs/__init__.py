"""RAFS: the image format (EROFS bootstrap + chunked blobs), its reader and writer.

`rafs` imports nothing from the other packages of pynydus.
"""
