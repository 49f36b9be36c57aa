"""What the task prints about its checkpoints: one line per commit, and the drain's progress.

Both are plain functions of the engine's figures, so the wording is tested without a task;
``current.checkpoint`` prints them through its log (stderr, prefixed ``[@checkpoint]``).
"""

from __future__ import annotations

from uploader import CheckpointHandle, DrainProgress

__all__ = ["commit_line", "drain_line", "duration_text", "rate_text", "size_text"]


def size_text(n: float | None) -> str:
    """``1000 B``, ``2.0 KiB``, ``257.0 MiB``; ``-`` for an unknown size."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def rate_text(bytes_per_s: float) -> str:
    """``183 MiB/s``, ``2.44 MiB/s``, ``12.0 KiB/s``: three significant digits at most."""
    value, unit = bytes_per_s, "B/s"
    for bigger in ("KiB/s", "MiB/s", "GiB/s"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.{0 if value >= 100 else 1 if value >= 10 else 2}f} {unit}"


def duration_text(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    return f"{s / 60:.1f} min"


def _files(n: int) -> str:
    return f"{n} file{'' if n == 1 else 's'}"


def commit_line(handle: CheckpointHandle) -> str:
    """E.g. ``committed 'mfchckpt' (save 3): 257.0 MiB in 3 files, 256.0 MiB unchanged (not
    uploaded); uploaded 1.0 MiB in 0.41 s (2.44 MiB/s); save() blocked 1.2 ms``."""
    s = handle.stats
    number = f" (save {handle.number})" if handle.number else ""
    speed = f" ({rate_text(s.throughput)})" if s.throughput else ""
    return (f"committed {handle.name!r}{number}: {size_text(s.bytes)} in {_files(s.files)}, "
            f"{size_text(s.bytes_skipped)} unchanged (not uploaded); uploaded "
            f"{size_text(s.bytes_uploaded)} in {duration_text(s.upload_s)}{speed}; save() "
            f"blocked {duration_text(s.blocked_s)}")


def drain_line(progress: DrainProgress) -> str:
    """E.g. ``waiting for 2 pending uploads: 300.0 MiB left, 10.0 s so far``."""
    uploads = "upload" if progress.pending == 1 else "uploads"
    return (f"waiting for {progress.pending} pending {uploads}: "
            f"{size_text(progress.bytes_left)} left, {duration_text(progress.waited_s)} so far")
