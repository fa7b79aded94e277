"""``fire infer``: send images to a running FIRE server; label, flagged, repair score and version per image.

Torch-free: this command imports only the wire layer (numpy and tritonclient), so it starts fast anywhere.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fire_backend.cli.base import CliError, add_command, emit_json
from fire_backend.wire.names import (
    BYPASS_PARAMETER,
    DEFAULT_HOST,
    DEFAULT_MODEL,
    DEFAULT_PORTS,
    DEFAULT_URL,
    FIRE_MONOLITHIC,
    INFERENCE_MODELS,
    PROTOCOLS,
    UNDEFENDED_ENSEMBLE,
)
from fire_backend.wire.token import TOKEN_ENV, TOKEN_FILE_ENV

if TYPE_CHECKING:
    from fire_backend.wire.images import Images


def _source_images(args: argparse.Namespace) -> Images:
    from fire_backend.wire.images import load_digits, load_npz, load_pngs

    if args.npz is not None:
        images = load_npz(args.npz)
    elif args.png:
        images = load_pngs(args.png)
    else:
        images = load_digits(args.digits)
    images = images.head(args.n)
    if len(images) == 0:
        raise ValueError(f"{images.source}: no images")
    return images


def cmd_infer(args: argparse.Namespace) -> int:
    from fire_backend.wire.client import FireClient
    from fire_backend.wire.errors import FireClientError

    if args.batch < 1:
        raise CliError(f"--batch must be >= 1, got {args.batch}")
    protocol = args.protocol or "grpc"
    url = args.url or f"{protocol}://{DEFAULT_HOST}:{DEFAULT_PORTS[protocol]}"
    images = _source_images(args)
    try:
        with FireClient(url, args.protocol, timeout_s=args.timeout) as client:
            max_batch = client.model_info(args.model).max_batch_size
            if max_batch and args.batch > max_batch:
                raise CliError(f"--batch {args.batch} is above {args.model}'s max batch size {max_batch}")
            start = time.perf_counter()
            result = client.infer_batches(images.x, args.batch, args.model, args.bypass)
            elapsed = time.perf_counter() - start
            endpoint = client.url
    except FireClientError as exc:
        raise CliError(str(exc)) from exc

    requests = -(-len(images) // args.batch)
    y = images.y
    print(f"{args.model} at {endpoint}: {len(images)} images from {images.source}, {requests} requests "
          f"(batch {args.batch}){', repair bypassed' if args.bypass else ''}")
    if args.bypass and args.model != DEFAULT_MODEL:
        print(f"note: --bypass only affects {DEFAULT_MODEL}")
    defended = result.flagged is not None
    header = f"{'image':>6s} {'label':>6s}" + (f" {'true':>5s}" if y is not None else "")
    if defended:
        header += f" {'flagged':>8s} {'score':>8s} {'version':>8s}"
    print(header)
    for i in range(len(images)):
        line = f"{i:6d} {int(result.labels[i]):6d}" + (f" {int(y[i]):5d}" if y is not None else "")
        if defended:
            line += f" {'yes' if result.flagged[i] else 'no':>8s} {float(result.scores[i]):8.3f} " \
                    f"{int(result.versions[i]):8d}"
        print(line)
    accuracy = float((result.labels == y).mean()) if y is not None else None
    flagged_rate = float(result.flagged.mean()) if defended else None
    summary = [f"{len(images) / elapsed:.1f} images/s, {1000 * elapsed / requests:.2f} ms per request"]
    if accuracy is not None:
        summary.append(f"accuracy vs true labels {accuracy:.4f}")
    if flagged_rate is not None:
        versions = sorted({int(v) for v in result.versions})
        summary.append(f"flagged {flagged_rate:.4f}, direction version {', '.join(map(str, versions))}")
    print("; ".join(summary))
    rows = result.rows()
    for i, row in enumerate(rows):
        row["index"] = i
        if y is not None:
            row["true"] = int(y[i])
    emit_json(args, {
        "url": endpoint, "model": args.model, "bypass": bool(args.bypass), "batch": args.batch,
        "n": len(images), "requests": requests, "elapsed_s": elapsed, "accuracy": accuracy,
        "flagged_rate": flagged_rate, "results": rows,
    })
    return 0


def register(sub) -> None:
    p = add_command(sub, "infer", cmd_infer,
                    "send images to a running FIRE server; print label, flagged, repair score and direction "
                    "version per image",
                    "  fire infer --digits 10                                   # grpc://127.0.0.1:8001\n"
                    "  fire infer --url http://127.0.0.1:8000 --npz poisoned.npz --batch 64\n"
                    "  fire infer --npz poisoned.npz --bypass --json            # the attack without FIRE\n"
                    f"  fire infer --png a.png b.png --model {UNDEFENDED_ENSEMBLE}\n"
                    f"  fire infer --url 10.0.0.5:9001 --protocol grpc --digits 5 --model {FIRE_MONOLITHIC}")
    p.add_argument("--url", default=None,
                   help=f"server: grpc://HOST:PORT, http://HOST:PORT or HOST:PORT (default {DEFAULT_URL})")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="protocol for a bare HOST:PORT (default grpc; a URL scheme decides otherwise)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{' | '.join(INFERENCE_MODELS)} ({DEFAULT_MODEL})")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--npz", type=Path, default=None, help=".npz with x (uint8 NHWC) [y], from `fire data export`")
    source.add_argument("--png", type=Path, nargs="+", default=None, help="image files of the model's input size")
    source.add_argument("--digits", type=int, default=None, metavar="N",
                        help="the first N embedded digits test images (after the defender's reserve)")
    p.add_argument("--n", type=int, default=None, help="at most N images of the source (all)")
    p.add_argument("--batch", type=int, default=1, help="images per request (1: one by one; at most 64)")
    p.add_argument("--bypass", action="store_true",
                   help=f"ask {DEFAULT_MODEL} to skip the repair ({BYPASS_PARAMETER}): only a repository built with "
                        f"--allow-bypass honours it, and the request is signed with the control token "
                        f"(${TOKEN_FILE_ENV} or ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (60)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")
