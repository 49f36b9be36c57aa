"""Incremental saves on a real local store: unchanged files are not uploaded again."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import RunFlow
from enginekit import SCOPE, make_engine, request
from storekit import manifests, results, verify_all

from uploader import (
    CheckpointHandle,
    CheckpointKeys,
    CheckpointState,
    DrainProgress,
    Engine,
    LocalBackend,
    Manifest,
    Settings,
    TornCheckpointError,
    TransferContext,
    new_checkpoint_id,
)
from uploader.incremental import Bases, sha256_file

KiB = 1024
FROZEN_BYTES = 512 * KiB  # incremental_flow.py's frozen.bin


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a fresh inode, as a well-behaved trainer writes


def stored(tmp: Path, keys: CheckpointKeys) -> dict[str, bytes]:
    """What the store holds under a checkpoint's own data prefix, read from disk."""
    root = tmp / "store" / keys.data_prefix
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def manifest_of(engine: Engine, keys: CheckpointKeys) -> Manifest:
    m = engine.read_manifest(keys)
    assert m is not None, f"{keys.manifest} is not committed"
    return m


def test_second_save_uploads_only_the_changed_file_and_loads_back(tmp_path: Path) -> None:
    src = tmp_path / "src"
    base_bytes = os.urandom(256 * KiB)
    write(src / "base.bin", base_bytes)
    write(src / "adapter.bin", b"a" * 3000)
    committed: list[CheckpointHandle] = []
    engine = Engine(lambda ctx: LocalBackend(str(tmp_path / "store"), ctx),
                    Settings(copy_budget=0), snapshot_dir=str(tmp_path / "snapshots"),
                    log=lambda _: None, on_commit=committed.append)
    try:
        first = request(src)
        h1 = engine.save(first)
        h1.wait(30)
        assert h1.stats.bytes_skipped == 0 and h1.stats.bytes_uploaded == 256 * KiB + 3000
        write(src / "adapter.bin", b"b" * 3001)
        second = request(src)
        h2 = engine.save(second)
        h2.wait(30)
        # On disk, the second checkpoint's own data holds the changed file only.
        assert stored(tmp_path, second.keys) == {"adapter.bin": b"b" * 3001}
        m2 = manifest_of(engine, second.keys)
        by_path = {f.path: f for f in m2.files}
        assert by_path["base.bin"].key == second.keys.relative(first.keys.data("base.bin"))
        assert by_path["base.bin"].sha256 == hashlib.sha256(base_bytes).hexdigest()
        assert by_path["adapter.bin"].key is None
        raw = json.loads((tmp_path / "store" / second.keys.manifest).read_bytes())
        assert raw["min_reader"] == 2 and raw["bytes_skipped"] == 256 * KiB
        assert (h2.stats.files_skipped, h2.stats.bytes_skipped) == (1, 256 * KiB)
        assert h2.stats.bytes_uploaded == 3001 and h2.stats.bytes == 256 * KiB + 3001
        assert [h.checkpoint_id for h in committed] == [h1.checkpoint_id, h2.checkpoint_id]
        assert [h.number for h in committed] == [1, 2]

        # A third save points at the object the first one stored, never at the second.
        third = request(src)
        engine.save(third).wait(30)
        assert stored(tmp_path, third.keys) == {}
        m3 = manifest_of(engine, third.keys)
        assert {f.path: f.key for f in m3.files} == {
            "base.bin": third.keys.relative(first.keys.data("base.bin")),
            "adapter.bin": third.keys.relative(second.keys.data("adapter.bin"))}

        for keys, adapter in ((second.keys, b"b" * 3001), (third.keys, b"b" * 3001)):
            out = tmp_path / f"out-{keys.checkpoint_id}"
            engine.load(manifest_of(engine, keys), str(out), keys=keys)
            assert (out / "base.bin").read_bytes() == base_bytes
            assert (out / "adapter.bin").read_bytes() == adapter
        assert engine.referenced_keys() == set()  # nothing pending references anything
    finally:
        engine.close()


