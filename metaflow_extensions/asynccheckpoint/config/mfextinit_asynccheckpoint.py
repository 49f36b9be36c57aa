"""Configuration knobs of the non-blocking ``@checkpoint``.

Each value is read with Metaflow's ``from_conf``, so it can be set as
``METAFLOW_CHECKPOINT_<NAME>`` in the environment or in the Metaflow config file,
and Metaflow forwards it to remote tasks. Values are kept as strings here and
validated when a step using ``@checkpoint`` initialises, so a bad value fails that
step with a message naming the variable, instead of breaking ``import metaflow``.

This module also refuses to load next to the published ``metaflow-checkpoint``
package: both register ``@checkpoint`` and ``current.checkpoint``, and Metaflow
would otherwise let one silently shadow the other.
"""

from metaflow.metaflow_config_funcs import from_conf as _from_conf


def _refuse_to_shadow() -> None:
    import importlib.util as _importlib_util
    import os as _os

    def has_modules(spec: object) -> bool:
        if getattr(spec, "origin", None) not in (None, "namespace"):
            return True
        for top in getattr(spec, "submodule_search_locations", None) or ():
            for _dir, dirs, files in _os.walk(top):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                if any(f.endswith(".py") for f in files):
                    return True
        return False

    try:
        other = _importlib_util.find_spec("metaflow_extensions.obcheckpoint")
    except (ImportError, ValueError):
        other = None
    if other is not None and not has_modules(other):
        # `pip uninstall metaflow-checkpoint` can leave its directories behind, empty or
        # with caches only: nothing there can be imported, so nothing is shadowed.
        other = None
    if other is not None:
        raise ImportError(
            "Both metaflow-async-checkpoint and metaflow-checkpoint are installed, and both "
            "provide @checkpoint and current.checkpoint. Keep one: "
            "`pip uninstall metaflow-checkpoint` (flows written for it run unchanged with "
            "metaflow-async-checkpoint) or `pip uninstall metaflow-async-checkpoint`."
        )


_refuse_to_shadow()

# Concurrent requests (files and multipart parts together) per task. The defaults here and
# of the part size are uploader.config.Settings' (see there why).
CHECKPOINT_UPLOAD_CONCURRENCY = _from_conf("CHECKPOINT_UPLOAD_CONCURRENCY", "32")
# Multipart part size in bytes (suffixes KiB, MiB, GiB accepted); grows for huge files.
CHECKPOINT_PART_SIZE = _from_conf("CHECKPOINT_PART_SIZE", "8MiB")
# Files at or above this size are uploaded to S3 in parts.
CHECKPOINT_MULTIPART_THRESHOLD = _from_conf("CHECKPOINT_MULTIPART_THRESHOLD", "32MiB")
# Attempts per request, the first included, for transient errors.
CHECKPOINT_MAX_ATTEMPTS = _from_conf("CHECKPOINT_MAX_ATTEMPTS", "8")
# Seconds after which a request that keeps failing transiently stops being retried.
CHECKPOINT_RETRY_DEADLINE = _from_conf("CHECKPOINT_RETRY_DEADLINE", "300")
# Snapshots waiting or uploading at once; save() blocks while this many are pending.
CHECKPOINT_MAX_PENDING = _from_conf("CHECKPOINT_MAX_PENDING", "2")
# Seconds the end of a task waits for pending uploads.
CHECKPOINT_DRAIN_TIMEOUT = _from_conf("CHECKPOINT_DRAIN_TIMEOUT", "3600")
# How save() snapshots files: auto, reflink, link or copy.
CHECKPOINT_SNAPSHOT = _from_conf("CHECKPOINT_SNAPSHOT", "auto")
# Bytes per save() that are copied instead of linked (small files only).
CHECKPOINT_COPY_BUDGET = _from_conf("CHECKPOINT_COPY_BUDGET", "4MiB")
# Seconds a task that receives SIGTERM (preemption) spends draining uploads before exiting.
CHECKPOINT_SIGTERM_GRACE = _from_conf("CHECKPOINT_SIGTERM_GRACE", "25")
# Whether a file the newest checkpoint of its scope already stored is pointed at instead of
# uploaded again ("true"), or every checkpoint stores all of its bytes ("false").
CHECKPOINT_INCREMENTAL = _from_conf("CHECKPOINT_INCREMENTAL", "true")
# What a task prints about its checkpoints: "quiet" (warnings and errors only), "info"
# (one line per commit, notes, the drain's progress) or "debug" (each commit's figures too).
CHECKPOINT_LOG_LEVEL = _from_conf("CHECKPOINT_LOG_LEVEL", "info")
# Seconds between progress lines while the end of a task waits for pending uploads.
CHECKPOINT_PROGRESS_INTERVAL = _from_conf("CHECKPOINT_PROGRESS_INTERVAL", "5")
# Where S3 and Azure upload bytes are read, hashed and sent: "process" (a spawned worker process, so
# the training loop's GIL is not shared with the upload) or "thread" (threads of the task).
CHECKPOINT_UPLOADER = _from_conf("CHECKPOINT_UPLOADER", "process")
# Seconds the upload worker process may leave a request unanswered, beyond the time its
# bytes need at CHECKPOINT_WORKER_MIN_RATE, before it is killed and replaced (0: the S3
# client's connect and read timeouts, 130 s).
CHECKPOINT_WORKER_TIMEOUT = _from_conf("CHECKPOINT_WORKER_TIMEOUT", "0")
# The slowest total upload speed (per second) at which the worker still counts as working.
CHECKPOINT_WORKER_MIN_RATE = _from_conf("CHECKPOINT_WORKER_MIN_RATE", "2MiB")
# Seconds each rank of a @parallel gang waits, as it starts, for rank 0 to choose the gang
# checkpoint every rank resumes from.
CHECKPOINT_GANG_TIMEOUT = _from_conf("CHECKPOINT_GANG_TIMEOUT", "900")
# Retention, in the task (a decorator argument of the same name wins over these): keep the
# N newest committed checkpoints of the task, and the M best by a metadata key.
CHECKPOINT_KEEP_LAST = _from_conf("CHECKPOINT_KEEP_LAST")
CHECKPOINT_KEEP_BEST = _from_conf("CHECKPOINT_KEEP_BEST")
CHECKPOINT_BEST_METRIC = _from_conf("CHECKPOINT_BEST_METRIC")
# "min" (lower is better) or "max".
CHECKPOINT_BEST_MODE = _from_conf("CHECKPOINT_BEST_MODE")
# Seconds after which data of a checkpoint that never committed (and an incomplete
# multipart upload) counts as left behind by a crash, and is deleted by retention.
CHECKPOINT_DEBRIS_GRACE = _from_conf("CHECKPOINT_DEBRIS_GRACE", "21600")

del _from_conf, _refuse_to_shadow
