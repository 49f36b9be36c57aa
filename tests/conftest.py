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


@pytest.fixture(scope="session")
def s3_server():  # type: ignore[no-untyped-def]
    from s3server import running_s3_server

    with running_s3_server() as server:
        yield server


S3_BUCKET = "ckpt-flows"


@pytest.fixture
def s3_env(s3_server, flow_env: dict[str, str], tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Environment for a flow on the S3 datastore of a fresh, empty moto server."""
    s3_server.reset()
    s3_server.client().create_bucket(Bucket=S3_BUCKET)
    env = dict(flow_env)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        env.pop(name, None)
    env.update(s3_server.env(S3_BUCKET))
    env["AWS_CONFIG_FILE"] = str(tmp_path / "no-aws-config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-aws-credentials")
    return env
