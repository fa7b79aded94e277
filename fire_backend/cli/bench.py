"""``fire bench``: FIRE vs undefended vs monolithic on the real server under Locust load (see fire_backend.bench)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fire_backend.cli.base import CliError, add_command, emit_json, say
from fire_backend.wire.names import FIRE_ENSEMBLE, FIRE_MONOLITHIC, PROTOCOLS, UNDEFENDED_ENSEMBLE


def cmd_bench(args: argparse.Namespace) -> int:
    from fire_backend.bench import BenchConfig, format_table, parse_concurrency, run_bench, write_outputs
    from fire_backend.demo import demo_repository

    try:
        concurrency = parse_concurrency(args.concurrency)
    except ValueError as exc:
        raise CliError(f"--concurrency: {exc}") from exc
    if args.duration < 2:
        raise CliError(f"--duration must be at least 2 seconds, got {args.duration}")
    if not 1 <= args.batch <= 64:
        raise CliError(f"--batch must be in 1..64, got {args.batch}")
    repository = args.repository or demo_repository(say, bars=not args.json and sys.stderr.isatty())
    config = BenchConfig(
        repository=repository, concurrency=concurrency, duration_s=args.duration, batch=args.batch,
        out=args.out, protocol=args.protocol, warmup_s=args.warmup, locustfile=args.locustfile,
    )
    report = run_bench(config, say)
    print(format_table(report))
    paths = write_outputs(report, args.out)
    say(f"wrote {', '.join(str(p) for p in paths)}")
    emit_json(args, report.to_dict())
    return 0


def register(sub) -> None:
    p = add_command(sub, "bench", cmd_bench,
                    "start tritonserver on a repository and load it with Locust: per-sample latency and "
                    f"throughput of {FIRE_ENSEMBLE} vs {UNDEFENDED_ENSEMBLE} vs {FIRE_MONOLITHIC}",
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
