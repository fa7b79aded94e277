"""The parts of issue 12's hardening that need no tritonserver: the command line, instance names, /proc reads,
the shared-memory cleanup and the health endpoint. (The real server: tests/security/.)"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fire_backend.launcher import shm
from fire_backend.launcher.health import HealthServer
from fire_backend.launcher.model_configs import instance_names, stub_models
from fire_backend.launcher.ports import free_port
from fire_backend.launcher.server import (
    UNSENDABLE_HEADER,
    ServerConfig,
    TritonServer,
    TritonServerError,
    precompile_models,
)
from fire_backend.launcher.supervisor import describe_exit
from fire_backend.models import DigitsCNN
from fire_backend.models.network import Network
from fire_backend.procfs import children, cmdline, is_running, process_state
from fire_backend.repository.build import RepositoryOptions, write_configs
from fire_backend.repository.layout import ServingSettings
from fire_backend.wire.names import DEFAULT_PORTS, FIRE_CONTROL, FIRE_ENSEMBLE


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    shapes = {layer.name: layer.shape for layer in Network.from_module(DigitsCNN(), (1, 8, 8)).candidates()}
    settings = ServingSettings(layer="block2", input_shape=(1, 8, 8), latent_shape=shapes["block2"],
                               num_classes=10, arch="digits_cnn")
    write_configs(tmp_path, settings, RepositoryOptions(model_instances=3))  # the default (fused) layout
    return tmp_path


# -- the command line ------------------------------------------------------------------------------------------

def flags(args: list[str]) -> dict[str, str]:
    return {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}


def test_every_api_a_client_does_not_need_is_closed_and_nothing_secret_is_passed(repository: Path) -> None:
    token = "s3cret-token-value"
    server = TritonServer(ServerConfig(repository, extra_env={"FIRE_CONTROL_TOKEN": token}, private_shm=False))
    args = server.build_args(Path("/tree"))
    f = flags(args)
    closed = f":{UNSENDABLE_HEADER}=x"
    assert f["--http-restricted-api"] == f"model-repository,shared-memory,logging,trace{closed}"
    assert f["--grpc-restricted-protocol"] == f"model-repository,shared-memory,logging,trace{closed}"
    assert f["--model-control-mode"] == "poll" and f["--model-repository"] == str(repository.resolve() / "models")
    assert f["--grpc-address"] == "127.0.0.1"
    assert token not in " ".join(args) and args[0] == "/tree/bin/tritonserver"


def test_tritonservers_own_http_and_metrics_listen_on_private_unix_sockets_only(repository: Path) -> None:
    """No client reaches libevhtp: the front holds the ports, Triton's HTTP and metrics are Unix sockets in a
    directory of the server's own (0700 at start), each short enough for sun_path."""
    server = TritonServer(ServerConfig(repository, private_shm=False))
    f = flags(server.build_args(Path("/tree")))
    http, metrics = f["--http-address"], f["--metrics-address"]
    assert http.startswith("unix:/") and metrics.startswith("unix:/")
    assert Path(http[5:]).parent == Path(metrics[5:]).parent and Path(http[5:]).parent.name.startswith("fire-triton-")
    assert len(metrics) - 5 <= 107
    assert server.upstream.http == http and server.upstream.metrics == metrics
    assert TritonServer(ServerConfig(repository)).upstream.http != http  # one directory per server
    exposed = TritonServer(ServerConfig(repository, triton_http_port=9100))  # `fire bench --protocol triton-http`
    assert flags(exposed.build_args(Path("/tree")))["--http-address"] == "127.0.0.1"
    assert exposed.upstream.http == "127.0.0.1:9100" and exposed.urls["triton_http"] == "http://127.0.0.1:9100"
    with pytest.raises(ValueError, match="ports must differ"):
        ServerConfig(repository, triton_http_port=DEFAULT_PORTS["http"])


