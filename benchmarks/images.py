"""Realistic benchmark images, built offline and reproducibly from Debian packages.

    python -m benchmarks.images [--workdir DIR] [--push HOST:PORT] [--force] [TAG ...]

`debootstrap --variant=minbase bookworm` against the machine's configured
Debian mirror, then one `apt-get install --no-install-recommends` per layer in
a chroot, each step repacked by umoci into ONE OCI image layout (layers shared
between tags):

    minbase  debootstrap --variant=minbase bookworm          1 layer
    python   + python3                                       2 layers
    numpy    + python3-numpy                                 3 layers
    pysci    + python3-scipy python3-pandas                  4 layers
    node     + nodejs                                        2 layers
    gcc      + gcc libc6-dev                                 2 layers

Reproducible: fixed SOURCE_DATE_EPOCH for image/history timestamps; files
written *during* a build step are clamped to it (files shipped by .debs keep
their package mtimes, so Debian's timestamp-based .pyc stay valid);
directories always get it; logs, caches and host-specific files are removed.
The same mirror state gives the same digests.

Cached: each tag carries a recipe key (parent digest + packages + epoch +
recipe version) as a manifest annotation and is skipped when it matches;
debootstrap's .debs are kept as a tarball and apt's .debs and lists in
`WORKDIR/cache`, so a rebuild needs only the mirror's index.  Bundles are
built on a tmpfs (the root disk costs ~1 ms per file created), unmounted
afterwards, even on failure.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import os
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from rafs.image.media import ANNOTATION_REF_NAME
from testbed.process import run

from .prereq import require
from .sysutil import Cleanup, bind_mount, mount, mounts_below, umount_all_below

log = logging.getLogger("benchmarks.images")

RECIPE_VERSION = 1
DEFAULT_WORKDIR = Path(os.environ.get("PYNYDUS_BENCH_DIR", "/var/tmp/pynydus-bench"))
SOURCE_DATE_EPOCH = 1767225600            # 2026-01-01T00:00:00Z
SUITE, ARCH = "bookworm", "amd64"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RECIPE_ANNOTATION = "org.pynydus.bench.recipe-key"
REPO = "bench"
APT_OPTS = ["-o", "Acquire::Languages=none", "-o", "Acquire::Check-Valid-Until=false",
            "-o", "Acquire::Check-Date=false", "-o", "APT::Sandbox::User=root", "-o", "Dpkg::Use-Pty=0"]


@dataclass(frozen=True)
class ImageSpec:
    tag: str
    parent: str | None
    packages: tuple[str, ...]
    cmd: str

    @property
    def created_by(self) -> str:
        if self.parent is None:
            return f"debootstrap --variant=minbase {SUITE}"
        return "apt-get install --no-install-recommends " + " ".join(self.packages)


IMAGES: dict[str, ImageSpec] = {s.tag: s for s in (
    ImageSpec("minbase", None, (), "/bin/bash"),
    ImageSpec("python", "minbase", ("python3",), "python3"),
    ImageSpec("numpy", "python", ("python3-numpy",), "python3"),
    ImageSpec("pysci", "numpy", ("python3-scipy", "python3-pandas"), "python3"),
    ImageSpec("node", "minbase", ("nodejs",), "node"),
    ImageSpec("gcc", "minbase", ("gcc", "libc6-dev"), "/bin/bash"),
)}


def build_order(tags) -> list[str]:
    """`tags` plus their ancestors, parents first, in IMAGES order."""
    want: set[str] = set()
    for t in tags:
        if t not in IMAGES:
            raise ValueError(f"unknown image {t!r} (known: {', '.join(IMAGES)})")
        while t:
            want.add(t)
            t = IMAGES[t].parent
    return [t for t in IMAGES if t in want]


def configured_mirror() -> str:
    """The first `URIs:` of the machine's deb822 Debian source (or `deb` line of sources.list)."""
    for p in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in p.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    sl = Path("/etc/apt/sources.list")
    if sl.exists():
        for line in sl.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in parts[-3]:
                return next(p for p in parts[1:] if "://" in p)
    return "http://deb.debian.org/debian"


