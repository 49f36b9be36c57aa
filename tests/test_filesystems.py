"""The snapshot and the engine on real filesystems whose behaviour this machine's lacks.

Loop-mounted images (``fsimages.py``, fixtures in ``conftest.py``): ext4 with 1-second
timestamps, where a same-size rewrite within a second leaves every fingerprint field
unchanged, and XFS with reflink clones. The first tests check that the fixtures give
what they promise; the rest hold the product to the design on them. Every test here
skips, saying why, where the machine cannot loop-mount (not root, no mkfs).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import fsimages
import pytest
from enginekit import make_engine, request

import uploader.snapshot
from uploader import CheckpointKeys, CheckpointState, Engine, TornCheckpointError, take_snapshot

FICLONE = 0x40049409  # _IOW(0x94, 9, int), from linux/fs.h
SIZE = 4 << 20
# A same-size rewrite lands in the same second as the stat before it unless a second
# boundary falls in between; over this many tries a fine-grained clock never matches
# and a coarse one almost surely does.
TRIES = 5


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def rewrite_in_place(path: Path, data: bytes) -> None:
    # Truncate and rewrite the same inode, as torch.save, save_file and open(path, "w") do.
    with open(path, "wb") as f:
        f.write(data)


def stamps(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def fstype_of(path: Path) -> str:
    """The type of the filesystem ``path`` is on: the longest mount point above it."""
    target = os.path.realpath(path)
    best, fstype = "", ""
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            _dev, mnt, kind = line.split()[:3]
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, fstype = mnt, kind
    return fstype


def summary(data: bytes) -> dict[str, int]:
    """What a 4 MiB buffer is made of, short enough to read in a failure message."""
    counts = {chr(b): data.count(bytes([b])) for b in b"ABC"}
    return {"len": len(data), **counts, "other": len(data) - sum(counts.values())}


def committed_file(engine: Engine, tmp: Path, keys: CheckpointKeys, rel: str) -> bytes:
    """The stored bytes of ``rel``, after checking the manifest's SHA-256 matches them."""
    manifest = engine.read_manifest(keys)
    assert manifest is not None, "committed, yet no manifest"
    entry = {f.path: f for f in manifest.files}[rel]
    data = (tmp / "store" / keys.stored(rel, entry.key)).read_bytes()
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.size == len(data)
    return data


def regate(engine: Engine) -> None:
    # Hold the next upload again: the previous one left the gate open.
    backend = engine.backend
    backend.gate = threading.Event()  # type: ignore[attr-defined]
    backend.entered.clear()  # type: ignore[attr-defined]


