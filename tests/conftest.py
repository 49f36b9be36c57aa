"""Shared fixtures: flows run as users run them, in a child process, on a private datastore."""

from __future__ import annotations

import os
import signal
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
            check: bool = True, command: str = "run",
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        with subprocess.Popen(
            [sys.executable, str(FLOWS / flow), "--no-pylint", command, *args],
            cwd=tmp_path, env={**flow_env, **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        ) as p:
            try:
                stdout, stderr = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Kill the flow's tasks too, not only the runtime: a hung task would
                # outlive the test.
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
                raise
        proc = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
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
    from s3server import PROFILE_VARS

    env = {k: v for k, v in flow_env.items() if k not in PROFILE_VARS}
    return {**env, **s3_server.env(S3_BUCKET), **s3_server.credentials(tmp_path)}


# -- real filesystems, loop-mounted (see fsimages.py) ------------------------------------

from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402


def _mount_or_skip(kind: str) -> Iterator[Path]:
    import fsimages

    try:
        with fsimages.mounted(kind) as mnt:
            yield mnt
    except fsimages.FilesystemUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def coarse_mount() -> Iterator[Path]:
    """A session's ext4 with whole-second timestamps (128-byte inodes)."""
    yield from _mount_or_skip("ext4_coarse")


@pytest.fixture(scope="session")
def reflink_mount() -> Iterator[Path]:
    """A session's XFS with reflink clones."""
    yield from _mount_or_skip("xfs_reflink")


def _fresh_dir(mount: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    import re
    import shutil
    import tempfile

    # One mount per session (making one takes a while); a directory per test keeps tests
    # apart, and removing it keeps the small image from filling up.
    name = re.sub(r"[^\w.-]", "_", request.node.name)[:40]
    d = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=mount))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def coarse_fs(coarse_mount: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh empty directory on ext4 with 1-second timestamps."""
    yield from _fresh_dir(coarse_mount, request)


@pytest.fixture
def reflink_fs(reflink_mount: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A fresh empty directory on XFS, where files can be reflink-cloned."""
    yield from _fresh_dir(reflink_mount, request)


# -- one store of each kind (see storekits.py) -----------------------------------------


@pytest.fixture(scope="session")
def store_kits() -> Iterator[Any]:
    from storekits import Kits

    kits = Kits()
    yield kits
    kits.stop()


STORES = ("local", "s3", "azure", "gcs")
_STORE_MARKS = {"s3": pytest.mark.s3, "azure": pytest.mark.azure, "gcs": pytest.mark.gcs,
                "gs": pytest.mark.gcs}


def _store_marks(name: str) -> list[pytest.MarkDecorator]:
    """The mark that selects tests of store ``name`` (none for the local store)."""
    return [_STORE_MARKS[name]] if name in _STORE_MARKS else []


def stores(*default: str, names: tuple[str, ...] = STORES) -> pytest.MarkDecorator:
    """Runs a test on every store of ``names`` (its ``store`` fixture's param): those in
    ``default`` in the default run, the others in the slow tier (``-m slow``; .ci/run runs
    both). A behaviour is tested by default on the local store and S3, and on Azure and GCS
    where it reads or writes the store in a way of its own."""
    return pytest.mark.parametrize("store", [
        pytest.param(name, id=name, marks=_store_marks(name) + (
            [] if name in default else [pytest.mark.slow]))
        for name in names], indirect=True)


@pytest.fixture(params=[pytest.param(n, id=n, marks=_store_marks(n)) for n in STORES])
def store(request: pytest.FixtureRequest, store_kits: Any) -> Any:
    """A fresh, empty place on each kind of store: its kit's :class:`StoreHandle`."""
    handle = store_kits.get(request.param).fresh(request.node.name)
    handle.kind = request.param
    return handle


@pytest.fixture
def azure(store_kits: Any, request: pytest.FixtureRequest) -> Any:
    """A fresh, empty container on the session's Azurite (skips, saying why, without it)."""
    return store_kits.get("azure").fresh(request.node.name)


# -- Google Cloud Storage, on an emulator (see gcskit.py, gcsserver.py) -------------------


@pytest.fixture(scope="session")
def gcs_kit(store_kits):  # type: ignore[no-untyped-def]
    return store_kits.get("gcs")  # the contract suite's emulator; skips, saying why


@pytest.fixture
def gcs_store(gcs_kit, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A fresh, empty bucket on the session's GCS emulator."""
    return gcs_kit.fresh(request.node.name)


@pytest.fixture
def gcs_env(gcs_store, flow_env: dict[str, str], tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Environment for a flow on the GS datastore of a fresh bucket on the emulator."""
    return {**flow_env, **gcs_store.flow_env(tmp_path)}
