"""``locust -f FILE --help`` lists FILE's own options (for us: the FIRE traffic mix, attack and protocol).

Locust prints --help before it imports any locustfile (locust issue #2917, closed unfixed), so options that a
locustfile adds on ``init_command_line_parser`` never show there. The package installs
``fire_backend_locust_help.pth`` into site-packages; Python runs its one line at every interpreter start, which
calls ``install()`` only when the command line mentions locust. In a Locust process asked for help, ``install()``
imports the locustfiles Locust would import, found by Locust's own rules (``-f``, ``LOCUST_LOCUSTFILE``,
``locust.conf``, ``[tool.locust]``, else ``./locustfile.py``), so their listeners are in place when Locust builds
its help. Locust runs the same files for every other command, ``--list`` included. A file that fails to import
costs only its options: Locust's plain help follows, after a one-line note.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

HELP_FLAGS = frozenset({"-h", "--help"})
_STATE = {"installed": False}


def locust_arguments(argv: Sequence[str], orig_argv: Sequence[str]) -> list[str] | None:
    """Locust's arguments if this interpreter runs Locust (the ``locust`` script or ``python -m locust``), else None.

    At interpreter start ``sys.argv[0]`` is the script's path, or ``-m`` with the module named only in
    ``sys.orig_argv``.
    """
    if not argv:
        return None
    if os.path.basename(argv[0]) in ("locust", "locust.exe"):
        return list(argv[1:])
    if argv[0] == "-m":
        for i, arg in enumerate(orig_argv):
            if arg == "-mlocust" or (arg == "-m" and i + 1 < len(orig_argv) and orig_argv[i + 1] == "locust"):
                return list(argv[1:])
    return None


def locustfiles(args: Sequence[str]) -> list[str]:
    """The local locustfiles Locust would import for these arguments; URLs and ``-`` (from a master) are left out,
    as is a name that is not there (Locust reports it when it runs)."""
    from locust.argument_parser import get_empty_argument_parser
    from locust.util.directory import get_abspaths_in
    from locust.util.url import is_url

    options, _ = get_empty_argument_parser(add_help=False).parse_known_args(list(args))
    paths: list[str] = []
    for name in (part.strip() for part in options.locustfile.split(",")):
        if not name or name == "-" or is_url(name):
            continue
        if os.path.isdir(name):
            paths.extend(sorted(get_abspaths_in(name, extension=".py")))
        elif name.endswith(".py") and os.path.isfile(name):
            paths.append(os.path.abspath(name))
    return paths


def install() -> None:
    """Import the locustfiles before Locust answers --help; anything else returns at once. Idempotent (site.py may
    read the .pth twice, through lib and lib64) and never raises: help must always print."""
    if _STATE["installed"]:
        return
    _STATE["installed"] = True
    args = locust_arguments(sys.argv, getattr(sys, "orig_argv", ()))
    if args is None or not HELP_FLAGS.intersection(args):
        return
    path = "the locustfile"
    try:
        from locust.util.load_locustfile import load_locustfile

        for path in locustfiles(args):
            load_locustfile(path)
    except (Exception, SystemExit) as exc:
        print(f"note: could not import {path} ({type(exc).__name__}: {exc}); the help below lacks its options",
              file=sys.stderr)
