"""Unpacking a ``metaflow-checkpoint`` tar archive into a directory: all or nothing.

The archive is read once, member by member, in order (gzip, bzip2 and xz archives are
decompressed here, through a reader that stops at the bound), and every member is checked
before its bytes are written to a staging directory inside the destination, on its
filesystem, so placing a file is a rename:

- its name: relative, without ``..`` or NUL, never twice in the archive, never both a
  file and a directory;
- its type: a regular file or a directory; links, devices and fifos are refused;
- the bounds: at most :data:`MAX_MEMBERS` members, and at most
  ``max(MAX_EXPANDED_BYTES, EXPANSION_RATIO * archive size)`` bytes read out of the
  archive, headers included, checked at each member's header (its declared size) and
  again on every read. An uncompressed archive holds fewer bytes than its own size, so
  a genuine one always passes; a compressed one that expands further is refused as soon
  as it does, with nothing of it placed.

Only then is the destination looked at: a file where the archive has a directory, or a
directory where it has a file, refuses the load; a symlink is replaced, never written
through; a file is replaced. That is how loads of this package's own checkpoints treat
what is already there, and it is decided for every path before anything is moved.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import os
import shutil
import tarfile
import zlib
from collections.abc import Iterator
from typing import Any

from uploader import placing

from .exceptions import CheckpointException

__all__ = ["EXPANSION_RATIO", "MAX_EXPANDED_BYTES", "MAX_MEMBERS", "place", "unpack"]

MAX_MEMBERS = 1_000_000
"""Members an archive may hold. ``metaflow-checkpoint`` archives one checkpoint directory;
a million files is far past any seen, while empty members compress to a few bytes each,
so without a bound a small archive could fill a filesystem's inodes. The archive's
members are also held in memory while it is read, a few hundred bytes each."""

MAX_EXPANDED_BYTES = 64 * 2**30
"""Bytes a compressed archive may expand to (64 GiB), unless :data:`EXPANSION_RATIO`
times its own size is more. No setting: the bound is there to stop a crafted archive, and
a genuine checkpoint this large was stored uncompressed, as ``metaflow-checkpoint``
writes them, which this bound never limits."""

EXPANSION_RATIO = 8
"""A compressed archive may always expand to this many times its size: data compresses
far less (weights, optimiser state), while a crafted archive expands by a thousand times
and more."""

_CHUNK = 1 << 20
_MAGIC = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
_ANOTHER = ("Nothing was placed in the destination. Load another checkpoint "
            "(current.checkpoint.list(task=...) lists them)")


class _TooBig(Exception):
    pass


class _Unreadable(Exception):
    pass


class _Bounded(io.RawIOBase):
    """The decompressed archive, refusing to yield more than ``limit`` bytes."""

    def __init__(self, stream: io.BufferedIOBase, limit: int) -> None:
        self._stream, self._limit, self.count = stream, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._limit + 1 - self.count)
        try:
            data = self._stream.read(max(want, 1))
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise _Unreadable(e) from e
        self.count += len(data)
        if self.count > self._limit:
            raise _TooBig
        buffer[:len(data)] = data
        return len(data)


@contextlib.contextmanager
def _opened(archive: str, limit: int) -> Iterator[tarfile.TarFile]:
    with open(archive, "rb") as f:
        head = f.read(6)
    opener = next((o for magic, o in _MAGIC if head.startswith(magic)), None)
    try:
        raw = open(archive, "rb") if opener is None else opener(archive, "rb")  # noqa: SIM115
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise _Unreadable(e) from e
    with raw, tarfile.open(fileobj=_Bounded(raw, limit), mode="r|") as tar:
        yield tar


def _refuse(who: str, what: str) -> CheckpointException:
    return CheckpointException(f"{who}: {what}; not loading it. {_ANOTHER}, or, if you "
                               "trust this archive, extract it by hand.")


def _name_parts(member: tarfile.TarInfo, who: str) -> list[str]:
    name = member.name
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or "\0" in name or (member.isfile() and not parts):
        raise _refuse(who, f"its archive holds the unsafe path {name!r}, which could write "
                           "outside the destination (metaflow-checkpoint never writes one)")
    return parts


def _kind(member: tarfile.TarInfo) -> str:
    return ("a symlink" if member.issym() else "a hard link" if member.islnk() else
            "a fifo" if member.isfifo() else "a device" if member.isdev() else
            f"of tar type {member.type!r}")


def unpack(archive: str, staging: str, who: str) -> list[list[str]]:
    """Check and write the files of ``archive`` to ``staging``, named by index; return
    each one's path (split on "/") in that order. Raises :class:`CheckpointException`
    naming ``who`` for any member that is not safe to load, and for a corrupt archive."""
    limit = max(MAX_EXPANDED_BYTES, EXPANSION_RATIO * os.path.getsize(archive))
    paths: list[list[str]] = []
    seen: set[str] = set()
    files: set[str] = set()
    dirs: set[str] = set()
    declared = 0
    try:
        with _opened(archive, limit) as tar:
            for count, member in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise _refuse(who, f"its archive holds more than {MAX_MEMBERS:,} members "
                                       "(stopped reading there)")
                parts = _name_parts(member, who)
                if member.isdir() and not parts:
                    continue  # the archive's top directory: dest itself
                if not (member.isfile() or member.isdir()):
                    raise _refuse(who, f"its archive holds {member.name!r}, {_kind(member)}: "
                                       "only regular files and directories are loaded")
                rel = "/".join(parts)
                if rel in seen:
                    raise _refuse(who, f"its archive holds {rel!r} twice, so which one is "
                                       "the checkpoint's cannot be told")
                seen.add(rel)
                dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
                if member.isdir():
                    dirs.add(rel)
                    continue
                declared += member.size
                if declared > limit:
                    raise _TooBig
                _write(tar, member, os.path.join(staging, str(len(paths))))
                files.add(rel)
                paths.append(parts)
    except _TooBig:
        raise _refuse(who, f"its archive expands past {limit:,} bytes (stopped there: an "
                           f"archive may expand to {MAX_EXPANDED_BYTES:,} bytes or "
                           f"{EXPANSION_RATIO} times its size, whichever is more)") from None
    except (_Unreadable, tarfile.TarError, EOFError) as e:
        cause = e.__cause__ or e
        raise CheckpointException(f"{who}: its archive cannot be read ({cause}); the stored "
                                  f"copy is corrupt. {_ANOTHER}.") from e
    both = sorted(files & dirs)
    if both:
        raise _refuse(who, f"its archive holds {both[0]!r} both as a file and as a directory")
    return paths


def _write(tar: tarfile.TarFile, member: tarfile.TarInfo, target: str) -> None:
    source = tar.extractfile(member)
    assert source is not None  # a regular file
    with open(target, "xb") as out:
        shutil.copyfileobj(source, out, _CHUNK)
    # As the old extraction kept them, without the bits a "data" filter drops.
    mode = member.mode & 0o755
    if not mode & 0o100:
        mode &= ~0o111
    os.chmod(target, mode | 0o600)


def place(staging: str, dest: str, paths: list[list[str]], who: str) -> None:
    """Move the files :func:`unpack` wrote to their paths under ``dest``, once every path
    is known to be placeable (see the module docstring); never through a symlink."""

    def refuse(path: str, rel: str, what: str) -> CheckpointException:
        return CheckpointException(
            f"{who}: cannot load {rel!r} into {dest!r}: {path!r} is {what}. Nothing was "
            "placed; load into an empty directory, or remove it first.")

    placing.place(staging, dest, paths, kind="archive", refuse=refuse)
