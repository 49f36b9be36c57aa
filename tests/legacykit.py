"""Checkpoints in ``metaflow-checkpoint`` 0.2.14's layout, written by hand, with archives
of any shape: what a damaged store, or an archive made or changed by hand, leaves behind.

The layout is that package's, as :mod:`metaflow_extensions.asynccheckpoint.plugins.shared.legacy`
describes it (computed here independently): the data at ``mf.checkpoints/checkpoints/
artifacts/<flow>/<step>/<scope>/<task identifier>/<leaf>``, the reference as JSON at the
same path under ``artifact_metadata/`` (``.metadata``) and under ``metadata/<pathspec>/``,
and ``latest`` objects next to both. Used by the tests and by flows (``legacy_broken_flow``).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path
from typing import Any

CKPT = "mf.checkpoints/checkpoints"
COMPRESS = {"": lambda b: b, "gz": gzip.compress, "bz2": bz2.compress,
            "xz": lambda b: lzma.compress(b, preset=0)}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def task_identifier(step: str) -> str:
    """That package's identifier of a task outside a foreach: its step name's JSON, hashed."""
    return _sha(json.dumps(step, sort_keys=True))[:12]


def scope_hash(namespace: str) -> str:
    return _sha(namespace)[:12]


def tar_archive(members: list[tuple[Any, ...]], *, compression: str = "",
                pax: dict[str, str] | None = None) -> bytes:
    """A tar archive of ``members``, in order: ``("file", name, bytes)``, ``("dir", name)``,
    ``("symlink", name, target)``, ``("hardlink", name, target)``, ``("fifo", name)``; with
    pax headers on its first member, compressed with ``compression`` ("", gz, bz2, xz)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n, (kind, name, *rest) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.mode = 0o644
            if n == 0 and pax:
                info.pax_headers = dict(pax)
            if kind == "file":
                info.size = len(rest[0])
                tar.addfile(info, io.BytesIO(rest[0]))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            if rest:
                info.linkname = rest[0]
            tar.addfile(info)
    return COMPRESS[compression](buf.getvalue())


def write_checkpoint(root: Path, *, flow: str, step: str, namespace: str, pathspec: str,
                     archive: bytes, name: str = "mfchckpt", attempt: int = 0,
                     version: int = 0, storage_format: str = "tar", task_latest: bool = True,
                     scope_latest: bool = True) -> dict[str, Any]:
    """Store ``archive`` as a checkpoint that package saved in task ``pathspec`` (outside a
    foreach) under the datastore root ``root``; its reference."""
    leaf = f"{_sha(pathspec)[:12]}.{attempt}.{name}.{version}"
    where = f"{flow}/{step}/{scope_hash(namespace)}/{task_identifier(step)}"
    key = f"{CKPT}/artifacts/{where}/{leaf}"
    ref = {"key": key, "type": "checkpoint", "pathspec": pathspec, "attempt": attempt,
           "version_id": version, "name": name, "storage_format": storage_format,
           "size": len(archive), "created_on": "2024-05-01T10:00:00.000000",
           "metadata": {}, "url": f"local://{key}"}
    body = json.dumps(ref).encode()
    objects = {key: archive, f"{CKPT}/artifact_metadata/{where}/{leaf}.metadata": body,
               f"{CKPT}/metadata/{pathspec}/{attempt}.{name}.{version}.metadata": body}
    if scope_latest:
        objects[f"{CKPT}/artifact_metadata/{where}/latest"] = body
    if task_latest:
        objects[f"{CKPT}/metadata/{pathspec}/latest"] = body
    for k, data in objects.items():
        path = root / k
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return ref
