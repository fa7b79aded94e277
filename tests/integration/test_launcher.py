"""Integration tests for fire_backend.launcher.server and `fire serve`'s foreground loop: they start the real
tritonserver from the nvidia-pytriton wheel with a tiny Python-backend model (CPU only, ~2 s per start)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from fire_backend.launcher.ports import free_ports
from fire_backend.launcher.server import ServerConfig, TritonServer, TritonServerError, running_server

pytestmark = pytest.mark.integration

SERVER_NAMES = {"tritonserver", "triton_python_backend_stub"}
CONTROL_TOKEN = "control-token-456"

CONFIG_PBTXT = """\
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
dynamic_batching { max_queue_delay_microseconds: 500 }
"""

MODEL_PY = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        {init_body}

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            y = (x * 2).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", y)]))
        return responses
"""


def make_repository(root: Path, name: str = "double", init_body: str = "pass") -> Path:
    """A repository (``root/models/<name>``) with one Python-backend model that doubles an FP32 tensor."""
    model_dir = root / "models" / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(CONFIG_PBTXT)
    (version_dir / "model.py").write_text(MODEL_PY.format(init_body=init_body))
    return root


def server_processes(pids: set[int] | None = None) -> list[psutil.Process]:
    """Live tritonserver/stub processes (optionally only among ``pids``); zombies count as gone."""
    found = []
    for proc in psutil.process_iter(["name", "status"]):
        if proc.info["name"] not in SERVER_NAMES or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if pids is None or proc.pid in pids:
            found.append(proc)
    return found


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # gone meanwhile
        return []


def tree_pids(server: TritonServer) -> set[int]:
    assert server.pid is not None
    root = psutil.Process(server.pid)
    return {root.pid, *(c.pid for c in root.children(recursive=True))}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repo = make_repository(tmp_path_factory.mktemp("repo"))
    with running_server(
        repo,
        extra_env={"FIRE_CONTROL_TOKEN": CONTROL_TOKEN, "FIRE_TEST_MARKER": "hello"},
        omp_threads=1,
    ) as srv:
        yield srv


