"""CLI subcommands for clients and benchmarks (``fire infer``, ``fire bench``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fire_backend.client import DEFAULT_MODEL, DEFAULT_PORTS, MODELS, PROTOCOLS


def _source_images(args: argparse.Namespace):
    from fire_backend.client import load_digits, load_npz, load_pngs

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
    from fire_backend.cli import CliError, emit_json
    from fire_backend.client import FireClient, FireClientError

    if args.batch < 1:
        raise CliError(f"--batch must be >= 1, got {args.batch}")
    url = args.url or f"{args.protocol or 'grpc'}://127.0.0.1:{DEFAULT_PORTS[args.protocol or 'grpc']}"
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


def cmd_bench(args: argparse.Namespace) -> int:
    from fire_backend.bench import BenchConfig, parse_concurrency, run_bench
    from fire_backend.cli import CliError, emit_json

    try:
        concurrency = parse_concurrency(args.concurrency)
    except ValueError as exc:
        raise CliError(f"--concurrency: {exc}") from exc
    if args.duration < 2:
        raise CliError(f"--duration must be at least 2 seconds, got {args.duration}")
    if not 1 <= args.batch <= 64:
        raise CliError(f"--batch must be in 1..64, got {args.batch}")
    config = BenchConfig(
        repository=args.repository, concurrency=concurrency, duration_s=args.duration, batch=args.batch,
        out=args.out, protocol=args.protocol, warmup_s=args.warmup, locustfile=args.locustfile,
        quiet=bool(args.json),
    )
    report = run_bench(config)
    emit_json(args, report.to_dict())
    return 0


def register(sub) -> None:
    from fire_backend.cli import add_command

    p = add_command(sub, "infer", cmd_infer,
                    "send images to a running FIRE server; print label, flagged, repair score and direction "
                    "version per image",
                    "  fire infer --digits 10                                   # grpc://127.0.0.1:8001\n"
                    "  fire infer --url http://127.0.0.1:8000 --npz poisoned.npz --batch 64\n"
                    "  fire infer --npz poisoned.npz --bypass --json            # the attack without FIRE\n"
                    "  fire infer --png a.png b.png --model undefended_ensemble\n"
                    "  fire infer --url 10.0.0.5:9001 --protocol grpc --digits 5 --model fire_monolithic")
    p.add_argument("--url", default=None,
                   help="server: grpc://HOST:PORT, http://HOST:PORT or HOST:PORT (default grpc://127.0.0.1:8001)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="protocol for a bare HOST:PORT (default grpc; a URL scheme decides otherwise)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{' | '.join(MODELS)} ({DEFAULT_MODEL})")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--npz", type=Path, default=None, help=".npz with x (uint8 NHWC) [y], from `fire data export`")
    source.add_argument("--png", type=Path, nargs="+", default=None, help="image files of the model's input size")
    source.add_argument("--digits", type=int, default=None, metavar="N",
                        help="the first N embedded digits test images (after the defender's reserve)")
    p.add_argument("--n", type=int, default=None, help="at most N images of the source (all)")
    p.add_argument("--batch", type=int, default=1, help="images per request (1: one by one; at most 64)")
    p.add_argument("--bypass", action="store_true", help="ask fire_ensemble to skip the repair (fire_bypass)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (60)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON line at the end")

    p = add_command(sub, "bench", cmd_bench,
                    "start tritonserver on a repository and load it with Locust: per-sample latency and "
                    "throughput of fire_ensemble vs undefended_ensemble vs fire_monolithic",
                    "  fire bench                                         # the digits demo, concurrency 1 and 16\n"
                    "  fire bench --concurrency 1,4,16 --duration 30 --batch 8 --out bench-results\n"
                    "  fire bench --repository repo --protocol http --json")
    p.add_argument("--repository", type=Path, default=None, help="model repository (default: the digits demo)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated Locust user counts (1,16)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per target and concurrency (15)")
    p.add_argument("--batch", type=int, default=1, help="images per request (1)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="client protocol (grpc)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured warm-up seconds per target (2)")
    p.add_argument("--locustfile", type=Path, default=None,
                   help="Locust file (default: the one installed with fire_backend, as loadtest/locustfile.py)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="where bench.json, bench.csv, bench.png and raw Locust output go (./bench-results)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line at the end")
