"""Engine settings: one frozen value, parsed from strings with range checks.

The caller supplies the strings and the name each came from (an environment variable,
say), so an error names exactly what the user has to change.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigError

__all__ = ["SETTING_NAMES", "Settings", "SnapshotMode", "UploaderMode", "parse_settings",
           "parse_size", "size_text"]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# S3 limits: parts are 5 MiB..5 GiB, at most 10,000 of them.
MIN_PART_SIZE = 5 * MiB
MAX_PART_SIZE = 5 * GiB


class SnapshotMode(enum.Enum):
    """How ``save()`` freezes the source files before the upload reads them."""

    AUTO = "auto"  # reflink where the filesystem can, else hardlink, else copy
    REFLINK = "reflink"
    LINK = "link"
    COPY = "copy"


class UploaderMode(enum.Enum):
    """Where the bytes of S3 parts and Azure blocks are read, hashed and sent from."""

    THREAD = "thread"  # worker threads of the task's own process, in blocking system calls
    PROCESS = "process"  # a spawned worker process; the event-loop thread still coordinates


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    # Chosen by benchmarks/wan.py (30 ms per request, 100 MB/s per connection): small
    # files go at most upload_concurrency per round trip, and 32 in flight uploaded and
    # loaded them 1.75x as fast as 16 (64 added nothing: the client's CPU per file sets
    # the pace there); 8 MiB parts keep the bytes in flight, and so the memory bound,
    # where 16 parts of 16 MiB had them, and 1 GiB still beat upload_file.
    upload_concurrency: int = 32
    part_size: int = 8 * MiB
    multipart_threshold: int = 32 * MiB
    max_attempts: int = 8
    retry_deadline: float = 300.0
    max_pending: int = 2
    drain_timeout: float = 3600.0
    snapshot: SnapshotMode = SnapshotMode.AUTO
    copy_budget: int = 4 * MiB
    sigterm_grace: float = 25.0
    # Files whose bytes the newest checkpoint of the scope already stored are pointed at,
    # not uploaded again (see uploader.incremental). Off: every checkpoint stores all of
    # its bytes under its own prefix, self-contained.
    incremental: bool = True
    # Seconds between the lines that say how far pending uploads are while a task drains.
    progress_interval: float = 5.0
    # Chosen by benchmarks/interference.py: with a pure-Python training loop holding the
    # GIL, the worker process kept the upload at full speed and the loop at the speed it
    # has with the same upload done by an unrelated process; threads lost both.
    uploader: UploaderMode = UploaderMode.PROCESS
    # The upload worker process is killed and replaced when a request goes unanswered for
    # worker_timeout seconds (0: the S3 client's connect plus read timeout) plus the time
    # the request's bytes need with the whole upload running at worker_min_rate bytes/s.
    worker_timeout: float = 0.0
    worker_min_rate: int = 2 * MiB
    # Seconds a rank of a gang waits, as it starts, for rank 0 to choose the gang
    # checkpoint every rank resumes from (see uploader.gang).
    gang_timeout: float = 900.0


_SIZE_RE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
          "g": GiB, "gb": GiB, "gib": GiB}


def parse_size(text: str) -> int:
    """``"16MiB"`` -> 16777216. Units are binary; a bare number is bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


@dataclasses.dataclass(frozen=True)
class _Field:
    attr: str
    parse: Callable[[str], Any]
    check: Callable[[Any], bool]
    allowed: str


_BOOLS = {"true": True, "1": True, "yes": True, "on": True,
          "false": False, "0": False, "no": False, "off": False}


