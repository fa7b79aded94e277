"""``fire ctl status|history|rollback|push|observe``: operate the live FIRE directions of a running server."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fire_backend.cli.base import CliError, add_command, formatter
from fire_backend.wire.names import DEFAULT_HOST, DEFAULT_PORTS, MAX_CONTROL_REQUEST_BYTES, OBSERVE_CHUNK_IMAGES
from fire_backend.wire.token import TOKEN_ENV, TOKEN_FILE_ENV, read_token

DEFAULT_CTL_URL = f"{DEFAULT_HOST}:{DEFAULT_PORTS['grpc']}"
DEFAULT_TIMEOUT_S = 600.0


def _print_status(status: dict[str, Any]) -> None:
    est = status.get("estimator") or {}
    live = status["version"]
    shown = live if live is not None else "UNKNOWN (the store cannot say)"
    print(f"live version: {shown}   {_layers_heading(status)}")
    if status.get("damage"):
        verified = status.get("verified_version")
        restart = f"applies version {verified}" if verified is not None else "holds requests: nothing verifiable"
        print(f"  STORE DEGRADED (every instance keeps the version it verified; one starting now {restart}):")
        for line in status["damage"]:
            print(f"    {line}")
    at = f" at {status['layer']}" if len(status.get("repair_layers") or ()) > 1 else ""
    for d in status["directions"]:
        print(f"  direction {d['name']}{at}: mode {d['mode']}, alpha {d['alpha']}, threshold {d['threshold']}, "
              f"|beta| {d['norm']:.4g}")
    if est:
        print(f"  estimator {est['kind']}: {est['poisoned_count']} poisoned, {est['clean_count']} clean samples")
    if len(status.get("repair_layers", ())) > 1:
        counts = ", ".join(f"{layer} {n}" for layer, n in status["layers"].items())
        print(f"  directions per layer: {counts}   ({status['estimation']} estimation, "
              f"{status['flagged_kept']} flagged images kept)")
        for rank, r in enumerate(status.get("ranking", [])[:5], start=1):
            print(f"  ranked {rank}: {'+'.join(r['layers']):24s} flip {r['flip']:.2f} change {r['change']:.2f} "
                  f"clean_tv {r['clean_tv']:.3f}")
    for inst in status.get("instances", []):
        where = f" on {inst['host']}" if inst.get("alive") is None and inst.get("host") else ""
        store = "" if inst.get("engine_reachable", True) else "; store unreachable, serving its last verified version"
        if inst.get("damage") and inst.get("engine_reachable", True):
            store = f"; sees a degraded store ({'; '.join(inst['damage'])})"
        outages = f"; {inst['outages']} store outage(s) so far" if inst.get("outages") else ""
        print(f"  repair instance {inst['instance']}{where}: {_applied(inst, live)}{store}{outages}")
    for inst in status.get("gone", []):
        print(f"  repair instance {inst['instance']}: GONE (pid {inst.get('pid')} no longer runs; it last applied "
              f"version {inst['version']})")


def _layers_heading(status: dict[str, Any]) -> str:
    """Every repaired layer: the split layer with its latent shape, and each further layer ``status`` configures."""
    split = f"{status['layer']} {status['latent_shape']}"
    layers = status.get("repair_layers") or [status["layer"]]
    if len(layers) == 1:
        return f"layer: {split}"
    return "layers: " + ", ".join(split if layer == status["layer"] else layer for layer in layers)


def format_time(epoch_s: float) -> str:
    """A history entry's time, in UTC to the second (``--json`` keeps the epoch seconds)."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _applied(instance: dict[str, Any], live: int | None) -> str:
    """An instance's version against the live one, and how long it took or how long it has been behind."""
    version, lag, behind = instance["version"], instance.get("lag_s"), instance.get("behind_s")
    if instance.get("held"):
        return "HOLDING requests: no verified version yet"
    if live is None:
        return f"version {version} (its last verified version; the live one is unknown)"
    if version != live:
        since = f" for {behind:.1f} s" if behind is not None else ""
        return f"version {version}, BEHIND the live version {live}{since}"
    if lag is None:
        return f"version {version} (live; applied at start)"
    return f"version {version} (live; applied {lag * 1000:.0f} ms after its commit)"


