"""``fire repo build`` and ``fire serve``: build a repository, run the real tritonserver on it."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from fire_backend.defaults import cache_dir
from fire_backend.serving.control import TOKEN_ENV, TOKEN_FILE_ENV
from fire_backend.serving.repository import RepositoryOptions, build_repository


def demo_repository(progress: bool = True) -> Path:
    """The embedded default: a BadNets digits model (trained once, cached) served with no direction."""
    from fire_backend.training import TrainConfig, train_backdoored

    root = cache_dir() / "demo"
    checkpoint, repository = root / "checkpoint", root / "repository"
    if not (checkpoint / "meta.json").is_file():
        print(f"no cached demo model: training a BadNets digits model into {checkpoint} (about a minute)")
        train_backdoored(TrainConfig(data="digits", attack="badnets"), checkpoint, progress=progress)
    if not (repository / "fire_ensemble" / "config.pbtxt").is_file():
        build_repository(checkpoint, repository)
    return repository


def cmd_repo_build(args: argparse.Namespace) -> int:
    options = RepositoryOptions(
        max_batch_size=args.max_batch, gpu=args.gpu, repair_instances=args.repair_instances,
        torch_threads=args.torch_threads, flag_threshold=args.threshold, alpha=args.alpha,
        publish_every=args.publish_every,
    )
    settings = build_repository(args.checkpoint, args.out, args.layer, args.flagged, options)
    start = f"version 1 from {args.flagged} flagged samples" if args.flagged else "no direction (version 0)"
    print(f"wrote {args.out}: {settings.arch} split after {settings.layer}, latent {list(settings.latent_shape)}, "
          f"input {list(settings.input_shape)}, max batch {args.max_batch}; store starts at {start}")
    print(f"serve it with: fire serve --repository {args.out}")
    return 0


def read_control_token(token_file: Path | None) -> str | None:
    """The control token from --token-file, FIRE_CONTROL_TOKEN_FILE or FIRE_CONTROL_TOKEN (in that order)."""
    path = token_file or (Path(os.environ[TOKEN_FILE_ENV]) if os.environ.get(TOKEN_FILE_ENV) else None)
    if path is not None:
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"{path}: the token file is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def cmd_serve(args: argparse.Namespace) -> int:
    from fire_backend.serving.launcher import ServerConfig, serve_forever

    repository = args.repository or demo_repository()
    if not (repository / "fire_ensemble" / "config.pbtxt").is_file():
        raise ValueError(f"{repository}: not a FIRE model repository (build one with `fire repo build`)")
    token = read_control_token(args.token_file)
    if token is None:
        print(f"note: no {TOKEN_ENV} set: the control endpoint refuses every action")
    env = {TOKEN_ENV: token} if token else {}
    config = ServerConfig(
        repository=repository.resolve(), host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, omp_threads=args.omp_threads,
        restricted_api_key=secrets.token_urlsafe(24), extra_env=env, log_verbose=args.log_verbose,
    )
    print(f"serving {repository} (model-repository API locked with a per-run secret)")
    return serve_forever(config)


def register(sub) -> None:
    from fire_backend.cli import add_command

    repo = sub.add_parser("repo", help="build a Triton model repository for a checkpoint")
    repo_sub = repo.add_subparsers(dest="repo_command", metavar="ACTION", required=True)
    p = add_command(repo_sub, "build", cmd_repo_build,
                    "write fire_ensemble (head -> FIRE repair -> tail), undefended_ensemble, fire_monolithic "
                    "and fire_control for a checkpoint split at a layer",
                    "  fire repo build --checkpoint runs/digits-badnets --layer block2 --out repo\n"
                    "  fire repo build --checkpoint runs/digits-badnets --out repo --flagged 20\n"
                    "  fire repo build --checkpoint runs/c10 --layer layer4.0 --out repo-c10 --gpu")
    p.add_argument("--checkpoint", type=Path, required=True, help="directory written by `fire train`/`fire import`")
    p.add_argument("--layer", default=None, help="split layer (default per architecture; `fire sweep` recommends)")
    p.add_argument("--out", type=Path, required=True, help="repository directory to write")
    p.add_argument("--flagged", type=int, default=None,
                   help="start the store from an offline estimate on N flagged samples (default: no direction)")
    p.add_argument("--max-batch", type=int, default=64, help="max_batch_size of every stage (64)")
    p.add_argument("--repair-instances", type=int, default=2, help="repair stage instances (2)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per stage instance (1)")
    p.add_argument("--threshold", type=float, default=0.5, help="flag a sample whose repair score exceeds this")
    p.add_argument("--alpha", type=float, default=1.0, help="repair strength of learned directions (1.0)")
    p.add_argument("--publish-every", type=int, default=1, help="republish after every k observations (1)")
    p.add_argument("--gpu", action="store_true", help="KIND_GPU instances, DLPack tensors, directions on device")

    p = add_command(sub, "serve", cmd_serve, "run tritonserver (from the nvidia-pytriton wheel) on a repository",
                    "  fire serve                                  # the embedded digits demo\n"
                    "  FIRE_CONTROL_TOKEN=$(cat token) fire serve --repository repo --grpc-port 9001\n"
                    "  fire serve --repository repo --token-file /run/secrets/fire-token")
    p.add_argument("--repository", type=Path, default=None, help="model repository (default: the digits demo)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (8002)")
    p.add_argument("--omp-threads", type=int, default=1, help="OMP threads per process (1)")
    p.add_argument("--token-file", type=Path, default=None, help="control token file (else $FIRE_CONTROL_TOKEN)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver verbosity (0)")
