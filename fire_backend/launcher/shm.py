"""The Python-backend stubs' shared memory: a private ``/dev/shm`` for tritonserver where the kernel allows it,
else named, locked regions on the host's ``/dev/shm`` that the next start cleans up.

Why: every stub (and the control stub) moves requests through a region in ``/dev/shm`` that Triton 2.51 creates
0644 whatever the umask, that no backend setting caps, and that a ``kill -9`` leaves behind.

- **Private** (preferred): tritonserver starts under ``unshare -Urm`` (a user and a mount namespace, no privilege
  needed) with a fresh tmpfs on ``/dev/shm``, mode 0700 and a size cap. Other users see none of it, a request
  cannot grow the regions past the cap, and everything is freed when the server's last process exits.
- **Shared** (fallback, e.g. Docker's default seccomp profile refuses user namespaces; Docker gives each
  container its own ``/dev/shm`` anyway): regions are named ``fire-<uid>-<random>-...``, and the launcher holds
  an ``flock`` on ``<cache>/shm/<prefix>.lock``, inherited by tritonserver. At each start, a lock nobody holds
  any more marks a dead server: its regions and the lock file are removed. PID reuse cannot fool it, and a live
  server's regions are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fire_backend.defaults import cache_dir

LOGGER = logging.getLogger(__name__)
HOST_SHM = Path("/dev/shm")
MIB = 1 << 20
#: what the private tmpfs holds per stub: its region (server.STUB_REGION_BYTES, allocated whole) and room for a
#: large batch beyond it, in every stub at once
SHM_MIB_PER_STUB = 16
SHM_BASE_MIB = 64


def shm_size_mib(stubs: int) -> int:
    """The private tmpfs size for ``stubs`` Python-backend instances."""
    return SHM_BASE_MIB + SHM_MIB_PER_STUB * max(stubs, 1)


def _mount_script(size_mib: int) -> str:
    return f'mount -t tmpfs -o mode=0700,size={size_mib}m fire-shm /dev/shm && exec "$@"'


@functools.lru_cache(maxsize=1)
def private_shm_unavailable() -> str | None:
    """None when a private /dev/shm works here; else why not (tried once per process)."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    unshare = shutil.which("unshare")
    if unshare is None:
        return "util-linux `unshare` is not installed"
    try:
        probe = subprocess.run([unshare, "-Urm", "--", "/bin/sh", "-c", _mount_script(1), "fire-shm", "true"],
                               capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
        return f"unshare -Urm refused ({reason})"
    return None


def private_shm_command(size_mib: int) -> list[str]:
    """The argv prefix that runs a command with a private ``/dev/shm`` of ``size_mib`` MiB (same pid: exec)."""
    unshare = shutil.which("unshare") or "unshare"
    return [unshare, "-Urm", "--", "/bin/sh", "-c", _mount_script(size_mib), "fire-shm"]


def lock_dir() -> Path:
    return cache_dir() / "shm"


@dataclass
class ShmClaim:
    """The region prefix of one server start, and (on the host's /dev/shm) the lock that marks it alive."""

    prefix: str
    private: bool
    lock_fd: int | None = None

    def region_path(self, server_pid: int | None, region: str) -> Path:
        """Where a stub's region lives as this process sees it (inside the server's namespace when private)."""
        if self.private and server_pid is not None:
            return Path(f"/proc/{server_pid}/root/dev/shm") / region
        return HOST_SHM / region

    def release(self) -> None:
        """Remove this start's regions from the host's /dev/shm and drop the lock (after the server is gone)."""
        if not self.private:
            remove_regions(self.prefix)
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                (lock_dir() / f"{self.prefix}.lock").unlink()
            os.close(self.lock_fd)
            self.lock_fd = None


def claim(private: bool) -> ShmClaim:
    """A fresh prefix; on the host's /dev/shm also its held, inheritable lock (pass ``lock_fd`` to the server)."""
    prefix = f"fire-{os.getuid()}-{secrets.token_hex(4)}-"
    if private:
        return ShmClaim(prefix, True)
    directory = lock_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / f"{prefix}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.set_inheritable(fd, True)
    return ShmClaim(prefix, False, fd)


def remove_regions(prefix: str) -> list[Path]:
    """Unlink this user's regions named ``prefix*`` from the host's /dev/shm; returns what went."""
    removed = []
    if not HOST_SHM.is_dir():
        return removed
    for region in HOST_SHM.glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            if region.stat().st_uid == os.getuid():
                region.unlink()
                removed.append(region)
    return removed


def sweep_stale() -> list[Path]:
    """Remove the regions of every dead server of this user (its lock is free); returns the regions removed."""
    removed: list[Path] = []
    directory = lock_dir()
    if not directory.is_dir():
        return removed
    for lock in directory.glob("fire-*.lock"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: that server (or a stub of it) is alive
            os.close(fd)
            continue
        try:
            removed += remove_regions(lock.name.removesuffix(".lock"))
            with contextlib.suppress(OSError):
                lock.unlink()
        finally:
            os.close(fd)
    if removed:
        LOGGER.warning("removed %d shared-memory region(s) left by a dead tritonserver", len(removed))
    return removed
