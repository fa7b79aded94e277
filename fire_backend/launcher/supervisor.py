"""Supervision of one tritonserver: what ``fire serve`` does between start and stop so faults heal on their own.

Triton 2.51 neither restarts itself nor replaces a dead Python-backend stub (the restart code was removed from
python_backend in May 2024), and its readiness never reflects a dead stub: after a ``kill -9`` of one repair
stub, every request routed to it fails after a second, for ever, while ``/v2/health/ready`` says 200. So,
twice a second:

- **tritonserver exited** without being asked (a crash, a signal, the OOM killer), or **stopped answering**
  (no answer to its own readiness check for ``unresponsive_restart_s``: frozen or hung): the event and the log's
  last lines are reported, the process group is killed, its shared memory cleaned, and the server started again
  with the same configuration and the same log file (each start marked in it): the first time at once, then after
  1, 2, 4 ... s (at most ``max_backoff_s``), counting the restarts of the last ``restart_window_s``. It never gives
  up by default: a crash a request caused must not end the service (``max_restarts`` sets a limit).
- **a stub died** (its process stayed a zombie for ``confirm_s`` and no newer stub took its instance over; Triton
  reaps the stubs it stops itself at once): the model's version directory is touched, so poll mode loads a fresh
  copy and swaps it in; the healthy instances keep serving meanwhile and only requests routed to the dead one
  fail. Its stale entry in the store's instance registry is removed. Recovered when the server log says the
  copy loaded and every instance runs in a new stub; a failed load, or none within ``reload_timeout_s``: a full
  restart. (Under traffic Triton 2.51 keeps the replaced copy, dead stub included, until the next restart; it
  serves nothing.)
- **a stub's region grew** past the size the stubs start with (Triton copies a request into the region before the
  model sees it, and regions never shrink): reported once per new size, and nothing else. A model is loaded only
  to replace a dead stage: Triton 2.51 breaks when models load or unload under traffic (docs/limits.md), so
  nothing the project does on its own reloads one, and a control request is bounded so that it fits the region.

Readiness (:attr:`Supervisor.ready`) is false while starting, restarting or degraded, and whenever tritonserver's
own readiness (gRPC ``ServerReady``, strict: every model ready) did not answer yes within ``health_deadline_s`` at
the last round; ``fire serve`` publishes it on its own health endpoint (:mod:`fire_backend.launcher.health`), with
what the stages say of the direction store (:mod:`fire_backend.launcher.store_health`: a repair instance without a
verified version makes it 503). Events go to ``report``; nothing here prints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from fire_backend.launcher.model_configs import StubModel, stub_models
from fire_backend.launcher.server import STUB_REGION_BYTES, TritonServer, TritonServerError
from fire_backend.launcher.store_health import StoreHealth
from fire_backend.launcher.stub_health import stub_args
from fire_backend.procfs import Process, child_processes, is_running, this_host, uptime_ticks
from fire_backend.repository.layout import ARTIFACTS_DIR
from fire_backend.stores.instances import INSTANCES_DIR, InstanceRegistry

LOGGER = logging.getLogger(__name__)
MIB = 1 << 20


class State(str, Enum):
    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    RESTARTING = "restarting"
    STOPPED = "stopped"
    FAILED = "failed"


def describe_exit(code: int | None) -> str:
    """How a process ended, as an operator reads it (a negative code is the signal that ended it)."""
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass(frozen=True)
class SupervisorPolicy:
    """How the supervisor watches and heals (defaults suit the digits and CIFAR repositories on a small box)."""

    interval_s: float = 0.5
    #: how long a stub must stay dead before it counts (Triton reaps the stubs it stops itself within this)
    confirm_s: float = 1.5
    #: a reloaded model not healthy after this long gets a full restart
    reload_timeout_s: float = 60.0
    #: a stub's region larger than this is reported (once per new size); nothing is reloaded for it
    region_report_bytes: int = STUB_REGION_BYTES
    #: restarts within restart_window_s set the backoff: 0, then 1, 2, 4 ... max_backoff_s seconds
    restart_window_s: float = 600.0
    max_backoff_s: float = 30.0
    #: None: never give up; N: give up (state FAILED, /live 503) at the N+1-th restart within restart_window_s
    max_restarts: int | None = None
    #: longest tritonserver's own readiness check may take; no answer in time: not ready
    health_deadline_s: float = 2.0
    #: a running tritonserver that has answered no readiness check for this long is restarted (frozen or hung)
    unresponsive_restart_s: float = 60.0


@dataclass
class _Stub:
    pid: int
    instance: str
    model: str
    region: str
    started: int  #: clock ticks since boot
    dead_since: float | None = None


@dataclass(frozen=True)
class _Reload:
    asked: float  #: time.monotonic()
    asked_ticks: int  #: procfs.uptime_ticks()
    degrades: bool  #: a dead instance (not readiness-neutral housekeeping such as a region reset)
    #: the stubs the new copy replaces
    replaces: frozenset[int]
    #: where the server log stood when the reload was asked for: the load's outcome is logged after it
    log_offset: int


class Supervisor:
    """Keeps one :class:`TritonServer` serving; ``run()`` loops until asked to stop or it gives up."""

    def __init__(self, server: TritonServer, policy: SupervisorPolicy | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        self.server = server
        self.policy = policy or SupervisorPolicy()
        self._report_fn = report or LOGGER.warning
        self._lock = threading.Lock()
        self._state = State.STOPPED
        self._detail = ""
        self._since = time.time()
        self._heartbeat = time.monotonic()
        self._stubs: dict[int, _Stub] = {}
        self._models: dict[str, StubModel] = {}
        self._reloads: dict[str, _Reload] = {}
        self._missing_since: dict[str, float] = {}
        self._restarts: deque[float] = deque()
        self._generation = 0  #: counts restarts, so a round notices one happened under it
        self._regions: dict[int, int] = {}  #: stub pid -> the largest region size reported
        self._triton = _TritonHealth()
        self.events: list[tuple[float, str]] = []  #: (time, message) of everything reported
        self.store_health = StoreHealth(server.urls["metrics"])

    # -- state -----------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def reloading(self) -> set[str]:
        """The models whose reload the supervisor is waiting for."""
        return set(self._reloads)

    @property
    def ready(self) -> bool:
        return self._state is State.READY and self.server.is_alive() and self._triton.ready

    @property
    def live(self) -> bool:
        """False once the supervisor gave up, or when its loop has stalled while the server should be up."""
        if self._state is State.FAILED:
            return False
        busy = self._state in (State.STARTING, State.RESTARTING, State.STOPPED)
        return busy or time.monotonic() - self._heartbeat < max(10.0, 20 * self.policy.interval_s)

    def health(self) -> dict[str, Any]:
        """What the health endpoint shows (not ready, too, while a repair instance has no verified version)."""
        store = self.store_health.snapshot() if self._state is State.READY else None
        with self._lock:
            return {"state": self._state.value, "detail": self._detail, "since": self._since,
                    "ready": self.ready and not (store and store["unavailable"]), "live": self.live,
                    "tritonserver_pid": self.server.pid, "restarts": len(self._restarts), "store": store,
                    "tritonserver_ready": self._triton.snapshot(),
                    "log": str(self.server.log_path) if self.server.log_path else None}

    def _set(self, state: State, detail: str = "") -> None:
        with self._lock:
            if state is not self._state or detail != self._detail:
                self._since = time.time()
            self._state, self._detail = state, detail

    def _report(self, message: str) -> None:
        self.events.append((time.time(), message))
        self._report_fn(message)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (blocks until it is ready); raises TritonServerError when it cannot start."""
        self._set(State.STARTING)
        try:
            self.server.start()
        except BaseException:
            self._set(State.STOPPED)
            raise
        self._after_start()

    def _after_start(self) -> None:
        self._models = {m.name: m for m in stub_models(self.server.models_dir)}
        self._stubs.clear()
        self._reloads.clear()
        self._missing_since.clear()
        self._regions.clear()
        self._learn(child_processes(self.server.pid or 0))
        self._heartbeat = time.monotonic()
        self._triton.reset(self.server.urls["grpc"])  # start() returned: it answered ready just now
        self._set(State.READY)

    def stop(self) -> None:
        if self._state is not State.FAILED:  # keep saying why it gave up
            self._set(State.STOPPED, "stopping")
        self.server.stop()
        self._triton.close()

    def run(self, stop: threading.Event) -> int:
        """Supervise until ``stop`` is set (0) or the supervisor gives up (1). The server must be started."""
        while not stop.wait(self.policy.interval_s):
            self.check(stop)
            if self._state is State.FAILED:
                return 1
        return 0

    # -- one round -------------------------------------------------------------------------------

    def check(self, stop: threading.Event | None = None) -> None:
        """One supervision round: restart a dead or unresponsive server, reload models with dead stubs, report
        grown regions, ask tritonserver whether it is ready."""
        self._heartbeat = time.monotonic()
        if self._state in (State.FAILED, State.STOPPED):
            return
        if not self.server.is_alive():
            if self._reloads or self._stubs:
                self._stubs.clear()
                self._reloads.clear()
            self._restart(f"tritonserver died ({describe_exit(self.server.returncode)})", stop, with_log=True)
            return
        self._triton.probe(self.policy.health_deadline_s)
        silent = self._triton.silent_s()
        if silent >= self.policy.unresponsive_restart_s and self.server.is_alive():
            self._restart(f"tritonserver answered no readiness check for {silent:.0f} s ({self._triton.error}: "
                          "frozen or hung)", stop, with_log=True, stop_timeout_s=5.0)
            return
        self._heartbeat = time.monotonic()
        now = time.monotonic()
        with contextlib.suppress(OSError):  # the operator may edit configs: expect what they say now
            self._models = {m.name: m for m in stub_models(self.server.models_dir)}
        processes = child_processes(self.server.pid or 0)
        self._learn(processes)
        running = {p.pid for p in processes if p.running}
        present = {p.pid for p in processes}
        for pid, stub in list(self._stubs.items()):
            if pid not in present:
                del self._stubs[pid]  # gone: reaped by Triton, which it does when it unloads a model's old copy
            elif pid not in running and stub.dead_since is None:
                stub.dead_since = now
        newest: dict[str, int] = {}  # instance -> start of its newest running stub
        for stub in self._stubs.values():
            if stub.pid in running:
                newest[stub.instance] = max(newest.get(stub.instance, -1), stub.started)
        # Dead for confirm_s and not replaced by a newer stub of the same instance (Triton replaces stubs when
        # it reloads a model, whoever asked, and reaps the old ones at once): a crash.
        generation = self._generation
        for stub in list(self._stubs.values()):
            if stub.dead_since is not None and now - stub.dead_since >= self.policy.confirm_s \
                    and newest.get(stub.instance, -1) <= stub.started and stub.model not in self._reloads:
                self._reload(stub.model, f"{stub.instance} (pid {stub.pid}) died", {stub.pid}, degrades=True)
                if generation != self._generation:
                    return  # the reload failed and the server was restarted: a fresh round next time
        for model in list(self._models.values()):
            missing = sorted(set(model.instances) - set(newest))
            if not missing:
                self._missing_since.pop(model.name, None)
                continue
            since = self._missing_since.setdefault(model.name, now)
            if now - since >= self.policy.confirm_s and model.name not in self._reloads:
                self._reload(model.name, f"{missing[0]} has no running stub", set(), degrades=True)
                if generation != self._generation:
                    return
        self._check_regions()
        if generation == self._generation:
            self._settle(now, set(newest))

    def _learn(self, processes: list[Process]) -> None:
        for proc in processes:
            stub = stub_args(proc) if proc.running and proc.pid not in self._stubs else None
            spec = self._models.get(stub.model) if stub is not None else None
            # Only instance stubs: the transient model-level stub of a load (named after the model) is not one.
            if stub is not None and spec is not None and stub.instance in spec.instances:
                self._stubs[proc.pid] = _Stub(proc.pid, stub.instance, stub.model, stub.region, proc.started)

    def _settle(self, now: float, running_instances: set[str]) -> None:
        """Recovered once Triton logged the new copy loaded and every instance runs in a stub started after the
        reload was asked for; a failed load, or one not done within ``reload_timeout_s``, becomes a full restart.

        The log is the one place Triton 2.51 says a poll-mode reload finished: the model stays "ready" throughout
        (its old copy serves meanwhile), and under traffic it may keep that old copy, with the dead stub as a
        zombie, for as long as it runs, so the old stubs going away cannot be the sign.
        """
        for model, reload in list(self._reloads.items()):
            spec = self._models.get(model)
            fresh = {s.instance for s in self._stubs.values() if s.model == model and s.dead_since is None
                     and s.started >= reload.asked_ticks}
            outcome = self._load_outcome(model, reload.log_offset)
            if outcome == "failed":
                self._restart(f"reloading {model} failed (see the tritonserver log)", None)
                return
            if outcome == "loaded" and (spec is None or set(spec.instances) <= fresh & running_instances):
                del self._reloads[model]
                self._report(f"{model} recovered in {now - reload.asked:.1f} s")
                self._prune_registry(superseded=reload.replaces | self._superseded(model))
            elif now - reload.asked > self.policy.reload_timeout_s:
                self._restart(f"{model} not recovered {self.policy.reload_timeout_s:.0f} s after its reload", None)
                return
        degraded = sorted(m for m, r in self._reloads.items() if r.degrades)
        if degraded:
            self._set(State.DEGRADED, "reloading " + ", ".join(degraded))
        elif self._state is State.DEGRADED:
            self._set(State.READY)

    def _superseded(self, model: str) -> set[int]:
        """Stubs of ``model`` with a newer stub of the same instance: old copies, serving nothing."""
        newest: dict[str, int] = {}
        for stub in self._stubs.values():
            if stub.model == model:
                newest[stub.instance] = max(newest.get(stub.instance, -1), stub.started)
        return {s.pid for s in self._stubs.values() if s.model == model and s.started < newest[s.instance]}

    def _load_outcome(self, model: str, offset: int) -> str | None:
        """'loaded' or 'failed' once the server log says so after ``offset``; None while it has not."""
        path = self.server.log_path
        if path is None:
            return None
        try:
            with open(path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return None
        if f"failed to load '{model}'" in text:
            return "failed"
        return "loaded" if f"successfully loaded '{model}'" in text else None

    def _reload(self, model: str, why: str, replaces: set[int], degrades: bool) -> None:
        """Touch the model's version directory: poll mode loads a fresh copy (new stubs) and swaps it in."""
        spec = self._models.get(model)
        directory = spec.version_dir if spec is not None else self.server.models_dir / model
        self._report(f"{why}; reloading {model}")
        try:
            os.utime(directory)
        except OSError as exc:
            self._report(f"cannot touch {directory} ({exc.strerror}); restarting tritonserver instead")
            self._restart(f"{model} could not be reloaded", None)
            return
        self._reloads[model] = _Reload(time.monotonic(), uptime_ticks(), degrades, frozenset(replaces),
                                       self._log_size())
        if degrades:
            self._set(State.DEGRADED, f"reloading {model}")
            self._prune_registry()

    def _log_size(self) -> int:
        try:
            return self.server.log_path.stat().st_size if self.server.log_path else 0
        except OSError:
            return 0

    def _prune_registry(self, superseded: set[int] | frozenset[int] = frozenset()) -> None:
        """Remove the store's instance entries of exited stubs (and of ``superseded`` ones of this host)."""
        registry = InstanceRegistry(Path(self.server.config.repository) / ARTIFACTS_DIR / INSTANCES_DIR)
        here = this_host()

        def stale(entry: dict[str, Any]) -> bool:
            mine = entry.get("host", here) == here
            return mine and (entry.get("pid") in superseded or not is_running(int(entry.get("pid") or 0)))

        for entry in registry.prune(stale):
            self._report(f"removed the stale instance entry {entry.get('instance')} (pid {entry.get('pid')})")

    def _check_regions(self) -> None:
        """Report a region that grew past the stubs' starting size, once per new size. Nothing is reloaded: the
        memory stays in use until tritonserver restarts (bounded by the private /dev/shm's size)."""
        for stub in list(self._stubs.values()):
            if stub.dead_since is not None:
                continue
            try:
                size = self.server.region_path(stub.region).stat().st_size
            except OSError:
                continue
            if size > max(self.policy.region_report_bytes, self._regions.get(stub.pid, 0)):
                self._regions[stub.pid] = size
                self._report(f"{stub.instance}'s shared-memory region grew to {size / MIB:.0f} MiB (stubs start with "
                             f"{self.policy.region_report_bytes / MIB:.0f} MiB): a request that large reached it; "
                             "nothing is reloaded, the memory stays in use until tritonserver restarts")

    # -- restart ---------------------------------------------------------------------------------

    def _restart(self, why: str, stop: threading.Event | None, with_log: bool = False,
                 stop_timeout_s: float = 20.0) -> None:
        self._generation += 1
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > self.policy.restart_window_s:
            self._restarts.popleft()
        limit = self.policy.max_restarts
        if limit is not None and len(self._restarts) >= limit:
            self._report(f"{why}; giving up after {len(self._restarts)} restarts within "
                         f"{self.policy.restart_window_s / 60:.0f} min: see the tritonserver log "
                         f"{self.server.log_path}")
            self._set(State.FAILED, why)
            self.server.stop()
            return
        delay = 0.0 if not self._restarts else min(2.0 ** (len(self._restarts) - 1), self.policy.max_backoff_s)
        tail = "\n".join(_without_backtrace(self.server.log_tail(60))[-12:]) if with_log else ""
        when = f" in {delay:.0f} s ({len(self._restarts)} restarts in the last " \
               f"{self.policy.restart_window_s / 60:.0f} min)" if delay else ""
        self._report(f"{why}; restarting it{when} (log: {self.server.log_path})"
                     + (f"; its last log lines:\n{tail}" if tail else ""))
        self._set(State.RESTARTING, why)
        self.server.stop(timeout_s=stop_timeout_s, keep_log=True)
        self._restarts.append(now)
        if delay and (stop.wait(delay) if stop is not None else time.sleep(delay)):
            return
        began = time.monotonic()
        try:
            self.server.start()
        except TritonServerError as exc:
            self._report(f"restart failed: {str(exc).splitlines()[0]}")
            return  # the next round sees the server down and tries again, with backoff
        self._after_start()
        self._report(f"tritonserver restarted in {time.monotonic() - began:.1f} s (pid {self.server.pid})")


class _TritonHealth:
    """tritonserver's own answer to "are you ready?" (gRPC ``ServerReady``), asked once a round with a deadline."""

    def __init__(self) -> None:
        self._client: Any = None
        self.ready = False
        self.error = "not asked yet"
        self._answered = time.monotonic()  #: when it last answered (ready or not)

    def reset(self, grpc_url: str) -> None:
        """A fresh start just answered ready (``TritonServer.start`` waits for it)."""
        self.close()
        import tritonclient.grpc as grpcclient  # the launcher's only use of it; not imported before serving

        self._client = grpcclient.InferenceServerClient(grpc_url)
        self.ready, self.error, self._answered = True, "", time.monotonic()

    def probe(self, deadline_s: float) -> None:
        if self._client is None:
            return
        try:
            self.ready = bool(self._client.is_server_ready(client_timeout=deadline_s))
            self.error = "" if self.ready else "tritonserver says not ready"
            self._answered = time.monotonic()
        except Exception as exc:  # no answer in time, or the connection refused
            self.ready = False
            self.error = f"no answer within {deadline_s:g} s" if "Deadline" in str(exc) \
                else str(exc).splitlines()[0][:200]

    def silent_s(self) -> float:
        """Seconds since tritonserver last answered (0 when it answered at the last probe)."""
        return time.monotonic() - self._answered if self._client is not None else 0.0

    def snapshot(self) -> dict[str, Any]:
        return {"ready": self.ready, "error": self.error, "answered_s_ago": round(self.silent_s(), 1)}

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


def _without_backtrace(lines: list[str]) -> list[str]:
    """Log lines minus the frames of a crash backtrace ("12# 0x... in ..."), which say nothing to an operator."""
    return [line for line in lines if not re.match(r"\s*\d+# ", line)]
