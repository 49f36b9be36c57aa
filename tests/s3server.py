"""A real S3-compatible server on 127.0.0.1 for the tests: moto in server mode.

It runs as a child process (so it never shares the GIL with the code under test) on a
free port, and is reset between tests with ``POST /moto-api/reset``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
# What would send boto3 to the machine's own credentials instead of this server's.
PROFILE_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    def __init__(self, endpoint: str, proc: subprocess.Popen[bytes]) -> None:
        self.endpoint = endpoint
        self.proc = proc

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).read()

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def credentials(self, home: Path | str) -> dict[str, str]:
        """This server's credentials, from the environment only: the config and credentials
        files are looked for under ``home``, where there are none."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": os.path.join(home, "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": os.path.join(home, "no-aws-credentials")}

    def fresh(self, bucket: str, monkeypatch: pytest.MonkeyPatch, home: Path | str
              ) -> S3Server:
        """Reset the server, make ``bucket``, and give this process its credentials."""
        self.reset()
        self.client().create_bucket(Bucket=bucket)
        for name in PROFILE_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in self.credentials(home).items():
            monkeypatch.setenv(name, value)
        return self

    def env(self, bucket: str, prefix: str = "metaflow") -> dict[str, str]:
        """Environment that points Metaflow (and so @checkpoint) at this server."""
        return {
            "METAFLOW_DEFAULT_DATASTORE": "s3",
            "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{bucket}/{prefix}",
            "METAFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "1"},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start within 60 s") from None
                time.sleep(0.05)  # polling for readiness, not synchronising test logic
        yield S3Server(endpoint, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