def test_a_file_of_the_same_size_with_other_bytes_is_uploaded(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "w.bin", b"x" * 50_000)
    engine = make_engine(tmp_path, copy_budget=0)
    try:
        engine.save(request(src)).wait(30)
        write(src / "w.bin", b"y" * 50_000)
        req = request(src)
        h = engine.save(req)
        h.wait(30)
        assert stored(tmp_path, req.keys) == {"w.bin": b"y" * 50_000}
        assert h.stats.bytes_skipped == 0
        assert all(f.key is None for f in manifest_of(engine, req.keys).files)
    finally:
        engine.close()


class PausingHasher:
    """The real hash, then a pause (when armed) before the engine sees the digest."""

    def __init__(self) -> None:
        self.armed = False
        self.hashed = threading.Event()
        self.resume = threading.Event()

    def __call__(self, path: str) -> str:
        digest = sha256_file(path)
        if self.armed:
            self.hashed.set()
            assert self.resume.wait(30)
        return digest


def test_a_file_rewritten_in_place_while_it_is_hashed_is_never_committed(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "state.pt", b"A" * 40_000)
    hasher = PausingHasher()
    engine = Engine(lambda ctx: LocalBackend(str(tmp_path / "store"), ctx),
                    Settings(copy_budget=0), snapshot_dir=str(tmp_path / "snapshots"),
                    log=lambda _: None, hasher=hasher)
    try:
        engine.save(request(src)).wait(30)
        hasher.armed = True
        req = request(src)
        h = engine.save(req)
        assert hasher.hashed.wait(30)
        # The digest just read equals the base's; the file now holds other bytes.
        with open(src / "state.pt", "r+b") as f:
            f.write(b"B" * 40_000)
        hasher.resume.set()
        with pytest.raises(TornCheckpointError) as ei:
            h.wait(30)
        assert "state.pt" in str(ei.value) and h.state is CheckpointState.TORN
        assert engine.read_manifest(req.keys) is None
        assert h.stats.files_skipped == 0
    finally:
        engine.close()


class HeldStat(LocalBackend):
    """Holds ``stat`` (the check that a referenced object still exists) until released."""

    def __init__(self, root: str, ctx: TransferContext) -> None:
        super().__init__(root, ctx)
        self.held = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.puts: list[str] = []

    async def put_file(self, key: str, path: str, size: int) -> str:
        self.puts.append(key)
        return await super().put_file(key, path, size)

    async def stat(self, key: str) -> int | None:
        if self.held:
            import anyio.to_thread

            self.entered.set()
            await anyio.to_thread.run_sync(self.release.wait)
        return await super().stat(key)


def test_a_referenced_object_removed_before_the_commit_is_uploaded_after_all(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "base.bin", os.urandom(100_000))
    write(src / "small.txt", b"1")
    backends: list[HeldStat] = []

    def factory(ctx: TransferContext) -> HeldStat:
        backends.append(HeldStat(str(tmp_path / "store"), ctx))
        return backends[-1]

    logs: list[str] = []
    engine = Engine(factory, Settings(copy_budget=0), snapshot_dir=str(tmp_path / "snap"),
                    log=logs.append)
    try:
        first = request(src)
        engine.save(first).wait(30)
        (backend,) = backends
        backend.held = True
        write(src / "small.txt", b"2")
        second = request(src)
        h = engine.save(second)
        assert backend.entered.wait(30)
        # While the save is pending, a pruner is told what it must keep...
        referenced = first.keys.data("base.bin")
        assert engine.referenced_keys() == {referenced}
        # ... and this time someone else removed it anyway.
        os.unlink(tmp_path / "store" / referenced)
        backend.release.set()
        h.wait(30)
        assert h.state is CheckpointState.COMMITTED
        assert stored(tmp_path, second.keys) == {"base.bin": (src / "base.bin").read_bytes(),
                                                 "small.txt": b"2"}
        assert all(f.key is None for f in manifest_of(engine, second.keys).files)
        assert h.stats.bytes_skipped == 0 and h.stats.bytes_uploaded == 100_001
        assert any("uploading it again" in m and "it is gone" in m for m in logs), logs
        assert engine.referenced_keys() == set()
        out = tmp_path / "out"
        engine.load(manifest_of(engine, second.keys), str(out), keys=second.keys)
        assert (out / "base.bin").read_bytes() == (src / "base.bin").read_bytes()
    finally:
        engine.close()


