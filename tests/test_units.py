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
from uploader.layout import new_checkpoint_id, safe_component

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
    assert back.foreach_indices == tuple(idx)
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


def test_manifest_of_another_format_is_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        Manifest.from_json(b'{"format": 99}')


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
