# Every public name here becomes a name in `metaflow`: import only what users import, and
# nothing heavy (this runs on every `import metaflow`).
from ..plugins.checkpoint_api import Checkpoint

__all__ = ["Checkpoint"]
