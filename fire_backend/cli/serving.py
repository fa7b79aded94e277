"""``fire repo build`` and ``fire serve``: build a repository, run the real tritonserver on it in the foreground."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from fire_backend.cli.base import CliError, add_command, add_device_options, add_group, say
from fire_backend.defaults import ESTIMATION_MODES, MAX_CLEAN_CHANGE, RETAIN_VERSIONS
from fire_backend.repository.layout import DEFAULT_LAYOUT, LAYOUTS
from fire_backend.stores.backends import STORE_URL_ENV
from fire_backend.wire import names
from fire_backend.wire.token import TOKEN_ENV, TOKEN_FILE_ENV, stub_environment

if TYPE_CHECKING:
    from fire_backend.launcher.server import ServerConfig


def cmd_repo_build(args: argparse.Namespace) -> int:
    from fire_backend.repository.build import RepositoryOptions, build_repository

    try:
        options = RepositoryOptions(
            layout=args.layout, baselines=args.baselines, allow_bypass=args.allow_bypass,
            max_batch_size=args.max_batch, gpu=args.gpu, model_instances=args.model_instances,
            repair_instances=args.repair_instances, torch_threads=args.torch_threads, flag_threshold=args.threshold,
            alpha=args.alpha, publish_every=args.publish_every, estimation=args.estimation, store=args.store or "",
            retain_versions=args.retain_versions, max_clean_change=args.max_clean_change,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    settings = build_repository(args.checkpoint, args.out, args.layer, args.flagged, options, device=args.device,
                                batch_size=args.batch_size)
    start = f"version 1 from {args.flagged} flagged samples" if args.flagged else "no direction (version 0)"
    extras = [what for what, on in ((f"{names.UNDEFENDED_ENSEMBLE} and {names.FIRE_MONOLITHIC}", args.baselines),
                                    (f"{names.BYPASS_PARAMETER} with signed requests", args.allow_bypass)) if on]
    layers = ", ".join(settings.repair_layers)
    print(f"wrote {args.out}: {settings.arch}, {settings.layout} layout, repairs after {layers}, split latent "
          f"{list(settings.latent_shape)}, input {list(settings.input_shape)}, max batch {args.max_batch}; store "
          f"starts at {start}{'; also ' + ', '.join(extras) if extras else ''}")
    if args.store:
        print(f"direction store: {args.store} (every server of this repository follows it)")
    print(f"serve it with: fire serve --repository {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from fire_backend.launcher.server import ServerConfig
    from fire_backend.repository.layout import require_fire_repository

    if args.repository is None:
        from fire_backend.demo import demo_repository

        repository = demo_repository(say, bars=True)
    else:
        repository = require_fire_repository(args.repository)
    env = stub_environment(args.token_file)
    if not env:
        print(f"note: no {TOKEN_ENV} set: the control endpoint refuses every action")
    if args.store:
        env[STORE_URL_ENV] = check_store(args.store)
    config = ServerConfig(
        repository=repository.resolve(), host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, omp_threads=args.omp_threads, extra_env=env, log_verbose=args.log_verbose,
        http_inference=args.http_inference,
    )
    http = "open (KServe v2, checked by the HTTP front)" if args.http_inference \
        else "closed (gRPC only; the front answers 403)"
    print(f"serving {repository}; HTTP inference {http}")
    return serve_forever(config, args.health_port or None)


def check_store(url: str) -> str:
    """``url`` if it is a well-formed store URL (a wrong form or TLS file fails here, not in every stage); says once
    what the store looks like. A store that does not answer now (etcd away, a volume not mounted yet) is no reason to
    exit: the server starts, its repair stages hold requests (``/ready`` 503) and keep trying until it answers.
    Nothing is created here: a missing file store is named, never replaced by a new one at version 0 (``fire repo
    build --store`` creates one)."""
    from fire_backend.stores.backends import open_store
    from fire_backend.stores.format import StoreError

    try:
        store = open_store(url)
    except ValueError as exc:
        raise CliError(f"--store: {exc}") from None
    try:
        state = store.resolve()
    except (StoreError, OSError) as exc:
        state = None
        problem = str(exc)
    else:
        problem = "; ".join(state.damage) if state.version is None else ""
    if state is None or problem:
        print(f"note: --store {url}: {problem}; repair stages hold requests until it answers (a new file store is "
              "created by `fire repo build --store URL`)", file=sys.stderr)
    else:
        damage = f"; damaged: {'; '.join(state.damage)}" if state.damage else ""
        print(f"direction store: {url} (live version {state.version}{damage})")
    return url


class _StopRequested(BaseException):
    """Raised from serve_forever's signal handler to interrupt a (re)start in progress."""


