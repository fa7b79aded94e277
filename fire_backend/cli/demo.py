"""``fire demo``: the whole story on the embedded digits data set, served for real (see fire_backend.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fire_backend.cli.base import add_command, emit_json, say


def cmd_demo(args: argparse.Namespace) -> int:
    from fire_backend.demo import run_demo

    summary = run_demo(args.out, flagged=args.flagged, load_seconds=args.load_seconds, users=args.users,
                       progress=say)
    for line in summary_table(summary, args.flagged, args.users):
        print(line)
    metrics = summary["metrics"]
    print(f"\nFIRE on {metrics['url']} at the end (the server is gone now; `fire serve` keeps it up):")
    for line in metrics["lines"]:
        print(f"  {line}")
    print(f"\nwrote {args.out / 'demo_pa_vs_flagged.png'}")
    emit_json(args, summary)
    return 0


def summary_table(summary: dict, flagged: int, users: int) -> list[str]:
    """The demo's before / after / under-load table. Latency is per request, beside how many images a request
    carries and how many requests were in flight, so the stream's rows and Locust's are not read as one scale."""
    rows = [("before (no direction)", summary["before"]), (f"after ({flagged} flagged observed)", summary["after"]),
            (f"Locust load ({users} users)", summary["load"])]
    lines = ["", f"{'':30s} {'CA':>7s} {'PA':>7s} {'ASR':>7s} {'img/request':>11s} {'in flight':>9s} "
                 f"{'p50 ms/request':>14s} {'samples/s':>10s}"]
    for name, f in rows:
        lines.append(f"{name:30s} {f['ca']:7.4f} {f['pa']:7.4f} {f['asr']:7.4f} {f['images_per_request']:11d} "
                     f"{f['in_flight']:9d} {f['p50_ms']:14.3f} "
                     f"{f['samples_per_s']:10.0f}")
    lines.append(f"PA: the true label back on triggered evaluation images (never the {flagged} observed ones).")
    lines.append("The stream sends one request at a time; Locust's users keep several in flight, so its p50 includes "
                 "waiting behind the others.")
    return lines


def register(sub) -> None:
    p = add_command(sub, "demo", cmd_demo, "the whole story on the embedded digits data set, served for real",
                    "  fire demo\n  fire demo --flagged 10 --load-seconds 30 --out demo-results")
    p.add_argument("--out", type=Path, default=Path("demo-results"), help="where the PNG and JSON go")
    p.add_argument("--flagged", type=int, default=20, help="flagged samples to observe online (20)")
    p.add_argument("--load-seconds", type=int, default=15, help="duration of the Locust load (15)")
    p.add_argument("--users", type=int, default=8, help="Locust users (8)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
