"""Hostile inputs, broken storage, old and new manifests: nothing is lost, no retry is bricked.

Engine-level tests on a real local store (and S3 against the test server where a rule must
hold on both), and in-process tests of ``current.checkpoint`` for what the task start and
end do with them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from enginekit import SCOPE, GatedBackend, make_engine
from hypothesis import given
from hypothesis import strategies as st
from treekit import (
    fresh_bucket,
    read_tree,
    round_trip,
    s3_engine,
    save_request,
    saved_view,
    write_tree,
)

from uploader import (
    CheckpointHandle,
    CheckpointKeys,
    CheckpointState,
    ChecksumMismatchError,
    Engine,
    FileEntry,
    LoadError,
    Manifest,
    ManifestError,
    Scope,
    Settings,
    SnapshotError,
)
from uploader.catalog import Catalog
from uploader.engine import DrainReport
from uploader.manifest import PLACEHOLDER, freeze_metadata


@contextlib.contextmanager
def engine_on(tmp: Path, **settings: Any) -> Iterator[Engine]:
    engine = make_engine(tmp, **settings)
    try:
        yield engine
    finally:
        engine.close()


def committed(engine: Engine, source: Path, **kw: Any) -> CheckpointKeys:
    req = save_request(source, **kw)
    engine.save(req).wait(60)
    return req.keys


# -- one rule for links and special files ---------------------------------------------


def test_links_inside_the_saved_directory_are_stored_as_what_they_point_to(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"weights/a.bin": b"A" * 5000, "weights/b.bin": b"B" * 10, "cfg.json": b"{}"})
    (src / "latest").symlink_to("weights")  # a directory link, relative
    (src / "cfg-link.json").symlink_to(src / "cfg.json")  # a file link, absolute
    with engine_on(tmp_path, copy_budget=0) as engine:
        round_trip(engine, src, tmp_path / "out")
    loaded = read_tree(tmp_path / "out")  # regular files only: no link comes back
    assert loaded == saved_view(src)
    assert loaded["latest/a.bin"] == b"A" * 5000 and loaded["cfg-link.json"] == b"{}"


def test_a_saved_directory_reached_through_a_link_is_walked(tmp_path: Path) -> None:
    write_tree(tmp_path / "real", {"x.bin": b"x"})
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with engine_on(tmp_path) as engine:
        round_trip(engine, tmp_path / "alias", tmp_path / "out")
    assert read_tree(tmp_path / "out") == {"x.bin": b"x"}


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_a_link_that_leaves_the_saved_directory_fails_save_naming_it(
        tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside"
    write_tree(outside, {"secret.txt": b"not for the checkpoint"})
    src = tmp_path / "src"
    write_tree(src, {"ok.bin": b"1"})
    target = outside / "secret.txt" if kind == "file" else outside
    (src / "leak").symlink_to(target)
    with engine_on(tmp_path) as engine:
        with pytest.raises(SnapshotError, match=r"symlink 'leak' points to .*outside the saved "
                                                r"directory.*save\(path=\.\.\.\)"):
            engine.save(save_request(src))
        assert engine.handles == ()
    assert not (tmp_path / "snapshots").exists() or os.listdir(tmp_path / "snapshots") == []


def test_dangling_and_looping_links_fail_save_with_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"sub/f.bin": b"1"})
    with engine_on(tmp_path) as engine:
        (src / "gone").symlink_to(src / "missing.bin")
        with pytest.raises(SnapshotError, match=r"'gone' points to .*does not exist"):
            engine.save(save_request(src))
        os.unlink(src / "gone")
        (src / "sub" / "up").symlink_to("..")
        with pytest.raises(SnapshotError, match=r"'sub/up' points to .*contains the link"):
            engine.save(save_request(src))
        os.unlink(src / "sub" / "up")
        (src / "a").symlink_to("b")
        (src / "b").symlink_to("a")
        with pytest.raises(SnapshotError, match=r"'[ab]' points to .*never ends"):
            engine.save(save_request(src))


def test_fifos_and_sockets_are_left_out_with_one_note_naming_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"data.bin": b"d"})
    os.mkfifo(src / "pipe")
    short = Path(tempfile.mkdtemp(dir="/tmp"))  # AF_UNIX paths are short
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(short / "s"))
        os.rename(short / "s", src / "sock")
    short.rmdir()
    logs: list[str] = []
    with engine_on(tmp_path, logs=logs) as engine:
        round_trip(engine, src, tmp_path / "out")
        round_trip(engine, src, tmp_path / "out2")
    assert read_tree(tmp_path / "out") == {"data.bin": b"d"}
    notes = [m for m in logs if "leaves out" in m]
    assert len(notes) == 1, logs
    assert "'pipe'" in notes[0] and "'sock'" in notes[0] and "FIFOs, sockets" in notes[0]


# -- names: whatever save() accepts, load() gives back -------------------------------

ODD_NAMES = {
    "back\\slash.bin": b"1",
    "sub\\dir/inner.bin": b"2",
    ".hidden": b"3",
    "..leading-dots": b"4",
    "ünïcødé-名前.txt": b"5",
    "x" * 255: b"6",  # NAME_MAX, in bytes
    "é" * 127 + "x": b"7",  # 255 bytes of UTF-8
    "sp ace ~!@#$%^&()+=[]{};',`.bin": b"8",
    "d" * 200 + "/" + "f" * 255: b"9",
    "empty.bin": b"",
}


def test_odd_names_round_trip_on_the_local_store(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, ODD_NAMES)
    with engine_on(tmp_path, copy_budget=0) as engine:
        round_trip(engine, src, tmp_path / "out")
    assert read_tree(tmp_path / "out") == ODD_NAMES


@pytest.mark.s3
def test_odd_names_round_trip_on_s3(s3_server: Any, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, ODD_NAMES)
    engine = s3_engine(s3_server, tmp_path, fresh_bucket(s3_server), copy_budget=0)
    try:
        round_trip(engine, src, tmp_path / "out")
    finally:
        engine.close()
    assert read_tree(tmp_path / "out") == ODD_NAMES


@pytest.mark.parametrize("name, why", [(b"bad\xff.bin", "not valid UTF-8"),
                                       (b"new\nline.bin", "control character"),
                                       (b"tab\t.bin", "control character")])
def test_a_name_no_store_can_key_fails_save_naming_it(tmp_path: Path, name: bytes,
                                                      why: str) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    fd = os.open(os.fsencode(src) + b"/sub/" + name, os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    with engine_on(tmp_path) as engine, pytest.raises(SnapshotError, match=why) as info:
        engine.save(save_request(src))
    assert repr("sub/" + os.fsdecode(name)) in str(info.value)


@pytest.mark.s3
def test_a_path_too_long_for_an_s3_key_fails_save_not_the_upload(s3_server: Any,
                                                                    tmp_path: Path) -> None:
    src = tmp_path / "src"
    deep = "/".join(["d" * 200] * 5) + "/" + "f" * 100  # 1105 bytes, and the scope's prefix
    write_tree(src, {deep: b"x", "ok.bin": b"y"})
    engine = s3_engine(s3_server, tmp_path, fresh_bucket(s3_server))
    try:
        with pytest.raises(SnapshotError, match=r"more than the 1024 the s3 store takes"):
            engine.save(save_request(src))
        assert engine.handles == ()
    finally:
        engine.close()


# -- manifests: old, new and broken ---------------------------------------------------

# What version 0.1.0 wrote (format 1), verbatim.
OLD_MANIFEST = b"""{
 "checkpoint_id": "0001732950000000000-7-a0-123.0-deadbeef",
 "committed_on": "2024-11-30T07:00:01+00:00",
 "created_on": "2024-11-30T08:00:00",
 "files": [
  {"path": "state.txt", "sha256": "%s", "size": 7}
 ],
 "format": 1,
 "identity": {"attempt": 0, "task_id": "7"},
 "latest": true,
 "metadata": {"epoch": 3},
 "name": "mfchckpt",
 "run_id": "1",
 "scope_prefix": "mf.checkpoints/Flow/user_tester-3b2c9c5a/train/root",
 "source": "directory",
 "timings": {"snapshot_s": 0.001, "upload_s": 0.01}
}""" % hashlib.sha256(b"epoch=3").hexdigest().encode()


def test_a_manifest_of_the_first_format_still_reads() -> None:
    m = Manifest.from_json(OLD_MANIFEST)
    assert m.name == "mfchckpt" and m.metadata == {"epoch": 3} and m.latest
    assert m.files == (FileEntry("state.txt", 7, hashlib.sha256(b"epoch=3").hexdigest()),)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                           max_leaves=6)


KNOWN_FIELDS = {"checkpoint_id", "committed_on", "created_on", "files", "format", "identity",
                "latest", "metadata", "name", "run_id", "scope_prefix", "source", "timings",
                "min_reader"}


@given(top=st.dictionaries(st.text(min_size=1, max_size=12).filter(
           lambda k: k not in KNOWN_FIELDS), json_values, max_size=4),
       per_file=st.dictionaries(st.sampled_from(["mode", "crc32c", "parts", "x"]), json_values,
                                max_size=2),
       fmt=st.integers(1, 1000))
def test_fields_a_newer_writer_adds_are_ignored(top: dict[str, Any], per_file: dict[str, Any],
                                                fmt: int) -> None:
    d = json.loads(OLD_MANIFEST)
    d.update(top)
    d["format"] = fmt
    d["files"][0].update(per_file)
    m = Manifest.from_json(json.dumps(d).encode())
    assert m == dataclasses.replace(Manifest.from_json(OLD_MANIFEST), format=fmt)


def test_optional_fields_an_older_writer_left_out_take_defaults() -> None:
    d = json.loads(OLD_MANIFEST)
    for k in ("committed_on", "created_on", "identity", "latest", "metadata", "source",
              "timings", "format"):
        del d[k]
    m = Manifest.from_json(json.dumps(d).encode())
    assert m.latest and m.metadata == {} and m.identity == {} and m.source == "directory"


@pytest.mark.parametrize("data", [
    b"\x00\x01 not json", b"[1, 2]", b'{"format": 1}', b'{"format": "one"}',
    OLD_MANIFEST.replace(b'"size": 7', b'"size": -7'),
    OLD_MANIFEST.replace(b'"latest": true', b'"latest": "yes"'),
    OLD_MANIFEST.replace(b'"format": 1', b'"format": 1, "min_reader": 4'),
])
def test_an_unreadable_manifest_is_a_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(data)


def test_listing_skips_an_unreadable_manifest_with_one_warning(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"state.txt": b"good"})
    logs: list[str] = []
    with engine_on(tmp_path, logs=logs) as engine:
        good = committed(engine, src)
        bad = committed(engine, src)
        newer = committed(engine, src)
        store = tmp_path / "store"
        (store / bad.manifest).write_bytes(b"{ torn")
        d = json.loads((store / newer.manifest).read_bytes())
        d.update(format=7, min_reader=7, something_new={"a": 1})
        (store / newer.manifest).write_bytes(json.dumps(d).encode())
        catalog = Catalog(engine)
        for _ in range(3):
            assert [e.keys for e in catalog.entries(SCOPE.prefix)] == [good]
        assert catalog.latest(SCOPE.prefix).keys == good  # type: ignore[union-attr]
    warnings = [m for m in logs if "skipping checkpoint manifest" in m]
    assert len(warnings) == 2, logs
    assert any("not JSON" in w for w in warnings)
    assert any("newer version" in w and "upgrade" in w for w in warnings)


# -- loading: scoped, safe, all or nothing, and our own errors ------------------------


def test_load_never_writes_through_a_symlink_in_the_destination(tmp_path: Path) -> None:
    src = tmp_path / "src"
    loaded = {"sub/state.bin": b"new state", "sub/x/deep.bin": b"deep", "top.txt": b"top"}
    write_tree(src, loaded)
    victim = tmp_path / "victim"
    kept = {"state.bin": b"keep me", "file.txt": b"keep me too", "x/deep.bin": b"and me"}
    write_tree(victim, kept)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(victim)
    (dest / "top.txt").symlink_to(victim / "file.txt")
    with engine_on(tmp_path) as engine:
        round_trip(engine, src, dest)
    assert read_tree(victim) == kept
    assert read_tree(dest) == loaded


def test_data_is_read_under_the_manifests_own_key_not_what_its_body_says(
        tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_tree(a, {"w.bin": b"scope A's data"})
    write_tree(b, {"w.bin": b"scope B's data"})
    other = Scope("Other", "user:someone", "train")
    with engine_on(tmp_path) as engine:
        ka = committed(engine, a, scope=other)
        kb = committed(engine, b)
        path = tmp_path / "store" / kb.manifest
        d = json.loads(path.read_bytes())
        # A manifest whose body claims another scope's checkpoint, with matching checksums.
        d.update(scope_prefix=ka.scope_prefix, run_id=ka.run_id, checkpoint_id=ka.checkpoint_id)
        d["files"][0]["sha256"] = hashlib.sha256(b"scope A's data").hexdigest()
        path.write_bytes(json.dumps(d).encode())
        catalog = Catalog(engine)
        entry = catalog.read(kb.manifest)
        assert entry is not None
        with pytest.raises(ChecksumMismatchError, match=kb.checkpoint_id):
            catalog.load(entry, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "w.bin").exists()


def test_a_failed_load_leaves_the_destination_as_it_was(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {f"f{i}.bin": bytes([i]) * 100 for i in range(8)})
    dest = tmp_path / "dest"
    write_tree(dest, {"mine.txt": b"untouched"})
    with engine_on(tmp_path) as engine:
        keys = committed(engine, src)
        f5 = tmp_path / "store" / keys.data("f5.bin")
        good = f5.read_bytes()
        f5.write_bytes(b"\xff" * 100)
        entry = Catalog(engine).read(keys.manifest)
        assert entry is not None
        with pytest.raises(ChecksumMismatchError, match=r"f5\.bin"):
            Catalog(engine).load(entry, str(dest))
        f5.write_bytes(good)
        os.unlink(tmp_path / "store" / keys.data("f3.bin"))
        with pytest.raises(LoadError, match=r"f3\.bin.*missing") as missing:
            Catalog(engine).load(entry, str(dest))
        assert not isinstance(missing.value, ChecksumMismatchError)
    assert read_tree(dest) == {"mine.txt": b"untouched"}


def test_a_directory_in_the_way_is_a_load_error_and_nothing_moves(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a.bin": b"a", "b.bin": b"b"})
    dest = tmp_path / "dest"
    write_tree(dest, {"b.bin/inside.txt": b"mine"})
    with engine_on(tmp_path) as engine:
        keys = committed(engine, src)
        entry = Catalog(engine).read(keys.manifest)
        assert entry is not None
        with pytest.raises(LoadError, match=r"'b\.bin'.*is a directory where the checkpoint has"):
            Catalog(engine).load(entry, str(dest))
    assert read_tree(dest) == {"b.bin/inside.txt": b"mine"}


@pytest.mark.parametrize("path", ["../escape.bin", "/abs.bin", "a//b.bin", "./a.bin", "a/..",
                                  ""])
def test_a_manifest_path_that_could_leave_the_destination_is_refused(tmp_path: Path,
                                                                     path: str) -> None:
    src = tmp_path / "src"
    write_tree(src, {"a.bin": b"a"})
    with engine_on(tmp_path) as engine:
        keys = committed(engine, src)
        mpath = tmp_path / "store" / keys.manifest
        d = json.loads(mpath.read_bytes())
        d["files"][0]["path"] = path
        mpath.write_bytes(json.dumps(d).encode())
        entry = Catalog(engine).read(keys.manifest)
        assert entry is not None
        with pytest.raises(ManifestError, match="unsafe path"):
            Catalog(engine).load(entry, str(tmp_path / "dest" / "inner"))
    assert not (tmp_path / "escape.bin").exists()
    assert not (tmp_path / "dest" / "escape.bin").exists()


# -- durable means durable ------------------------------------------------------------


def test_every_new_directory_is_fsynced_into_its_parent_before_the_manifest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uploader.backends.local as local

    events: list[tuple[str, str]] = []
    real_fsync_dir, real_makedirs, real_write = (local._fsync_dir, local._makedirs,
                                                 local._write_atomic)

    def makedirs(path: str) -> list[str]:
        made = real_makedirs(path)
        events.extend(("mkdir", d) for d in made)
        return made

    def fsync_dir(path: str) -> None:
        events.append(("fsync", path))
        real_fsync_dir(path)

    def write_atomic(dst: str, data: bytes) -> None:
        real_write(dst, data)
        events.append(("wrote", dst))

    monkeypatch.setattr(local, "_makedirs", makedirs)
    monkeypatch.setattr(local, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(local, "_write_atomic", write_atomic)
    src = tmp_path / "src"
    write_tree(src, {"a.bin": b"a", "deep/er/b.bin": b"b", "deep/c.bin": b"c"})
    store = tmp_path / "store"
    # A directory an earlier process made, and may have died before syncing into its parent.
    req = save_request(src)
    (store / req.keys.scope_prefix / "data").mkdir(parents=True)
    with engine_on(tmp_path) as engine:
        engine.save(req).wait(60)
    manifest_at = events.index(("wrote", str(store / req.keys.manifest)))

    def synced_after(directory: str, at: int, until: int = len(events)) -> bool:
        return any(events[i] == ("fsync", directory) for i in range(at + 1, until))

    # Every directory made is synced into its parent before the write that made it returns.
    for i, (what, d) in enumerate(events):
        if what == "mkdir":
            assert synced_after(os.path.dirname(d), i), (d, events)
    # Before the manifest can appear: every data file's name, in every directory of it...
    data_root = store / req.keys.data_prefix
    for parent in (data_root, data_root / "deep", data_root / "deep" / "er"):
        assert synced_after(str(parent), -1, manifest_at), parent
    # ... up to a directory made before this engine ran (an earlier process may have died
    # before syncing it into its parent).
    assert synced_after(str(store / req.keys.scope_prefix), -1, manifest_at)
    # And after the manifest, its own directory, before the commit is reported.
    assert synced_after(str((store / req.keys.manifest).parent), manifest_at)


# -- errors say the right thing -------------------------------------------------------

UNPRIVILEGED = textwrap.dedent('''
    import os, sys, json
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from enginekit import make_engine
    from treekit import save_request, write_tree
    from uploader import SnapshotError, StorageAccessError, SourceReadError

    base = Path({base!r})
    out = {{}}
    # Big files are linked (no read needed), small ones copied: both are read-checked.
    for name, budget in (("unreadable-big", 0), ("unreadable-small", 1 << 20)):
        engine = make_engine(base / "mine" / name, copy_budget=budget)
        try:
            engine.save(save_request(base / name))
            out[name] = "saved"
        except SnapshotError as e:
            out[name] = str(e)
        engine.close()
    src = base / "mine" / "src"
    write_tree(src, {{"w.bin": b"w" * 5000}})
    engine = make_engine(base / "theirs", copy_budget=0)  # a store this user cannot write
    try:
        engine.save(save_request(src)).wait(30)
        out["store"] = "saved"
    except StorageAccessError as e:
        out["store"] = str(e)
    engine.close()
    engine = make_engine(base / "mine", gated=True, copy_budget=0)
    h = engine.save(save_request(src))
    os.chmod(src / "w.bin", 0)  # the same inode as the snapshot's link
    engine.backend.gate.set()
    try:
        h.wait(30)
        out["later"] = "saved"
    except SourceReadError as e:
        out["later"] = str(e)
    engine.close()
    print(json.dumps(out))
''')


def without_permission_override() -> list[str]:
    """A command prefix under which file permissions apply, to root too (no DAC override)."""
    if os.geteuid() != 0:
        return []
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root, and no setpriv to drop the permission override with")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]


def test_unreadable_sources_and_unwritable_stores_are_told_apart(tmp_path: Path) -> None:
    base = tmp_path
    for name in ("unreadable-big", "unreadable-small"):
        write_tree(base / name, {"ok.bin": b"ok", "w.bin": b"x" * 5000})
        os.chmod(base / name / "w.bin", 0)
    (base / "theirs" / "store").mkdir(parents=True)
    (base / "theirs" / "store").chmod(0o555)
    (base / "mine").mkdir()
    script = UNPRIVILEGED.format(tests=str(Path(__file__).parent), base=str(base))
    proc = subprocess.run([*without_permission_override(), sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=120, cwd=base)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    for name in ("unreadable-big", "unreadable-small"):
        assert "w.bin" in out[name] and "chmod u+r" in out[name], out
        assert "datastore" not in out[name]
    assert "datastore root" in out["store"] and "writable" in out["store"], out
    assert "cannot read the file being saved" in out["later"], out
    assert "'w.bin'" in out["later"] and "datastore root" not in out["later"], out


# -- metadata is frozen at save() -----------------------------------------------------


def test_freeze_metadata_converts_like_metaflow_checkpoint() -> None:
    import numpy as np

    loop: dict[str, Any] = {}
    loop["self"] = loop
    frozen, replaced = freeze_metadata({
        "epoch": np.int64(3), "loss": np.float32(0.5), "flag": np.bool_(True),
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5), "day": datetime.date(2024, 1, 2),
        "obj": object(), "nested": {"t": (1, 2), 7: "seven"}, "loop": loop,
        "nan": math.inf})
    assert frozen == {"epoch": 3, "loss": 0.5, "flag": True, "when": "2024-01-02T03:04:05",
                      "day": "2024-01-02", "obj": PLACEHOLDER,
                      "nested": {"t": [1, 2], "7": "seven"}, "loop": {"self": PLACEHOLDER},
                      "nan": math.inf}
    assert replaced == ["metadata['obj']", "metadata['loop']['self']"]
    json.dumps(frozen)


# -- current.checkpoint, in process ---------------------------------------------------


def make_current(tmp: Path, logs: list[str], *, attempt: int = 0, root: str = "ds",
                 **settings: Any) -> Any:
    import metaflow  # noqa: F401  the extension's modules import through it

    from metaflow_extensions.asynccheckpoint.plugins.checkpoint.current import (
        CurrentCheckpoint,
        TaskIdentity,
    )

    identity = TaskIdentity(flow="Flow", run_id="1", step="train", task_id="7",
                            attempt=attempt, namespace="user:tester")
    return CurrentCheckpoint(identity=identity, scope=Scope("Flow", "user:tester", "train"),
                             settings=Settings(**settings), datastore="local",
                             datastore_root=str(tmp / root), temp_dir_root=str(tmp / "stage"),
                             log=logs.append)


def test_metadata_is_frozen_when_save_is_called(tmp_path: Path) -> None:
    import numpy as np

    logs: list[str] = []
    cc = make_current(tmp_path, logs)
    try:
        Path(cc.directory, "s.txt").write_text("s")
        meta: dict[str, Any] = {"epoch": np.int64(3), "when": datetime.datetime(2024, 5, 6),
                                "opaque": object(), "hist": [1]}
        ref = cc.save(metadata=meta)
        meta["epoch"] = 99
        meta["hist"].append(2)
        meta["late"] = object()  # would have failed the commit before
        cc.wait()
        (stored,) = cc.list()
    finally:
        cc._close()
    want = {"epoch": 3, "when": "2024-05-06T00:00:00", "opaque": PLACEHOLDER, "hist": [1]}
    assert stored["metadata"] == want and ref["metadata"] == want
    assert any("metadata['opaque']" in m and PLACEHOLDER in m for m in logs), logs


@pytest.mark.parametrize("breakage", ["corrupt", "missing", "garbage-manifest",
                                      "newer-manifest"])
def test_resume_falls_back_to_the_next_older_checkpoint(tmp_path: Path, breakage: str) -> None:
    logs: list[str] = []
    cc = make_current(tmp_path, logs)
    try:
        Path(cc.directory, "state.txt").write_text("epoch=1")
        older = cc.save(metadata={"epoch": 1}, wait=True)
        Path(cc.directory, "state.txt").write_text("epoch=2")
        Path(cc.directory, "extra.txt").write_text("only in the newest")
        newest = cc.save(metadata={"epoch": 2}, wait=True)
    finally:
        cc._finish(success=False)
        cc._close()
    root = Path(newest["datastore_root"])
    keys = CheckpointKeys.from_manifest_key(newest["key"])
    if breakage == "corrupt":
        p = root / keys.data("state.txt")
        p.write_bytes(b"X" + p.read_bytes()[1:])
    elif breakage == "missing":
        os.unlink(root / keys.data("state.txt"))
    elif breakage == "garbage-manifest":
        (root / keys.manifest).write_bytes(b"\x00garbage")
    else:
        d = json.loads((root / keys.manifest).read_bytes())
        (root / keys.manifest).write_bytes(json.dumps({**d, "min_reader": 9}).encode())
    retry = make_current(tmp_path, logs, attempt=1)
    try:
        retry._load_on_start("fresh")
        assert retry.is_loaded and retry.info["key"] == older["key"]
        # Nothing of the newest, half-loaded, is left behind.
        assert read_tree(Path(retry.directory)) == {"state.txt": b"epoch=1"}
    finally:
        retry._close()
    text = "\n".join(logs)
    if breakage in ("corrupt", "missing"):
        assert f"ERROR: could not load checkpoint 'mfchckpt' ({keys.checkpoint_id})" in text
        assert "loading the next older one" in text
        assert ("SHA-256" if breakage == "corrupt" else "missing") in text
    else:
        assert "skipping checkpoint manifest" in text and keys.checkpoint_id in text


def test_when_no_checkpoint_loads_the_task_starts_without_one(tmp_path: Path) -> None:
    logs: list[str] = []
    cc = make_current(tmp_path, logs)
    try:
        Path(cc.directory, "state.txt").write_text("epoch=1")
        ref = cc.save(wait=True)
    finally:
        cc._close()
    keys = CheckpointKeys.from_manifest_key(ref["key"])
    (Path(ref["datastore_root"]) / keys.data("state.txt")).write_bytes(b"garbage")
    retry = make_current(tmp_path, logs, attempt=1)
    try:
        retry._load_on_start("eager")
        assert not retry.is_loaded and os.listdir(retry.directory) == []
    finally:
        retry._close()
    assert any("the task starts without one" in m for m in logs), logs


def test_a_reference_from_another_datastore_root_loads_only_when_named(tmp_path: Path) -> None:
    import metaflow  # noqa: F401  first: the extension's modules import through it

    from metaflow_extensions.asynccheckpoint.plugins.shared.exceptions import (
        CheckpointReferenceError,
    )

    logs: list[str] = []
    other = make_current(tmp_path, logs, root="elsewhere")
    try:
        Path(other.directory, "w.txt").write_text("from elsewhere")
        foreign = dict(other.save(wait=True))
    finally:
        other._close()
    cc = make_current(tmp_path, logs)
    try:
        Path(cc.directory, "w.txt").write_text("ours")
        own = dict(cc.save(wait=True))
        assert Path(cc.load(own, str(tmp_path / "own")), "w.txt").read_text() == "ours"
        with pytest.raises(CheckpointReferenceError) as refused:
            cc.load(foreign, str(tmp_path / "x"))
        assert foreign["datastore_root"] in str(refused.value)
        assert "datastore_root=" in str(refused.value)
        assert not (tmp_path / "x").exists()
        with pytest.raises(CheckpointReferenceError, match=r"datastore_root=.*third.* passed"):
            cc.load(foreign, str(tmp_path / "x"), datastore_root=str(tmp_path / "third"))
        out = cc.load(foreign, str(tmp_path / "y"),
                      datastore_root=foreign["datastore_root"])
        assert Path(out, "w.txt").read_text() == "from elsewhere"
    finally:
        cc._close()


def test_load_errors_reach_the_user_as_checkpoint_exceptions(tmp_path: Path) -> None:
    import metaflow  # noqa: F401  first: the extension's modules import through it

    from metaflow_extensions.asynccheckpoint.plugins.shared.exceptions import CheckpointException

    logs: list[str] = []
    cc = make_current(tmp_path, logs)
    try:
        Path(cc.directory, "w.txt").write_text("w")
        ref = cc.save(wait=True)
        keys = CheckpointKeys.from_manifest_key(ref["key"])
        os.unlink(Path(ref["datastore_root"]) / keys.data("w.txt"))
        with pytest.raises(CheckpointException, match=r"'w\.txt'.*missing"):
            cc.load(ref, str(tmp_path / "out"))
    finally:
        cc._close()


# -- timeouts mean what they say -------------------------------------------------------


def gated_current(tmp: Path, logs: list[str], monkeypatch: pytest.MonkeyPatch,
                  **settings: Any) -> Any:
    import metaflow  # noqa: F401  first: the extension's modules import through it

    from metaflow_extensions.asynccheckpoint.plugins.checkpoint import current as current_checkpoint

    def factory(datastore: str, root: str) -> Any:
        return lambda ctx: GatedBackend(root, ctx)

    monkeypatch.setattr(current_checkpoint, "backend_factory", factory)
    return make_current(tmp, logs, **settings)


def test_wait_without_a_timeout_waits_past_the_drain_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs: list[str] = []
    cc = gated_current(tmp_path, logs, monkeypatch, drain_timeout=0.2)
    backend = cc._engine.backend
    try:
        Path(cc.directory, "w.bin").write_bytes(b"w" * 10)
        cc.save()
        outcome: list[Any] = []
        waiter = threading.Thread(target=lambda: outcome.append(cc.wait()))
        waiter.start()
        waiter.join(1.0)  # five drain timeouts: bounded, and no synchronisation
        assert waiter.is_alive() and outcome == []
        backend.gate.set()
        waiter.join(30)
        assert not waiter.is_alive() and len(outcome[0]) == 1
    finally:
        backend.gate.set()
        cc._engine.drain(30)  # so the engine closes cleanly, with nothing in flight
        cc._close()


def test_the_end_of_task_drain_and_its_resave_end_within_the_drain_timeout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import metaflow  # noqa: F401  first: the extension's modules import through it

    from metaflow_extensions.asynccheckpoint.plugins.shared.exceptions import (
        CheckpointUploadException,
    )

    logs: list[str] = []
    cc = gated_current(tmp_path, logs, monkeypatch, drain_timeout=1.0, copy_budget=0)
    backend = cc._engine.backend
    try:
        path = Path(cc.directory, "w.bin")
        path.write_bytes(b"a" * 4096)
        cc.save()
        backend.entered.wait(30)
        with open(path, "r+b") as f:  # in place, while the upload waits: torn
            f.write(b"b" * 4096)
        backend.gate.set()
        cc._engine.drain(30)
        backend.gate.clear()  # the save taken again at the end never gets through
        raised: list[BaseException] = []

        def finish() -> None:
            try:
                cc._finish(success=True)
            except BaseException as e:
                raised.append(e)

        t0 = time.monotonic()
        ender = threading.Thread(target=finish, daemon=True)
        ender.start()
        ender.join(10)  # bounded: a drain that ignores its timeout fails here, not hangs
        elapsed = time.monotonic() - t0
        assert not ender.is_alive() and elapsed < 1.0 + 0.5, elapsed
        assert isinstance(raised[0], CheckpointUploadException), raised
        assert "still uploading" in str(raised[0])
        assert any("saving" in m and "again" in m for m in logs), logs
    finally:
        backend.gate.set()
        cc._engine.drain(30)  # so the engine closes cleanly, with nothing in flight
        cc._close()


def test_torn_bookkeeping_is_linear_in_the_number_of_saves() -> None:
    handles = []
    for i in range(40_000):
        h = CheckpointHandle(f"c{i}", f"name{i}", {}, "/src", scope="s")
        h._transition(CheckpointState.UPLOADING)
        h._transition(CheckpointState.TORN)
        handles.append(h)
    t0 = time.perf_counter()
    report = DrainReport(tuple(handles))
    assert len(report.torn_unsuperseded) == 40_000
    assert report.pending == [] and report.failed == [] and report.committed == []
    # Quadratic bookkeeping would compare 8e8 pairs here: minutes, not milliseconds.
    assert time.perf_counter() - t0 < 2.0


def test_drain_for_signal_looks_at_each_finished_handle_once(tmp_path: Path) -> None:
    reads = 0

    class Counting(CheckpointHandle):
        polled = 0

        @property
        def state(self) -> CheckpointState:
            nonlocal reads
            reads += 1
            if self.checkpoint_id == "last":
                # Finishes after twenty polls of it: the drain has to wait for it.
                self.polled += 1
                if self.polled >= 20:
                    self._state = CheckpointState.COMMITTED
                    self._done.set()
            return self._state

    handles = []
    for i in range(2000):
        h = Counting("last" if i == 1999 else f"c{i}", "n", {}, "/src", scope="s")
        h._transition(CheckpointState.UPLOADING)
        if i < 1999:
            h._transition(CheckpointState.COMMITTED)
        handles.append(h)
    with engine_on(tmp_path) as engine:
        engine._handles = handles
        report = engine.drain_for_signal(30)
    assert report.pending == []
    # Twenty polls re-reading every handle would be 40,000 reads.
    assert reads < 2 * 2000 + 100, reads


# -- bounded resources: 10,000 files under ulimit -n 256 -------------------------------

MANY_FILES = textwrap.dedent('''
    import os, resource, sys, json
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    from treekit import local_engine, read_tree, round_trip, s3_engine
    from s3server import S3Server
    tmp = Path({tmp!r})
    src = tmp / "src"
    for d in range({dirs}):
        (src / f"d{{d:03d}}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{{d:03d}}" / f"f{{f:03d}}.bin").write_bytes(b"%d/%d" % (d, f))
    kind = {kind!r}
    # Few slots and many files: a file opened before its request has a slot stays open
    # while it waits for one, and thousands of them run out of descriptors.
    if kind == "local":
        engine = local_engine(tmp, upload_concurrency=8)
    else:
        engine = s3_engine(S3Server({endpoint!r}, None), tmp, {bucket!r},
                           upload_concurrency=8)
    try:
        round_trip(engine, src, tmp / "out")
    finally:
        engine.close()
    got = read_tree(tmp / "out")
    assert len(got) == {dirs} * 100, len(got)
    assert all(v == b"%d/%d" % (int(k[1:4]), int(k[6:9])) for k, v in got.items())
    print("OK", len(got))
''')


def run_many_files(tmp: Path, kind: str, files: int, endpoint: str = "",
                   bucket: str = "") -> None:
    script = MANY_FILES.format(tests=str(Path(__file__).parent), tmp=str(tmp), kind=kind,
                               dirs=files // 100, endpoint=endpoint, bucket=bucket)
    # Run from tmp: from the source tree, "-c" would import the package from there.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=900, cwd=tmp)
    assert proc.returncode == 0 and f"OK {files}" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_ten_thousand_files_round_trip_under_ulimit_256_locally(tmp_path: Path) -> None:
    run_many_files(tmp_path, "local", 10_000)


@pytest.mark.s3
def test_a_thousand_files_round_trip_under_ulimit_256_on_s3(s3_server: Any,
                                                            tmp_path: Path) -> None:
    run_many_files(tmp_path, "s3", 1_000, s3_server.endpoint, fresh_bucket(s3_server))


@pytest.mark.s3
@pytest.mark.slow
def test_ten_thousand_files_round_trip_under_ulimit_256_on_s3(s3_server: Any,
                                                              tmp_path: Path) -> None:
    run_many_files(tmp_path, "s3", 10_000, s3_server.endpoint, fresh_bucket(s3_server))
