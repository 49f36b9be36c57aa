"""The manifest: the single commit point of a checkpoint.

Data objects are written first; the manifest, listing every file with its size and
SHA-256, is written last. A checkpoint whose manifest is missing does not exist for any
reader, and readers verify each file against the manifest when they load it.

Compatibility, both ways:

- ``format`` is the version that wrote the manifest. A reader reads any format: fields it
  does not know are ignored, and fields an older writer left out take their defaults.
- ``min_reader`` (absent means 1) is the oldest reader that may read it. A writer sets it
  only for a change older readers would misread; they then refuse the manifest with a
  :class:`~uploader.errors.ManifestError`, which listings turn into a skip and a warning.

Format 2 adds ``key`` to a file entry: where its bytes are stored, when that is not this
checkpoint's own data prefix (an unchanged file an incremental save did not upload again
points at the object an earlier checkpoint of the scope stored). It is relative to the
scope prefix and must lie under its ``data/``, so a manifest can only point at data of its
own scope. A format-1 reader would look for such a file under the checkpoint's own prefix
and fail, so a manifest with any ``key`` says ``min_reader: 2``.

Format 3 adds ``identity["gang"]``: the manifest is one rank's part of a gang checkpoint
(:mod:`uploader.gang`), which readers show only once every rank's part is committed. An
older reader would take the part for a whole checkpoint, so such a manifest says
``min_reader: 3``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ManifestError

__all__ = ["FORMAT_VERSION", "PLACEHOLDER", "FileEntry", "Manifest", "checked_paths",
           "freeze_metadata", "refused_path"]

FORMAT_VERSION = 3
PLACEHOLDER = "<value cannot be JSON serialized>"
_SHA256 = re.compile(r"[0-9a-f]{64}")
# The first format whose readers follow ``FileEntry.key``.
_KEY_FORMAT = 2
# The first format whose readers know that a part of a gang checkpoint (``identity`` has
# a "gang") is not a checkpoint on its own (see uploader.gang).
_GANG_FORMAT = 3


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators
    size: int
    sha256: str
    # Where the bytes are, relative to the scope prefix ("data/<run>/<id>/<path>"), when
    # not under this checkpoint's own data prefix; None for files this checkpoint stored.
    key: str | None = None

    def __post_init__(self) -> None:
        if self.key is not None and not _is_data_key(self.key):
            raise ManifestError(f"not a checkpoint manifest: file {self.path!r} points at "
                                f"{self.key!r}, which is not under its scope's data/")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Manifest:
    checkpoint_id: str
    name: str
    run_id: str
    scope_prefix: str
    created_on: str  # ISO 8601, UTC, when save() was called
    committed_on: str
    latest: bool
    files: tuple[FileEntry, ...]
    metadata: dict[str, Any]
    identity: dict[str, Any]  # flow, step, task, attempt, namespace, host, pid ...
    source: str  # "directory" or "file": what save(path=...) was given
    timings: dict[str, float]
    # Bytes of files whose entries point at an earlier checkpoint's objects: not uploaded
    # by this one. Informational; older readers ignore it.
    bytes_skipped: int = 0
    format: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["files"] = [{k: v for k, v in dataclasses.asdict(f).items()
                       if k != "key" or v is not None} for f in self.files]
        if "gang" in self.identity:
            d["min_reader"] = _GANG_FORMAT
        elif any(f.key is not None for f in self.files):
            d["min_reader"] = _KEY_FORMAT
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse a manifest of any format; raise :class:`ManifestError` saying what is wrong."""
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ManifestError(f"not a checkpoint manifest: it is not JSON ({e})") from e
        if not isinstance(d, dict):
            raise ManifestError("not a checkpoint manifest: it is not a JSON object")
        fmt = d.get("format", 1)
        min_reader = d.get("min_reader", 1)
        if not _is_int(fmt) or not _is_int(min_reader):
            raise ManifestError("not a checkpoint manifest: 'format' and 'min_reader' must be "
                                "integers")
        if min_reader > FORMAT_VERSION:
            raise ManifestError(
                f"written in manifest format {fmt} by a newer version of this package, which "
                f"readers of format {FORMAT_VERSION} cannot read; upgrade the package here")
        return cls(
            checkpoint_id=_field(d, "checkpoint_id", str),
            name=_field(d, "name", str),
            run_id=_field(d, "run_id", str),
            scope_prefix=_field(d, "scope_prefix", str),
            created_on=_field(d, "created_on", str, ""),
            committed_on=_field(d, "committed_on", str, ""),
            latest=_field(d, "latest", bool, True),
            files=tuple(_file_entry(f) for f in _field(d, "files", list)),
            metadata=_field(d, "metadata", dict, {}),
            identity=_field(d, "identity", dict, {}),
            source=_field(d, "source", str, "directory"),
            timings=_field(d, "timings", dict, {}),
            bytes_skipped=_count(d, "bytes_skipped"),
            format=fmt,
        )


