"""The ``fire`` command: the only code that parses arguments or prints. One module per command group:

``offline`` (train, eval, sweep, data export), ``demo``, ``serving`` (repo build, serve), ``ctl``, ``infer``,
``bench``, ``importer`` (import). Each registers its subcommands here; the library beneath never imports this
package. Command modules import the library inside their handlers, so ``fire infer`` and ``fire ctl`` stay
torch-free. Each subcommand's --help has examples.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fire_backend.cli import bench, ctl, demo, importer, infer, offline, serving
from fire_backend.cli.base import CliError, formatter

#: in the order ``fire --help`` lists them
COMMAND_GROUPS = (offline, demo, serving, ctl, infer, bench, importer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fire",
        description="FIRE: repair backdoored image classifiers at inference time, served on Triton.",
        formatter_class=formatter,
        epilog="start here:\n  fire demo            # the whole story on the embedded digits data set\n"
        "  fire train --help    # each command's options and examples",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (CliError, FileNotFoundError, ValueError) as exc:
        print(f"fire {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
