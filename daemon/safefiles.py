"""Files a long-running daemon can trust: regular files only, private directories, locks.

A FIFO, a device or a symlink in a directory the daemon reads would block ``open`` or
``read`` forever (a FIFO with no writer) or redirect a write; ``open_regular`` opens without
following links and without blocking, and refuses anything but a regular file. A directory that
other users can write lets them plant a file the daemon then loads, so such a directory is
refused, as sshd refuses keys under one. ``DirectoryLock`` is an flock(2) held for the life of
the process: a second daemon on the same directory or socket is refused at start, including
while the first one is stopped (SIGSTOP), and the kernel releases it however the first ends.
"""

import errno
import fcntl
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Tuple

__all__ = ["NotRegular", "open_regular", "regular_files", "unsafe_directory", "DirectoryLock",
           "LockHeld", "describe_os_error", "unwritable", "shift_numbered"]


class NotRegular(OSError):
    """The path is a FIFO, device, socket, directory or symlink."""


class LockHeld(OSError):
    """Another process holds the lock; ``owner`` is its pid when it wrote one."""

    def __init__(self, path: Path, owner: Optional[str]):
        super().__init__(errno.EWOULDBLOCK, "%s is held by %s" % (
            path, "pid " + owner if owner else "another process"))
        self.path, self.owner = path, owner


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file (never follows a symlink, never
    blocks on a FIFO); NotRegular otherwise, FileNotFoundError if it is gone."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(str(path), flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular(errno.ELOOP, "%s is a symbolic link" % path) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotRegular(errno.EINVAL, "%s is not a regular file" % path)
    return os.fdopen(fd, "rb")


def regular_files(directory: Path, suffix: str) -> Iterator[Tuple[str, bool]]:
    """(name, is_regular) of each entry ending in ``suffix``; nothing is opened."""
    with os.scandir(str(directory)) as entries:
        for entry in entries:
            if entry.name.endswith(suffix) and not entry.name.startswith("."):
                yield entry.name, entry.is_file(follow_symlinks=False)


def unsafe_directory(path: Path) -> Optional[str]:
    """Why another user could plant files in ``path``, or None when only we (or root) can."""
    info = path.stat()
    if info.st_uid not in (os.getuid(), 0):
        return "%s belongs to uid %d, not to this user (%d)" % (path, info.st_uid, os.getuid())
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "%s is writable by %s (mode %o): fix with chmod go-w %s" % (
            path, "everyone" if info.st_mode & stat.S_IWOTH else "its group",
            stat.S_IMODE(info.st_mode), path)
    return None


class DirectoryLock:
    """An exclusive flock on ``path`` (created owner-only), holding our pid."""

    def __init__(self, path: Path):
        self.path = Path(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
        self._fd: Optional[int] = os.open(str(self.path), flags, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self._fd, 32, 0).decode("ascii", "replace").strip()
            os.close(self._fd)
            self._fd = None
            raise LockHeld(self.path, owner or None) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing drops the flock
            self._fd = None


def unwritable(path: Path, directory: bool) -> Optional[str]:
    """Why ``path`` (a file, or with ``directory`` a folder) could not be created or written
    by this process, or None. The nearest existing folder is tried with a nameless
    temporary file; nothing is left behind."""
    if path.exists():
        if directory != path.is_dir():
            return "%s exists and is not a %s" % (path, "directory" if directory else "file")
        target = path
    else:
        target = path.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir():
            return "%s is not a directory" % target
    try:
        if target.is_dir():    # the real test (root passes access(2) on /proc, for one)
            tempfile.TemporaryFile(dir=str(target)).close()
        elif not os.access(str(target), os.W_OK):
            return "%s cannot be written by this user (uid %d)" % (target, os.getuid())
    except OSError as exc:
        return "cannot create files in %s: %s" % (target, describe_os_error(exc))
    return None


def shift_numbered(path: Path, keep: int, numbered: Callable[[int], Path]) -> None:
    """Make room for a new ``path``: ``numbered(keep - 1)`` -> ``numbered(keep)`` (the oldest
    replaced) ... ``numbered(1)`` -> ``numbered(2)``, then ``path`` -> ``numbered(1)``. Raises
    OSError when a rename fails; what was renamed before stays renamed."""
    for index in range(keep - 1, 0, -1):
        if numbered(index).exists():
            os.replace(numbered(index), numbered(index + 1))
    os.replace(path, numbered(1))


def describe_os_error(exc: OSError) -> str:
    """Disk full and read-only file systems in words an operator acts on."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device (or quota reached)"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)