def test_the_sockets_directory_must_be_private(repository: Path, tmp_path: Path) -> None:
    """A directory someone else could write (or swap the sockets in) is refused, not reused."""
    server = TritonServer(ServerConfig(repository))
    server._sockets = tmp_path / "sockets"
    server._claim_socket_dir()
    assert server._sockets.stat().st_mode & 0o777 == 0o700
    (server._sockets / "http.sock").write_bytes(b"")  # a killed server's leftover
    server._claim_socket_dir()  # a restart reuses its own directory, without the leftovers
    assert not (server._sockets / "http.sock").exists()
    server._sockets.chmod(0o777)
    with pytest.raises(TritonServerError, match="not a private directory"):
        server._claim_socket_dir()


def test_an_http_client_of_a_server_without_http_inference_is_told_the_fix() -> None:
    from tritonclient.utils import InferenceServerException

    from fire_backend.wire.errors import translate

    closed = InferenceServerException("inference over HTTP is closed on this server", status="403")
    error = translate(closed, "127.0.0.1:8000", "http", 5.0, "fire_ensemble")
    assert "grpc://" in str(error) and "--no-http-inference" in str(error)


def test_a_header_name_with_a_colon_is_what_closes_the_apis() -> None:
    """Triton splits the flag at the first ':' and then at '=', so the key keeps its colon (facts note Q3)."""
    assert ":" in UNSENDABLE_HEADER and "=" not in UNSENDABLE_HEADER and "," not in UNSENDABLE_HEADER


def test_a_private_dev_shm_wraps_the_command_in_a_mount_namespace(repository: Path) -> None:
    server = TritonServer(ServerConfig(repository, shm_size_mib=96))
    server._shm = shm.ShmClaim("fire-0-abc-", private=True)
    args = server.build_args(Path("/tree"))
    assert args[1:3] == ["-Urm", "--"] and "size=96m" in args[5] and "mode=0700" in args[5]
    assert args[args.index("/tree/bin/tritonserver") - 1] == "fire-shm"  # $0 of the sh -c script
    assert "--backend-config=python,shm-region-prefix-name=fire-0-abc-" in args


def test_the_private_dev_shm_is_sized_from_the_stubs(repository: Path) -> None:
    stubs = sum(len(m.instances) for m in stub_models(repository / "models"))
    assert stubs == 4  # 3 fused, control
    server = TritonServer(ServerConfig(repository))
    assert server._shm_size_mib() == shm.SHM_BASE_MIB + shm.SHM_MIB_PER_STUB * 4


# -- instance names -------------------------------------------------------------------------------------------

def test_a_second_start_writes_nothing_into_the_served_tree(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers sharing one repository each precompile at start; rewriting valid bytecode would make every server
    already running reload its models (poll mode). Stale bytecode (a rebuilt model.py) is rewritten. Reproducible
    build environments set SOURCE_DATE_EPOCH, which would otherwise switch py_compile to hash-checked files."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")
    models = repository / "models"
    precompile_models(models)
    tree = {p: p.stat().st_mtime_ns for p in models.rglob("*")}
    assert any(p.suffix == ".pyc" for p in tree)
    time.sleep(0.02)
    precompile_models(models)
    assert {p: p.stat().st_mtime_ns for p in models.rglob("*")} == tree
    source = models / FIRE_ENSEMBLE / "1" / "model.py"
    source.write_text(source.read_text() + "# rebuilt\n")
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 2_000_000_000))
    (cached,) = (models / FIRE_ENSEMBLE / "1" / "__pycache__").glob("model.*.pyc")
    before = cached.read_bytes()
    precompile_models(models)
    assert cached.read_bytes() != before


