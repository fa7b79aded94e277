"""``fire bench``: every FIRE layout vs the undefended split vs the monolithic model on the real server under
Locust load (see fire_backend.bench)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fire_backend.cli.base import CliError, add_command, emit_json, say


def cmd_bench(args: argparse.Namespace) -> int:
    from fire_backend.bench import (
        BENCH_PROTOCOLS,
        BENCH_TARGETS,
        BenchConfig,
        format_table,
        parse_concurrency,
        parse_list,
        run_bench,
        write_outputs,
    )

    try:
        concurrency = parse_concurrency(args.concurrency)
    except ValueError as exc:
        raise CliError(f"--concurrency: {exc}") from exc
    try:
        protocols = parse_list(args.protocol, BENCH_PROTOCOLS, "protocols")
        targets = parse_list(args.targets, BENCH_TARGETS, "targets") if args.targets else None
    except ValueError as exc:
        raise CliError(f"--protocol/--targets: {exc}") from exc
    if args.duration < 2:
        raise CliError(f"--duration must be at least 2 seconds, got {args.duration}")
    if not 1 <= args.batch <= 64:
        raise CliError(f"--batch must be in 1..64, got {args.batch}")
    if args.rounds < 1:
        raise CliError(f"--rounds must be at least 1, got {args.rounds}")
    if args.repository is not None and args.checkpoint is not None:
        raise CliError("give --repository or --checkpoint, not both")
    if args.repository is not None and args.layer is not None:
        raise CliError("--layer goes with --checkpoint (a repository keeps its own layers)")
    checkpoint = args.checkpoint
    if args.repository is None and checkpoint is None:
        from fire_backend.demo import demo_checkpoint

        checkpoint = demo_checkpoint(say, bars=not args.json and sys.stderr.isatty())
    config = BenchConfig(
        repository=args.repository, checkpoint=checkpoint, layer=args.layer, gpu=args.gpu, concurrency=concurrency,
        duration_s=args.duration, batch=args.batch, out=args.out, protocols=protocols, warmup_s=args.warmup,
        rounds=args.rounds, locustfile=args.locustfile, targets=targets,
    )
    try:
        report = run_bench(config, say)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(format_table(report))
    paths = write_outputs(report, args.out)
    say(f"wrote {', '.join(str(p) for p in paths)}")
    emit_json(args, report.to_dict())
    return 0


def register(sub) -> None:
    p = add_command(sub, "bench", cmd_bench,
                    "serve every FIRE layout (fused, inline, separate), the undefended split and the monolithic "
                    "model from one tritonserver and load each in turn with Locust: per-sample latency, "
                    "throughput, ratios, and Triton's per-stage queue/compute times",
                    "  fire bench                                         # the digits demo, concurrency 1 and 16\n"
                    "  fire bench --concurrency 1,4,16 --duration 30 --rounds 3 --out bench-results\n"
                    "  fire bench --repository repo --protocol http --json  # repo's network and direction\n"
                    "  fire bench --targets fused --concurrency 16 --protocol grpc,http,triton-http  # the HTTP "
                    "front's cost\n"
                    "  fire bench --checkpoint runs/c10 --layer layer4.0 --gpu")
    p.add_argument("--repository", type=Path, default=None,
                   help="measure this repository's network, layers and live direction (it is copied, not changed)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="or build from a checkpoint (default: the digits demo's), with a direction from 20 flagged "
                        "reserve images")
    p.add_argument("--layer", default=None, help="repair layer, with --checkpoint (default per architecture)")
    p.add_argument("--gpu", action="store_true", help="KIND_GPU instances (with --checkpoint; a repository keeps "
                                                      "its own)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated Locust user counts (1,16)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per target and concurrency (15)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the interleaved runs; tables show medians, ratios are medians of per-round ratios (1)")
    p.add_argument("--batch", type=int, default=1, help="images per request (1)")
    p.add_argument("--protocol", default="grpc",
                   help="client protocols, comma-separated: grpc, http (KServe v2 through the HTTP front, as clients "
                        "get it), triton-http (tritonserver's own HTTP, exposed on a loopback port for this "
                        "comparison only) (grpc)")
    p.add_argument("--targets", default=None,
                   help="measure only these targets, comma-separated, e.g. fused,undefended (every one the bench "
                        "repository serves)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured warm-up seconds per target (2)")
    p.add_argument("--locustfile", type=Path, default=None,
                   help="Locust file (default: the one installed with fire_backend, as loadtest/locustfile.py)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="where the bench repository, bench.json, bench.csv, bench.png and raw Locust output go "
                        "(./bench-results)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON line at the end")
