"""Layers converted in worker processes, three per layer:

    parent --compressed--> inflater --plain tar--> reader --distinct chunks--> compressor --> staging file
           <------------------ tree, staged chunks --------  <--- sizes, flags ---

* the inflater decompresses (gzip, zstd or plain) and hashes the plain tar (diff_id);
* the reader parses the tar, builds the layer tree and digests the chunks (`LayerReader`);
* the compressor compresses each distinct chunk alone into the layer's staging file, in
  order; chunks reach it through a memory ring shared with the reader, not a pipe.

Why processes: in one process the tar parser (pure Python) holds the GIL, and a thread
doing C work beside it (zlib, sha256, zstd) waits up to the switch interval each time it
takes the GIL back (once per chunk for zstd), and everything stalls whenever the OS
preempts the GIL holder: the stages ran one after another. As single-threaded processes
they run on all CPUs. The parent only feeds compressed bytes and collects results, so
several layers convert at once.

Workers are forked (an interpreter start costs ~0.3 s of CPU, a fork a few ms; spawn and
forkserver would also re-run the caller's main module): the reader by the thread that
feeds it, the inflater and compressor by the single-threaded reader. A forked child uses
only its own objects (no lock another thread of the parent may hold), as with
multiprocessing's default start method on Linux, and points the fds it inherited but
does not use at /dev/null. The result is what in-process conversion gives: same code,
same order, so output stays deterministic.
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import multiprocessing
import os
import pickle
import struct
from array import array
from typing import BinaryIO, Callable

from .layer import LayerError, LayerReader, LayerTree, open_decompressed
from .pack import StagedChunk, stage_payload

_FEED_BLOCK = 4 << 20               # compressed bytes per message to the inflater
_BATCH_BYTES = 4 << 20              # plain chunk bytes per slot of the ring shared with the compressor
_RING_SLOTS = 4
_PLAIN_BLOCK = 4 << 20              # plain tar bytes per message from the inflater to the reader


def _fork():
    return multiprocessing.get_context("fork")


class _PipeReader:
    """The compressed layer as a readable stream, from the parent's messages (b"" = end)."""

    def __init__(self, conn):
        self._conn = conn
        self._buf = memoryview(b"")
        self._end = False

    def _fill(self) -> None:
        if not self._buf and not self._end:
            data = self._conn.recv_bytes()
            self._end = not data
            self._buf = memoryview(data)

    def read(self, n: int = -1) -> bytes:
        self._fill()
        if n is None or n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, memoryview(b"")
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return bytes(out)

    def peek(self, n: int = 1) -> bytes:
        self._fill()
        return bytes(self._buf[:n])


