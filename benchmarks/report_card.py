"""Every attack, one report card: CA / PA / ASR undefended, with ShrinkPad, and with the served default FIRE build
after 5 and after 20 flagged images learned online, per attack and adaptive setting.

Per setting (the attacks of ``fire train``, trigger size and blend ratio, poisoning rate, two triggers with two
targets in one model):

1. ``fire train`` (the library call) trains the backdoored model once: checkpoints are cached under ``--cache``
   by the training configuration, so a rerun only evaluates;
2. ``fire repo build`` with no layer and no attack named (the default build; ``--allow-bypass`` only so that the
   undefended model is measured through the same server);
3. the real tritonserver; ``fire ctl observe`` of the first 5 flagged reserve images (``fire data export``'s
   choice: the defender's reserve, non-target images the attack changes), the evaluation, then ``observe`` of the
   next 15 (the live version learns from all 20), the evaluation again; the undefended model via ``fire_bypass``;
   with two triggers the flagged images alternate between them;
4. ShrinkPad (offline, the same evaluation images, no flagged image needed);
5. the evaluation: the first ``--eval-images`` of the shuffled test split without the reserve, clean, and the
   non-target ones with each trigger.

Writes ``SETTING.json`` per setting into the first ``--results`` directory (default ``--out``) and, from every
``*.json`` of the ``--results`` directories, ``report_card.md`` (the table), ``report_card.csv``,
``report_card.json`` and ``report_card.png`` (the figure) into ``--out``: rows grouped by data set, a cell that
was not measured shown as ``-``. An attack counts only when its undefended ASR reaches 0.85; the targets then:
PA >= 0.90 x CA and ASR <= 5% at 20 flagged.

    python benchmarks/report_card.py --data cifar10:shared/data/cifar10.npz          # every CIFAR-10 setting
    python benchmarks/report_card.py --data cifar10:shared/data/cifar10.npz --settings sig,wanet --train-only
    python benchmarks/report_card.py --data digits --settings badnets,blended --eval-images 400 --out /tmp/rc
    python benchmarks/report_card.py --card-only --results docs/results/report-card/settings \
        --out docs/results/report-card                              # render only: the committed card
    python benchmarks/report_card.py --data cifar10 --from-check sig=sig.json --results DIR --card-only

``--from-check NAME=FILE`` takes the one-line answer of ``default_config_check.py --json`` (the served default
build, undefended and after 20 flagged images, the same evaluation) as setting NAME's result, for models measured
that way; its ShrinkPad and 5-flagged cells stay empty.

The ``shared-*`` settings import the full-size models in the shared folder's ``models/`` (``FIRE_SHARED_DIR``,
docs/data.md; ``make_attack_result.py`` and ``fire import backdoorbench``, as real_data_check.py) instead of
training; a CPU needs minutes per observe for them.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import platform
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from default_config_check import ctl
from real_data_check import FIRE, figures, imported_checkpoint, step

from fire_backend.data import load_dataset, resolve_attack
from fire_backend.data.augment import shrinkpad_defense
from fire_backend.data.export import export_images
from fire_backend.defaults import cache_dir, shared_dir
from fire_backend.launcher.server import running_server
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.offline.evaluation import evaluation_set, predict
from fire_backend.offline.training import TrainConfig, train_backdoored
from fire_backend.wire.client import FireClient
from fire_backend.wire.token import pinned_token

ROOT = Path(__file__).resolve().parents[1]
#: the attack counts from this undefended ASR on; then the targets at the largest flagged count
MIN_ASR, PA_OVER_CA, MAX_ASR = 0.85, 0.90, 0.05
FLAGGED = (5, 20)


@dataclass(frozen=True)
class Setting:
    """One row group of the card: how the model is backdoored."""

    name: str
    attack: str
    group: str  # "attack" | "adaptive" | "imported" (a shared full-size model, ``fire import backdoorbench``)
    poisoning: str = "auto"
    poison_rate: float = 0.1
    also: tuple[tuple[str, int], ...] = ()
    note: str = ""


SETTINGS = (
    Setting("badnets", "badnets", "attack", note="4x4 checker patch, bottom-right"),
    Setting("blended", "blended", "attack", note="noise image blended at 0.2"),
    Setting("sig", "sig", "attack", note="clean-label, as BackdoorBench (target class only, labels kept)"),
    Setting("sig-poison-label", "sig", "attack", poisoning="dirty-label", note="SIG trigger, BadNets-style labels"),
    Setting("wanet", "wanet", "attack", note="warp s=0.5, k=4, noise mode"),
    Setting("wanet-strong", "wanet(strength=1.0)", "attack", note="warp s=1, k=4, noise mode"),
    Setting("input_aware", "input_aware", "attack", note="per-image trigger, cross mode"),
    Setting("low_frequency", "low_frequency", "attack", note="smooth additive pattern, amplitude 0.1"),
    Setting("trojannn", "trojannn", "attack", note="optimised 6x6 patch (surrogate), retrained"),
    Setting("label_consistent", "label_consistent", "attack", note="clean-label: PGD 16/255 + four-corner patch"),
    Setting("badnets-3px", "badnets(size=3)", "adaptive", note="smaller patch"),
    Setting("badnets-2px", "badnets(size=2)", "adaptive", note="smallest patch"),
    Setting("blended-0.1", "blended(ratio=0.1)", "adaptive", note="fainter blend"),
    Setting("blended-0.05", "blended(ratio=0.05)", "adaptive", note="faintest blend"),
    Setting("badnets-5pct", "badnets", "adaptive", poison_rate=0.05, note="5% poisoned"),
    Setting("badnets-1pct", "badnets", "adaptive", poison_rate=0.01, note="1% poisoned"),
    Setting("two-targets", "badnets", "adaptive", also=(("blended", 1),), note="badnets -> 0 and blended -> 1"),
    Setting("shared-badnets", "badnets", "imported", note="full-size PreActResNet18 (shared models/), imported"),
    Setting("shared-blended", "blended", "imported", note="full-size PreActResNet18 (shared models/), imported"),
)
BY_NAME = {s.name: s for s in SETTINGS}


@dataclass
class Trigger:
    """One trigger of a model (two in the two-target setting) with what its evaluation needs."""

    label: str
    attack: str
    target: int
    rows: dict = field(default_factory=dict)


def train_config(setting: Setting, data: str, args: argparse.Namespace) -> TrainConfig:
    small = data == "digits"
    return TrainConfig(data=data, attack=setting.attack, poisoning=setting.poisoning,
                       poison_rate=setting.poison_rate, also=setting.also, target=0,
                       epochs=None if small else args.epochs, width=None if small else args.width,
                       train_subset=None if small else args.train_subset)


def cached_checkpoint(setting: Setting, args: argparse.Namespace, log: dict) -> Path:
    """The setting's trained checkpoint, trained now when the cache has none for this exact configuration."""
    if setting.group == "imported":
        start = time.perf_counter()
        checkpoint = imported_checkpoint(args.shared, setting.attack, args.cache / setting.name, {})
        log["train_s"] = round(time.perf_counter() - start, 1)
        return checkpoint
    config = train_config(setting, args.data, args)
    key = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:10]
    out = args.cache / f"{setting.name}-{key}"
    if (out / "meta.json").is_file():
        log["train_s"] = 0.0
        return out
    print(f"[{setting.name}] training {config}", flush=True)
    start = time.perf_counter()
    train_backdoored(config, out, progress=False)
    log["train_s"] = round(time.perf_counter() - start, 1)
    (out / "train_config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    return out


def flagged_file(data, triggers: list[Trigger], n: int, path: Path) -> Path:
    """The first ``n`` flagged reserve images, alternating between the triggers when there are several."""
    per = [export_images(data, t.attack, t.target, poisoned=True, n=n, part="reserve").x for t in triggers]
    x = np.stack([per[i % len(per)][i // len(per)] for i in range(n)])
    np.savez(path, x=x)
    return path


def evaluate(setting: Setting, checkpoint: Path, args: argparse.Namespace, log: dict) -> dict:
    model, meta = load_checkpoint(checkpoint)
    data = load_dataset(meta.dataset)
    triggers = [Trigger(setting.name if not meta.extra.get("also") else f"{setting.name}: {meta.attack}",
                        meta.attack, meta.target)]
    triggers += [Trigger(f"{setting.name}: {e['attack']}", e["attack"], e["target"])
                 for e in meta.extra.get("also", [])]
    sets = [evaluation_set(data.x_test, data.y_test, resolve_attack(t.attack), t.target, args.eval_images)
            for t in triggers]
    clean, y = sets[0].x, sets[0].y.numpy()
    work = args.work / setting.name
    work.mkdir(parents=True, exist_ok=True)
    # ShrinkPad (offline): no flagged image needed
    shrunk = predict(model, shrinkpad_defense(clean)).numpy()
    for t, s in zip(triggers, sets, strict=True):
        t.rows["shrinkpad"] = figures(shrunk, y, predict(model, shrinkpad_defense(s.poisoned)).numpy(),
                                      s.poisoned_y.numpy(), t.target)
    repository = work / "repository"
    step(log, "fire repo build", False, [str(FIRE), "repo", "build", "--checkpoint", str(checkpoint),
                                         "--allow-bypass", "--torch-threads", str(args.torch_threads),
                                         "--out", str(repository)])
    most = max(args.flagged)
    flagged = np.load(flagged_file(data, triggers, most, work / f"flagged-{most}.npz"))["x"]
    token = secrets.token_urlsafe(16)
    chosen: dict[str, list[str]] = {}
    start = time.perf_counter()
    with running_server(repository, extra_env=pinned_token(token)) as server:
        url = server.urls["grpc"]
        log["server start"] = round(time.perf_counter() - start, 1)
        with FireClient(url, token=token) as client:
            base = [client.infer_batches(clean.numpy(), args.batch, bypass=True).labels]
            for t, s in zip(triggers, sets, strict=True):
                poisoned = client.infer_batches(s.poisoned.numpy(), args.batch, bypass=True).labels
                t.rows["undefended"] = figures(base[0], y, poisoned, s.poisoned_y.numpy(), t.target)
            done = 0
            for n in sorted(args.flagged):
                part = work / f"observe-{done}-{n}.npz"
                np.savez(part, x=flagged[done:n])
                begin = time.perf_counter()
                observed = ctl(url, token, "observe", str(part), "--publish-every", str(n - done))
                log[f"observe {n}"] = round(time.perf_counter() - begin, 1)
                chosen[str(n)] = observed["layers"]
                done = n
                time.sleep(0.5)  # every instance applies the committed version from its next batch
                defended = client.infer_batches(clean.numpy(), args.batch).labels
                for t, s in zip(triggers, sets, strict=True):
                    poisoned = client.infer_batches(s.poisoned.numpy(), args.batch).labels
                    t.rows[f"fire-{n}"] = figures(defended, y, poisoned, s.poisoned_y.numpy(), t.target)
    log["served"] = round(time.perf_counter() - start, 1)
    return {
        "setting": asdict(setting), "data": data_name(args.data), "checkpoint": str(checkpoint),
        "trained": {"ca": meta.ca, "asr": meta.asr},
        "extra": {k: v for k, v in meta.extra.items() if k not in ("activation",)},
        "layers_chosen": chosen, "images": len(y),
        "triggers": [{"label": t.label, "attack": t.attack, "target": t.target, "rows": t.rows} for t in triggers],
    }


def data_name(data: str) -> str:
    """The data set's name without its path (``cifar10:PATH`` -> ``cifar10``): the card's row groups."""
    return data.split(":", 1)[0]


def from_check(check: dict, setting: Setting, data: str) -> dict:
    """A setting's result from ``default_config_check.py --json``: the served default build measured undefended
    (``fire_bypass``) and after 20 flagged images on the same evaluation images; nothing else was measured."""
    served = check["served"]
    if check.get("flagged") != max(FLAGGED):
        raise ValueError(f"{setting.name}: the check observed {check.get('flagged')} flagged images, the card's "
                         f"column is {max(FLAGGED)}")
    if check.get("attack") != setting.attack:
        raise ValueError(f"{setting.name}: the check measured attack {check.get('attack')!r}, the setting is "
                         f"{setting.attack!r}")
    rows = {"undefended": served["undefended"], f"fire-{max(FLAGGED)}": served["fire"]}
    return {
        "setting": asdict(setting), "data": data_name(data), "source": "default_config_check.py",
        "layers_chosen": {str(max(FLAGGED)): served["layers_chosen"]}, "images": served["images"],
        "triggers": [{"label": setting.name, "attack": setting.attack, "target": served["target_found"],
                      "rows": rows}],
        "timings_s": check.get("timings_s", {}), "total_s": check.get("total_s"), "machine": check.get("machine"),
    }


# -- the card ---------------------------------------------------------------------------------------------------

COLUMNS = ("undefended", "shrinkpad", *(f"fire-{n}" for n in FLAGGED))


def verdict(rows: dict, flagged: int) -> str:
    if rows["undefended"]["asr"] < MIN_ASR:
        return f"attack too weak (ASR {rows['undefended']['asr']:.2f} < {MIN_ASR})"
    fire = rows.get(f"fire-{flagged}")
    if fire is None:
        return "not run"
    pa_ok, asr_ok = fire["pa"] >= PA_OVER_CA * fire["ca"], fire["asr"] <= MAX_ASR
    if pa_ok and asr_ok:
        return "repaired"
    return "NOT repaired: " + ", ".join(
        ([f"PA/CA {fire['pa'] / max(fire['ca'], 1e-9):.2f} < {PA_OVER_CA}"] if not pa_ok else [])
        + ([f"ASR {fire['asr']:.3f} > {MAX_ASR}"] if not asr_ok else []))


def card_rows(results: list[dict]) -> list[dict]:
    """One row per trigger, grouped by data set (in name order), the settings in ``SETTINGS`` order."""
    order = {s.name: i for i, s in enumerate(SETTINGS)}
    rows = []
    for result in sorted(results, key=lambda r: (r.get("data", ""), order.get(r["setting"]["name"], len(order)))):
        for t in result["triggers"]:
            rows.append({"data": result.get("data", ""), "label": t["label"], "group": result["setting"]["group"],
                         "note": result["setting"]["note"], "images": result.get("images"), "rows": t["rows"],
                         "layers": result["layers_chosen"], "verdict": verdict(t["rows"], max(FLAGGED))})
    return rows


def layers_cell(row: dict, flagged: int) -> str:
    return "+".join(row["layers"].get(str(flagged), [])) or "-"


def markdown(rows: list[dict]) -> str:
    head = ("| data | setting | " + " | ".join(f"{c} CA / PA / ASR" for c in COLUMNS)
            + " | layers at 5 / 20 | verdict (20 flagged) |")
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 4)]
    for row in rows:
        cells = []
        for column in COLUMNS:
            fig = row["rows"].get(column)
            cells.append("-" if fig is None else f"{fig['ca']:.3f} / {fig['pa']:.3f} / {fig['asr']:.3f}")
        layers = " / ".join(layers_cell(row, n) for n in FLAGGED)
        lines.append(f"| {row['data']} | {row['label']} | " + " | ".join(cells) + f" | {layers} | {row['verdict']} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    """The table, one column per figure (empty where not measured), for spreadsheets and plots elsewhere."""
    names = ["data", "setting", "group", "images",
             *(f"{c}_{m}" for c in COLUMNS for m in ("ca", "pa", "asr")),
             *(f"layers_{n}" for n in FLAGGED), "verdict", "note"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        for row in rows:
            figs = [("" if row["rows"].get(c) is None else f"{row['rows'][c][m]:.4f}")
                    for c in COLUMNS for m in ("ca", "pa", "asr")]
            writer.writerow([row["data"], row["label"], row["group"], row["images"] or "", *figs,
                             *(("" if (v := layers_cell(row, n)) == "-" else v) for n in FLAGGED), row["verdict"],
                             row["note"]])


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len({r["data"] for r in rows}) > 1
    labels = [f"{r['data']}: {r['label']}" if several else r["label"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(max(10, 0.75 * len(rows) + 3), 9), sharex=True)
    width = 0.8 / len(COLUMNS)
    colours = ("#9e9e9e", "#ffb74d", "#64b5f6", "#1565c0")
    names = ("undefended", "ShrinkPad", *(f"FIRE, {n} flagged" for n in FLAGGED))
    for ax, metric in zip(axes, ("ca", "pa", "asr"), strict=True):
        for k, column in enumerate(COLUMNS):
            values = [r["rows"].get(column, {}).get(metric, np.nan) for r in rows]
            where = np.arange(len(rows)) + (k - (len(COLUMNS) - 1) / 2) * width
            ax.bar(where, values, width, color=colours[k], label=names[k])
            for x, value in zip(where, values, strict=True):
                if np.isnan(value):  # not measured: say so rather than draw nothing, which reads as 0
                    ax.text(x, 0.02, "n/m", rotation=90, ha="center", va="bottom", fontsize=6, color="#757575")
        ax.set_ylabel(metric.upper())
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
        if metric == "asr":
            ax.axhline(MAX_ASR, color="k", lw=0.8, ls="--")
    for i, r in enumerate(rows):
        if not r["verdict"].startswith("repaired"):
            axes[1].annotate("x" if r["verdict"].startswith("NOT") else "weak", (i, 1.0), ha="center", va="top",
                             color="#c62828", fontsize=8)
    axes[0].legend(ncol=len(COLUMNS), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(title + "; n/m = not measured, x = not repaired, weak = undefended ASR < 0.85", fontsize=10)
    axes[-1].set_xticks(np.arange(len(rows)))
    axes[-1].set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_results(directories: list[Path]) -> list[dict]:
    """Every setting result (``*.json`` but the card's own) of the directories."""
    return [json.loads(p.read_text()) for d in directories for p in sorted(d.glob("*.json"))
            if p.name != "report_card.json"]


def write_card(results: list[dict], out: Path, title: str) -> list[dict]:
    rows = card_rows(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report_card.md").write_text(markdown(rows))
    write_csv(rows, out / "report_card.csv")
    (out / "report_card.json").write_text(json.dumps(rows, indent=1) + "\n")
    if rows:
        plot(rows, out / "report_card.png", title)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", help="digits | cifar10:PATH (the training and test images)")
    parser.add_argument("--settings", default=",".join(BY_NAME),
                        help=f"comma-separated settings ({', '.join(BY_NAME)}); default all")
    parser.add_argument("--flagged", default=",".join(map(str, FLAGGED)), help="flagged counts observed in turn (5,20)")
    parser.add_argument("--eval-images", type=int, default=2000, help="evaluation images (2000)")
    parser.add_argument("--epochs", type=int, default=8, help="training epochs for CIFAR-10 models (8)")
    parser.add_argument("--width", type=int, default=16, help="PreActResNet18 width for CIFAR-10 models (16)")
    parser.add_argument("--train-subset", type=int, default=10000, help="CIFAR-10 training images (10000)")
    parser.add_argument("--batch", type=int, default=64, help="images per inference request (64)")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads per served stage (2)")
    parser.add_argument("--cache", type=Path, default=cache_dir() / "report-card",
                        help="trained checkpoints, reused across runs (FIRE_BACKEND_CACHE_DIR/report-card)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "report-card", help="repositories, flagged files")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "report-card" / "card",
                        help="the table and the figure (and the per-setting JSON unless --results says otherwise)")
    parser.add_argument("--results", type=Path, action="append",
                        help="directory of per-setting JSON the card is made from (repeatable; new results go to "
                             "the first; default --out)")
    parser.add_argument("--from-check", action="append", default=[], metavar="NAME=FILE",
                        help="setting NAME's result from default_config_check.py --json's answer in FILE "
                             "(repeatable; written as DATA-NAME.json)")
    parser.add_argument("--shared", type=Path, default=shared_dir(ROOT),
                        help="the shared data and full-size models of the imported settings (FIRE_SHARED_DIR)")
    parser.add_argument("--train-only", action="store_true", help="train (or find cached) models, evaluate nothing")
    parser.add_argument("--card-only", action="store_true",
                        help="run nothing: the table and figure from the --results directories' JSON")
    args = parser.parse_args()
    args.flagged = tuple(sorted(int(n) for n in args.flagged.split(",")))
    unknown = [n for n in args.settings.split(",") if n not in BY_NAME]
    if args.data == "digits" and "--settings" not in sys.argv:
        args.settings = ",".join(s.name for s in SETTINGS if s.group != "imported")
    checks = [item.partition("=") for item in args.from_check]
    unknown += [name for name, _, _ in checks if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown settings {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    if any(not file for _, _, file in checks):
        parser.error("--from-check takes NAME=FILE")
    results = args.results or [args.out]
    for directory in (args.out, results[0]):
        directory.mkdir(parents=True, exist_ok=True)
    for name, _, file in checks:
        check = json.loads(Path(file).read_text().strip().splitlines()[-1])
        try:
            result = from_check(check, BY_NAME[name], args.data)
        except ValueError as error:
            parser.error(str(error))
        (results[0] / f"{result['data']}-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.card_only:
        args.cache.mkdir(parents=True, exist_ok=True)
        for name in args.settings.split(","):
            setting, log = BY_NAME[name], {}
            begin = time.perf_counter()
            checkpoint = cached_checkpoint(setting, args, log)
            if args.train_only:
                meta = load_checkpoint(checkpoint)[1]
                print(f"[{name}] {checkpoint}: CA {meta.ca:.4f} ASR {meta.asr:.4f} ({log['train_s']} s)", flush=True)
                continue
            result = evaluate(setting, checkpoint, args, log)
            result.update(timings_s=log, total_s=round(time.perf_counter() - begin, 1),
                          machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
                                  f"{os.getloadavg()[0]:.1f}")
            (results[0] / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
            for t in result["triggers"]:
                cells = ", ".join(f"{k} {v['ca']:.3f}/{v['pa']:.3f}/{v['asr']:.3f}" for k, v in t["rows"].items())
                print(f"[{name}] {t['label']}: {cells}; layers {result['layers_chosen']}; {log}", flush=True)
    if args.train_only:
        return 0
    loaded = read_results(results)
    sets = sorted({r.get("data", "") for r in loaded}) or [data_name(args.data)]
    title = f"FIRE report card ({', '.join(sets)}; served default build)"
    rows = write_card(loaded, args.out, title)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
