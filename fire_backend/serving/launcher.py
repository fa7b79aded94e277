"""Start, watch and stop a local ``tritonserver`` process.

The ``nvidia-pytriton`` wheel ships a complete Triton Inference Server build (``pytriton/tritonserver``)
plus one Python-backend stub per CPython minor version. We do not use PyTriton's own server wrapper
(it assumes its proxy backend); instead we run the binary directly against our own model repository:

* the shipped tree is copied once into a per-Python-version cache directory, and the stub matching the
  running interpreter is dropped into ``backends/python/`` (Triton looks for it next to
  ``libtriton_python.so``);
* the bundled shared libraries live in ``site-packages/nvidia_pytriton.libs`` and go on
  ``LD_LIBRARY_PATH``;
* the stub embeds libpython and finds its ``sys.prefix`` by looking for ``python3`` on ``PATH``, so the
  directory of ``sys.executable`` goes first on ``PATH`` -- that is what makes the stub import this
  virtualenv's packages (numpy, torch, ``fire_backend``).

The server runs in its own session/process group so that stopping it can also reap the
``triton_python_backend_stub`` children it forks, and nothing is left behind holding ports or
``/dev/shm`` regions.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

LOGGER = logging.getLogger(__name__)

#: HTTP header that must carry ``restricted_api_key`` for model-repository (load/unload) calls.
RESTRICTED_API_HEADER = "fire-admin"
#: gRPC metadata key for the same secret: Triton prefixes gRPC restricted-protocol headers.
RESTRICTED_GRPC_HEADER = f"triton-grpc-protocol-{RESTRICTED_API_HEADER}"
#: Triton API group locked behind ``restricted_api_key``.
RESTRICTED_APIS = "model-repository"

_LOG_TAIL_LINES = 40
_SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
_REDACTED = "***"
_WILDCARD_HOSTS = {"0.0.0.0", "::", ""}
_STAMP_NAME = ".fire-backend-stamp"


class TritonServerError(RuntimeError):
    """Raised when tritonserver cannot be prepared, started or is found dead."""


class _StopRequested(BaseException):
    """Raised from serve_forever's signal handler to interrupt a startup in progress."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything needed to launch one tritonserver.

    Defaults bind to loopback only: the model-repository API can load arbitrary code, so exposing the
    server on other interfaces must be an explicit decision (``host="0.0.0.0"``).
    """

    repository: Path
    #: bind address for HTTP, gRPC and metrics.
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    #: models loaded at start (explicit model control); empty means every */config.pbtxt in the repository.
    models: tuple[str, ...] = ()
    log_verbose: int = 0
    #: OMP/MKL threads per process (server and every stub); small boxes thrash with the default.
    omp_threads: int = 1
    #: when set, the model-repository API (load/unload/index) requires header ``fire-admin: <key>`` over
    #: HTTP and metadata ``triton-grpc-protocol-fire-admin: <key>`` over gRPC.
    restricted_api_key: str | None = None
    #: extra environment for the server and so for the Python-backend stubs (e.g. FIRE_CONTROL_TOKEN).
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: generous: 7 stubs each importing torch take ~15-35 s on 2 busy cores.
    startup_timeout_s: float = 180.0
    #: tritonserver's --exit-timeout-secs: on SIGTERM it waits this long for in-flight requests *and for
    #: open client connections* (idle HTTP keep-alives count) before exiting; keep it below stop()'s timeout.
    exit_timeout_s: int = 5
    #: server stdout/stderr; default is ``tritonserver.log`` in a private work directory.
    log_file: Path | None = None

    def __post_init__(self) -> None:
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        for name, port in ports.items():
            if not 0 < int(port) < 65536:
                raise ValueError(f"{name}={port} is not a valid TCP port")
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"http/grpc/metrics ports must differ, got {ports}")
        if self.exit_timeout_s < 0:
            raise ValueError("exit_timeout_s must be >= 0")
        if self.omp_threads < 1:
            raise ValueError("omp_threads must be >= 1")
        if "*" in self.models and len(self.models) > 1:
            raise ValueError("models: '*' cannot be combined with explicit model names")
        if self.restricted_api_key is not None and (
            not self.restricted_api_key or any(c in self.restricted_api_key for c in " ,:=\n")
        ):
            # Triton parses "<apis>:<header>=<value>"; these characters would corrupt the flag.
            raise ValueError("restricted_api_key must be non-empty and must not contain ' ,:=' or newlines")


# --------------------------------------------------------------------------------------------------
# ports
# --------------------------------------------------------------------------------------------------


def repository_models(repository: Path) -> tuple[str, ...]:
    """Every model directory (one with a config.pbtxt) in a repository.

    Used instead of ``--load-model=*`` because a FIRE repository also holds a non-model
    ``artifacts/`` directory, which '*' would try (and fail) to load.
    """
    names = tuple(sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt")))
    if not names:
        raise TritonServerError(f"{repository}: no models (no */config.pbtxt); build one with `fire repo build`")
    return names


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it; racy by nature)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``n`` distinct free TCP ports (sockets are held open together so the OS can't repeat one)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(_family(host), socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_in_use(host: str, port: int) -> bool:
    """True when something already listens on ``host:port``.

    SO_REUSEADDR mirrors what tritonserver does, so a port merely in TIME_WAIT is not reported as busy.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise TritonServerError(f"cannot bind {host}:{port}: {exc}") from exc
    return False


