"""A reader that keeps reading and checking files, for failover tests and benchmarks.

    python -m tests.helpers.reader ROOT EXPECTED.json STOPFILE RESULT.json

EXPECTED.json maps relative paths to md5 hex digests. Each file's page cache is dropped
(POSIX_FADV_DONTNEED) before it is read, so every read reaches the mount's daemon. Runs until
STOPFILE exists; writes {"reads", "errors", "wrong", "error_list", "times"} to RESULT.json
(`times`: monotonic end times of the reads, for pause measurements).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time


def main(root: str, expected_path: str, stop: str, result: str) -> int:
    with open(expected_path) as f:
        expected = json.load(f)
    reads = errors = wrong = 0
    error_list: list[str] = []
    times: list[float] = []
    names = sorted(expected)
    while not os.path.exists(stop):
        for name in names:
            path = os.path.join(root, name)
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    h = hashlib.md5()
                    while True:
                        b = os.read(fd, 1 << 20)
                        if not b:
                            break
                        h.update(b)
                finally:
                    os.close(fd)
                reads += 1
                times.append(time.monotonic())
                if h.hexdigest() != expected[name]:
                    wrong += 1
                    error_list.append(f"{name}: wrong bytes")
            except OSError as e:
                errors += 1
                error_list.append(f"{name}: {e}")
                time.sleep(0.01)
            if os.path.exists(stop):
                break
    with open(result + ".tmp", "w") as f:
        json.dump({"reads": reads, "errors": errors, "wrong": wrong, "error_list": error_list[:50],
                   "times": times}, f)
    os.replace(result + ".tmp", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
