"""Every frozen byte is checked: a read into memory, a copy and a clone end with the same
fingerprint comparison a linked file gets before its upload commits.

The writes "during" a freeze are made by the snapshot's own thread, half way through its
read or copy of the file (a seam around ``os.read`` / ``os.copy_file_range`` that lets
the real call do half the work, rewrites the file in place, then lets it go on), so each
case happens every time, with no sleeping and no luck.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import RunFlow
from enginekit import make_engine, request
from storekit import manifests, results, stored_bytes

from uploader import (
    CheckpointKeys,
    CheckpointState,
    Engine,
    SnapshotMode,
    TornCheckpointError,
    take_snapshot,
)

KiB = 1024


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def rewrite_in_place(path: Path, data: bytes) -> None:
    # Truncate and rewrite the same inode, as torch.save and open(path, "wb") do.
    with open(path, "wb") as f:
        f.write(data)


def stored(engine: Engine, tmp: Path, keys: CheckpointKeys) -> dict[str, bytes]:
    manifest = engine.read_manifest(keys)
    assert manifest is not None, "committed, yet no manifest"
    return {f.path: (tmp / "store" / keys.stored(f.path, f.key)).read_bytes()
            for f in manifest.files}


def _is(fd: int, path: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(path)
    except OSError:
        return False


@contextlib.contextmanager
def rewritten_mid_freeze(monkeypatch: pytest.MonkeyPatch, path: Path, data: bytes
                         ) -> Iterator[list[int]]:
    """While active, the first read or kernel copy of ``path`` does half its work, then
    ``path`` is rewritten in place with ``data``, then the rest is read: a mix of two
    versions, as a writer racing the snapshot would leave. Yields a list that counts the
    rewrites made (one at most)."""
    done: list[int] = []
    real_read, real_copy = os.read, os.copy_file_range

    def read(fd: int, n: int) -> bytes:
        if done or not _is(fd, path):
            return real_read(fd, n)
        size = os.fstat(fd).st_size
        head = real_read(fd, size // 2)
        rewrite_in_place(path, data)
        done.append(1)
        return head + real_read(fd, n - len(head))

    def copy(src: int, dst: int, count: int, *args: Any) -> int:
        if done or not _is(src, path):
            return real_copy(src, dst, count, *args)
        n = real_copy(src, dst, os.fstat(src).st_size // 2, *args)
        rewrite_in_place(path, data)
        done.append(1)
        return n

    monkeypatch.setattr(os, "read", read)
    monkeypatch.setattr(os, "copy_file_range", copy)
    try:
        yield done
    finally:
        monkeypatch.setattr(os, "read", real_read)
        monkeypatch.setattr(os, "copy_file_range", real_copy)


def _torn_then_committed(tmp: Path, monkeypatch: pytest.MonkeyPatch, size: int,
                         **settings: Any) -> list[str]:
    src = tmp / "src"
    state = src / "state.pt"
    write(state, b"A" * size)
    write(src / "other.bin", b"o" * size)
    logs: list[str] = []
    engine = make_engine(tmp, logs=logs, **settings)
    try:
        engine.backend  # noqa: B018  start the loop first: only the save reads the file
        req = request(src)
        with rewritten_mid_freeze(monkeypatch, state, b"B" * size) as done:
            h = engine.save(req)
        assert done == [1], "the seam never ran: the file was not read or copied"
        with pytest.raises(TornCheckpointError) as ei:
            h.wait(30)
        assert h.state is CheckpointState.TORN and ei.value.path == "state.pt"
        assert "'state.pt' was rewritten in place while save() froze it" in str(ei.value)
        assert "call save() once the file is written" in str(ei.value)
        assert engine.read_manifest(req.keys) is None
        # Saved again once the writer is done: it commits the new version, whole.
        again = request(src)
        h2 = engine.save(again)
        h2.wait(30)
        assert stored(engine, tmp, again.keys) == {"state.pt": b"B" * size,
                                                   "other.bin": b"o" * size}
    finally:
        engine.close()
    return logs


def test_a_file_rewritten_while_it_is_read_into_memory_is_torn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _torn_then_committed(tmp_path, monkeypatch, 64 * KiB, copy_budget=1 << 20)


def test_a_file_rewritten_while_it_is_copied_is_torn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _torn_then_committed(tmp_path, monkeypatch, 512 * KiB, snapshot=SnapshotMode.COPY)


def test_a_file_rewritten_while_its_private_copy_is_made_is_torn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's case: a file learned to be rewritten in place is copied in save() from
    then on; a rewrite racing that copy must tear it, not commit half of each version."""
    src = tmp_path / "src"
    state = src / "state.pt"
    size = 512 * KiB
    write(state, b"A" * size)
    engine = make_engine(tmp_path, gated=True, copy_budget=0, max_pending=4)
    try:
        first = engine.save(request(src))
        backend = engine.backend
        assert backend.entered.wait(30)  # type: ignore[attr-defined]
        rewrite_in_place(state, b"B" * size)  # while the first upload is pending
        backend.gated = False  # type: ignore[attr-defined]
        backend.gate.set()  # type: ignore[attr-defined]
        with pytest.raises(TornCheckpointError):
            first.wait(30)
        req = request(src)
        with rewritten_mid_freeze(monkeypatch, state, b"C" * size) as done:
            h = engine.save(req)  # copies the file privately, and the copy is raced
        assert done == [1]
        with pytest.raises(TornCheckpointError) as ei:
            h.wait(30)
        assert "while save() froze it" in str(ei.value)
        again = request(src)
        engine.save(again).wait(30)
        assert stored(engine, tmp_path, again.keys) == {"state.pt": b"C" * size}
    finally:
        engine.close()