def _observe(client, args: argparse.Namespace) -> dict[str, Any]:
    from fire_backend.wire.images import load_npz

    try:
        images = load_npz(args.file).x  # the checks `fire infer` makes: uint8 N x H x W x C, never cast
    except (OSError, ValueError) as exc:
        raise CliError(str(exc)) from None
    result = client.observe(images, clean=args.clean, estimator=args.estimator, publish_every=args.publish_every,
                            chunk=args.chunk)
    if not args.json:
        kind = "clean" if args.clean else "flagged poisoned"
        counts = f"{result['poisoned_count']} poisoned, {result['clean_count']} clean" if "clean_count" in result \
            else f"{result['poisoned_count']} flagged kept; repairing at {', '.join(result['layers'])}"
        print(f"observed {len(images)} {kind} images: live version {result['version']} ({counts})")
    return result


def _act(client, args: argparse.Namespace) -> dict[str, Any]:
    from fire_backend.wire.control import read_direction_file

    if args.ctl_command == "status":
        result = client.status()
        if not args.json:
            _print_status(result)
    elif args.ctl_command == "history":
        result = client.history()
        if not args.json:
            for e in result["history"]:
                print(f"{format_time(e['time'])}  {e['action']:14s} version {e['version']:>5}  live {e['live']:>5}  "
                      f"by {e['actor']}  sha256 {e.get('sha256', '')[:16]}")
    elif args.ctl_command == "rollback":
        result = client.rollback(args.version)
        if not args.json:
            print(f"live version is now {result['version']}")
    elif args.ctl_command == "push":
        directions, center = read_direction_file(args.file)
        result = client.push(directions, center, args.layer, force=args.force)
        if not args.json:
            change = result.get("clean_change")
            measured = f"; changes {change:.1%} of the clean reserve's predictions" if change is not None else ""
            print(f"pushed {len(directions)} direction(s): live version {result['version']}{measured}")
    else:
        result = _observe(client, args)
    return result


def cmd_ctl(args: argparse.Namespace) -> int:
    from fire_backend.wire.control import ControlClient
    from fire_backend.wire.errors import FireClientError

    token = read_token(args.token_file)
    if not token:
        raise CliError(f"no control token: pass --token-file, or set {TOKEN_FILE_ENV} or {TOKEN_ENV}")
    try:
        with ControlClient(args.url, token, timeout_s=args.timeout) as client:
            result = _act(client, args)
    except FireClientError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(json.dumps(result))
    return 0


