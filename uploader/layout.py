"""Where checkpoints live: one key layout for every backend.

Under the datastore root::

    mf.checkpoints/<flow>/<namespace>/<step>/<foreach>/
        manifests/<run>/<checkpoint id>.json     the commit point, one per checkpoint
        data/<run>/<checkpoint id>/<file path>    the files, written before their manifest
        latest.json                               a hint only; readers list manifests

``<foreach>`` names the foreach branch, one token per level (``root`` outside a foreach):
``v<fingerprint>k<n>`` for the n-th occurrence of a value in its foreach list, so a
branch finds its checkpoints of an earlier run even when the list was reordered, and
branches with equal values never share them; ``i<index>`` where a value has no stable
fingerprint (see :func:`foreach_token`). Attempts of one task share the
scope, which is what lets ``@retry`` resume. Checkpoint ids carry a fixed-width
timestamp, the task, the attempt, the process, the save's number in the task attempt
(:mod:`uploader.sequence`) and random bits, so no two saves collide.

Ids are not compared as strings to find the newest: that would trust the clock of
whichever host saved each one, and the hosts that run a task's attempts need not agree.
:meth:`CheckpointKeys.newest_first` orders one task's checkpoints by attempt, then by
save order within the attempt (:func:`checkpoint_order`); only different runs, which
share no counter, are ordered by their timestamps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["MODELS_PREFIX", "ROOT_PREFIX", "CheckpointKeys", "Scope", "checkpoint_order",
           "foreach_token", "new_checkpoint_id", "safe_component", "value_fingerprint"]

ROOT_PREFIX = "mf.checkpoints"
# Models (``@model``) live in a tree of their own, in the same layout: a listing or a load
# policy of checkpoints never sees a model, and the reverse.
MODELS_PREFIX = "mf.models"
_ROOTS = (ROOT_PREFIX, MODELS_PREFIX)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_FOREACH_TOKEN = re.compile(r"i[0-9]+|v[0-9a-f]{16}k[0-9]+")
# The pieces of a checkpoint id, ASCII digits only (``str.isdigit`` accepts "²").
_ID_HEAD = re.compile(r"([0-9]{16,})-.+")
_ID_ATTEMPT = re.compile(r"a([0-9]+)")
_ID_PROCESS = re.compile(r"[0-9]+\.([0-9]+)")
_ID_RANDOM = re.compile(r"[0-9a-f]+")
# Below every parsed order: an id this package did not write counts as the oldest.
_UNORDERED = (-1, -1, -1)
_seq = itertools.count()
_last_us = 0


def safe_component(text: str) -> str:
    """A key component made of safe characters; unsafe input also gets a short hash."""
    cleaned = _UNSAFE.sub("_", text)
    if cleaned == text and text not in ("", ".", ".."):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{cleaned.strip('.') or 'x'}-{digest}"


def value_fingerprint(value: Any) -> str | None:
    """16 hex digits that name a foreach value across runs, or None where none is stable.

    Values made of JSON-like types have one; two values get the same fingerprint only if
    they are equal and of the same kinds throughout (``(1, 2)`` is not ``[1, 2]``,
    ``{1: "a"}`` not ``{"1": "a"}``, ``True`` not ``1``, ``1.0`` not ``1``). The rule:

    - numpy scalars count as the Python value ``.item()`` gives: ``np.int64(3)`` as
      ``3``, ``np.bool_(True)`` as ``True``, ``np.float64(1.5)`` as ``1.5``, at any depth
      (recognised by type, so numpy is never imported here);
    - a value made only of str, int, float, bool, None, lists and dicts with str keys has
      the first 16 hex digits of the SHA-256 of its canonical JSON (sorted keys, no
      spaces, ASCII): the fingerprint it has always had, so checkpoints stored under it
      resume after an upgrade;
    - a value holding a tuple, or a dict with a key that is not a str, is written as JSON
      that tags every node with its kind (``["t", [...]]`` for a tuple, ``["d", [[key,
      value], ...]]`` for a dict, ``["i", 1]`` for an int...), prefixed with ``py1:``.
      No JSON text starts with ``p``, so these never collide with the first kind. Such
      values used to be fingerprinted as lists and string-keyed dicts (mixed key types:
      not at all), and are told apart from those now.

    Anything else (an object whose repr carries its address, a set, a numpy array, a
    cycle) has none.
    """
    try:
        plain, tagged = _encoded(value, set())
        if plain is not _TAGGED:
            text = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        else:
            text = _TAG + json.dumps(tagged, separators=(",", ":"), ensure_ascii=True)
    except (_NoFingerprint, TypeError, ValueError, RecursionError):
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class _NoFingerprint(Exception):
    pass


# The plain form of a value that has to be tagged, and the tagged form's prefix.
_TAGGED: Any = object()
_TAG = "py1:"


def _is_numpy_scalar(value: Any) -> bool:
    return any(c.__name__ == "generic" and c.__module__ == "numpy" for c in type(value).__mro__)


def _encoded(value: Any, path: set[int]) -> tuple[Any, Any]:
    """``(plain, tagged)``: the value as plain JSON data (numpy scalars replaced), or
    :data:`_TAGGED` where that would be ambiguous; and its tagged form."""
    if _is_numpy_scalar(value):
        value = value.item()
        if _is_numpy_scalar(value):
            raise _NoFingerprint
    # bool before int: it is one.
    for kind, tag in ((bool, "b"), (int, "i"), (float, "f"), (str, "s")):
        if isinstance(value, kind):
            return value, [tag, value]
    if value is None:
        return None, ["n"]
    if not isinstance(value, list | tuple | dict):
        raise _NoFingerprint
    if id(value) in path:
        raise _NoFingerprint  # a cycle
    path.add(id(value))
    try:
        if isinstance(value, dict):
            return _encoded_dict(value, path)
        items = [_encoded(v, path) for v in value]
    finally:
        path.discard(id(value))
    tagged = ["t" if isinstance(value, tuple) else "l", [t for _, t in items]]
    ambiguous = isinstance(value, tuple) or any(p is _TAGGED for p, _ in items)
    return (_TAGGED if ambiguous else [p for p, _ in items]), tagged


def _encoded_dict(value: dict[Any, Any], path: set[int]) -> tuple[Any, Any]:
    pairs = [(k, _encoded(k, path), _encoded(v, path)) for k, v in value.items()]
    tagged = sorted(([kt, vt] for _, (_, kt), (_, vt) in pairs),
                    key=lambda kv: json.dumps(kv[0], separators=(",", ":")))
    ambiguous = any(not isinstance(k, str) or vp is _TAGGED for k, _, (vp, _) in pairs)
    plain = _TAGGED if ambiguous else {k: vp for k, _, (vp, _) in pairs}
    return plain, ["d", tagged]


def foreach_token(values: Sequence[Any], index: int) -> tuple[str, bool]:
    """The scope token of branch ``index`` of a foreach over ``values``; and whether it is
    the index fallback (the value has no stable fingerprint).

    Among equal values the index decides: the n-th branch carrying a value is matched with
    the n-th branch carrying it in another run, so duplicates never share a branch.
    """
    fp = value_fingerprint(values[index])
    if fp is None:
        return f"i{index}", True
    nth = sum(1 for v in values[:index] if value_fingerprint(v) == fp)
    return f"v{fp}k{nth}", False


@dataclasses.dataclass(frozen=True)
class Scope:
    """The set of checkpoints one task's attempts share and ``eager`` searches across runs.

    ``foreach`` holds one token per foreach level, from :func:`foreach_token` (ints are
    taken as indices). ``root`` is :data:`ROOT_PREFIX` for checkpoints and
    :data:`MODELS_PREFIX` for models.
    """

    flow: str
    namespace: str
    step: str
    foreach: tuple[str | int, ...] = ()
    root: str = ROOT_PREFIX

    def __post_init__(self) -> None:
        if self.root not in _ROOTS:
            raise ValueError(f"not a scope root: {self.root!r} (one of {', '.join(_ROOTS)})")
        tokens = tuple(f"i{t}" if isinstance(t, int) else t for t in self.foreach)
        for t in tokens:
            if not _FOREACH_TOKEN.fullmatch(t):
                raise ValueError(f"not a foreach token: {t!r}")
        object.__setattr__(self, "foreach", tokens)

    @property
    def prefix(self) -> str:
        foreach = ".".join(str(t) for t in self.foreach) if self.foreach else "root"
        return "/".join([self.root, safe_component(self.flow),
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
        if len(parts) != 5 or parts[0] not in _ROOTS:
            raise ValueError(f"not a checkpoint scope prefix: {prefix!r}")
        foreach = () if parts[4] == "root" else tuple(parts[4].split("."))
        return cls(parts[1], parts[2], parts[3], foreach, root=parts[0])


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

    def stored(self, relpath: str, key: str | None) -> str:
        """The key holding a manifest entry's bytes: its own ``key`` (relative to the
        scope, see :class:`~uploader.manifest.FileEntry`) if it has one, else this
        checkpoint's ``data(relpath)``."""
        return self.data(relpath) if key is None else f"{self.scope_prefix}/{key}"

    def relative(self, key: str) -> str:
        """``key`` relative to the scope prefix: what a later manifest's entry records."""
        head = self.scope_prefix + "/"
        if not key.startswith(head):
            raise ValueError(f"{key!r} is not under {head!r}")
        return key[len(head):]

    @property
    def order(self) -> tuple[int, int, int]:
        """``(attempt, seq, µs)``: see :func:`checkpoint_order`."""
        return checkpoint_order(self.checkpoint_id)

    @classmethod
    def newest_first(cls, keys: Iterable[CheckpointKeys]) -> list[CheckpointKeys]:
        """``keys`` sorted newest first, without trusting one host's clock over another's.

        Within one run (and scope) the checkpoints are one task's: ordered by attempt, then
        by save order within the attempt, so a retry on a host whose clock lags still
        counts as newer than the attempt before it. Different runs are different tasks
        with nothing shared but wall-clock time: a run ranks by its newest timestamp.
        """
        runs: dict[tuple[str, str], list[CheckpointKeys]] = {}
        for k in keys:
            runs.setdefault((k.scope_prefix, k.run_id), []).append(k)
        for members in runs.values():
            # The id breaks exact ties (ids that do not parse), so the result is stable.
            members.sort(key=lambda k: (k.order, k.checkpoint_id), reverse=True)
        ranked = sorted(runs, reverse=True,
                        key=lambda run: (max(k.order[2] for k in runs[run]), run))
        return [k for run in ranked for k in runs[run]]

    @classmethod
    def from_manifest_key(cls, key: str) -> CheckpointKeys:
        head, sep, tail = key.rpartition("/manifests/")
        run, _, leaf = tail.partition("/")
        if not sep or not leaf.endswith(".json") or "/" in leaf:
            raise ValueError(f"not a checkpoint manifest key: {key!r}")
        return cls(head, run, leaf[: -len(".json")])


