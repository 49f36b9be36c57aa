"""``@checkpoint``: a step decorator that gives the step ``current.checkpoint``."""

from __future__ import annotations

import time
from typing import Any

from ..shared.exceptions import CheckpointConfigException
from ..shared.lifecycle import DrainingDecorator

LOAD_POLICIES = ("fresh", "eager", "none")


# The foreach variable Metaflow gives a @parallel step: its frame's index is the rank.
_PARALLEL_VAR = "_parallel_ubf_iter"


def _foreach_tokens(flow: Any) -> tuple[str, ...]:
    """This task's foreach branch, one token per level: by value, else by index.

    A branch matches a branch of an earlier run with the same values (the n-th
    occurrence of a value matching the n-th), so neither a reordered list nor duplicate
    values hand a branch another branch's checkpoints. The ranks of a ``@parallel`` step
    share their step's scope (their parts make gang checkpoints, see :func:`_gang`), and
    an unbounded foreach has no list to read values from: it is matched by index.
    """
    from uploader import foreach_token

    tokens = []
    for frame in getattr(flow, "_foreach_stack", None) or []:
        index = int(frame.index)
        if frame.var == _PARALLEL_VAR:
            continue
        if getattr(frame, "num_splits", 0) is None:
            # Unbounded: its iterator answers every index (Metaflow's ParallelUBF never
            # raises IndexError), so list() on it would never end.
            tokens.append(f"i{index}")
            continue
        try:
            values = list(getattr(flow, frame.var))
            token, by_index = foreach_token(values, index)
        except (AttributeError, TypeError, IndexError):
            token, by_index = f"i{index}", True
        if by_index:
            from .current import _log

            _log(f"note: the value of foreach branch {index} over '{frame.var}' has no stable "
                 "fingerprint (only JSON-like values do), so its checkpoints are matched to "
                 "earlier runs by index: reordering that list between runs mixes branches up.")
        tokens.append(token)
    return tuple(tokens)


# A run tagged `checkpoint:<name>` (`run --tag checkpoint:expA`) keeps its checkpoints in
# a scope of that name instead of its namespace's, as metaflow-checkpoint does: runs of one
# experiment resume from each other (`eager`), never from another experiment's.
TAG_PREFIX = "checkpoint:"


def _scope_namespace(namespace: str, log: Any) -> str:
    from metaflow import current

    tags = sorted(t for t in getattr(current, "tags", None) or () if t.startswith(TAG_PREFIX))
    if not tags:
        return namespace
    if len(tags) > 1:
        log(f"note: the run has {len(tags)} '{TAG_PREFIX}' tags ({', '.join(tags)}); its "
            f"checkpoints are scoped by the first, {tags[0]!r}.")
    log(f"Checkpoints of this run are scoped by its tag {tags[0]!r}, not by the namespace "
        f"{namespace!r}: only runs with that tag share them.")
    return tags[0]


def _gang(flow: Any, ubf_context: Any, task_id: str) -> Any:
    """This task's place in its ``@parallel`` gang, or None outside one.

    Read from the step's foreach frame and its ``num_parallel``, not from the
    ``MF_PARALLEL_*`` variables, which the compute decorators may set only after this
    decorator's ``task_pre_step``. The gang is named by its control task: the task itself
    on the control task, ``MF_PARALLEL_CONTROL_TASK_ID`` on the workers (set when they
    are launched, locally and on Kubernetes and Batch).
    """
    import os

    from metaflow.unbounded_foreach import UBF_CONTROL

    from uploader.gang import GangMember

    frames = [f for f in getattr(flow, "_foreach_stack", None) or []
              if f.var == _PARALLEL_VAR]
    ubf = getattr(flow, _PARALLEL_VAR, None)
    if not frames or ubf is None:
        return None
    control = str(task_id) if ubf_context == UBF_CONTROL else os.environ.get(
        "MF_PARALLEL_CONTROL_TASK_ID") or str(task_id).split("_node_")[0]
    size = int(ubf.num_parallel)
    return GangMember(control, int(frames[-1].index or 0), size) if size > 1 else None


def _legacy_identifier(flow: Any, step_name: str) -> str | None:
    """The task identifier ``metaflow-checkpoint`` gives this task (see :mod:`..shared.legacy`)."""
    from ..shared.legacy import task_identifier

    if getattr(flow, "index", None) is None:
        return task_identifier(step_name, None)
    try:
        values = [frame[2] for frame in flow.foreach_stack()]
    except Exception:
        return None
    return task_identifier(step_name, values)


