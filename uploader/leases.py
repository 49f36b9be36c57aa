"""Savers and pruners of one store, in any processes on any hosts: who may delete what.

A store is shared: the ranks of a gang, concurrent runs of one step, a task's helper
processes, a ``checkpoint prune`` from a laptop, a scheduled clean-up. Two things can go
wrong between a save and a prune that run in different processes:

- a save *points at* an object of an earlier checkpoint (an unchanged file, see
  :mod:`uploader.incremental`) that a prune deletes, as it deletes that checkpoint,
  between the save's check that the object exists and its commit;
- a prune takes the data of a save still uploading for debris (data no manifest names).

Both are settled in the store itself, with two kinds of small objects under
``<scope>/locks/``, each carrying its time to live in its key and aged by the store's
clock (the modification time the store gives it), never a host's:

- a **lease** (``locks/save/<run>/<checkpoint id>.t<ttl>.json``), written by a save before
  its first byte of data and rewritten every :data:`REFRESH_S` while it lasts, listing
  the objects the save points at; deleted once the save is final;
- a **prune marker** (``locks/prune/<id>.t<ttl>.json``), written by a prune before it
  looks at anything and rewritten while it lasts; deleted when it ends.

The rules:

1. A prune writes its marker, *then* lists the leases. It never deletes a live lease's
   data, nor an object a live lease points at. Its "now" is its own marker's time, so
   the grace period of debris is measured on the store's clock.
2. A save that points at objects rewrites its lease with them, *then* lists the prune
   markers; while one of another process that was live then is still live and not
   rewritten since, it waits (up to :data:`PRUNE_WAIT_S`, then it uploads those files
   instead), and only then checks that the objects exist and commits.
3. A prune issues no deletion later than :data:`REFRESH_S` after its marker was last
   written (it rewrites the marker first), far inside the marker's time to live.

Whichever of a lease and a marker was written first, the other side sees it (a listing
shows every object written before it): either the prune spares the save's objects, or
the save waits until the prune has ended and then finds what it deleted missing and
uploads it again. Data a save writes after a prune listed the leases is newer than that
prune's marker, so no grace period, not even 0, makes it debris. A process that dies
leaves its lease or marker to expire; expired ones are removed by later prunes.

Within one process, the engine's own pruner is excluded by the engine's pointing lock
instead (:meth:`Engine.delete_unreferenced <uploader.engine.Engine.delete_unreferenced>`):
a save never waits for the marker of its own process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import anyio

from .backends.base import Backend, StoredObject
from .layout import CheckpointKeys, safe_component

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["LEASE_TTL_S", "PRUNE_WAIT_S", "REFRESH_S", "Lock", "LockView", "PruneGuard",
           "SaveLease", "locks_prefix"]

# How long a lease or a marker counts as live after it was last written, by the store's
# clock. A process that dies leaves its locks to expire after this.
LEASE_TTL_S = 600.0
# How often a live lease or marker is rewritten; a prune issues no deletion later than
# this after its marker was last written.
REFRESH_S = 60.0
# How long a save that points at objects waits for the prunes of other processes to end
# before it uploads those files instead.
PRUNE_WAIT_S = 60.0

_LEAF = re.compile(r"(?P<name>.+)\.t(?P<ttl>[0-9]+)\.json")
_FORMAT = 1


def locks_prefix(scope_prefix: str) -> str:
    return f"{scope_prefix}/locks/"


@dataclasses.dataclass(frozen=True)
class Lock:
    """A lease or a prune marker, as listed."""

    key: str
    kind: str  # "save" | "prune"
    name: str  # the checkpoint id of a lease, the marker's id
    run: str | None  # the run of a lease
    ttl: float
    mtime: float  # by the store's clock

    def live(self, now: float) -> bool:
        return now - self.mtime <= self.ttl

    @classmethod
    def parse(cls, scope_prefix: str, obj: StoredObject) -> Lock | None:
        rest = obj.key[len(locks_prefix(scope_prefix)):].split("/")
        m = _LEAF.fullmatch(rest[-1])
        if m is None:
            return None
        if rest[0] == "save" and len(rest) == 3:
            return cls(obj.key, "save", m["name"], rest[1], float(m["ttl"]), obj.mtime)
        if rest[0] == "prune" and len(rest) == 2:
            return cls(obj.key, "prune", m["name"], None, float(m["ttl"]), obj.mtime)
        return None


@dataclasses.dataclass(frozen=True)
class LockView:
    """The locks of a scope at one listing, and the store's time then.

    ``now`` is the store-clock time of the lock the lister wrote just before listing:
    the listing is no older than that.
    """

    scope_prefix: str
    locks: tuple[Lock, ...]
    now: float

    @classmethod
    def of(cls, scope_prefix: str, objects: Iterable[StoredObject], own_key: str
           ) -> LockView:
        locks = tuple(lk for o in objects if (lk := Lock.parse(scope_prefix, o)) is not None)
        own = [lk.mtime for lk in locks if lk.key == own_key]
        if not own:
            raise RuntimeError(f"the store did not list {own_key}, written just before; "
                               "not pruning, since what is in flight cannot be known")
        return cls(scope_prefix, locks, own[0])

    def live_leases(self) -> list[Lock]:
        return [lk for lk in self.locks if lk.kind == "save" and lk.live(self.now)]

    def live_prunes(self, exclude: Iterable[str] = ()) -> list[Lock]:
        skip = set(exclude)
        return [lk for lk in self.locks
                if lk.kind == "prune" and lk.key not in skip and lk.live(self.now)]

    def lease_times(self) -> dict[tuple[str, str], float]:
        """When each checkpoint's lease, live or not, was last written: by (run, id)."""
        return {(lk.run, lk.name): lk.mtime for lk in self.locks
                if lk.kind == "save" and lk.run is not None}

    def expired(self, grace_s: float) -> list[str]:
        """Locks that expired more than ``grace_s`` ago: what dead processes left."""
        return sorted(lk.key for lk in self.locks if self.now - lk.mtime > lk.ttl + grace_s)


