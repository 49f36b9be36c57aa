"""The engine's reading calls, on its loop: listing, reading objects, and copying
checkpoints (or objects stored without a manifest) into a directory, all or nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Sequence

import anyio
import anyio.to_thread

from ..backends.base import Backend
from ..errors import CheckpointError, ChecksumMismatchError, LoadError, ManifestError
from ..layout import CheckpointKeys
from ..manifest import Manifest, checked_paths
from ..placing import place
from .concurrent import each

__all__ = ["download", "fetch", "get_all", "load", "manifest_keys", "manifests_of"]


def manifest_keys(keys: Iterable[str]) -> list[CheckpointKeys]:
    """The checkpoints whose manifests are among ``keys``, newest first."""
    out = []
    for k in keys:
        try:
            out.append(CheckpointKeys.from_manifest_key(k))
        except ValueError:
            continue
    return CheckpointKeys.newest_first(out)


def manifests_of(datas: Iterable[bytes | None]) -> list[Manifest | ManifestError | None]:
    """Each manifest's bytes parsed: None where there were none, the
    :class:`ManifestError` where they are not a manifest."""
    out: list[Manifest | ManifestError | None] = []
    for data in datas:
        try:
            out.append(None if data is None else Manifest.from_json(data))
        except ManifestError as e:
            out.append(e)
    return out


def _load_staging(dest: str) -> str:
    # Inside the destination: on its filesystem, so files are renamed into place.
    os.makedirs(dest, exist_ok=True)
    return tempfile.mkdtemp(prefix=".ckpt-load-", dir=dest)


def _place(staging: str, dest: str, paths: list[list[str]], who: str) -> None:
    """Move verified files from ``staging`` (named by index) to their paths under ``dest``
    (:func:`uploader.placing.place`); a conflict is a :class:`LoadError`."""
    def refuse(path: str, rel: str, what: str) -> LoadError:
        return LoadError(f"{who}: cannot load {rel!r} into {dest!r}: {path!r} is {what}. Load "
                         "into an empty directory, or remove it first.")

    place(staging, dest, paths, kind="checkpoint", refuse=refuse)


async def get_all(backend: Backend, keys: list[str]) -> list[bytes | None]:
    """The bytes under each of ``keys`` (None where there is none), read concurrently."""
    got: list[bytes | None] = [None] * len(keys)

    async def one(i: int) -> None:
        got[i] = await backend.get_bytes(keys[i])

    await each(one, range(len(keys)))
    return got


async def fetch(backend: Backend, objects: list[tuple[str, str, int | None]],
                paths: list[list[str]], dest: str, who: str, total: int | None
                ) -> list[tuple[int, str]]:
    """:meth:`uploader.engine.Engine.fetch`, on the loop."""
    got: list[tuple[int, str]] = [(0, "")] * len(objects)

    async def check(i: int, what: str, target: str, digest: str) -> None:
        size = objects[i][2]
        n = (await anyio.to_thread.run_sync(os.stat, target)).st_size
        if size is not None and n != size:
            raise LoadError(f"{what} has {n} bytes, but {size} were stored. The stored "
                            "copy is incomplete or was changed.")
        got[i] = (n, digest)

    def whole() -> None:
        received = sum(n for n, _ in got)
        if total is not None and received != total:
            raise LoadError(f"{who}: its files hold {received} bytes, but {total} were "
                            "stored. A file is missing or was changed in the store.")

    # A size of 0 asks the backend for the object in one stream, whatever it is.
    await download(backend, dest, who, paths, [(key, rel, size or 0)
                                               for key, rel, size in objects], check, whole)
    return got


async def load(backend: Backend, manifest: Manifest, dest: str, keys: CheckpointKeys) -> None:
    """:meth:`uploader.engine.Engine.load`, on the loop."""
    who = f"checkpoint {manifest.name!r} ({keys.checkpoint_id})"
    paths = checked_paths([f.path for f in manifest.files], who)

    async def check(i: int, what: str, target: str, digest: str) -> None:
        if digest != manifest.files[i].sha256:
            raise ChecksumMismatchError(
                f"{what} has SHA-256 {digest}, but its manifest says "
                f"{manifest.files[i].sha256}. The stored copy is corrupt; load an older "
                "checkpoint (current.checkpoint.list()) instead.")

    await download(backend, dest, who, paths, [
        (keys.stored(f.path, f.key), f.path, f.size) for f in manifest.files], check)


async def download(backend: Backend, dest: str, who: str, paths: list[list[str]],
                   files: Sequence[tuple[str, str, int]],
                   check: Callable[[int, str, str, str], Awaitable[None]],
                   whole: Callable[[], None] = lambda: None) -> None:
    """Download each ``(key, relative path, size)`` of ``files`` into a staging
    directory beside ``dest``, then place them at ``paths`` in ``dest``: all or nothing.

    ``check(i, what, downloaded path, its SHA-256)`` raises for a file that is not what
    was stored (``what`` names it for the message), and ``whole()`` for a set that is
    not; nothing lands in ``dest`` unless both pass for all. Raises
    :class:`~uploader.errors.LoadError` naming ``who``, the file and its key.
    """
    try:
        staging = await anyio.to_thread.run_sync(_load_staging, dest)
    except OSError as e:
        raise LoadError(f"{who}: cannot create a directory in {dest!r} to load into "
                        f"({e}); check that it is writable.") from e

    async def one(i: int) -> None:
        key, rel, size = files[i]
        what = f"{who}: file {rel!r} at {backend.url_of(key)}"
        target = os.path.join(staging, str(i))
        try:
            digest = await backend.get_file(key, target, size)
        except LoadError as e:
            raise type(e)(f"{what}: {e}") from e
        except (CheckpointError, OSError) as e:
            raise LoadError(f"{what} could not be loaded: {e}") from e
        await check(i, what, target, digest)

    try:
        await each(one, range(len(files)))
        whole()
        try:
            await anyio.to_thread.run_sync(_place, staging, dest, paths, who)
        except OSError as e:
            raise LoadError(f"{who}: cannot place its files in {dest!r}: {e}") from e
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(staging, ignore_errors=True))