class HeldDelete(LocalBackend):
    """A local store whose deletions wait, once told to, until the test releases them."""

    def __init__(self, root: str, ctx: TransferContext) -> None:
        super().__init__(root, ctx)
        self.entered = threading.Event()
        self.release = threading.Event()

    async def delete_keys(self, keys: Sequence[str]) -> list[tuple[str, str]]:
        import anyio.to_thread

        self.entered.set()
        await anyio.to_thread.run_sync(self.release.wait)
        return await super().delete_keys(keys)


def test_a_deletion_never_lands_between_a_saves_check_and_its_commit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "base.bin", os.urandom(100_000))
    backends: list[HeldDelete] = []

    def factory(ctx: TransferContext) -> HeldDelete:
        backends.append(HeldDelete(str(tmp_path / "store"), ctx))
        return backends[-1]

    engine = Engine(factory, Settings(copy_budget=0), snapshot_dir=str(tmp_path / "snap"),
                    log=lambda m: None)
    try:
        first = request(src)
        engine.save(first).wait(30)
        (backend,) = backends
        shared = first.keys.data("base.bin")
        # A pruner decides to delete the object while no save points at it, and is slow.
        pruned: list[object] = []
        pruner = threading.Thread(
            target=lambda: pruned.append(engine.delete_unreferenced([shared])))
        pruner.start()
        assert backend.entered.wait(30)
        # Meanwhile a save finds the file unchanged and points at that object...
        second = request(src)
        h = engine.save(second)
        deadline = time.monotonic() + 30
        while shared not in engine.referenced_keys():
            assert time.monotonic() < deadline and not h.done(), h.state
            time.sleep(0.005)  # polls a real condition, with a deadline
        # ... and only then does the deletion go through. The save must not commit a
        # manifest pointing at the object it found before the deletion: it checks after.
        backend.release.set()
        pruner.join(30)
        assert pruned == [([shared], [])]
        h.wait(30)
        assert h.state is CheckpointState.COMMITTED
        m = manifest_of(engine, second.keys)
        assert all(f.key is None for f in m.files), m  # uploaded after all
        out = tmp_path / "out"
        engine.load(m, str(out), keys=second.keys)
        assert (out / "base.bin").read_bytes() == (src / "base.bin").read_bytes()
    finally:
        backends[0].release.set()
        engine.close()


def test_a_checkpoint_loaded_at_start_is_the_base_of_the_first_save(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "frozen.bin", os.urandom(64 * KiB))
    write(src / "step.txt", b"1")
    earlier = make_engine(tmp_path, copy_budget=0)
    try:
        first = request(src, attempt=0)
        earlier.save(first).wait(30)
    finally:
        earlier.close()
    # The retry: a new engine on the same store, told what the task loaded.
    engine = make_engine(tmp_path, copy_budget=0)
    try:
        engine.set_base(first.keys, manifest_of(engine, first.keys))
        write(src / "step.txt", b"2")
        req = request(src, attempt=1)
        h = engine.save(req)
        h.wait(30)
        assert stored(tmp_path, req.keys) == {"step.txt": b"2"}
        assert h.stats.bytes_skipped == 64 * KiB
        other = CheckpointKeys("mf.checkpoints/F/u/s/root", "1", new_checkpoint_id("7", 0))
        with pytest.raises(ValueError, match="names the scope"):
            engine.set_base(other, manifest_of(engine, first.keys))
    finally:
        engine.close()


