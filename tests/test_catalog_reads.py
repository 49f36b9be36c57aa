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
