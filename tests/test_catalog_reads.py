"""How many manifests choosing a checkpoint reads: a few, however many the scope holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from enginekit import SCOPE, make_engine, request

from uploader import CheckpointKeys
from uploader.catalog import Catalog


def fill(tmp: Path, n: int) -> Catalog:
    """A scope with ``n`` + 1 committed checkpoints, ``n`` written straight to the store:
    the newest with latest=True is the second newest (the newest says latest=False)."""
    eng = make_engine(tmp)
    src = tmp / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"w")
    h = eng.save(request(src))
    h.wait()
    template = eng.read_manifest(CheckpointKeys(SCOPE.prefix, "1", h.checkpoint_id))
    assert template is not None
    # Saved after it in the task (a save number above any this process has used).
    keys = [CheckpointKeys(SCOPE.prefix, "1", f"{10**15 + i:016d}-7-a0-1.{10**9 + i}-00")
            for i in range(n)]
    for i, k in enumerate(keys):
        m = dataclasses.replace(template, checkpoint_id=k.checkpoint_id,
                                latest=i != n - 1, metadata={"i": i})
        eng.run(eng.backend.put_bytes, k.manifest, m.to_json())
    return Catalog(eng)


def test_choosing_the_newest_reads_a_few_manifests_of_many(tmp_path: Path) -> None:
    catalog = fill(tmp_path, 300)
    eng = catalog.engine
    reads: list[str] = []
    real = eng.backend.get_bytes

    async def counting(key: str) -> bytes | None:
        reads.append(key)
        return await real(key)

    eng.backend.get_bytes = counting  # type: ignore[method-assign]
    found = catalog.latest(SCOPE.prefix)
    assert found is not None and found.manifest.metadata == {"i": 298}
    assert len(reads) <= 4, len(reads)
    reads.clear()
    everything = catalog.select(SCOPE.prefix, latest_only=True)  # a listing reads them all
    assert len(everything) == 300 and len(reads) == 301
    # Lazily, in the same order as the listing, and nothing twice.
    reads.clear()
    lazy = list(catalog.newest_first(SCOPE.prefix, latest_only=True))
    assert [e.keys for e in lazy] == [e.keys for e in everything]
    assert len(reads) == 301
    eng.close()


def counting_reads(catalog: Catalog) -> list[str]:
    reads: list[str] = []
    backend = catalog.engine.backend
    real = backend.get_bytes

    async def counting(key: str) -> bytes | None:
        reads.append(key)
        return await real(key)

    backend.get_bytes = counting  # type: ignore[method-assign]
    return reads


def test_a_listing_reads_no_manifest_its_own_engine_committed(tmp_path: Path) -> None:
    """The task that saved them lists its checkpoints with a LIST and no GET each; the
    store still decides what exists, and a reader elsewhere reads every manifest."""
    eng = make_engine(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / "w.bin").write_bytes(b"w%d" % i)
        eng.save(request(src)).wait()
    own = Catalog(eng, remembered=True)  # as current.checkpoint.list() reads
    reads = counting_reads(own)
    listed = own.entries(SCOPE.prefix)
    assert len(listed) == 3 and reads == []
    # What a caller does to what it was given changes nothing the next listing gives.
    listed[0].manifest.metadata["epoch"] = 99
    assert [e.manifest.metadata for e in own.entries(SCOPE.prefix)] == [{"epoch": 1}] * 3
    # A manifest deleted from the store is not listed, whatever the engine remembers.
    eng.run(eng.backend.delete_keys, [listed[1].keys.manifest])
    assert [e.keys for e in own.entries(SCOPE.prefix)] == [listed[0].keys, listed[2].keys]
    assert reads == []
    # Where the store is read whole (retention, a reader elsewhere), every manifest is.
    assert len(Catalog(eng).entries(SCOPE.prefix)) == 2 and len(reads) == 2
    reads.clear()
    other = Catalog(make_engine(tmp_path), remembered=True)  # another process
    reads = counting_reads(other)
    assert len(other.entries(SCOPE.prefix)) == 2 and len(reads) == 2
    other.engine.close()
    eng.close()
