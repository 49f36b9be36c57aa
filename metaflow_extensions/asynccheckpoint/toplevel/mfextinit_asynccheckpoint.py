"""Names this extension adds to ``metaflow`` itself (``from metaflow import Checkpoint``)."""

toplevel = "toplevel"