# -- the fixtures ------------------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "fstype"), [("coarse_fs", "ext4"), ("reflink_fs", "xfs")])
def test_fixture_is_a_fresh_empty_directory_on_its_own_filesystem(
        fixture: str, fstype: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    d: Path = request.getfixturevalue(fixture)
    assert d.is_dir() and list(d.iterdir()) == []
    assert fstype_of(d) == fstype
    assert os.stat(d).st_dev != os.stat(tmp_path).st_dev


def test_coarse_fs_same_size_rewrite_after_a_stat_leaves_the_stat_unchanged(
        coarse_fs: Path) -> None:
    """The property the product must cope with: stat cannot see this rewrite."""
    f = coarse_fs / "state.bin"
    write(f, b"A" * 65536)
    seen = []
    for i in range(TRIES):
        before = stamps(f)
        rewrite_in_place(f, bytes([ord("B") + i]) * 65536)
        after = stamps(f)
        # Whole seconds, always: 128-byte inodes have no room for nanoseconds.
        assert all(t % 10**9 == 0 for t in (*before[2:], *after[2:])), (before, after)
        if after == before:
            return
        seen.append((before, after))
    pytest.fail(f"every same-size rewrite changed (ino, size, mtime_ns, ctime_ns): {seen}")


def test_reflink_fs_ficlone_makes_a_private_copy(reflink_fs: Path) -> None:
    src, clone = reflink_fs / "src.bin", reflink_fs / "clone.bin"
    original = os.urandom(1 << 20)
    write(src, original)
    with open(src, "rb") as fin, open(clone, "xb") as fout:
        fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
    assert os.stat(clone).st_ino != os.stat(src).st_ino
    assert clone.read_bytes() == original
    with open(src, "r+b") as f:  # in place, no truncation: only copy-on-write keeps the clone
        f.write(b"\0" * 8192)
    assert clone.read_bytes() == original


class _TestBodyFailed(Exception):
    pass


def mounts() -> list[tuple[str, str]]:
    """(device, mount point) of every mount this process sees."""
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return [(line.split()[0], line.split()[1]) for line in f]


@pytest.mark.parametrize("how", ["clean", "failed-with-a-file-open"])
def test_mounted_leaves_no_mount_loop_device_or_image_behind(how: str) -> None:
    try:
        fsimages.check_available("ext4_coarse")
    except fsimages.FilesystemUnavailable as e:
        pytest.skip(str(e))
    held = None
    expect = pytest.raises(_TestBodyFailed) if how != "clean" else contextlib.nullcontext()
    with expect, fsimages.mounted("ext4_coarse") as mnt:
        workdir = mnt.parent
        image = next(workdir.glob("*.img"))
        dev = next(d for d, m in mounts() if m == os.path.realpath(mnt))
        if how != "clean":
            # An open file makes a plain umount fail with EBUSY.
            held = open(mnt / "held", "w")  # noqa: SIM115
            raise _TestBodyFailed
    try:
        assert not os.path.ismount(mnt)
        assert os.path.realpath(mnt) not in [m for _, m in mounts()]
        assert not workdir.exists()
    finally:
        if held is not None:
            held.close()  # the last user of the lazily unmounted filesystem lets go
    # The device may already serve someone else's image; it must not serve ours.
    backing = Path("/sys/block") / Path(dev).name / "loop" / "backing_file"
    assert not backing.exists() or not backing.read_text().startswith(str(image))


# -- the product on 1-second timestamps ----------------------------------------------------


def _fs_second(directory: Path) -> int:
    """The second the filesystem's own clock says it is: the ctime a write gets now."""
    probe = directory / "clock-probe"
    probe.write_bytes(b"t")
    return os.stat(probe).st_ctime_ns // 10**9


def _save_against_an_in_place_rewrite(tmp: Path) -> bool:
    """Save, rewrite in place at once, check what was committed, then save again.

    Returns False, having checked only the first save, when the rewrite fell into a later
    second than the file's last change by bad luck (the caller tries again): the hard case
    is a rewrite that leaves size, mtime and ctime unchanged. A save() that itself waited
    into the next second so that no rewrite can hide is a defence, not bad luck.
    """
    state = tmp / "src" / "state.bin"
    engine = make_engine(tmp, gated=True, copy_budget=0)
    try:
        backend = engine.backend  # start the loop now, so the save itself is quick
        write(state, b"A" * SIZE)
        before = stamps(state)
        req = request(tmp / "src")
        h = engine.save(req)
        save_spanned_a_second = _fs_second(tmp) * 10**9 > before[3]
        assert backend.entered.wait(30)  # type: ignore[attr-defined]
        rewrite_in_place(state, b"B" * SIZE)
        hidden = stamps(state) == before
        backend.gate.set()  # type: ignore[attr-defined]
        try:
            h.wait(30)
        except TornCheckpointError:
            assert h.state is CheckpointState.TORN
            assert engine.read_manifest(req.keys) is None
        else:
            assert h.state is CheckpointState.COMMITTED
            stored = committed_file(engine, tmp, req.keys, "state.bin")
            assert summary(stored) == summary(b"A" * SIZE), (
                f"committed bytes written after save() returned (rewrite hidden from stat: "
                f"{hidden})")
        if not hidden and not save_spanned_a_second:
            return False

        # Saves while the previous upload is still pending, each followed at once by an
        # in-place rewrite: the second of them sees the rewrite and freezes the file
        # privately, so from then on every save commits what the file held at save().
        regate(engine)
        req2 = request(tmp / "src")
        h2 = engine.save(req2)
        assert backend.entered.wait(30)  # type: ignore[attr-defined]
        rewrite_in_place(state, b"C" * SIZE)
        req3 = request(tmp / "src")
        h3 = engine.save(req3)
        rewrite_in_place(state, b"D" * SIZE)
        backend.gate.set()  # type: ignore[attr-defined]
        assert engine.drain(30).pending == []
        if h2.state is CheckpointState.COMMITTED:
            assert summary(committed_file(engine, tmp, req2.keys, "state.bin")) == \
                summary(b"B" * SIZE)
        else:
            assert h2.state is CheckpointState.TORN
        assert h3.state is CheckpointState.COMMITTED
        stored = committed_file(engine, tmp, req3.keys, "state.bin")
        assert summary(stored) == summary(b"C" * SIZE)
        return True
    finally:
        engine.backend.gate.set()  # type: ignore[attr-defined]
        engine.close()


def test_coarse_same_second_rewrite_never_commits_new_bytes_and_a_later_save_commits(
        coarse_fs: Path) -> None:
    for i in range(TRIES):
        tmp = coarse_fs / f"try{i}"
        if _save_against_an_in_place_rewrite(tmp):
            return
        shutil.rmtree(tmp)
    pytest.fail(f"each of {TRIES} rewrites crossed into the next second; the case never ran")


# -- the product where files can be cloned -------------------------------------------------


def test_reflink_snapshot_clones_instead_of_linking(reflink_fs: Path) -> None:
    src = reflink_fs / "src"
    write(src / "state.bin", b"A" * SIZE)
    snap = take_snapshot(str(src), str(reflink_fs / "snaps"), copy_budget=0)
    try:
        assert (snap.cloned, snap.linked, snap.copied) == (1, 0, 0)
        (f,) = snap.files
        assert f.shared is False
        assert os.stat(f.path).st_ino != os.stat(src / "state.bin").st_ino
    finally:
        snap.release()


def test_reflink_rewrite_after_save_still_commits_the_saved_bytes(reflink_fs: Path) -> None:
    src = reflink_fs / "src"
    write(src / "state.bin", b"A" * SIZE)
    engine = make_engine(reflink_fs, gated=True, copy_budget=0)
    try:
        req = request(src)
        h = engine.save(req)
        assert engine.backend.entered.wait(30)  # type: ignore[attr-defined]
        rewrite_in_place(src / "state.bin", b"B" * SIZE)
        engine.backend.gate.set()  # type: ignore[attr-defined]
        h.wait(30)
        assert h.state is CheckpointState.COMMITTED
        stored = committed_file(engine, reflink_fs, req.keys, "state.bin")
        assert summary(stored) == summary(b"A" * SIZE)
    finally:
        engine.backend.gate.set()  # type: ignore[attr-defined]
        engine.close()


@pytest.mark.parametrize("new_size", [SIZE // 2, SIZE * 2], ids=["shrunk", "grown"])
def test_reflink_file_resized_between_walk_and_clone_is_recorded_with_the_clones_size(
        reflink_fs: Path, monkeypatch: pytest.MonkeyPatch, new_size: int) -> None:
    src = reflink_fs / "src"
    write(src / "state.bin", b"A" * SIZE)
    real_walk = uploader.snapshot._walk

    def walk_then_rewrite(source: str) -> list[tuple[str, str, os.stat_result]]:
        entries = real_walk(source)
        # The user rewrites the file after the walk stat it and before it is cloned.
        rewrite_in_place(src / "state.bin", b"B" * new_size)
        return entries

    monkeypatch.setattr(uploader.snapshot, "_walk", walk_then_rewrite)
    snap = take_snapshot(str(src), str(reflink_fs / "snaps"), copy_budget=0)
    try:
        assert snap.cloned == 1
        (f,) = snap.files
        assert f.size == os.stat(f.path).st_size
    finally:
        snap.release()


# -- what a machine that cannot do it is told ----------------------------------------------


def test_unavailable_says_what_is_missing_and_how_to_get_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(fsimages.FilesystemUnavailable, match="needs root to loop-mount"):
        fsimages.check_available("xfs_reflink")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(fsimages, "_SEARCH_PATH", str(tmp_path))  # finds no tool at all
    if not Path("/dev/loop-control").exists():
        pytest.skip("no /dev/loop-control: the tool checks come after it")
    with pytest.raises(fsimages.FilesystemUnavailable,
                       match=r"^mkfs\.xfs not found: apt-get install xfsprogs$"):
        fsimages.check_available("xfs_reflink")
    with pytest.raises(fsimages.FilesystemUnavailable,
                       match=r"^mkfs\.ext4 not found: apt-get install e2fsprogs$"):
        fsimages.check_available("ext4_coarse")


@pytest.mark.flow
@pytest.mark.parametrize("fs", ["coarse_fs", "reflink_fs"])
def test_in_place_loop_commits_on_real_filesystems(fs: str, request: pytest.FixtureRequest,
                                                    run_flow: Any, datastore_root: Path) -> None:
    from storekit import manifests, stored_bytes

    staging: Path = request.getfixturevalue(fs)
    size_mib = 8
    run_flow("inplace_flow.py", "--saves", "10", "--size_mib", str(size_mib),
             env={"METAFLOW_CHECKPOINT_COPY_BUDGET": "0",
                  "TEST_STAGING_ROOT": str(staging)})
    values = []
    for keys, m in manifests(datastore_root):
        data = stored_bytes(datastore_root, keys, "weights.bin",
                            {f.path: f.key for f in m.files}["weights.bin"])
        assert data == bytes([m.metadata["value"]]) * (size_mib << 20), m.metadata
        values.append(m.metadata["value"])
    # Same-size rewrites: on 1-second timestamps only the guard's care keeps them apart.
    # At most one save is lost: the one that reveals the file is rewritten in place.
    assert len(set(range(1, 11)) - set(values)) <= 1, values
    if fs == "reflink_fs":  # clones are private from the first save on: nothing is lost
        assert sorted(values) == list(range(1, 11))
