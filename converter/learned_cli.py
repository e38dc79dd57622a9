"""`nydusify learned show|pin|unpin|reset REF`: the learned prefetch record of an image (rafs.learned).

    nydusify learned show REF [--files] [--json]   # what earlier starts read, in first-access order
    nydusify learned show REF --patterns >LIST     # ... as a --prefetch-patterns file: convert again with it
                                                   # and the chunks move to the blobs' heads (a learned layout)
    nydusify learned pin REF                       # keep it as it is: mounts use it, never merge into it
    nydusify learned unpin REF
    nydusify learned reset REF [--pin]             # start over (with --pin: no learned prefetch for REF)

The record lives next to the image (its registry repository or OCI layout), tagged
`sha256-<bootstrap hex>.prefetch`; writing it needs push rights there, as a conversion does.
"""
from __future__ import annotations

import json
import time

from rafs.errors import RafsError
from rafs.learned import LearnedRecord, image_records, record_key, record_tag, replace_pinned

from .nydus_image import open_nydus_image


def add_parser(sub, common) -> None:
    lp = sub.add_parser("learned", help="show, pin, unpin or reset the learned prefetch record of an image")
    lsub = lp.add_subparsers(dest="learned_command", required=True)
    for name, text in (("show", "what earlier starts of REF read, in first-access order"),
                       ("pin", "freeze the record: mounts use it and never merge into it"),
                       ("unpin", "let mounts merge their starts into the record again"),
                       ("reset", "replace the record by an empty one (mounts start learning again)")):
        s = lsub.add_parser(name, help=text)
        s.add_argument("ref", help="HOST/REPO:TAG or oci:DIR[:TAG] of a converted image")
        if name == "show":
            s.add_argument("--files", action="store_true", help="list the files and ranges read")
            s.add_argument("--json", action="store_true")
            s.add_argument("--patterns", action="store_true",
                           help="print the files and ranges read as a `nydusify convert --prefetch-patterns` file")
        if name == "reset":
            s.add_argument("--pin", action="store_true", help="and pin it: no learned prefetch for this image")
        common(s)


def open_records(args):
    """(records next to the image, record key) of `args.ref`."""
    with open_nydus_image(args.ref, plain_http=args.plain_http, platform=args.platform,
                          hosts_dir=args.hosts_dir or None) as image:
        key = record_key(image.raw_bootstrap)
    records = image_records(args.ref, plain_http=args.plain_http, hosts_dir=args.hosts_dir or None)
    if records is None:
        raise RafsError(f"{args.ref}: learned records live next to a registry or OCI-layout image")
    return records, key


def learned_summary(args) -> dict | None:
    """The record's summary for `nydusify inspect` (None: no record; an error: its message)."""
    try:
        records, key = open_records(args)
        rec = records.get(key)
    except (RafsError, OSError, ValueError) as e:
        return {"error": str(e)}
    return None if rec is None else {**rec.summary(), "tag": record_tag(key),
                                     "first_files": [f[0] for f in rec.files[:10]]}


def run(args) -> int:
    records, key = open_records(args)
    where = f"{records.location}:{record_tag(key)}"
    if args.learned_command == "reset":
        empty = LearnedRecord(f"sha256:{key}", runs=0, pinned=args.pin, updated=time.time())
        records.put(key, empty)
        print(f"reset {where}" + (" (pinned: no learned prefetch for this image)" if args.pin else ""))
        return 0
    rec = records.get(key)
    if rec is None:
        raise RafsError(f"no learned prefetch record for {args.ref} ({where} does not exist): mount and run it once")
    if args.learned_command in ("pin", "unpin"):
        records.put(key, replace_pinned(rec, args.learned_command == "pin"))
        print(f"{args.learned_command}ned {where}: {rec.summary()['chunks']} chunks, {rec.runs} runs")
        return 0
    if args.patterns:
        print(patterns(rec), end="")
        return 0
    if args.json:
        print(json.dumps({"tag": record_tag(key), **rec.summary(),
                          **({"files": [{"path": p, "first_access_ms": t, "ranges": [list(r) for r in rs]}
                                        for p, t, rs in rec.files]} if args.files else {})}, indent=2))
        return 0
    print(render(rec, where, files=args.files))
    return 0


def patterns(rec: LearnedRecord) -> str:
    """The record's files as prefetch patterns (`PATH<TAB>OFFSET+LENGTH,...`), in first-access order; a
    path a line cannot carry (tab, newline) is left out with a comment."""
    lines = [f"# learned from {rec.runs} start(s) of bootstrap {rec.bootstrap}"]
    for path, _, ranges in rec.files:
        if "\t" in path or "\n" in path or "\r" in path:
            lines.append(f"# left out: {path!r}")
        elif ranges:
            lines.append(path + "\t" + ",".join(f"{o}+{n}" for o, n in ranges))
    return "\n".join(lines) + "\n"


def render(rec: LearnedRecord, where: str, *, files: bool = False) -> str:
    s = rec.summary()
    lines = [f"record   {where}",
             f"learned  from {s['runs']} start(s), updated {s['updated'] or '-'}"
             + (", PINNED" if s["pinned"] else ""),
             f"prefetch {s['chunks']} chunks, {s['bytes'] / 1e6:.2f} MB uncompressed, first read within "
             f"{s['last_access_ms'] / 1000:.2f} s of the start; {s['files']} files"]
    if files:
        for path, t, ranges in rec.files:
            lines.append(f"  {t / 1000:8.3f} s  {path}  {_ranges(ranges)}")
    return "\n".join(lines)


def _ranges(ranges) -> str:
    total = sum(n for _, n in ranges)
    shown = ", ".join(f"{o}+{n}" for o, n in ranges[:4]) + (", ..." if len(ranges) > 4 else "")
    return f"{total:,} bytes [{shown}]"
