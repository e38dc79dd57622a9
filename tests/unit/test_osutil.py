"""rafs.osutil: atomic writes (old or new content, never a mix), mount/umount2, mountinfo parsing."""
from __future__ import annotations

import errno
import os
import threading

import pytest

from rafs import osutil
from rafs.osutil import (MNT_DETACH, MS_BIND, MountEntry, atomic_file, atomic_write, is_mountpoint, mountinfo,
                         mounts_below, parse_mountinfo, umount2, unescape_mount_field)


def _leftovers(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


# --------------------------------------------------------------------------- atomic writes

def test_atomic_write_creates_and_replaces(tmp_path):
    p = tmp_path / "f"
    atomic_write(p, b"one")
    assert p.read_bytes() == b"one"
    atomic_write(str(p), "twö")
    assert p.read_bytes() == "twö".encode()
    atomic_write(p, memoryview(b"x" * (1 << 20)))
    assert p.read_bytes() == b"x" * (1 << 20)
    assert os.listdir(tmp_path) == ["f"]


def test_atomic_write_mode_is_less_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a", b"", mode=0o600)
        atomic_write(tmp_path / "b", b"")
        atomic_write(tmp_path / "c", b"", mode=0o666)
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o644


def test_atomic_write_durability_steps(tmp_path, monkeypatch):
    """The file is fsynced before the rename and the directory after it."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        real_fsync(fd)

    def replace(a, b):
        calls.append(("replace", os.path.dirname(a) == os.path.dirname(b)))
        real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "f", b"data")
    assert calls == [("fsync", "file"), ("replace", True), ("fsync", "dir")]


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_atomic_write_failure_leaves_old_content(tmp_path, monkeypatch, fail_at):
    p = tmp_path / "f"
    atomic_write(p, b"old content")
    boom = OSError(errno.EIO, "injected")

    if fail_at == "write":
        real_open = os.fdopen

        def fdopen(fd, *a, **kw):
            f = real_open(fd, *a, **kw)
            real_write = f.write

            def write(b):
                if len(b) > 4:
                    real_write(bytes(b)[:4])
                    f.flush()
                    raise boom
                return real_write(b)
            f.write = write
            return f
        monkeypatch.setattr(os, "fdopen", fdopen)
    elif fail_at == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(boom))
    else:
        monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(boom))
    with pytest.raises(OSError, match="injected"):
        atomic_write(p, b"new content that is longer")
    monkeypatch.undo()
    assert p.read_bytes() == b"old content"
    assert _leftovers(tmp_path) == []


def test_atomic_file_exception_in_block_leaves_old_content(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(p) as f:
            f.write(b"partial new")
            f.flush()
            raise KeyboardInterrupt
    assert p.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_file_crash_mid_write_leaves_old_content(tmp_path):
    """A process that dies between write and rename (no cleanup runs) leaves the old file."""
    p = tmp_path / "f"
    p.write_bytes(b"old")
    pid = os.fork()
    if pid == 0:                                       # child: die in the middle of the with-block
        try:
            with atomic_file(p) as f:
                f.write(b"new new new")
                f.flush()
                os._exit(7)
        finally:
            os._exit(8)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7
    assert p.read_bytes() == b"old"
    left = _leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".f.") and (tmp_path / left[0]).read_bytes() == b"new new new"


def test_atomic_write_replaces_a_stale_temp_file(tmp_path):
    """A temp file left by a dead process with our pid and thread id does not block a write."""
    p = tmp_path / "f"
    stale = tmp_path / f".f.{os.getpid()}-{threading.get_ident()}.tmp"
    stale.write_bytes(b"garbage from a crash")
    atomic_write(p, b"fresh")
    assert p.read_bytes() == b"fresh"
    assert _leftovers(tmp_path) == []


def test_atomic_write_concurrent_writers_never_mix(tmp_path):
    p = tmp_path / "f"
    values = [bytes([65 + i]) * (256 << 10) for i in range(6)]
    seen: list[bytes] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                seen.append(p.read_bytes())
            except FileNotFoundError:
                pass

    def writer(v):
        for _ in range(5):
            atomic_write(p, v)

    r = threading.Thread(target=reader)
    r.start()
    ws = [threading.Thread(target=writer, args=(v,)) for v in values]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    stop.set()
    r.join()
    assert p.read_bytes() in values
    assert all(s in values for s in seen)
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- mountinfo parsing

def test_unescape_every_octal_escape():
    assert unescape_mount_field(r"/a\040b\011c\012d\134e") == "/a b\tc\nd\\e"
    assert unescape_mount_field(r"/x\043y") == "/x#y"                  # any \NNN, not just four
    assert unescape_mount_field(r"/end\040") == "/end "                 # an escape at the very end
    assert unescape_mount_field(r"/lit\134040") == "/lit\\040"          # an escaped backslash before digits
    assert unescape_mount_field(r"/not\08x") == r"/not\08x"             # not octal: left alone
    assert unescape_mount_field(b"/caf\xc3\xa9") == "/café"
    assert unescape_mount_field(b"/raw\xff") == os.fsdecode(b"/raw\xff")   # not UTF-8: surrogates


def test_parse_mountinfo_lines():
    text = (
        b"22 27 0:21 / /proc rw,relatime shared:13 - proc proc rw\n"
        b"30 22 0:30 / /mnt/with\\040space\\011tab\\012nl\\134bs rw master:1 shared:2 - tmpfs my\\040src rw,size=4k\n"
        b"31 22 0:31 /sub /caf\xc3\xa9/\xff rw - fuse.pynydus pynydus ro,user_id=0\n"
        b"garbage line\n"
        b"32 22 0:32 / /no-optional ro - erofs /run/x/image.boot ro\n"
        b"\n")
    got = parse_mountinfo(text)
    assert [m.mount_id for m in got] == [22, 30, 31, 32]
    assert got[0] == MountEntry(22, "/proc", "proc", "proc", parent_id=27, devno="0:21", root="/",
                                options="rw,relatime", super_options="rw")
    assert got[1].target == "/mnt/with space\ttab\nnl\\bs"
    assert got[1].source == "my src" and got[1].fstype == "tmpfs" and got[1].super_options == "rw,size=4k"
    assert got[2].target == os.fsdecode("/café/".encode() + b"\xff") and got[2].root == "/sub"
    assert got[2].fstype == "fuse.pynydus"
    assert got[3].options == "ro" and got[3].source == "/run/x/image.boot"
    assert parse_mountinfo(text.decode("utf-8", "surrogateescape")) == got


def test_mountinfo_of_this_process():
    mi = mountinfo()
    assert any(m.target == "/" for m in mi)
    assert any(m.target == "/proc" and m.fstype == "proc" for m in mi)
    assert is_mountpoint("/") and is_mountpoint("/proc")
    assert not is_mountpoint("/proc/self/fd")
    assert is_mountpoint("/nonexistent/path") is False


# --------------------------------------------------------------------------- real mounts

WEIRD_NAMES = ["plain", "with space", "with\ttab", "with\nnewline", "back\\slash", "lit\\040eral", "café ünï",
               os.fsdecode(b"raw\xff\xfe"), "trailing "]


@pytest.fixture
def mounts(tmp_path):
    """Mount helper: mounts made through it are detached at the end, whatever happens."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount(2))")
    made: list[str] = []

    def do(source, target, fstype, flags=0, data=None):
        try:
            osutil.mount(source, target, fstype, flags, data)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                pytest.skip(f"cannot mount here: {e}")
            raise
        made.append(os.fspath(target))

    yield do
    for t in reversed(made):
        try:
            umount2(t, MNT_DETACH)
        except OSError:
            pass
    assert mounts_below(tmp_path) == []