def test_a_snapshot_marks_what_it_could_not_freeze_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    write(src / "a.bin", b"A" * 4096)
    write(src / "b.bin", b"b" * 4096)
    with rewritten_mid_freeze(monkeypatch, src / "a.bin", b"Z" * 4096):
        snap = take_snapshot(str(src), str(tmp_path / "snaps"), copy_budget=1 << 20)
    try:
        whole = {f.relpath: f.whole for f in snap.files}
        assert whole == {"a.bin": False, "b.bin": True}
    finally:
        snap.release()


# -- a writer racing save() -----------------------------------------------------------------


def held_between(states: list[tuple[int, int]], data: bytes, start: int, end: int) -> bool:
    """Whether a file whose writes left ``states`` (``(version, length)``, in order) held
    ``data`` at some moment from entry ``start`` (its state when a save began) through
    the write after entry ``end`` (which may have been under way, and partly visible,
    when the save returned)."""
    window = [tuple(s) for s in states[start:end + 2]]
    if not data:
        return any(n == 0 for _, n in window)
    if len(set(data)) > 1:
        return False  # two versions in one file: never a state it held
    return window[0] <= (data[0], len(data)) <= window[-1]


class Writer(threading.Thread):
    """Rewrites files in place, version after version: truncate, then chunk by chunk.

    Every file only ever holds ``bytes([v]) * n``: version ``v``, its first ``n`` bytes.
    Each write is logged as the state it leaves, in order, so a test can tell whether some
    content is a state the file held between two moments. After writing version ``v`` of
    every file it pauses (:attr:`finished` is ``v``) until :meth:`allow` lets it go on.
    """

    def __init__(self, paths: list[Path], size: int, chunk: int, versions: int) -> None:
        super().__init__(daemon=True)
        self.paths, self.size, self.chunk, self.versions = paths, size, chunk, versions
        self.lock = threading.Lock()
        self.states: dict[Path, list[tuple[int, int]]] = {p: [(0, size)] for p in paths}
        self.cond = threading.Condition()
        self.finished = 0  # versions written whole, of every file
        self.allowed = 1  # the newest version it may write
        self.error: BaseException | None = None

    def mark(self) -> dict[Path, int]:
        """Where each file's state log is now."""
        with self.lock:
            return {p: len(s) - 1 for p, s in self.states.items()}

    def _log(self, path: Path, state: tuple[int, int]) -> None:
        with self.lock:
            self.states[path].append(state)

    def allow(self, version: int) -> None:
        with self.cond:
            self.allowed = version
            self.cond.notify_all()

    def wait_finished(self, version: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.finished >= version, 60), "writer stuck"

    def run(self) -> None:
        try:
            for v in range(1, self.versions + 1):
                with self.cond:
                    assert self.cond.wait_for(lambda v=v: self.allowed >= v, 60)
                for path in self.paths:
                    with open(path, "wb", buffering=0) as f:
                        self._log(path, (v, 0))
                        for n in range(self.chunk, self.size + 1, self.chunk):
                            f.write(bytes([v]) * self.chunk)
                            self._log(path, (v, n))
                with self.cond:
                    self.finished = v
                    self.cond.notify_all()
        except BaseException as e:
            self.error = e
            with self.cond:
                self.finished = self.versions + 1
                self.cond.notify_all()

    def held_between(self, path: Path, data: bytes, start: int, end: int) -> bool:
        with self.lock:
            return held_between(self.states[path], data, start, end)


