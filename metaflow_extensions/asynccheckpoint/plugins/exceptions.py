"""The errors ``@checkpoint`` raises into Metaflow, each with a headline."""

from metaflow.exception import MetaflowException


class CheckpointException(MetaflowException):
    headline = "@checkpoint error"


class CheckpointConfigException(CheckpointException):
    headline = "@checkpoint configuration error"


class CheckpointUploadException(CheckpointException):
    headline = "@checkpoint upload failed"
