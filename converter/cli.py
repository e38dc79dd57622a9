"""`nydusify`: convert, check, inspect and export RAFS images."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from rafs.blob import CHUNK_SIZE_DEFAULT
from rafs.compress import COMPRESSORS, canonical_compressor
from rafs.digest import DIGESTERS
from rafs.errors import RafsError
from rafs.image.hosts import DEFAULT_HOSTS_DIR

from .layer import LayerError


def _size(text: str) -> int:
    text = text.strip().lower()
    units = {"k": 1 << 10, "m": 1 << 20}
    if text.startswith("0x"):
        return int(text, 16)
    if text[-1:] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


REF_HELP = ("HOST/REPO:TAG or oci:DIR[:TAG] of a converted image, or a local bootstrap file, or a blob "
            "file carrying its own bootstrap (image.boot in its ToC)")


def add_blob_dir(sp) -> None:
    sp.add_argument("--blob-dir", metavar="DIR",
                    help="with a local bootstrap or blob file as REF: the folder of its blob files, each "
                         "named by its blob id (as nydusd's localfs backend); default for a blob file: its folder")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusify", description="Convert OCI images to lazily pulled RAFS images.")
    p.add_argument("--debug", action="store_true", help="log what happens")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, platform=None):
        sp.add_argument("--plain-http", action="store_true",
                        help="talk HTTP, not HTTPS, to registries (every side; a hosts.toml server/host "
                             "URL still says its own scheme)")
        sp.add_argument("--hosts-dir", metavar="DIR", default=DEFAULT_HOSTS_DIR,
                        help="containerd's registry hosts directory: DIR/HOST[:PORT]/hosts.toml (mirrors, "
                             "ca, client certificates, skip_verify, ...), as containerd reads it; "
                             f"default {DEFAULT_HOSTS_DIR}; '' reads none")
        (platform or sp).add_argument("--platform", help="os/arch[/variant] of a multi-platform image")

    def insecure(sp, *sides):
        for side in sides:
            sp.add_argument(f"--{side}-insecure", action="store_true",
                            help=f"skip verifying the {side.replace('-', ' ')} registry's TLS certificate, "
                                 "and speak HTTP to it if it answers in plain HTTP")

    c = sub.add_parser("convert", help="convert SRC (oci:DIR[:TAG] or HOST/REPO:TAG) into DST")
    c.add_argument("--source", required=True)
    c.add_argument("--target", required=True)
    c.add_argument("--chunk-size", type=_size, default=CHUNK_SIZE_DEFAULT,
                   help="power of two, 4K..16M (accepts 0x100000, 1M, 1048576); default 1M")
    c.add_argument("--compressor", type=canonical_compressor, choices=COMPRESSORS, default="zstd",
                   help="chunk compressor (Nydus's): zstd (default), lz4 (= lz4_block, a raw LZ4 block) or none")
    c.add_argument("--digester", choices=DIGESTERS, default="blake3",
                   help="chunk digester: blake3 (default, as nydusify) or sha256")
    insecure(c, "source", "target", "chunk-dict")
    c.add_argument("--chunk-dict", help="chunks to reuse, as nydus-image's --chunk-dict: the chunk table of a "
                                        "converted image (REF) or of a local bootstrap (or blob file carrying "
                                        "one), whose blobs must then be in the target; same chunk size and digester")
    c.add_argument("--prefetch-patterns", metavar="FILE",
                   help="paths to fetch first at mount, one per line: PATH (a file, or a directory: every "
                        "file below) or PATH<TAB>OFFSET+LENGTH,... (byte ranges of a file); their chunks "
                        "go first in the blobs, in this order")
    # as nydusify: every platform of an index into a new index (also the default without --platform);
    # nydusify ignores --platform then, here the two together are an error
    platforms = c.add_mutually_exclusive_group()
    platforms.add_argument("--all-platforms", action="store_true",
                           help="convert every platform of an index into a new index (the default without "
                                "--platform); not with --platform")
    common(c, platforms)

    k = sub.add_parser("check", help="verify that TARGET is a faithful conversion of SOURCE")
    k.add_argument("--source", required=True)
    k.add_argument("--target", required=True)
    insecure(k, "source", "target")
    common(k)

    i = sub.add_parser("inspect", help="summarize a converted image, or a bootstrap or blob file")
    i.add_argument("ref", help=REF_HELP)
    i.add_argument("--json", action="store_true")
    add_blob_dir(i)
    common(i)

    e = sub.add_parser("export", help="write DIR/image.boot and DIR/devices/N for a kernel EROFS mount")
    e.add_argument("ref", help=REF_HELP)
    e.add_argument("dir")
    add_blob_dir(e)
    common(e)

    from .mount_cli import add_parsers
    add_parsers(sub, common, add_blob_dir)
    from .learned_cli import add_parser as add_learned
    add_learned(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)     # `nydusify mount` re-runs itself under a holder
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except (RafsError, LayerError, ValueError, OSError) as e:
        print(f"nydusify {args.command}: error: {e}{_tls_hint(args, e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _tls_hint(args, e: BaseException) -> str:
    """For a TLS failure: the side's own flag that would get past it (convert, check)."""
    from rafs.image.hosts import namespace_of
    from rafs.image.refs import parse_ref
    from rafs.image.tls import TLSError
    if not isinstance(e, TLSError) or e.kind not in ("untrusted", "hostname", "plain-http"):
        return ""
    for side in ("source", "target", "chunk_dict"):
        ref = getattr(args, side, None)
        if not ref or not hasattr(args, f"{side}_insecure") or getattr(args, f"{side}_insecure"):
            continue
        try:
            r = parse_ref(ref)
        except (RafsError, ValueError):
            continue
        if r.kind != "oci" and e.host in (r.host, namespace_of(r.host), r.endpoint[0]):
            return f"; or give --{side.replace('_', '-')}-insecure"
    return ""


