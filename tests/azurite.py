"""A real Azure Blob Storage emulator on 127.0.0.1 for the tests: Azurite's blob service.

Azurite comes from the npm registry, installed once into a cache directory (``npm install``
of a pinned version; Node.js must be on PATH). It runs as a child process over HTTPS with a
certificate from a throwaway CA, keeping blobs in memory, and accepts:

- the emulator account's well-known shared key (the tests' own clients use it), and
- OAuth bearer tokens (``--oauth basic``: issuer, audience and expiry are checked, not the
  signature). Metaflow's own Azure datastore signs in only with a token credential (by
  default azure.identity's DefaultAzureCredential) and only over HTTPS, so a flow run on
  the emulator gets its token the way a web app with a managed identity does: from the
  endpoint named by ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER``, which :class:`TokenServer`
  serves here with unsigned tokens that Azurite accepts.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

AZURITE_VERSION = "3.35.0"
ACCOUNT = "devstoreaccount1"
# The emulator's published development key (the same in every Azurite install).
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_TENANT = "00000000-0000-0000-0000-0000000000aa"


class AzuriteUnavailable(RuntimeError):
    """Azurite cannot be had here; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "metaflow-async-checkpoint-tests" / f"azurite-{AZURITE_VERSION}"


def installed_azurite() -> Path:
    """The ``azurite-blob`` command, installed into the cache on first use."""
    prefix = _cache_dir()
    binary = prefix / "node_modules" / ".bin" / "azurite-blob"
    if binary.exists():
        return binary
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise AzuriteUnavailable("Node.js and npm are not on PATH: the Azure tests need "
                                 "Azurite, an npm package (install Node.js 18 or newer)")
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".lock", "w") as lock:  # one install at a time across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.exists():
            return binary
        proc = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(prefix),
             f"azurite@{AZURITE_VERSION}"],
            capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not binary.exists():
            raise AzuriteUnavailable(
                f"npm could not install azurite@{AZURITE_VERSION} into {prefix}: "
                f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return binary


def fake_token(audience: str = "https://storage.azure.com") -> tuple[str, int]:
    """An unsigned JWT that Azurite's basic OAuth accepts, and when it expires."""
    def part(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    now = int(time.time())
    expires = now + 3600
    claims = {"aud": audience, "iss": f"https://sts.windows.net/{_TENANT}/", "tid": _TENANT,
              "oid": "00000000-0000-0000-0000-0000000000bb", "iat": now - 60,
              "nbf": now - 60, "exp": expires}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.c2ln", expires


class TokenServer:
    """A managed-identity token endpoint (the App Service protocol) on 127.0.0.1."""

    HEADER = "checkpoint-tests"

    def __init__(self) -> None:
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
                if self.headers.get("X-IDENTITY-HEADER") != outer.HEADER:
                    self.send_response(401)
                    self.end_headers()
                    return
                outer.requests += 1
                resource = query.get("resource", ["https://storage.azure.com"])[0]
                token, expires = fake_token(resource.rstrip("/").removesuffix("/.default"))
                body = json.dumps({"access_token": token, "expires_on": str(expires),
                                   "resource": resource, "token_type": "Bearer"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}/msi/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        return {"IDENTITY_ENDPOINT": self.endpoint, "IDENTITY_HEADER": self.HEADER}

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class Azurite:
    def __init__(self, port: int, ca_bundle: str, proc: subprocess.Popen[bytes],
                 tokens: TokenServer) -> None:
        self.port = port
        self.account_url = f"https://127.0.0.1:{port}/{ACCOUNT}"
        self.ca_bundle = ca_bundle
        self.proc = proc
        self.tokens = tokens

    def credential(self):  # type: ignore[no-untyped-def]
        from azure.core.credentials import AzureNamedKeyCredential

        return AzureNamedKeyCredential(ACCOUNT, KEY)

    def service(self):  # type: ignore[no-untyped-def]
        """A synchronous client, for looking at what the code under test stored."""
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient(self.account_url, credential=self.credential(),
                                 connection_verify=self.ca_bundle)

    def env(self, container: str, prefix: str = "metaflow") -> dict[str, str]:
        """Environment that points Metaflow (and so @checkpoint) at this emulator, with a
        token from :class:`TokenServer` through Metaflow's default credential chain."""
        return {
            "METAFLOW_DEFAULT_DATASTORE": "azure",
            "METAFLOW_DATASTORE_SYSROOT_AZURE": f"{container}/{prefix}",
            "METAFLOW_AZURE_STORAGE_BLOB_SERVICE_ENDPOINT": self.account_url,
            "REQUESTS_CA_BUNDLE": self.ca_bundle,
            **self.tokens.env(),
        }


@contextlib.contextmanager
def running_azurite(workdir: Path) -> Iterator[Azurite]:
    import trustme

    binary = installed_azurite()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    workdir.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem, ca_pem = workdir / "cert.pem", workdir / "key.pem", workdir / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    port = free_port()
    log = open(workdir / "azurite.log", "wb")  # noqa: SIM115  closed below
    proc = subprocess.Popen(
        [str(binary), "--blobHost", "127.0.0.1", "--blobPort", str(port),
         "--inMemoryPersistence", "--skipApiVersionCheck", "--loose", "--disableTelemetry",
         "--oauth", "basic", "--cert", str(cert_pem), "--key", str(key_pem)],
        stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    tokens = TokenServer()
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                raise AzuriteUnavailable(
                    f"Azurite exited with {proc.returncode}: "
                    f"{(workdir / 'azurite.log').read_text(errors='replace')[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AzuriteUnavailable("Azurite did not listen within 60 s") from None
                time.sleep(0.05)  # polling for readiness, not synchronising test logic
        yield Azurite(port, str(ca_pem), proc, tokens)
    finally:
        tokens.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
