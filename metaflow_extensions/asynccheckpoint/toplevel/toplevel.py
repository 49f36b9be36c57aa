# Every public name here becomes a name in `metaflow`: import only what users import, and
# nothing heavy (this runs on every `import metaflow`).
from ..plugins.checkpoint_api import Checkpoint
from ..plugins.model_api import load_model

__all__ = ["Checkpoint", "load_model"]
