"""Reading a local datastore's checkpoints directly, the way any reader would."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from uploader import CheckpointKeys, Manifest

_RESULT = re.compile(r"RESULT (\w+)=(.*)$")


def results(output: str) -> dict[str, str]:
    """``RESULT key=value`` lines printed by test flows (Metaflow prefixes each line)."""
    out: dict[str, str] = {}
    for line in output.splitlines():
        m = _RESULT.search(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def manifests(ds_root: Path) -> list[tuple[CheckpointKeys, Manifest]]:
    out = []
    for p in sorted((ds_root / "mf.checkpoints").rglob("manifests/*/*.json")):
        key = str(p.relative_to(ds_root))
        out.append((CheckpointKeys.from_manifest_key(key), Manifest.from_json(p.read_bytes())))
    return out


def stored_bytes(ds_root: Path, keys: CheckpointKeys, relpath: str,
                 key: str | None = None) -> bytes:
    """A file's stored bytes: under the checkpoint's own data, or at the entry's ``key``
    (an unchanged file an incremental save pointed at an earlier checkpoint's object)."""
    return (ds_root / keys.stored(relpath, key)).read_bytes()


def verify_all(ds_root: Path) -> int:
    """Check every committed checkpoint's files against its manifest; return how many."""
    found = manifests(ds_root)
    for keys, m in found:
        for f in m.files:
            data = stored_bytes(ds_root, keys, f.path, f.key)
            assert len(data) == f.size, (keys.manifest, f.path)
            assert hashlib.sha256(data).hexdigest() == f.sha256, (keys.manifest, f.path)
    return len(found)


def as_json(text: str) -> Any:
    return json.loads(text)