def checkpoint_order(checkpoint_id: str) -> tuple[int, int, int]:
    """``(attempt, seq, µs)`` of a checkpoint id: larger was saved later in its task.

    The sequence number counts the saves of the task attempt on its host, across its
    processes, so within an attempt it orders saves however the host's clock moved; the
    timestamp only breaks ties. An id that does not
    parse sorts as the oldest, so one stray key never stops a listing.
    """
    # From the right: the task id may itself contain "-", the three last fields never do.
    parts = checkpoint_id.rsplit("-", 3)
    if len(parts) != 4:
        return _UNORDERED
    head, attempt, process, rand = parts
    m_us = _ID_HEAD.fullmatch(head)
    m_attempt = _ID_ATTEMPT.fullmatch(attempt)
    m_seq = _ID_PROCESS.fullmatch(process)
    if m_us is None or m_attempt is None or m_seq is None or not _ID_RANDOM.fullmatch(rand):
        return _UNORDERED
    return int(m_attempt[1]), int(m_seq[1]), int(m_us[1])


def new_checkpoint_id(task_id: str, attempt: int, *, seq: int | None = None) -> str:
    """``<µs since epoch, 16 digits>-<task>-a<attempt>-<pid>.<seq>-<random>``: unique.

    ``seq`` is the save's number in its task attempt, from the task's
    :class:`~uploader.sequence.SaveSequence`, which every process of the task shares;
    without it, a counter of this process alone. :func:`checkpoint_order` reads the order
    back; compare ids through it, not as strings.
    """
    global _last_us
    # Never go backwards within a process, even if the wall clock does.
    _last_us = max(time.time_ns() // 1000, _last_us + 1)
    return "%016d-%s-a%d-%d.%d-%s" % (
        _last_us, safe_component(str(task_id)), attempt, os.getpid(),
        next(_seq) if seq is None else seq, os.urandom(4).hex(),
    )
