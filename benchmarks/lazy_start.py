"""The lazy-start suite: realistic images x workloads x modes x links, side by side with containerd.

    python -m benchmarks.lazy_start [--images minbase python ...] [--workloads py-sci node ...]
                                    [--modes overlayfs erofs ...] [--link lo|1gbit|100mbit ...]
                                    [--repeat 3] [--quick] [--out DIR] [--runner auto|ctr|snapshotter|chroot]

Steps (each cached between runs under --workdir, default /var/tmp/pynydus-bench):
 1. build the Debian images (benchmarks.images: debootstrap + apt in a chroot + umoci), push them with
    skopeo to the suite's own docker-registry on 127.0.0.1 (storage kept in WORKDIR/registry);
 2. create a fresh loop-mounted ext4 for containerd's root and pynydus's caches (removed at the end);
 3. convert every image (`nydusify convert`, timed; again with `--chunk-dict` of its parent for the dedup
    numbers), record what each workload reads (benchmarks.prepare.record_workload), and convert again with
    that read set as `--prefetch-patterns` for the +prefetch modes;
 4. start a private containerd (root on the ext4);
 5. per link (a netns + veth + HTB + delay line for shaped links): per repeat, per workload, per mode, one
    cold start (benchmarks.modes), appended to DIR/results.json as it finishes;
 6. DIR/report.md + DIR/chart.png (benchmarks.report), DIR/meta.json (environment, conversions, read sets).

`--quick`: python + numpy images, `py-print` and `py-numpy`, loopback, one repeat, every mode.
Everything it mounts, starts or creates is undone on exit, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed.process import run

from . import report
from .prereq import require
from .images import DEFAULT_WORKDIR, IMAGES, ImageBuilder, Layout, image_stats, layer_stats
from .modes import MODES, Bench, run_mode
from .netshape import LINKS, ShapedLink, measure_throughput
from .prepare import Converter, record_workload, split_ref
from .sysutil import Cleanup, LoopExt4, load_average, run_root, umount_all_below
from .workloads import DEFAULT_WORKLOADS, QUICK_WORKLOADS, WORKLOADS, Workload, resolve

log = logging.getLogger("benchmarks.lazy_start")
REPO = "bench"
RECORD_VERSION = 3          # bump when record_workload's method changes (3: ranged prefetch lists)
# --chunk-dict per image: its parent, except pysci, whose scipy layer carries gcc (python3-pythran
# depends on it) and so shares chunks with the gcc image; its own parents' layers are identical blobs
# anyway.  Converted in CONVERT_ORDER so every dict exists first.
CHUNK_DICT = {"python": "minbase", "numpy": "python", "node": "minbase", "gcc": "minbase", "pysci": "gcc"}
CONVERT_ORDER = ["minbase", "python", "numpy", "node", "gcc", "pysci"]


def _registry_class():
    from testbed.registry import Registry
    return Registry


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.lazy_start", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", help=f"images (default: those of the workloads; known: {' '.join(IMAGES)})")
    p.add_argument("--workloads", nargs="+", help="workload names, NAME@IMAGE to run on another image "
                   f"(default: {' '.join(DEFAULT_WORKLOADS)}, limited to --images)")
    p.add_argument("--modes", nargs="+", default=None, choices=MODES, metavar="MODE",
                   help=f"default all: {' '.join(MODES)}")
    p.add_argument("--link", nargs="+", default=None, choices=list(LINKS), help="default lo")
    p.add_argument("--repeat", type=int, default=None, help="runs per cell (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="python + numpy, py-print + py-numpy, loopback, 1 repeat")
    p.add_argument("--out", help="output dir (default WORKDIR/results/DATE)")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    p.add_argument("--runner", default="auto", choices=["auto", "ctr", "snapshotter", "chroot"],
                   help="how pynydus modes start the container (auto: snapshotter if usable, else ctr)")
    p.add_argument("--extra-image", action="append", default=[], metavar="NAME=oci:DIR[:TAG]",
                   help="an image from an existing OCI layout instead of a Debian build (tests use busybox)")
    p.add_argument("--no-chunk-dict", action="store_true", help="skip the --chunk-dict conversions")
    p.add_argument("--convert-repeat", type=int, default=1, metavar="N",
                   help="the conversion goal per image (benchmarks.convert: convert() to a local layout vs "
                        "gzip -dc | zstd -3), best of N alternating runs (default 1; 0: not measured)")
    p.add_argument("--reconvert", action="store_true", help="convert again even if cached")
    p.add_argument("--rerecord", action="store_true", help="record the workloads' read sets again")
    p.add_argument("--timeout", type=float, default=600.0, help="per pull / run step")
    p.add_argument("--fast-size", default="16G", help="sparse size of the loop-mounted ext4")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in OUT/results.json and do only the missing ones")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def select(args) -> tuple[list[str], list[Workload], list[str], list[str], int]:
    """(images, workloads, modes, links, repeat) from the flags; --quick only changes the defaults."""
    extra = {e.split("=", 1)[0] for e in args.extra_image}
    images = list(args.images) if args.images else None
    wl_names = args.workloads
    if wl_names is None:
        pool = images or (["python", "numpy"] if args.quick else list(IMAGES))
        wl_names = [w for w in (QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS) if WORKLOADS[w].image in pool]
    workloads = resolve(wl_names)
    images = images or []
    for w in workloads:
        if w.image not in images:
            images.append(w.image)
    for i in images:
        if i not in IMAGES and i not in extra:
            raise SystemExit(f"unknown image {i!r}: give --extra-image {i}=oci:DIR:TAG or one of {' '.join(IMAGES)}")
    links = args.link or ["lo"]
    repeat = args.repeat or (1 if args.quick else 3)
    modes = list(args.modes or MODES)
    return images, workloads, modes, links, repeat


def prerequisites(args) -> tuple[list[str], list[str]]:
    """(system tools, Python modules) this run of the suite needs, from its flags."""
    images, _, modes, links, _ = select(args)
    extra = {e.split("=", 1)[0] for e in args.extra_image}
    tools = ["docker-registry", "skopeo", "mkfs.ext4", "mount", "truncate", "curl", "libfuse3"]
    if any(i not in extra for i in images):                 # Debian images are built (or found cached)
        tools += ["debootstrap", "umoci", "chroot"]
    if args.runner != "chroot":
        tools += ["containerd", "ctr", "runc"]
    if any(link != "lo" for link in links):
        tools += ["ip", "tc", "nsenter", "unshare"]
    return tools, ["matplotlib"]                            # the report's chart


def environment() -> dict:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    except OSError:
        pass
    ctr_v = out(["ctr", "--version"]).split()
    return {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(), "memory": mem,
            "python": platform.python_version(), "containerd": ctr_v[-1] if ctr_v else "?",
            "runc": (out(["runc", "--version"]).splitlines() or ["?"])[0],
            "git": out(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "--short", "HEAD"]),
            "load_start": [round(x, 2) for x in load_average()]}


def snapshotter_usable() -> str | None:
    """None if the containerd proxy snapshotter exists in this tree, else why not."""
    root = Path(__file__).resolve().parents[1] / "snapshotter"
    for mod in ("cli.py", "rpull.py", "lazy.py", "status.py"):
        if not (root / mod).exists():
            return f"snapshotter/{mod} does not exist yet"
    return None


def preflight_snapshotter(ctd, snaps: dict, ref: str, wl: Workload, config: dict) -> str | None:
    """rpull + `ctr run --snapshotter` of one image per mode; None if it works, else the error."""
    for snap in snaps.values():
        try:
            snap.reset(None, ctd)
            snap.rpull(ctd, ref, timeout=300)
            r = ctd.ctr("run", "--rm", "--net-host", "--snapshotter", snap.name, ref, f"pnbpre{os.getpid()}",
                        *wl.command(0), check=False, timeout=300)
            if r.returncode != 0 or (wl.expect and wl.expect not in r.stdout):
                return f"{snap.name}: ctr run failed: rc={r.returncode} {r.stderr.strip()[-300:]}"
        except Exception as e:  # noqa: BLE001 - report why the containerd path is not used
            return f"{snap.name}: {type(e).__name__}: {str(e)[-400:]}"
        finally:
            try:
                ctd.remove_all()
            except Exception:  # noqa: BLE001
                pass
    return None


class Suite:
    def __init__(self, args):
        self.args = args
        self.workdir = Path(args.workdir)
        self.images, self.workloads, self.modes, self.links, self.repeat = select(args)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.out = Path(args.out) if args.out else self.workdir / "results" / stamp
        self.rows: list[dict] = []
        resumed = 0
        if args.resume and (self.out / "results.json").exists():
            self.rows = json.loads((self.out / "results.json").read_text())
            resumed = len(self.rows)
        self.meta: dict = {"command": "python -m benchmarks.lazy_start " + " ".join(map(shlex.quote, sys.argv[1:])),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "repeat": self.repeat,
                           "images": self.images, "workloads": [w.name for w in self.workloads],
                           "modes": self.modes, "links_order": self.links, "links": {}}
        if resumed:
            self.meta["resumed_after_runs"] = resumed
        self.builder = ImageBuilder(self.workdir)
        self.extra = dict(e.split("=", 1) for e in args.extra_image)
        self.configs: dict[str, dict] = {}
        self.tags: dict[tuple[str, str], str] = {}
        self.records: dict[tuple[str, str], dict] = {}

    # ------------------------------------------------------------------ steps
    def build_and_push(self, reg) -> None:
        debian = [i for i in self.images if i not in self.extra]
        if debian:
            t0 = time.monotonic()
            built = self.builder.build(debian)
            self.meta["build"] = {"seconds": round(time.monotonic() - t0, 1), "images": built}
            self.builder.push(debian, reg.host, repo=REPO)
            for i in debian:
                self.configs[i] = self.builder.layout.config(i)
        for name, ref in self.extra.items():
            run(["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false", ref,
                 f"docker://{reg.host}/{REPO}/{name}:latest"], timeout=600)
            lay, tag = _oci_split(ref)
            self.configs[name] = Layout(lay).config(tag)
        for i in self.images:
            self.tags[(i, "oci")] = f"{REPO}/{i}:latest"

    def convert_all(self, reg) -> None:
        conv = Converter(self.workdir / "state", reg.host)
        self.meta["conversions"] = {}
        done_cd: dict[str, str] = {}
        order = sorted(self.images, key=lambda i: CONVERT_ORDER.index(i) if i in CONVERT_ORDER else len(CONVERT_ORDER))
        for image in order:
            src = f"{reg.host}/{REPO}/{image}:latest"
            plain = conv.convert(src, f"{reg.host}/{REPO}/{image}:nydus", force=self.args.reconvert)
            self.tags[(image, "nydus")] = f"{REPO}/{image}:nydus"
            entry = {"source_bytes": None, "plain": _conv_summary(plain)}
            stats = self._source_stats(image)
            entry.update(stats)
            if not self.args.no_chunk_dict:
                candidates = [CHUNK_DICT[image]] if image in CHUNK_DICT else []
                p = IMAGES[image].parent if image in IMAGES else None
                while p:
                    candidates.append(p)
                    p = IMAGES[p].parent
                parent = next((c for c in candidates if c in done_cd), None)
                if parent:
                    tag = f"nydus-cd-{parent}"                 # one tag per (image, dict): runs do not clobber
                    cd = conv.convert(src, f"{reg.host}/{REPO}/{image}:{tag}", chunk_dict=done_cd[parent],
                                      force=self.args.reconvert)
                    dict_rec = conv.db.get(split_ref(done_cd[parent])[1] + ":" + split_ref(done_cd[parent])[2])
                    entry["chunk_dict"] = {**_conv_summary(cd), "dict": parent,
                                           "new_blob_bytes": _new_blob_bytes(cd, dict_rec)}
                    done_cd[image] = f"{reg.host}/{REPO}/{image}:{tag}"
                else:                                          # nothing to dedup against: the plain one
                    cd = plain
                    entry["chunk_dict"] = {**_conv_summary(cd), "dict": None,
                                           "new_blob_bytes": _conv_summary(cd)["blob_bytes"]}
                    done_cd[image] = f"{reg.host}/{REPO}/{image}:nydus"
                entry["_cd_record"] = cd
            entry["_plain_record"] = plain
            entry["baseline"] = self._conversion_baseline(image)
            self.meta["conversions"][image] = entry
        self.meta["conversions"] = {i: self.meta["conversions"][i] for i in self.images}
        self.meta["dedup_across"] = _dedup_across(self.meta["conversions"])
        for e in self.meta["conversions"].values():
            e.pop("_cd_record", None)
            e.pop("_plain_record", None)
        self.converter = conv

    def _conversion_baseline(self, image: str) -> dict | None:
        """The issue's conversion goal, measured as `python -m benchmarks.convert --source oci:LAYOUT:TAG`
        does (benchmarks.convert.run, read-only use): converter.convert() of the image's OCI layout into
        a fresh local layout vs `gzip -dc LAYER | zstd -3 >/dev/null` per source layer, alternating,
        best of --convert-repeat.  (The conversion table's `convert s` is the registry -> registry CLI,
        pull and push included: not the goal's measure.)  None with --convert-repeat 0; an error entry
        when it cannot be measured here."""
        repeat = self.args.convert_repeat
        if repeat <= 0:
            return None
        try:
            from .convert import run as convert_bench
        except ImportError as e:
            return {"error": f"benchmarks.convert has no run(): {e}"}
        if image in self.extra:
            lay, tag = _oci_split(self.extra[image])
        else:
            lay, tag = str(self.builder.layout.path), image
        tmp = tempfile.mkdtemp(prefix="convbench-", dir=self.workdir)
        try:
            r = convert_bench(f"oci:{lay}:{tag}", repeat=repeat, workdir=tmp)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the table says it was not measured, and why
            log.warning("conversion baseline of %s: %s", image, e)
            return {"error": f"{type(e).__name__}: {e}"[-300:]}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"seconds": round(r.baseline_best, 2), "convert_s": round(r.convert_best, 2),
                "cpu_s": round(min(r.baseline_cpu_s), 2), "convert_cpu_s": round(min(r.convert_cpu_s), 2),
                "plain_bytes": r.plain_bytes, "layers": r.layers, "repeat": repeat,
                "when": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def _source_stats(self, image: str) -> dict:
        if image in self.extra:
            lay, tag = _oci_split(self.extra[image])
            layout = Layout(lay)
            man = layout.manifest(tag)
            st = {"source_bytes": 0, "source_tar_bytes": 0, "source_layers": [l["digest"] for l in man["layers"]],
                  "source_layer_sizes": {l["digest"]: l["size"] for l in man["layers"]}}
            for l in man["layers"]:
                st["source_bytes"] += l["size"]
                try:
                    st["source_tar_bytes"] += layer_stats(layout, l["digest"])["tar_bytes"]
                except Exception:  # noqa: BLE001 - a non-gzip layer: size unknown
                    st["source_tar_bytes"] = None
            return st
        s = image_stats(self.builder, image)
        man = self.builder.layout.manifest(image)
        return {"source_bytes": s["compressed"], "source_tar_bytes": s["tar_bytes"], "source_files": s["files"],
                "source_layers": [l["digest"] for l in man["layers"]],
                "source_layer_sizes": {l["digest"]: l["size"] for l in man["layers"]}}

    def record_all(self, reg, fast: Path, cleanup: Cleanup) -> None:
        self.meta["records"] = {}
        need_pf = any(m in ("fuse+prefetch", "erofs+prefetch") for m in self.modes)
        for wl in self.workloads:
            plain = self.converter.db[f"{REPO}/{wl.image}:nydus"]
            rec_dir = self.workdir / "records" / f"v{RECORD_VERSION}-{plain['digest'].split(':')[1][:16]}"
            rec_file = rec_dir / f"{wl.name}.json"
            if rec_file.exists() and not self.args.rerecord:
                rec = json.loads(rec_file.read_text())
            else:
                log.info("recording what %s reads on %s", wl.name, wl.image)
                rec = record_workload(f"{reg.host}/{REPO}/{wl.image}:nydus", wl, self.configs[wl.image],
                                      fast / "record", rec_dir, cleanup)
            self.records[(wl.image, wl.name)] = rec
            self.meta["records"][f"{wl.image}/{wl.name}"] = {k: v for k, v in rec.items() if k != "prefetch_list"} | {
                "prefetch_files": len(rec["prefetch_list"]), "prefetch_head": rec["prefetch_list"][:20]}
            if need_pf:
                tag = f"nydus-pf-{wl.name.replace('@', '-at-')}"
                self.converter.convert(f"{reg.host}/{REPO}/{wl.image}:latest", f"{reg.host}/{REPO}/{wl.image}:{tag}",
                                       prefetch_file=str(rec_dir / f"{wl.name}.prefetch"), force=self.args.reconvert)
                self.tags[(wl.image, f"pf:{wl.name}")] = f"{REPO}/{wl.image}:{tag}"

    def run(self) -> int:
        Registry = _registry_class()
        from rafs.kmount import erofs_file_backed_supported
        self.meta["environment"] = environment()
        runner = self.args.runner
        why_not = snapshotter_usable()
        if runner == "snapshotter" and why_not:
            raise SystemExit(f"--runner snapshotter: {why_not}")
        want_snap = runner == "snapshotter" or (runner == "auto" and why_not is None)
        notes = {"ctr": "`nydusify mount --daemon` in the link's netns + overlay + `ctr run --rootfs`: the same "
                        "containerd/runc start path as (a)",
                 "chroot": "`nydusify mount --daemon` + overlay + chroot (no containerd)",
                 "snapshotter": "`nydus-snapshotter rpull` + `ctr run --snapshotter nydus-MODE` (the containerd "
                                "path); warm mode still mounts with `nydusify mount` on a warm cache"}
        if runner == "auto" and why_not:
            runner = "ctr"
            self.meta["runner_note"] = f"containerd snapshotter path not used ({why_not}); " + notes["ctr"]
        elif runner != "auto":
            self.meta["runner_note"] = notes[runner]
        if runner == "chroot" and "overlayfs" in self.modes:
            self.modes.remove("overlayfs")
            self.meta["modes"] = self.modes
        self.meta["runner"] = runner
        self.out.mkdir(parents=True, exist_ok=True)
        with Cleanup() as cleanup:
            rr = run_root()
            rr.mkdir(parents=True, exist_ok=True)
            cleanup.push(lambda: (umount_all_below(rr), shutil.rmtree(rr, ignore_errors=True),
                                  _rmdir_quiet(rr.parent)), f"rm {rr}")
            reg = Registry(self.workdir / "registry")
            reg.access_log_path.unlink(missing_ok=True)       # counted per run from marks; start small
            reg.start()
            cleanup.push(reg.stop, "stop registry")
            # read the access log through the registry's own stdout: another process starting a
            # registry on the same --workdir removes WORKDIR/registry/access.log (as this one did above),
            # and the per-run registry bytes would silently read 0
            reg.access_log_path = Path(f"/proc/{reg.proc.pid}/fd/1")
            self.build_and_push(reg)
            fast = LoopExt4(self.workdir / "fast.img", self.workdir / "fast", size=self.args.fast_size).create(cleanup)
            self.convert_all(reg)
            self.record_all(reg, fast, cleanup)
            erofs_ok = erofs_file_backed_supported()
            ctd = None
            snaps = {}
            if runner != "chroot":
                from .ctd import Containerd, NydusSnapshotter
                if want_snap:
                    for fsmode in (["erofs", "fuse"] if erofs_file_backed_supported() else ["fuse"]):
                        snaps[fsmode] = NydusSnapshotter(fsmode, fast / "snap" / fsmode, str(rr / f"snap-{fsmode}.sock"))
                    if erofs_file_backed_supported() and "erofs+learned" in self.modes:
                        # a third snapshotter (proxy plugin nydus-erofs-learnuse) with [daemon] learn = "use":
                        # the learn option is per snapshotter config, and the erofs one must stay "off" to
                        # keep measuring erofs mode (restarting it per mode would cost containerd's proxy
                        # reconnect backoff every run and mix the modes' nodes)
                        snaps["erofs+learned"] = NydusSnapshotter("erofs", fast / "snap" / "erofs-learned",
                                                                  str(rr / "snap-erofs-learned.sock"), learn="use")
                    for sn in snaps.values():
                        # up before containerd: a proxy it cannot dial puts its gRPC connection into backoff
                        sn.start(cleanup)
                ctd = Containerd(fast / "ctd" / "root",
                                 snapshotters={s.name: s.address for s in snaps.values()}).start(cleanup)
                if want_snap:
                    wl0 = self.workloads[0]
                    err = preflight_snapshotter(ctd, snaps, f"{reg.host}/{self.tags[(wl0.image, 'nydus')]}",
                                                wl0, self.configs[wl0.image])
                    if err and runner == "snapshotter":
                        raise RuntimeError(f"--runner snapshotter: preflight failed: {err}")
                    if err:
                        for sn in snaps.values():
                            sn.teardown()
                        snaps = {}
                        runner = "ctr"
                        self.meta["runner_note"] = f"containerd snapshotter path not used (preflight failed: {err}); " \
                            + notes["ctr"]
                    else:
                        runner = "snapshotter"
                        self.meta["runner_note"] = notes["snapshotter"]
                    self.meta["runner"] = runner
            for link_name in self.links:
                with Cleanup() as lc:
                    link = ShapedLink(LINKS[link_name], reg.host, self.workdir, lc).up()
                    info = link.describe()
                    info["throughput"] = self._measure(link)
                    self.meta["links"][link_name] = info
                    b = Bench(self.workdir, fast, reg, link, cleanup, ctd=ctd, runner=runner,
                              configs=self.configs, records=self.records, tags=self.tags, erofs_ok=erofs_ok,
                              timeout=self.args.timeout, snapshotters=snaps)
                    done = {(r["link"], r["repeat"], r["workload"], r["mode"]) for r in self.rows}
                    for rep in range(self.repeat):
                        for wl in self.workloads:
                            for mode in self.modes:
                                if (link_name, rep, wl.name, mode) in done:
                                    continue
                                log.info("[%s] repeat %d: %s on %s, mode %s", link_name, rep, wl.name, wl.image, mode)
                                row = run_mode(b, mode, wl, rep)
                                self.rows.append(row)
                                _log_row(row)
                                self._save()
        self.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.meta["environment"]["load_end"] = [round(x, 2) for x in load_average()]
        report.write(self.out, self.rows, self.meta)
        print(f"wrote {self.out}/results.json, report.md, chart.png")
        failed = [r for r in self.rows if not r.get("ok") and not r.get("skipped")]
        return 1 if failed else 0

    def _measure(self, link: ShapedLink) -> dict | None:
        best = None
        for image in self.images:
            entry = self.meta["conversions"][image]
            for d, size in (entry.get("source_layer_sizes") or {}).items():
                if best is None or size > best[2]:
                    best = (image, d, size)
        if best is None:
            return None
        url = f"http://{link.registry_host}/v2/{REPO}/{best[0]}/blobs/{best[1]}"
        try:
            return measure_throughput(url, link.netns)
        except Exception as e:  # noqa: BLE001 - the report says it is unknown
            log.warning("measuring %s: %s", url, e)
            return None

    def _save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.rows, indent=1))


def _rmdir_quiet(p: Path) -> None:
    try:
        p.rmdir()
    except OSError:
        pass


def _oci_split(ref: str) -> tuple[str, str]:
    rest = ref[4:] if ref.startswith("oci:") else ref
    head, _, tail = rest.rpartition(":")
    if head and "/" not in tail:
        return head, tail
    return rest, "latest"


def _conv_summary(rec: dict) -> dict:
    s = rec.get("summary") or {}
    blobs = s.get("blobs") or []
    boot = sum(l["size"] for l in s.get("layers") or [] if l.get("kind") == "bootstrap")
    blob_bytes = sum(b["compressed_size"] for b in blobs)
    return {"seconds": rec.get("seconds"), "when": rec.get("when"), "digest": rec.get("digest"), "blob_bytes": blob_bytes,
            "bootstrap_bytes": boot, "converted_bytes": blob_bytes + boot,
            "dedup_ratio": (s.get("dedup") or {}).get("ratio"), "blobs": [b["id"] for b in blobs],
            "blob_sizes": {b["id"]: b["compressed_size"] for b in blobs}}


def _new_blob_bytes(cd: dict, dict_rec: dict | None) -> int:
    mine = _conv_summary(cd)["blob_sizes"]
    old = set(_conv_summary(dict_rec)["blob_sizes"]) if dict_rec else set()
    return sum(v for k, v in mine.items() if k not in old)


def _dedup_across(conv: dict) -> dict:
    if not conv:
        return {}
    src_unique: dict[str, int] = {}
    plain_unique: dict[str, int] = {}
    cd_unique: dict[str, int] = {}
    sum_conv = sum_cd = 0
    boot_plain = boot_cd = 0
    for e in conv.values():
        src_unique.update(e.get("source_layer_sizes") or {})
        p = e["plain"]
        plain_unique.update(p["blob_sizes"])
        sum_conv += p["converted_bytes"]
        boot_plain += p["bootstrap_bytes"]
        cd = e.get("chunk_dict")
        if cd:
            cd_unique.update(cd["blob_sizes"])
            sum_cd += cd["converted_bytes"]
            boot_cd += cd["bootstrap_bytes"]
    up = sum(plain_unique.values()) + boot_plain
    uc = sum(cd_unique.values()) + boot_cd if cd_unique else 0
    return {"images": len(conv), "source_unique_bytes": sum(src_unique.values()), "sum_converted_bytes": sum_conv,
            "unique_plain_bytes": up, "unique_cd_bytes": uc or up,
            "ratio_plain": sum_conv / up if up else 1.0, "ratio_cd": (sum_cd / uc) if uc else sum_conv / up if up else 1.0}


def _log_row(row: dict) -> None:
    if row.get("ok"):
        log.info("  -> pull %.2f  ready %.2f  total %.2f s, fetched %.1f MB in %s requests",
                 row["pull_s"], row["ready_s"], row["total_s"], (row.get("fetched_bytes") or 0) / 1e6,
                 row.get("requests"))
    else:
        log.info("  -> %s", row.get("skipped") and f"skipped: {row['skipped']}" or f"FAILED: {row.get('error')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if os.geteuid() != 0:
        print("needs root (mounts, containerd, network namespaces)", file=sys.stderr)
        return 2
    require("python -m benchmarks.lazy_start", *prerequisites(args))
    suite = Suite(args)
    try:
        return suite.run()
    except (KeyboardInterrupt, SystemExit) as e:
        code = 130 if isinstance(e, KeyboardInterrupt) else e.code
        print(f"interrupted ({code}); everything set up was undone; partial results in {suite.out} "
              "(continue with --resume)", file=sys.stderr)
        if suite.rows:
            suite.meta["interrupted"] = code
            suite.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            try:
                report.write(suite.out, suite.rows, suite.meta)
            except Exception as err:  # noqa: BLE001 - the rows are saved already
                print(f"report: {err}", file=sys.stderr)
        return code if isinstance(code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
