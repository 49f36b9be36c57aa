"""Property tests: random trees round-trip byte-exact through save and load, on both stores.

Trees have odd names (unicode, leading dots, backslashes, spaces, names of up to 255 bytes),
empty and non-empty files on either side of the copy budget (so some files are copied and
some linked), nesting, and symlinks inside the tree to files and to a directory. What
comes back is what the tree shows through its links, as regular files.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treekit import (
    fresh_bucket,
    local_engine,
    read_tree,
    round_trip,
    s3_engine,
    save_request,
    saved_view,
)

from uploader import Engine, SnapshotError

# Anything a name may hold under the one rule: UTF-8, no "/", no control characters.
_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"}
name_chars = st.characters(blacklist_categories=("Cs",),
                           blacklist_characters="".join(_CONTROL) + "/")
plain_names = st.text(name_chars, min_size=1, max_size=24)
long_names = st.one_of(st.integers(200, 255).map(lambda n: "L" * n),
                       st.integers(60, 85).map(lambda n: "名" * n))  # 180..255 bytes
names = st.one_of(plain_names, st.sampled_from([".hidden", "..dots", "back\\slash", " sp "]),
                  long_names).filter(lambda n: n not in (".", "..")
                                     and len(n.encode()) <= 255)
contents = st.one_of(st.just(b""), st.binary(max_size=300), st.binary(min_size=600,
                                                                     max_size=4000))


@st.composite
def trees(draw: st.DrawFn) -> dict[str, bytes]:
    """Relative path -> bytes, with no path both a file and a directory."""
    out: dict[str, bytes] = {}
    dirs: set[str] = set()
    for parts in draw(st.lists(st.lists(names, min_size=1, max_size=3), min_size=1,
                               max_size=8)):
        path = "/".join(parts)
        prefixes = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if path in out or path in dirs or prefixes & out.keys():
            continue
        out[path] = draw(contents)
        dirs |= prefixes
    return out


@st.composite
def links(draw: st.DrawFn, tree: dict[str, bytes]) -> list[tuple[str, str, bool]]:
    """(where, target, relative) of symlinks to add: file links, and one directory link."""
    files = sorted(tree)
    dirs = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
    places = ["", *dirs]
    out: list[tuple[str, str, bool]] = []
    for _ in range(draw(st.integers(0, 2))):
        out.append((draw(st.sampled_from(places)), draw(st.sampled_from(files)),
                    draw(st.booleans())))
    if dirs and draw(st.booleans()):
        target = draw(st.sampled_from(dirs))
        # Never inside what it points to: that link would lead back into itself.
        allowed = [p for p in places if p != target and not p.startswith(target + "/")]
        if allowed:
            out.append((draw(st.sampled_from(allowed)), target, draw(st.booleans())))
    return out


def build(root: Path, tree: dict[str, bytes], extra: list[tuple[str, str, bool]]) -> None:
    for rel, data in tree.items():
        p = root.joinpath(*rel.split("/"))
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    for n, (where, target, relative) in enumerate(extra):
        place = root.joinpath(*where.split("/")) if where else root
        link = place / f"link{n}"
        if os.path.lexists(link):
            continue
        dest = root.joinpath(*target.split("/"))
        link.symlink_to(os.path.relpath(dest, place) if relative else dest)


def check_round_trip(engine: Engine, tree: dict[str, bytes],
                     extra: list[tuple[str, str, bool]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        build(tmp / "src", tree, extra)
        round_trip(engine, tmp / "src", tmp / "out")
        want = saved_view(tmp / "src")
        assert read_tree(tmp / "out") == want
        for rel, data in tree.items():  # the plain files, whatever the links added
            assert want[rel] == data


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = local_engine(tmp_path_factory.mktemp("props"), copy_budget=1000)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def s3_store(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = s3_engine(s3_server, tmp_path_factory.mktemp("props-s3"), fresh_bucket(s3_server),
                       copy_budget=1000)
    yield engine
    engine.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_trees_round_trip_on_the_local_store(local_store: Engine, data: Any) -> None:
    tree = data.draw(trees())
    check_round_trip(local_store, tree, data.draw(links(tree)))


@pytest.mark.s3
@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_trees_round_trip_on_s3(s3_store: Engine, data: Any) -> None:
    tree = data.draw(trees())
    check_round_trip(s3_store, tree, data.draw(links(tree)))


# -- the one rule, on any name: refused by save(), or given back by load() ------------

any_names = st.text(st.characters(blacklist_characters="/\0"), min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..") and _encodable(n) and len(os.fsencode(n)) <= 255)


def _encodable(name: str) -> bool:
    try:
        os.fsencode(name)  # lone surrogates \udc80-\udcff stand for bytes that are not UTF-8
    except UnicodeEncodeError:
        return False
    return True


def keyable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return not any(c in _CONTROL for c in name)


def check_rule(engine: Engine, files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "src").mkdir()
        for name, data in files.items():
            with open(os.fsencode(tmp / "src") + b"/" + os.fsencode(name), "wb") as f:
                f.write(data)
        if all(keyable(n) for n in files):
            round_trip(engine, tmp / "src", tmp / "out")
            assert read_tree(tmp / "out") == files
        else:
            with pytest.raises(SnapshotError) as refused:
                engine.save(save_request(tmp / "src"))
            assert any(repr(n) in str(refused.value) for n in files if not keyable(n))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(files=st.dictionaries(any_names, st.binary(max_size=50), min_size=1, max_size=4))
def test_any_name_is_refused_by_save_or_given_back_by_load_locally(
        local_store: Engine, files: dict[str, bytes]) -> None:
    check_rule(local_store, files)


@pytest.mark.s3
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(files=st.dictionaries(any_names, st.binary(max_size=50), min_size=1, max_size=4))
def test_any_name_is_refused_by_save_or_given_back_by_load_on_s3(
        s3_store: Engine, files: dict[str, bytes]) -> None:
    check_rule(s3_store, files)