def _race(tmp: Path, *, size: int, chunk: int, versions: int, pause_every: int,
          **settings: Any) -> None:
    src = tmp / "src"
    paths = [src / "model.pt", src / "optimizer.pt"]
    for p in paths:
        write(p, bytes([0]) * size)
    writer = Writer(paths, size, chunk, versions)
    engine = make_engine(tmp, **settings)
    saves: list[tuple[Any, Any, dict[Path, int], dict[Path, int]]] = []
    paused: list[tuple[Any, Any, int]] = []
    try:
        engine.backend  # noqa: B018
        writer.allow(pause_every)
        writer.start()
        for v in range(pause_every, versions + 1, pause_every):
            while writer.finished < v:  # racing the writer
                before = writer.mark()
                req = request(src)
                h = engine.save(req)
                saves.append((req, h, before, writer.mark()))
            writer.wait_finished(v)
            assert writer.error is None, writer.error
            req = request(src)  # in the writer's pause: must commit version v, whole
            paused.append((req, engine.save(req), v))
            writer.allow(v + pause_every)
        writer.join(60)
        assert engine.drain(120).pending == []
        for req, h, v in paused:
            assert h.state is CheckpointState.COMMITTED, h.error
            assert stored(engine, tmp, req.keys) == {
                p.name: bytes([v]) * size for p in paths}
        committed = torn = whole = 0
        for req, h, before, after in saves:
            if h.state is CheckpointState.TORN:
                torn += 1
                continue
            assert h.state is CheckpointState.COMMITTED, h.error
            committed += 1
            files = stored(engine, tmp, req.keys)
            for p in paths:
                data = files[p.name]
                assert writer.held_between(p, data, before[p], after[p]), (
                    f"{p.name}: committed {len(data)} bytes of versions {sorted(set(data))}, "
                    "which the file never held while save() ran")
            whole += all(files[p.name] == files[p.name][:1] * size for p in paths)
        print(f"racing saves: {len(saves)}, committed {committed} ({whole} of complete "
              f"versions), torn {torn}; saves in the writer's pauses: {len(paused)}, all "
              "committed")
        assert saves, "no save raced the writer"
    finally:
        writer.allow(versions + 1)
        engine.close()


def test_saves_racing_an_in_place_writer_commit_only_what_files_held(tmp_path: Path) -> None:
    """Files read into memory: never a mix, never a state from after save() returned."""
    _race(tmp_path, size=512 * KiB, chunk=4 * KiB, versions=24, pause_every=4,
          copy_budget=4 << 20)


def test_saves_racing_an_in_place_writer_in_copy_mode(tmp_path: Path) -> None:
    _race(tmp_path, size=1 << 20, chunk=16 * KiB, versions=24, pause_every=4,
          snapshot=SnapshotMode.COPY)


