"""Registers ``@checkpoint`` and ``@model`` with Metaflow.

Metaflow imports this module for every flow, so it only names the decorator by
string; the implementation is imported when a step actually uses it.
"""

STEP_DECORATORS_DESC = [
    ("checkpoint", ".checkpoint_decorator.CheckpointDecorator"),
    ("model", ".model_decorator.ModelDecorator"),
]

__mf_promote_submodules__: list[str] = []
