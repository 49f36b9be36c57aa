"""Savers and pruners in different processes sharing one store (uploader.leases).

Each race is widened on purpose: a process stops at a chosen point (tests/sharedkit.py)
while the other one runs, so the interleaving that loses data without the protocol is
the one that runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sharedkit import SCOPE, engine, loads, save, wait_for, write_tree

from uploader import CheckpointKeys, RetentionPolicy
from uploader.catalog import Catalog
from uploader.leases import LEASE_TTL_S, locks_prefix
from uploader.retention import DEFAULT_GRACE_S, prune

HERE = Path(__file__).parent
KIT = HERE / "sharedkit.py"
BIG_HEX = "5a" * 64
BIG_REPEAT = 4096  # 256 KiB


def start(cfg: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(KIT), json.dumps(cfg)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def result(proc: subprocess.Popen[str], timeout: float = 300) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    got: dict[str, Any] = json.loads(line[len("RESULT "):])
    got["log"] = err
    return got


def seed(tmp: Path) -> tuple[str, str]:
    """Run 1's checkpoint X (big.bin, small.txt), then run 3's Y, newer, which shares no
    object with X: ``keep_last=1`` keeps Y and deletes X (saved with latest=False, so it
    is not its run's resume point either). Returns their manifest keys."""
    eng = engine(str(tmp / "store"), tmp / "seed", {})
    x_src, y_src = tmp / "seed" / "x", tmp / "seed" / "y"
    write_tree(x_src, {"big.bin": bytes.fromhex(BIG_HEX) * BIG_REPEAT, "small.txt": b"x"})
    write_tree(y_src, {"other.bin": b"y" * 100})
    x = save(eng, x_src, "1", "5", latest=False)
    y = save(eng, y_src, "3", "6")
    assert x.state.value == y.state.value == "committed"
    eng.close()
    return (CheckpointKeys(SCOPE.prefix, "1", x.checkpoint_id).manifest,
            CheckpointKeys(SCOPE.prefix, "3", y.checkpoint_id).manifest)


def cfg(tmp: Path, role: str, **more: Any) -> dict[str, Any]:
    return {"role": role, "store": str(tmp / "store"), "work": str(tmp / role), **more}


def saver_cfg(tmp: Path, base: str | None, **more: Any) -> dict[str, Any]:
    copy = tmp / "base-manifest.json"
    if base is not None:
        copy.write_bytes((tmp / "store" / base).read_bytes())
    return cfg(tmp, "saver", base=base, base_copy=str(copy), big_hex=BIG_HEX,
               big_repeat=BIG_REPEAT, run_id="2", **more)


def test_a_prune_elsewhere_spares_what_a_pending_save_points_at(tmp_path: Path) -> None:
    x, _ = seed(tmp_path)
    pause = tmp_path / "saver-pause"
    # The saver stops after checking that X's big.bin exists, before its manifest.
    saver = start(saver_cfg(tmp_path, x, pause_at="saver:confirmed", pause=str(pause)))
    wait_for(pause.with_suffix(".reached"), proc=saver)
    pruned = result(start(cfg(tmp_path, "pruner", keep_last=1)))
    assert pruned["deleted"] == 1 and not pruned["errors"], pruned
    assert not (tmp_path / "store" / x).exists()  # X is gone as a checkpoint...
    pause.with_suffix(".go").touch()
    out = result(saver)
    assert out["state"] == "committed" and out["loads"] == "ok", out
    # ...and its object, which the new checkpoint points at, was spared.
    x_keys = CheckpointKeys.from_manifest_key(x)
    assert out["pointers"]["big.bin"] == x_keys.relative(x_keys.data("big.bin"))


def test_a_save_waits_for_a_prune_elsewhere_and_uploads_what_it_deleted(
        tmp_path: Path) -> None:
    x, _ = seed(tmp_path)
    p_pause, s_pause = tmp_path / "pruner-pause", tmp_path / "saver-pause"
    # The pruner has looked at the leases (none) and stops before deleting X's data.
    saver_config = saver_cfg(tmp_path, x, pause_at="saver:listed-locks", pause=str(s_pause))
    pruner = start(cfg(tmp_path, "pruner", keep_last=1, pause_at="pruner:delete-data",
                       pause=str(p_pause)))
    wait_for(p_pause.with_suffix(".reached"), proc=pruner)
    # The saver points at X's big.bin and lists the prune markers: the pruner's is live.
    saver = start(saver_config)
    wait_for(s_pause.with_suffix(".reached"), proc=saver)
    p_pause.with_suffix(".go").touch()
    pruned = result(pruner)
    assert pruned["deleted"] == 1 and not pruned["errors"], pruned
    s_pause.with_suffix(".go").touch()
    out = result(saver)
    assert out["state"] == "committed" and out["loads"] == "ok", out
    # It found X's object gone once the prune ended, and uploaded the file itself.
    assert out["pointers"]["big.bin"] is None, out
    assert "uploading it again" in out["log"]


@pytest.mark.parametrize("grace_s, ahead_s", [(0.0, 0.0), (None, DEFAULT_GRACE_S + 3600)],
                         ids=["grace-0", "clock-7h-ahead"])
def test_a_prune_elsewhere_never_takes_an_upload_in_flight_for_debris(
        tmp_path: Path, grace_s: float | None, ahead_s: float) -> None:
    store = tmp_path / "store"
    pause = tmp_path / "saver-pause"
    # Two files: the small one is stored while the big one's upload is held.
    saver = start(saver_cfg(tmp_path, None, pause_at="saver:big", pause=str(pause)))
    wait_for(pause.with_suffix(".reached"), proc=saver)
    small = next(iter(store.glob("mf.checkpoints/**/data/2/*/small.txt")), None)
    deadline = time.monotonic() + 60
    while small is None and time.monotonic() < deadline:
        small = next(iter(store.glob("mf.checkpoints/**/data/2/*/small.txt")), None)
    assert small is not None
    # And a dead save's data, just written, with no lease: young by the store's clock.
    dead = CheckpointKeys(SCOPE.prefix, "4", "0000000000000001-x-a0-1.0-00")
    (store / dead.data("f.bin")).parent.mkdir(parents=True)
    (store / dead.data("f.bin")).write_bytes(b"d")
    pruned = result(start(cfg(tmp_path, "pruner", keep_last=1, grace_s=grace_s,
                              clock_ahead_s=ahead_s)))
    if grace_s == 0:
        assert pruned["debris"] == 1  # the dead save's: no lease, and grace 0
    else:
        assert pruned["debris"] == 0 and pruned["objects"] == 0, pruned
    assert small.exists()
    pause.with_suffix(".go").touch()
    out = result(saver)
    assert out["state"] == "committed" and out["loads"] == "ok", out


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_leases_and_markers_of_dead_processes_expire(tmp_path: Path) -> None:
    store = tmp_path / "store"
    eng = engine(str(store), tmp_path / "w", {})
    locks = store / locks_prefix(SCOPE.prefix)
    ttl = int(LEASE_TTL_S)

    def dead_save(run: str, lease_age: float, data_age: float) -> CheckpointKeys:
        keys = CheckpointKeys(SCOPE.prefix, run, f"000000000000000{run}-x-a0-1.0-00")
        data = store / keys.data("f.bin")
        data.parent.mkdir(parents=True)
        data.write_bytes(b"d")
        _age(data, data_age)
        lease = locks / "save" / run / f"{keys.checkpoint_id}.t{ttl}.json"
        lease.parent.mkdir(parents=True, exist_ok=True)
        lease.write_text(json.dumps({"format": 1, "pointers": []}))
        _age(lease, lease_age)
        return keys

    hours = 3600.0
    # A save that has uploaded for 10 hours and still renews its lease: kept.
    alive = dead_save("1", 0, 10 * hours)
    # A save that died 10 hours ago: its lease expired long ago, its data is debris.
    dead = dead_save("2", 10 * hours, 10 * hours)
    marker = locks / "prune" / f"vm-1-ab.t{ttl}.json"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    _age(marker, 10 * hours)
    report = prune(Catalog(eng), SCOPE.prefix, RetentionPolicy(), grace_s=hours)
    assert report.debris_removed == 1, report
    assert (store / alive.data("f.bin")).exists()
    assert not (store / dead.data("f.bin")).exists()
    left = sorted(p.relative_to(locks).as_posix() for p in locks.rglob("*.json"))
    assert left == [f"save/1/{alive.checkpoint_id}.t{ttl}.json"]
    eng.close()


def test_an_object_deleted_behind_the_protocol_is_uploaded_and_the_manifest_rewritten(
        tmp_path: Path) -> None:
    from sharedkit import PausingBackend

    x, _ = seed(tmp_path)
    store = tmp_path / "store"
    x_keys = CheckpointKeys.from_manifest_key(x)
    victim = store / x_keys.data("big.bin")

    class Rogue(PausingBackend):
        """Someone deletes X's big.bin with a tool of their own as the save commits."""

        async def put_bytes(self, key: str, data: bytes) -> None:
            await super().put_bytes(key, data)
            if "/manifests/2/" in key and victim.exists():
                victim.unlink()

    logs: list[str] = []
    from uploader import Engine, Settings

    eng = Engine(lambda ctx: Rogue(str(store), ctx), Settings(),
                 snapshot_dir=str(tmp_path / "snaps"), log=logs.append)
    m = eng.read_manifest(x_keys)
    assert m is not None
    eng.set_base(x_keys, m)
    src = tmp_path / "src"
    write_tree(src, {"big.bin": bytes.fromhex(BIG_HEX) * BIG_REPEAT, "small.txt": b"z"})
    handle = save(eng, src, "2", "8")
    assert handle.state.value == "committed", handle.error
    mine = CheckpointKeys(SCOPE.prefix, "2", handle.checkpoint_id)
    assert loads(eng, mine, tmp_path / "out") == "ok"
    final = eng.read_manifest(mine)
    assert final is not None and all(f.key is None for f in final.files)
    assert any("were deleted as it committed" in line for line in logs), logs
    eng.close()


def _soak(tmp_path: Path, seconds: float, s3: Any = None) -> None:
    """Three processes save with pointers into one scope while two prune it with
    keep_last=1 and a grace of seconds; then every committed checkpoint loads byte-exact,
    and no data without a manifest is left past the grace."""
    grace = 2.0
    where: dict[str, Any] = {}
    if s3 is not None:
        from treekit import fresh_bucket

        where = {"store": fresh_bucket(s3), "endpoint": s3.endpoint}
    savers = [start(cfg(tmp_path, "soak-saver", work=str(tmp_path / f"s{i}"), run_id=str(i),
                        task=str(10 + i), seconds=seconds, big_bytes=256 * 1024, **where))
              for i in range(3)]
    pruners = [start(cfg(tmp_path, "soak-pruner", work=str(tmp_path / f"p{i}"),
                         seconds=seconds, grace_s=grace, **where)) for i in range(2)]
    saved = [result(p, timeout=seconds + 300) for p in savers]
    pruned = [result(p, timeout=seconds + 300) for p in pruners]
    for s in saved:
        assert not s["problems"], "\n".join(s["problems"])
    for p in pruned:
        assert not p["errors"], "\n".join(p["errors"])
    total = sum(s["saves"] for s in saved)
    assert sum(s["pointed"] for s in saved) > total // 3, saved  # the race was run
    assert sum(p["deleted"] for p in pruned) > 0, pruned
    print(f"soak {seconds:.0f}s: {total} saves, {sum(s['pointed'] for s in saved)} pointing, "
          f"{sum(p['prunes'] for p in pruned)} prunes deleting "
          f"{sum(p['deleted'] for p in pruned)} checkpoints")
    eng = engine(where.get("store", str(tmp_path / "store")), tmp_path / "check", where)
    catalog = Catalog(eng)
    entries = catalog.entries(SCOPE.prefix)
    assert entries
    for e in entries:
        assert loads(eng, e.keys, tmp_path / "check" / e.keys.checkpoint_id) == "ok"
    # Past the grace (on the store's clock, which `now` moves), a prune that keeps
    # everything leaves no data that no manifest names, and no lock.
    report = prune(catalog, SCOPE.prefix, RetentionPolicy(), grace_s=grace,
                   now=time.time() + grace + 2)
    assert not report.errors, report.errors
    named = {e.keys.stored(f.path, f.key) for e in catalog.entries(SCOPE.prefix)
             for f in e.manifest.files}
    assert set(eng.list_keys(f"{SCOPE.prefix}/data/")) == named
    assert eng.list_keys(locks_prefix(SCOPE.prefix)) == []
    eng.close()


# Five seconds is past the grace twice over, and long enough for the race to be run
# (the soak asserts it was); the five-minute soak is in the slow tier.
def test_savers_and_pruners_in_five_processes_lose_nothing(tmp_path: Path) -> None:
    _soak(tmp_path, 5.0)


@pytest.mark.s3
def test_savers_and_pruners_in_five_processes_lose_nothing_on_s3(
        tmp_path: Path, s3_server: Any) -> None:
    _soak(tmp_path, 5.0, s3_server)


@pytest.mark.slow
def test_savers_and_pruners_in_five_processes_lose_nothing_for_five_minutes(
        tmp_path: Path) -> None:
    _soak(tmp_path, 300.0)
