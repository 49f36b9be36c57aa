"""Where checkpoints live: one key layout for every backend.

Under the datastore root::

    mf.checkpoints/<flow>/<namespace>/<step>/<foreach>/
        manifests/<run>/<checkpoint id>.json     the commit point, one per checkpoint
        data/<run>/<checkpoint id>/<file path>    the files, written before their manifest
        latest.json                               a hint only; readers list manifests

``<foreach>`` is the path of foreach *indices* (``i0``, ``i3.1``) so two branches that
happen to carry equal values never share checkpoints. Attempts of one task share the
scope, which is what lets ``@retry`` resume. Checkpoint ids start with a fixed-width
timestamp, so a lexicographic sort of keys is a sort by save time, and carry the task,
attempt, a per-process sequence number and random bits, so no two saves collide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import time
from collections.abc import Sequence

__all__ = ["ROOT_PREFIX", "CheckpointKeys", "Scope", "new_checkpoint_id", "safe_component"]

ROOT_PREFIX = "mf.checkpoints"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_seq = itertools.count()
_last_us = 0


def safe_component(text: str) -> str:
    """A key component made of safe characters; unsafe input also gets a short hash."""
    cleaned = _UNSAFE.sub("_", text)
    if cleaned == text and text not in ("", ".", ".."):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{cleaned.strip('.') or 'x'}-{digest}"


@dataclasses.dataclass(frozen=True)
class Scope:
    """The set of checkpoints one task's attempts share and ``eager`` searches across runs."""

    flow: str
    namespace: str
    step: str
    foreach_indices: tuple[int, ...] = ()

    @property
    def prefix(self) -> str:
        foreach = "i" + ".".join(str(i) for i in self.foreach_indices) if self.foreach_indices \
            else "root"
        return "/".join([ROOT_PREFIX, safe_component(self.flow),
                         safe_component(self.namespace or "global"),
                         safe_component(self.step), foreach])

    def manifests_prefix(self, run_id: str | None = None) -> str:
        base = f"{self.prefix}/manifests/"
        return base if run_id is None else f"{base}{safe_component(run_id)}/"

    @property
    def latest_key(self) -> str:
        return f"{self.prefix}/latest.json"

    @classmethod
    def from_prefix(cls, prefix: str) -> Scope:
        parts = prefix.strip("/").split("/")
        if len(parts) != 5 or parts[0] != ROOT_PREFIX:
            raise ValueError(f"not a checkpoint scope prefix: {prefix!r}")
        foreach: Sequence[int] = () if parts[4] == "root" else \
            tuple(int(x) for x in parts[4][1:].split("."))
        return cls(parts[1], parts[2], parts[3], tuple(foreach))


@dataclasses.dataclass(frozen=True)
class CheckpointKeys:
    scope_prefix: str
    run_id: str
    checkpoint_id: str

    @property
    def manifest(self) -> str:
        run = safe_component(self.run_id)
        return f"{self.scope_prefix}/manifests/{run}/{self.checkpoint_id}.json"

    @property
    def data_prefix(self) -> str:
        return f"{self.scope_prefix}/data/{safe_component(self.run_id)}/{self.checkpoint_id}/"

    def data(self, relpath: str) -> str:
        return self.data_prefix + relpath

    @classmethod
    def from_manifest_key(cls, key: str) -> CheckpointKeys:
        head, sep, tail = key.rpartition("/manifests/")
        run, _, leaf = tail.partition("/")
        if not sep or not leaf.endswith(".json") or "/" in leaf:
            raise ValueError(f"not a checkpoint manifest key: {key!r}")
        return cls(head, run, leaf[: -len(".json")])


def new_checkpoint_id(task_id: str, attempt: int) -> str:
    """``<µs since epoch, 16 digits>-<task>-a<attempt>-<pid>.<seq>-<random>``: sortable, unique."""
    global _last_us
    # Never go backwards within a process, even if the wall clock does.
    _last_us = max(time.time_ns() // 1000, _last_us + 1)
    return "%016d-%s-a%d-%d.%d-%s" % (
        _last_us, safe_component(str(task_id)), attempt, os.getpid(), next(_seq),
        os.urandom(4).hex(),
    )
