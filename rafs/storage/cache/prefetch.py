"""The prefetch scheduler of one blob cache, and the demand gate all blobs of a mount share.

`Prefetcher.submit(indices, low)` queues a job (chunk positions) for one
background thread per blob:

* Low-priority jobs (the default, and `prefetch_all`) are streamed one merged
  request at a time (`fetch_next`), each started only while no on-demand read
  is waiting for a fetch (the `DemandGate`, shared by all blobs of a
  `CacheManager`) and no high-priority job is queued.
* High-priority jobs (the FUSE layer's sequential read-ahead) jump ahead of
  every low-priority job and are fetched like an on-demand read (`fetch_all`:
  merged, in parallel); they wait for at most the one low-priority request in
  progress.

`close()` cancels the queued jobs and stops between requests. A job's Future
gives the number of chunks it fetched; cancelling it stops the job before its
next request.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from typing import Callable, Iterator

from .files import CacheClosed

log = logging.getLogger(__name__)


class DemandGate:
    """Counts on-demand reads waiting for fetches; background prefetch runs only while there are none."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    @contextmanager
    def demand(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
        try:
            yield
        finally:
            with self._cond:
                self._waiting -= 1
                if not self._waiting:
                    self._cond.notify_all()

    def wait_idle(self, stop: threading.Event, poll: float = 0.05,
                  wake: Callable[[], bool] | None = None) -> bool:
        """Block until no on-demand read waits (or `wake()` is true); False if `stop` was set."""
        with self._cond:
            while self._waiting and not stop.is_set() and not (wake is not None and wake()):
                self._cond.wait(poll)
        return not stop.is_set()

    def poke(self) -> None:
        """Wake the waiters of `wait_idle` so that they re-check `stop` / `wake`."""
        with self._cond:
            self._cond.notify_all()


class PrefetchJob:
    """One `prefetch` call: its sorted chunk positions, how far it got, its Future."""
    __slots__ = ("indices", "pos", "fut", "low", "fetched")

    def __init__(self, indices: list[int], fut: Future, low: bool):
        self.indices = indices
        self.pos = 0
        self.fut = fut
        self.low = low
        self.fetched = 0


class Prefetcher:
    """The background prefetch of one blob cache (see the module docstring).

    `fetch_all(indices)` fetches chunk positions like an on-demand read and returns how many
    it fetched; `fetch_next(indices, pos)` fetches the next merged request of the missing
    chunks of `indices[pos:]` and returns (the new pos, chunks fetched). Both raise
    `CacheClosed` once the cache is closing.
    """

    def __init__(self, name: str, thread_name: str, gate: DemandGate, *,
                 fetch_all: Callable[[list[int]], int],
                 fetch_next: Callable[[list[int], int], tuple[int, int]]):
        self.name = name
        self.gate = gate
        self._thread_name = thread_name
        self._fetch_all = fetch_all
        self._fetch_next = fetch_next
        self._lock = threading.Lock()
        self._urgent_jobs: deque[PrefetchJob] = deque()   # high priority: before any low one
        self._background_jobs: deque[PrefetchJob] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stop = threading.Event()     # stops the background work

    def submit(self, indices: list[int], low_priority: bool = True) -> Future:
        """Queue a job for the sorted chunk positions `indices`; its Future (cancelled if closed)."""
        fut: Future = Future()
        with self._lock:
            if self._closed:
                fut.cancel()
                return fut
            job = PrefetchJob(indices, fut, low_priority)
            (self._background_jobs if low_priority else self._urgent_jobs).append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=self._thread_name)
                self._thread.start()
        if not low_priority:
            self.gate.poke()                   # a low-priority job may be waiting for the gate
        return fut

    def close(self) -> None:
        """Cancel the queued jobs and wait for the thread (it stops between requests)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            jobs = list(self._urgent_jobs) + list(self._background_jobs)
            self._urgent_jobs.clear()
            self._background_jobs.clear()
            t = self._thread
        for job in jobs:
            job.fut.cancel()
        self.gate.poke()
        if t is not None and t is not threading.current_thread():
            t.join()

    def _urgent_waiting(self) -> bool:
        return bool(self._urgent_jobs)

    def _loop(self) -> None:
        """Run urgent jobs first (each whole), then low-priority ones one request at a time."""
        while True:
            with self._lock:
                for q in (self._urgent_jobs, self._background_jobs):
                    while q and q[0].fut.cancelled():
                        q.popleft()
                if self._closed or not (self._urgent_jobs or self._background_jobs):
                    self._thread = None
                    return
                job = (self._urgent_jobs.popleft() if self._urgent_jobs
                       else self._background_jobs[0])
            if not job.low:
                self._settle(job, self._run_urgent)
                continue
            if not self.gate.wait_idle(self._stop, wake=self._urgent_waiting):
                continue                       # closing: the loop ends above
            with self._lock:
                if self._urgent_jobs:
                    continue                   # one arrived while we waited: it goes first
            self._settle(job, self._run_step)

    def _settle(self, job: PrefetchJob, step: Callable[[PrefetchJob], bool]) -> None:
        """Run `step(job)`; when it says the job is done (or fails), complete the job's Future."""
        try:
            done, failed, outcome = step(job), False, None
        except CacheClosed:
            done, failed, outcome = True, None, None
        except BaseException as e:
            log.warning("%s: prefetch stopped: %s", self.name, e)
            done, failed, outcome = True, True, e
        if not done:
            return
        with self._lock:
            if job.low and job in self._background_jobs:
                self._background_jobs.remove(job)
        try:                                   # the Future is never marked running, so a
            if failed is None:                 # caller's cancel() stops the job: done maybe
                job.fut.cancel()
            elif failed:
                job.fut.set_exception(outcome)
            else:
                job.fut.set_result(job.fetched)
        except InvalidStateError:
            pass

    def _run_urgent(self, job: PrefetchJob) -> bool:
        job.fetched = self._fetch_all(job.indices)
        return True

    def _run_step(self, job: PrefetchJob) -> bool:
        """One merged request of a low-priority job; True when the job is done."""
        pos, fetched = self._fetch_next(job.indices, job.pos)
        job.pos = pos
        job.fetched += fetched
        return job.pos >= len(job.indices)
