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

The goals (issue 15, `GOALS`), side by side per image x workload x link in one table, misses in
**NO**: erofs+learned <= 1.15x erofs+prefetch and <= 1.3x the limit; erofs <= 1.5x the limit;
warm run <= 1.0x overlayfs's run after its pull; conversion <= 1.2x `gzip -dc | zstd -3` of the
same layers (per image, in the conversion table).
"""
from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from .prereq import require

MB = 1e6
MODE_ORDER = ["overlayfs", "fuse", "erofs", "fuse+prefetch", "erofs+prefetch", "erofs+learned", "warm", "p2p"]
LAZY = ["fuse", "erofs", "fuse+prefetch", "erofs+prefetch", "erofs+learned", "warm", "p2p"]
# (key, label, goal): ratio <= goal is met
GOALS = [("learned_vs_prefetch", "erofs+learned / erofs+prefetch", 1.15),
         ("learned_vs_limit", "erofs+learned / limit", 1.3),
         ("erofs_vs_limit", "erofs / limit", 1.5),
         ("warm_vs_overlayfs", "warm run / overlayfs run after its pull", 1.0)]
CONVERSION_GOAL = 1.2            # nydusify convert / `gzip -dc | zstd -3` of the same layers
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
            s["prefetch_bytes"] = median([(r.get("daemon") or {}).get("prefetch_bytes") for r in ok])
            rec = [((r.get("learned") or {}).get("record") or {}) for r in ok]
            s["learned_bytes"] = median([x.get("bytes") for x in rec])
            s["learned_chunks"] = median([x.get("chunks") for x in rec])
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
    L.extend(goals_summary(summ, links, pairs, meta))
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
                 "bytes the lazy mount served to reads; prefetched MB = bytes its prefetch (list or learned record) "
                 "had fetched when the workload was ready; peer MB = chunk bytes a p2p node got from its peer; read MB "
                 "= pages the workload touched (recorded once); chunks MB = the 1 MiB chunks holding them, as "
                 "stored; load = 1-min load average at the run's start.\n")
        L.append("| image | workload | mode | runner | pull | create | ready | **total** (range) | rerun | "
                 "registry MB (requests) | served MB | prefetched MB | peer MB | read MB | chunks MB (zstd) | load |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for image, wl in pairs:
            for m in modes:
                s = summ.get((link, image, wl, m))
                if not s:
                    continue
                if s["n"] == 0:
                    why = s.get("skipped") or s.get("error") or "?"
                    L.append(f"| {image} | `{wl}` | {m} | | | | | {'skipped' if s.get('skipped') else 'FAILED'}: "
                             f"{why[:160].replace('|', '/').replace(chr(10), ' ')} | | | | | | | | |")
                    continue
                rg = s.get("total_range") or (None, None)
                L.append(
                    f"| {image} | `{wl}` | {m} | {s.get('runner') or ''} | {_f(s['pull_s'])} | {_f(s['create_s'])} | "
                    f"{_f(s['ready_s'])} | **{_f(s['total_s'])}** ({_f(rg[0])}–{_f(rg[1])}) | {_f(s.get('rerun_s'))} | "
                    f"{_f(s['fetched_bytes'] and s['fetched_bytes'] / MB, '{:.1f}')} ({_f(s['requests'], '{:.0f}')}) | "
                    f"{_f(s.get('served_bytes') and s['served_bytes'] / MB, '{:.1f}')} | "
                    f"{_f(None if s.get('prefetch_bytes') is None else s['prefetch_bytes'] / MB, '{:.1f}')} | "
                    f"{_f(None if s.get('peer_bytes') is None else s['peer_bytes'] / MB, '{:.1f}')} | "
                    f"{_f(s['read_bytes'] and s['read_bytes'] / MB, '{:.1f}')} | "
                    f"{_f(s['chunk_compressed_bytes'] and s['chunk_compressed_bytes'] / MB, '{:.1f}')} | "
                    f"{_f(s.get('load_1m'), '{:.1f}')} |")
        L.append("")
        L.extend(_learned(summ, link, pairs))
        L.extend(_goals(summ, link, pairs, bps))
    L.extend(_conversions(meta))
    L.extend(_records(meta))
    L.append("![time to ready](chart.png)\n")
    return "\n".join(L) + "\n"


def goal_checks(summ, link, image, wl, bps) -> dict:
    """The issue's goals for one image x workload on one link: key -> (ratio, goal, detail) or absent
    when a side was not measured."""
    out = {}
    lim = physical_limit(summ, link, image, wl, bps)

    def total(m):
        s = summ.get((link, image, wl, m))
        return s["total_s"] if s and s["n"] and s.get("total_s") else None
    learned, pf, erofs = total("erofs+learned"), total("erofs+prefetch"), total("erofs")
    if learned and pf:
        out["learned_vs_prefetch"] = (learned / pf, 1.15, f"{learned:.2f} vs {pf:.2f} s")
    if learned and lim:
        out["learned_vs_limit"] = (learned / lim, 1.3, f"{learned:.2f} vs {lim:.2f} s")
    if erofs and lim:
        out["erofs_vs_limit"] = (erofs / lim, 1.5, f"{erofs:.2f} vs {lim:.2f} s")
    w = summ.get((link, image, wl, "warm"))
    base = summ.get((link, image, wl, "overlayfs"), {})
    if w and w["n"] and w.get("ready_s") and base.get("ready_s"):
        out["warm_vs_overlayfs"] = (w["ready_s"] / base["ready_s"], 1.0,
                                    f"{w['ready_s']:.2f} vs {base['ready_s']:.2f} s; warm incl. mount "
                                    f"{w['total_s']:.2f} s; overlayfs rerun {_f(base.get('rerun_s'))} s")
    return out


def _g(goal: float) -> str:
    """1.0 -> "1.0", 1.15 -> "1.15" (a goal as the issue writes it)."""
    return f"{goal:.2f}".rstrip("0").rstrip(".") if goal != int(goal) else f"{goal:.1f}"


def _met(ratio: float, goal: float) -> str:
    return "yes" if ratio <= goal + 1e-9 else "**NO**"


def goals_summary(summ, links, pairs, meta) -> list[str]:
    """One table of the issue's goals, every image x workload x link side by side, then conversion."""
    lm = meta.get("links", {})
    rows, misses, checks = [], [], 0
    for link in links:
        bps = ((lm.get(link) or {}).get("throughput") or {}).get("bits_per_s")
        for image, wl in pairs:
            g = goal_checks(summ, link, image, wl, bps)
            if not g:
                continue
            cells = [(lm.get(link) or {}).get("name", link), image, f"`{wl}`"]
            for key, label, goal in GOALS:
                if key not in g:
                    cells.append("–")
                    continue
                r = g[key][0]
                checks += 1
                if r > goal + 1e-9:
                    misses.append(f"{link} {image} `{wl}` {label}: {r:.2f}× (goal ≤ {_g(goal)}×, "
                                  f"{(r / goal - 1) * 100:.0f} % over; {g[key][2]})")
                cells.append(f"{r:.2f}× {_met(r, goal)}")
            rows.append("| " + " | ".join(cells) + " |")
    conv = _conversion_ratios(meta)
    L = []
    if rows or conv:
        L.append("## Goals (issue 15), side by side in this run\n")
        L.append("Ratios of medians; limit = the physical limit (warm total + the read chunks' stored bytes / "
                 "measured goodput). warm run / overlayfs run = the run once the lazy mount from a warm cache "
                 "is up vs the run once `ctr images pull` completed.\n")
    if rows:
        hdr = ["link", "image", "workload"] + [f"{label} (≤ {_g(goal)}×)" for _, label, goal in GOALS]
        L.append("| " + " | ".join(hdr) + " |")
        L.append("|" + "---|" * len(hdr))
        L.extend(rows)
        L.append("")
    if conv:
        L.append("Conversion (as `python -m benchmarks.convert` measures it): converter.convert() of the image's "
                 "OCI layout into a local layout vs `gzip -dc LAYER | zstd -3 >/dev/null` of the same layer files, "
                 "best of the runs in the conversion table's `runs` column.\n")
        L.append(f"| image | convert() s | `gzip -dc \\| zstd -3` s | convert / baseline (≤ {_g(CONVERSION_GOAL)}×) |")
        L.append("|---|---|---|---|")
        for image, (cs, bs, r, note) in conv.items():
            if r is None:
                L.append(f"| {image} | – | – | {note} |")
                continue
            checks += 1
            if r > CONVERSION_GOAL + 1e-9:
                misses.append(f"conversion of {image}: {r:.2f}× of `gzip -dc | zstd -3` (goal ≤ "
                              f"{_g(CONVERSION_GOAL)}×; {cs:.2f} vs {bs:.2f} s)")
            L.append(f"| {image} | {cs:.2f} | {bs:.2f} | {r:.2f}× {_met(r, CONVERSION_GOAL)} |")
        L.append("")
    if checks:
        L.append(f"Met {checks - len(misses)} of {checks} checks." + (" Misses:" if misses else ""))
        L.extend(f"- {m}" for m in misses)
        L.append("")
    L.extend(_limit_caveat(summ, links))
    return L


