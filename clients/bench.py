#!/usr/bin/env python3
"""`python clients/bench.py ARGS` is `fire bench ARGS`: FIRE vs undefended vs monolithic under Locust load.

    python clients/bench.py --concurrency 1,16 --duration 15 --out bench-results
"""

import sys

from fire_backend.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
