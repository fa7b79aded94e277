"""The registry of repair instances: which direction version each one applies (``<artifacts>/instances/``).

Each repair instance writes ``<id>.json`` (its instance name, pid, host, version, and what it sees of the store) from
its watcher thread, never from the serving path, and removes it when Triton unloads it. A write that fails (a full
disk, a read-only volume) is logged and tried again later; it never fails an inference. A process killed outright
cannot remove its entry, so readers tell live entries from stale ones by the pid on this host (``fire ctl status``
marks them gone), every instance prunes this host's stale entries when it starts, and the supervisor of
``fire serve`` deletes them as it notices. The registry lives beside the file store, not in it (the repository's
``artifacts/instances``): a store that went missing or filled its disk must not take the record of what each
instance serves with it, and nothing here ever creates the folder's parent. Entries of other hosts (a repository
on a shared volume) are listed as they are: their pids mean nothing here. Torn-free (atomic rename), no symbolic
link followed, torch-free, so the supervisor can use it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fire_backend.nofollow import Directory
from fire_backend.procfs import is_running, this_host

INSTANCES_DIR = "instances"


class InstanceRegistry:
    """The ``instances/`` folder: created on the first report when its parent exists, never the parent itself."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._files = Directory(self.directory.parent)
        self._name = self.directory.name

    def report(self, instance: str, version: int, lag_s: float | None = None, **state: Any) -> None:
        """Record that ``instance`` (this process) applies ``version``, ``lag_s`` seconds after its commit (None
        for the version it started with, which was no propagation); ``state``: what it sees of the store
        (``held``, ``degraded``, ``damage``). OSError when it cannot be written (the caller logs and retries)."""
        self._files.mkdir(self._name)
        entry = {"instance": instance, "version": version, "pid": os.getpid(), "host": this_host(),
                 "time": time.time(), "lag_s": lag_s, **state}
        self._files.replace(f"{self._name}/{instance}.json", json.dumps(entry).encode(), durable=False)

    def withdraw(self, instance: str) -> None:
        """Remove ``instance``'s entry (its model is unloading); OSError when it cannot."""
        self._files.unlink(f"{self._name}/{instance}.json")

    def _read(self) -> list[tuple[str, dict[str, Any]]]:
        try:
            names = [n for n in self._files.names(self._name) if n.endswith(".json")]
        except OSError:
            return []
        out = []
        for name in names:
            try:
                entry = json.loads(self._files.read(f"{self._name}/{name}"))
            except (ValueError, OSError):
                continue
            if isinstance(entry, dict):
                out.append((name, entry))
        return out

    def entries(self) -> list[dict[str, Any]]:
        """Every readable entry, each with ``alive``: True/False on this host, None for another host's."""
        return [{**entry, "alive": _alive(entry)} for _, entry in self._read()]

    def live(self) -> list[dict[str, Any]]:
        """The entries of running instances (this host) and every entry of other hosts."""
        return [e for e in self.entries() if e["alive"] is not False]

    def prune(self, dead: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
        """Delete the entries of this host's exited processes (or those ``dead`` picks); returns what went."""
        removed = []
        for name, entry in self._read():
            if dead(entry) if dead is not None else _alive(entry) is False:
                try:
                    self._files.unlink(f"{self._name}/{name}")
                except OSError:
                    continue
                removed.append(entry)
        return removed


def _alive(entry: dict[str, Any]) -> bool | None:
    if entry.get("host", this_host()) != this_host():
        return None
    pid = entry.get("pid")
    return isinstance(pid, int) and is_running(pid)
