"""results.json (+ meta.json) -> report.md and chart.png.

    python -m benchmarks.report DIR          # re-render DIR/report.md and DIR/chart.png

Medians over repeats.  Ratios:
* speed-up vs (a): overlayfs total / mode total (> 1: pynydus is faster);
* vs the physical limit: mode total / limit, where limit = (e) warm total
  (container start + the workload with every byte local, incl. the lazy mount
  itself) + compressed bytes of the chunks the workload reads / the link's
  measured goodput;
* warm vs (a)'s run after a completed pull: warm ready_s (the run once its lazy mount from a
  warm cache is up) / overlayfs ready_s (the run once its pull completed); the warm total,
  which adds the mount itself (~0.3 s), is shown next to it.
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from .prereq import require

MB = 1e6
MODE_ORDER = ["overlayfs", "fuse", "erofs", "fuse+prefetch", "erofs+prefetch", "warm", "p2p"]
LAZY = ["fuse", "erofs", "fuse+prefetch", "erofs+prefetch", "warm", "p2p"]
REQUIRED = ("image", "workload", "mode", "link", "repeat", "pull_s", "ready_s", "total_s", "fetched_bytes",
            "read_bytes")


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def summarize(rows: list[dict]) -> dict:
    """(link, image, workload, mode) -> medians and counts of the successful runs."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["link"], r["image"], r["workload"], r["mode"])].append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("ok")]
        s = {"n": len(ok), "runs": len(rs),
             "skipped": next((r["skipped"] for r in rs if r.get("skipped")), None),
             "error": next((r["error"] for r in rs if r.get("error")), None)}
        for k in ("pull_s", "create_s", "ready_s", "total_s", "fetched_bytes", "requests", "read_bytes",
                  "chunk_compressed_bytes", "rerun_s", "load_1m"):
            s[k] = median([r.get(k) for r in ok])
        if ok:
            s["total_range"] = (min(r["total_s"] for r in ok), max(r["total_s"] for r in ok))
            s["runner"] = ok[0].get("runner")
            served = [((r.get("daemon") or {}).get("bytes_read")) for r in ok]
            s["served_bytes"] = median(served)
            s["peer_bytes"] = median([_peer_bytes(r) for r in ok])
        out[key] = s
    return out


def _peer_bytes(r: dict) -> int | None:
    node = ((r.get("p2p") or {}).get("node") or {})
    peers = node.get("peers")
    if not isinstance(peers, dict):
        return None
    return sum(int(p.get("bytes") or 0) for p in peers.values())


def physical_limit(summ: dict, link: str, image: str, wl: str, link_bps: float | None) -> float | None:
    warm = summ.get((link, image, wl, "warm"))
    cb = None
    for m in MODE_ORDER:
        s = summ.get((link, image, wl, m))
        if s and s.get("chunk_compressed_bytes") is not None:
            cb = s["chunk_compressed_bytes"]
            break
    if not warm or warm.get("total_s") is None or cb is None:
        return None
    transfer = cb * 8 / link_bps if link_bps else 0.0
    return warm["total_s"] + transfer