def test_the_base_is_the_newest_by_checkpoint_order_not_by_commit_time() -> None:
    def keys(attempt: int) -> CheckpointKeys:
        return CheckpointKeys(SCOPE.prefix, "1", new_checkpoint_id("7", attempt))

    def manifest(k: CheckpointKeys) -> Manifest:
        return Manifest(checkpoint_id=k.checkpoint_id, name="ck", run_id=k.run_id,
                        scope_prefix=k.scope_prefix, created_on="", committed_on="",
                        latest=True, files=(), metadata={}, identity={}, source="directory",
                        timings={})

    loaded, older, newer = keys(0), keys(1), keys(1)
    bases = Bases()
    assert bases.offer(loaded, manifest(loaded), own=False)
    assert bases.offer(newer, manifest(newer), own=True)  # ours replaces the loaded one
    assert not bases.offer(older, manifest(older), own=True)  # committed later, saved earlier
    assert not bases.offer(loaded, manifest(loaded), own=False)
    base = bases.get(SCOPE.prefix)
    assert base is not None and base.keys == newer


def test_drain_reports_progress_while_uploads_are_pending(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "f.bin", b"x" * 10_000)
    engine = make_engine(tmp_path, gated=True, copy_budget=0, progress_interval=0.01)
    reports: list[DrainProgress] = []

    def progress(p: DrainProgress) -> None:
        reports.append(p)
        engine.backend.gate.set()  # type: ignore[attr-defined]

    try:
        h = engine.save(request(src))
        assert engine.backend.entered.wait(30)  # type: ignore[attr-defined]
        report = engine.drain(30, progress=progress)
        assert report.pending == [] and h.state is CheckpointState.COMMITTED
        assert reports and reports[0].pending == 1 and reports[0].bytes_left == 10_000
        assert reports[0].waited_s >= 0.01
        n = len(reports)
        engine.drain(30, progress=progress)  # nothing pending: nothing reported
        assert len(reports) == n
    finally:
        engine.close()


# -- what the task prints --------------------------------------------------------------

def test_commit_and_drain_lines_say_what_was_skipped_and_what_is_left() -> None:
    from metaflow_extensions.asynccheckpoint.plugins.shared.report import commit_line, drain_line

    h = CheckpointHandle("id", "mfchckpt", {}, "/src")
    h.number = 3
    s = h.stats
    s.files, s.bytes, s.files_skipped = 3, 257 << 20, 2
    s.bytes_skipped, s.bytes_uploaded = 256 << 20, 1 << 20
    s.upload_s, s.blocked_s = 0.5, 0.0012
    # The default: one short line.
    assert commit_line(h) == "committed 'mfchckpt' #3: 257.0 MiB, 1.0 MiB uploaded in 500.0 ms"
    # The debug level: every figure.
    assert commit_line(h, detail=True) == (
        "committed 'mfchckpt' #3: 257.0 MiB in 3 files, 256.0 MiB unchanged (not "
        "uploaded); uploaded 1.0 MiB in 500.0 ms (2.00 MiB/s); save() blocked 1.2 ms")
    s.bytes_uploaded = 3000  # a small upload's rate in units that read
    assert "; uploaded 2.9 KiB in 500.0 ms (5.86 KiB/s); save()" in commit_line(h, detail=True)
    s.bytes_uploaded = 0  # nothing uploaded: no rate to speak of
    assert "; uploaded 0 B in 500.0 ms; save()" in commit_line(h, detail=True)
    assert commit_line(h) == "committed 'mfchckpt' #3: 257.0 MiB, 0 B uploaded in 500.0 ms"
    s.bytes_skipped, s.bytes_uploaded = 0, 257 << 20
    assert commit_line(h) == "committed 'mfchckpt' #3: 257.0 MiB, all uploaded in 500.0 ms"
    assert drain_line(DrainProgress(pending=2, bytes_left=300 << 20, waited_s=10.0)) == (
        "waiting for 2 pending uploads: 300.0 MiB left, 10.00 s so far")
    assert drain_line(DrainProgress(pending=1, bytes_left=5, waited_s=0.5)).startswith(
        "waiting for 1 pending upload: 5 B left")


