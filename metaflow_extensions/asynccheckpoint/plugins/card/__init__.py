"""The checkpoint card: rendered live in a task, and found again for `checkpoint card`.

Imports only the shared layer.
"""
