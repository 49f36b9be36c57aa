"""The backend contract (uploader/backends/base.py), on every kind of store.

Each test runs once per store (``store``: local, S3 on moto, Azure on Azurite, GCS where its
kit is in the tree) through the same code, so what one backend guarantees, all do. What
only one store has (S3's worker process, its fault proxy; Azure's staged blocks) is in
that store's own test module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from uploader.backends import Backend, TransferContext
from uploader.backends.base import reporting_progress
from uploader.config import MiB, Settings, UploaderMode
from uploader.engine import Engine, SaveRequest
from uploader.errors import CheckpointError
from uploader.layout import CheckpointKeys, Scope, new_checkpoint_id
from uploader.retry import RetryPolicy

SMALL_PARTS = {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_ctx() -> TransferContext:
    return TransferContext(
        settings=Settings(**SMALL_PARTS, upload_concurrency=4, uploader=UploaderMode.THREAD),
        limiter=anyio.CapacityLimiter(4),
        retry=RetryPolicy(max_attempts=3, deadline=30, initial_backoff=0.01),
        log=lambda _: None)


@contextlib.asynccontextmanager
async def opened(store: Any) -> AsyncIterator[Backend]:
    b = store.backend(make_ctx())
    try:
        yield b
    finally:
        await b.aclose()


def write_random(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.mark.anyio
async def test_small_round_trip(store: Any, tmp_path: Path) -> None:
    src = tmp_path / "small.bin"
    want = write_random(src, 100_000)
    async with opened(store) as b:
        assert await b.put_file("ck/small.bin", str(src), 100_000) == want
        await b.put_bytes("ck/manifest.json", b'{"ok": true}')
        assert await b.get_bytes("ck/manifest.json") == b'{"ok": true}'
        assert await b.stat("ck/small.bin") == 100_000
        dest = tmp_path / "out" / "deeper" / "small.bin"
        assert await b.get_file("ck/small.bin", str(dest), 100_000) == want
        assert b.url_of("ck/small.bin").startswith(b.url)
    assert dest.read_bytes() == src.read_bytes()
    assert os.listdir(dest.parent) == ["small.bin"]  # no temporary left behind


@pytest.mark.anyio
async def test_empty_file_round_trip(store: Any, tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.write_bytes(b"")
    async with opened(store) as b:
        assert await b.put_file("ck/empty", str(src), 0) == hashlib.sha256().hexdigest()
        assert await b.stat("ck/empty") == 0
        dest = tmp_path / "empty.out"
        assert await b.get_file("ck/empty", str(dest), 0) == hashlib.sha256().hexdigest()
        await b.put_bytes("ck/empty-bytes", b"")
        assert await b.get_bytes("ck/empty-bytes") == b""
    assert dest.read_bytes() == b""


@pytest.mark.anyio
async def test_multipart_round_trip(store: Any, tmp_path: Path) -> None:
    size = 23 * MiB + 12_345  # five parts or blocks of 5 MiB, the last one short
    src = tmp_path / "big.bin"
    want = write_random(src, size)
    counted: list[int] = []
    async with opened(store) as b:
        with reporting_progress(counted.append):
            assert await b.put_file("ck/big.bin", str(src), size) == want
        # The bytes count as stored as the store takes them: part by part (block, chunk)
        # where there are parts, so a drain's progress moves during one big file.
        assert sum(counted) == size, counted
        if store.kind != "local":
            assert sorted(counted) == sorted([5 * MiB] * 4 + [3 * MiB + 12_345]), counted
        assert await b.stat("ck/big.bin") == size
        dest = tmp_path / "restored" / "big.bin"
        assert await b.get_file("ck/big.bin", str(dest), size) == want
        assert await b.list_uploads("") == []  # nothing left half-done
        assert await b.confirm("ck/big.bin", size, want, str(src)) is None
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == want
    assert os.listdir(dest.parent) == ["big.bin"]


@pytest.mark.anyio
async def test_list_keys(store: Any) -> None:
    async with opened(store) as b:
        for key in ("a/1", "a/2", "a/sub/3", "b/1", "ab/1"):
            await b.put_bytes(key, b"x")
        assert sorted(await b.list_keys("a/")) == ["a/1", "a/2", "a/sub/3"]
        assert sorted(await b.list_keys("a")) == ["a/1", "a/2", "a/sub/3", "ab/1"]
        assert sorted(await b.list_keys("")) == ["a/1", "a/2", "a/sub/3", "ab/1", "b/1"]
        assert await b.list_keys("nothing/") == []


@pytest.mark.anyio
async def test_list_objects_has_sizes_and_the_stores_times(store: Any) -> None:
    async with opened(store) as b:
        before = time.time()
        await b.put_bytes("o/one", b"1")
        await b.put_bytes("o/three", b"333")
        await b.put_bytes("o/deeper/empty", b"")
        after = time.time()
        found = sorted(await b.list_objects("o/"))
    assert [(o.key, o.size) for o in found] == [("o/deeper/empty", 0), ("o/one", 1),
                                                ("o/three", 3)]
    # Whole seconds on some stores; the store's clock is this machine's here.
    assert all(before - 2 <= o.mtime <= after + 2 for o in found), (before, after, found)


@pytest.mark.anyio
async def test_delete_keys_counts_missing_keys_as_deleted(store: Any) -> None:
    async with opened(store) as b:
        for key in ("d/1", "d/2", "d/keep"):
            await b.put_bytes(key, b"x")
        assert await b.delete_keys(["d/1", "d/2", "d/never-was"]) == []
        assert await b.list_keys("d/") == ["d/keep"]
        assert await b.get_bytes("d/1") is None
        assert await b.delete_keys([]) == []


@pytest.mark.anyio
async def test_missing_key(store: Any, tmp_path: Path) -> None:
    async with opened(store) as b:
        assert await b.get_bytes("no/such/key") is None
        assert await b.stat("no/such/key") is None
        dest = tmp_path / "d" / "f"
        with pytest.raises(CheckpointError, match="no/such/key"):
            await b.get_file("no/such/key", str(dest), 10)
        assert await b.confirm("no/such/key", 10, "0" * 64, b"0123456789") == "it is gone"
    assert not dest.parent.exists() or os.listdir(dest.parent) == []


@pytest.mark.anyio
async def test_get_file_hashes_the_bytes_it_wrote(store: Any, tmp_path: Path) -> None:
    """A stored object longer than the manifest says must not verify as the shorter file."""
    data = os.urandom(1000)
    async with opened(store) as b:
        await b.put_bytes("ck/f", data)
        digest = await b.get_file("ck/f", str(tmp_path / "f"), 900)
    assert digest == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.anyio
@pytest.mark.parametrize("size", [1000, 12 * MiB + 5], ids=["single", "multipart"])
async def test_confirm_by_the_stored_checksum_never_by_size(store: Any, tmp_path: Path,
                                                            size: int) -> None:
    src = tmp_path / "src"
    want = write_random(src, size)
    async with opened(store) as b:
        await b.put_file("c/f", str(src), size)
        assert await b.confirm("c/f", size, want, str(src)) is None
        why = await b.confirm("c/f", size + 1, want, str(src))
        assert why is not None and str(size) in why
    async with opened(store) as fresh:  # remembers nothing this process sent
        assert await fresh.confirm("c/f", size, want, str(src)) is None
        # The same size, other bytes (as another tool would leave them).
        other = tmp_path / "other"
        write_random(other, size)
        await fresh.put_file("c/f", str(other), size)
    async with opened(store) as b:
        why = await b.confirm("c/f", size, want, str(src))
    assert why is not None and "it is gone" not in why


def test_engine_saves_and_loads_through_the_backend(store: Any, tmp_path: Path) -> None:
    """The backend as the engine drives it: save in the background, commit, list, load."""
    src = tmp_path / "staging"
    (src / "sub").mkdir(parents=True)
    want = {"state.pt": os.urandom(12 * MiB + 7), "sub/meta.json": b'{"epoch": 3}'}
    for rel, data in want.items():
        (src / rel).write_bytes(data)
    settings = Settings(**SMALL_PARTS, upload_concurrency=4, max_attempts=3,
                        retry_deadline=30, uploader=UploaderMode.THREAD)
    engine = Engine(store.backend, settings, snapshot_dir=str(tmp_path / "snapshots"),
                    log=lambda _: None)
    try:
        scope = Scope("TrainFlow", "user:me", "train")
        keys = CheckpointKeys(scope.prefix, "42", new_checkpoint_id("7", 0))
        handle = engine.save(SaveRequest(source=str(src), keys=keys, name="mfchckpt",
                                         latest=True, metadata={"epoch": 3}, identity={},
                                         reference={}))
        handle.wait(timeout=120)
        (found,) = engine.list_manifest_keys(scope.manifests_prefix())
        manifest = engine.read_manifest(found)
        assert manifest is not None
        assert {f.path: f.sha256 for f in manifest.files} == {
            rel: hashlib.sha256(data).hexdigest() for rel, data in want.items()}
        engine.load(manifest, str(tmp_path / "restored"))
        assert engine.run(engine.backend.list_uploads, "") == []
    finally:
        engine.close()
    for rel, data in want.items():
        assert (tmp_path / "restored" / rel).read_bytes() == data
