"""The model card (id ``model``): the models a ``@model`` step loaded and saved.

Drawn when the step starts (what was loaded) and once more when its uploads are drained
(each save with its state and size), from the same handles the checkpoint card reads.
Like that card, nothing here ever fails the task.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from uploader import CheckpointHandle

from ..card.checkpoint_card import NBSP, _md, _size, save_rows

CARD_ID = "model"

__all__ = ["CARD_ID", "ModelCard", "models_markdown"]


def models_markdown(*, pathspec: str, loaded: Mapping[str, str | None],
                    info: Mapping[str, Mapping[str, Any]],
                    saved: Sequence[CheckpointHandle], started_at: float) -> str:
    lines = ["# Models", f"Task `{pathspec}`.", "", "### Loaded", ""]
    if not loaded:
        lines.append("_None._")
    else:
        lines += ["| name | type | from | size | path |", "|---|---|---|---:|---|"]
        for name, path in loaded.items():
            ref = info.get(name, {})
            origin = str(ref.get("pathspec", ""))
            if ref.get("source") == "metaflow-checkpoint":
                origin += " (metaflow-checkpoint)"
            size = _size(ref.get("size")).replace(" ", NBSP)
            where = f"`{_md(path)}`" if path else "**not loaded** (best effort)"
            lines.append(f"| {_md(name)} | {_md(str(ref.get('type', '?')))} | {_md(origin)} "
                         f"| {size} | {where} |")
    lines += ["", "### Saved", ""]
    rows = save_rows(saved, started_at=started_at)
    if not rows:
        lines.append("_None._")
    else:
        lines += ["| # | label | state | files | size |", "|---:|---|---|---:|---:|"]
        for r in rows:
            lines.append(f"| {r.number} | {_md(r.name)} | {r.state} | {r.files} "
                         f"| {_size(r.bytes).replace(' ', NBSP)} |")
    return "\n".join(lines)


class ModelCard:
    def __init__(self, *, render: Callable[[], str], log: Callable[[str], None]) -> None:
        self._render, self._log = render, log
        self._part: Any = None
        self._card: Any = None

    def start(self) -> None:
        try:
            from metaflow import current
            from metaflow.cards import Markdown

            card = current.card[CARD_ID] if hasattr(current, "card") else None
            if card is None or not hasattr(card, "refresh"):
                return
            self._part = Markdown(self._render())
            card.append(self._part, id=f"{CARD_ID}-models")
            self._card = card
        except Exception as e:
            self._report(e)

    def finish(self, *, task_ok: bool, reason: str | None = None) -> None:
        if self._part is None:
            return
        try:
            self._part.update(self._render())
            if not task_ok:
                self._card.refresh()
        except Exception as e:
            self._report(e)
        self._part = None

    def _report(self, e: Exception) -> None:
        self._log(f"note: the model card could not be drawn ({type(e).__name__}: {e}); "
                  "models are not affected.")