def _holder() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


# -- the saving side: on the engine's loop ---------------------------------------------


class SaveLease:
    """The lease of one save in flight (rule 2). Methods run on the engine's loop."""

    def __init__(self, backend: Backend, keys: CheckpointKeys, *,
                 ttl: float = LEASE_TTL_S) -> None:
        self.backend = backend
        self.keys = keys
        self.ttl = ttl
        run = safe_component(keys.run_id)
        self.key = (f"{locks_prefix(keys.scope_prefix)}save/{run}/"
                    f"{keys.checkpoint_id}.t{int(ttl)}.json")
        self.pointers: tuple[str, ...] = ()
        self.written: float | None = None  # monotonic, taken before the last write

    async def write(self, pointers: Sequence[str] | None = None) -> None:
        """Write (or rewrite) the lease; ``pointers`` are full keys the save points at."""
        if pointers is not None:
            self.pointers = tuple(sorted(pointers))
        body = json.dumps({
            "format": _FORMAT, "checkpoint_id": self.keys.checkpoint_id,
            "run_id": self.keys.run_id,
            "pointers": [self.keys.relative(k) for k in self.pointers], **_holder(),
        }, sort_keys=True).encode()
        t = time.monotonic()
        await self.backend.put_bytes(self.key, body)
        self.written = t

    @property
    def lapsed(self) -> bool:
        """Whether the lease may have expired: not rewritten for most of its time to live
        (the store was out of reach), so a prune may have taken its data for debris."""
        return self.written is None or time.monotonic() - self.written > self.ttl / 2

    async def keep_alive(self, warn: Callable[[str], None]) -> None:
        """Rewrite the lease every :data:`REFRESH_S` until cancelled; never raises."""
        while True:
            await anyio.sleep(REFRESH_S)
            if self.written is None:
                continue
            try:
                await self.write()
            except Exception as e:
                warn(f"could not renew the lease {self.backend.url_of(self.key)} of a save "
                     f"in flight: {e}. It is checked again before it commits.")

    async def await_prunes(self, own: Callable[[], frozenset[str]],
                           wait_s: float = PRUNE_WAIT_S) -> bool:
        """Wait until no prune of another process that may have looked at the leases
        before this one was written is still running; False if one still is after
        ``wait_s``. Call after :meth:`write` with the pointers.

        Only the markers live at the first look count: a prune whose marker is written
        (or rewritten, see :meth:`PruneGuard.fresh`) after this lease looks at the leases
        after that, and spares what this one points at. So a stream of prunes never
        starves a save.
        """
        deadline = time.monotonic() + wait_s
        pause = 0.05
        first: dict[str, float] | None = None
        since = 0.0
        while True:
            objects = await self.backend.list_objects(locks_prefix(self.keys.scope_prefix))
            view = LockView.of(self.keys.scope_prefix, objects, self.key)
            live = {lk.key: lk.mtime for lk in view.live_prunes(own())}
            if first is None:
                first, since = live, view.now
            if not any(k in live and live[k] <= since for k in first):
                return True
            if time.monotonic() >= deadline:
                return False
            await anyio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def release(self) -> None:
        await self.backend.delete_keys([self.key])