def test_http_inference(server: TritonServer) -> None:
    import tritonclient.http as httpclient

    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    client = httpclient.InferenceServerClient(server.urls["http"].removeprefix("http://"))
    try:
        assert client.is_server_ready()
        assert client.is_model_ready("double")
        inp = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("double", [inp], outputs=[httpclient.InferRequestedOutput("OUTPUT0")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
    finally:
        client.close()


def test_grpc_inference(server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8)
    client = grpcclient.InferenceServerClient(server.urls["grpc"])
    try:
        assert client.is_model_ready("double")
        inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("double", [inp])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
    finally:
        client.close()


def listening(pid: int) -> dict[int, str]:
    """TCP port -> address of every socket ``pid`` listens on (v4-mapped addresses as IPv4)."""
    return {c.laddr.port: c.laddr.ip.removeprefix("::ffff:")
            for c in psutil.Process(pid).net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def test_urls_and_metrics_bound_to_loopback(server: TritonServer) -> None:
    """The front (this process) alone listens on the HTTP and metrics ports; tritonserver listens on gRPC only, its
    own HTTP and metrics on Unix sockets no other user can open."""
    import urllib.request

    urls = server.urls
    assert urls["http"] == f"http://127.0.0.1:{server.config.http_port}"
    assert urls["grpc"] == f"127.0.0.1:{server.config.grpc_port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urls["metrics"], timeout=5) as resp:
        assert b"nv_inference_count" in resp.read()
    assert server.pid is not None
    assert listening(server.pid) == {server.config.grpc_port: "127.0.0.1"}
    front = listening(os.getpid())
    assert front[server.config.http_port] == front[server.config.metrics_port] == "127.0.0.1", front
    for address in (server.upstream.http, server.upstream.metrics):
        path = Path(address.removeprefix("unix:"))
        assert path.is_socket() and path.stat().st_mode & 0o077 == 0 and path.parent.stat().st_mode & 0o077 == 0
    assert server.triton_ready()


def test_model_repository_api_is_refused(server: TritonServer) -> None:
    """Poll mode and a closed API group: nobody loads, unloads or lists models; inference stays open."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    http = httpclient.InferenceServerClient(server.urls["http"].removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(server.urls["grpc"])
    try:
        for call in (lambda: http.load_model("double"), lambda: grpc.load_model("double"),
                     lambda: http.unload_model("double"), lambda: grpc.unload_model("double"),
                     http.get_model_repository_index, grpc.get_model_repository_index):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        # Inference itself stays open.
        assert http.is_model_ready("double") and grpc.is_model_ready("double")
    finally:
        http.close()
        grpc.close()


def test_stub_environment(server: TritonServer) -> None:
    stubs = [p for p in psutil.Process(server.pid).children(recursive=True) if p.name() in SERVER_NAMES]
    assert stubs, "expected one triton_python_backend_stub"
    env = stubs[0].environ()
    assert env["FIRE_TEST_MARKER"] == "hello"
    assert env["FIRE_CONTROL_TOKEN"] == CONTROL_TOKEN
    assert env["OMP_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_secrets_not_logged_nor_on_the_command_line(server: TritonServer) -> None:
    assert server.log_path is not None
    assert CONTROL_TOKEN not in server.log_path.read_text(errors="replace")
    assert CONTROL_TOKEN not in " ".join(psutil.Process(server.pid).cmdline())
    assert oct(server.log_path.stat().st_mode & 0o777) == oct(0o600)


def test_stop_leaves_no_processes(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo")
    with running_server(repo) as srv:
        pids = tree_pids(srv)
        assert len(server_processes(pids)) == 2  # server + one stub
        shm_prefix = srv.shm_prefix
    assert not srv.is_alive()
    assert server_processes(pids) == []
    assert not list(Path("/dev/shm").glob(f"{shm_prefix}*"))
    assert not Path(srv.upstream.http.removeprefix("unix:")).parent.exists()  # the private sockets' directory
    for port in (srv.config.http_port, srv.config.metrics_port):  # the front closed
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
    srv.close()  # idempotent


def test_old_layout_gives_the_rebuild_command(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo")
    (repo / "models" / "double").rename(repo / "double")
    (repo / "models").rmdir()
    with pytest.raises(TritonServerError, match=r"older layout.*fire repo build --out"):
        TritonServer(ServerConfig(repo, http_port=1, grpc_port=2, metrics_port=3)).start()


@pytest.mark.parametrize("protocol", ["grpc", "http", "metrics"])
def test_busy_port_gives_clear_error(tmp_path: Path, protocol: str) -> None:
    repo = make_repository(tmp_path / "repo")
    ports = dict(zip(("http", "grpc", "metrics"), free_ports(3), strict=True))
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports[protocol]))
        blocker.listen()
        config = ServerConfig(repo, http_port=ports["http"], grpc_port=ports["grpc"], metrics_port=ports["metrics"])
        with pytest.raises(TritonServerError, match=rf"port {ports[protocol]} in use.*pass --{protocol}-port"):
            TritonServer(config).start()
        others = [port for name, port in ports.items() if name != protocol]
        for port in others:  # nothing left listening: the front opened by the failed start closed with it
            with socket.socket() as probe:
                assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_failed_model_load_reports_log_tail(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo", init_body='raise RuntimeError("boom-from-initialize")')
    with pytest.raises(TritonServerError, match="boom-from-initialize") as info:
        with running_server(repo, startup_timeout_s=30, log_file=tmp_path / "server.log"):
            pass
    assert "exited with code" in str(info.value)
    assert str(tmp_path / "server.log") in str(info.value)
    assert [p.pid for p in server_processes() if str(repo) in " ".join(_cmdline(p))] == []  # others' servers aside


def test_serve_forever_stops_on_sigterm(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo")
    http_port, grpc_port, metrics_port = free_ports(3)
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from fire_backend.cli.serving import serve_forever
        from fire_backend.launcher.server import ServerConfig
        cfg = ServerConfig(Path({str(repo)!r}), http_port={http_port}, grpc_port={grpc_port},
                           metrics_port={metrics_port})
        sys.exit(serve_forever(cfg))
        """
    )
    project_root = Path(__file__).resolve().parents[2]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(project_root), os.environ.get("PYTHONPATH")])),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.startswith("metrics:"):
                break
        assert f"http: http://127.0.0.1:{http_port}" in lines, lines
        assert f"grpc: 127.0.0.1:{grpc_port}" in lines, lines
        server_pids = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        assert server_pids
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert server_processes(server_pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_repository_built_before_the_layout_by_process_still_serves(production: Path, badnets_eval,
                                                                       tmp_path: Path) -> None:
    """Its model.py files import ``fire_backend.serving.triton_models``, the stub entry point's old path."""
    import shutil

    import tritonclient.grpc as grpcclient
    from helpers import labels

    from fire_backend.wire.control import ControlClient
    from fire_backend.wire.token import pinned_token

    repository = tmp_path / "old"
    shutil.copytree(production, repository)
    model_files = sorted((repository / "models").glob("*/1/model.py"))
    assert model_files
    for model_py in model_files:
        text = model_py.read_text()
        assert "fire_backend.stub.triton_models" in text  # what `fire repo build` writes now
        model_py.write_text(text.replace("fire_backend.stub.triton_models", "fire_backend.serving.triton_models"))
    with running_server(repository, extra_env=pinned_token("old-token")) as server:
        with grpcclient.InferenceServerClient(server.urls["grpc"]) as client:
            predicted = labels(client, badnets_eval.clean[::4])
        with ControlClient(server.urls["grpc"], "old-token") as ctl:
            status = ctl.status()
    assert float(np.mean(predicted == badnets_eval.labels[::4])) > 0.9
    assert status["version"] == 1 and status["directions"]