def render(rows: list[dict], meta: dict) -> str:
    summ = summarize(rows)
    links = [l for l in meta.get("links_order", []) if any(k[0] == l for k in summ)] or \
        sorted({k[0] for k in summ})
    pairs = []
    for r in rows:
        p = (r["image"], r["workload"])
        if p not in pairs:
            pairs.append(p)
    modes = [m for m in MODE_ORDER if any(k[3] == m for k in summ)]
    lm = meta.get("links", {})
    L = []
    L.append("# Lazy-start benchmark\n")
    L.append(f"Command: `{meta.get('command', '?')}`  ")
    env = meta.get("environment", {})
    starts = sorted(r["started"] for r in rows if r.get("started"))
    first, last = (starts[0].replace("T", " "), starts[-1].replace("T", " ")) if starts else ("?", "?")
    resumed = f" (continued with --resume after {meta['resumed_after_runs']} runs)" if meta.get("resumed_after_runs") else ""
    L.append(f"Runs from {first} to {last}{resumed} on {env.get('host', '?')} "
             f"({env.get('cpus', '?')} vCPU, kernel {env.get('kernel', '?')}), shared with other sessions: "
             f"1-min load average at the runs' starts median {_f(median([r.get('load_1m') for r in rows]))}, "
             f"max {_f(max([r.get('load_1m') or 0 for r in rows] or [0]))}.  ")
    L.append(f"Repeats: {meta.get('repeat', '?')} (medians shown). Runner for pynydus modes: "
             f"**{meta.get('runner', '?')}** ({meta.get('runner_note', '')}). Baseline (a): containerd "
             f"{env.get('containerd', '?')} overlayfs, `ctr images pull` + `ctr run` (fetch all, then unpack).  ")
    L.append("Registry: docker-registry on 127.0.0.1, its blobs hot in the page cache (warm registry, same for "
             "every mode); containerd root and pynydus caches on one fresh loop-mounted ext4.\n")
    for link in links:
        info = lm.get(link, {})
        bps = (info.get("throughput") or {}).get("bits_per_s")
        L.append(f"## Link: {info.get('label', link)}\n")
        if bps:
            L.append(f"Measured goodput to the registry over this link: {bps / 1e6:.0f} Mbit/s "
                     f"(curl of a {info['throughput']['bytes'] / MB:.0f} MB blob).\n")
        # main table: total time to ready per mode, with speed-up
        hdr = ["image", "workload"] + [f"{m}" for m in modes] + ["limit"]
        L.append("### Time to ready (s): pull requested -> workload ready, median\n")
        L.append("Cells: total seconds (speed-up vs overlayfs ×; for pynydus modes also × of the physical "
                 "limit).\n")
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        for image, wl in pairs:
            base = summ.get((link, image, wl, "overlayfs"), {})
            bt = base.get("total_s")
            lim = physical_limit(summ, link, image, wl, bps)
            cells = [image, f"`{wl}`"]
            for m in modes:
                s = summ.get((link, image, wl, m))
                if not s:
                    cells.append("")
                elif s["n"] == 0:
                    cells.append("skipped" if s.get("skipped") else "**failed**")
                else:
                    t = s["total_s"]
                    extra = []
                    if m != "overlayfs" and bt:
                        extra.append(f"{bt / t:.1f}×")
                    if m in LAZY and m not in ("warm", "p2p") and lim:   # p2p fetches from a LAN peer
                        extra.append(f"{t / lim:.2f}× lim")
                    cells.append(f"**{t:.2f}**" + (f" ({', '.join(extra)})" if extra else ""))
            cells.append(_f(lim))
            L.append("| " + " | ".join(cells) + " |")
        L.append("")
        # detail table
        L.append("### Per mode: pull / create / ready / total (s), bytes from the registry, bytes read\n")
        L.append("Columns: pull = pull requested -> image usable (ctr pull / rpull / lazy mount); create = image "
                 "usable -> task started (containerd's /tasks/start event; part of ready); ready = image usable -> "
                 "workload ready; rerun = the same container again right after (image local, page cache hot); "
                 "registry MB = every byte the registry sent (access log), with its request count; served MB = "
                 "bytes the lazy mount served to reads; peer MB = chunk bytes a p2p node got from its peer; read MB "
                 "= pages the workload touched (recorded once); chunks MB = the 1 MiB chunks holding them, as "
                 "stored; load = 1-min load average at the run's start.\n")
        L.append("| image | workload | mode | runner | pull | create | ready | **total** (range) | rerun | "
                 "registry MB (requests) | served MB | peer MB | read MB | chunks MB (zstd) | load |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for image, wl in pairs:
            for m in modes:
                s = summ.get((link, image, wl, m))
                if not s:
                    continue
                if s["n"] == 0:
                    why = s.get("skipped") or s.get("error") or "?"
                    L.append(f"| {image} | `{wl}` | {m} | | | | | {'skipped' if s.get('skipped') else 'FAILED'}: "
                             f"{why[:160].replace('|', '/').replace(chr(10), ' ')} | | | | | | | |")
                    continue
                rg = s.get("total_range") or (None, None)
                L.append(
                    f"| {image} | `{wl}` | {m} | {s.get('runner') or ''} | {_f(s['pull_s'])} | {_f(s['create_s'])} | "
                    f"{_f(s['ready_s'])} | **{_f(s['total_s'])}** ({_f(rg[0])}–{_f(rg[1])}) | {_f(s.get('rerun_s'))} | "
                    f"{_f(s['fetched_bytes'] and s['fetched_bytes'] / MB, '{:.1f}')} ({_f(s['requests'], '{:.0f}')}) | "
                    f"{_f(s.get('served_bytes') and s['served_bytes'] / MB, '{:.1f}')} | "
                    f"{_f(None if s.get('peer_bytes') is None else s['peer_bytes'] / MB, '{:.1f}')} | "
                    f"{_f(s['read_bytes'] and s['read_bytes'] / MB, '{:.1f}')} | "
                    f"{_f(s['chunk_compressed_bytes'] and s['chunk_compressed_bytes'] / MB, '{:.1f}')} | "
                    f"{_f(s.get('load_1m'), '{:.1f}')} |")
        L.append("")
        L.extend(_goals(summ, link, pairs, bps))
    L.extend(_conversions(meta))
    L.extend(_records(meta))
    L.append("![time to ready](chart.png)\n")
    return "\n".join(L) + "\n"


def _goals(summ, link, pairs, bps) -> list[str]:
    L = ["### Goals on this link\n", "| image | workload | check | value | goal | met |", "|---|---|---|---|---|---|"]
    for image, wl in pairs:
        base = summ.get((link, image, wl, "overlayfs"), {})
        lim = physical_limit(summ, link, image, wl, bps)
        bt = base.get("total_s")
        for m in ("fuse", "erofs", "fuse+prefetch", "erofs+prefetch", "warm", "p2p"):
            s = summ.get((link, image, wl, m))
            if s and s["n"] and bt:
                ok = s["total_s"] <= bt
                L.append(f"| {image} | `{wl}` | {m} never slower than overlayfs | {s['total_s']:.2f} vs {bt:.2f} s | "
                         f"≤ 1.0× | {'yes' if ok else '**NO**'} |")
        s = summ.get((link, image, wl, "erofs+prefetch"))
        if s and s["n"] and lim:
            r = s["total_s"] / lim
            L.append(f"| {image} | `{wl}` | erofs+prefetch vs physical limit | {r:.2f}× ({s['total_s']:.2f} vs "
                     f"{lim:.2f} s) | ≤ 1.3× | {'yes' if r <= 1.3 else '**NO**'} |")
        w = summ.get((link, image, wl, "warm"))
        if w and w["n"] and base.get("ready_s"):
            r = w["ready_s"] / base["ready_s"]
            L.append(f"| {image} | `{wl}` | warm run (after its mount) vs overlayfs run (after its pull) | {r:.2f}× "
                     f"({w['ready_s']:.2f} vs {base['ready_s']:.2f} s; warm incl. mount {w['total_s']:.2f} s; "
                     f"overlayfs rerun {_f(base.get('rerun_s'))} s) | ≤ 1.2× | {'yes' if r <= 1.2 else '**NO**'} |")
        if wl.startswith("py-sci") and link == "100mbit" and bt:
            best = [summ[(link, image, wl, m)]["total_s"] for m in ("erofs+prefetch", "erofs", "fuse+prefetch", "fuse")
                    if summ.get((link, image, wl, m), {}).get("n")]
            if best:
                r = bt / min(best)
                L.append(f"| {image} | `{wl}` | best pynydus mode vs overlayfs at 100 Mbit/s | {r:.1f}× faster | "
                         f"≥ 6× | {'yes' if r >= 6 else '**NO**'} |")
    L.append("")
    return L


def _conversions(meta: dict) -> list[str]:
    conv = meta.get("conversions") or {}
    if not conv:
        return []
    L = ["## Conversion (nydusify convert, registry -> registry, loopback)\n",
         "| image | source gz MB | source tar MB | converted MB (blobs + bootstrap) | converted / source | "
         "convert s | in-image dedup | with --chunk-dict: new blob MB | dict |",
         "|---|---|---|---|---|---|---|---|---|"]
    for image, c in conv.items():
        p = c.get("plain") or {}
        cd = c.get("chunk_dict") or {}
        L.append(f"| {image} | {_f(c.get('source_bytes') and c['source_bytes'] / MB, '{:.1f}')} | "
                 f"{_f(c.get('source_tar_bytes') and c['source_tar_bytes'] / MB, '{:.1f}')} | "
                 f"{_f(p.get('converted_bytes') and p['converted_bytes'] / MB, '{:.1f}')} | "
                 f"{_f(p.get('converted_bytes') and c.get('source_bytes') and p['converted_bytes'] / c['source_bytes'], '{:.2f}')} | "
                 f"{_f(p.get('seconds'))} | {_f(p.get('dedup_ratio'), '{:.3f}')} | "
                 f"{_f(cd.get('new_blob_bytes') is not None and cd['new_blob_bytes'] / MB, '{:.1f}')} | "
                 f"{cd.get('dict') or '–'} |")
    x = meta.get("dedup_across") or {}
    if x:
        L.append("")
        L.append(f"Across {x.get('images')} images: source layers (unique) {x['source_unique_bytes'] / MB:.1f} MB gz; "
                 f"converted, each image on its own: {x['sum_converted_bytes'] / MB:.1f} MB summed, "
                 f"{x['unique_plain_bytes'] / MB:.1f} MB unique blobs in the registry; with `--chunk-dict` "
                 f"(each image against its parent's conversion; pysci against gcc's): {x['unique_cd_bytes'] / MB:.1f} MB unique. "
                 f"Dedup ratio (bytes the images reference / bytes stored): without chunk dict "
                 f"{x['ratio_plain']:.2f}, with {x['ratio_cd']:.2f}.")
    L.append("")
    return L


def _records(meta: dict) -> list[str]:
    rec = meta.get("records") or {}
    if not rec:
        return []
    L = ["## What each workload reads (recorded once: fresh fuse-mode mount with readahead 0, chroot, strace + mincore)\n",
         "Pages read = resident pages of the image's files after the run (what the workload touched); chunks = the "
         "1 MiB chunks holding them, uncompressed and as stored (zstd): the registry bytes a perfect lazy loader "
         "needs, the numerator of the physical limit.\n",
         "| image | workload | files touched | their size MB | pages read MB | in chunks MB | chunks zstd MB | prefetch list |",
         "|---|---|---|---|---|---|---|---|"]
    for key, r in rec.items():
        L.append(f"| {r['image']} | `{r['workload']}` | {r['files']} | {r['file_bytes'] / MB:.1f} | "
                 f"{r['read_bytes'] / MB:.1f} | {r['chunk_bytes'] / MB:.1f} | {r['chunk_compressed_bytes'] / MB:.1f} | "
                 f"{r.get('prefetch_files', len(r.get('prefetch_list') or []))} files |")
    L.append("")
    return L


def chart(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summ = summarize(rows)
    links = [l for l in meta.get("links_order", []) if any(k[0] == l for k in summ)] or sorted({k[0] for k in summ})
    pairs = []
    for r in rows:
        if (r["image"], r["workload"]) not in pairs:
            pairs.append((r["image"], r["workload"]))
    modes = [m for m in MODE_ORDER if any(k[3] == m and v["n"] for k, v in summ.items())]
    fig, axes = plt.subplots(len(links), 1, figsize=(max(8, 1.4 * len(pairs) * max(1, len(modes)) / 3), 4 * len(links)),
                             squeeze=False)
    width = 0.8 / max(1, len(modes))
    colors = plt.get_cmap("tab10")
    for ax, link in zip(axes[:, 0], links):
        for j, m in enumerate(modes):
            xs, ys = [], []
            for i, p in enumerate(pairs):
                s = summ.get((link, p[0], p[1], m))
                if s and s["n"]:
                    xs.append(i + (j - (len(modes) - 1) / 2) * width)
                    ys.append(s["total_s"])
            ax.bar(xs, ys, width, label=m, color=colors(j))
        bps = ((meta.get("links", {}).get(link) or {}).get("throughput") or {}).get("bits_per_s")
        labelled = False
        for i, p in enumerate(pairs):
            lim = physical_limit(summ, link, p[0], p[1], bps)
            if lim:
                ax.hlines(lim, i - 0.42, i + 0.42, colors="black", linestyles="dashed", linewidth=1,
                          label=None if labelled else "physical limit")
                labelled = True
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels([f"{w}\n({i})" for i, w in pairs], fontsize=8)
        ax.set_ylabel("time to ready (s)")
        ax.set_title(f"pull requested -> workload ready, median — link: {meta.get('links', {}).get(link, {}).get('label', link)}")
        ax.grid(axis="y", alpha=0.3)
        if modes:
            ax.legend(fontsize=8, ncol=min(4, len(modes) + 1))
        else:
            ax.text(0.5, 0.5, "no successful runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def validate(rows: list[dict]) -> list[str]:
    problems = []
    for i, r in enumerate(rows):
        for k in REQUIRED:
            if k not in r:
                problems.append(f"run {i}: missing {k}")
        if r.get("mode") not in MODE_ORDER:
            problems.append(f"run {i}: unknown mode {r.get('mode')!r}")
    return problems


def write(out: Path, rows: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "report.md").write_text(render(rows, meta))
    chart(rows, meta, out / "chart.png")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.report DIR", file=sys.stderr)
        return 2
    require("python -m benchmarks.report", modules=["matplotlib"])
    d = Path(argv[0])
    rows = json.loads((d / "results.json").read_text())
    meta = json.loads((d / "meta.json").read_text()) if (d / "meta.json").exists() else {}
    (d / "report.md").write_text(render(rows, meta))
    chart(rows, meta, d / "chart.png")
    print(d / "report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
