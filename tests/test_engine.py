"""The engine on a real local store: commit protocol, torn writes, backpressure, loads."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from enginekit import SCOPE, make_engine, request

from uploader import (
    CheckpointKeys,
    CheckpointState,
    ChecksumMismatchError,
    SnapshotError,
    TornCheckpointError,
)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def stored_files(tmp: Path, keys: CheckpointKeys) -> dict[str, bytes]:
    root = tmp / "store" / keys.data_prefix
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_save_commits_files_then_manifest_and_loads_back(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "model.bin", os.urandom(300_000))
    write(src / "sub" / "opt.bin", os.urandom(5000))
    engine = make_engine(tmp_path, copy_budget=0)
    try:
        req = request(src)
        h = engine.save(req)
        h.wait(30)
        assert h.state is CheckpointState.COMMITTED
        manifest = engine.read_manifest(req.keys)
        assert manifest is not None
        assert {f.path for f in manifest.files} == {"model.bin", "sub/opt.bin"}
        for f in manifest.files:
            assert f.sha256 == hashlib.sha256((src / f.path).read_bytes()).hexdigest()
        out = tmp_path / "out"
        engine.load(manifest, str(out))
        for rel in ("model.bin", "sub/opt.bin"):
            assert (out / rel).read_bytes() == (src / rel).read_bytes()
            assert not (out / rel).is_symlink()
        # The snapshot is released once committed.
        assert list((tmp_path / "snapshots").iterdir()) == []
    finally:
        engine.close()


def test_load_follows_an_entry_to_the_object_an_earlier_checkpoint_stored(tmp_path: Path
                                                                         ) -> None:
    import dataclasses

    from uploader import FileEntry

    src = tmp_path / "src"
    write(src / "base.bin", os.urandom(70_000))
    engine = make_engine(tmp_path, copy_budget=0)
    try:
        first = request(src)
        engine.save(first).wait(30)
        m1 = engine.read_manifest(first.keys)
        assert m1 is not None
        # A second checkpoint whose entry points at the first one's object.
        second = request(src)
        (entry,) = m1.files
        m2 = dataclasses.replace(
            m1, checkpoint_id=second.keys.checkpoint_id,
            files=(FileEntry(entry.path, entry.size, entry.sha256,
                             second.keys.relative(first.keys.data(entry.path))),))
        store = tmp_path / "store"
        write(store / second.keys.manifest, m2.to_json())
        loaded = engine.read_manifest(second.keys)
        assert loaded is not None and loaded.files[0].key is not None
        engine.load(loaded, str(tmp_path / "out"), keys=second.keys)
        assert (tmp_path / "out" / "base.bin").read_bytes() == (src / "base.bin").read_bytes()
    finally:
        engine.close()


def test_snapshot_links_large_files_and_reads_small_ones_within_budget(tmp_path: Path) -> None:
    from uploader import take_snapshot
    from uploader.snapshot import Freeze

    src = tmp_path / "src"
    write(src / "big.bin", b"x" * 10_000)
    write(src / "small.txt", b"42")
    snap = take_snapshot(str(src), str(tmp_path / "snaps"), copy_budget=100)
    by_name = {f.relpath: f for f in snap.files}
    assert by_name["big.bin"].shared
    assert os.stat(by_name["big.bin"].path).st_ino == os.stat(src / "big.bin").st_ino
    small = by_name["small.txt"]
    assert not small.shared and small.how is Freeze.MEMORY and small.data == b"42"
    # Frozen: a rewrite in place after save() does not reach the snapshot.
    with open(src / "small.txt", "r+b") as f:
        f.write(b"99")
    assert small.data == b"42" and small.size == 2
    snap.release()


def test_in_place_rewrite_while_pending_is_never_committed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "state.pt", b"A" * 4096)
    logs: list[str] = []
    engine = make_engine(tmp_path, gated=True, copy_budget=0, logs=logs)
    try:
        req = request(src)
        h = engine.save(req)
        backend = engine.backend
        assert backend.entered.wait(30)  # type: ignore[attr-defined]
        # torch.save / open(path, "w") truncate and rewrite the same inode.
        with open(src / "state.pt", "wb") as f:
            f.write(b"B" * 4097)
        backend.gate.set()  # type: ignore[attr-defined]
        with pytest.raises(TornCheckpointError) as ei:
            h.wait(30)
        assert "state.pt" in str(ei.value)
        assert h.state is CheckpointState.TORN
        assert engine.read_manifest(req.keys) is None
        # The newest checkpoint of its name torn: the report says so (the task fails on it).
        assert engine.drain(5).torn_unsuperseded == [h]
    finally:
        engine.close()


def test_torn_checkpoint_superseded_by_newer_save_is_quiet(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "state.pt", b"A" * 4096)
    logs: list[str] = []
    engine = make_engine(tmp_path, gated=True, copy_budget=0, logs=logs, max_pending=2)
    try:
        h1 = engine.save(request(src))
        assert engine.backend.entered.wait(30)  # type: ignore[attr-defined]
        tmp = src / "state.pt.tmp"
        write(tmp, b"B" * 4096)
        # The first rewrite is in place (tears h1); the second save snapshots the new file.
        with open(src / "state.pt", "wb") as f:
            f.write(b"C" * 4096)
        req2 = request(src)
        h2 = engine.save(req2)
        engine.backend.gate.set()  # type: ignore[attr-defined]
        assert engine.drain(30).pending == []
        assert h1.state is CheckpointState.TORN
        assert h2.state is CheckpointState.COMMITTED
        assert engine.drain(0).torn_unsuperseded == []
        assert stored_files(tmp_path, req2.keys)["state.pt"] == b"C" * 4096
        assert not any(m.startswith("ERROR") for m in logs)
        assert sum("supersedes" in m for m in logs) == 1
    finally:
        engine.close()


def test_save_blocks_when_max_pending_snapshots_are_pending(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "f.bin", b"x" * 1000)
    engine = make_engine(tmp_path, gated=True, max_pending=1, copy_budget=0)
    try:
        engine.save(request(src))
        second_returned = threading.Event()

        def second() -> None:
            engine.save(request(src))
            second_returned.set()

        t = threading.Thread(target=second)
        t.start()
        # The first upload is held open: the second save() must still be blocked.
        assert engine.backend.entered.wait(30)  # type: ignore[attr-defined]
        assert not second_returned.wait(0.5)
        engine.backend.gate.set()  # type: ignore[attr-defined]
        assert second_returned.wait(30)
        t.join()
        report = engine.drain(30)
        assert [h.state for h in report.handles] == [CheckpointState.COMMITTED] * 2
    finally:
        engine.close()


def test_drain_timeout_reports_pending_and_close_abandons(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "f.bin", b"x" * 1000)
    engine = make_engine(tmp_path, gated=True, copy_budget=0)
    h = engine.save(request(src))
    assert engine.backend.entered.wait(30)  # type: ignore[attr-defined]
    report = engine.drain(0.05)
    assert report.pending == [h]
    engine.backend.gate.set()  # type: ignore[attr-defined]
    assert engine.drain(30).pending == []
    engine.close()


def test_checksum_mismatch_on_load_names_file_and_key(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "w.bin", b"good" * 1000)
    engine = make_engine(tmp_path)
    try:
        req = request(src)
        engine.save(req).wait(30)
        stored = tmp_path / "store" / req.keys.data("w.bin")
        stored.write_bytes(b"evil" * 1000)
        manifest = engine.read_manifest(req.keys)
        assert manifest is not None
        with pytest.raises(ChecksumMismatchError) as ei:
            engine.load(manifest, str(tmp_path / "out"))
        assert "w.bin" in str(ei.value) and str(stored) in str(ei.value)
        assert not (tmp_path / "out" / "w.bin").exists()
    finally:
        engine.close()


def test_writes_after_load_leave_the_stored_checkpoint_unchanged(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "w.bin", b"v1" * 50_000)
    engine = make_engine(tmp_path, copy_budget=0)
    try:
        req = request(src)
        engine.save(req).wait(30)
        manifest = engine.read_manifest(req.keys)
        assert manifest is not None
        out = tmp_path / "out"
        engine.load(manifest, str(out))
        with open(out / "w.bin", "r+b") as f:  # rewrite in place
            f.write(b"XX" * 10)
        with open(out / "w.bin", "ab") as f:
            f.write(b"more")
        assert stored_files(tmp_path, req.keys)["w.bin"] == b"v1" * 50_000
        # Also the user's original file: the local store copies in, never links.
        with open(src / "w.bin", "r+b") as f:
            f.write(b"YY")
        assert stored_files(tmp_path, req.keys)["w.bin"] == b"v1" * 50_000
    finally:
        engine.close()


def test_single_file_source_and_missing_source(tmp_path: Path) -> None:
    write(tmp_path / "one.pt", b"weights")
    engine = make_engine(tmp_path)
    try:
        req = request(tmp_path / "one.pt")
        engine.save(req).wait(30)
        m = engine.read_manifest(req.keys)
        assert m is not None and [f.path for f in m.files] == ["one.pt"] and m.source == "file"
        with pytest.raises(SnapshotError, match="no such file"):
            engine.save(request(tmp_path / "missing"))
    finally:
        engine.close()


def test_listing_is_newest_first_and_ids_never_collide(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "f", b"1")
    engine = make_engine(tmp_path, max_pending=4)
    try:
        reqs = [request(src, run_id=r) for r in ("1", "1", "2", "1")]
        for r in reqs:
            engine.save(r)
        assert engine.drain(30).pending == []
        ids = [k.checkpoint_id for k in engine.list_manifest_keys(SCOPE.manifests_prefix())]
        # Runs by their newest save; within a run, by attempt and save order.
        assert ids == [reqs[i].keys.checkpoint_id for i in (3, 1, 0, 2)]
        assert len(set(ids)) == 4
        only_run_2 = engine.list_manifest_keys(SCOPE.manifests_prefix("2"))
        assert [k.checkpoint_id for k in only_run_2] == [reqs[2].keys.checkpoint_id]
    finally:
        engine.close()


def test_latest_hint_never_goes_back_when_commits_finish_out_of_order(tmp_path: Path) -> None:
    import json

    big, small = tmp_path / "big", tmp_path / "small"
    write(big / "f", b"x" * 1000)
    write(small / "f", b"y")
    engine = make_engine(tmp_path, gated=True, copy_budget=0, max_pending=2)
    try:
        older = request(big)
        engine.save(older)
        assert engine.backend.entered.wait(30)  # type: ignore[attr-defined]
        engine.backend.gated = False  # type: ignore[attr-defined]
        newer = request(small)
        engine.save(newer).wait(30)  # commits while the older one is still held
        engine.backend.gate.set()  # type: ignore[attr-defined]
        assert engine.drain(30).pending == []
        hint = json.loads((tmp_path / "store" / SCOPE.latest_key).read_text())
        assert hint["checkpoint_id"] == newer.keys.checkpoint_id
    finally:
        engine.close()


def test_file_rewritten_in_place_is_frozen_privately_from_then_on(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "state.pt", b"A" * 8192)
    logs: list[str] = []
    engine = make_engine(tmp_path, gated=True, copy_budget=0, logs=logs, max_pending=4)
    try:
        h1 = engine.save(request(src))
        assert engine.backend.entered.wait(30)  # type: ignore[attr-defined]
        with open(src / "state.pt", "wb") as f:  # in place, while h1 is pending
            f.write(b"B" * 8192)
        req2 = request(src)
        h2 = engine.save(req2)  # sees the rewrite: copies the file instead of linking it
        with open(src / "state.pt", "wb") as f:
            f.write(b"C" * 8192)
        req3 = request(src)
        h3 = engine.save(req3)
        with open(src / "state.pt", "wb") as f:
            f.write(b"D" * 8192)
        engine.backend.gate.set()  # type: ignore[attr-defined]
        assert engine.drain(30).pending == []
        assert h1.state is CheckpointState.TORN
        assert h2.state is h3.state is CheckpointState.COMMITTED
        assert stored_files(tmp_path, req2.keys)["state.pt"] == b"B" * 8192
        assert stored_files(tmp_path, req3.keys)["state.pt"] == b"C" * 8192
        notes = [m for m in logs if "rewritten in place while an upload" in m]
        assert len(notes) == 1 and "os.replace()" in notes[0] and "MiB in" in notes[0]
        # Written fresh (a new inode, as os.replace() gives): linked again, O(1).
        write(src / "state.pt.new", b"E" * 8192)
        os.replace(src / "state.pt.new", src / "state.pt")
        engine.backend.gated = False  # type: ignore[attr-defined]
        req4 = request(src)
        engine.save(req4).wait(30)
        assert stored_files(tmp_path, req4.keys)["state.pt"] == b"E" * 8192
    finally:
        engine.close()


def test_fresh_inode_after_tear_is_linked_not_copied(tmp_path: Path) -> None:
    from uploader import take_snapshot

    src = tmp_path / "src"
    write(src / "w.bin", b"x" * 10_000)
    seen: list[str] = []

    def private(path: str, st: os.stat_result) -> bool:
        seen.append(path)
        return path.endswith("w.bin") and st.st_ino == -1  # never this inode

    snap = take_snapshot(str(src), str(tmp_path / "snaps"), copy_budget=0, private=private)
    assert snap.files[0].shared and snap.private == ()
    assert seen == [str(src / "w.bin")]
    snap.release()
    snap = take_snapshot(str(src), str(tmp_path / "snaps"), copy_budget=0,
                         private=lambda p, st: True)
    assert not snap.files[0].shared and snap.private == ("w.bin",)
    assert os.stat(snap.files[0].path).st_ino != os.stat(src / "w.bin").st_ino
    assert snap.files[0].size == 10_000
    snap.release()


def test_torn_checkpoint_is_replaced_only_by_a_save_of_the_same_name(tmp_path: Path) -> None:
    src = tmp_path / "src"
    other = tmp_path / "other"
    write(src / "model.pt", b"A" * 4096)
    write(other / "model.pt", b"L" * 4096)
    engine = make_engine(tmp_path, gated=True, copy_budget=0, max_pending=4)
    try:
        best = engine.save(request(src, name="best"))
        assert engine.backend.entered.wait(30)  # type: ignore[attr-defined]
        with open(src / "model.pt", "wb") as f:
            f.write(b"B" * 4096)
        last = engine.save(request(other, name="last"))
        engine.backend.gate.set()  # type: ignore[attr-defined]
        report = engine.drain(30)
        assert best.state is CheckpointState.TORN
        assert last.state is CheckpointState.COMMITTED
        assert report.torn_unsuperseded == [best]
        again = engine.save(request(src, name="best"))
        again.wait(30)
        assert engine.drain(30).torn_unsuperseded == []
    finally:
        engine.close()


def test_os_replace_and_unchanged_files_are_never_mistaken_for_rewrites(tmp_path: Path) -> None:
    # Links and unlinks move an inode's ctime: a snapshot's own links, its release, and
    # os.replace() over the user's name. None of those is a change of content.
    src = tmp_path / "src"
    write(src / "model.pt", b"A" * 8192)
    write(src / "frozen.bin", b"F" * 8192)  # never changes
    engine = make_engine(tmp_path, gated=True, copy_budget=0, max_pending=4)
    try:
        handles = []
        for content in (b"B", b"C", b"D"):
            handles.append(engine.save(request(src)))
            assert engine.backend.entered.wait(30)  # type: ignore[attr-defined]
            write(src / "model.pt.tmp", content * 8192)
            os.replace(src / "model.pt.tmp", src / "model.pt")
        handles.append(engine.save(request(src)))
        engine.backend.gate.set()  # type: ignore[attr-defined]
        assert engine.drain(30).pending == []
        assert [h.state for h in handles] == [CheckpointState.COMMITTED] * 4
        # ... and a file released by one snapshot while linked by the next still commits.
        engine.backend.gated = False  # type: ignore[attr-defined]
        for _ in range(3):
            handles.append(engine.save(request(src)))
        assert engine.drain(30).pending == []
        assert all(h.state is CheckpointState.COMMITTED for h in handles)
    finally:
        engine.close()


def test_rewrite_that_restores_mtime_is_caught_by_ctime(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "state.pt", b"A" * 8192)
    engine = make_engine(tmp_path, gated=True, copy_budget=0)
    try:
        h = engine.save(request(src))
        assert engine.backend.entered.wait(30)  # type: ignore[attr-defined]
        st = os.stat(src / "state.pt")
        with open(src / "state.pt", "r+b") as f:  # same size, in place
            f.write(b"B" * 8192)
        os.utime(src / "state.pt", ns=(st.st_atime_ns, st.st_mtime_ns))  # as rsync -t would
        assert os.stat(src / "state.pt").st_mtime_ns == st.st_mtime_ns
        engine.backend.gate.set()  # type: ignore[attr-defined]
        with pytest.raises(TornCheckpointError):
            h.wait(30)
    finally:
        engine.close()
