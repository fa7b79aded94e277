"""Linux ``/proc`` reads: whether a process runs, its children, its command line.

Cheap enough for a supervision loop that runs twice a second (a few small reads per process), and torch-free, so
``fire serve`` stays light. Anything unreadable (the process is gone, another user's process) reads as absent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
#: /proc/<pid>/stat states of a process that has exited (zombie: not yet reaped; dead: being removed)
EXITED_STATES = frozenset({"Z", "X", "x"})


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on; empty when there is no such process."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return []
    # "pid (comm) S ...": comm may hold spaces and parentheses, so split at the last ')'.
    return stat.rpartition(")")[2].split()


def process_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``Z``, ...), or None when there is no such process."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def uptime_ticks() -> int:
    """Now, in the clock ticks since boot that processes' start times are counted in."""
    return int(float((PROC / "uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (a zombie has)."""
    state = process_state(pid)
    return state is not None and state not in EXITED_STATES


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of all its threads: a child belongs to the thread that forked it)."""
    found: set[int] = set()
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN: scan every process's parent
            return _children_by_scan(pid)
        except OSError:
            continue
    return sorted(found)


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and fields[1] == str(pid):  # fields: state, ppid, ...
            found.append(int(entry.name))
    return sorted(found)


def cmdline(pid: int) -> list[str]:
    """The argv of ``pid``; empty for a zombie or a process that is gone."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


@dataclass(frozen=True)
class Process:
    """One child process as the supervisor sees it."""

    pid: int
    state: str
    argv: tuple[str, ...]
    #: start time in clock ticks since boot (comparable with :func:`uptime_ticks`)
    started: int

    @property
    def running(self) -> bool:
        return self.state not in EXITED_STATES


def child_processes(pid: int) -> list[Process]:
    """The children of ``pid`` with their state and argv (children that vanish while being read are left out)."""
    out = []
    for child in children(pid):
        fields = _stat_fields(child)
        if len(fields) > 19:
            out.append(Process(child, fields[0], tuple(cmdline(child)), int(fields[19])))  # field 22: starttime
    return out


def this_host() -> str:
    """The name processes on one machine share (instance registries on a shared volume tell hosts apart by it)."""
    return os.uname().nodename
