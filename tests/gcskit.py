"""The per-store kit for Google Cloud Storage: the emulator once per session, a fresh
bucket per test, backends and flow environments pointed at it.

The same interface as the other stores' kits (``name``, ``start()``, ``fresh(test_id)``
giving a handle with ``backend(ctx)``, ``flow_env(tmp_path)``, ``root_url`` and
``client()``), so the backend contract suite and the end-to-end flows take it as one
more parameter.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from gcsserver import EmulatorUnavailable, GCSServer, running_gcs_server

from uploader.backends.base import Backend, TransferContext

PREFIX = "metaflow"


class GCSHandle:
    """One test's bucket on the emulator."""

    def __init__(self, server: GCSServer, bucket: str) -> None:
        self.server = server
        self.bucket = bucket
        self.prefix = PREFIX
        self.root_url = f"gs://{bucket}/{PREFIX}"

    def backend(self, ctx: TransferContext, *, prefix: str | None = None,
                **kwargs: Any) -> Backend:
        from uploader.backends.gcs import GCSBackend

        return GCSBackend(ctx, bucket=self.bucket,
                          prefix=self.prefix if prefix is None else prefix,
                          endpoint=self.server.endpoint, **kwargs)

    def flow_env(self, tmp_path: Path) -> dict[str, str]:
        return self.server.env(self.bucket, self.prefix, tmp_path)

    def client(self) -> Any:
        """google-cloud-storage's Bucket of this test, for looking at what was stored."""
        return self.server.client().bucket(self.bucket)

    def object_name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key


class GCSKit:
    name = "gcs"

    def __init__(self) -> None:
        self._server: GCSServer | None = None
        self._cm: Any = None

    def start(self) -> None:
        """Start the emulator (once); pytest.skip with the reason where it cannot be had."""
        if self._server is not None:
            return
        try:
            import gcloud.aio.storage  # noqa: F401
            import google.cloud.storage  # noqa: F401
        except ImportError as e:
            pytest.skip(f"the [gcs] extra is not installed ({e}): pip install "
                        "'metaflow-async-checkpoint[gcs,test]'")
        try:
            self._cm = running_gcs_server()
            self._server = self._cm.__enter__()
        except EmulatorUnavailable as e:
            pytest.skip(f"no GCS emulator: {e}")

    def stop(self) -> None:
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
        self._cm = self._server = None

    @property
    def server(self) -> GCSServer:
        assert self._server is not None, "GCSKit.start() first"
        return self._server

    def fresh(self, test_id: str) -> GCSHandle:
        name = re.sub(r"[^a-z0-9-]+", "-", test_id.lower()).strip("-")[:40]
        bucket = f"{name}-{uuid.uuid4().hex[:12]}".strip("-")
        self.server.create_bucket(bucket)
        return GCSHandle(self.server, bucket)
