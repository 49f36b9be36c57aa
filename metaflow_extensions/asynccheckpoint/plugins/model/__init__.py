"""The `@model` face: the decorator, `current.model`, `load_model()` and the model card.

Built on the checkpoint face and the shared layer; only the registration (by name) and
the top-level names import it.
"""