def _convert(args) -> int:
    from .convert import ConvertOptions, convert
    from .prefetch import read_patterns
    opts = ConvertOptions(chunk_size=args.chunk_size, compressor=args.compressor, digester=args.digester,
                          chunk_dict=args.chunk_dict, platform=None if args.all_platforms else args.platform,
                          plain_http=args.plain_http, hosts_dir=args.hosts_dir or None,
                          source_insecure=args.source_insecure, target_insecure=args.target_insecure,
                          chunk_dict_insecure=args.chunk_dict_insecure,
                          prefetch_patterns=read_patterns(args.prefetch_patterns) if args.prefetch_patterns else [],
                          progress=True)
    start = time.monotonic()
    results = convert(args.source, args.target, opts)
    elapsed = time.monotonic() - start
    for r in results:
        size = sum(b.info.compressed_size for b in r.blobs)
        print(f"converted {r.platform or 'image'}: {r.descriptor['digest']}  {len(r.blobs)} blobs, "
              f"{size / 1e6:.1f} MB (source {r.source_bytes / 1e6:.1f} MB), {r.uploaded} uploaded")
    print(f"{args.target} written in {elapsed:.1f} s")
    return 0


def _check(args) -> int:
    from .check import check
    problems, stats = check(args.source, args.target, plain_http=args.plain_http, platform=args.platform,
                            hosts_dir=args.hosts_dir or None, source_insecure=args.source_insecure,
                            target_insecure=args.target_insecure)
    if problems:
        print(f"check FAILED: {len(problems)} differences between {args.source} and {args.target}:")
        for line in problems[:200]:
            print("  " + line)
        if len(problems) > 200:
            print(f"  ... and {len(problems) - 200} more")
        return 1
    platforms = f" ({stats['platforms']} platforms)" if stats.get("platforms", 1) > 1 else ""
    print(f"check OK: {stats['entries']} entries equal, {stats['chunks_verified']} chunks in "
          f"{stats['blobs']} blobs verified{platforms}")
    return 0


def _inspect(args) -> int:
    from .inspect import render, summarize
    from .nydus_image import open_nydus_image
    with open_nydus_image(args.ref, plain_http=args.plain_http, platform=args.platform,
                          blob_dir=args.blob_dir, hosts_dir=args.hosts_dir or None) as image:
        summary = summarize(image)
    if not os.path.exists(args.ref):                 # the learned prefetch record next to the image
        from .learned_cli import learned_summary
        summary["learned"] = learned_summary(args)
    print(json.dumps(summary, indent=2) if args.json else render(summary))
    return 0


def _export(args) -> int:
    from .export import export
    from .nydus_image import open_nydus_image
    with open_nydus_image(args.ref, plain_http=args.plain_http, platform=args.platform,
                          blob_dir=args.blob_dir, hosts_dir=args.hosts_dir or None) as image:
        devices = export(image, args.dir)
    opts = ",".join(f"device={d}" for d in devices)
    print(f"wrote {args.dir}/image.boot and {len(devices)} devices; mount with mount(2): "
          f"source={args.dir}/image.boot type=erofs flags=MS_RDONLY data={opts or '(none)'}")
    return 0


def _learned(args) -> int:
    from .learned_cli import run
    return run(args)


def _mount_commands(name: str):
    def run(args) -> int:
        from .mount_cli import COMMANDS
        return COMMANDS[name](args)
    return run


_COMMANDS = {"convert": _convert, "check": _check, "inspect": _inspect, "export": _export, "learned": _learned,
             **{name: _mount_commands(name) for name in ("mount", "umount", "stats", "upgrade")}}

if __name__ == "__main__":
    sys.exit(main())
