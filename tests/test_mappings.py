"""Files the task maps shared and writable are frozen by a copy in save(), never linked.

A store through a shared mapping to a page that is already dirty moves neither mtime nor
ctime: no fingerprint can show that a linked file changed under its upload.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from enginekit import make_engine, request

from uploader import CheckpointState, TornCheckpointError, take_snapshot
from uploader.mappings import shared_writable_files

MiB = 1 << 20


@contextmanager
def mapped(path: Path, *, flags: int = mmap.MAP_SHARED,
           prot: int = mmap.PROT_READ | mmap.PROT_WRITE) -> Iterator[mmap.mmap]:
    fd = os.open(path, os.O_RDWR if prot & mmap.PROT_WRITE else os.O_RDONLY)
    try:
        m = mmap.mmap(fd, 0, flags=flags, prot=prot)
    finally:
        os.close(fd)  # the mapping keeps the file
    try:
        yield m
    finally:
        m.close()


def test_shared_writable_mappings_of_this_process_are_found(tmp_path: Path) -> None:
    shared, private, readonly = (tmp_path / n for n in ("shared", "private", "readonly"))
    for p in (shared, private, readonly):
        p.write_bytes(b"\0" * 8192)
    with mapped(shared), mapped(private, flags=mmap.MAP_PRIVATE), \
            mapped(readonly, prot=mmap.PROT_READ):
        found = shared_writable_files()
        assert os.stat(shared).st_ino in found
        # A private mapping's writes never reach the file; a read-only one cannot write.
        assert os.stat(private).st_ino not in found
        assert os.stat(readonly).st_ino not in found
    assert os.stat(shared).st_ino not in shared_writable_files()


def test_a_mapping_in_a_process_the_task_started_is_found(tmp_path: Path) -> None:
    path = tmp_path / "shared.bin"
    path.write_bytes(b"\0" * 8192)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import mmap, os, sys\n"
         f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
         "m = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED)\n"
         "print('mapped', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "mapped\n"
        snap = take_snapshot(str(tmp_path), str(tmp_path.parent / "snaps"), copy_budget=0,
                             mapped=shared_writable_files)
        try:
            assert snap.mapped == ("shared.bin",) and snap.linked == 0
            (f,) = snap.files
            assert os.stat(f.path).st_ino != os.stat(path).st_ino
        finally:
            snap.release()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)
    # Unmapped: linked again, O(1).
    snap = take_snapshot(str(tmp_path), str(tmp_path.parent / "snaps"), copy_budget=0,
                         mapped=shared_writable_files)
    try:
        assert snap.mapped == () and snap.linked == 1
    finally:
        snap.release()


def test_a_file_rewritten_through_a_shared_mapping_commits_one_version(tmp_path: Path) -> None:
    """The issue's case: 32 MiB written through a shared mapping (the numpy.memmap
    pattern), save(), then half the mapping rewritten while the upload is pending. A link
    would upload half of each version with no timestamp moved; the copy commits one."""
    size = 32 * MiB
    src = tmp_path / "src"
    src.mkdir()
    weights = src / "weights.bin"
    weights.write_bytes(b"\0" * size)
    logs: list[str] = []
    engine = make_engine(tmp_path, gated=True, copy_budget=0, logs=logs)
    try:
        backend = engine.backend
        with mapped(weights) as m:
            m[:] = b"A" * size  # every page dirty
            req = request(src)
            h = engine.save(req)
            assert backend.entered.wait(30)  # type: ignore[attr-defined]
            before = os.stat(weights)
            m[: size // 2] = b"B" * (size // 2)  # while the upload is pending
            after = os.stat(weights)
            backend.gate.set()  # type: ignore[attr-defined]
            try:
                h.wait(60)
            except TornCheckpointError:
                assert h.state is CheckpointState.TORN
            else:
                manifest = engine.read_manifest(req.keys)
                assert manifest is not None
                (entry,) = manifest.files
                data = (tmp_path / "store" / req.keys.stored(entry.path, entry.key)).read_bytes()
                a, b = data.count(b"A"), data.count(b"B")
                assert a == size, (f"committed {a} bytes of A and {b} of B; mtime moved by "
                                   f"the rewrite: {after.st_mtime_ns != before.st_mtime_ns}")
        notes = [m for m in logs if "mapped shared and writable" in m]
        assert len(notes) == 1 and "'weights.bin'" in notes[0], logs
        assert "flush and close the mapping" in notes[0]
    finally:
        engine.backend.gate.set()  # type: ignore[attr-defined]
        engine.close()


@pytest.mark.parametrize("mode", ["copy", "memory"])
def test_mapped_files_cost_nothing_where_nothing_is_linked(tmp_path: Path, mode: str) -> None:
    # The maps are read only when a file is about to be linked.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"a" * 4096)
    calls: list[int] = []

    def maps() -> frozenset[int]:
        calls.append(1)
        return frozenset()

    from uploader import SnapshotMode

    snap = take_snapshot(str(tmp_path / "src"), str(tmp_path / "snaps"),
                         mode=SnapshotMode.COPY if mode == "copy" else SnapshotMode.AUTO,
                         copy_budget=1 << 20, mapped=maps)
    snap.release()
    assert calls == []
    snap = take_snapshot(str(tmp_path / "src"), str(tmp_path / "snaps"), copy_budget=0,
                         mapped=maps)
    snap.release()
    assert calls == [1]
