"""Operator side of the control endpoint: ``fire ctl status|push|observe|rollback|history``.

Talks to the ``fire_control`` model over the server's own gRPC or HTTP endpoint with tritonclient.
The token comes from ``--token-file`` or ``FIRE_CONTROL_TOKEN`` and is sent only in the request.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

TOKEN_ENV = "FIRE_CONTROL_TOKEN"
CONTROL_MODEL = "fire_control"


def split_url(url: str) -> tuple[str, str]:
    """``grpc://h:p`` | ``http://h:p`` | ``h:p`` (gRPC) -> (protocol, host:port)."""
    for protocol in ("grpc", "http"):
        prefix = f"{protocol}://"
        if url.startswith(prefix):
            return protocol, url[len(prefix):].rstrip("/")
    return "grpc", url


class ControlClient:
    def __init__(self, url: str, token: str, timeout_s: float = 60.0) -> None:
        self.protocol, self.address = split_url(url)
        self.token = token
        self.timeout_s = timeout_s
        if self.protocol == "grpc":
            import tritonclient.grpc as module
            self._client = module.InferenceServerClient(self.address)
        else:
            import tritonclient.http as module
            self._client = module.InferenceServerClient(self.address, network_timeout=timeout_s,
                                                        connection_timeout=timeout_s)
        self._module = module

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, request: dict[str, Any], images: np.ndarray | None = None) -> dict[str, Any]:
        m = self._module
        inputs = []
        for name, text in (("REQUEST", json.dumps(request)), ("TOKEN", self.token)):
            tensor = m.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
            inputs.append(tensor)
        if images is not None:
            tensor = m.InferInput("IMAGES", list(images.shape), "UINT8")
            tensor.set_data_from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
            inputs.append(tensor)
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self._client.infer(CONTROL_MODEL, inputs, **kwargs)
        raw = result.as_numpy("RESPONSE").reshape(-1)[0]
        return json.loads(raw.decode() if isinstance(raw, bytes) else raw)

    def status(self) -> dict[str, Any]:
        return self.call({"action": "status"})

    def history(self) -> dict[str, Any]:
        return self.call({"action": "history"})

    def rollback(self, version: int) -> dict[str, Any]:
        return self.call({"action": "rollback", "version": version})

    def push(self, directions: list[dict[str, Any]], center: list[float] | None = None) -> dict[str, Any]:
        return self.call({"action": "push", "directions": directions, "center": center})

    def observe(self, images: np.ndarray, clean: bool = False, estimator: str | None = None,
                publish_every: int | None = None) -> dict[str, Any]:
        request: dict[str, Any] = {"action": "observe", "clean": clean}
        if estimator:
            request["estimator"] = estimator
        if publish_every:
            request["publish_every"] = publish_every
        return self.call(request, images)


def read_direction_file(path: Path) -> tuple[list[dict[str, Any]], list[float] | None]:
    """An .npz with ``beta`` (D or K x D, or K x latent shape) and optional per-direction ``alpha``,
    ``mode``, ``threshold``, ``name`` arrays and a ``center``."""
    with np.load(path, allow_pickle=False) as data:
        if "beta" not in data.files:
            raise ValueError(f"{path}: needs an array 'beta' (has {', '.join(data.files)})")
        beta = np.asarray(data["beta"], dtype=np.float32)
        betas = beta.reshape(1, -1) if beta.ndim == 1 else beta.reshape(beta.shape[0], -1)
        count = len(betas)

        def column(name: str) -> list | None:
            if name not in data.files:
                return None
            values = np.atleast_1d(data[name]).tolist()
            if len(values) != count:
                raise ValueError(f"{path}: '{name}' has {len(values)} entries for {count} directions")
            return values

        alphas, modes, thresholds, names = (column(n) for n in ("alpha", "mode", "threshold", "name"))
        center = data["center"].astype(np.float32).reshape(-1).tolist() if "center" in data.files else None
    directions = []
    for i in range(count):
        entry: dict[str, Any] = {"beta": betas[i].tolist(), "name": names[i] if names else f"pushed-{i}"}
        if alphas:
            entry["alpha"] = float(alphas[i])
        if modes:
            entry["mode"] = str(modes[i])
        if thresholds:
            entry["threshold"] = float(thresholds[i])
        directions.append(entry)
    return directions, center


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    else:
        token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise ValueError(f"no control token: set {TOKEN_ENV} or pass --token-file")
    return token


def _print_status(status: dict[str, Any]) -> None:
    est = status.get("estimator") or {}
    print(f"live version: {status['version']}   layer: {status['layer']} {status['latent_shape']}")
    for d in status["directions"]:
        print(f"  direction {d['name']}: mode {d['mode']}, alpha {d['alpha']}, threshold {d['threshold']}, "
              f"|beta| {d['norm']:.4g}")
    if est:
        print(f"  estimator {est['kind']}: {est['poisoned_count']} poisoned, {est['clean_count']} clean samples")
    for inst in status.get("instances", []):
        print(f"  repair instance {inst['instance']}: applying version {inst['version']}")


