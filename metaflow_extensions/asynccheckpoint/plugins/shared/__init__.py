"""What every face shares: stores and their settings, reading, the task lifecycle,
preemption, references, the exceptions, the reader of `metaflow-checkpoint`'s layout.

Imports no face.
"""
