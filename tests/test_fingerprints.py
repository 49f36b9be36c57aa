"""Foreach fingerprints: distinct values get distinct ones, and the old ones never move.

A branch's checkpoints live under a scope named by its foreach value's fingerprint, so a
fingerprint that changes strands checkpoints users already have, and one that two
different values share hands one branch another's checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uploader import foreach_token, value_fingerprint


def old_fingerprint(value: Any) -> str:
    """What every release so far computed, for the values it fingerprinted."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def kind_and_value(value: Any) -> Any:
    """A value's identity as Python tells values apart by type and value, hashable."""
    if isinstance(value, bool | int | str) or value is None:
        return (type(value).__name__, value)
    if isinstance(value, float):
        return ("float", repr(value))  # -0.0 is not 0.0; every nan is one value here
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(kind_and_value(v) for v in value))
    assert isinstance(value, dict)
    return ("dict", frozenset((kind_and_value(k), kind_and_value(v)) for k, v in value.items()))


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.floats(allow_nan=True), st.text(max_size=8))
plain_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=4),
    max_leaves=12)
keys = st.one_of(st.text(max_size=3), st.integers(-3, 3), st.booleans(), st.none(),
                 st.floats(-2, 2, allow_nan=False))
any_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(keys, inner, max_size=4),
        st.dictionaries(st.text(max_size=3), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(value=plain_values)
def test_values_fingerprinted_unambiguously_before_keep_their_fingerprint(value: Any) -> None:
    assert value_fingerprint(value) == old_fingerprint(value)


@settings(max_examples=400, deadline=None)
@given(a=any_values, b=any_values)
def test_values_python_tells_apart_get_different_fingerprints(a: Any, b: Any) -> None:
    fa, fb = value_fingerprint(a), value_fingerprint(b)
    assert fa is not None and fb is not None
    assert (fa == fb) == (kind_and_value(a) == kind_and_value(b)), (a, b)


@settings(max_examples=200, deadline=None)
@given(value=any_values)
def test_a_fingerprint_does_not_depend_on_dict_order(value: Any) -> None:
    def reversed_dicts(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: reversed_dicts(x) for k, x in reversed(list(v.items()))}
        if isinstance(v, list | tuple):
            return type(v)(reversed_dicts(x) for x in v)
        return v

    assert value_fingerprint(reversed_dicts(value)) == value_fingerprint(value)


# Computed by the release before fingerprints told tuples and non-str keys apart: the
# scopes of checkpoints users already have.
PINNED = [
    ("a", "ac8d8342bbb2362d"),
    (3, "4e07408562bedb8b"),
    (1.5, "9f29a130438b8117"),
    (True, "b5bea41b6c623f7c"),
    (None, "74234e98afe7498f"),
    ([1, "x", None], "c3462050a94ca819"),
    ({"lr": 0.1, "layers": [64, 32]}, "16a9d3d042e3239c"),
    ({"b": {"c": [True, None, 2.0]}, "a": "é"}, "aa5fcd56b8c8d220"),
    (float("nan"), "d5b592c05dc25b50"),
]


@pytest.mark.parametrize(("value", "expected"), PINNED, ids=[repr(v) for v, _ in PINNED])
def test_pinned_fingerprints_of_existing_scopes(value: Any, expected: str) -> None:
    assert value_fingerprint(value) == expected


def test_the_ambiguous_cases_are_told_apart() -> None:
    pairs = [({1: "a"}, {"1": "a"}), ((1, 2), [1, 2]), ({True: 1}, {"true": 1}),
             ({None: 1}, {"null": 1}), ({1: "a"}, {True: "a"}), ({1: "a"}, {1.0: "a"}),
             (True, 1), (1, 1.0), ([(1,)], [[1]]), ({"k": (1,)}, {"k": [1]})]
    for a, b in pairs:
        fa, fb = value_fingerprint(a), value_fingerprint(b)
        assert fa is not None and fb is not None and fa != fb, (a, b)
    # A dict with keys of mixed kinds, or tuple keys, has a fingerprint now.
    assert value_fingerprint({1: "a", "b": 2}) is not None
    assert value_fingerprint({(1, 2): 3}) is not None


def test_numpy_scalars_count_as_their_python_values_at_any_depth() -> None:
    for np_value, py_value in [(np.int64(3), 3), (np.int32(-1), -1), (np.bool_(True), True),
                               (np.bool_(False), False), (np.float64(1.5), 1.5),
                               (np.float32(0.5), 0.5), (np.str_("x"), "x")]:
        assert value_fingerprint(np_value) == value_fingerprint(py_value), np_value
        nested = {"v": [np_value, (np_value,)], "k": {np_value: 1} if np_value != "x" else {}}
        same = {"v": [py_value, (py_value,)], "k": {py_value: 1} if py_value != "x" else {}}
        assert value_fingerprint(nested) == value_fingerprint(same), np_value
    assert value_fingerprint(np.int64(1)) != value_fingerprint(np.bool_(True))
    # Arrays, even of one element, are not scalars: no fingerprint, as before.
    assert value_fingerprint(np.array(3)) is None
    assert value_fingerprint(np.array([3])) is None
    assert value_fingerprint(np.datetime64("2024-01-01")) is None


def test_foreach_branches_over_numpy_values_follow_their_values() -> None:
    first = list(np.arange(3))  # np.int64 values, as np.arange gives them
    tokens = [foreach_token(first, i) for i in range(3)]
    assert not any(by_index for _, by_index in tokens)
    # The same values as Python ints, reordered, in a later run: each finds its branch.
    again = [2, 0, 1]
    assert [foreach_token(again, i)[0] for i in range(3)] == [tokens[2][0], tokens[0][0],
                                                               tokens[1][0]]
    # A tuple and a list with the same items are two branches, not one value twice.
    mixed = [(1, 2), [1, 2]]
    assert foreach_token(mixed, 0)[0].endswith("k0") and foreach_token(mixed, 1)[0].endswith("k0")
    assert foreach_token(mixed, 0) != foreach_token(mixed, 1)


def test_values_without_a_fingerprint() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    for value in (cycle, deep, {1, 2}, object(), {frozenset(): 1}, [1, object()]):
        assert value_fingerprint(value) is None
