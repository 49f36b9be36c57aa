"""The manifest: the single commit point of a checkpoint.

Data objects are written first; the manifest, listing every file with its size and
SHA-256, is written last. A checkpoint whose manifest is missing does not exist for any
reader, and readers verify each file against the manifest when they load it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

__all__ = ["FORMAT_VERSION", "FileEntry", "Manifest"]

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FileEntry:
    path: str  # relative, POSIX separators
    size: int
    sha256: str


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
    format: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> bytes:
        d = dataclasses.asdict(self)
        d["files"] = [dataclasses.asdict(f) for f in self.files]
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        d = json.loads(data)
        if not isinstance(d, dict) or d.get("format") != FORMAT_VERSION:
            raise ValueError("not a checkpoint manifest of format %d" % FORMAT_VERSION)
        d["files"] = tuple(FileEntry(**f) for f in d["files"])
        return cls(**d)
