"""``python flow.py checkpoint card``: the checkpoint card of one attempt of a task.

Every attempt of a task renders its own card, and Metaflow's ``card view <step>`` cannot
tell them apart (it asks for a hash). Each of our cards says which attempt it belongs to
in its header, so this command picks the latest attempt's card, or the one asked for.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from ..shared.exceptions import CheckpointException

CARD_ID = "checkpoint"
_DATA = re.compile(r'window\.__MF_DATA__\["[^"]+"\] = "([A-Za-z0-9+/=]+)"')
_ATTEMPT = re.compile(r"Task `[^`]*`, attempt ([0-9]+)\.")


def attempt_of(html: str) -> int | None:
    """The attempt a checkpoint card's page belongs to, from its header."""
    m = _DATA.search(html)
    if m is None:
        return None
    try:
        text = json.dumps(json.loads(base64.b64decode(m.group(1))))
    except ValueError:
        return None
    found = _ATTEMPT.search(text.replace('\\"', '"'))
    return None if found is None else int(found.group(1))


def _task(flow: str, pathspec: str) -> Any:
    from metaflow import Flow, Step, Task
    from metaflow.exception import MetaflowNotFound

    parts = pathspec.split("/")
    if parts[0] == flow:
        parts = parts[1:]
    try:
        if len(parts) == 3:
            return Task("/".join([flow, *parts]), _namespace_check=False)
        if len(parts) == 2:
            step = Step("/".join([flow, *parts]), _namespace_check=False)
        elif len(parts) == 1:
            step = Flow(flow).latest_run[parts[0]]
        else:
            raise CheckpointException(f"{pathspec!r} is not STEP, RUN/STEP or RUN/STEP/TASK.")
    except MetaflowNotFound as e:
        raise CheckpointException(f"no such step or task {pathspec!r} of {flow}: {e}") from e
    tasks = list(step)
    if len(tasks) != 1:
        raise CheckpointException(
            f"{step.pathspec} has {len(tasks)} tasks (a foreach): name one as RUN/STEP/TASK, "
            f"e.g. {tasks[0].pathspec.split('/', 1)[1] if tasks else 'RUN/STEP/TASK'}.")
    return tasks[0]


def card_html(flow: str, pathspec: str, attempt: int | None) -> tuple[str, int, str]:
    """The HTML of a task's checkpoint card of ``attempt`` (None: its latest attempt
    that has one), that attempt, and the task's pathspec."""
    from metaflow.cards import get_cards

    task = _task(flow, pathspec)
    pages = {}
    for card in get_cards(task, id=CARD_ID):
        html = card.get()
        n = attempt_of(html)
        if n is not None:
            pages[n] = html
    if not pages:
        raise CheckpointException(f"{task.pathspec} has no checkpoint card.")
    if attempt is None:
        attempt = max(pages)
    if attempt not in pages:
        raise CheckpointException(
            f"{task.pathspec} has no checkpoint card of attempt {attempt}; it has "
            f"{', '.join(str(a) for a in sorted(pages))}.")
    return pages[attempt], attempt, task.pathspec
