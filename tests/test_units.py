"""Pure pieces: settings, key layout, manifests, lifecycle, retry policy."""

from __future__ import annotations

import pytest
import tenacity
from hypothesis import given
from hypothesis import strategies as st

from uploader import (
    CheckpointHandle,
    CheckpointKeys,
    CheckpointState,
    ConfigError,
    FileEntry,
    Manifest,
    RetryPolicy,
    Scope,
    SnapshotMode,
    parse_settings,
)
from uploader.config import MiB, parse_size
from uploader.layout import checkpoint_order, new_checkpoint_id, safe_component

# -- settings -----------------------------------------------------------------------


def test_settings_parse_sizes_and_modes() -> None:
    s = parse_settings({"PART_SIZE": "8MiB", "SNAPSHOT": "COPY", "UPLOAD_CONCURRENCY": "4",
                        "COPY_BUDGET": "0"})
    assert s.part_size == 8 * MiB and s.snapshot is SnapshotMode.COPY
    assert s.upload_concurrency == 4 and s.copy_budget == 0
    assert parse_size("1g") == 1 << 30 and parse_size("17") == 17


@pytest.mark.parametrize(("name", "value", "expect"), [
    ("MAX_PENDING", "0", "an integer 1..64"),
    ("UPLOAD_CONCURRENCY", "lots", "an integer 1..256"),
    ("PART_SIZE", "1MiB", "5MiB to 5GiB"),
    ("SNAPSHOT", "hardlink", "auto, reflink, link, copy"),
    ("DRAIN_TIMEOUT", "-1", "seconds"),
])
def test_bad_setting_names_the_variable_and_the_allowed_range(name: str, value: str,
                                                               expect: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_settings({name: value}, prefix="METAFLOW_CHECKPOINT_")
    assert f"METAFLOW_CHECKPOINT_{name}={value!r}" in str(ei.value)
    assert expect in str(ei.value)


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(ConfigError, match="METAFLOW_CHECKPOINT_PARTSIZE"):
        parse_settings({"PARTSIZE": "8MiB"}, prefix="METAFLOW_CHECKPOINT_")


# -- layout -------------------------------------------------------------------------

names = st.text(min_size=1, max_size=40)


@given(names)
def test_safe_component_is_safe_and_injective_enough(text: str) -> None:
    out = safe_component(text)
    assert out and "/" not in out and out not in (".", "..")
    assert all((c.isalnum() and c.isascii()) or c in "._-" for c in out)
    if out == text:
        return
    # Sanitised names carry a hash of the original, so two names that clean up the same
    # still land apart.
    assert out != safe_component(text + "\x00")


@given(names, names, names, st.lists(st.integers(0, 10_000), max_size=3))
def test_scope_prefix_round_trips(flow: str, ns: str, step: str, idx: list[int]) -> None:
    scope = Scope(flow, ns, step, tuple(idx))
    back = Scope.from_prefix(scope.prefix)
    assert back.foreach == tuple(f"i{i}" for i in idx)
    assert back.prefix == scope.prefix


def test_foreach_indices_not_values_separate_branches() -> None:
    a, b = Scope("F", "user:x", "s", (0,)), Scope("F", "user:x", "s", (1,))
    assert a.prefix != b.prefix
    assert not a.prefix.startswith(b.prefix) and not b.prefix.startswith(a.prefix)


@given(names, st.integers(0, 99))
def test_manifest_keys_round_trip(run_id: str, attempt: int) -> None:
    keys = CheckpointKeys(Scope("F", "n", "s").prefix, run_id, new_checkpoint_id("3", attempt))
    assert CheckpointKeys.from_manifest_key(keys.manifest).manifest == keys.manifest


def test_checkpoint_ids_sort_by_creation_and_never_repeat() -> None:
    ids = [new_checkpoint_id("1", 0) for _ in range(2000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


# -- manifest -----------------------------------------------------------------------


@given(st.lists(st.tuples(st.text(min_size=1), st.integers(0, 2**40)), max_size=5),
       st.dictionaries(st.text(), st.integers() | st.text()))
def test_manifest_round_trip(files: list[tuple[str, int]], metadata: dict[str, object]) -> None:
    m = Manifest(checkpoint_id="c", name="n", run_id="1", scope_prefix="p", created_on="t",
                 committed_on="u", latest=True,
                 files=tuple(FileEntry(p, s, "0" * 64) for p, s in files),
                 metadata=metadata, identity={"task_id": "1"}, source="directory",
                 timings={"upload_s": 1.5})
    assert Manifest.from_json(m.to_json()) == m
    assert m.total_bytes == sum(s for _, s in files)


def test_manifest_entry_pointing_elsewhere_needs_a_reader_that_follows_it() -> None:
    import json

    from uploader import ManifestError

    def manifest(*files: FileEntry) -> Manifest:
        return Manifest(checkpoint_id="c", name="n", run_id="1", scope_prefix="p",
                        created_on="t", committed_on="u", latest=True, files=files,
                        metadata={}, identity={}, source="directory", timings={})

    own = manifest(FileEntry("a", 1, "0" * 64))
    assert "min_reader" not in json.loads(own.to_json())
    assert "key" not in json.loads(own.to_json())["files"][0]
    shared = manifest(FileEntry("a", 1, "0" * 64, "data/1/old/a"))
    assert json.loads(shared.to_json())["min_reader"] == 2
    assert Manifest.from_json(shared.to_json()) == shared
    keys = CheckpointKeys("mf.checkpoints/F/ns/s/root", "1", "c")
    assert keys.stored("a", None) == keys.data("a")
    assert keys.stored("a", "data/1/old/a") == "mf.checkpoints/F/ns/s/root/data/1/old/a"
    assert keys.relative(keys.data("a")) == "data/1/c/a"
    # A manifest can only point at data of its own scope.
    for bad in ("../x/data/1/c/a", "data/../../other/a", "manifests/1/c.json", "/data/1/c/a",
                "data/1//a"):
        body = shared.to_json().replace(b"data/1/old/a", bad.encode())
        with pytest.raises(ManifestError, match="not under its scope's data/"):
            Manifest.from_json(body)


def test_manifest_only_newer_readers_may_read_is_refused() -> None:
    from uploader import ManifestError

    with pytest.raises(ManifestError, match="newer version"):
        Manifest.from_json(b'{"format": 99, "min_reader": 99}')


# -- lifecycle ----------------------------------------------------------------------


def test_legal_transitions_and_wait() -> None:
    h = CheckpointHandle("c", "n", {}, "/src")
    assert not h.done()
    with pytest.raises(TimeoutError):
        h.wait(0)
    h._transition(CheckpointState.UPLOADING)
    h._transition(CheckpointState.COMMITTED)
    assert h.wait(0) == {} and h.done()
    with pytest.raises(RuntimeError, match="illegal transition committed -> failed"):
        h._transition(CheckpointState.FAILED)


def test_pending_cannot_jump_to_committed() -> None:
    h = CheckpointHandle("c", "n", {}, "/src")
    with pytest.raises(RuntimeError, match="illegal"):
        h._transition(CheckpointState.COMMITTED)


# -- retry policy -------------------------------------------------------------------


def _state(attempt: int, since_start: float) -> tenacity.RetryCallState:
    rs = tenacity.RetryCallState(tenacity.AsyncRetrying(), fn=None, args=(), kwargs={})
    rs.attempt_number = attempt
    rs.outcome_timestamp = rs.start_time + since_start
    return rs


def test_retry_policy_stops_on_attempts_or_deadline() -> None:
    p = RetryPolicy(max_attempts=3, deadline=10)
    assert not p.stop(_state(2, 1.0))
    assert p.stop(_state(3, 1.0))
    assert p.stop(_state(1, 10.5))


def test_retry_backoff_is_jittered_and_capped() -> None:
    p = RetryPolicy(initial_backoff=0.1, max_backoff=2.0)
    waits = [p.wait(_state(n, 0)) for n in range(1, 30)]
    assert all(0 <= w <= 2.0 for w in waits)
    assert len(set(waits)) > 1


def test_retry_call_retries_only_transient_errors() -> None:
    import anyio

    calls: list[int] = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    async def fatal() -> str:
        calls.append(1)
        raise PermissionError("denied")

    p = RetryPolicy(max_attempts=5, deadline=10, initial_backoff=0.001, max_backoff=0.001)
    is_transient = lambda e: isinstance(e, ConnectionResetError)  # noqa: E731
    assert anyio.run(lambda: p.call(flaky, is_transient=is_transient)) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(PermissionError):
        anyio.run(lambda: p.call(fatal, is_transient=is_transient))
    assert len(calls) == 1


# -- which checkpoint is newest -------------------------------------------------------

HOUR_US = 3600 * 10**6
NOW_US = 1_718_000_000_000_000
SCOPE = Scope("F", "n", "s").prefix


def _cid(us: int, attempt: int, seq: int, *, task: str = "7", pid: int = 4242) -> str:
    # The format new_checkpoint_id writes, with every field chosen by the test.
    return "%016d-%s-a%d-%d.%d-%s" % (us, task, attempt, pid, seq, "0a1b2c3d")


saves = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 10_000),
                           st.integers(NOW_US - 10 * HOUR_US, NOW_US + 10 * HOUR_US)),
                 min_size=1, max_size=30, unique_by=lambda t: (t[0], t[1]))


