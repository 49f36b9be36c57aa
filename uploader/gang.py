"""Gang checkpoints: the ranks of a distributed job checkpoint one training step together.

A gang is the set of ranks (tasks, usually on different hosts) that train one model
together. Each rank saves its own part (its shard of a sharded state) as an ordinary
checkpoint of the gang's scope whose manifest names the gang, the rank, the gang's size
and the part's *step key*: the attempt, the name, and the step. The step is the one the
saver passed, else how many saves of that name the rank made before in the attempt
(:class:`~uploader.sequence.SaveSequence`), so ranks that save in lock-step agree on it
without a clock or a message between them.

The parts with the same gang and step key form one gang checkpoint. It exists for
readers (resume, listings, retention) only once every *participant* has committed its
part. A rank becomes a participant durably before its first save of an attempt returns,
by writing a marker (:func:`marker_key`). In lock-step training a rank reaches its
second save only after every other rank passed the collective between the two, so
every rank that saves at all has declared itself before any gang checkpoint but the
very first of an attempt can look complete without it; resuming skips such a first one
(:attr:`Gang.maybe_torn_gang`). Ranks that never save (the replicated pattern: rank 0
saves, every rank loads it) never declare, and load the lowest participant's part.

Which gang checkpoint an attempt resumes from is chosen once, by rank 0, and written
down (:func:`decision_key`): ranks starting at different moments, while a straggler of
the failed attempt may still be committing, would otherwise see different newest steps.

Layout, under the scope prefix::

    gangs/<run>/<gang id>/rank-<r>.a<attempt>.json   rank r saves, from that attempt on
    gangs/<run>/<gang id>/resume.a<attempt>.json     what that attempt's ranks load
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .layout import safe_component
from .manifest import Manifest

__all__ = ["GANG_FIELD", "Gang", "GangMember", "GangPart", "Resume", "decision_key",
           "group", "marker_key", "parse_markers", "participants_prefix"]

GANG_FIELD = "gang"  # the key of a part's gang in its manifest's ``identity``
_MARKER = re.compile(r"rank-([0-9]+)\.a([0-9]+)\.json")


@dataclasses.dataclass(frozen=True)
class GangMember:
    """Who saves: rank ``rank`` of the ``size`` ranks of gang ``gang_id``."""

    gang_id: str
    rank: int
    size: int

    def __post_init__(self) -> None:
        if not self.gang_id or not 0 <= self.rank < self.size:
            raise ValueError(f"not a gang member: rank {self.rank} of {self.size} in "
                             f"gang {self.gang_id!r}")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.gang_id, "rank": self.rank, "size": self.size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GangMember:
        return cls(str(d["id"]), int(d["rank"]), int(d["size"]))


@dataclasses.dataclass(frozen=True)
class GangPart:
    """What a part's manifest says of its gang."""

    member: GangMember
    step: str  # "<attempt>/<name>/<step>": equal on every rank's part of one gang checkpoint
    nth: int = -1  # how many saves of its name the rank made before it in the attempt

    @classmethod
    def of(cls, manifest: Manifest) -> GangPart | None:
        d = manifest.identity.get(GANG_FIELD)
        if not isinstance(d, dict):
            return None
        try:
            return cls(GangMember.from_dict(d), str(d["step"]), int(d.get("nth", -1)))
        except (KeyError, TypeError, ValueError):
            return None

    @staticmethod
    def step_key(attempt: int, name: str, step: int | str) -> str:
        return f"{attempt}/{name}/{step}"


def participants_prefix(scope_prefix: str, run_id: str, gang_id: str) -> str:
    return f"{scope_prefix}/gangs/{safe_component(run_id)}/{safe_component(gang_id)}/"


def marker_key(scope_prefix: str, run_id: str, member: GangMember, attempt: int) -> str:
    return (participants_prefix(scope_prefix, run_id, member.gang_id)
            + f"rank-{member.rank}.a{attempt}.json")


def decision_key(scope_prefix: str, run_id: str, gang_id: str, attempt: int) -> str:
    return participants_prefix(scope_prefix, run_id, gang_id) + f"resume.a{attempt}.json"


