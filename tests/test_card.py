"""The checkpoint card: its content, its live refresher, and the card a user sees."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cardkit import by_id, card_payload, components, png_colours, read_cards
from conftest import FLOWS, RunFlow
from storekit import results

from metaflow_extensions.asynccheckpoint.plugins.card import checkpoint_card as card_mod
from metaflow_extensions.asynccheckpoint.plugins.card.checkpoint_card import (
    CARD_ID,
    NBSP,
    CheckpointCard,
    header_markdown,
    save_rows,
    summary_markdown,
    table_markdown,
    timeline_spec,
)
from uploader import CheckpointHandle, CheckpointState, TornCheckpointError

S = CheckpointState


def handle(name: str, *states: CheckpointState, scope: str = "s", size: int = 1 << 20,
           saved_at: float = 100.0, skipped: int = 0) -> CheckpointHandle:
    h = CheckpointHandle(f"id-{name}-{len(states)}", name, {}, "/src", scope=scope)
    h.stats.saved_at, h.stats.files, h.stats.bytes = saved_at, 2, size
    h.stats.bytes_skipped, h.stats.bytes_uploaded = skipped, size - skipped
    h.stats.blocked_s = 0.004
    for st in states:
        err = TornCheckpointError("w.bin was rewritten", checkpoint_id=h.checkpoint_id,
                                  path="w.bin") if st is S.TORN else None
        h._transition(st, err)
    return h


# -- what the card shows ----------------------------------------------------------------

def test_states_a_later_commit_of_the_same_scope_and_name_supersedes_a_torn_save() -> None:
    hs = [
        handle("last", S.UPLOADING, S.TORN),            # replaced by the later "last"
        handle("best", S.UPLOADING, S.TORN),            # only "last" follows: stays torn
        handle("last", S.UPLOADING, S.TORN, scope="other"),  # another scope's "last"
        handle("last", S.UPLOADING, S.COMMITTED),
        handle("last", S.UPLOADING, S.FAILED),
        handle("last", S.UPLOADING),
        handle("last"),
    ]
    rows = save_rows(hs, started_at=90.0)
    assert [r.state for r in rows] == [
        "superseded", "torn", "torn", "committed", "failed", "uploading", "pending"]
    assert [r.number for r in rows] == list(range(1, 8))
    assert rows[0].saved_s == pytest.approx(10.0)
    assert rows[1].error is not None and "rewritten" in rows[1].error
    assert rows[3].error is None and rows[3].finished_s is not None
    assert rows[6].finished_s is None and rows[6].upload_s is None


def test_table_and_summary_show_each_save_and_escape_names() -> None:
    hs = [handle("a|b*", S.UPLOADING, S.COMMITTED, size=3 << 20, skipped=2 << 20),
          handle("best", S.UPLOADING, S.TORN, skipped=1 << 20), handle("last")]
    rows = save_rows(hs, started_at=99.0)
    table = table_markdown(rows)
    lines = table.splitlines()
    assert lines[2].startswith("| # | name | state | files | size | unchanged | save() blocked")
    assert ("| a\\|b\\* | committed | 2 | 3.0\u00a0MiB | 2.0\u00a0MiB | 4.0\u00a0ms |"
            in table)
    assert "| best | torn |" in table and "| last | pending |" in table
    # A torn upload stopped early: nothing it skipped counts, and no throughput for it.
    assert [line.split(" | ")[5] for line in lines[5:]] == ["-", "-"]
    assert [line.split(" | ")[8] for line in lines[5:]] == ["-", "-"]
    assert sum(line.startswith("|") for line in lines) == 1 + 1 + 3  # header, rule, saves
    summary = summary_markdown(rows, final=True, now=time.time())
    assert "**3 saves**: 1 pending, 1 committed, 1 torn." in summary
    assert "3.0 MiB committed, of which 2.0 MiB unchanged (not uploaded again)" in summary
    assert "_Final" in summary
    assert "**#2 `best` torn**" in summary  # the reason is spelled out


def test_table_keeps_the_newest_rows() -> None:
    hs = [handle(f"n{i}", S.UPLOADING, S.COMMITTED) for i in range(card_mod.TABLE_ROWS + 5)]
    table = table_markdown(save_rows(hs, started_at=0))
    assert "| n4 |" not in table and "| n5 |" in table
    assert f"The newest {card_mod.TABLE_ROWS} of {card_mod.TABLE_ROWS + 5} saves." in table


def test_header_says_what_was_loaded_or_that_the_task_started_fresh() -> None:
    fresh = header_markdown(pathspec="F/7/train/3", attempt=0, load_policy="fresh", loaded=None)
    assert "**Started fresh**" in fresh and "attempt 0" in fresh
    ref = {"name": "mfchckpt", "pathspec": "F/7/train/3", "attempt": 0, "size": 2048,
           "created_on": "2026-01-01T00:00:00+00:00"}
    same_run = header_markdown(pathspec="F/7/train/3", attempt=1, load_policy="fresh",
                               loaded=card_mod.LoadInfo.from_reference(ref, 0.25))
    assert "**Loaded `mfchckpt`** at task start in 250.0 ms" in same_run
    assert "saved by attempt 0 of this task (`F/7/train/3`), 2.0 KiB" in same_run
    earlier = header_markdown(pathspec="F/9/train/4", attempt=0, load_policy="eager",
                              loaded=card_mod.LoadInfo.from_reference(ref, 1.5))
    assert "saved by run 7, attempt 0" in earlier and "1.50 s" in earlier


def test_timeline_marks_each_save_and_its_end() -> None:
    hs = [handle("a", S.UPLOADING, S.COMMITTED, saved_at=101.0), handle("b", saved_at=102.0)]
    hs[0].stats.finished_at = 103.5
    spec = timeline_spec(save_rows(hs, started_at=100.0), now_s=4.0)
    spans, marks = spec["layer"][0]["data"]["values"], spec["layer"][1]["data"]["values"]
    assert spans == [{"save": 1, "name": "a", "state": "committed", "from": 1.0, "to": 3.5},
                     {"save": 2, "name": "b", "state": "pending", "from": 2.0, "to": 4.0}]
    assert [(m["save"], m["event"], m["t"]) for m in marks] == [
        (1, "save() called", 1.0), (2, "save() called", 2.0), (1, "finished", 3.5)]
    json.dumps(spec)  # the card serialises it as JSON


# -- the live card, against a stand-in for current.card --------------------------------

class FakeCard:
    """Records what the card machinery would be asked to do."""

    def __init__(self) -> None:
        self.parts: dict[str, Any] = {}
        self.refreshes: list[str] = []
        self.refreshed = threading.Event()

    def append(self, component: Any, id: str) -> None:
        self.parts[id] = component

    def refresh(self) -> None:
        self.refreshes.append(self.parts[f"{CARD_ID}-summary"]._text)
        self.refreshed.set()


@pytest.fixture
def fake_card() -> Iterator[FakeCard]:
    from metaflow import current

    fake = FakeCard()
    had = "card" in type(current).__dict__
    old = type(current).__dict__.get("card")
    current._update_env({"card": {CARD_ID: fake}})
    yield fake
    if had:
        type(current).card = old  # type: ignore[attr-defined]
    else:
        delattr(type(current), "card")


def test_live_card_refreshes_while_running_and_finishes_at_once(fake_card: FakeCard) -> None:
    hs = [handle("a", S.UPLOADING)]
    logged: list[str] = []
    card = CheckpointCard(handles=lambda: tuple(hs), started_at=time.time(), pathspec="F/1/s/2",
                          attempt=0, load_policy="fresh", interval=0.05, tick=0.05,
                          log=logged.append)
    card.loaded(None, 0.0)
    card.start()
    assert set(fake_card.parts) == {f"{CARD_ID}-{k}"
                                    for k in ("header", "summary", "saves", "timeline")}
    assert fake_card.refreshed.wait(10), "the refresher never refreshed"
    assert "1 uploading" in fake_card.refreshes[0] and "_Live" in fake_card.refreshes[0]
    hs[0]._transition(S.COMMITTED)
    t0 = time.perf_counter()
    card.finish(task_ok=True)
    took = time.perf_counter() - t0
    assert took < 0.1, f"finish() took {took:.3f}s"
    n = len(fake_card.refreshes)
    summary = fake_card.parts[f"{CARD_ID}-summary"]._text
    assert "1 committed" in summary and "_Final" in summary
    assert "| a | committed |" in fake_card.parts[f"{CARD_ID}-saves"]._text
    card.finish(task_ok=True)  # idempotent
    assert len(fake_card.refreshes) == n  # Metaflow renders the final card itself
    assert not logged


def test_a_failed_task_refreshes_its_card_once_more(fake_card: FakeCard) -> None:
    card = CheckpointCard(handles=lambda: (), started_at=time.time(), pathspec="F/1/s/2",
                          attempt=0, load_policy="none", interval=60, tick=60)
    card.start()
    card.finish(task_ok=False, reason="ValueError: bad batch")
    assert len(fake_card.refreshes) == 1
    assert "**This attempt failed**" in fake_card.refreshes[0]
    assert "ValueError: bad batch" in fake_card.refreshes[0]
    assert "_Final" not in fake_card.refreshes[0]


def test_the_timeline_has_one_tick_per_save() -> None:
    rows = save_rows([handle(n, saved_at=100.0 + i) for i, n in enumerate("abc")],
                     started_at=100.0)
    spec = timeline_spec(rows, now_s=10.0)
    y = spec["layer"][0]["encoding"]["y"]
    assert y["axis"]["values"] == [1, 2, 3] and y["scale"]["domain"] == [0.5, 3.5]


def test_a_broken_card_never_breaks_the_task(fake_card: FakeCard) -> None:
    def broken() -> tuple[CheckpointHandle, ...]:
        raise RuntimeError("no handles")

    logged: list[str] = []
    card = CheckpointCard(handles=broken, started_at=0, pathspec="F/1/s/2", attempt=0,
                          load_policy="fresh", log=logged.append)
    card.start()
    card.finish(task_ok=True)
    assert len(logged) == 1 and "could not be updated" in logged[0]


# -- the card a user sees -----------------------------------------------------------------

@pytest.fixture
def card_env(flow_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    # As users run it: the datastore in the working directory's .metaflow. Metaflow writes
    # local cards under the nearest .metaflow above the working directory but reads them
    # from the datastore root, so the two must be the same place.
    return {**flow_env, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path)}


def our_cards(cards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cards if c["id"] == CARD_ID]


def text_of(payload: dict[str, Any], part: str) -> str:
    return str(by_id(payload, f"{CARD_ID}-{part}")["source"])


def check_card_of_four_saves(html: str) -> dict[str, Any]:
    payload = card_payload(html)
    assert "**Started fresh**" in text_of(payload, "header")
    summary = text_of(payload, "summary")
    assert "**4 saves**: 4 committed." in summary and "_Final" in summary
    table = text_of(payload, "saves")
    for name, size in (("epoch0", "1.0 MiB"), ("epoch1", "2.0 MiB"), ("epoch2", "3.0 MiB"),
                       ("final", "3.0 MiB")):
        assert f"| {name} | committed | 1 | {size.replace(' ', NBSP)} |" in table, table
    chart = by_id(payload, f"{CARD_ID}-timeline")
    assert chart["type"] == "vegaChart"
    spans = chart["spec"]["layer"][0]["data"]["values"]
    assert [s["name"] for s in spans] == ["epoch0", "epoch1", "epoch2", "final"]
    assert all(s["state"] == "committed" and s["to"] >= s["from"] >= 0 for s in spans)
    return payload


@pytest.mark.flow
def test_card_shows_each_save_and_costs_the_end_of_the_task_little(
        run_flow: RunFlow, card_env: dict[str, str], tmp_path: Path) -> None:
    out = run_flow("card_flow.py", env={**card_env, "CARD_FLOW_TIME_FINISH": "1"})
    r = results(out.stdout + out.stderr)
    assert r["loaded"] == "False" and r["final_state"] == "committed"
    # The card's own work at the end of the task: stop refreshing, set the final state.
    assert float(r["card_finish_s"]) <= 0.1, r["card_finish_s"]
    cards = read_cards("CardFlow", "train", env=card_env, cwd=tmp_path)
    assert [(c["id"], c["type"]) for c in cards] == [(CARD_ID, "blank")]
    check_card_of_four_saves(cards[0]["html"])
    # Only the step with @checkpoint has the card.
    assert read_cards("CardFlow", "start", env=card_env, cwd=tmp_path) == []


@pytest.mark.flow
def test_show_card_false_attaches_no_card(run_flow: RunFlow, card_env: dict[str, str],
                                          tmp_path: Path) -> None:
    run_flow("card_flow.py", env={**card_env, "CARD_FLOW_SHOW_CARD": "0"})
    assert read_cards("CardFlow", "train", env=card_env, cwd=tmp_path) == []


@pytest.mark.flow
def test_with_card_keeps_the_users_card_next_to_ours(run_flow: RunFlow,
                                                      card_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    run_flow("card_flow.py", "--with", "card", env=card_env)
    cards = read_cards("CardFlow", "train", env=card_env, cwd=tmp_path)
    assert sorted((c["id"] or "", c["type"]) for c in cards) == [
        ("", "default"), (CARD_ID, "blank")]
    check_card_of_four_saves(our_cards(cards)[0]["html"])
    default = card_payload(next(c["html"] for c in cards if c["id"] is None))
    assert not any(str(c.get("id", "")).startswith(CARD_ID) for c in components(default))
    steps = read_cards("CardFlow", "start", env=card_env, cwd=tmp_path)
    assert [(c["id"], c["type"]) for c in steps] == [(None, "default")]


@pytest.mark.flow
def test_a_users_own_card_keeps_its_components(run_flow: RunFlow, card_env: dict[str, str],
                                               tmp_path: Path) -> None:
    # @card above and below @checkpoint; with and without an id of its own.
    run_flow("usercard_flow.py", env=card_env)
    for step_name, user_id in (("start", None), ("train", "mine")):
        cards = read_cards("UserCardFlow", step_name, env=card_env, cwd=tmp_path)
        assert sorted(c["id"] or "" for c in cards) == sorted([user_id or "", CARD_ID])
        user = card_payload(next(c["html"] for c in cards if c["id"] == user_id))
        texts = [str(c["source"]).strip() for c in components(user) if c["type"] == "markdown"]
        assert texts == [f"user card of {step_name}"]
        ours = card_payload(our_cards(cards)[0]["html"])
        assert "**2 saves**: 2 committed." in text_of(ours, "summary")


@pytest.mark.flow
def test_card_of_a_retry_says_what_it_loaded(run_flow: RunFlow, card_env: dict[str, str],
                                             tmp_path: Path) -> None:
    out = run_flow("card_flow.py", env={**card_env, "CARD_FLOW_FAIL_FIRST": "1"})
    assert results(out.stdout + out.stderr)["loaded"] == "True"
    cards = our_cards(read_cards("CardFlow", "train", env=card_env, cwd=tmp_path))
    # The failed attempt's card is refreshed on a best-effort basis; the retry's is final.
    retry = [c for c in cards if "attempt 1." in text_of(card_payload(c["html"]), "header")]
    assert len(retry) == 1
    header = text_of(card_payload(retry[0]["html"]), "header")
    # A name in inline code is shown as written: no escaping backslash.
    assert "**Loaded `before_crash`** at task start in " in header
    assert "saved by attempt 0 of this task" in header and "1000 B" in header
    assert "_Final, as the task ended successfully" in text_of(
        card_payload(retry[0]["html"]), "summary")
    failed = [c for c in cards if "attempt 0." in text_of(card_payload(c["html"]), "header")]
    print(f"cards of the failed attempt: {len(failed)}")
    # The card of a chosen attempt, the latest by default.
    cli = [sys.executable, str(FLOWS / "card_flow.py"), "checkpoint", "card"]
    latest = subprocess.run([*cli, "train"], env={**card_env, "CARD_FLOW_FAIL_FIRST": "1"},
                            cwd=tmp_path, capture_output=True, text=True, check=True)
    assert ", attempt 1: " in latest.stdout, latest.stdout
    page = latest.stdout.strip().rsplit(": ", 1)[1]
    assert "attempt 1." in text_of(card_payload((tmp_path / page).read_text()), "header")
    chosen = subprocess.run([*cli, "train", "--attempt", "0", "--file", "a0.html"],
                            env={**card_env, "CARD_FLOW_FAIL_FIRST": "1"}, cwd=tmp_path,
                            capture_output=True, text=True)
    if failed:
        assert chosen.returncode == 0, chosen.stderr
        assert "attempt 0." in text_of(card_payload((tmp_path / "a0.html").read_text()),
                                       "header")
    else:
        assert chosen.returncode == 1 and "no checkpoint card of attempt 0" in chosen.stderr
    for c in failed:
        summary = text_of(card_payload(c["html"]), "summary")
        assert "**This attempt failed**" in summary, summary
        assert "RuntimeError: simulated crash after saving" in summary


@pytest.mark.flow
def test_card_refreshes_while_the_task_runs(card_env: dict[str, str], tmp_path: Path) -> None:
    # Trains for up to 60 s, and stops once this test has seen the card refreshed live.
    stop = tmp_path / "stop"
    env = {**card_env, "CARD_FLOW_TRAIN_SECONDS": "60", "CARD_FLOW_STOP_FILE": str(stop)}
    root = tmp_path / ".metaflow" / "mf.cards"
    seen_html = seen_data = ""
    with subprocess.Popen([sys.executable, str(FLOWS / "card_flow.py"), "--no-pylint", "run"],
                          cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True) as p:
        try:
            deadline = time.monotonic() + 120
            # Polls files another process writes, with a deadline; nothing here waits
            # for a fixed time in place of an event.
            while p.poll() is None and time.monotonic() < deadline and not (
                    seen_html and seen_data):
                for f in root.rglob(f"blank-{CARD_ID}-*"):
                    text = f.read_text(errors="replace")
                    if f.suffix == ".html" and "_Live: updated" in json.dumps(
                            card_payload(text)):
                        seen_html = text
                    elif f.name.endswith(".data.json") and "_Live: updated" in text:
                        seen_data = text
                time.sleep(0.1)
            running = p.poll() is None
        finally:
            stop.touch()
            if p.poll() is None:
                p.wait(timeout=120)
    assert running, "the flow ended before its card was refreshed live"
    assert seen_html, "no live render of the card while the task ran"
    assert seen_data, "no live data refresh of the card while the task ran"
    summary = json.loads(seen_data)["data"][f"{CARD_ID}-summary"]["source"]
    assert "saves**" in summary and "_Live: updated" in summary
    assert p.returncode == 0


# -- what a browser shows -----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.flow
@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} is not installed (Debian: apt-get install chromium)")
def test_card_renders_in_a_browser(run_flow: RunFlow, card_env: dict[str, str],
                                   tmp_path: Path) -> None:
    run_flow("card_flow.py", env=card_env)
    cards = our_cards(read_cards("CardFlow", "train", env=card_env, cwd=tmp_path))
    page = tmp_path / "checkpoint_card.html"
    page.write_text(cards[0]["html"])
    png = tmp_path / "checkpoint_card.png"
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--virtual-time-budget=5000", f"--screenshot={png}", "--window-size=1200,1600",
         page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and png.exists(), out.stderr[-2000:]
    print(f"card screenshot: {png}")
    assert png.stat().st_size > 20_000, png.stat().st_size  # a blank page is a few KB
    width, height, colours = png_colours(png)
    assert (width, height) == (1200, 1600)
    assert len(colours) > 100, len(colours)
    # The chart drew its lines: the committed colour is on the page.
    assert bytes.fromhex("2ca02c") in {c[:3] for c in colours}