def _event(message: str) -> None:
    """A supervision event, on stderr with the time: `fire serve`'s log."""
    print(f"fire serve: {time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=sys.stderr, flush=True)


def serve_forever(config: ServerConfig, health_port: int | None = None) -> int:
    """Run and supervise the server in the foreground until SIGINT/SIGTERM; return an exit code.

    Used by ``fire serve``: 0 after a clean signal-triggered stop, 1 if it could not start or the supervisor
    gave up restarting it (only with a restart limit; none by default). ``health_port``: serve /live and /ready
    there (on ``config.host``).
    """
    from fire_backend.launcher.health import HealthServer
    from fire_backend.launcher.server import TritonServer, TritonServerError
    from fire_backend.launcher.supervisor import State, Supervisor

    supervisor = Supervisor(TritonServer(config), report=_event)
    server = supervisor.server
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.set()
        if supervisor.state in (State.STARTING, State.RESTARTING):
            # Abort the (possibly long) readiness wait; start() stops the half-started server.
            raise _StopRequested(signum)

    health = None
    if health_port:
        try:
            health = HealthServer(config.host, health_port, supervisor.health).start()
        except OSError as exc:
            print(f"fire serve: cannot serve the health endpoint on {config.host}:{health_port} ({exc.strerror}): "
                  "pass --health-port with a free port, or --health-port 0 to go without", file=sys.stderr)
            return 1
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            supervisor.start()
        except TritonServerError as exc:
            print(f"fire serve: {exc}", file=sys.stderr)
            return 1
        if not stop_requested.is_set():
            startup = f" in {server.startup_s:.1f}s" if server.startup_s is not None else ""
            shm = "private /dev/shm" if server.private_shm else "host /dev/shm"
            print(f"tritonserver ready{startup} (pid {server.pid}, {shm}, log {server.log_path})", flush=True)
            urls = dict(server.urls)
            if health is not None:
                urls["health"] = f"http://{server.url_host()}:{health.port}/ready"
            for name, url in urls.items():
                print(f"{name}: {url}", flush=True)
        code = supervisor.run(stop_requested)
        if code:
            print("fire serve: gave up restarting tritonserver; see the events above", file=sys.stderr)
            return code
        print("stopping tritonserver ...", flush=True)
        supervisor.stop()
        return 0
    except _StopRequested:
        return 0
    finally:
        if server.is_alive():
            supervisor.stop()
        server.close()
        if health is not None:
            health.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def add_store_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--store", default=None, metavar="URL",
                   help=f"{what}: file:///DIR (default: the repository's artifacts/store) or etcd://HOST:PORT/PREFIX "
                        "(add ?ca=CA&cert=CERT&key=KEY for TLS); see docs/deployment.md")


