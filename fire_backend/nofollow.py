"""Files inside one directory, reached without following a symbolic link, written crash-safely.

The direction store and the instance registry keep their files in a directory that other people's tools, a
mistaken ``ln -s`` or an attacker with write access to the volume may change. Nothing inside such a directory is
ever followed: every path is opened relative to the directory, component by component, with ``O_NOFOLLOW``
(``O_DIRECTORY`` for folders), so a symbolic link swapped in for ``CURRENT``, ``history.jsonl``, ``versions/`` or a
dangling ``.lock`` is an error (``ELOOP``, reported as damage by the store), never a redirection. The directory
itself may be a link (an operator's ``/srv/fire/store -> /mnt/...``).

Writes are crash-safe: :meth:`Directory.replace` writes a hidden temporary file, fsyncs it, renames it over the
target and fsyncs the folder (a reader sees the old content or the new, never a mix); :meth:`Directory.publish` is
the same without replacing (``EEXIST`` if the name is taken); :meth:`Directory.append` appends one line and fsyncs,
and undoes its own partial write (a full disk mid-line) by truncating back. Nothing here creates the directory
itself: a missing directory stays missing (``FileNotFoundError``), so a store that went away is noticed rather than
silently re-created. Torch-free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: prefix of the temporary files :meth:`Directory.replace` and :meth:`Directory.publish` write (hidden, so a listing
#: of final names never sees one)
TMP_PREFIX = ".tmp-"


def describe(exc: OSError) -> str:
    """An OSError in words an operator acts on (no absolute path: messages may reach control clients)."""
    if exc.errno == errno.ELOOP:
        return "a symbolic link (never followed inside the store)"
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return exc.strerror or type(exc).__name__


def _open_dir(name: str, parent: int) -> int:
    """Open folder ``name`` of ``parent`` without following a link (Linux says ENOTDIR for one: made ELOOP)."""
    try:
        return os.open(name, _DIR, dir_fd=parent)
    except NotADirectoryError:
        try:
            link = stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        if link:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


class Directory:
    """One directory's files, opened relative to it; ``relative`` names use ``/`` between components."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- walking ---------------------------------------------------------------------------
    def _root_fd(self) -> int:
        return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the root itself may be a link

    @contextlib.contextmanager
    def _parent(self, relative: str) -> Iterator[tuple[int, str]]:
        """(fd of the folder holding ``relative``, its last component), every folder opened without following."""
        *folders, name = relative.split("/")
        fd = self._root_fd()
        try:
            for folder in folders:
                inner = _open_dir(folder, fd)
                os.close(fd)
                fd = inner
            yield fd, name
        finally:
            os.close(fd)

    # -- reads -----------------------------------------------------------------------------
    def read(self, relative: str) -> bytes:
        with self._parent(relative) as (parent, name):
            fd = os.open(name, _READ, dir_fd=parent)
        with os.fdopen(fd, "rb") as handle:
            return handle.read()

    def read_tail(self, relative: str, size: int, end: int | None = None) -> tuple[bytes, int]:
        """Up to ``size`` bytes ending at ``end`` (default: the end of the file), and the offset they start at."""
        with self._parent(relative) as (parent, name):
            fd = os.open(name, _READ, dir_fd=parent)
        try:
            stop = os.fstat(fd).st_size if end is None else end
            start = max(0, stop - size)
            return os.pread(fd, stop - start, start), start
        finally:
            os.close(fd)

    def stat(self, relative: str) -> os.stat_result:
        """The entry itself (a link is not followed); OSError when absent or unreachable."""
        with self._parent(relative) as (parent, name):
            return os.stat(name, dir_fd=parent, follow_symlinks=False)

    def exists(self, relative: str) -> bool:
        try:
            self.stat(relative)
        except FileNotFoundError:
            return False
        return True

    def names(self, folder: str = "", hidden: bool = False) -> list[str]:
        """The entries of ``folder`` (the directory itself when empty); temporary files only when ``hidden``."""
        fd = self._root_fd()
        try:
            if folder:
                inner = _open_dir(folder, fd)
                os.close(fd)
                fd = inner
            return sorted(name for name in os.listdir(fd) if hidden or not name.startswith(TMP_PREFIX))
        finally:
            os.close(fd)

    # -- writes ----------------------------------------------------------------------------
    def mkdir(self, relative: str) -> None:
        """Create one folder inside the directory (its parent must exist); an existing one is fine."""
        with self._parent(relative) as (parent, name), contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=parent)

    def _write_tmp(self, parent: int, data: bytes) -> str:
        tmp = f"{TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            raise
        os.close(fd)
        return tmp

    def replace(self, relative: str, data: bytes, durable: bool = True) -> None:
        """Write ``data`` as ``relative`` atomically: a temporary file, fsynced, renamed over it (a link at that name
        is replaced, not followed), the folder fsynced when ``durable``. Raises only before the rename: once renamed
        the new content is what everyone reads, and a failed folder fsync is left to the next write."""
        with self._parent(relative) as (parent, name):
            tmp = self._write_tmp(parent, data)
            try:
                os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=parent)
                raise
            if durable:
                with contextlib.suppress(OSError):
                    os.fsync(parent)

    def publish(self, relative: str, data: bytes) -> None:
        """Create ``relative`` with ``data`` atomically, never replacing anything: FileExistsError if it exists."""
        with self._parent(relative) as (parent, name):
            tmp = self._write_tmp(parent, data)
            try:
                os.link(tmp, name, src_dir_fd=parent, dst_dir_fd=parent, follow_symlinks=False)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=parent)
            os.fsync(parent)

    def create(self, relative: str, data: bytes) -> None:
        """Create ``relative`` exclusively (FileExistsError if it exists), not fsynced: a claim, not a record."""
        with self._parent(relative) as (parent, name):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=parent)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def append(self, relative: str, line: bytes) -> int:
        """Append ``line`` (one line, with its newline) and fsync; returns the file's size before, for
        :meth:`truncate`. A last line left without its newline (a crash mid-append) is closed first. A failed write
        or fsync (a full disk) truncates the file back to that size and raises: nothing of the line remains."""
        with self._parent(relative) as (parent, name):
            fd = os.open(name, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=parent)
        try:
            size = os.fstat(fd).st_size
            data = b"\n" + line if size and os.pread(fd, 1, size - 1) != b"\n" else line
            try:
                _write_all(fd, data)
                os.fsync(fd)
            except BaseException:
                os.ftruncate(fd, size)
                os.fsync(fd)
                raise
            return size
        finally:
            os.close(fd)

    def truncate(self, relative: str, size: int) -> None:
        """Cut ``relative`` back to ``size`` bytes and fsync (undoes an :meth:`append`)."""
        with self._parent(relative) as (parent, name):
            fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, relative: str) -> None:
        """Remove ``relative`` (a link itself, never its target); a missing one is fine."""
        with self._parent(relative) as (parent, name), contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=parent)

    @contextlib.contextmanager
    def locked(self, relative: str) -> Iterator[None]:
        """Hold an exclusive ``flock`` of ``relative`` (created if missing; a link there is refused, not followed)."""
        with self._parent(relative) as (parent, name):
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (``os.write`` may write less than it is given)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