class _CompressorSink:
    """The reader's `ChunkSink`: distinct chunks are copied into slots of a memory ring shared
    with the compressor process (one copy, no pipe transfer: pushing 8 MiB through a pipe
    takes ~40 process switches, slow on a busy machine); only slot numbers and chunk sizes
    travel by pipe. `close()` returns the staged chunks, in order."""

    def __init__(self, conn, ring: mmap.mmap, slot_size: int):
        self._conn = conn
        self._ring = ring
        self._slot_size = slot_size
        self._free = list(range(len(ring) // slot_size))
        self._slot = self._free.pop()
        self._pos = 0
        self._digests: list[bytes] = []
        self._sizes = array("Q")
        self._batch = 0                 # chunks in the current slot

    def add(self, data, digest: bytes) -> None:
        n = len(data)
        if self._pos + n > self._slot_size:
            self._send()
        start = self._slot * self._slot_size + self._pos
        self._ring[start:start + n] = data
        self._pos += n
        self._digests.append(digest)
        self._sizes.append(n)
        self._batch += 1

    def _send(self) -> None:
        if not self._batch:
            return
        sizes = self._sizes[len(self._sizes) - self._batch:]
        self._conn.send_bytes(struct.pack("<I", self._slot) + sizes.tobytes())
        self._batch = self._pos = 0
        while not self._free:
            self._free.append(self._reply(b"A"))
        self._slot = self._free.pop()

    def _reply(self, want: bytes):
        msg = self._conn.recv_bytes()
        tag, body = msg[:1], msg[1:]
        if tag == b"E":
            raise pickle.loads(body)
        if tag != want:
            raise RuntimeError(f"chunk compressor: unexpected reply {tag!r}")
        return struct.unpack("<I", body)[0] if tag == b"A" else pickle.loads(body)

    def close(self) -> list[StagedChunk]:
        self._send()
        self._conn.send_bytes(b"")
        while True:
            msg = self._conn.recv_bytes()
            if msg[:1] != b"A":
                break
        if msg[:1] == b"E":
            raise pickle.loads(msg[1:])
        layout = pickle.loads(msg[1:])
        out, offset = [], 0
        for digest, plain_size, (size, flags) in zip(self._digests, self._sizes, layout):
            out.append(StagedChunk(digest, plain_size, offset, size, flags))
            offset += size
        return out


def _compressor(conn, reader_end, ring: mmap.mmap, slot_size: int, stage_path: str, compressor: str) -> None:
    """Compress each chunk of each slot alone, append the payloads to the staging file,
    hand the slot back; at the end send [(payload size, flags)] in order."""
    reader_end.close()
    _release_inherited({conn.fileno()})
    try:
        layout: list[tuple[int, int]] = []
        view = memoryview(ring)
        with open(stage_path, "wb") as out:
            while head := conn.recv_bytes():
                slot = struct.unpack_from("<I", head)[0]
                sizes = array("Q")
                sizes.frombytes(head[4:])
                pos, payloads = slot * slot_size, []
                for n in sizes:
                    payload, flags = stage_payload(view[pos:pos + n], compressor)
                    pos += n
                    payloads.append(payload)
                    layout.append((len(payload), flags))
                out.write(b"".join(payloads))
                del payloads
                conn.send_bytes(b"A" + struct.pack("<I", slot))
        view.release()
        conn.send_bytes(b"R" + pickle.dumps(layout, pickle.HIGHEST_PROTOCOL))
    except BaseException as e:
        try:
            conn.send_bytes(b"E" + pickle.dumps(e))
        except Exception:
            try:
                conn.send_bytes(b"E" + pickle.dumps(RuntimeError(f"chunk compressor: {type(e).__name__}: {e}")))
            except Exception:
                pass
    finally:
        conn.close()


def _send_error(conn, e: BaseException, what: str) -> None:
    try:
        conn.send(("error", e))
    except Exception:
        try:
            conn.send(("error", RuntimeError(f"{what}: {type(e).__name__}: {e}")))
        except Exception:
            pass                        # the other side is gone; it reports the death


def _release_inherited(keep: set[int]) -> None:
    """Point every fd a forked worker inherited but does not use at /dev/null: a pipe end
    held by a worker would hide the death of whoever else holds it (the parent, a sibling
    layer's worker) and leave processes waiting for an EOF that never comes. dup2, not
    close, so an inherited file object closing its fd later cannot close one of ours."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd != null and fd not in keep:
                try:
                    os.dup2(null, fd)
                except OSError:
                    pass                # the listing's own fd, already closed
    except OSError:
        pass                            # no /proc: keep them
    finally:
        os.close(null)


def _grow_pipe(conn) -> None:
    """A 1 MiB pipe buffer (the unprivileged maximum; 64 KiB by default): each process switch
    moves 16x more data."""
    try:
        fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    except (OSError, AttributeError):
        pass


class _PlainSource:
    """The plain tar from the inflater: data messages, b"" at the end, then b"S" + the sha256
    hex digest of all of it, or b"E" + the pickled error that stopped it."""

    def __init__(self, conn):
        self._conn = conn
        self._end = False
        self.sha256_hex: str | None = None

    def next_block(self) -> bytes:
        if self._end:
            return b""
        data = self._conn.recv_bytes()
        if data:
            return data
        self._end = True
        control = self._conn.recv_bytes()
        if control[:1] == b"E":
            raise pickle.loads(control[1:])
        self.sha256_hex = control[1:].decode()
        return b""


def _inflater(feed, out) -> None:
    """Decompress the compressed layer from `feed` (gzip, zstd or plain) and hash it (the
    diff_id), sending the plain tar to the reader in large blocks."""
    _release_inherited({feed.fileno(), out.fileno()})
    try:
        inner = open_decompressed(_PipeReader(feed))
        sha = hashlib.sha256()
        while data := inner.read(_PLAIN_BLOCK):
            sha.update(data)
            out.send_bytes(data)
        out.send_bytes(b"")
        out.send_bytes(b"S" + sha.hexdigest().encode())
    except BaseException as e:
        try:
            out.send_bytes(b"")
            out.send_bytes(b"E" + pickle.dumps(e))
        except Exception:
            pass                        # the reader is gone
    finally:
        out.close()


def _reader(feed, conn, parent_ends, name: str, chunk_size: int, digester: str, compressor: str,
            stage_path: str, seen: set[bytes], diff_id: str | None) -> None:
    for end in parent_ends:
        end.close()
    _release_inherited({feed.fileno(), conn.fileno()})
    plain_r, plain_w = _fork().Pipe(duplex=False)
    _grow_pipe(plain_w)
    to_comp, comp_end = _fork().Pipe()
    slot_size = max(_BATCH_BYTES, chunk_size)
    ring = mmap.mmap(-1, _RING_SLOTS * slot_size)      # MAP_SHARED: the forked compressor sees it
    # both forked while this process has one thread
    infl = _fork().Process(target=_inflater, args=(feed, plain_w), name=f"pynydus-inflate {name}", daemon=True)
    comp = _fork().Process(target=_compressor, args=(comp_end, to_comp, ring, slot_size, stage_path, compressor),
                           name=f"pynydus-compress {name}", daemon=True)
    try:
        infl.start()
        feed.close()
        plain_w.close()
        comp.start()
        comp_end.close()
        sink = _CompressorSink(to_comp, ring, slot_size)
        source = _PlainSource(plain_r)
        try:
            tree = LayerReader(name, chunk_size, digester, sink, seen=seen).read_plain(source.next_block)
        finally:
            try:
                chunks = sink.close()
            except (EOFError, OSError):
                chunks = None
        if chunks is None:
            raise RuntimeError(f"{name}: chunk compressor died (exit code {comp.exitcode})")
        if diff_id and diff_id != "sha256:" + (source.sha256_hex or ""):
            raise LayerError(f"{name}: uncompressed content does not match diff_id {diff_id}")
        conn.send(("ok", tree, chunks))
    except BaseException as e:          # handed to the parent, which raises it
        _send_error(conn, e, name)
    finally:
        conn.close()
        plain_r.close()
        to_comp.close()
        for proc in (infl, comp):
            if proc.pid is not None:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()


class LayerWorker:
    """The processes converting one layer, forked when made; `run()` feeds them and returns
    (the layer's tree, the chunks staged into `stage_path`, in staging order)."""

    def __init__(self, name: str, chunk_size: int, digester: str, compressor: str, stage_path: str,
                 seen: set[bytes], diff_id: str | None):
        self.name = name
        feed_r, self._feed = _fork().Pipe(duplex=False)         # compressed bytes, to the reader
        self._result, result_w = _fork().Pipe(duplex=False)     # its answer
        _grow_pipe(self._feed)
        # not a daemon: daemons may not have children (its compressor); it ends when the pipe closes
        self._proc = _fork().Process(target=_reader, name=f"pynydus-read {name}", daemon=False,
                                     args=(feed_r, result_w, (self._feed, self._result), name, chunk_size,
                                           digester, compressor, stage_path, seen, diff_id))
        self._replied = False
        self._proc.start()
        feed_r.close()
        result_w.close()

    def run(self, raw: BinaryIO, on_read: Callable[[int], None] | None = None
            ) -> tuple[LayerTree, list[StagedChunk]]:
        """Feed the compressed layer `raw`; errors of the layer are raised here."""
        try:
            while block := raw.read(_FEED_BLOCK):       # errors of the source are raised as they are
                if not self._send(block):
                    break                                # the reader stopped early: its reply says why
                if on_read:
                    on_read(len(block))
            else:
                self._send(b"")
            try:
                reply = self._result.recv()
            except EOFError:
                self._proc.join(5)
                raise RuntimeError(f"{self.name}: layer reader died (exit code {self._proc.exitcode})") from None
            self._replied = True
            if reply[0] != "ok":
                raise reply[1]
            return reply[1], reply[2]
        finally:
            self.close()

    def _send(self, block: bytes) -> bool:
        try:
            self._feed.send_bytes(block)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def close(self) -> None:
        """Stop the worker (if it still runs) and reap it. A reader that has not answered is
        killed (a sibling forked meanwhile may hold its pipe open: it would never see EOF);
        its compressor then sees the reader's end close and exits."""
        self._feed.close()
        self._result.close()
        if self._replied:
            self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