def _limit_caveat(summ, links) -> list[str]:
    """A note when the limit's warm mount is slower than the cold modes' whole pull (the limit, built
    on the warm total, is then generous: ratios to it understate the distance to the real limit)."""
    warm = [s["pull_s"] for k, s in summ.items() if k[3] == "warm" and k[0] in links and s.get("pull_s")]
    cold = [s["pull_s"] for k, s in summ.items() if k[3] in ("erofs", "erofs+prefetch", "erofs+learned")
            and k[0] in links and s.get("pull_s")]
    if not warm or not cold or median(warm) <= 1.2 * median(cold):
        return []
    return [f"Note: the limit's warm mount (`nydusify mount` on a warm cache, the warm row's pull) took "
            f"{median(warm):.2f} s (median), the cold erofs modes' whole pull {median(cold):.2f} s: the limit "
            f"carries ~{median(warm) - median(cold):.2f} s of mount start-up the cold modes do not pay, so "
            f"ratios to it understate the distance to the real limit.\n"]


def _conversion_ratios(meta: dict) -> dict:
    """image -> (convert s, baseline s, ratio, note): benchmarks.convert's measure (converter.convert()
    of the OCI layout to a local layout vs `gzip -dc | zstd -3` of the same layer files)."""
    out = {}
    for image, c in (meta.get("conversions") or {}).items():
        b = c.get("baseline") or {}
        cs, bs = b.get("convert_s"), b.get("seconds")
        if cs and bs:
            out[image] = (cs, bs, cs / bs, "")
        else:
            why = b.get("error") or ("no convert() timing in this run" if b else "not run (--convert-repeat 0)")
            out[image] = (None, None, None, f"not measured here ({why[:80]}): "
                                            f"`python -m benchmarks.convert --source oci:LAYOUT:TAG`")
    return out


