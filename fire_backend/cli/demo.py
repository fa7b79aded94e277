"""``fire demo``: the whole story on the embedded digits data set, served for real (see fire_backend.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fire_backend.cli.base import add_command, emit_json, say


def cmd_demo(args: argparse.Namespace) -> int:
    from fire_backend.demo import run_demo

    summary = run_demo(args.out, flagged=args.flagged, load_seconds=args.load_seconds, users=args.users,
                       progress=say)
    before, after, load = summary["before"], summary["after"], summary["load"]
    rows = [
        ("before (no direction)", before),
        (f"after ({args.flagged} flagged observed)", after),
        (f"Locust load ({args.users} users)", load),
    ]
    print()
    print(f"{'':30s} {'CA':>7s} {'PA':>7s} {'ASR':>7s} {'p50 ms/sample':>14s} {'samples/s':>10s}")
    for name, figures in rows:
        print(f"{name:30s} {figures['ca']:7.4f} {figures['pa']:7.4f} {figures['asr']:7.4f} "
              f"{figures['p50_ms']:14.3f} {figures['samples_per_s']:10.0f}")
    metrics = summary["metrics"]
    print(f"\nFIRE on {metrics['url']} at the end (the server is gone now; `fire serve` keeps it up):")
    for line in metrics["lines"]:
        print(f"  {line}")
    print(f"\nwrote {args.out / 'demo_pa_vs_flagged.png'}")
    emit_json(args, summary)
    return 0


def register(sub) -> None:
    p = add_command(sub, "demo", cmd_demo, "the whole story on the embedded digits data set, served for real",
                    "  fire demo\n  fire demo --flagged 10 --load-seconds 30 --out demo-results")
    p.add_argument("--out", type=Path, default=Path("demo-results"), help="where the PNG and JSON go")
    p.add_argument("--flagged", type=int, default=20, help="flagged samples to observe online (20)")
    p.add_argument("--load-seconds", type=int, default=15, help="duration of the Locust load (15)")
    p.add_argument("--users", type=int, default=8, help="Locust users (8)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
