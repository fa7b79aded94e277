#!/usr/bin/env python3
"""`python clients/infer.py ARGS` is `fire infer ARGS`: send images to a running FIRE server.

    python clients/infer.py --url grpc://127.0.0.1:8001 --digits 10
    python clients/infer.py --url http://127.0.0.1:8000 --npz poisoned.npz --batch 64 --json  # KServe v2 over HTTP

The code lives in fire_backend.wire (the client, torch-free) and fire_backend.cli.infer (this command).
"""

import sys

from fire_backend.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
