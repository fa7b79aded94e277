"""What the launcher knows of Triton 2.51's Python-backend stub processes, and the keeper of their health flag.

Why a keeper (the evidence is in docs/limits.md): every IPC round trip tritonserver makes with a stub waits in
steps of one second, and after each step it requires the stub's health flag -- a bool in the stub's shared-memory
control block that tritonserver clears and a thread of the stub sets every 300 ms -- or it gives up. That second is
hard-coded (``stub-timeout-seconds`` is parsed but used nowhere in r24.10). A stub that stalls for more than about
a second (SIGSTOP, a debugger, swapping, starvation) therefore has its request failed while it still works on it,
and the instance's request/response protocol is out of step for good: measured, the next requests get the answers
of earlier ones, and within a second the stub or the server touches shared memory the other already freed; a
process that dies holding the region's robust mutex makes the survivor's next lock return EOWNERDEAD, which
boost 1.79 throws as ``lock_exception`` -- SIGABRT of the whole server.

The keeper sets that flag, from outside, for every stub that still exists (stopped or starved included) and never
for one that has exited (a zombie), so tritonserver waits for a stalled stub and still notices a dead one within a
second. The flag is written with one ``pwrite`` of one byte and without the control block's mutex, so the keeper
can never die holding a lock of Triton's; the parent's own writes under that mutex order themselves as they would
with the stub's thread. A control block that does not look like Triton 2.51's (the layout checks below) is left
alone, with one warning.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fire_backend.procfs import Process, child_processes

LOGGER = logging.getLogger(__name__)

#: a stub's argv: [binary, model.py, region, size, growth, server pid, backend dir, ipc handle, instance, ...]
STUB_ARGV_MODEL_PY, STUB_ARGV_REGION, STUB_ARGV_CONTROL, STUB_ARGV_INSTANCE = 1, 2, 7, 8
STUB_BINARY = "triton_python_backend_stub"

#: the allocator's ownership header (alignas(16) uint32 reference count) that precedes every object in a region
_OWNERSHIP_BYTES = 16
#: IPCControlShm: 4 bools (stub_health first), two pthread mutexes of 40 bytes at 8 and 48, five queue handles
_CONTROL = struct.Struct("<4B4x40s40s5q")
_MUTEX_KIND_AT = 16  #: pthread_mutex_t.__kind within the mutex (glibc, x86-64 and aarch64)
_ROBUST_PSHARED = 0x10 | 0x80  #: the kind bits of a robust, process-shared mutex (how Triton creates them)
#: seconds between two rounds; the flag must be set within 1 s of tritonserver clearing it
INTERVAL_S = 0.2


@dataclass(frozen=True)
class StubArgs:
    """What a stub's command line says about it."""

    pid: int
    model: str  #: the model folder's name
    region: str  #: its shared-memory region's name
    control: int  #: the handle (offset) of its control block in the region
    instance: str  #: the model instance, e.g. ``fire_ensemble_0_1`` (the model's name for a transient stub)


def stub_args(process: Process) -> StubArgs | None:
    """``process`` as a stub, or None when it is no stub of a Python-backend model."""
    argv = process.argv
    if len(argv) <= STUB_ARGV_INSTANCE or not argv[0].endswith(STUB_BINARY):
        return None
    try:
        control = int(argv[STUB_ARGV_CONTROL])
    except ValueError:
        return None
    return StubArgs(process.pid, Path(argv[STUB_ARGV_MODEL_PY]).parent.parent.name, argv[STUB_ARGV_REGION], control,
                    argv[STUB_ARGV_INSTANCE])


def control_block_problem(block: bytes, region_size: int) -> str | None:
    """None when ``block`` (the ownership header and the control block) reads as Triton 2.51's; else what is off."""
    if len(block) < _OWNERSHIP_BYTES + _CONTROL.size:
        return "the region is too short for a control block there"
    refcount = int.from_bytes(block[:4], "little")
    fields = _CONTROL.unpack_from(block, _OWNERSHIP_BYTES)
    flags, stub_mutex, handles = fields[:4], fields[5], fields[6:]
    kind = int.from_bytes(stub_mutex[_MUTEX_KIND_AT:_MUTEX_KIND_AT + 4], "little", signed=True)
    if not 1 <= refcount < 1 << 16:
        return f"reference count {refcount}"
    if any(flag > 1 for flag in flags):
        return f"flags {list(flags)} are not booleans"
    if kind & _ROBUST_PSHARED != _ROBUST_PSHARED:
        return f"the health mutex's kind {kind:#x} is not robust and process-shared"
    if not all(0 < h < region_size for h in handles) or len(set(handles)) != len(handles):
        return f"queue handles {handles} do not lie in the {region_size}-byte region"
    return None


class StubHealthKeeper:
    """Sets the health flag of every live stub of one tritonserver, every ``interval_s``, on a daemon thread."""

    def __init__(self, server_pid: int, region_path: Callable[[str], Path], interval_s: float = INTERVAL_S,
                 processes: Callable[[int], list[Process]] = child_processes) -> None:
        self.server_pid = server_pid
        self.region_path = region_path
        self.interval_s = interval_s
        self.processes = processes  #: pid -> its child processes (procfs; replaceable in tests)
        self._verdicts: dict[tuple[int, str], str | None] = {}  #: (pid, region) -> None (keep) or why not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.kept: set[int] = set()  #: the stubs whose flag the last round set

    def start(self) -> StubHealthKeeper:
        self._thread = threading.Thread(target=self._run, name="fire-stub-health", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tend()
            except Exception:  # never let one bad read end the keeper
                LOGGER.exception("stub health keeper: round failed")
            self._stop.wait(self.interval_s)

    def tend(self) -> set[int]:
        """One round: set the flag of every stub that has not exited; returns their pids."""
        kept = set()
        live = set()
        for process in self.processes(self.server_pid):
            stub = stub_args(process)
            if stub is None or not process.running:
                continue
            live.add((stub.pid, stub.region))
            if self._keep(stub):
                kept.add(stub.pid)
        self._verdicts = {key: why for key, why in self._verdicts.items() if key in live}
        self.kept = kept
        return kept

    def _keep(self, stub: StubArgs) -> bool:
        key = (stub.pid, stub.region)
        try:
            fd = os.open(self.region_path(stub.region), os.O_RDWR)
        except FileNotFoundError:
            return False  # not created yet, or already removed
        except OSError as exc:
            if key not in self._verdicts:
                self._verdicts[key] = why = f"its region cannot be opened ({exc.strerror})"
                LOGGER.warning("stub %s (pid %d): %s; its health flag is left to the stub alone", stub.instance,
                               stub.pid, why)
            return False
        try:
            if key not in self._verdicts:
                block = os.pread(fd, _OWNERSHIP_BYTES + _CONTROL.size, stub.control)
                why = control_block_problem(block, os.fstat(fd).st_size)
                self._verdicts[key] = why
                if why is not None:
                    LOGGER.warning("stub %s (pid %d): its control block does not read as Triton 2.51's (%s); its "
                                   "health flag is left to the stub alone", stub.instance, stub.pid, why)
            if self._verdicts[key] is not None:
                return False
            os.pwrite(fd, b"\x01", stub.control + _OWNERSHIP_BYTES)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