def test_instance_names_of_a_built_repository(repository: Path) -> None:
    names = {m.name: m.instances for m in stub_models(repository / "models")}
    assert names == {FIRE_CONTROL: ("fire_control_0_0",),
                     FIRE_ENSEMBLE: ("fire_ensemble_0_0", "fire_ensemble_0_1", "fire_ensemble_0_2")}
    (fused,) = [m for m in stub_models(repository / "models") if m.name == FIRE_ENSEMBLE]
    assert fused.version_dir == repository / "models" / FIRE_ENSEMBLE / "1"


def test_instance_names_follow_tritons_rules() -> None:
    config = """
    instance_group [
      { count: 2 kind: KIND_CPU rate_limiter { resources [ { name: "r" count: 1 } ] } },
      { name: "gpus" kind: KIND_GPU gpus: [ 0, 1 ] },
      { kind: KIND_CPU }
    ]"""
    assert instance_names("m", config) == ("m_0_0", "m_0_1", "gpus_0", "m_2_0")
    assert instance_names("m", 'backend: "python"') == ("m_0",)


# -- /proc -----------------------------------------------------------------------------------------------------

def test_proc_reads_tell_a_zombie_from_a_running_process() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 10
        while process_state(pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pid in children(os.getpid())
        assert process_state(pid) == "Z" and not is_running(pid) and cmdline(pid) == []
        assert is_running(os.getpid()) and cmdline(os.getpid())
    finally:
        os.waitpid(pid, 0)
    assert process_state(pid) is None and not is_running(pid)


def test_exit_descriptions_name_the_signal() -> None:
    assert describe_exit(-signal.SIGABRT) == "killed by signal 6 (SIGABRT)"
    assert describe_exit(1) == "exit code 1"


# -- shared memory on the host: the lock-file cleanup ----------------------------------------------------------

def test_a_dead_servers_regions_are_swept_and_a_live_ones_are_not(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "HOST_SHM", tmp_path / "dev-shm")
    monkeypatch.setattr(shm, "lock_dir", lambda: tmp_path / "locks")
    (tmp_path / "dev-shm").mkdir()
    live = shm.claim(private=False)
    dead = shm.claim(private=False)
    regions = {claim.prefix: tmp_path / "dev-shm" / f"{claim.prefix}region" for claim in (live, dead)}
    for region in regions.values():
        region.write_bytes(b"x")
    os.close(dead.lock_fd)  # the dead server: nobody holds its lock any more
    dead.lock_fd = None
    assert shm.sweep_stale() == [regions[dead.prefix]]
    assert regions[live.prefix].exists() and not (tmp_path / "locks" / f"{dead.prefix}.lock").exists()
    with open(tmp_path / "locks" / f"{live.prefix}.lock") as handle, pytest.raises(BlockingIOError):
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # still held
    live.release()
    assert not regions[live.prefix].exists() and not list((tmp_path / "locks").iterdir())


# -- the health endpoint ---------------------------------------------------------------------------------------

def get(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, data=data, method=method), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_health_endpoint_answers_from_the_snapshot() -> None:
    state = {"live": True, "ready": False, "state": "starting"}
    health = HealthServer("127.0.0.1", free_port(), lambda: dict(state)).start()
    base = f"http://127.0.0.1:{health.port}"
    try:
        status, body = get(f"{base}/ready")
        assert status == 503 and json.loads(body)["state"] == "starting"
        assert get(f"{base}/live")[0] == 200
        state.update(ready=True, state="ready")
        assert get(f"{base}/ready") == (200, (json.dumps(state) + "\n").encode())
        assert get(f"{base}/ready", "HEAD") == (200, b"")
        state.update(live=False)
        assert get(f"{base}/live")[0] == 503
        assert get(f"{base}/metrics")[0] == 404
        assert get(f"{base}/ready", "POST", b"x" * 1000)[0] == 405  # no other method, and no body is read
        assert get(f"{base}/ready", "POST", b"x" * (4 << 20))[0] == 405  # the form POST that crashed Triton 2.51
        assert get(f"{base}/live")[0] == 503  # still serving
    finally:
        health.stop()