def test_is_mountpoint_tmpfs_with_unusual_names(tmp_path, mounts):
    targets = []
    for name in WEIRD_NAMES:
        d = tmp_path / name
        d.mkdir()
        assert not is_mountpoint(d)
        mounts("pynydus-test", d, "tmpfs", 0, "size=64k")
        targets.append(os.path.realpath(d))
        assert is_mountpoint(d), name
    by_target = {m.target: m for m in mountinfo()}
    for t in targets:
        assert by_target[t].fstype == "tmpfs" and by_target[t].source == "pynydus-test"
    assert mounts_below(tmp_path) == targets                           # in mount order
    # through a symlink, too
    (tmp_path / "link").symlink_to(tmp_path / "with space")
    assert is_mountpoint(tmp_path / "link")
    for t in reversed(targets):
        umount2(t)
        assert not is_mountpoint(t)
    assert mounts_below(tmp_path) == []


def test_is_mountpoint_bind_mount_same_filesystem(tmp_path, mounts):
    """A bind mount within one file system: os.path.ismount cannot see it, mountinfo does."""
    src, dst = tmp_path / "src dir", tmp_path / "dst\\dir é"
    src.mkdir()
    dst.mkdir()
    (src / "hello").write_text("hi")
    mounts(src, dst, "", MS_BIND)
    assert is_mountpoint(dst) and not is_mountpoint(src)
    assert (dst / "hello").read_text() == "hi"
    umount2(dst)
    assert not is_mountpoint(dst)
    assert not (dst / "hello").exists()


def test_umount2_errors_carry_errno(tmp_path, mounts):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(OSError) as ei:
        umount2(d)                                  # not a mount point
    assert ei.value.errno == errno.EINVAL and str(d) in str(ei.value)
    with pytest.raises(OSError) as ei:
        osutil.mount("none", d, "no-such-fs-type", 0, None)
    assert ei.value.errno == errno.ENODEV and "no-such-fs-type" in str(ei.value)
    mounts("pynydus-test", d, "tmpfs", 0, "size=64k")
    with open(d / "busy", "w"):
        with pytest.raises(OSError) as ei:
            umount2(d)                              # an open file keeps it busy
        assert ei.value.errno == errno.EBUSY
        umount2(d, MNT_DETACH)                      # lazily: gone from the table at once
        assert not is_mountpoint(d)