def cmd_ctl(args: argparse.Namespace) -> int:
    token = _token(args)
    try:
        client = ControlClient(args.url, token)
    except Exception as exc:  # tritonclient raises its own types for bad addresses
        raise ValueError(f"cannot connect to {args.url}: {exc}") from None
    with client:
        try:
            if args.ctl_command == "status":
                result = client.status()
                if not args.json:
                    _print_status(result)
            elif args.ctl_command == "history":
                result = client.history()
                if not args.json:
                    for e in result["history"]:
                        print(f"{e['time']:.3f}  {e['action']:14s} version {e['version']:>5}  live {e['live']:>5}  "
                              f"by {e['actor']}  sha256 {e.get('sha256', '')[:16]}")
            elif args.ctl_command == "rollback":
                result = client.rollback(args.version)
                if not args.json:
                    print(f"live version is now {result['version']}")
            elif args.ctl_command == "push":
                directions, center = read_direction_file(args.file)
                result = client.push(directions, center)
                if not args.json:
                    print(f"pushed {len(directions)} direction(s): live version {result['version']}")
            else:
                with np.load(args.file, allow_pickle=False) as data:
                    if "x" not in data.files:
                        raise ValueError(f"{args.file}: needs 'x' (uint8 N x H x W x C), as `fire data export` writes")
                    images = data["x"]
                total: dict[str, Any] = {}
                for start in range(0, len(images), args.chunk):
                    total = client.observe(images[start : start + args.chunk], clean=args.clean,
                                           estimator=args.estimator, publish_every=args.publish_every)
                result = total
                if not args.json:
                    kind = "clean" if args.clean else "flagged poisoned"
                    print(f"observed {len(images)} {kind} images: live version {result['version']} "
                          f"({result['poisoned_count']} poisoned, {result['clean_count']} clean)")
        except Exception as exc:
            message = str(exc)
            if "UNAVAILABLE" in message or "onnection refused" in message:
                raise ValueError(f"cannot reach {args.url}: is `fire serve` running? pass --url") from None
            if type(exc).__name__ == "InferenceServerException":
                raise ValueError(message) from None
            raise
    if args.json:
        print(json.dumps(result))
    return 0


def register(sub) -> None:
    from fire_backend.cli import add_command

    p = add_command(sub, "ctl", cmd_ctl, "operate the live FIRE directions: status, push, observe, rollback, history",
                    "  export FIRE_CONTROL_TOKEN=...    # the token `fire serve` was started with\n"
                    "  fire ctl status --json\n"
                    "  fire data export --checkpoint runs/d --poisoned --n 20 --out flagged.npz\n"
                    "  fire ctl observe flagged.npz              # learn online from flagged poisoned images\n"
                    "  fire ctl observe clean.npz --clean        # refine the clean centroid\n"
                    "  fire ctl push directions.npz              # beta (K x D), alpha, mode, threshold, name\n"
                    "  fire ctl history && fire ctl rollback 3")
    p.add_argument("--url", default="127.0.0.1:8001", help="server: HOST:PORT (gRPC), grpc://.. or http://.. "
                   "(default 127.0.0.1:8001)")
    p.add_argument("--token-file", type=Path, default=None, help=f"file holding the token (else ${TOKEN_ENV})")
    p.add_argument("--json", action="store_true", help="print the server's answer as one JSON line")
    actions = p.add_subparsers(dest="ctl_command", metavar="ACTION", required=True)
    actions.add_parser("status", help="live version, directions, estimator counts, repair instances")
    actions.add_parser("history", help="audit log: time, action, version, token id, content hash")
    rb = actions.add_parser("rollback", help="make an earlier committed version live again")
    rb.add_argument("version", type=int, help="version number (0 = no direction)")
    push = actions.add_parser("push", help="push a direction set from an .npz file")
    push.add_argument("file", type=Path, help=".npz with beta and optional alpha, mode, threshold, name, center")
    obs = actions.add_parser("observe", help="fold flagged poisoned (or --clean) images into the live estimate")
    obs.add_argument("file", type=Path, help=".npz with x (uint8 N x H x W x C), as `fire data export` writes")
    obs.add_argument("--clean", action="store_true", help="the images are clean (refine the centroid)")
    obs.add_argument("--estimator", choices=["unpaired", "augmented"], default=None,
                     help="streaming estimator (server default: unpaired)")
    obs.add_argument("--publish-every", type=int, default=None, help="republish after every k images (server: 1)")
    obs.add_argument("--chunk", type=int, default=64, help="images per request (64)")
