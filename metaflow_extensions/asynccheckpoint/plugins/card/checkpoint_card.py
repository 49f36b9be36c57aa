"""The checkpoint card: what the task loaded, and where each of its saves stands.

``@checkpoint(show_card=True)`` adds a ``@card(type="blank", id="checkpoint")`` to its
step (unless the step already has a card with that id), so the card exists without the
user writing ``@card``, and next to any card of their own (``--with card``). Its content:

- the checkpoint loaded at task start (or "started fresh");
- a table of the saves of this attempt: name, state, files, size, how much of it was
  unchanged since an earlier checkpoint (so not uploaded), how long ``save()`` blocked,
  upload time and throughput;
- a timeline of saves against commits.

While the task runs, a daemon thread updates the components and calls the card's
``refresh()`` at most once per refresh interval (Metaflow renders in a subprocess, so
this costs the training loop next to nothing). The layout never changes after the first
render, so every later refresh only sends data. At the end of a successful task,
Metaflow renders the final card from the components as the drained engine left them.

Only this module imports Metaflow's card machinery, and only inside functions.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from uploader import CheckpointHandle, CheckpointState

from ..shared.report import duration_text as _duration
from ..shared.report import rate_text as _rate
from ..shared.report import size_text as _size

CARD_ID = "checkpoint"
REFRESH_INTERVAL = 5.0  # seconds; Metaflow's default for realtime cards
TABLE_ROWS = 50  # newest saves shown in the table; the summary counts all of them
CHART_SAVES = 500  # newest saves drawn in the timeline
_TICK = 1.0  # how often the refresher looks for news; refreshes stay rate-limited
_JOIN_TIMEOUT = 0.05  # the end of the task never waits longer for the refresher
NBSP = "\u00a0"  # keeps "20.0 MiB" on one line in a table cell

STATES = ("pending", "uploading", "committed", "superseded", "torn", "failed")
_COLOURS = ("#9e9e9e", "#1f77b4", "#2ca02c", "#bcbd22", "#ff7f0e", "#d62728")

__all__ = ["CARD_ID", "CheckpointCard", "LoadInfo", "SaveRow", "attach", "save_rows"]


# -- attaching ------------------------------------------------------------------------

def attach(decorators: list[Any], card_id: str = CARD_ID) -> float | None:
    """Make sure the step has the card ``card_id``; return its refresh interval.

    Called from ``@checkpoint``'s (and ``@model``'s) ``step_init`` with the step's decorator
    list. The card is added as a non-static decorator, so Metaflow passes it to the task's
    command line like ``--with card:...``; in the task it is then already present and not
    added twice.
    """
    for deco in decorators:
        if getattr(deco, "name", None) == "card" and deco.attributes.get("id") == card_id:
            return float(deco.attributes.get("refresh_interval") or REFRESH_INTERVAL)
    from metaflow.plugins.cards.card_decorator import CardDecorator

    card = CardDecorator(attributes={"type": "blank", "id": card_id,
                                     "refresh_interval": int(REFRESH_INTERVAL)})
    card.external_init()
    decorators.append(card)
    return REFRESH_INTERVAL


# -- what the card shows ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """The checkpoint loaded into the staging directory as the task started."""

    name: str
    pathspec: str  # of the task that saved it
    attempt: int
    created_on: str
    size: int | None
    seconds: float  # how long the load took

    @classmethod
    def from_reference(cls, ref: Mapping[str, Any], seconds: float) -> LoadInfo:
        return cls(name=str(ref.get("name", "")), pathspec=str(ref.get("pathspec", "")),
                   attempt=int(ref.get("attempt", 0)), created_on=str(ref.get("created_on", "")),
                   size=ref.get("size"), seconds=seconds)


@dataclasses.dataclass(frozen=True)
class SaveRow:
    number: int  # 1-based, in save order
    name: str
    checkpoint_id: str
    state: str  # one of STATES
    files: int
    bytes: int
    skipped: int  # bytes unchanged since an earlier checkpoint: pointed at, not uploaded
    blocked_s: float
    upload_s: float | None
    throughput: float | None  # bytes per second
    saved_s: float  # seconds since the task started
    finished_s: float | None
    error: str | None


def save_rows(handles: Sequence[CheckpointHandle], *, started_at: float) -> list[SaveRow]:
    """One row per save, oldest first; a torn save a later commit replaced is "superseded".

    Only a committed save of the same scope and name replaces a torn one, as in the
    engine's drain report: a later "last" never stands in for a torn "best".
    """
    replaced: set[tuple[str, str]] = set()
    superseded: set[int] = set()
    for i in range(len(handles) - 1, -1, -1):
        h = handles[i]
        if h.state is CheckpointState.COMMITTED:
            replaced.add((h.scope, h.name))
        elif h.state is CheckpointState.TORN and (h.scope, h.name) in replaced:
            superseded.add(i)
    rows = []
    for i, h in enumerate(handles):
        s = h.stats
        state = "superseded" if i in superseded else h.state.value
        rows.append(SaveRow(
            number=i + 1, name=h.name, checkpoint_id=h.checkpoint_id, state=state,
            files=s.files, bytes=s.bytes, skipped=s.bytes_skipped, blocked_s=s.blocked_s,
            upload_s=s.upload_s,
            throughput=s.throughput, saved_s=s.saved_at - started_at,
            finished_s=None if s.finished_at is None else s.finished_at - started_at,
            error=None if h.error is None or state == "committed" else str(h.error)))
    return rows


def _md(text: str) -> str:
    # User-chosen names go into Markdown (and tables): keep them literal.
    for ch in "\\`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text


def _code(text: str) -> str:
    """``text`` as inline code: literal there already, so nothing is escaped (a backslash
    would show); only what would end the span, or a table cell, is replaced."""
    return "`" + text.replace("`", "'").replace("|", "\u2502") + "`"


def header_markdown(*, pathspec: str, attempt: int, load_policy: str,
                    loaded: LoadInfo | None) -> str:
    lines = ["# Checkpoints", f"Task `{pathspec}`, attempt {attempt}.", ""]
    if loaded is None:
        why = {"none": "load_policy='none' loads nothing",
               "eager": "no earlier attempt or run of this step committed one"}.get(
            load_policy, "no earlier attempt of this task committed one")
        lines.append(f"**Started fresh**: no checkpoint was loaded ({why}).")
    else:
        run = loaded.pathspec.split("/")[1] if loaded.pathspec.count("/") == 3 else "?"
        this_run = pathspec.split("/")[1] if pathspec.count("/") == 3 else None
        origin = (f"attempt {loaded.attempt} of this task" if run == this_run
                  else f"run {_md(run)}, attempt {loaded.attempt}")
        lines.append(
            f"**Loaded {_code(loaded.name)}** at task start in {_duration(loaded.seconds)}: "
            f"saved by {origin} ({_code(loaded.pathspec)}), {_size(loaded.size)}, "
            f"created {_md(loaded.created_on)}.")
    return "\n".join(lines)


def summary_markdown(rows: Sequence[SaveRow], *, final: bool, now: float,
                     failed: str | None = None) -> str:
    """``failed``: why the attempt failed, once it has (its card is final then)."""
    if not rows:
        text = "No saves yet."
    else:
        counts = [(s, sum(r.state == s for r in rows)) for s in STATES]
        committed = sum(r.bytes for r in rows if r.state == "committed")
        skipped = sum(r.skipped for r in rows if r.state == "committed")
        blocked = [r.blocked_s for r in rows]
        text = (f"**{len(rows)} save{'s' if len(rows) != 1 else ''}**: "
                + ", ".join(f"{n} {s}" for s, n in counts if n)
                + f". {_size(committed)} committed, of which {_size(skipped)} unchanged (not "
                f"uploaded again). save() blocked {_duration(sum(blocked))} "
                f"in all, {_duration(max(blocked))} at most.")
    when = time.strftime("%H:%M:%S", time.localtime(now))
    if failed is not None:
        status = (f"**This attempt failed** ({when}): {_md(failed)}. What it committed is "
                  "what a retry resumes from.")
    elif final:
        status = f"_Final, as the task ended successfully ({when})._"
    else:
        status = f"_Live: updated {when}, every few seconds while the task runs._"
    problems = [f"- **#{r.number} {_code(r.name)} {r.state}**: {_md(r.error)}"
                for r in rows if r.error and r.state in ("torn", "failed")]
    return "\n\n".join([text, *(["\n".join(problems)] if problems else []), status])


def table_markdown(rows: Sequence[SaveRow]) -> str:
    shown = rows[-TABLE_ROWS:]
    lines = ["| # | name | state | files | size | unchanged | save() blocked | upload "
             "| throughput | saved at |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in shown:
        # Only a committed upload moved all its bytes: a torn or failed one stopped early.
        speed = _rate(r.throughput) if r.throughput and r.state == "committed" else "-"
        # Known once the upload has compared each file with the base; never a guess.
        unchanged = _size(r.skipped) if r.state == "committed" else "-"
        cells = [_size(r.bytes), unchanged, _duration(r.blocked_s), _duration(r.upload_s),
                 speed, f"+{r.saved_s:.{2 if r.saved_s < 100 else 0}f} s"]
        size, unchanged, blocked, upload, speed, at = (c.replace(" ", NBSP) for c in cells)
        lines.append(f"| {r.number} | {_md(r.name)} | {r.state} | {r.files} | {size} "
                     f"| {unchanged} | {blocked} | {upload} | {speed} | {at} |")
    if not shown:
        lines.append("| | _no saves yet_ | | | | | | | | |")
    note = (f"\n\nThe newest {TABLE_ROWS} of {len(rows)} saves." if len(rows) > TABLE_ROWS
            else "")
    return "### Saves\n\n" + "\n".join(lines) + note


def gang_markdown(rows: Sequence[tuple[str, str, Mapping[int, str]]], *, size: int,
                  rank: int) -> str:
    """The gang checkpoints of an attempt, newest first: ``(step, name, state by rank)``."""
    lines = [f"### Gang checkpoints (this task is rank {rank} of {size})", "",
             "| step | name | ranks committed | "
             + " | ".join(f"rank {r}" for r in range(size)) + " |",
             "|---|---|---:|" + "---|" * size]
    for step, name, states in rows[:TABLE_ROWS]:
        done = sum(1 for v in states.values() if v == "committed")
        cells = " | ".join(states.get(r, "-") for r in range(size))
        lines.append(f"| {_md(step)} | {_md(name)} | {done}/{len(states)} | {cells} |")
    if not rows:
        lines.append("| | _no gang checkpoint yet_ | |" + " |" * size)
    return "\n".join(lines)


def timeline_spec(rows: Sequence[SaveRow], *, now_s: float) -> dict[str, Any]:
    """A Vega-Lite chart: one line per save from ``save()`` to its final state."""
    shown = rows[-CHART_SAVES:]
    spans = [{"save": r.number, "name": r.name, "state": r.state, "from": round(r.saved_s, 3),
              "to": round(r.finished_s if r.finished_s is not None else max(now_s, r.saved_s),
                          3)} for r in shown]
    marks = [{"save": r.number, "name": r.name, "state": r.state, "event": "save() called",
              "t": round(r.saved_s, 3)} for r in shown]
    marks += [{"save": r.number, "name": r.name, "state": r.state, "event": "finished",
               "t": round(r.finished_s, 3)} for r in shown if r.finished_s is not None]
    x_title = "seconds since the task started"
    colour = {"field": "state", "type": "nominal", "title": "state",
              "scale": {"domain": list(STATES), "range": list(_COLOURS)}}
    first, last = (1, max(1, len(rows))) if not shown else (shown[0].number, shown[-1].number)
    # One tick per save: ticks Vega places by itself fall between saves, and read 1, 1, 2.
    ticks = list(range(first, last + 1, max(1, (last - first) // 10 + 1)))
    y = {"field": "save", "type": "quantitative", "title": "save #",
         "axis": {"values": ticks, "format": "d"},
         "scale": {"domain": [first - 0.5, last + 0.5]}}
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": "Saves and commits",
        "height": 220,
        "layer": [
            {"data": {"values": spans},
             "mark": {"type": "rule", "strokeWidth": 3},
             "encoding": {"x": {"field": "from", "type": "quantitative", "title": x_title},
                          "x2": {"field": "to"}, "y": y, "color": colour}},
            {"data": {"values": marks},
             "mark": {"type": "point", "filled": True, "size": 70},
             "encoding": {
                 "x": {"field": "t", "type": "quantitative", "title": x_title},
                 "y": y, "color": colour,
                 "shape": {"field": "event", "type": "nominal", "title": "mark",
                           "scale": {"domain": ["save() called", "finished"],
                                     "range": ["circle", "diamond"]}},
                 "tooltip": [{"field": "save", "title": "#"}, {"field": "name"},
                             {"field": "event"}, {"field": "state"},
                             {"field": "t", "title": "seconds"}]}},
        ],
    }


# -- the live card ------------------------------------------------------------------------

class CheckpointCard:
    """The card of one task attempt, kept current from the engine's handles.

    ``handles`` returns every save of the attempt so far (it is called from the refresher
    thread, so it must be thread-safe, as ``Engine.handles`` is). Nothing here ever fails
    the task: a card that cannot be drawn is reported once and left alone.
    """

    def __init__(self, *, handles: Callable[[], Sequence[CheckpointHandle]], started_at: float,
                 pathspec: str, attempt: int, load_policy: str,
                 interval: float = REFRESH_INTERVAL, tick: float = _TICK,
                 log: Callable[[str], None] | None = None,
                 gang: Callable[[], str] | None = None) -> None:
        """``gang``, in a ``@parallel`` step: Markdown of the gang checkpoints of the
        attempt, with the state of each rank's part (read from the store)."""
        self._handles = handles
        self._gang = gang
        self._started_at = started_at
        self._pathspec, self._attempt, self._load_policy = pathspec, attempt, load_policy
        self._tick = tick
        self._interval = max(float(interval), tick)
        self._log = log
        self._loaded: LoadInfo | None = None
        self._card: Any = None
        self._parts: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()  # a forked child has no refresher and must not render
        self._failed = False
        self._finished = False

    def loaded(self, ref: Mapping[str, Any] | None, seconds: float) -> None:
        self._loaded = None if ref is None else LoadInfo.from_reference(ref, seconds)

    def start(self) -> None:
        """Put the components on the card and start refreshing it; needs ``current.card``."""
        try:
            from metaflow import current
            from metaflow.cards import Markdown, VegaChart

            card = current.card[CARD_ID] if hasattr(current, "card") else None
            if card is None or not hasattr(card, "refresh"):
                return  # the step has no such card (e.g. it was run without it)
            rows = self._rows()
            now = time.time()
            parts = {
                "header": Markdown(self._header()),
                "summary": Markdown(summary_markdown(rows, final=False, now=now)),
                "saves": Markdown(table_markdown(rows)),
                "timeline": VegaChart(timeline_spec(rows, now_s=now - self._started_at)),
            }
            if self._gang is not None:
                parts["gang"] = Markdown(self._gang())
            for key, component in parts.items():
                card.append(component, id=f"{CARD_ID}-{key}")
            self._card, self._parts = card, parts
            self._thread = threading.Thread(target=self._run, name="checkpoint-card",
                                            daemon=True)
            self._thread.start()
        except Exception as e:
            self._report(e)

    def finish(self, *, task_ok: bool, reason: str | None = None) -> None:
        """Stop refreshing and leave the components in their final state.

        Called once the uploads are drained. On success Metaflow renders the card right
        after; on failure it does not, so the card is refreshed one last time (rate
        limits allowing), without waiting for that render, and says that the attempt
        failed and ``reason``.
        """
        if self._finished or os.getpid() != self._pid:
            return
        self._finished = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_JOIN_TIMEOUT)
        if self._card is None:
            return
        try:
            self._update(final=True, failed=None if task_ok else (
                reason or "the step did not finish"))
            if not task_ok:
                self._card.refresh()
        except Exception as e:
            self._report(e)

    # -- internals ----------------------------------------------------------------

    def _header(self) -> str:
        return header_markdown(pathspec=self._pathspec, attempt=self._attempt,
                               load_policy=self._load_policy, loaded=self._loaded)

    def _rows(self) -> list[SaveRow]:
        return save_rows(self._handles(), started_at=self._started_at)

    def _update(self, *, final: bool, failed: str | None = None) -> list[SaveRow]:
        rows = self._rows()
        now = time.time()
        with self._lock:
            self._parts["summary"].update(summary_markdown(rows, final=final, now=now,
                                                           failed=failed))
            self._parts["saves"].update(table_markdown(rows))
            self._parts["timeline"].update(timeline_spec(rows, now_s=now - self._started_at))
        if "gang" in self._parts and self._gang is not None:
            text = self._gang()  # reads the store: not under the lock
            with self._lock:
                self._parts["gang"].update(text)
        return rows

    def _run(self) -> None:
        last: tuple[tuple[str, str], ...] | None = None
        last_refresh = float("-inf")
        # A wait on the stop event, not a sleep: finish() ends the loop at once.
        while not self._stop.wait(self._tick):
            if time.monotonic() - last_refresh < self._interval:
                continue  # Metaflow would drop a refresh this soon anyway
            try:
                rows = self._rows()
                seen = tuple((r.checkpoint_id, r.state) for r in rows)
                moving = any(r.state in ("pending", "uploading") for r in rows)
                if seen == last and not moving and last is not None:
                    continue
                rows = self._update(final=False)
                if self._stop.is_set():
                    return  # the final state is finish()'s to draw
                self._card.refresh()
                last = tuple((r.checkpoint_id, r.state) for r in rows)
                last_refresh = time.monotonic()
            except Exception as e:
                self._report(e)
                return

    def _report(self, e: Exception) -> None:
        if not self._failed and self._log is not None:
            self._log(f"note: the checkpoint card could not be updated "
                      f"({type(e).__name__}: {e}); checkpoints are not affected.")
        self._failed = True
