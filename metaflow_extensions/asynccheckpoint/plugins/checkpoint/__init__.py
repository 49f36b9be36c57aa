"""The `@checkpoint` face: the decorator, `current.checkpoint` and the `Checkpoint` API.

Imports the shared layer and the card; nothing imports it but the model face and the
registration (by name).
"""
