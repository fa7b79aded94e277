"""Start, watch and stop a local ``tritonserver`` process: its configuration, command line, environment and
process group.

The binary comes from :mod:`fire_backend.launcher.server_tree`. The stub embeds libpython and finds its
``sys.prefix`` by looking for ``python3`` on ``PATH``, so the directory of ``sys.executable`` goes first on
``PATH`` -- that is what makes the stub import this virtualenv's packages (numpy, torch, ``fire_backend``).

The server runs in its own session/process group so that stopping it can also reap the
``triton_python_backend_stub`` children it forks, and nothing is left behind holding ports or
``/dev/shm`` regions (:mod:`fire_backend.launcher.shm`).

No client talks to tritonserver's own HTTP and metrics servers (one malformed request crashes Triton 2.51's): they
listen on Unix sockets in a private 0700 directory, and the HTTP front (:mod:`fire_backend.front.proxy`) alone
listens on the HTTP and metrics ports, checks every request and forwards the well-formed ones. The front starts
with the first ``start()`` and outlives restarts of tritonserver (answering 503 meanwhile) until ``close()``.
Clients reach tritonserver's gRPC directly.

Least exposure by default: every Triton API a client does not need is closed on both protocols (model
repository, shared memory, logging, trace). They are closed with a header name no client can send, so the command
line holds no secret; the control token reaches the stubs through the environment (``/proc/<pid>/environ`` is 0400). The
server and its stubs run with umask 077. ``*TOKEN*``/``*KEY*`` variables of ``extra_env`` are redacted from
every command line and log tail this module shows.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import http.client
import importlib.util
import logging
import os
import py_compile
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fire_backend.front.proxy import BindError, Front, Upstream
from fire_backend.launcher import shm
from fire_backend.launcher.model_configs import stub_models
from fire_backend.launcher.ports import WILDCARD_HOSTS, free_ports, port_in_use
from fire_backend.launcher.server_tree import ServerTreeError, libs_dir, prepare_server_tree
from fire_backend.launcher.stub_health import StubHealthKeeper
from fire_backend.repository.layout import models_dir, old_layout_error
from fire_backend.wire.names import DEFAULT_HOST, DEFAULT_METRICS_PORT, DEFAULT_PORTS

LOGGER = logging.getLogger(__name__)

#: Triton "restricts" an API group to requests carrying this header. Its name holds a ':', which no HTTP/1.1
#: client can send as a header name and which HTTP/2 (gRPC) rejects in metadata keys (tested against Triton
#: 2.51 with raw sockets), so the groups are closed to everyone and the value is no secret.
UNSENDABLE_HEADER = "fire:never"
UNSENDABLE_VALUE = "x"
#: API groups no client needs, closed on both protocols: loading code, writing into the stubs' shared memory,
#: switching the log level (disk filling) and tracing.
CLOSED_APIS = ("model-repository", "shared-memory", "logging", "trace")
#: the server's and stubs' umask: nothing they write is readable by other users
SERVER_UMASK = 0o077
MIB = 1 << 20
#: every stub's shared-memory region starts this large (the Python backend's ``shm-default-byte-size``; Triton
#: allocates it whole): a control request within MAX_CONTROL_REQUEST_BYTES and its answer, or a batch of 64
#: CIFAR-size images, fit without the region growing. Regions never shrink, and each growth maps the region anew
#: (the old mappings stay), so growing is for requests no client of ours sends.
STUB_REGION_BYTES = 4 * MIB
#: how much a region grows by when it must (``shm-growth-byte-size``)
STUB_REGION_GROWTH_BYTES = 4 * MIB

_LOG_TAIL_LINES = 40
_SECRET_MARKERS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
_REDACTED = "***"


class TritonServerError(RuntimeError):
    """Raised when tritonserver cannot be prepared, started or is found dead."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything needed to launch one tritonserver.

    Defaults bind to loopback only: exposing the server on other interfaces must be an explicit decision
    (``host="0.0.0.0"``), and then needs TLS and client authentication in front (the HTTP front bounds bodies,
    not who may call).
    """

    #: the repository root: tritonserver serves its ``models/`` folder (see :mod:`fire_backend.repository.layout`).
    repository: Path
    #: bind address of the HTTP front (HTTP and metrics ports) and of tritonserver's gRPC.
    host: str = DEFAULT_HOST
    http_port: int = DEFAULT_PORTS["http"]
    grpc_port: int = DEFAULT_PORTS["grpc"]
    metrics_port: int = DEFAULT_METRICS_PORT
    log_verbose: int = 0
    #: OMP/MKL threads per process (server and every stub); small boxes thrash with the default.
    omp_threads: int = 1
    #: KServe v2 inference over HTTP through the front (gRPC inference is always open); False answers 403.
    http_inference: bool = True
    #: for comparisons only (``fire bench --protocol triton-http``): tritonserver's own HTTP also listens on this
    #: loopback TCP port, unguarded, and the front forwards to it there. None: a private Unix socket only.
    triton_http_port: int | None = None
    #: a private /dev/shm for the stubs (:mod:`fire_backend.launcher.shm`): None uses one when the kernel allows
    #: it, True requires it, False uses the host's /dev/shm with lock-file cleanup.
    private_shm: bool | None = None
    #: size cap of the private /dev/shm in MiB; default from the number of stubs (shm.shm_size_mib)
    shm_size_mib: int | None = None
    #: extra environment for the server and so for the Python-backend stubs (e.g. FIRE_CONTROL_TOKEN).
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: generous: 7 stubs each importing torch take ~15-35 s on 2 busy cores.
    startup_timeout_s: float = 180.0
    #: tritonserver's --exit-timeout-secs: on SIGTERM it waits this long for in-flight requests *and for
    #: open client connections* (idle HTTP keep-alives count) before exiting; keep it below stop()'s timeout.
    exit_timeout_s: int = 5
    #: server stdout/stderr; default is ``tritonserver.log`` in a private work directory.
    log_file: Path | None = None
    #: keep every live stub's health flag set from outside (:mod:`fire_backend.launcher.stub_health`), so a stub
    #: that stalls for more than a second is waited for instead of breaking the server; off only to show why
    keep_stubs_healthy: bool = True

    def __post_init__(self) -> None:
        ports = {"http_port": self.http_port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        if self.triton_http_port is not None:
            ports["triton_http_port"] = self.triton_http_port
        for name, port in ports.items():
            if not 0 < int(port) < 65536:
                raise ValueError(f"{name}={port} is not a valid TCP port")
        if len(set(ports.values())) != len(ports):
            raise ValueError(f"the ports must differ, got {ports}")
        if self.exit_timeout_s < 0:
            raise ValueError("exit_timeout_s must be >= 0")
        if self.omp_threads < 1:
            raise ValueError("omp_threads must be >= 1")
        if self.shm_size_mib is not None and self.shm_size_mib < 8:
            raise ValueError("shm_size_mib must be >= 8")


#: how often tritonserver's poll mode rescans the models folder (a touched version directory reloads its model)
POLL_SECONDS = 2


def triton_repository(repository: Path) -> Path:
    """The folder tritonserver serves: ``<repository>/models``, which must hold models only.

    Poll mode loads every directory there (a non-model one makes the server exit at start), and is what keeps
    Triton's load/unload API refused; so the repository keeps its artifacts beside, not inside, that folder.
    """
    folder = models_dir(Path(repository))
    if not any(folder.glob("*/config.pbtxt")):
        raise TritonServerError(old_layout_error(Path(repository))
                                or f"{repository}: no models in {folder} (no */config.pbtxt); build a repository "
                                   "with `fire repo build`")
    return folder


def precompile_models(folder: Path) -> None:
    """Write each ``model.py``'s bytecode before tritonserver records the folder's modification times.

    Otherwise the first stub to import a model.py writes ``__pycache__`` into its version directory, which poll
    mode takes for a changed model and reloads (once, seconds after startup). The stubs embed Python with an
    isolated configuration, so ``PYTHONDONTWRITEBYTECODE`` does not reach them. A read-only repository needs
    nothing: the stubs cannot write there either.

    Only missing or stale bytecode is written: servers sharing one repository would otherwise rewrite it at each
    start, and every server already running would reload its models under traffic.
    """
    for source in folder.glob("*/*/model.py"):
        with contextlib.suppress(OSError, py_compile.PyCompileError):
            if not _bytecode_current(source):  # timestamp mode always: SOURCE_DATE_EPOCH would pick hash-checked
                py_compile.compile(str(source), doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)


def _bytecode_current(source: Path) -> bool:
    """Whether ``source``'s cached bytecode is what this interpreter would load as is (a timestamp-checked .pyc:
    magic number, flags 0, the source's modification time and size, as importlib compares them)."""
    try:
        with open(importlib.util.cache_from_source(str(source)), "rb") as fh:
            header = fh.read(16)
    except OSError:
        return False
    stat = source.stat()
    expected = (importlib.util.MAGIC_NUMBER + bytes(4) + (int(stat.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
                + (stat.st_size & 0xFFFFFFFF).to_bytes(4, "little"))
    return header == expected


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


def _child_setup() -> Any:
    """Child-side hook run between fork and exec: umask 077, and SIGTERM to tritonserver if the launcher dies.

    The death signal guards against orphaned servers (holding ports) when the Python parent is SIGKILLed. libc
    is loaded here, in the parent, so the child only makes two syscalls. Caveat of PR_SET_PDEATHSIG: it fires
    when the *thread* that forked exits, so start the server from a long-lived thread.
    """
    libc = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1

    def _hook() -> None:
        os.umask(SERVER_UMASK)
        if libc is not None:
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)

    return _hook


#: the longest path a Unix socket may have (sun_path, less its NUL)
_UNIX_PATH_MAX = 107


def _socket_dir() -> Path:
    """Where a server's private sockets go (created 0700 at start): the temp directory, or /tmp where its path
    would make a socket path too long."""
    name = f"fire-triton-{secrets.token_hex(6)}"
    base = Path(tempfile.gettempdir())
    return (base if len(str(base / name / "metrics.sock")) <= _UNIX_PATH_MAX else Path("/tmp")) / name


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (tritonserver's private HTTP)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("tritonserver", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class TritonServer:
    """One tritonserver subprocess bound to ``config``, behind its HTTP front; usable as a context manager.

    ``start()`` returns only once tritonserver's ``/v2/health/ready`` answers 200, i.e. every requested model is
    loaded (Triton's strict readiness), so callers can send requests right away. ``stop()`` ends tritonserver;
    ``close()`` (or leaving the ``with`` block) ends the front too.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._work_dir: Path | None = None
        self._log_path: Path | None = None
        self._shm: shm.ShmClaim | None = None
        self._keeper: StubHealthKeeper | None = None
        self._starts = 0
        self._crashed = False  #: some start of this server ended other than by a requested stop
        self._lock = threading.RLock()
        self._sockets = _socket_dir()
        self._front: Front | None = None
        self.startup_s: float | None = None  #: seconds from spawn to ready, for diagnostics

    # -- endpoints -----------------------------------------------------------------------------------

    @property
    def connect_host(self) -> str:
        """Address clients should dial: loopback when bound to a wildcard address."""
        host = self.config.host
        if host in WILDCARD_HOSTS:
            return "::1" if host == "::" else "127.0.0.1"
        return host

    def url_host(self) -> str:
        """``connect_host`` as it goes into a URL (IPv6 in brackets)."""
        host = self.connect_host
        return f"[{host}]" if ":" in host else host

    @property
    def urls(self) -> dict[str, str]:
        """Client endpoints: ``http``/``metrics`` (the front) as URLs, ``grpc`` as ``host:port`` (tritonclient
        style); ``triton_http`` too where tritonserver's own HTTP is exposed for comparisons."""
        h = self.url_host()
        urls = {
            "http": f"http://{h}:{self.config.http_port}",
            "grpc": f"{h}:{self.config.grpc_port}",
            "metrics": f"http://{h}:{self.config.metrics_port}/metrics",
        }
        if self.config.triton_http_port is not None:
            urls["triton_http"] = f"http://{DEFAULT_HOST}:{self.config.triton_http_port}"
        return urls

    @property
    def upstream(self) -> Upstream:
        """Where tritonserver's own HTTP and metrics servers listen (the front's upstream; never a client's)."""
        http = f"unix:{self._sockets / 'http.sock'}" if self.config.triton_http_port is None \
            else f"{DEFAULT_HOST}:{self.config.triton_http_port}"
        return Upstream(http=http, metrics=f"unix:{self._sockets / 'metrics.sock'}")

    def triton_ready(self, timeout_s: float = 2.0) -> bool:
        """Whether tritonserver's own ``/v2/health/ready`` answers 200 within ``timeout_s`` (False when it does not
        answer: not started, restarting, frozen)."""
        address = self.upstream.http
        if address.startswith("unix:"):
            connection: http.client.HTTPConnection = _UnixHTTPConnection(address.removeprefix("unix:"), timeout_s)
        else:
            host, port = address.rsplit(":", 1)
            connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
        try:
            connection.request("GET", "/v2/health/ready")
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    @property
    def log_path(self) -> Path | None:
        """Where the server's stdout/stderr go (None before ``start``)."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code once the server exited (negative: the signal that ended it)."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def models_dir(self) -> Path:
        return models_dir(Path(self.config.repository))

    @property
    def private_shm(self) -> bool:
        """Whether this start runs with a private /dev/shm (decided at start)."""
        return self._shm is not None and self._shm.private

    @property
    def shm_prefix(self) -> str | None:
        """The name prefix of this start's stub regions."""
        return self._shm.prefix if self._shm is not None else None

    def region_path(self, region: str) -> Path:
        """Where a stub's region (its argv[2]) can be read from this process."""
        claim = self._shm or shm.ShmClaim("", False)
        return claim.region_path(self.pid, region)

    # -- command line --------------------------------------------------------------------------------

    def build_args(self, tree: Path) -> list[str]:
        """The command line (nothing secret in it: see UNSENDABLE_HEADER).

        HTTP and metrics listen on ``unix:`` addresses (libevhtp binds a Unix socket there and ignores the port,
        which Triton still wants), the front's upstream."""
        c = self.config
        closed = f":{UNSENDABLE_HEADER}={UNSENDABLE_VALUE}"
        http, metrics = (a.removeprefix("unix:") for a in (self.upstream.http, self.upstream.metrics))
        http_address, http_port = (f"unix:{http}", c.http_port) if c.triton_http_port is None \
            else (DEFAULT_HOST, c.triton_http_port)
        args = [
            str(tree / "bin" / "tritonserver"),
            f"--model-repository={triton_repository(Path(c.repository)).resolve()}",
            f"--backend-directory={tree / 'backends'}",
            f"--cache-directory={tree / 'caches'}",
            f"--http-address={http_address}",
            f"--http-port={http_port}",
            f"--grpc-address={c.host}",
            f"--grpc-port={c.grpc_port}",
            f"--metrics-address=unix:{metrics}",
            f"--metrics-port={c.metrics_port}",
            # No GPU here; also keeps the server from trying to talk to NVML on CPU-only hosts.
            "--allow-gpu-metrics=false",
            f"--log-verbose={c.log_verbose}",
            f"--exit-timeout-secs={c.exit_timeout_s}",
            # Poll mode: Triton itself refuses the load/unload API, and a touched version directory reloads
            # that model (how a dead stub is replaced without any API).
            "--model-control-mode=poll",
            f"--repository-poll-secs={POLL_SECONDS}",
            "--strict-readiness=true",
            f"--http-restricted-api={','.join(CLOSED_APIS)}{closed}",
            f"--grpc-restricted-protocol={','.join(CLOSED_APIS)}{closed}",
            # A unique shm prefix keeps concurrent servers (parallel tests) from colliding in /dev/shm.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix or 'fire-'}",
            f"--backend-config=python,shm-default-byte-size={STUB_REGION_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={STUB_REGION_GROWTH_BYTES}",
        ]
        if self.private_shm:
            return shm.private_shm_command(self._shm_size_mib()) + args
        return args

    def _shm_size_mib(self) -> int:
        if self.config.shm_size_mib is not None:
            return self.config.shm_size_mib
        stubs = sum(len(m.instances) for m in stub_models(self.models_dir))
        return shm.shm_size_mib(stubs)

    def build_env(self) -> dict[str, str]:
        """Environment for the server; inherited by every Python-backend stub."""
        env = dict(os.environ)
        libs = str(libs_dir())
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
        return [str(v) for k, v in self.config.extra_env.items() if _is_secret_name(str(k)) and v]

    def redacted_command(self, tree: Path | None = None) -> str:
        """Printable command line with secrets replaced by ``***``."""
        args = redact_args(self.build_args(tree or Path("<tritonserver>")), self._secrets())
        return subprocess.list2cmdline(args)

    # -- lifecycle -----------------------------------------------------------------------------------

    def _claim_shm(self) -> shm.ShmClaim:
        """Decide private or host /dev/shm for this start (and clean what dead servers left on the host's)."""
        wanted = self.config.private_shm
        why_not = shm.private_shm_unavailable() if wanted is not False else "not asked for"
        if wanted is True and why_not:
            raise TritonServerError(f"a private /dev/shm was required but is unavailable: {why_not}")
        if why_not is None:
            return shm.claim(private=True)
        if wanted is None:
            LOGGER.warning("private /dev/shm unavailable (%s): the stubs' regions go to the host's /dev/shm "
                           "(mode 0644, cleaned at the next start after a crash)", why_not)
        shm.sweep_stale()
        return shm.claim(private=False)

    def _check_ports(self) -> None:
        c = self.config
        ports = [("grpc", c.host, c.grpc_port)]
        if c.triton_http_port is not None:
            ports.append(("triton-http", DEFAULT_HOST, c.triton_http_port))
        for proto, host, port in ports:
            try:
                taken = port_in_use(host, port)
            except OSError as exc:
                raise TritonServerError(f"cannot bind {host}:{port}: {exc}") from exc
            if taken:
                raise _port_taken(proto, host, port)

    def _claim_socket_dir(self) -> None:
        """Create the private sockets' directory (0700), or check that the one a previous start made is still ours
        alone, and remove sockets a killed tritonserver left there (libevhtp would not bind over them)."""
        try:
            self._sockets.mkdir(mode=0o700)
        except FileExistsError:
            st = self._sockets.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise TritonServerError(f"{self._sockets} is not a private directory of this user; refusing to put "
                                        "tritonserver's sockets there") from None
        for stale in self._sockets.glob("*.sock"):
            stale.unlink(missing_ok=True)

    def _open_front(self) -> None:
        """Listen on the HTTP and metrics ports (once: the front outlives tritonserver's restarts)."""
        if self._front is not None:
            return
        c = self.config
        front = Front(c.host, c.http_port, c.metrics_port, self.upstream, http_inference=c.http_inference)
        try:
            front.open()
        except BindError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _port_taken(exc.what, exc.host, exc.port) from None
            raise TritonServerError(f"cannot bind {exc.host}:{exc.port}: {exc}") from exc
        self._front = front

    def start(self) -> None:
        """Prepare the server tree, spawn tritonserver and block until it is ready.

        Raises TritonServerError (with the last log lines) if the process dies or does not become ready
        within ``startup_timeout_s``; the process group is cleaned up before raising, and the front too when this
        start opened it (a restart keeps it, answering 503).
        """
        first = self._front is None
        try:
            self._start()
        except BaseException:
            if first:
                self.close()
            raise

    def _start(self) -> None:
        with self._lock:
            if self.is_alive():
                raise TritonServerError(f"tritonserver already running (pid {self.pid})")
            repo = Path(self.config.repository)
            if not repo.is_dir():
                raise TritonServerError(f"model repository {repo} does not exist or is not a directory")
            precompile_models(triton_repository(repo))
            self._check_ports()
            try:
                tree = prepare_server_tree()
            except ServerTreeError as exc:
                raise TritonServerError(str(exc)) from exc
            self._open_front()
            self._claim_socket_dir()

            self._shm = self._claim_shm()
            try:
                self._spawn(tree)
            except BaseException:
                self._shm.release()
                raise
            t0 = time.monotonic()
            if self.config.keep_stubs_healthy:  # from the first stub on: loading waits on the stubs too
                self._keeper = StubHealthKeeper(self._proc.pid, self.region_path).start()
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop(timeout_s=5.0)
            raise
        self.startup_s = time.monotonic() - t0
        LOGGER.info("tritonserver ready in %.1fs; front at %s", self.startup_s, self.urls["http"])

    def _spawn(self, tree: Path) -> None:
        # One work directory, and so one log, for every start of this server: a restart appends to it.
        if self._work_dir is None or not self._work_dir.is_dir():
            self._work_dir = Path(tempfile.mkdtemp(prefix="fire-tritonserver-"))
        self._log_path = Path(self.config.log_file or self._work_dir / "tritonserver.log")
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        args = self.build_args(tree)
        LOGGER.info("starting %s", self.redacted_command(tree))
        log_fd = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(log_fd, "ab") as log:
            # Marks where each start begins in a log appended to across starts (restarts, a user-given file).
            self._starts += 1
            log.write(f"=== fire-backend: start {self._starts} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{self.redacted_command(tree)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.build_env(),
                cwd=self._work_dir,
                start_new_session=True,  # own process group: stop() can signal server + stubs at once
                preexec_fn=_child_setup(),
                # The shm lock, held for as long as the server or a stub of it lives.
                pass_fds=(self._shm.lock_fd,) if self._shm.lock_fd is not None else (),
            )

    def _wait_ready(self, t0: float) -> None:
        assert self._proc is not None
        deadline = t0 + self.config.startup_timeout_s
        delay = 0.05
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {rc} during startup.\n{self._failure_context()}"
                )
            if self.triton_ready():  # False while not listening yet, or 400 while models load
                return
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

    def stop(self, timeout_s: float = 20.0, keep_log: bool = False) -> None:
        """Stop the server and every process in its group; idempotent.

        SIGTERM goes to the whole group; tritonserver then unloads models (stubs run ``finalize``) and
        exits. Anything still alive after ``timeout_s`` -- or left over after the server exited -- gets
        SIGKILL, and the stubs' ``/dev/shm`` regions are removed. The private work directory and its log are
        removed only when ``keep_log`` is false (a restart passes true: the next start appends to the same log)
        and every start of this server ended cleanly: a crash's log outlives the server.
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
            if self._keeper is not None:  # kept through the shutdown: unloading waits on the stubs as well
                self._keeper.stop()
                self._keeper = None
            if self._shm is not None:
                self._shm.release()
            self._crashed |= proc.returncode not in (0, -signal.SIGTERM)
            if keep_log:
                return
            if self._work_dir is not None and (self.config.log_file is not None or not self._crashed):
                # The private work dir only holds the default log: keep it for post-mortems after a failure.
                shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None

    def close(self) -> None:
        """Stop tritonserver and the front; idempotent."""
        self.stop()
        with self._lock:
            if self._front is not None:
                self._front.stop()
                self._front = None
            shutil.rmtree(self._sockets, ignore_errors=True)

    def wait(self) -> int:
        """Block until the server exits; return its exit code."""
        if self._proc is None:
            raise TritonServerError("tritonserver was never started")
        return self._proc.wait()

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _port_taken(proto: str, host: str, port: int) -> TritonServerError:
    return TritonServerError(f"port {port} in use on {host} (needed for {proto}): pass --{proto}-port with a free "
                             "port, or stop whatever listens there")


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


@contextlib.contextmanager
def running_server(repository: Path | str, **overrides: Any) -> Iterator[TritonServer]:
    """Run a server (and its front) on fresh free ports for the duration of the block (for tests and scripts).

    Ports not given in ``overrides`` are picked with :func:`free_ports`.
    """
    host = overrides.get("host", "127.0.0.1")
    ports = iter(free_ports(3, DEFAULT_HOST if host in WILDCARD_HOSTS else host))
    for key in ("http_port", "grpc_port", "metrics_port"):
        port = next(ports)
        overrides.setdefault(key, port)
    config = ServerConfig(repository=Path(repository), **overrides)
    server = TritonServer(config)
    try:
        server.start()
        yield server
    finally:
        server.close()