def _goals(summ, link, pairs, bps) -> list[str]:
    L = ["### Goals on this link\n", "| image | workload | check | value | goal | met |", "|---|---|---|---|---|---|"]
    labels = {k: (label, goal) for k, label, goal in GOALS}
    for image, wl in pairs:
        base = summ.get((link, image, wl, "overlayfs"), {})
        lim = physical_limit(summ, link, image, wl, bps)
        bt = base.get("total_s")
        for m in ("fuse", "erofs", "fuse+prefetch", "erofs+prefetch", "erofs+learned", "warm", "p2p"):
            s = summ.get((link, image, wl, m))
            if s and s["n"] and bt:
                ok = s["total_s"] <= bt
                L.append(f"| {image} | `{wl}` | {m} never slower than overlayfs | {s['total_s']:.2f} vs {bt:.2f} s | "
                         f"≤ 1.0× | {'yes' if ok else '**NO**'} |")
        s = summ.get((link, image, wl, "erofs+prefetch"))
        if s and s["n"] and lim:
            r = s["total_s"] / lim
            L.append(f"| {image} | `{wl}` | erofs+prefetch vs physical limit | {r:.2f}× ({s['total_s']:.2f} vs "
                     f"{lim:.2f} s) | ≤ 1.3× | {_met(r, 1.3)} |")
        for key, (r, goal, detail) in goal_checks(summ, link, image, wl, bps).items():
            L.append(f"| {image} | `{wl}` | {labels[key][0]} | {r:.2f}× ({detail}) | ≤ {_g(goal)}× | {_met(r, goal)} |")
        if wl.startswith("py-sci") and link == "100mbit" and bt:
            best = [summ[(link, image, wl, m)]["total_s"] for m in ("erofs+prefetch", "erofs+learned", "erofs",
                                                                     "fuse+prefetch", "fuse")
                    if summ.get((link, image, wl, m), {}).get("n")]
            if best:
                r = bt / min(best)
                L.append(f"| {image} | `{wl}` | best pynydus mode vs overlayfs at 100 Mbit/s | {r:.1f}× faster | "
                         f"≥ 6× | {'yes' if r >= 6 else '**NO**'} |")
    L.append("")
    return L


