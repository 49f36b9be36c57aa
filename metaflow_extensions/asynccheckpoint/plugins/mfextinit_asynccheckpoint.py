"""Registers ``@checkpoint``, ``@model`` and the ``checkpoint`` command with Metaflow.

Metaflow imports this module for every flow, so it only names the decorator and the
command group by string; the implementation is imported when a step actually uses it,
or when ``python flow.py checkpoint ...`` runs.
"""

STEP_DECORATORS_DESC = [
    ("checkpoint", ".checkpoint.decorator.CheckpointDecorator"),
    ("model", ".model.decorator.ModelDecorator"),
]

# `python flow.py checkpoint list|show|download|verify|prune`, next to Metaflow's own
# `card`, `logs` and `tag`: the flow's datastore options and namespace apply to it.
CLIS_DESC = [
    ("checkpoint", ".cli.checkpoint_cli.cli"),
]

__mf_promote_submodules__: list[str] = []
