"""Loop-mounted filesystem images, for tests that need a real filesystem's behaviour.

The machine a test runs on decides what its filesystem does: whether files can be
reflink-cloned, how fine its timestamps are. To test what the product does where the
answers differ, :func:`mounted` makes a small image of a chosen kind in a temporary
directory, formats it, loop-mounts it and, on the way out (also when the body raised),
unmounts it, detaches its loop device and deletes the image.

Kinds:

``ext4_coarse``
    ext4 with 128-byte inodes: no room for nanoseconds, so timestamps are whole seconds.
    Fine-grained kernel timestamps otherwise hide bugs that only coarse ones show (a
    same-size rewrite within one second leaves size, mtime and ctime all unchanged).
``xfs_reflink``
    XFS with ``reflink=1``: files can be cloned (``FICLONE``) and clones are private.

Needs root and the tools (``losetup``, ``mount``, ``mkfs.*``). Where any of that is
missing or fails, :class:`FilesystemUnavailable` says what and how to get it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["KINDS", "FilesystemUnavailable", "FsKind", "check_available", "mounted"]

# Root's tools live in sbin, which a non-login PATH may lack.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


@dataclasses.dataclass(frozen=True)
class FsKind:
    fstype: str
    size_mib: int
    mkfs: tuple[str, ...]  # the image path is appended
    package: str  # the Debian package that provides mkfs


KINDS: dict[str, FsKind] = {
    "ext4_coarse": FsKind("ext4", 128, ("mkfs.ext4", "-F", "-q", "-I", "128"), "e2fsprogs"),
    # xfsprogs 5.19 and later refuse to make an XFS smaller than 300 MiB.
    "xfs_reflink": FsKind("xfs", 320, ("mkfs.xfs", "-f", "-q", "-m", "reflink=1"), "xfsprogs"),
}

# losetup, mount and umount all come from Debian's "mount" package.
_TOOL_PACKAGE = {"losetup": "mount", "mount": "mount", "umount": "mount"}


class FilesystemUnavailable(Exception):
    """Raised by :func:`mounted` when this machine cannot make the filesystem.

    The message says what was missing or failed and how to get it; tests skip with it.
    """


def _tool(name: str, package: str) -> str:
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        raise FilesystemUnavailable(f"{name} not found: apt-get install {package}")
    return path


def _run(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise FilesystemUnavailable(
            f"{what} failed ({' '.join(argv)} exited {proc.returncode}): "
            f"{detail[0] if detail else 'no output'}")
    return proc.stdout.strip()


def check_available(kind: str) -> FsKind:
    """The kind, once root and every tool it needs are present; else FilesystemUnavailable."""
    spec = KINDS[kind]
    if os.geteuid() != 0:
        raise FilesystemUnavailable(
            f"needs root to loop-mount a filesystem image ({kind}); run the tests as root")
    if not Path("/dev/loop-control").exists():
        raise FilesystemUnavailable(
            "no /dev/loop-control: the kernel has no loop devices here (modprobe loop, or "
            "give the container access to /dev/loop*)")
    _tool(spec.mkfs[0], spec.package)
    for name, package in _TOOL_PACKAGE.items():
        _tool(name, package)
    return spec


def _unmount(mnt: Path) -> None:
    umount = _tool("umount", "mount")
    if subprocess.run([umount, str(mnt)], capture_output=True, check=False).returncode == 0:
        return
    # Busy (a test left a file open, or a thread still writes there): detach it from the
    # tree now; the kernel frees it, and its loop device, when the last user lets go.
    proc = subprocess.run([umount, "--lazy", str(mnt)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0 and os.path.ismount(mnt):
        raise RuntimeError(f"could not unmount test filesystem {mnt}: {proc.stderr.strip()}")


@contextlib.contextmanager
def mounted(kind: str, *, parent: str | None = None) -> Iterator[Path]:
    """Make, format and mount a fresh image of ``kind``; yield its (empty) mount point.

    The image and mount point live in a new temporary directory under ``parent`` (default:
    the system's). Raises :class:`FilesystemUnavailable` before yielding when the machine
    cannot do it; nothing is left behind then either.
    """
    spec = check_available(kind)
    workdir = Path(tempfile.mkdtemp(prefix=f"fsimage-{kind}-", dir=parent))
    image, mnt = workdir / f"{kind}.img", workdir / "mnt"
    mnt.mkdir()
    try:
        with open(image, "wb") as f:
            f.truncate(spec.size_mib << 20)  # sparse: costs only what mkfs and tests write
        _run([_tool(spec.mkfs[0], spec.package), *spec.mkfs[1:], str(image)],
             f"making a {kind} filesystem")
        dev = _run([_tool("losetup", "mount"), "--find", "--show", str(image)],
                   "attaching a loop device")
        try:
            _run([_tool("mount", "mount"), "-t", spec.fstype, dev, str(mnt)],
                 f"mounting {spec.fstype} (does this kernel support it?)")
        finally:
            # On a mounted device this only marks it to detach itself when unmounted
            # (autoclear), so from here on unmounting is the only cleanup left, whatever
            # happens to this process; on a device that failed to mount it frees it now.
            subprocess.run([_tool("losetup", "mount"), "-d", dev], capture_output=True,
                           check=False)
        try:
            yield mnt
        finally:
            _unmount(mnt)
    finally:
        # Never delete through a mount that is somehow still there: that would empty it
        # and then fail anyway. Raising says so instead.
        if os.path.ismount(mnt):
            raise RuntimeError(f"test filesystem {mnt} is still mounted; unmount it by hand")
        shutil.rmtree(workdir, ignore_errors=True)