def test_commit_lines_come_out_in_save_order() -> None:
    from metaflow_extensions.asynccheckpoint.plugins.shared.report import InSaveOrder

    handles = []
    for n in range(1, 6):
        h = CheckpointHandle(f"id{n}", "mfchckpt", {}, "/src")
        h.number = n
        handles.append(h)
    out: list[str] = []
    order = InSaveOrder(out.append, lambda: handles, lambda h: f"line {h.number}")

    def final(h: CheckpointHandle, state: CheckpointState) -> None:
        h._transition(CheckpointState.UPLOADING)
        h._transition(state)

    # As the engine does: the state is final when the listener is called.
    final(handles[1], CheckpointState.COMMITTED)
    order.committed(handles[1])  # save 2 commits while save 1 still uploads: held
    assert out == []
    final(handles[0], CheckpointState.COMMITTED)
    order.committed(handles[0])
    assert out == ["line 1", "line 2"]
    final(handles[3], CheckpointState.COMMITTED)
    order.committed(handles[3])  # save 4 before save 3, which then fails
    assert out == ["line 1", "line 2"]
    final(handles[2], CheckpointState.FAILED)
    final(handles[4], CheckpointState.COMMITTED)
    order.committed(handles[4])  # the next commit lets save 4's line out, then its own
    assert out == ["line 1", "line 2", "line 4", "line 5"]
    # What still waits at the end of the task is printed by flush().
    for n in (6, 7):
        handles.append(CheckpointHandle(f"id{n}", "mfchckpt", {}, "/src"))
        handles[-1].number = n
    final(handles[6], CheckpointState.COMMITTED)
    order.committed(handles[6])  # save 6 still uploads (the drain gave up on it)
    assert out[-1] == "line 5"
    order.flush()
    assert out[-1] == "line 7"


@pytest.mark.flow
def test_a_flow_skips_unchanged_files_and_its_retry_skips_what_it_loaded(
        run_flow: RunFlow, datastore_root: Path) -> None:
    # At the debug level, each commit's line gives every figure.
    out = run_flow("incremental_flow.py", env={"METAFLOW_CHECKPOINT_LOG_LEVEL": "debug"})
    text = out.stdout + out.stderr
    r = results(text)
    assert r["loaded"] == "True" and r["state"] == "committed"
    lines = [line for line in text.splitlines() if "[@checkpoint] committed 'mfchckpt'" in line]
    frozen = "512.0 KiB"
    # Attempt 0: the first save uploads everything, the second only step.txt; attempt 1's
    # first save skips what it loaded.
    assert len(lines) == 3, text
    assert f"#1: {frozen} in 2 files, 0 B unchanged (not uploaded); uploaded " \
           f"{frozen} in" in lines[0]
    for line in lines[1:]:
        assert f"#{1 if line is lines[2] else 2}: {frozen} in 2 files, {frozen} " \
               "unchanged (not uploaded); uploaded 1 B in " in line, line
        assert "save() blocked " in line
    # Printed before the waiting save() returns, so before what the task did next.
    assert text.index("#2: ") < text.index("2 of 2 checkpoint(s) of this attempt")
    found = sorted(manifests(datastore_root), key=lambda km: (km[1].identity["attempt"],
                                                              km[0].order))
    assert [m.metadata["epoch"] for _, m in found] == [0, 1, 2]
    first_keys = found[0][0]
    for keys, m in found[1:]:
        by_path = {f.path: f for f in m.files}
        # Always the object the first checkpoint stored, never a pointer to a pointer.
        assert by_path["frozen.bin"].key == keys.relative(first_keys.data("frozen.bin"))
        assert by_path["step.txt"].key is None
        own = datastore_root / keys.data_prefix
        assert sorted(p.name for p in own.rglob("*") if p.is_file()) == ["step.txt"]
        assert m.bytes_skipped == FROZEN_BYTES
    assert verify_all(datastore_root) == 3