def size_text(n: float | None) -> str:
    """The one way sizes are written in logs: ``1000 B``, ``2.0 KiB``, ``257.0 MiB``, and
    ``-`` for an unknown size. The inverse of :func:`parse_size` to a tenth of a unit."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _parse_bool(text: str) -> bool:
    try:
        return _BOOLS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"not a boolean: {text!r}") from None


def _int_in(lo: int, hi: int) -> Callable[[Any], bool]:
    return lambda v: lo <= v <= hi


def _float_in(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: lo <= v <= hi


_FIELDS: dict[str, _Field] = {
    "UPLOAD_CONCURRENCY": _Field("upload_concurrency", int, _int_in(1, 256), "an integer 1..256"),
    "PART_SIZE": _Field("part_size", parse_size, _int_in(MIN_PART_SIZE, MAX_PART_SIZE),
                        "a size from 5MiB to 5GiB, e.g. 16MiB"),
    "MULTIPART_THRESHOLD": _Field("multipart_threshold", parse_size,
                                  _int_in(MIN_PART_SIZE, MAX_PART_SIZE),
                                  "a size from 5MiB to 5GiB, e.g. 32MiB"),
    "MAX_ATTEMPTS": _Field("max_attempts", int, _int_in(1, 100), "an integer 1..100"),
    "RETRY_DEADLINE": _Field("retry_deadline", float, _float_in(1, 86400),
                             "seconds, 1..86400"),
    "MAX_PENDING": _Field("max_pending", int, _int_in(1, 64), "an integer 1..64"),
    "DRAIN_TIMEOUT": _Field("drain_timeout", float, _float_in(0, 7 * 86400),
                            "seconds, 0..604800"),
    "SNAPSHOT": _Field("snapshot", lambda s: SnapshotMode(s.strip().lower()), lambda v: True,
                       "one of auto, reflink, link, copy"),
    # Held in memory by each pending snapshot (see uploader/snapshot.py), so bounded.
    "COPY_BUDGET": _Field("copy_budget", parse_size, _int_in(0, 256 * MiB),
                          "a size from 0 to 256MiB, e.g. 4MiB"),
    "SIGTERM_GRACE": _Field("sigterm_grace", float, _float_in(0, 3600), "seconds, 0..3600"),
    "INCREMENTAL": _Field("incremental", _parse_bool, lambda v: True,
                          "true or false (also 1/0, yes/no, on/off)"),
    "PROGRESS_INTERVAL": _Field("progress_interval", float, _float_in(0.01, 3600),
                                "seconds, 0.01..3600"),
    "UPLOADER": _Field("uploader", lambda s: UploaderMode(s.strip().lower()), lambda v: True,
                       "one of thread, process"),
    "WORKER_TIMEOUT": _Field("worker_timeout", float, _float_in(0, 86400),
                             "seconds, 0..86400 (0: the S3 client's connect and read timeouts)"),
    "WORKER_MIN_RATE": _Field("worker_min_rate", parse_size, _int_in(1 * KiB, 100 * GiB),
                              "a size per second from 1KiB to 100GiB, e.g. 2MiB"),
    "GANG_TIMEOUT": _Field("gang_timeout", float, _float_in(1, 86400), "seconds, 1..86400"),
}

SETTING_NAMES: tuple[str, ...] = tuple(_FIELDS)


def parse_settings(raw: Mapping[str, str | None], *, prefix: str = "") -> Settings:
    """Build :class:`Settings` from strings keyed by the names in :data:`SETTING_NAMES`.

    Missing or ``None`` values keep their defaults. ``prefix`` is prepended to a name in
    error messages (``"METAFLOW_CHECKPOINT_"`` gives the variable the user sets).

    Raises :class:`~uploader.errors.ConfigError` naming the first bad value.
    """
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(prefix + u for u in unknown)}; "
                          f"known: {', '.join(prefix + n for n in _FIELDS)}")
    values: dict[str, Any] = {}
    for name, field in _FIELDS.items():
        text = raw.get(name)
        if text is None:
            continue
        try:
            value = field.parse(str(text))
            ok = field.check(value)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise ConfigError(f"{prefix}{name}={text!r} is not valid: expected {field.allowed}.")
        values[field.attr] = value
    settings = Settings(**values)
    if settings.multipart_threshold < settings.part_size:
        # A file between the threshold and one part would be split into a single part.
        settings = dataclasses.replace(settings, multipart_threshold=settings.part_size)
    return settings
