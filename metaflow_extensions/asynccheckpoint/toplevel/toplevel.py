# Every public name here becomes a name in `metaflow`: import only what users import, and
# nothing heavy (this runs on every `import metaflow`).
from ..plugins.checkpoint.api import Checkpoint
from ..plugins.model.api import load_model

__all__ = ["Checkpoint", "load_model"]

# What Metaflow's banner shows for this extension ("+asynccheckpoint(0.1.0)"); the
# package's version is read from here when it is built.
__mf_extensions__ = "asynccheckpoint"
__version__ = "0.1.0"