_MISSING: Any = object()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(d: dict[str, Any], name: str, kind: type, default: Any = _MISSING) -> Any:
    if name not in d:
        if default is _MISSING:
            raise ManifestError(f"not a checkpoint manifest: it has no {name!r}")
        return default
    value = d[name]
    if not isinstance(value, kind):
        raise ManifestError(f"not a checkpoint manifest: {name!r} is {type(value).__name__}, "
                            f"not {kind.__name__}")
    return value


def _count(d: dict[str, Any], name: str) -> int:
    value = d.get(name, 0)
    if not _is_int(value) or value < 0:
        raise ManifestError(f"not a checkpoint manifest: {name!r} is {value!r}, not a count")
    return int(value)


def _is_data_key(key: str) -> bool:
    parts = key.split("/")
    return (len(parts) >= 4 and parts[0] == "data"
            and all(p not in ("", ".", "..") for p in parts))


def refused_path(paths: Sequence[str]) -> tuple[str, str] | None:
    """The first of a manifest's file ``paths`` that no reader places, and why; None if
    every one may be placed.

    Exactly what ``save()`` writes passes: relative, "/"-separated, no empty, "." or ".."
    component. Anything else (a manifest from elsewhere, edited, or corrupt) is refused
    rather than normalised, as is a path listed twice or both as a file and a directory.
    Readers and the command line apply this one rule before any data is read.
    """
    files: set[str] = set()
    dirs: set[str] = set()
    for path in paths:
        parts = path.split("/")
        if any(p in ("", ".", "..") or "\0" in p for p in parts):
            return path, (f"the unsafe path {path!r}, which could write outside the "
                          "destination")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
        if path in files:
            return path, f"{path!r} twice"
        files.add(path)
    clash = files & dirs
    if clash:
        first = sorted(clash)[0]
        return first, f"{first!r} both as a file and as a directory"
    return None


def checked_paths(paths: Sequence[str], who: str) -> list[list[str]]:
    """Each of ``paths``, split; :class:`ManifestError` naming ``who`` and the path for
    one :func:`refused_path` refuses."""
    refused = refused_path(paths)
    if refused is not None:
        raise ManifestError(f"{who}: its manifest lists {refused[1]}; not loading it.")
    return [path.split("/") for path in paths]


def _file_entry(f: Any) -> FileEntry:
    if not isinstance(f, dict):
        raise ManifestError("not a checkpoint manifest: a file entry is not an object")
    path, size, sha, key = f.get("path"), f.get("size"), f.get("sha256"), f.get("key")
    if not isinstance(path, str) or not isinstance(size, int) or isinstance(size, bool) \
            or size < 0 or not isinstance(sha, str) or not _SHA256.fullmatch(sha) \
            or not (key is None or isinstance(key, str)):
        raise ManifestError(f"not a checkpoint manifest: bad file entry {f!r:.200}")
    return FileEntry(path, size, sha, key)


def freeze_metadata(metadata: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A JSON-safe deep copy of ``metadata``, and where values had to be replaced.

    Made when ``save()`` is called, so later changes to the caller's dict are not recorded
    and nothing can fail when the manifest is written. As ``metaflow-checkpoint`` does:
    datetimes (and dates, times) become ISO strings, and a value JSON cannot hold becomes
    :data:`PLACEHOLDER`. Numpy scalars become the Python numbers they hold, tuples lists,
    and keys that are not strings become strings as ``json.dumps`` writes them.
    """
    replaced: list[str] = []

    def key_of(k: Any, where: str) -> str:
        if isinstance(k, str):
            return k
        if k is None or isinstance(k, bool | int | float):
            return json.dumps(k)
        replaced.append(f"{where} (key {k!r:.40})")
        return str(k)

    def freeze(v: Any, where: str, seen: frozenset[int]) -> Any:
        if v is None or isinstance(v, str | bool | int | float):
            return v
        if isinstance(v, datetime.datetime | datetime.date | datetime.time):
            return v.isoformat()
        if type(v).__module__ == "numpy" and getattr(v, "ndim", None) == 0 \
                and hasattr(v, "item"):
            return freeze(v.item(), where, seen)
        if isinstance(v, Mapping | list | tuple):
            if id(v) in seen:  # a container that holds itself
                replaced.append(where)
                return PLACEHOLDER
            inner = seen | {id(v)}
            if isinstance(v, Mapping):
                return {key_of(k, where): freeze(x, f"{where}[{k!r}]", inner)
                        for k, x in v.items()}
            return [freeze(x, f"{where}[{i}]", inner) for i, x in enumerate(v)]
        replaced.append(where)
        return PLACEHOLDER

    frozen = freeze(dict(metadata), "metadata", frozenset())
    assert isinstance(frozen, dict)
    return frozen, replaced