# --------------------------------------------------------------------------------------------------
# server tree
# --------------------------------------------------------------------------------------------------


def _pytriton_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError("nvidia-pytriton is not installed: pip install nvidia-pytriton==0.7.0")
    return Path(next(iter(spec.submodule_search_locations)))


def _libs_dir() -> Path:
    # auditwheel puts the wheel's bundled .so files next to the package as "<dist>.libs".
    return _pytriton_root().parent / "nvidia_pytriton.libs"


def _py_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _cache_root() -> Path:
    override = os.environ.get("FIRE_BACKEND_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fire-backend"


def prepare_server_tree(cache_root: Path | None = None) -> Path:
    """Return a ready-to-run copy of the wheel's tritonserver tree with this Python's stub installed.

    Built once per (Python minor version, source wheel) and rebuilt when the tree is damaged. Building
    happens in a temp dir that is renamed into place, so concurrent launchers (parallel tests) never see
    a half-copied tree.
    """
    src = _pytriton_root() / "tritonserver"
    stub_src = src / "python_backend_stubs" / _py_version() / "triton_python_backend_stub"
    binary_src = src / "bin" / "tritonserver"
    if not binary_src.is_file():
        raise TritonServerError(f"tritonserver binary not found at {binary_src}")
    if not stub_src.is_file():
        raise TritonServerError(
            f"no Python-backend stub for Python {_py_version()} in {stub_src.parent.parent}; "
            "use a Python version the nvidia-pytriton wheel supports"
        )
    bst, sst = binary_src.stat(), stub_src.stat()
    stamp = f"{src}|{bst.st_size}|{bst.st_mtime_ns}|{sst.st_size}|{sst.st_mtime_ns}"

    root = cache_root or _cache_root()
    # Keyed by the source too, so two venvs with the same Python never rebuild each other's live tree.
    dest = root / f"tritonserver-{_py_version()}-{hashlib.sha256(stamp.encode()).hexdigest()[:10]}"
    if _tree_ok(dest, stamp):
        return dest

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tritonserver-{_py_version()}-", dir=root))
    try:
        build = tmp / "tree"
        shutil.copytree(src, build, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        stub_dst = build / "backends" / "python" / "triton_python_backend_stub"
        shutil.copy2(stub_src, stub_dst)
        for exe in (stub_dst, build / "bin" / "tritonserver"):
            exe.chmod(0o755)
        (build / _STAMP_NAME).write_text(stamp)
        if dest.exists():
            # Damaged: move aside first (rename is atomic; rmtree of a live dir is not).
            stale = tmp / "stale"
            with contextlib.suppress(OSError):
                dest.rename(stale)
        try:
            build.rename(dest)
        except OSError:
            if not _tree_ok(dest, stamp):  # lost a race to a concurrent builder that produced a bad tree
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    LOGGER.info("prepared tritonserver tree in %s", dest)
    return dest


def _tree_ok(dest: Path, stamp: str) -> bool:
    try:
        return (
            (dest / _STAMP_NAME).read_text() == stamp
            and (dest / "bin" / "tritonserver").is_file()
            and (dest / "backends" / "python" / "triton_python_backend_stub").is_file()
            and (dest / "backends" / "python" / "libtriton_python.so").is_file()
        )
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# redaction
# --------------------------------------------------------------------------------------------------


def _is_secret_name(name: str) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in _SECRET_MARKERS)


def redact_args(args: list[str], secrets_: list[str]) -> list[str]:
    """Copy of ``args`` with every secret value replaced by ``***`` (for logs and error messages)."""
    out = []
    for arg in args:
        for value in secrets_:
            if value:
                arg = arg.replace(value, _REDACTED)
        out.append(arg)
    return out


# --------------------------------------------------------------------------------------------------
# server
# --------------------------------------------------------------------------------------------------


def _pdeathsig_preexec() -> Any:
    """Child-side hook asking the kernel to SIGTERM tritonserver if the launching thread dies.

    Guards against orphaned servers (holding ports) when the Python parent is SIGKILLed. libc is loaded
    here, in the parent, so the child only does one syscall between fork and exec.
    Caveat of PR_SET_PDEATHSIG: it fires when the *thread* that forked exits, so start the server from a
    long-lived thread (the main thread in the CLI and in tests).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    pr_set_pdeathsig = 1

    def _hook() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    return _hook


class TritonServer:
    """One tritonserver subprocess bound to ``config``; usable as a context manager.

    ``start()`` returns only once ``/v2/health/ready`` answers 200, i.e. every requested model is loaded
    (Triton's strict readiness), so callers can send requests right away.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._work_dir: Path | None = None
        self._log_path: Path | None = None
        self._shm_prefix = f"fire{os.getpid()}x{secrets.token_hex(4)}_"
        self._lock = threading.RLock()
        self.startup_s: float | None = None  #: seconds from spawn to ready, for diagnostics

    # -- endpoints -----------------------------------------------------------------------------------

    @property
    def _connect_host(self) -> str:
        """Address clients should dial: loopback when bound to a wildcard address."""
        host = self.config.host
        if host in _WILDCARD_HOSTS:
            return "::1" if host == "::" else "127.0.0.1"
        return host

    @property
    def urls(self) -> dict[str, str]:
        """Client endpoints: ``http``/``metrics`` as URLs, ``grpc`` as ``host:port`` (tritonclient style)."""
        host = self._connect_host
        h = f"[{host}]" if ":" in host else host
        return {
            "http": f"http://{h}:{self.config.http_port}",
            "grpc": f"{h}:{self.config.grpc_port}",
            "metrics": f"http://{h}:{self.config.metrics_port}/metrics",
        }

    @property
    def log_path(self) -> Path | None:
        """Where the server's stdout/stderr go (None before ``start``)."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- command line --------------------------------------------------------------------------------

    def build_args(self, tree: Path) -> list[str]:
        """The tritonserver argv (contains the restricted-API key; redact before printing)."""
        c = self.config
        args = [
            str(tree / "bin" / "tritonserver"),
            f"--model-repository={Path(c.repository).resolve()}",
            f"--backend-directory={tree / 'backends'}",
            f"--cache-directory={tree / 'caches'}",
            f"--http-address={c.host}",
            f"--http-port={c.http_port}",
            f"--grpc-address={c.host}",
            f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.host}",
            f"--metrics-port={c.metrics_port}",
            # No GPU here; also keeps the server from trying to talk to NVML on CPU-only hosts.
            "--allow-gpu-metrics=false",
            f"--log-verbose={c.log_verbose}",
            f"--exit-timeout-secs={c.exit_timeout_s}",
            # Explicit control lets operators (un)load models at runtime; '*' loads everything at start.
            "--model-control-mode=explicit",
            # A unique shm prefix keeps concurrent servers (parallel tests) from colliding in /dev/shm.
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]
        args += [f"--load-model={m}" for m in (c.models or repository_models(Path(c.repository)))]
        if c.restricted_api_key:
            value = f"{RESTRICTED_APIS}:{RESTRICTED_API_HEADER}={c.restricted_api_key}"
            args += [f"--http-restricted-api={value}", f"--grpc-restricted-protocol={value}"]
        return args

    def build_env(self) -> dict[str, str]:
        """Environment for the server; inherited by every Python-backend stub."""
        env = dict(os.environ)
        libs = str(_libs_dir())
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libs, env.get("LD_LIBRARY_PATH")) if p)
        # The stub locates its Python prefix (and so site-packages) via `python3` on PATH.
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "/usr/bin:/bin")) if p)
        threads = str(self.config.omp_threads)
        env["OMP_NUM_THREADS"] = threads
        env["MKL_NUM_THREADS"] = threads
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # spinning OpenMP workers starve the other processes on few cores
        env.pop("PYTHONHOME", None)  # would override the venv prefix discovery above
        env.update({str(k): str(v) for k, v in self.config.extra_env.items()})
        return env

    def _secrets(self) -> list[str]:
        vals = [self.config.restricted_api_key or ""]
        vals += [str(v) for k, v in self.config.extra_env.items() if _is_secret_name(str(k))]
        return [v for v in vals if v]

    def redacted_command(self, tree: Path | None = None) -> str:
        """Printable command line with secrets replaced by ``***``."""
        args = redact_args(self.build_args(tree or Path("<tritonserver>")), self._secrets())
        return subprocess.list2cmdline(args)

    # -- lifecycle -----------------------------------------------------------------------------------

    def _check_ports(self) -> None:
        c = self.config
        for proto, port in (("http", c.http_port), ("grpc", c.grpc_port), ("metrics", c.metrics_port)):
            if _port_in_use(c.host, port):
                raise TritonServerError(
                    f"port {port} in use on {c.host} (needed for {proto}): pass --{proto}-port "
                    f"with a free port, or stop whatever listens there"
                )

    def start(self) -> None:
        """Prepare the server tree, spawn tritonserver and block until it is ready.

        Raises TritonServerError (with the last log lines) if the process dies or does not become ready
        within ``startup_timeout_s``; the process group is cleaned up before raising.
        """
        with self._lock:
            if self.is_alive():
                raise TritonServerError(f"tritonserver already running (pid {self.pid})")
            repo = Path(self.config.repository)
            if not repo.is_dir():
                raise TritonServerError(f"model repository {repo} does not exist or is not a directory")
            self._check_ports()
            tree = prepare_server_tree()

            self._work_dir = Path(tempfile.mkdtemp(prefix="fire-tritonserver-"))
            self._log_path = Path(self.config.log_file or self._work_dir / "tritonserver.log")
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            args = self.build_args(tree)
            LOGGER.info("starting %s", self.redacted_command(tree))
            with open(self._log_path, "ab") as log:
                # Marks where this run starts when a user-given log file is appended to across runs.
                log.write(f"=== fire-backend: {self.redacted_command(tree)}\n".encode())
                log.flush()
                self._proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.build_env(),
                    cwd=self._work_dir,
                    start_new_session=True,  # own process group: stop() can signal server + stubs at once
                    preexec_fn=_pdeathsig_preexec(),
                )
            t0 = time.monotonic()
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop(timeout_s=5.0)
            raise
        self.startup_s = time.monotonic() - t0
        LOGGER.info("tritonserver ready in %.1fs at %s", self.startup_s, self.urls["http"])

    def _wait_ready(self, t0: float) -> None:
        assert self._proc is not None
        url = self.urls["http"] + "/v2/health/ready"
        # No proxies: an HTTP(S)_PROXY in the environment would otherwise swallow loopback health checks.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = t0 + self.config.startup_timeout_s
        delay = 0.05
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {rc} during startup.\n{self._failure_context()}"
                )
            try:
                with opener.open(url, timeout=2.0) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 400 while models are loading
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {self.config.startup_timeout_s:.0f}s "
                    f"(startup_timeout_s).\n{self._failure_context()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _failure_context(self) -> str:
        tail = "\n".join(self.log_tail())
        return (
            f"command: {self.redacted_command()}\n"
            f"log: {self._log_path}\n"
            f"--- last {_LOG_TAIL_LINES} log lines ---\n{tail}"
        )

    def log_tail(self, n: int = _LOG_TAIL_LINES) -> list[str]:
        """Last ``n`` lines of the server log, secrets redacted."""
        if self._log_path is None or not self._log_path.exists():
            return []
        with open(self._log_path, encoding="utf-8", errors="replace") as fh:
            lines = [line.rstrip("\n") for line in deque(fh, maxlen=n)]
        return redact_args(lines, self._secrets())

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server and every process in its group; idempotent.

        SIGTERM goes to the whole group; tritonserver then unloads models (stubs run ``finalize``) and
        exits. Anything still alive after ``timeout_s`` -- or left over after the server exited -- gets
        SIGKILL, and the stubs' ``/dev/shm`` regions are removed.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            pgid = proc.pid  # start_new_session => the server leads its own group
            if proc.poll() is None:
                _killpg(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    LOGGER.warning(
                        "tritonserver did not exit within %.0fs; killing its process group", timeout_s
                    )
                    _killpg(pgid, signal.SIGKILL)
                    proc.wait()
            # Stubs notice the parent is gone and exit on their own, but don't trust it.
            deadline = time.monotonic() + 2.0
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _group_alive(pgid):
                _killpg(pgid, signal.SIGKILL)
            self._cleanup_shm()
            clean_exit = proc.returncode in (0, -signal.SIGTERM)
            if self._work_dir is not None and (self.config.log_file is not None or clean_exit):
                # The private work dir only holds the default log: keep it for post-mortems after a failure.
                shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    def _cleanup_shm(self) -> None:
        shm = Path("/dev/shm")
        if not shm.is_dir():
            return
        for leftover in shm.glob(f"{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def wait(self) -> int:
        """Block until the server exits; return its exit code."""
        if self._proc is None:
            raise TritonServerError("tritonserver was never started")
        return self._proc.wait()

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------------------
# conveniences
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(repository: Path | str, **overrides: Any) -> Iterator[TritonServer]:
    """Run a server on fresh free ports for the duration of the block (for tests and scripts).

    Ports not given in ``overrides`` are picked with :func:`free_ports`.
    """
    host = overrides.get("host", "127.0.0.1")
    ports = iter(free_ports(3, "127.0.0.1" if host in _WILDCARD_HOSTS else host))
    for key in ("http_port", "grpc_port", "metrics_port"):
        port = next(ports)
        overrides.setdefault(key, port)
    config = ServerConfig(repository=Path(repository), **overrides)
    server = TritonServer(config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def serve_forever(config: ServerConfig) -> int:
    """Run the server in the foreground until SIGINT/SIGTERM or until it dies; return an exit code.

    Used by ``fire serve``: 0 after a clean signal-triggered stop, the server's code if it died on its own,
    1 if it could not start.
    """
    server = TritonServer(config)
    stop_requested = threading.Event()
    state = {"starting": True}

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()
        if state["starting"]:
            # Abort the (possibly long) readiness wait once; start() stops the half-started server.
            state["starting"] = False
            raise _StopRequested(signum)

    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except TritonServerError as exc:
            print(f"fire serve: {exc}", file=sys.stderr)
            return 1
        finally:
            state["starting"] = False
        if not stop_requested.is_set():
            startup = f" in {server.startup_s:.1f}s" if server.startup_s is not None else ""
            print(f"tritonserver ready{startup} (pid {server.pid}, log {server.log_path})", flush=True)
            for name, url in server.urls.items():
                print(f"{name}: {url}", flush=True)
        while not stop_requested.wait(0.5):
            if not server.is_alive():
                rc = server.wait()
                tail = "\n".join(server.log_tail())
                print(f"fire serve: tritonserver exited unexpectedly (code {rc})\n{tail}", file=sys.stderr)
                server.stop()
                return rc if rc > 0 else 1
        print("stopping tritonserver ...", flush=True)
        server.stop()
        return 0
    except _StopRequested:
        return 0
    finally:
        if server.is_alive():
            server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def with_free_ports(config: ServerConfig) -> ServerConfig:
    """Copy of ``config`` with http/grpc/metrics moved to free ports (handy for ``fire serve --any-port``)."""
    http, grpc, metrics = free_ports(3, "127.0.0.1" if config.host in _WILDCARD_HOSTS else config.host)
    return replace(config, http_port=http, grpc_port=grpc, metrics_port=metrics)


__all__ = [
    "RESTRICTED_API_HEADER",
    "RESTRICTED_GRPC_HEADER",
    "ServerConfig",
    "TritonServer",
    "TritonServerError",
    "free_port",
    "free_ports",
    "prepare_server_tree",
    "running_server",
    "serve_forever",
    "with_free_ports",
]
