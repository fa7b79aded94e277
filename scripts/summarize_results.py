"""Collect docs/results/<attack>/{eval,sweep,streaming}.csv into docs/results/summary.csv and print
markdown tables (for docs/results/README.md).

    python scripts/summarize_results.py docs/results
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path


def read(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def layer_of(directory: Path) -> str:
    """The repaired layer, from the first line `fire eval` printed (eval.txt)."""
    text = directory / "eval.txt"
    if text.is_file():
        for part in text.read_text().splitlines()[0].split(";"):
            if part.strip().startswith("layer "):
                return part.strip().split()[1]
    return ""


def main(root: Path) -> None:
    attacks = sorted(p.name for p in root.iterdir() if (p / "eval.csv").is_file())
    rows = []
    for attack in attacks:
        for directory in (root / attack, root / attack / "recommended"):
            if (directory / "eval.csv").is_file():
                layer = layer_of(directory)
                rows.extend({"attack": attack, "layer": layer, **row} for row in read(directory / "eval.csv"))
    with (root / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["attack", "layer", "method", "ca", "pa", "asr"])
        writer.writeheader()
        writer.writerows(rows)
    print("| attack | layer | method | CA | PA | ASR |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['attack']} | {row['layer']} | {row['method']} | {float(row['ca']):.4f} | "
              f"{float(row['pa']):.4f} | {float(row['asr']):.4f} |")
    for attack in attacks:
        sweep = root / attack / "sweep.csv"
        if sweep.is_file():
            print(f"\n{attack} sweep (unpaired, best alpha per layer):\n\n| layer | alpha | CA | PA | PA/CA |\n"
                  "|---|---|---|---|---|")
            for r in read(sweep):
                print(f"| {r['layer']} | {r['alpha']} | {float(r['ca']):.4f} | {float(r['pa']):.4f} | "
                      f"{float(r['relative']):.4f} |")
    for attack in attacks:
        points = read(root / attack / "streaming.csv")
        print(f"\n{attack} streaming PA:\n\n| flagged | unpaired | augmented (ShrinkPad-guided) | ShrinkPad |\n"
              "|---|---|---|---|")
        for p in points:
            print(f"| {p['flagged']} | {float(p['unpaired']):.4f} | {float(p['augmented']):.4f} | "
                  f"{float(p['shrinkpad']):.4f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/results"))
