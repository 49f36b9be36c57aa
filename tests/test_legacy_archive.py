"""A ``metaflow-checkpoint`` tar archive loads all or nothing, or not at all.

Archives are written in that package's layout by hand (see ``legacykit``): the shapes a
store damaged or an archive made or changed by hand leave behind, which that package
never writes. Each is refused with a :class:`CheckpointException` naming the stored key,
and leaves the destination as it was; at task start, the next candidate is tried.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import metaflow  # noqa: F401  first: it loads this extension, whose modules need it
import pytest
from conftest import RunFlow
from enginekit import make_engine
from legacykit import tar_archive, write_checkpoint
from storekit import results

from metaflow_extensions.asynccheckpoint.plugins.shared import legacy, legacy_archive
from metaflow_extensions.asynccheckpoint.plugins.shared.exceptions import CheckpointException
from uploader import Engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    e = make_engine(tmp_path)
    yield e
    e.close()


def _store(tmp_path: Path, archive: bytes, **kw: Any) -> dict[str, Any]:
    return write_checkpoint(tmp_path / "store", flow="F", step="train", namespace="user:t",
                            pathspec="F/1/train/2", archive=archive, **kw)


def _tree(root: Path) -> dict[str, Any]:
    """Everything under ``root``, links as links: what "left as it was" compares."""
    out: dict[str, Any] = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(d) / name
            rel = str(p.relative_to(root))
            out[rel] = (("link", os.readlink(p)) if p.is_symlink() else
                        ("dir",) if p.is_dir() else ("file", p.read_bytes()))
    return out


def _refused(engine: Engine, ref: dict[str, Any], dest: Path, *why: str) -> str:
    before = _tree(dest) if dest.exists() else None
    with pytest.raises(CheckpointException) as info:
        legacy.load(engine, legacy.read(engine, ref), str(dest))
    text = str(info.value)
    assert ref["key"] in text, text
    for w in why:
        assert w in text, text
    if before is None:
        assert not dest.exists()
    else:
        assert _tree(dest) == before  # no file placed, no staging left behind
    return text


def test_a_good_archive_loads_replacing_files_and_links_never_through_them(
        tmp_path: Path, engine: Engine) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not mine")
    dest = tmp_path / "dest"
    (dest / "keep").mkdir(parents=True)
    (dest / "a.txt").write_text("old a")
    (dest / "keep" / "k.txt").write_text("kept")
    (dest / "link.txt").symlink_to(outside)
    (dest / "sub").symlink_to(tmp_path)
    ref = _store(tmp_path, tar_archive([
        ("dir", "."), ("file", "a.txt", b"new a"), ("file", "link.txt", b"replaced"),
        ("dir", "sub"), ("file", "sub/x.bin", b"x" * 10), ("file", "./empty", b"")]))
    legacy.load(engine, legacy.read(engine, ref), str(dest))
    assert _tree(dest) == {"a.txt": ("file", b"new a"), "keep": ("dir",),
                           "keep/k.txt": ("file", b"kept"), "link.txt": ("file", b"replaced"),
                           "sub": ("dir",), "sub/x.bin": ("file", b"x" * 10),
                           "empty": ("file", b"")}
    assert outside.read_text() == "not mine" and not (tmp_path / "x.bin").exists()


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_a_compressed_archive_loads(tmp_path: Path, engine: Engine, compression: str) -> None:
    ref = _store(tmp_path, tar_archive([("file", "m/w.bin", b"w" * 5000)],
                                       compression=compression), storage_format="tar.gz")
    dest = tmp_path / "dest"
    legacy.load(engine, legacy.read(engine, ref), str(dest))
    assert _tree(dest) == {"m": ("dir",), "m/w.bin": ("file", b"w" * 5000)}


def test_a_clash_on_the_second_member_leaves_the_first_untouched(
        tmp_path: Path, engine: Engine) -> None:
    dest = tmp_path / "dest"
    (dest / "b" / "inner").mkdir(parents=True)
    (dest / "a.txt").write_text("old a")
    (dest / "d").write_text("a file")
    archive = tar_archive([("file", "a.txt", b"new a"), ("file", "b", b"b is a file here")])
    _refused(engine, _store(tmp_path, archive), dest,
             "cannot load 'b'", "is a directory where the archive has a file",
             "load into an empty directory")
    archive = tar_archive([("file", "a.txt", b"new a"), ("file", "d/x", b"d is a dir here")])
    _refused(engine, _store(tmp_path, archive, name="other"), dest,
             "is a file where the archive has a directory")
    assert (dest / "a.txt").read_text() == "old a"


def test_a_duplicate_member_is_refused_and_nothing_is_placed(
        tmp_path: Path, engine: Engine) -> None:
    archive = tar_archive([("file", "a.txt", b"one"), ("file", "b.txt", b"b"),
                           ("file", "./a.txt", b"two")])
    ref = _store(tmp_path, archive)
    _refused(engine, ref, tmp_path / "fresh" / "dest", "holds 'a.txt' twice")
    assert not (tmp_path / "fresh").exists()  # the directories the load made are gone
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.txt").write_text("mine")
    _refused(engine, ref, dest, "holds 'a.txt' twice")
    dup_dir = tar_archive([("dir", "m"), ("file", "m/x", b"x"), ("dir", "m/")])
    _refused(engine, _store(tmp_path, dup_dir, name="dirs"), dest, "holds 'm' twice")
    both = tar_archive([("file", "m", b"x"), ("file", "m/x", b"x")])
    _refused(engine, _store(tmp_path, both, name="both"), dest,
             "holds 'm' both as a file and as a directory")


@pytest.mark.parametrize(("member", "why"), [
    (("file", "../escaped.txt", b"x"), "unsafe path '../escaped.txt'"),
    (("file", "a/../../escaped.txt", b"x"), "unsafe path 'a/../../escaped.txt'"),
    (("file", "/tmp/absolute.txt", b"x"), "unsafe path '/tmp/absolute.txt'"),
    (("symlink", "link", "/etc/passwd"), "'link', a symlink"),
    (("symlink", "up", "../.."), "'up', a symlink"),
    (("hardlink", "hard", "a.txt"), "'hard', a hard link"),
    (("fifo", "pipe"), "'pipe', a fifo"),
])
def test_names_and_types_that_could_leave_the_destination_are_refused(
        tmp_path: Path, engine: Engine, member: tuple[Any, ...], why: str) -> None:
    dest = tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    (dest / "a.txt").write_text("mine")
    archive = tar_archive([("file", "a.txt", b"theirs"), member, ("file", "z.txt", b"z")])
    _refused(engine, _store(tmp_path, archive), dest, why)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["dest"]


@pytest.fixture
def small_bounds(monkeypatch: pytest.MonkeyPatch) -> int:
    """Bounds small enough for a test: 1 MiB expanded, 20 members."""
    monkeypatch.setattr(legacy_archive, "MAX_EXPANDED_BYTES", 1 << 20)
    monkeypatch.setattr(legacy_archive, "MAX_MEMBERS", 20)
    return 1 << 20


def _disk_use(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_a_compression_bomb_is_refused_while_extracting(
        tmp_path: Path, engine: Engine, small_bounds: int, compression: str) -> None:
    # A member declaring 16 MiB, a few KiB compressed: refused at its header.
    bomb = tar_archive([("file", "small.txt", b"s"), ("file", "zeros.bin", bytes(16 << 20))],
                       compression=compression)
    assert len(bomb) * legacy_archive.EXPANSION_RATIO < small_bounds
    dest = tmp_path / "dest"
    dest.mkdir()
    _refused(engine, _store(tmp_path, bomb), dest, "expands past 1,048,576 bytes")
    # Members each within the bound, together past it: refused at the first one too many.
    many = tar_archive([("file", f"part{i}", bytes(300 << 10)) for i in range(8)],
                       compression=compression)
    _refused(engine, _store(tmp_path, many, name="many"), dest, "expands past")
    # A pax header tarfile would read whole into memory: the reader stops at the bound.
    header = tar_archive([("file", "x", b"x")], pax={"comment": "c" * (4 << 20)},
                         compression=compression)
    _refused(engine, _store(tmp_path, header, name="header"), dest, "expands past")
    assert _disk_use(tmp_path) < 4 * small_bounds  # no expanded file left behind


def test_an_archive_of_too_many_members_is_refused(tmp_path: Path, engine: Engine,
                                                   small_bounds: int) -> None:
    members = [("file", f"f{i}", b"") for i in range(21)]
    dest = tmp_path / "dest"
    _refused(engine, _store(tmp_path, tar_archive(members, compression="gz")), dest,
             "more than 20 members")
    legacy.load(engine, legacy.read(engine, _store(tmp_path, tar_archive(members[:20]),
                                                   name="ok")), str(dest))
    assert len(list(dest.iterdir())) == 20


def test_a_corrupt_archive_of_the_stored_size_is_refused(tmp_path: Path,
                                                         engine: Engine) -> None:
    good = tar_archive([("file", "a", b"a" * 1000)], compression="gz")
    corrupt = good[:20] + bytes(len(good) - 20)
    _refused(engine, _store(tmp_path, corrupt), tmp_path / "dest", "cannot be read",
             "the stored copy is corrupt")
    _refused(engine, _store(tmp_path, b"not a tar archive " * 50, name="text"),
             tmp_path / "dest", "cannot be read")


@pytest.mark.flow
@pytest.mark.parametrize("scope", ["good", "broken", "none"])
def test_a_broken_legacy_latest_never_keeps_a_task_from_starting(
        run_flow: RunFlow, scope: str) -> None:
    out = run_flow("legacy_broken_flow.py", "--scope", scope)
    text = out.stdout + out.stderr
    r = {k: json.loads(v) for k, v in results(text).items()}
    assert "ERROR: could not load the metaflow-checkpoint checkpoint of this task" in text
    assert "holds 'state.txt' twice" in text, text
    if scope == "good":
        assert r["loaded"] == {"state.txt": "from the earlier run"}
        assert r["info"] == ["earlier", "metaflow-checkpoint"]
        assert "loaded the latest checkpoint metaflow-checkpoint saved for this step and " \
               "foreach branch: 'earlier'" in text
    else:
        assert r["loaded"] == {} and r["info"] is None
        assert "No checkpoint could be loaded: the task starts without one." in text
    if scope == "broken":
        assert "ERROR: could not load the metaflow-checkpoint checkpoint of this step and " \
               "foreach branch" in text and "unsafe path '../escaped.txt'" in text
