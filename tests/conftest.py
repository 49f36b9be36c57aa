"""Shared fixtures: flows run as users run them, in a child process, on a private datastore."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).parent
FLOWS = HERE / "flows"
sys.path.insert(0, str(HERE))


@pytest.fixture
def flow_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
    env.update({
        "METAFLOW_DEFAULT_DATASTORE": "local",
        "METAFLOW_DEFAULT_METADATA": "local",
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp_path / "ds"),
        "USERNAME": "tester",
        "PYTHONUNBUFFERED": "1",
    })
    return env


RunFlow = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_flow(tmp_path: Path, flow_env: dict[str, str]) -> RunFlow:
    """``run_flow("name.py", "--param", "x", env={...})`` runs ``tests/flows/name.py run``."""

    def run(flow: str, *args: str, env: dict[str, str] | None = None,
            check: bool = True, command: str = "run") -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, str(FLOWS / flow), "--no-pylint", command, *args],
            cwd=tmp_path, env={**flow_env, **(env or {})}, capture_output=True, text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{flow} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n"
                f"{proc.stderr}")
        return proc

    return run


@pytest.fixture
def datastore_root(tmp_path: Path) -> Path:
    return tmp_path / "ds" / ".metaflow"