@given(saves)
def test_newest_is_by_attempt_then_save_order_whatever_the_clocks_say(
        found: list[tuple[int, int, int]]) -> None:
    keys = [CheckpointKeys(SCOPE, "12", _cid(us, attempt, seq)) for attempt, seq, us in found]
    ordered = CheckpointKeys.newest_first(keys)
    got = [checkpoint_order(k.checkpoint_id)[:2] for k in ordered]
    assert got == sorted(((a, s) for a, s, _ in found), reverse=True)


def test_a_retry_on_a_host_an_hour_behind_is_still_the_newest() -> None:
    first = CheckpointKeys(SCOPE, "12", _cid(NOW_US, 0, 5))
    retry = CheckpointKeys(SCOPE, "12", _cid(NOW_US - HOUR_US, 1, 0))
    assert retry.checkpoint_id < first.checkpoint_id  # what a string sort would have trusted
    assert CheckpointKeys.newest_first([first, retry]) == [retry, first]


def test_within_a_process_the_sequence_beats_a_clock_that_stepped_back() -> None:
    # Same attempt and process: the counter, not the timestamp, says which came later.
    before = CheckpointKeys(SCOPE, "12", _cid(NOW_US, 0, 3))
    after = CheckpointKeys(SCOPE, "12", _cid(NOW_US - 5, 0, 4))
    assert CheckpointKeys.newest_first([before, after]) == [after, before]


