"""``@model``: a step decorator that gives the step ``current.model``."""

from __future__ import annotations

import time
from typing import Any

from ..shared.exceptions import CheckpointConfigException
from ..shared.lifecycle import DrainingDecorator


def _from_command_line(value: Any) -> Any:
    # A decorator added with ``--with model:...`` reaches the task as strings.
    if not isinstance(value, str):
        return value
    if value in ("None", "True", "False") or value.startswith(("[", "(")):
        import ast

        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def parse_load(load: Any, where: str) -> list[tuple[str, str | None]]:
    """``@model(load=...)`` as ``(artifact name, path or None)`` pairs.

    As in ``metaflow-checkpoint``: a name, a list of names, or a list of
    ``(name, path)`` tuples (a path of None: a temporary directory).
    """
    if load is None:
        return []
    items = [load] if isinstance(load, str) else load
    if not isinstance(items, list | tuple):
        raise CheckpointConfigException(
            f"{where}: load={load!r} must be an artifact name, a list of names, or a list "
            "of (name, path) tuples.")
    out: list[tuple[str, str | None]] = []
    for item in items:
        if isinstance(item, str) and item:
            out.append((item, None))
        elif (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)
              and item[0] and (item[1] is None or isinstance(item[1], str))):
            out.append((item[0], item[1]))
        else:
            raise CheckpointConfigException(
                f"{where}: load=[..., {item!r}, ...]: each entry must be an artifact name or "
                "a (name, path) tuple, the path a string or None.")
    return out


class ModelDecorator(DrainingDecorator):
    """
    Saves and loads models in a step; the uploads do not block it.

    Parameters
    ----------
    load : str or list, optional, default None
        Artifacts holding references (from ``current.model.save()``,
        ``current.checkpoint.save()``, or ``metaflow-checkpoint``'s) to load before the
        step runs: a name, a list of names, or a list of ``(name, path)`` tuples. Each is
        then at ``current.model.loaded[name]``.
    best_effort_load : bool, default False
        Go on without a reference that is missing or cannot be loaded (its
        ``current.model.loaded[name]`` is None), with a warning, instead of failing.
    temp_dir_root : str, optional, default None
        Where the directories models are loaded into are created.

    MF Add To Current
    -----------------
    model -> CurrentModel
        ``save(path, label, metadata)``, ``load(reference, path)``, ``loaded``, ``wait()``.
    """

    name = "model"
    _label = "@model"
    defaults: dict[str, Any] = {"load": None, "best_effort_load": False, "temp_dir_root": None}

    def step_init(self, flow, graph, step_name, decorators, environment, flow_datastore,
                  logger):  # type: ignore[no-untyped-def]
        from ..shared.storage import SUPPORTED_DATASTORES, engine_settings

        where = f"@model on step '{step_name}'"
        self._where = where
        for name in self.defaults:
            self.attributes[name] = _from_command_line(self.attributes[name])
        self._load = parse_load(self.attributes["load"], where)
        best = self.attributes["best_effort_load"]
        if not isinstance(best, bool):
            raise CheckpointConfigException(
                f"{where}: best_effort_load={best!r} must be True or False.")
        root = self.attributes["temp_dir_root"]
        if root is not None and not isinstance(root, str):
            raise CheckpointConfigException(
                f"{where}: temp_dir_root={root!r} must be a directory path (str) or None.")
        if flow_datastore.TYPE not in SUPPORTED_DATASTORES:
            raise CheckpointConfigException(
                f"{where}: the {flow_datastore.TYPE!r} datastore is not supported; use "
                f"{' or '.join(SUPPORTED_DATASTORES)}.")
        self._settings = engine_settings()
        self._flow_datastore = flow_datastore
        from ..card.checkpoint_card import attach
        from .card import CARD_ID

        attach(decorators, card_id=CARD_ID)
        self._current: Any = None
        self._card: Any = None

    def task_pre_step(self, step_name, task_datastore, metadata, run_id, task_id, flow, graph,
                      retry_count, max_user_code_retries, ubf_context,
                      inputs):  # type: ignore[no-untyped-def]
        import json

        from metaflow import current
        from metaflow.metadata_provider import MetaDatum

        from uploader import MODELS_PREFIX, Scope

        from ..checkpoint.current import CurrentCheckpoint, TaskIdentity
        from ..checkpoint.decorator import _foreach_tokens
        from .card import ModelCard, models_markdown
        from .current import CurrentModel, _log

        started = time.time()
        namespace = current.namespace or f"user:{current.username}"
        scope = Scope(flow.name, namespace, step_name, _foreach_tokens(flow), root=MODELS_PREFIX)
        identity = TaskIdentity(flow=flow.name, run_id=str(run_id), step=step_name,
                                task_id=str(task_id), attempt=int(retry_count),
                                namespace=namespace)
        store = CurrentCheckpoint(
            identity=identity, scope=scope, settings=self._settings,
            datastore=self._flow_datastore.TYPE,
            datastore_root=self._flow_datastore.datastore_root,
            temp_dir_root=self.attributes["temp_dir_root"], log=_log, noun="model")
        model = CurrentModel(checkpoints=store, default_label=f"{flow.name}_{step_name}",
                             temp_dir_root=self.attributes["temp_dir_root"])
        self._current = model
        self._finished = False
        current._update_env({"model": model})

        def render() -> str:
            return models_markdown(pathspec=identity.pathspec, loaded=dict(model.loaded),
                                   info=model.loaded.info, saved=store._handles(),
                                   started_at=started)

        self._card = ModelCard(render=render, log=_log)
        # Preemption: commit the models saved so far within the grace period, as
        # @checkpoint does for checkpoints (with both, each handler drains its own).
        self._install_sigterm_handler(store, self._settings.sigterm_grace, _log)
        model._load_named(flow, self._load, best_effort=self.attributes["best_effort_load"],
                          where=self._where)
        # The keys of what was loaded, and at the end of what was saved, as task metadata
        # under the fields and type metaflow-checkpoint registers them with.
        self._register = lambda field, keys: metadata.register_metadata(
            run_id, step_name, task_id, [MetaDatum(
                field=field, value=json.dumps({"keys": keys}), type="model-registry",
                tags=[f"attempt_id:{retry_count}"])]) if keys else None
        self._register("loaded-models", [str(r.get("key")) for r in model.loaded.info.values()])

    def _after_success(self) -> None:
        self._register("saved-models", [str(r["key"]) for r in self._current.saved])