class Layout:
    """Read-only peeks into an OCI image layout (index.json, manifests, blobs)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def blob(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / digest.split(":", 1)[1]

    def index(self) -> dict:
        p = self.path / "index.json"
        return json.loads(p.read_text()) if p.exists() else {"manifests": []}

    def digest(self, tag: str) -> str | None:
        for m in self.index().get("manifests") or []:
            if (m.get("annotations") or {}).get(ANNOTATION_REF_NAME) == tag:
                return m["digest"]
        return None

    def manifest(self, tag: str) -> dict | None:
        d = self.digest(tag)
        return json.loads(self.blob(d).read_text()) if d else None

    def config(self, tag: str) -> dict:
        return json.loads(self.blob(self.manifest(tag)["config"]["digest"]).read_text())

    def recipe_key(self, tag: str) -> str | None:
        m = self.manifest(tag)
        return (m.get("annotations") or {}).get(RECIPE_ANNOTATION) if m else None


class ImageBuilder:
    def __init__(self, workdir: str | os.PathLike = DEFAULT_WORKDIR, *, mirror: str | None = None,
                 source_date_epoch: int = SOURCE_DATE_EPOCH):
        self.workdir = Path(workdir)
        self.mirror = mirror or configured_mirror()
        self.sde = source_date_epoch
        self.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.sde))
        self.cache = self.workdir / "cache"
        self.layout = Layout(self.workdir / "oci" / "bench")
        self.build_dir = self.workdir / "build"
        self.logs = self.workdir / "logs"
        self.dbtar = self.cache / f"debootstrap-{SUITE}-minbase-{ARCH}.tgz"

    @property
    def layout_ref(self) -> str:
        return str(self.layout.path)

    def oci_ref(self, tag: str) -> str:
        return f"oci:{self.layout.path}:{tag}"

    # ------------------------------------------------------------------ public
    def recipe_key(self, spec: ImageSpec) -> str:
        parent_digest = self.layout.digest(spec.parent) if spec.parent else ""
        h = hashlib.sha256("\n".join([str(RECIPE_VERSION), SUITE, ARCH, str(self.sde), parent_digest or "",
                                      " ".join(spec.packages), spec.cmd]).encode())
        return h.hexdigest()[:32]

    def up_to_date(self, tag: str) -> bool:
        spec = IMAGES[tag]
        if spec.parent and not self.up_to_date(spec.parent):
            return False
        return self.layout.recipe_key(tag) == self.recipe_key(spec)

    def build(self, tags, *, force: bool = False) -> dict[str, dict]:
        """Build `tags` (and their parents) unless up to date; returns {tag: {digest, seconds, built}}."""
        order = build_order(tags)
        for d in (self.cache / "apt-archives" / "partial", self.cache / "apt-lists" / "partial", self.logs,
                  self.layout.path.parent, self.build_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not (self.layout.path / "index.json").exists():
            run(["umoci", "init", "--layout", str(self.layout.path)])
        out: dict[str, dict] = {}
        todo = [t for t in order if force or not self.up_to_date(t)]
        if todo:
            with Cleanup() as cleanup:
                if mounts_below(self.build_dir):
                    raise RuntimeError(f"{self.build_dir} has mounts below it (another build running?)")
                mount("tmpfs", "tmpfs", self.build_dir, "size=8g,mode=0755")
                cleanup.push(lambda: umount_all_below(self.build_dir), f"umount {self.build_dir}")
                for tag in order:
                    # re-checked here: a rebuilt parent with a new digest changes the child's key
                    if force or not self.up_to_date(tag):
                        log.info("%s: recipe key %s, want %s", tag, self.layout.recipe_key(tag),
                                 self.recipe_key(IMAGES[tag]))
                        t0 = time.monotonic()
                        self._build_one(IMAGES[tag], cleanup)
                        out[tag] = {"digest": self.layout.digest(tag), "seconds": round(time.monotonic() - t0, 1),
                                    "built": True}
                        with open(self.logs / "build-times.tsv", "a") as f:
                            f.write(f"{tag}\t{out[tag]['seconds']}\t{out[tag]['digest']}\n")
            run(["umoci", "gc", "--layout", str(self.layout.path)])
        for tag in order:
            out.setdefault(tag, {"digest": self.layout.digest(tag), "seconds": 0.0, "built": False})
        return out

    def push(self, tags, host: str, *, repo: str = REPO, tag_suffix: str = "latest") -> dict[str, str]:
        """skopeo copy --preserve-digests every tag to HOST/REPO/TAG:latest (plain http)."""
        refs = {}
        for tag in tags:
            ref = f"{host}/{repo}/{tag}:{tag_suffix}"
            run(["skopeo", "--insecure-policy", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                 self.oci_ref(tag), f"docker://{ref}"], timeout=900)
            refs[tag] = ref
        return refs

    # ------------------------------------------------------------------ one step
    def _build_one(self, spec: ImageSpec, cleanup: Cleanup) -> None:
        key = self.recipe_key(spec)
        log.info("%s: building (parent=%s, packages=%s)", spec.tag, spec.parent or "<scratch>",
                 " ".join(spec.packages) or "-")
        t0 = time.time()
        bundle = self.build_dir / f"bundle-{spec.tag}"
        shutil.rmtree(bundle, ignore_errors=True)
        lay = str(self.layout.path)
        if self.layout.digest(spec.tag):
            run(["umoci", "rm", "--image", f"{lay}:{spec.tag}"])
        if spec.parent is None:
            scratch = f"{lay}:{spec.tag}-scratch"
            if self.layout.digest(f"{spec.tag}-scratch"):
                run(["umoci", "rm", "--image", scratch])
            run(["umoci", "new", "--image", scratch])
            run(["umoci", "unpack", "--image", scratch, str(bundle)], timeout=1800)
            self._debootstrap(bundle / "rootfs")
        else:
            run(["umoci", "unpack", "--image", f"{lay}:{spec.parent}", str(bundle)], timeout=1800)
            self._apt_install(spec, bundle / "rootfs", cleanup)
        self._normalize(bundle / "rootfs", t0)
        run(["umoci", "repack", "--image", f"{lay}:{spec.tag}", "--history.created", self.created,
             "--history.created_by", spec.created_by, str(bundle)], timeout=3600)
        if spec.parent is None:
            run(["umoci", "rm", "--image", f"{lay}:{spec.tag}-scratch"])
        run(["umoci", "config", "--image", f"{lay}:{spec.tag}", "--no-history", "--created", self.created,
             "--author", "pynydus-bench", "--architecture", ARCH, "--os", "linux",
             "--config.env", PATH_ENV, "--config.env", "LANG=C.UTF-8", "--config.cmd", spec.cmd,
             "--manifest.annotation", f"{RECIPE_ANNOTATION}={key}"])
        shutil.rmtree(bundle, ignore_errors=True)
        log.info("%s: done in %.0f s -> %s", spec.tag, time.time() - t0, self.layout.digest(spec.tag))

    def _debootstrap(self, rootfs: Path) -> None:
        if not self.dbtar.exists() or self.dbtar.stat().st_size == 0:
            log.info("caching debootstrap's .debs in %s (mirror %s)", self.dbtar, self.mirror)
            tmp = self.build_dir / "dbtmp"
            part = self.dbtar.with_suffix(".tmp.tgz")
            r = run(["debootstrap", "--variant=minbase", f"--arch={ARCH}", f"--make-tarball={part}", SUITE,
                     str(tmp), self.mirror], timeout=1800, check=False)
            (self.logs / "debootstrap-tarball.log").write_text(r.stdout + r.stderr)
            if r.returncode != 0:
                raise RuntimeError(f"debootstrap --make-tarball failed, see {self.logs}/debootstrap-tarball.log")
            part.rename(self.dbtar)
            shutil.rmtree(tmp, ignore_errors=True)
        r = run(["debootstrap", "--variant=minbase", f"--arch={ARCH}", f"--unpack-tarball={self.dbtar}", SUITE,
                 str(rootfs), self.mirror], timeout=1800, check=False)
        (self.logs / "debootstrap-minbase.log").write_text(r.stdout + r.stderr)
        umount_all_below(rootfs)     # debootstrap may leave /proc and /sys mounted
        if r.returncode != 0:
            raise RuntimeError(f"debootstrap failed, see {self.logs}/debootstrap-minbase.log")

    def _apt_install(self, spec: ImageSpec, rootfs: Path, cleanup: Cleanup) -> None:
        undo = cleanup.push(lambda: umount_all_below(rootfs), f"umount below {rootfs}")
        added: list[Path] = []
        try:
            mount("proc", "proc", rootfs / "proc")
            bind_mount("/dev", rootfs / "dev")
            mount("tmpfs", "tmpfs", rootfs / "tmp", "mode=1777")
            bind_mount(self.cache / "apt-archives", rootfs / "var/cache/apt/archives")
            bind_mount(self.cache / "apt-lists", rootfs / "var/lib/apt/lists")
            for name in ("hosts", "resolv.conf"):        # the mirror's name must resolve inside
                target = rootfs / "etc" / name
                if target.exists() or target.is_symlink():
                    if name == "hosts":
                        bind_mount(f"/etc/{name}", target)
                    else:
                        target.unlink()
                        shutil.copyfile(f"/etc/{name}", target)
                        added.append(target)
                else:
                    shutil.copyfile(f"/etc/{name}", target)
                    added.append(target)
            policy = rootfs / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            added.append(policy)
            env = ["/usr/bin/env", "-i", PATH_ENV, "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive", "HOME=/root"]
            logf = self.logs / f"apt-{spec.tag}.log"
            r1 = run(["chroot", str(rootfs), *env, "apt-get", "-q", *APT_OPTS, "update"], check=False, timeout=1800)
            r2 = run(["chroot", str(rootfs), *env, "apt-get", "-q", "-y", *APT_OPTS, "--no-install-recommends",
                      "install", *spec.packages], check=False, timeout=3600) if r1.returncode == 0 else r1
            logf.write_text(r1.stdout + r1.stderr + r2.stdout + r2.stderr)
            if r1.returncode or r2.returncode:
                raise RuntimeError(f"{spec.tag}: apt-get failed, see {logf}")
            r = run(["chroot", str(rootfs), *env, "dpkg-query", "-W", "-f", "${Package}=${Version}\n"])
            (self.logs / f"pkgs-{spec.tag}.txt").write_text(r.stdout)
        finally:
            cleanup.pop_run(undo)
            for p in added:
                p.unlink(missing_ok=True)

    def _normalize(self, rootfs: Path, t0: float) -> None:
        """Remove host-specific and volatile files, clamp times: same inputs -> same layer bytes."""
        if mounts_below(rootfs):
            raise RuntimeError(f"refusing to clean {rootfs}: something is still mounted below it")
        r = str(rootfs)
        for rel in ("etc/hostname", "etc/resolv.conf", "etc/machine-id", "var/lib/dbus/machine-id",
                    "root/.bash_history", "var/cache/ldconfig/aux-cache", "usr/sbin/policy-rc.d"):
            p = rootfs / rel
            if p.is_file() or p.is_symlink():
                p.unlink()
        shutil.rmtree(rootfs / "debootstrap", ignore_errors=True)
        for d, pattern in (("var/lib/apt/lists", "*"), ("var/cache/apt/archives", "*.deb"),
                           ("var/cache/apt", "*.bin"), ("var/lib/dpkg", "*-old"), ("var/cache/debconf", "*-old")):
            for p in (rootfs / d).glob(pattern):
                if p.is_file() or p.is_symlink():
                    p.unlink()
        for top in ("var/log",):
            for dirpath, _, files in os.walk(rootfs / top):
                for f in files:
                    os.unlink(os.path.join(dirpath, f))
        for top in ("dev", "run", "tmp", "proc", "sys"):
            base = rootfs / top
            if base.is_dir() and not base.is_symlink():
                for child in base.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
        day = self.sde // 86400
        for name in ("etc/shadow", "etc/shadow-"):
            p = rootfs / name
            if p.is_file():
                lines = []
                for line in p.read_text().splitlines():
                    f = line.split(":")
                    if len(f) > 2 and f[2].isdigit():
                        f[2] = str(day)
                    lines.append(":".join(f))
                p.write_text("\n".join(lines) + "\n")
        cutoff = t0 - 1
        sde = (self.sde, self.sde)
        for dirpath, dirs, files in os.walk(r):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if st.st_mtime >= cutoff:
                    os.utime(p, sde, follow_symlinks=False)
        for dirpath, dirs, _ in os.walk(r):
            for name in dirs:
                p = os.path.join(dirpath, name)
                if not os.path.islink(p):
                    os.utime(p, sde)
        os.utime(r, sde)


# --------------------------------------------------------------------------- statistics

def layer_stats(layout: Layout, digest: str, cache_file: Path | None = None) -> dict:
    """{compressed, tar_bytes, file_bytes, files} of one layer blob (cached by digest in `cache_file`)."""
    cache = {}
    if cache_file and cache_file.exists():
        cache = json.loads(cache_file.read_text())
    if digest in cache:
        return cache[digest]
    path = layout.blob(digest)
    st = {"compressed": path.stat().st_size, "tar_bytes": 0, "file_bytes": 0, "files": 0}

    class Counter:
        def __init__(self, f):
            self.f, self.n = f, 0

        def read(self, n=-1):
            b = self.f.read(n)
            self.n += len(b)
            return b

    with gzip.open(path, "rb") as g:
        c = Counter(g)
        with tarfile.open(fileobj=c, mode="r|") as tf:
            for m in tf:
                if m.isreg():
                    st["files"] += 1
                    st["file_bytes"] += m.size
        while c.read(1 << 20):
            pass
        st["tar_bytes"] = c.n
    if cache_file:
        cache[digest] = st
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        cache_file.write_text(json.dumps(cache, indent=1))
    return st


def image_stats(builder: ImageBuilder, tag: str) -> dict:
    """Per-image totals: layers, compressed and uncompressed bytes, files, manifest digest."""
    man = builder.layout.manifest(tag)
    cache_file = builder.logs / "layer-stats.json"
    tot = {"tag": tag, "digest": builder.layout.digest(tag), "layers": len(man["layers"]),
           "compressed": 0, "tar_bytes": 0, "file_bytes": 0, "files": 0}
    for layer in man["layers"]:
        st = layer_stats(builder.layout, layer["digest"], cache_file)
        for k in ("compressed", "tar_bytes", "file_bytes", "files"):
            tot[k] += st[k]
    return tot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.images", description=__doc__.split("\n\n")[0])
    p.add_argument("tags", nargs="*", help=f"images to build (default all: {' '.join(IMAGES)})")
    p.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    p.add_argument("--mirror", help="Debian mirror (default: the machine's configured one)")
    p.add_argument("--push", metavar="HOST:PORT", help="push to this plain-http registry as HOST/bench/TAG:latest")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--stats", action="store_true", help="print per-image sizes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if os.geteuid() != 0:
        print("needs root (debootstrap, chroot, mounts)", file=sys.stderr)
        return 2
    require("python -m benchmarks.images", ["debootstrap", "umoci", "chroot"] + (["skopeo"] if args.push else []))
    b = ImageBuilder(args.workdir, mirror=args.mirror)
    tags = args.tags or list(IMAGES)
    t0 = time.monotonic()
    res = b.build(tags, force=args.force)
    for tag, r in res.items():
        print(f"{tag:8} {r['digest']}  {'built in %.0f s' % r['seconds'] if r['built'] else 'up to date'}")
    print(f"build: {time.monotonic() - t0:.0f} s")
    if args.push:
        b.push(build_order(tags), args.push)
    if args.stats:
        for tag in build_order(tags):
            s = image_stats(b, tag)
            print(f"{tag:8} {s['layers']} layers  {s['compressed'] / 1e6:7.1f} MB gz  {s['tar_bytes'] / 1e6:7.1f} MB tar"
                  f"  {s['files']} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