def register(sub) -> None:
    repo_sub = add_group(sub, "repo", "build a Triton model repository for a checkpoint", "repo_command", "ACTION")
    p = add_command(repo_sub, "build", cmd_repo_build,
                    f"write {names.FIRE_ENSEMBLE} (the network with FIRE at a layer, in a layout) and "
                    f"{names.FIRE_CONTROL} for a checkpoint; {names.UNDEFENDED_ENSEMBLE} and "
                    f"{names.FIRE_MONOLITHIC} only with --baselines",
                    "  fire repo build --checkpoint runs/digits-badnets --out repo     # the default layer pair\n"
                    "  fire repo build --checkpoint runs/digits-badnets --layer block2 --out repo\n"
                    "  fire repo build --checkpoint runs/digits-badnets --out repo --flagged 20\n"
                    "  fire repo build --checkpoint runs/digits-badnets --out repo --layout separate --baselines\n"
                    "  fire repo build --checkpoint runs/c10 --layer layer4.0 --out repo-c10 --gpu")
    p.add_argument("--checkpoint", type=Path, required=True, help="directory written by `fire train`/`fire import`")
    p.add_argument("--layer", action="append", default=None,
                   help="a layer to repair at; repeat for several, the deepest is the split layer (default: the "
                        "architecture's measured pair, e.g. layer1.0 and layer4.0 for preact_resnet18; observe then "
                        "ranks their subsets without labels; `fire sweep` ranks them offline)")
    p.add_argument("--out", type=Path, required=True, help="repository directory to write")
    p.add_argument("--flagged", type=int, default=None,
                   help="start the store from an offline estimate on N flagged samples (default: no direction)")
    p.add_argument("--layout", choices=LAYOUTS, default=DEFAULT_LAYOUT,
                   help=f"how {names.FIRE_ENSEMBLE} runs: fused = one model, repair in-process (one Triton hop); "
                        "inline = repairing head -> tail; separate = head -> repair -> tail, the repair scaled on "
                        f"its own ({DEFAULT_LAYOUT})")
    p.add_argument("--baselines", action="store_true",
                   help=f"also write {names.UNDEFENDED_ENSEMBLE} and {names.FIRE_MONOLITHIC}: models WITHOUT the "
                        "defence, for comparisons; never in production")
    p.add_argument("--allow-bypass", action="store_true",
                   help=f"honour {names.BYPASS_PARAMETER} on requests signed with the control token (off: every "
                        "request is repaired)")
    p.add_argument("--max-batch", type=int, default=64, help="max_batch_size of every stage (64)")
    p.add_argument("--model-instances", type=int, default=2,
                   help="instances of one-model stages: fused, and the monolithic baseline (2)")
    p.add_argument("--repair-instances", type=int, default=2, help="repair stage instances, separate layout (2)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per stage instance (1)")
    p.add_argument("--threshold", type=float, default=0.5, help="flag a sample whose repair score exceeds this")
    p.add_argument("--alpha", type=float, default=1.0, help="repair strength of learned directions (1.0)")
    p.add_argument("--publish-every", type=int, default=1, help="republish after every k observations (1)")
    p.add_argument("--estimation", choices=ESTIMATION_MODES, default="independent",
                   help="how observe estimates several layers: independent = each from unrepaired latents (the "
                        "measured default); ordered = deeper layers on latents repaired upstream")
    p.add_argument("--gpu", action="store_true", help="KIND_GPU instances, DLPack tensors, directions on device")
    add_store_option(p, "the direction store the repository's servers share, recorded in its settings")
    p.add_argument("--retain-versions", type=int, default=RETAIN_VERSIONS,
                   help=f"a file store keeps the payload files of the newest N committed versions and the build's, "
                        f"older ones are compacted away (the history keeps every line; {RETAIN_VERSIONS})")
    p.add_argument("--max-clean-change", type=float, default=MAX_CLEAN_CHANGE,
                   help="refuse a `fire ctl push` whose directions change more than this share of the clean reserve's "
                        f"predictions unless forced ({MAX_CLEAN_CHANGE:g})")
    add_device_options(p, "the build's centroid and --flagged estimate (not the served stages: see --gpu)")

    p = add_command(sub, "serve", cmd_serve, "run tritonserver (from the nvidia-pytriton wheel) on a repository",
                    "  fire serve                                  # the embedded digits demo\n"
                    f"  {TOKEN_ENV}=$(cat token) fire serve --repository repo --grpc-port 9001\n"
                    "  fire serve --repository repo --token-file /run/secrets/fire-token")
    p.add_argument("--repository", type=Path, default=None, help="model repository (default: the digits demo)")
    p.add_argument("--host", default=names.DEFAULT_HOST,
                   help=f"bind address ({names.DEFAULT_HOST}; 0.0.0.0 exposes it)")
    ports = (("http", "HTTP port", names.DEFAULT_PORTS["http"]), ("grpc", "gRPC port", names.DEFAULT_PORTS["grpc"]),
             ("metrics", "Prometheus metrics port", names.DEFAULT_METRICS_PORT))
    for protocol, what, port in ports:
        p.add_argument(f"--{protocol}-port", type=int, default=port, help=f"{what} ({port})")
    p.add_argument("--omp-threads", type=int, default=1, help="OMP threads per process (1)")
    p.add_argument("--token-file", type=Path, default=None,
                   help=f"control token file (else ${TOKEN_FILE_ENV}, else ${TOKEN_ENV})")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver verbosity (0)")
    p.add_argument("--http-inference", action=argparse.BooleanOptionalAction, default=True,
                   help="accept KServe v2 inference over HTTP through the front, which checks every request against "
                        "the model's config before tritonserver sees it (on; gRPC is always open)")
    add_store_option(p, "follow this direction store instead of the one the repository was built with")
    p.add_argument("--health-port", type=int, default=names.DEFAULT_HEALTH_PORT,
                   help=f"serve /live and /ready here, on --host ({names.DEFAULT_HEALTH_PORT}; 0: off); /ready is "
                        "503 while starting, restarting, a stage is degraded or tritonserver does not answer its "
                        "own readiness check within 2 s")
