"""The published ``metaflow-checkpoint`` in a virtual environment of its own, made once.

The environment holds the published package, the same Metaflow as the tests' own, and boto3,
and never this package (the two cannot be installed together). Making it takes a minute of
``pip install``, so it is kept in a cache directory keyed by both versions and the Python, and
made by one process at a time: parallel test workers and later runs reuse it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

PUBLISHED = "metaflow-checkpoint==0.2.14"
_OFFLINE = ("Could not find a version", "No matching distribution", "Network is unreachable",
            "Temporary failure in name resolution", "Failed to establish a new connection",
            "Connection refused", "timed out", "ProxyError")


class PublishedUnavailable(RuntimeError):
    """The package index cannot be reached; the message says why."""


def _root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    name = f"{PUBLISHED.replace('==', '-')}-metaflow-{version('metaflow')}-{tag}"
    return Path(base) / "metaflow-async-checkpoint-tests" / name


def published_python() -> Path:
    """The interpreter of the environment, made on first use."""
    root = _root()
    python, ready = root / "venv" / "bin" / "python", root / "ready"
    if ready.exists():
        return python
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:  # one maker at a time across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return python
        shutil.rmtree(root / "venv", ignore_errors=True)  # a maker that died half-way
        subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True,
                       timeout=300)
        out = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", PUBLISHED,
             f"metaflow=={version('metaflow')}", "boto3"],
            capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            text = out.stdout + out.stderr
            if any(s in text for s in _OFFLINE):
                raise PublishedUnavailable(
                    f"cannot install {PUBLISHED} from the package index (no network?):\n"
                    f"{text[-2000:]}")
            raise AssertionError(f"installing {PUBLISHED} failed:\n{text}")
        ready.write_text("ok\n")
    return python