# -- the pruning side: from a thread, through the engine's portal ----------------------


class PruneGuard:
    """A prune's marker and its view of the leases (rules 1 and 3), as a context manager.

    Used from any thread but the engine's loop. ``now`` is the store's time of the
    marker; ``spared`` holds every key a live lease points at, ``leased`` the (run, id)
    of every checkpoint with a live lease, and ``lease_times`` when each lease, live or
    not, was last written.
    """

    def __init__(self, engine: Engine, scope_prefix: str, *, ttl: float = LEASE_TTL_S) -> None:
        self.engine = engine
        self.scope_prefix = scope_prefix
        self.ttl = ttl
        marker = safe_component(f"{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}")
        self.key = f"{locks_prefix(scope_prefix)}prune/{marker}.t{int(ttl)}.json"
        self.written = 0.0
        self.view = LockView(scope_prefix, (), 0.0)
        self.spared: set[str] = set()
        self.leased: set[tuple[str, str]] = set()

    def __enter__(self) -> PruneGuard:
        self.engine.own_prune_marker(self.key, True)
        try:
            self._write()
            self.look()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.engine.run(self.engine.backend.delete_keys, [self.key])
        except Exception:
            pass  # it expires
        finally:
            self.engine.own_prune_marker(self.key, False)

    @property
    def now(self) -> float:
        return self.view.now

    def _write(self) -> None:
        body = json.dumps({"format": _FORMAT, **_holder()}, sort_keys=True).encode()
        t = time.monotonic()
        self.engine.run(self.engine.backend.put_bytes, self.key, body)
        self.written = t

    def look(self) -> None:
        """List the locks (after the marker was written) and read the live leases."""
        engine = self.engine
        objects = engine.run(engine.backend.list_objects, locks_prefix(self.scope_prefix))
        view = LockView.of(self.scope_prefix, objects, self.key)
        spared: set[str] = set()
        leased: set[tuple[str, str]] = set()
        live = view.live_leases()
        bodies = engine.run(_read_all, engine.backend, [lk.key for lk in live])
        for lk, body in zip(live, bodies, strict=True):
            assert lk.run is not None
            leased.add((lk.run, lk.name))
            if body is None:
                # Released since the listing: its save is final, and its manifest (read
                # after this) names what it points at.
                continue
            try:
                doc = json.loads(body)
                pointers = [f"{self.scope_prefix}/{p}" for p in doc["pointers"]]
                if not all(isinstance(p, str) for p in doc["pointers"]):
                    raise TypeError("pointers are not keys")
            except (ValueError, TypeError, KeyError) as e:
                raise RuntimeError(f"the lease {engine.backend.url_of(lk.key)} cannot be "
                                   f"read ({e}); not deleting data while what it points "
                                   "at is unknown") from e
            spared.update(pointers)
        self.view, self.spared, self.leased = view, spared, leased

    @property
    def overdue(self) -> bool:
        """Whether the marker was last written more than :data:`REFRESH_S` ago: no
        deletion is issued then before :meth:`fresh`."""
        return time.monotonic() - self.written > REFRESH_S

    def fresh(self) -> None:
        """Before deleting: rewrite the marker if it is :attr:`overdue`, and look at the
        leases again, since a save may have waited for it and moved on."""
        if self.overdue:
            self._write()
            self.look()


async def _read_all(backend: Backend, keys: list[str]) -> list[bytes | None]:
    out: list[bytes | None] = [None] * len(keys)

    async def one(i: int) -> None:
        out[i] = await backend.get_bytes(keys[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(keys)):
            tg.start_soon(one, i)
    return out
