"""One kit per kind of store, so one test runs unchanged on every store.

A kit starts its server once per session (:meth:`start`, which skips with the reason where
the server cannot be had) and gives each test a fresh, empty place (:meth:`fresh`): a
directory, a bucket, a container. The :class:`StoreHandle` it returns builds a backend for
a :class:`TransferContext`, gives the environment a flow run needs to use that place as its
Metaflow datastore, and a client of the store's own SDK for looking at what was stored.

Kits: ``local``, ``s3`` (moto), ``azure`` (Azurite); ``gcs`` comes from ``gcskit`` where
that module is in the tree.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol

import pytest

from uploader.backends import Backend, LocalBackend, TransferContext

STORES = ["local", "s3", "azure", "gcs"]
PREFIX = "metaflow"
_counter = itertools.count(1)


class StoreHandle(Protocol):
    root_url: str

    def backend(self, ctx: TransferContext) -> Backend: ...

    def flow_env(self, tmp_path: Path) -> dict[str, str]: ...

    def client(self) -> Any: ...


class StoreKit(Protocol):
    name: str

    def start(self) -> None: ...

    def fresh(self, test_id: str) -> StoreHandle: ...

    def stop(self) -> None: ...


def _name_for(test_id: str, limit: int) -> str:
    """A bucket or container name: lowercase letters, digits and hyphens, unique."""
    stem = re.sub(r"[^a-z0-9]+", "-", test_id.lower()).strip("-")
    suffix = f"-{next(_counter)}-{os.getpid()}"
    return (stem[: limit - len(suffix)].strip("-") or "t") + suffix


# -- local ---------------------------------------------------------------------------


class LocalHandle:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root_url = str(root / ".metaflow")

    def backend(self, ctx: TransferContext) -> Backend:
        return LocalBackend(self.root_url, ctx)

    def flow_env(self, tmp_path: Path) -> dict[str, str]:
        return {"METAFLOW_DEFAULT_DATASTORE": "local",
                "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(self.root)}

    def client(self) -> Path:
        return Path(self.root_url)


class LocalKit:
    name = "local"

    def start(self) -> None:
        self._base = tempfile.mkdtemp(prefix="ckpt-local-store-")

    def fresh(self, test_id: str) -> LocalHandle:
        return LocalHandle(Path(tempfile.mkdtemp(prefix=_name_for(test_id, 40) + "-",
                                                 dir=self._base)))

    def stop(self) -> None:
        import shutil

        shutil.rmtree(self._base, ignore_errors=True)


# -- S3 (moto) -----------------------------------------------------------------------


class S3Handle:
    def __init__(self, server: Any, bucket: str) -> None:
        self.server, self.bucket = server, bucket
        self.root_url = f"s3://{bucket}/{PREFIX}"

    def backend(self, ctx: TransferContext) -> Backend:
        import aioboto3
        from s3server import ACCESS_KEY, REGION, SECRET_KEY

        from uploader.backends.s3 import S3Backend

        session = aioboto3.Session(aws_access_key_id=ACCESS_KEY,
                                   aws_secret_access_key=SECRET_KEY, region_name=REGION)
        return S3Backend(ctx, bucket=self.bucket, prefix=PREFIX,
                         endpoint_url=self.server.endpoint, session=session)

    def flow_env(self, tmp_path: Path) -> dict[str, str]:
        return {**self.server.env(self.bucket, PREFIX), **self.server.credentials(tmp_path)}

    def client(self) -> Any:
        return self.server.client()


class S3Kit:
    name = "s3"

    def start(self) -> None:
        from s3server import running_s3_server

        self._stack = contextlib.ExitStack()
        self.server = self._stack.enter_context(running_s3_server())

    def fresh(self, test_id: str) -> S3Handle:
        bucket = _name_for(test_id, 63)
        self.server.client().create_bucket(Bucket=bucket)
        return S3Handle(self.server, bucket)

    def stop(self) -> None:
        self._stack.close()


# -- Azure (Azurite) -----------------------------------------------------------------


class AzureHandle:
    def __init__(self, azurite: Any, container: str) -> None:
        self.azurite, self.container = azurite, container
        self.root_url = f"az://{container}/{PREFIX}"

    def backend(self, ctx: TransferContext) -> Backend:
        from uploader.backends.azure import AzureBackend

        return AzureBackend(ctx, account_url=self.azurite.account_url,
                            container=self.container, prefix=PREFIX,
                            credential=self.azurite.credential(),
                            verify=self.azurite.ca_bundle)

    def flow_env(self, tmp_path: Path) -> dict[str, str]:
        return self.azurite.env(self.container, PREFIX)

    def client(self) -> Any:
        """The container, through the SDK's synchronous client."""
        return self.azurite.service().get_container_client(self.container)


class AzureKit:
    name = "azure"

    def start(self) -> None:
        try:
            import azure.storage.blob.aio  # noqa: F401
        except ImportError as e:
            pytest.skip(f"the [azure] extra is not installed ({e}): "
                        "pip install 'metaflow-async-checkpoint[azure]'")
        from azurite import AzuriteUnavailable, running_azurite

        self._stack = contextlib.ExitStack()
        try:
            self.azurite = self._stack.enter_context(
                running_azurite(Path(tempfile.mkdtemp(prefix="azurite-"))))
        except AzuriteUnavailable as e:
            pytest.skip(str(e))

    def fresh(self, test_id: str) -> AzureHandle:
        container = _name_for(test_id, 63)
        self.azurite.service().create_container(container)
        return AzureHandle(self.azurite, container)

    def stop(self) -> None:
        self._stack.close()


KITS: dict[str, type[Any]] = {"local": LocalKit, "s3": S3Kit, "azure": AzureKit}
with contextlib.suppress(ImportError):
    from gcskit import GCSKit

    KITS["gcs"] = GCSKit


class Kits:
    """Kits started on first use, once per session; a kit that skipped skips at once."""

    def __init__(self) -> None:
        self._started: dict[str, Any] = {}
        self._skipped: dict[str, str] = {}

    def get(self, name: str) -> Any:
        if name in self._skipped:
            pytest.skip(self._skipped[name])
        if name not in self._started:
            if name not in KITS:
                self._skipped[name] = f"the {name.upper()} kit is not in this tree"
                pytest.skip(self._skipped[name])
            kit = KITS[name]()
            try:
                kit.start()
            except pytest.skip.Exception as e:
                self._skipped[name] = str(e.msg)
                raise
            self._started[name] = kit
        return self._started[name]

    def stop(self) -> None:
        for kit in self._started.values():
            with contextlib.suppress(Exception):
                kit.stop()
