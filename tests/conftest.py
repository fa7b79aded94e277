"""Shared fixtures: backdoored digits checkpoints, trained once per session (about 20 s each on 2 cores), and the
shared data beside the project (../shared, or FIRE_SHARED_DIR).

Set FIRE_TEST_CACHE=DIR to keep the checkpoints between sessions: an existing DIR/digits-ATTACK
checkpoint is reused instead of retrained.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fire_backend.defaults import SHARED_DIR_ENV, shared_dir

ROOT = Path(__file__).resolve().parents[1]
DIGITS_ATTACKS = ("badnets", "blended")


def _is_checkpoint(directory: Path, attack: str) -> bool:
    meta = directory / "meta.json"
    if not meta.is_file() or not (directory / "model.pt").is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("attack") == attack
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def digits_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """attack name -> checkpoint directory of a digits model backdoored with it (target 0), trained lazily."""
    from fire_backend.training import TrainConfig, train_backdoored

    cache = os.environ.get("FIRE_TEST_CACHE")
    root = Path(cache).expanduser() if cache else tmp_path_factory.mktemp("digits-checkpoints")
    trained: dict[str, Path] = {}

    def get(attack: str) -> Path:
        if attack not in trained:
            out = root / f"digits-{attack.replace(':', '-')}"
            if not _is_checkpoint(out, attack):
                train_backdoored(TrainConfig(attack=attack), out, progress=False)
            trained[attack] = out
        return trained[attack]

    return get


@pytest.fixture(scope="session")
def digits_checkpoints(digits_checkpoint: Callable[[str], Path]) -> dict[str, Path]:
    """{"badnets": DIR, "blended": DIR}: digits checkpoints written by `train_backdoored`."""
    return {attack: digits_checkpoint(attack) for attack in DIGITS_ATTACKS}


@pytest.fixture(scope="session")
def shared_file() -> Callable[[str], Path]:
    """relative path -> that file of the shared data (``../shared`` beside the project root, or $FIRE_SHARED_DIR);
    the test is skipped with the reason when it is absent (it is never downloaded)."""
    root = shared_dir(ROOT)

    def get(relative: str) -> Path:
        path = root / relative
        if not path.exists():
            pytest.skip(f"{relative} not found under {root} (the shared data, never downloaded; set {SHARED_DIR_ENV} "
                        "to where it is)")
        return path

    return get
