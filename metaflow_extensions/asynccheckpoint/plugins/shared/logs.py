"""What a task prints about its checkpoints, and how much of it: ``METAFLOW_CHECKPOINT_LOG_LEVEL``.

Every line goes to stderr, prefixed ``[@checkpoint]``. A line starting ``WARNING`` or
``ERROR`` is always printed; one starting ``debug:`` only at ``debug``; any other (a commit,
a note, the drain's progress) at ``info`` and ``debug``:

- ``quiet``: warnings and errors only;
- ``info`` (the default): one short line per commit, notes, the drain's progress;
- ``debug``: also each commit's full figures (files, unchanged bytes, rate, time save()
  blocked).
"""

from __future__ import annotations

import sys

from .exceptions import CheckpointConfigException

__all__ = ["LOG_LEVELS", "is_debug", "log_level", "say"]

LOG_LEVELS = ("quiet", "info", "debug")
_VARIABLE = "METAFLOW_CHECKPOINT_LOG_LEVEL"


def log_level() -> str:
    """The configured level; raises :class:`CheckpointConfigException` naming the variable
    for any other value."""
    from metaflow import metaflow_config

    raw = getattr(metaflow_config, "CHECKPOINT_LOG_LEVEL", None)
    level = (raw or "info").strip().lower()
    if level not in LOG_LEVELS:
        raise CheckpointConfigException(
            f"{_VARIABLE}={raw!r} is not a log level: use one of {', '.join(LOG_LEVELS)} "
            "(warnings and errors are printed at every level).")
    return level


def _level_or_info() -> str:
    try:
        return log_level()
    except CheckpointConfigException:
        return "info"  # a step refuses a bad value as it starts; a log line never raises


def is_debug() -> bool:
    return _level_or_info() == "debug"


def say(message: str) -> None:
    """Print ``message`` if the level lets it through."""
    if not message.startswith(("WARNING", "ERROR")):
        level = _level_or_info()
        if level == "quiet" or (message.startswith("debug:") and level != "debug"):
            return
    print(f"[@checkpoint] {message}", file=sys.stderr, flush=True)