def parse_markers(scope_prefix: str, keys: Iterable[str]) -> dict[tuple[str, str], set[int]]:
    """The participants of every gang of a scope, from the keys under its ``gangs/``:
    ``(run, gang id) -> ranks``, as the key components spell them."""
    head = f"{scope_prefix}/gangs/"
    out: dict[tuple[str, str], set[int]] = {}
    for k in keys:
        if not k.startswith(head):
            continue
        parts = k[len(head):].split("/")
        if len(parts) == 3 and (m := _MARKER.fullmatch(parts[2])):
            out.setdefault((parts[0], parts[1]), set()).add(int(m[1]))
    return out


@dataclasses.dataclass(frozen=True)
class Gang:
    """One gang checkpoint: the parts of one step of one gang, by rank."""

    gang_id: str
    run_id: str
    step: str
    size: int
    parts: Mapping[int, Any]  # rank -> the catalog's entry of that part
    participants: frozenset[int]

    @property
    def complete(self) -> bool:
        return all(r in self.parts for r in self.participants)

    @property
    def missing(self) -> list[int]:
        return sorted(r for r in self.participants if r not in self.parts)

    def part_for(self, rank: int) -> Any:
        """What ``rank`` loads: its own part, else (it never saves) the lowest rank's."""
        return self.parts.get(rank, self.parts[min(self.parts)])

    @property
    def maybe_torn_gang(self) -> bool:
        """Some rank never declared itself, and this is the first save of its name in the
        attempt.

        Then it cannot be told apart from a sharded gang's first step whose missing ranks
        died before their first save could declare them. From the second save on it can:
        in lock-step training a rank that saves has declared itself (in its first save)
        before the others get past the collective between the two. Resuming skips it.
        """
        if self.size < 2 or set(self.participants) >= set(range(self.size)):
            return False
        part = GangPart.of(self.parts[min(self.parts)].manifest)
        return part is not None and part.nth == 0


def group(entries: Sequence[Any], participants: Mapping[tuple[str, str], set[int]]
          ) -> list[tuple[Any, Gang | None]]:
    """``entries`` (a catalog's, newest first, each with ``keys`` and ``manifest``) as
    checkpoints, newest first: a plain entry as ``(entry, None)``; the parts of a gang
    checkpoint as one ``(representative, gang)``, the representative being its lowest
    rank's part and its place in the order that part's.

    ``participants`` comes from :func:`parse_markers`; a rank that committed a part is a
    participant even where its marker is missing.
    """
    parts: dict[tuple[str, str, str], dict[int, Any]] = {}
    sizes: dict[tuple[str, str, str], int] = {}
    for e in entries:
        p = GangPart.of(e.manifest)
        if p is None:
            continue
        key = (e.keys.run_id, safe_component(p.member.gang_id), p.step)
        # Two parts of one rank for one step (a step key passed twice): the newer wins.
        parts.setdefault(key, {}).setdefault(p.member.rank, e)
        sizes[key] = max(sizes.get(key, 0), p.member.size)
    seen: set[tuple[str, str, str]] = set()
    out: list[tuple[Any, Gang | None]] = []
    for e in entries:
        p = GangPart.of(e.manifest)
        if p is None:
            out.append((e, None))
            continue
        key = (e.keys.run_id, safe_component(p.member.gang_id), p.step)
        by_rank = parts[key]
        if key in seen or by_rank[min(by_rank)] is not e:
            continue
        seen.add(key)
        declared = participants.get((key[0], key[1]), set())
        out.append((e, Gang(gang_id=p.member.gang_id, run_id=key[0], step=p.step,
                            size=sizes[key], parts=dict(sorted(by_rank.items())),
                            participants=frozenset(declared | set(by_rank)))))
    return out


@dataclasses.dataclass(frozen=True)
class Resume:
    """What the ranks of one attempt of a gang load as they start, chosen by rank 0.

    ``parts`` maps each rank that saved to the manifest key of its part; a rank not in
    it loads the lowest rank's. Empty: nothing to load. ``error``: no rank may start.
    """

    parts: Mapping[int, str]
    size: int
    error: str = ""

    def to_json(self) -> bytes:
        return json.dumps({"parts": {str(r): k for r, k in self.parts.items()},
                           "size": self.size, "error": self.error}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Resume:
        d = json.loads(data)
        return cls({int(r): str(k) for r, k in d.get("parts", {}).items()},
                   int(d["size"]), str(d.get("error", "")))

    def key_for(self, rank: int) -> str | None:
        if not self.parts:
            return None
        return self.parts.get(rank, self.parts[min(self.parts)])