@given(names, st.integers(0, 99))
def test_ids_as_written_parse_back(task: str, attempt: int) -> None:
    import time

    lo = time.time_ns() // 1000
    got = checkpoint_order(new_checkpoint_id(task, attempt))
    assert got[0] == attempt and got[1] >= 0 and got[2] >= lo


def test_ids_already_stored_keep_parsing() -> None:
    assert checkpoint_order("1718000000000000-3-a0-4242.0-deadbeef") == (0, 0, 1718000000000000)
    # A task id with dashes, even ones that look like the fields after it.
    assert checkpoint_order("1718000000000001-my-a9-1.2-ff-task-a2-77.13-0a1b2c3d") == (
        2, 13, 1718000000000001)


GARBAGE = ["", "latest", "abc-def", "-a1-2.3-ff", "1718000000000000-t-ax-2.3-ff",
           "1718000000000000-t-a1-2.x-ff", "1718000000000000-t-a1-2.3-XY",
           "12-t-a1-2.3-ff", "1718000000000000--a1-2.3-ff", "1718000000000000-t-a1-2.3-",
           "\u00b9718000000000000-t-a1-2.3-ff", "1718000000000000-t-a\u00b2-2.3-ff"]


@given(st.text() | st.sampled_from(GARBAGE))
def test_order_never_raises(text: str) -> None:
    attempt, seq, us = checkpoint_order(text)
    assert min(attempt, seq, us) >= 0 or (attempt, seq, us) == (-1, -1, -1)