def _learned(summ, link, pairs) -> list[str]:
    """erofs+learned: the record the priming run published and what the timed start prefetched by it."""
    L = []
    for image, wl in pairs:
        s = summ.get((link, image, wl, "erofs+learned"))
        if not s or not s["n"]:
            continue
        pf = summ.get((link, image, wl, "erofs+prefetch")) or {}
        er = summ.get((link, image, wl, "erofs")) or {}
        L.append(f"| {image} | `{wl}` | {_f(s.get('learned_chunks'), '{:.0f}')} | "
                 f"{_f(s.get('learned_bytes') and s['learned_bytes'] / MB, '{:.1f}')} | "
                 f"{_f(s.get('prefetch_bytes') is not None and s['prefetch_bytes'] / MB, '{:.1f}')} | "
                 f"{_f(s['chunk_compressed_bytes'] and s['chunk_compressed_bytes'] / MB, '{:.1f}')} | "
                 f"{_f(s['fetched_bytes'] and s['fetched_bytes'] / MB, '{:.1f}')} ({_f(s['requests'], '{:.0f}')}) | "
                 f"{_f(pf.get('fetched_bytes') and pf['fetched_bytes'] / MB, '{:.1f}')} ({_f(pf.get('requests'), '{:.0f}')}) | "
                 f"{_f(er.get('fetched_bytes') and er['fetched_bytes'] / MB, '{:.1f}')} ({_f(er.get('requests'), '{:.0f}')}) |")
    if not L:
        return []
    return ["### Learned prefetch (erofs+learned)\n",
            "Record = what the priming run (another node, `--learn auto`) published at unmount, as the timed start "
            "loaded it (chunks, uncompressed MB); prefetched = what the timed start's daemon had fetched by it when "
            "the workload was ready; read chunks = the recorded read set's chunks as stored; registry MB (requests) "
            "of the timed start next to erofs+prefetch's and erofs's.\n",
            "| image | workload | record chunks | record MB | prefetched MB | read chunks MB (zstd) | registry MB "
            "(req) | erofs+prefetch registry MB (req) | erofs registry MB (req) |",
            "|---|---|---|---|---|---|---|---|---|", *L, ""]


def _conversions(meta: dict) -> list[str]:
    conv = meta.get("conversions") or {}
    if not conv:
        return []
    ratios = _conversion_ratios(meta)
    L = ["## Conversion (nydusify convert, registry -> registry, loopback)\n",
         "CLI s = `nydusify convert` registry to registry on loopback as the suite converts (process start, pull, "
         "convert, push), when the image was last converted (conversions are cached while the source and the "
         "converter's code are unchanged). The issue's goal is measured as `python -m benchmarks.convert` does "
         "(benchmarks.convert.run, in this run): convert() = converter.convert() of the image's OCI layout into a "
         "local layout, baseline = `gzip -dc LAYER | zstd -3 >/dev/null` per source layer file, alternating, "
         "best of `runs`.\n",
         "| image | source gz MB | source tar MB | converted MB (blobs + bootstrap) | converted / source | "
         f"CLI s | convert() s | baseline s | runs | convert / baseline (≤ {_g(CONVERSION_GOAL)}×) | in-image dedup | "
         "with --chunk-dict: new blob MB | dict |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for image, c in conv.items():
        p = c.get("plain") or {}
        cd = c.get("chunk_dict") or {}
        cs, bs, r, note = ratios.get(image, (None, None, None, ""))
        ratio_cell = f"{r:.2f}× {_met(r, CONVERSION_GOAL)}" if r is not None else note
        L.append(f"| {image} | {_f(c.get('source_bytes') and c['source_bytes'] / MB, '{:.1f}')} | "
                 f"{_f(c.get('source_tar_bytes') and c['source_tar_bytes'] / MB, '{:.1f}')} | "
                 f"{_f(p.get('converted_bytes') and p['converted_bytes'] / MB, '{:.1f}')} | "
                 f"{_f(p.get('converted_bytes') and c.get('source_bytes') and p['converted_bytes'] / c['source_bytes'], '{:.2f}')} | "
                 f"{_f(p.get('seconds'))} | {_f(cs)} | {_f(bs)} | {(c.get('baseline') or {}).get('repeat') or '–'} | "
                 f"{ratio_cell} | {_f(p.get('dedup_ratio'), '{:.3f}')} | "
                 f"{_f(cd.get('new_blob_bytes') is not None and cd['new_blob_bytes'] / MB, '{:.1f}')} | "
                 f"{cd.get('dict') or '–'} |")
    x = meta.get("dedup_across") or {}
    if x:
        dicts = ", ".join(f"{i} against {(c.get('chunk_dict') or {}).get('dict')}'s conversion"
                          for i, c in conv.items() if (c.get("chunk_dict") or {}).get("dict")) or "none"
        L.append("")
        L.append(f"Across {x.get('images')} images: source layers (unique) {x['source_unique_bytes'] / MB:.1f} MB gz; "
                 f"converted, each image on its own: {x['sum_converted_bytes'] / MB:.1f} MB summed, "
                 f"{x['unique_plain_bytes'] / MB:.1f} MB unique blobs in the registry; with `--chunk-dict` "
                 f"({dicts}): {x['unique_cd_bytes'] / MB:.1f} MB unique. "
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