def test_the_progress_interval_is_a_checked_setting() -> None:
    from uploader import ConfigError, parse_settings

    assert parse_settings({"PROGRESS_INTERVAL": "0.5"}).progress_interval == 0.5
    with pytest.raises(ConfigError, match="METAFLOW_CHECKPOINT_PROGRESS_INTERVAL='0'"):
        parse_settings({"PROGRESS_INTERVAL": "0"}, prefix="METAFLOW_CHECKPOINT_")


def test_incremental_false_stores_every_checkpoint_whole(tmp_path: Path) -> None:
    from uploader import ConfigError, parse_settings

    assert parse_settings({"INCREMENTAL": "off"}).incremental is False
    assert parse_settings({}).incremental is True
    with pytest.raises(ConfigError, match="METAFLOW_CHECKPOINT_INCREMENTAL='maybe'"):
        parse_settings({"INCREMENTAL": "maybe"}, prefix="METAFLOW_CHECKPOINT_")
    src = tmp_path / "src"
    write(src / "w.bin", b"w" * 20_000)
    engine = make_engine(tmp_path, copy_budget=0, incremental=False)
    try:
        engine.save(request(src)).wait(30)
        req = request(src)
        h = engine.save(req)
        h.wait(30)
        assert stored(tmp_path, req.keys) == {"w.bin": b"w" * 20_000}
        assert h.stats.bytes_skipped == 0
    finally:
        engine.close()


@pytest.mark.parametrize("how", ["file", "memory"])
def test_a_same_size_corrupted_base_object_is_never_pointed_at(tmp_path: Path, how: str
                                                               ) -> None:
    """The size alone would let a corruption that keeps it spread to every later
    checkpoint: the stored file's digest decides."""
    src = tmp_path / "src"
    original = os.urandom(100_000)
    write(src / "base.bin", original)
    logs: list[str] = []
    budget = 1 << 20 if how == "memory" else 0
    engine = make_engine(tmp_path, copy_budget=budget, logs=logs)
    try:
        first = request(src)
        engine.save(first).wait(30)
        stored_path = tmp_path / "store" / first.keys.data("base.bin")
        with open(stored_path, "r+b") as f:  # same size, other bytes: bit rot, a stray tool
            f.seek(50_000)
            f.write(b"\0" * 16)
        second = request(src)
        h = engine.save(second)
        h.wait(30)
        assert stored(tmp_path, second.keys) == {"base.bin": original}  # sent again
        assert all(f.key is None for f in manifest_of(engine, second.keys).files)
        assert h.stats.bytes_skipped == 0 and h.stats.bytes_uploaded == 100_000
        assert any("not usable (its bytes have SHA-256" in m and "uploading it again" in m
                   for m in logs), logs
        # The object stored again is pointed at by the next save, and loads back whole.
        third = request(src)
        h3 = engine.save(third)
        h3.wait(30)
        assert h3.stats.bytes_skipped == 100_000
        out = tmp_path / "out"
        engine.load(manifest_of(engine, third.keys), str(out), keys=third.keys)
        assert (out / "base.bin").read_bytes() == original
    finally:
        engine.close()


def test_the_local_digest_of_a_stored_file_is_read_once_while_it_is_unchanged(
        tmp_path: Path) -> None:
    from uploader.backends.digests import DigestCache

    path = tmp_path / "obj"
    path.write_bytes(b"x" * 1000)
    cache = DigestCache(limit=2)
    cache.remember(str(path), "remembered")
    assert cache.of(str(path)) == "remembered"  # not read: its stat is as it was written
    with open(path, "r+b") as f:
        f.write(b"y")  # moves mtime and ctime
    want = hashlib.sha256(b"y" + b"x" * 999).hexdigest()
    assert cache.of(str(path)) == want
    for i in range(3):  # only the newest `limit` are kept
        (tmp_path / str(i)).write_bytes(b"")
        cache.remember(str(tmp_path / str(i)), "e")
    assert cache.of(str(path)) == want  # forgotten, so read again