def test_unparsable_ids_sort_last_and_do_not_stop_a_listing() -> None:
    good = [CheckpointKeys(SCOPE, "12", _cid(NOW_US - HOUR_US, 0, 0)),
            CheckpointKeys(SCOPE, "12", _cid(NOW_US - 2 * HOUR_US, 1, 0))]
    bad = [CheckpointKeys(SCOPE, "12", g) for g in GARBAGE]
    for g in GARBAGE:
        assert checkpoint_order(g) == (-1, -1, -1), g
    ordered = CheckpointKeys.newest_first(bad + good)
    assert ordered[:2] == [good[1], good[0]]
    assert set(ordered[2:]) == set(bad)
    # A run holding nothing but unparsable ids ranks below every run that parses.
    stray = CheckpointKeys(SCOPE, "99", "latest")
    assert CheckpointKeys.newest_first([stray, *good])[-1] == stray


@given(st.dictionaries(st.sampled_from(["1", "2", "3", "x-4"]), saves, min_size=1))
def test_runs_rank_by_their_newest_timestamp_and_stay_together(
        runs: dict[str, list[tuple[int, int, int]]]) -> None:
    keys = [CheckpointKeys(SCOPE, run, _cid(us, a, s)) for run, found in runs.items()
            for a, s, us in found]
    ordered = CheckpointKeys.newest_first(reversed(keys))
    # Each run's checkpoints come as one block ...
    blocks = [k.run_id for i, k in enumerate(ordered)
              if i == 0 or ordered[i - 1].run_id != k.run_id]
    assert sorted(blocks) == sorted(runs)
    # ... the blocks ordered by each run's newest timestamp ...
    newest = {run: max(us for _, _, us in found) for run, found in runs.items()}
    assert [newest[r] for r in blocks] == sorted(newest.values(), reverse=True)
    # ... and inside a block, by attempt then save order.
    for run in runs:
        inside = [k.order[:2] for k in ordered if k.run_id == run]
        assert inside == sorted(inside, reverse=True)


def test_a_later_run_beats_a_higher_attempt_of_an_earlier_run() -> None:
    old = [CheckpointKeys(SCOPE, "1", _cid(NOW_US - HOUR_US, 3, s)) for s in range(3)]
    new = [CheckpointKeys(SCOPE, "2", _cid(NOW_US, 0, 0))]
    assert CheckpointKeys.newest_first(old + new) == [new[0], old[2], old[1], old[0]]


def test_foreach_tokens_follow_values_and_tell_duplicates_apart() -> None:
    from uploader import foreach_token

    first = ["a", "b", {"lr": 0.1}, "a"]
    again = [{"lr": 0.1}, "a", "a", "b"]  # reordered between runs
    tokens = {foreach_token(first, i)[0] for i in range(4)}
    assert len(tokens) == 4  # the two "a" branches are told apart
    assert foreach_token(first, 2) == foreach_token(again, 0)
    assert foreach_token(first, 1) == foreach_token(again, 3)
    # Among equal values, the n-th occurrence matches the n-th.
    assert foreach_token(first, 0) == foreach_token(again, 1)
    assert foreach_token(first, 3) == foreach_token(again, 2)
    assert not foreach_token(first, 0)[1]


def test_foreach_value_without_a_stable_fingerprint_falls_back_to_the_index() -> None:
    from uploader import foreach_token, value_fingerprint

    class Opaque:
        pass

    values = [Opaque(), {1, 2}, 3]
    assert value_fingerprint(values[0]) is None and value_fingerprint(values[1]) is None
    assert foreach_token(values, 0) == ("i0", True)
    assert foreach_token(values, 1) == ("i1", True)
    assert foreach_token(values, 2)[1] is False
    with pytest.raises(ValueError, match="not a foreach token"):
        Scope("F", "n", "s", ("x/../y",))
