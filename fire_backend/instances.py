"""The registry of repair instances: which direction version each one applies (``<store>/instances/``).

Each repair instance writes ``<id>.json`` (its instance name, pid, host, version) whenever it applies a version,
and removes it when Triton unloads it. A process killed outright cannot remove its entry, so readers tell live
entries from stale ones by the pid on this host (``fire ctl status`` marks them gone) and the supervisor of
``fire serve`` deletes the stale ones. Torn-free (atomic rename) and torch-free, so the supervisor can use it.
Entries of other hosts (a store on a shared volume) are listed as they are: their pids mean nothing here.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fire_backend.atomic import atomic_write
from fire_backend.procfs import is_running, this_host

INSTANCES_DIR = "instances"


class InstanceRegistry:
    """The ``instances/`` folder of one store."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def report(self, instance: str, version: int, lag_s: float | None = None) -> None:
        """Record that ``instance`` (this process) applies ``version``, ``lag_s`` seconds after its commit (None
        for the version it started with, which was no propagation)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = {"instance": instance, "version": version, "pid": os.getpid(), "host": this_host(),
                 "time": time.time(), "lag_s": lag_s}
        atomic_write(self.directory / f"{instance}.json", json.dumps(entry).encode())

    def entries(self) -> list[dict[str, Any]]:
        """Every readable entry, each with ``alive``: True/False on this host, None for another host's."""
        out = []
        for path in sorted(self.directory.glob("*.json")):
            with contextlib.suppress(ValueError, OSError):
                entry = json.loads(path.read_text())
                if isinstance(entry, dict):
                    out.append({**entry, "alive": _alive(entry)})
        return out

    def live(self) -> list[dict[str, Any]]:
        """The entries of running instances (this host) and every entry of other hosts."""
        return [e for e in self.entries() if e["alive"] is not False]

    def prune(self, dead: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Delete the entries of this host's exited processes (or those ``dead`` picks); returns what went."""
        removed = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                entry = json.loads(path.read_text())
            except (ValueError, OSError):
                continue
            if not isinstance(entry, dict):
                continue
            if (dead(entry) if dead is not None else _alive(entry) is False):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(entry)
        return removed


def _alive(entry: dict[str, Any]) -> bool | None:
    if entry.get("host", this_host()) != this_host():
        return None
    pid = entry.get("pid")
    return isinstance(pid, int) and is_running(pid)
