"""A real single-member etcd on loopback (Debian's ``etcd-server``), for the tests and the propagation benchmark.

    apt-get install -y etcd-server        # bookworm: 3.4.23 at /usr/bin/etcd

Loopback client and peer URLs on free ports below Linux's ephemeral range (the engine is stopped and restarted on
the same ports while clients keep reconnecting; an ephemeral port could meanwhile be some client's source port),
never 2379 (a system etcd may hold it). A private data dir, quiet logs, compaction by revision. etcd fsyncs its WAL
before it acknowledges a write; 3.4 has no switch to turn that off. The short election timeout only shortens a
one-member engine's start (restart ready in about 0.4 s); production clusters keep their own tuning.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fire_backend.stores.etcd.client import EtcdClient

if TYPE_CHECKING:
    import ssl

ETCD_BINARY = "etcd"
READY_TIMEOUT_S = 20.0
PORT_RANGE = (20000, 32000)


def etcd_binary() -> str | None:
    """The etcd executable, or None when it is not installed."""
    return shutil.which(ETCD_BINARY) or next((p for p in ("/usr/bin/etcd",) if os.access(p, os.X_OK)), None)


def free_port() -> int:
    """A free loopback port in PORT_RANGE (below the ephemeral range 32768-60999)."""
    for _ in range(200):
        port = random.randint(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {PORT_RANGE[0]}-{PORT_RANGE[1]}")


@dataclass
class LocalEtcd:
    """One etcd process; :meth:`start` again after :meth:`stop` restarts it on the same ports and data.

    ``tls_dir``: serve HTTPS and require client certificates (``ca.crt``, ``server.crt``/``.key`` with serverAuth
    and clientAuth, ``client.crt``/``.key``); :meth:`url` then names the client's files.
    """

    data_dir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    tls_dir: Path | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def url(self, prefix: str) -> str:
        url = f"etcd://{self.endpoint}/{prefix.strip('/')}"
        if self.tls_dir:
            url += f"?ca={self.tls_dir}/ca.crt&cert={self.tls_dir}/client.crt&key={self.tls_dir}/client.key"
        return url

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"etcd-{self.client_port}.log"

    def command(self) -> list[str]:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError("etcd is not installed: apt-get install etcd-server")
        client, peer = f"{'https' if self.tls_dir else 'http'}://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        tls = [] if not self.tls_dir else [
            "--cert-file", str(self.tls_dir / "server.crt"), "--key-file", str(self.tls_dir / "server.key"),
            "--trusted-ca-file", str(self.tls_dir / "ca.crt"), "--client-cert-auth"]
        return [binary, "--name", "fire", "--data-dir", str(self.data_dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"fire={peer}", "--initial-cluster-state", "new",
                "--logger", "zap", "--log-level", "warn",
                "--heartbeat-interval", "20", "--election-timeout", "200",
                "--auto-compaction-mode", "revision", "--auto-compaction-retention", "1000", *tls]

    def start(self, ready_timeout: float = READY_TIMEOUT_S) -> float:
        """Start, and wait until /health says true (one retry: a start has hung once in many); returns seconds."""
        for attempt in (1, 2):
            try:
                return self._start(ready_timeout)
            except TimeoutError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start(self, ready_timeout: float) -> float:
        t0 = time.monotonic()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        atexit.register(self.stop, kill=True)  # never outlive the process that started it
        probe = EtcdClient("127.0.0.1", self.client_port, timeout=0.5, tls=self._client_tls())
        while time.monotonic() - t0 < ready_timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}; the end of {self.log_path}:\n"
                                   f"{self.log_path.read_text()[-2000:]}")
            if probe.healthy():
                return time.monotonic() - t0
            time.sleep(0.02)
        self.stop(kill=True)
        raise TimeoutError(f"etcd not ready after {ready_timeout} s; the end of {self.log_path}:\n"
                           f"{self.log_path.read_text()[-2000:]}")

    def _client_tls(self) -> ssl.SSLContext | None:
        if not self.tls_dir:
            return None
        import ssl

        context = ssl.create_default_context(cafile=str(self.tls_dir / "ca.crt"))
        context.load_cert_chain(str(self.tls_dir / "client.crt"), str(self.tls_dir / "client.key"))
        return context

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (graceful) or SIGKILL (a crash), and wait for the exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
