"""Test data shared by the benchmarks (run them as scripts: this directory is on sys.path)."""

from __future__ import annotations

import os


def make_file(path: str, size: int) -> None:
    """``size`` random bytes at ``path``, fsynced so no write-back lands in a timing."""
    chunk = os.urandom(16 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
