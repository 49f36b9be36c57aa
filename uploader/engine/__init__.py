"""The engine: snapshot in the caller's thread, upload on one background event loop.

:class:`Engine` (:mod:`.facade`) is what callers hold. Behind it, one module per part:

- :mod:`.request`: :class:`SaveRequest`, what a save asks for;
- :mod:`.saving`: the save side: admission, the hand-off of snapshots, the bookkeeping
  of handles and of what saves point at;
- :mod:`.pipeline`: one checkpoint's upload, from its snapshot to its manifest;
- :mod:`.drains`: waiting for uploads, at the end of a task and in a signal handler;
- :mod:`.reading`: listing, reading and loading, all or nothing.
"""

from .drains import DrainProgress, DrainReport
from .facade import Engine
from .request import BackendFactory, CommitListener, SaveRequest

__all__ = ["BackendFactory", "CommitListener", "DrainProgress", "DrainReport", "Engine",
           "SaveRequest"]
