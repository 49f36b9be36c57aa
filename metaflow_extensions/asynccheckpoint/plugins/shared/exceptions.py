"""The errors ``@checkpoint`` raises into Metaflow, each with a headline."""

from metaflow.exception import MetaflowException


class CheckpointException(MetaflowException):
    headline = "@checkpoint error"


class CheckpointConfigException(CheckpointException):
    headline = "@checkpoint configuration error"


class CheckpointUploadException(CheckpointException):
    headline = "@checkpoint upload failed"


class CheckpointReferenceError(CheckpointException, ValueError):
    """A reference that names no checkpoint; a ValueError, as metaflow-checkpoint raises."""

    headline = "@checkpoint reference error"


class CheckpointPathNotFound(CheckpointException, FileNotFoundError):
    """save(path=...) of a path that does not exist; a FileNotFoundError, as metaflow-checkpoint
    raises."""

    headline = "@checkpoint path not found"
