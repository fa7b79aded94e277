"""``python -m fire_backend.cli ARGS`` is ``fire ARGS``."""

import sys

from fire_backend.cli import main

sys.exit(main())