class CheckpointDecorator(DrainingDecorator):
    """
    Saves checkpoints of a step without blocking it, and resumes from them on retry.

    Parameters
    ----------
    load_policy : str, default "fresh"
        What is loaded into ``current.checkpoint.directory`` when the task starts:
        "fresh": the latest checkpoint of earlier attempts of this task;
        "eager": that, else the latest of earlier runs of this step and foreach branch
        in the current namespace; "none": nothing.
    temp_dir_root : str, optional, default None
        Where the staging directory (and the snapshots taken from it) are created.
    show_card : bool, default True
        Add a card (id "checkpoint") showing the checkpoint loaded at task start and
        each save's state, size and timings, refreshed while the task runs. It sits
        next to any card of the step's own (``--with card``). False adds nothing.
    keep_last : int, optional, default None
        Retention: keep the N newest committed checkpoints of the task (all attempts)
        and delete older ones, in the background after each commit. The newest, and the
        one loaded at task start, are never deleted. None keeps every checkpoint
        (``METAFLOW_CHECKPOINT_KEEP_LAST`` sets it for every step).
    keep_best : int, optional, default None
        Retention: also keep the M best checkpoints by ``metadata[best_metric]``.
    best_metric : str, optional, default None
        The metadata key (passed to ``save(metadata=...)``) that ``keep_best`` ranks by;
        checkpoints without it, or with a value that is not a number, are not ranked.
    best_mode : str, default "min"
        "min" (lower is better, a loss) or "max" (an accuracy).

    MF Add To Current
    -----------------
    checkpoint -> CurrentCheckpoint
        ``directory``, ``is_loaded``, ``info``, ``save()``, ``wait()``, ``list()``, ``load()``.
    """

    name = "checkpoint"
    _label = "@checkpoint"
    # best_mode is None here so that METAFLOW_CHECKPOINT_BEST_MODE can apply; unset is "min".
    defaults: dict[str, Any] = {"load_policy": "fresh", "temp_dir_root": None, "show_card": True,
                                "keep_last": None, "keep_best": None, "best_metric": None,
                                "best_mode": None}

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore,
                  logger):  # type: ignore[no-untyped-def]
        from ..shared.storage import SUPPORTED_DATASTORES, engine_settings, retention_settings

        where = f"@checkpoint on step '{step_name}'"
        policy = self.attributes["load_policy"]
        if policy is None:
            policy = "fresh"
        if policy not in LOAD_POLICIES:
            raise CheckpointConfigException(
                f"{where}: load_policy={policy!r} is not supported. "
                f"Use one of: {', '.join(repr(p) for p in LOAD_POLICIES)}.")
        self._load_policy = policy
        show_card = self.attributes["show_card"]
        if not isinstance(show_card, bool):
            raise CheckpointConfigException(
                f"{where}: show_card={show_card!r} must be True or False.")
        self._card_interval: float | None = None
        if show_card:
            from ..card.checkpoint_card import attach

            self._card_interval = attach(decorators)
        self._card: Any = None
        root = self.attributes["temp_dir_root"]
        if root is not None and not isinstance(root, str):
            raise CheckpointConfigException(
                f"{where}: temp_dir_root={root!r} must be a directory path (str) or None.")
        self._settings = engine_settings()
        self._retention, self._debris_grace = retention_settings(self.attributes, where)
        if flow_datastore.TYPE not in SUPPORTED_DATASTORES:
            raise CheckpointConfigException(
                f"{where}: the {flow_datastore.TYPE!r} datastore is not supported; use "
                f"{' or '.join(SUPPORTED_DATASTORES)}.")
        self._flow_datastore = flow_datastore
        self._current: Any = None

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                      retry_count, max_user_code_retries, ubf_context,
                      inputs):  # type: ignore[no-untyped-def]
        from metaflow import current
        from metaflow.metadata_provider import MetaDatum

        from uploader import Scope

        from .current import CurrentCheckpoint, TaskIdentity, _log

        namespace = current.namespace or f"user:{current.username}"
        scope = Scope(flow.name, _scope_namespace(namespace, _log), step_name,
                      _foreach_tokens(flow))
        identity = TaskIdentity(flow=flow.name, run_id=str(run_id), step=step_name,
                                task_id=str(task_id), attempt=int(retry_count),
                                namespace=namespace,
                                gang=_gang(flow, ubf_context, str(task_id)))
        self._current = CurrentCheckpoint(
            identity=identity, scope=scope, settings=self._settings,
            datastore=self._flow_datastore.TYPE,
            datastore_root=self._flow_datastore.datastore_root,
            temp_dir_root=self.attributes["temp_dir_root"],
            retention=(self._retention, self._debris_grace),
            origin_run_id=getattr(current, "origin_run_id", None))
        current._update_env({"checkpoint": self._current})
        metadata.register_metadata(run_id, step_name, task_id, [MetaDatum(
            field="checkpoint-scope", value=scope.prefix, type="checkpoint-scope",
            tags=[f"attempt_id:{retry_count}"])])
        self._finished = False
        self._install_sigterm_handler(self._current, self._settings.sigterm_grace, _log)
        started = time.time()
        self._current._load_on_start(self._load_policy,
                                     legacy_identifier=_legacy_identifier(flow, step_name))
        self._current._start_retention()
        # Processes the step starts (torchrun workers, subprocesses) save for this task.
        import os

        from .api import ENV_TASK

        self._previous_env = os.environ.get(ENV_TASK)
        os.environ[ENV_TASK] = self._current.environment()
        if self._card_interval is not None:
            from ..card.checkpoint_card import CheckpointCard

            self._card = CheckpointCard(
                handles=self._current._handles, started_at=started,
                pathspec=identity.pathspec, attempt=identity.attempt,
                load_policy=self._load_policy, interval=self._card_interval, log=_log,
                gang=None if identity.gang is None else self._current._gang_card)
            self._card.loaded(self._current.info, time.time() - started)

    def _released(self) -> None:
        import os

        from .api import ENV_TASK

        if getattr(self, "_previous_env", None) is None:
            os.environ.pop(ENV_TASK, None)
        else:
            os.environ[ENV_TASK] = self._previous_env