def _connection_options(parser: argparse.ArgumentParser, after_action: bool) -> None:
    """--url, --token-file and --json, accepted before the action and after it (``fire ctl status --json``).

    After the action they default to SUPPRESS, so they set a value only when given and never reset one given
    before the action.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if after_action else value

    parser.add_argument("--url", default=default(DEFAULT_CTL_URL),
                        help=f"server: HOST:PORT (gRPC), grpc://.. or http://.. (default {DEFAULT_CTL_URL})")
    parser.add_argument("--token-file", type=Path, default=default(None),
                        help=f"file holding the token (else ${TOKEN_FILE_ENV}, else ${TOKEN_ENV})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the server's answer as one JSON line")
    parser.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT_S),
                        help=f"seconds to wait for an answer ({DEFAULT_TIMEOUT_S:g}: an observe that learns several "
                             "layers of a full-size network takes tens of seconds on a CPU)")


#: each action's own examples (its --help), after ``fire ctl``'s connection options
ACTION_EXAMPLES = {
    "status": "  fire ctl status\n  fire ctl status --json\n  fire ctl --url http://127.0.0.1:8000 status",
    "history": "  fire ctl history\n  fire ctl history --json",
    "rollback": "  fire ctl history                  # the versions committed so far\n"
                "  fire ctl rollback 1               # version 1 (the first commit) live again\n"
                "  fire ctl rollback 0               # no direction at all (serve the undefended network)",
    "push": "  fire ctl push directions.npz\n  fire ctl push directions.npz --layer block1\n"
            "  fire ctl push directions.npz --force   # beyond --max-clean-change; the history records it",
    "observe": "  fire data export --checkpoint runs/digits --part reserve --poisoned --n 20 --out flagged.npz\n"
               "  fire ctl observe flagged.npz            # learn online from flagged poisoned images\n"
               "  fire data export --checkpoint runs/digits --n 100 --out clean.npz\n"
               "  fire ctl observe clean.npz --clean      # refine the clean centroid",
}


def register(sub) -> None:
    p = add_command(sub, "ctl", cmd_ctl, "operate the live FIRE directions: status, push, observe, rollback, history",
                    f"  export {TOKEN_ENV}=...    # the token `fire serve` was started with\n"
                    "  fire ctl status\n"
                    "  fire data export --checkpoint runs/digits --part reserve --poisoned --n 20 --out flagged.npz\n"
                    "  fire ctl observe flagged.npz              # learn online from flagged poisoned images\n"
                    "  fire ctl push directions.npz              # beta (K x D), alpha, mode, threshold, name\n"
                    "  fire ctl history                          # audit log: time (UTC), action, version, token id\n"
                    "  fire ctl rollback 1                       # a version the history lists (0: no direction)\n"
                    "  fire ctl observe --help                   # each action has options and examples of its own")
    _connection_options(p, after_action=False)
    after = argparse.ArgumentParser(add_help=False)
    _connection_options(after, after_action=True)
    actions = p.add_subparsers(dest="ctl_command", metavar="ACTION", required=True)

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, parents=[after], help=help_text, description=help_text,
                                  epilog=f"examples:\n{ACTION_EXAMPLES[name]}", formatter_class=formatter)

    action("status", "live version, the repaired layers and their directions, estimator counts, ranking, each "
                     "repair instance's version and lag (and instances that are gone)")
    action("history", "audit log: time (UTC), action, version, live version, token id, content hash")
    rb = action("rollback", "make an earlier committed version live again (0: no direction)")
    rb.add_argument("version", type=int, help="a version `fire ctl history` lists, or 0 (no direction)")
    push = action("push", "push a direction set from an .npz file")
    push.add_argument("file", type=Path, help=".npz with beta and optional alpha, mode, threshold, name, center")
    push.add_argument("--layer", default=None,
                      help="the layer whose set the push replaces (default: the split layer; the others are kept)")
    push.add_argument("--force", action="store_true",
                      help="commit even when the set changes more of the clean reserve's predictions than the "
                           "repository allows (`fire repo build --max-clean-change`); the history records it")
    obs = action("observe", "fold flagged poisoned (or --clean) images into the live estimate")
    obs.add_argument("file", type=Path, help=".npz with x (uint8 N x H x W x C), as `fire data export` writes")
    obs.add_argument("--clean", action="store_true", help="the images are clean (refine the centroid)")
    obs.add_argument("--estimator", choices=["unpaired", "augmented"], default=None,
                     help="streaming estimator (server default: unpaired)")
    obs.add_argument("--publish-every", type=int, default=None,
                     help="republish after every k images (server default: 1; with several layers: once per request)")
    obs.add_argument("--chunk", type=int, default=OBSERVE_CHUNK_IMAGES,
                     help=f"images per request at most ({OBSERVE_CHUNK_IMAGES}); a request also stays within "
                          f"{MAX_CONTROL_REQUEST_BYTES >> 20} MiB, so large images go in fewer per request")