@pytest.mark.flow
@pytest.mark.parametrize("mode", ["memory", "copy"])
def test_a_flow_saving_while_a_thread_rewrites_files_commits_only_what_they_held(
        run_flow: RunFlow, datastore_root: Path, tmp_path: Path, mode: str) -> None:
    """The issue's loop, as users run it: saves while a thread truncates and rewrites two
    files in place, and saves in the writer's pauses. No committed checkpoint holds a
    short file, a mix of versions, or bytes written after its save() returned; every
    save in a pause commits; the task succeeds."""
    log = tmp_path / "writer.json"
    env = {"TEST_WRITER_LOG": str(log)}
    if mode == "copy":
        env["METAFLOW_CHECKPOINT_SNAPSHOT"] = "copy"
    out = run_flow("racing_writer_flow.py", env=env)
    written = json.loads(log.read_text())
    size, states, saves = written["size"], written["states"], written["saves"]
    committed, paused = 0, []
    for keys, m in manifests(datastore_root):
        entries = {f.path: f.key for f in m.files}
        files = {n: stored_bytes(datastore_root, keys, n, entries[n]) for n in states}
        if "paused" in m.metadata:
            v = m.metadata["paused"]
            paused.append(v)
            assert files == {n: bytes([v]) * size for n in states}, v
            continue
        committed += 1
        save = saves[m.metadata["i"]]
        for name, data in files.items():
            assert held_between(states[name], data, save["before"][name],
                                save["after"][name]), (
                f"{name}: committed {len(data)} bytes of versions {sorted(set(data))}, "
                "which the file never held while save() ran")
    assert sorted(paused) == [4, 8, 12, 16], out.stdout
    assert int(results(out.stdout + out.stderr)["racing"]) == len(saves) > 0
    print(f"{mode}: racing saves {len(saves)}, committed {committed}, "
          f"torn {len(saves) - committed}")


# -- coarse timestamps and clones -----------------------------------------------------------


@pytest.mark.parametrize("how", ["memory", "private copy", "link"])
def test_coarse_a_same_second_rewrite_during_the_freeze_is_torn(
        coarse_fs: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """On 1-second timestamps a same-size rewrite within the second leaves every stat
    field as it was: only a second read, or a copy made once the second is over, can
    show it. (A link of a file changed in the running second is replaced by a copy
    where waiting costs more, and that copy is proven the same way.)"""
    src = coarse_fs / "src"
    state = src / "state.pt"
    size = 64 * KiB
    write(state, b"A" * size)
    private: Callable[[str, os.stat_result], bool] | None = (
        (lambda p, st: True) if how == "private copy" else None)
    with rewritten_mid_freeze(monkeypatch, state, b"B" * size) as done:
        snap = take_snapshot(str(src), str(coarse_fs / "snaps"), private=private,
                             copy_budget=(1 << 20) if how == "memory" else 0)
    try:
        assert done == [1]
        (f,) = snap.files
        assert f.whole is False, "a mix of two versions passed as whole"
        assert f.shared is False
    finally:
        snap.release()


def test_coarse_a_file_written_just_before_save_is_frozen_whole(coarse_fs: Path) -> None:
    src = coarse_fs / "src"
    write(src / "small.json", b"{}" * 100)
    write(src / "big.bin", b"x" * (256 * KiB))
    snap = take_snapshot(str(src), str(coarse_fs / "snaps"), copy_budget=1024,
                         private=lambda p, st: p.endswith("big.bin"))
    try:
        assert snap.granularity_ns == 10**9
        # Written within the second save() began in: proven, not torn (by a second read,
        # and by copying once the second was over).
        assert {f.relpath: f.whole for f in snap.files} == {"small.json": True,
                                                           "big.bin": True}
        assert snap.waited_s <= 2.5
    finally:
        snap.release()


def test_reflink_a_rewrite_between_the_walk_and_the_clone_is_torn(
        reflink_fs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uploader.snapshot

    src = reflink_fs / "src"
    write(src / "state.bin", b"A" * (1 << 20))
    real_walk = uploader.snapshot._walk

    def walk_then_rewrite(source: str) -> Any:
        entries = real_walk(source)
        rewrite_in_place(src / "state.bin", b"B" * (1 << 20))
        return entries

    monkeypatch.setattr(uploader.snapshot, "_walk", walk_then_rewrite)
    engine = make_engine(reflink_fs, copy_budget=0)
    try:
        h = engine.save(request(src))
        with pytest.raises(TornCheckpointError, match="while save\\(\\) froze it"):
            h.wait(30)
    finally:
        engine.close()
