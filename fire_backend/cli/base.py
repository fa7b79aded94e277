"""What every ``fire`` command module shares: the usage-error type, the help layout, and the --json line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """An error the user can fix; printed as one line naming the fix, exit status 2."""


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def add_command(subparsers, name: str, handler: Handler, help_text: str, examples: str,
                description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help shows ``description`` (default ``help_text``) and the ``examples``; ``handler``
    runs it."""
    parser = subparsers.add_parser(
        name, help=help_text, description=description or help_text, epilog=f"examples:\n{examples}",
        formatter_class=formatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def add_group(subparsers, name: str, help_text: str, dest: str, metavar: str,
              description: str | None = None) -> argparse._SubParsersAction:
    """A command with subcommands of its own (``fire data export``, ``fire repo build``, ``fire import ...``)."""
    parent = subparsers.add_parser(name, help=help_text, description=description or help_text,
                                   formatter_class=formatter)
    return parent.add_subparsers(dest=dest, metavar=metavar, required=True)


def add_device_options(parser: argparse.ArgumentParser, work: str, batch_size: int | None = None) -> None:
    """``--device`` and ``--batch-size`` for a command that runs a model offline (``work`` says on what)."""
    from fire_backend.device import DEFAULT_BATCH_SIZE, DEVICE_CHOICES

    batch_size = batch_size or DEFAULT_BATCH_SIZE
    parser.add_argument("--device", default="auto", metavar="{" + ",".join(DEVICE_CHOICES) + "}",
                        help=f"where {work} runs: auto = CUDA when torch sees a GPU, else the CPU (auto); cuda:N "
                             "picks a GPU")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"images per batch ({batch_size})")


def say(text: str) -> None:
    """Progress lines of long commands, flushed at once (they interleave with subprocess output)."""
    print(text, flush=True)


def emit_json(args: argparse.Namespace, payload: dict) -> None:
    """With --json the last printed line is one JSON object, for scripts."""
    if getattr(args, "json", False):
        print(json.dumps(payload))
