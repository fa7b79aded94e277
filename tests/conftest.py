"""Shared fixtures: backdoored digits checkpoints, trained once per session (about 20 s each on 2 cores), and the
CIFAR-10 file and full-size models (FIRE_SHARED_DIR, default shared/ in the project root; docs/data.md), and the
evaluation images of the digits test split.

Set FIRE_TEST_CACHE=DIR to keep the checkpoints between sessions: an existing DIR/digits-ATTACK
checkpoint is reused instead of retrained.

Set FIRE_TEST_STRESS=1 (or pass ``--stress``) to run beside 2 busy processes and have the session fail on any
lock_exception, heap corruption or segmentation fault in the tritonserver logs it left (tests/stress.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import stress

from fire_backend.defaults import shared_dir, shared_hint

ROOT = Path(__file__).resolve().parents[1]
DIGITS_ATTACKS = ("badnets", "blended")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stress", action="store_true",
                     help=f"run beside {stress.HOGS} busy processes (as {stress.STRESS_ENV}=1 does) and fail on "
                          "tritonserver aborts in the logs the session left")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_STRESS] = stress.requested(config.getoption("--stress"))
    config.stash[_STARTED] = time.time()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if not config.stash.get(_STRESS, False):
        return
    report = stress.scan_logs(config.stash[_BASETEMP], config.stash[_STARTED]) if _BASETEMP in config.stash \
        else stress.AbortReport()
    config.stash[_REPORT] = report
    if report.unexpected and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    report = config.stash.get(_REPORT, None)
    if report is not None:
        for line in [f"stress mode: {stress.HOGS} busy processes beside the tests", *report.lines()]:
            terminalreporter.write_line(line)


_STRESS = pytest.StashKey[bool]()
_STARTED = pytest.StashKey[float]()
_BASETEMP = pytest.StashKey[Path]()
_REPORT = pytest.StashKey[stress.AbortReport]()


@pytest.fixture(scope="session", autouse=True)
def cpu_hog(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """In stress mode, the busy processes for the whole session (and where its repositories live, for the scan)."""
    if not request.config.stash.get(_STRESS, False):
        yield
        return
    request.config.stash[_BASETEMP] = tmp_path_factory.getbasetemp()
    hogs = stress.start_hogs()
    try:
        yield
    finally:
        stress.stop_hogs(hogs)


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
    from fire_backend.offline.training import TrainConfig, train_backdoored

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
    """relative path -> that file under $FIRE_SHARED_DIR (default ``shared/`` in the project root); the test is
    skipped, naming the setting, when it is absent (it is never downloaded)."""
    root = shared_dir(ROOT)

    def get(relative: str) -> Path:
        path = root / relative
        if not path.exists():
            pytest.skip(shared_hint(relative, root))
        return path

    return get


@dataclass
class EvalImages:
    """The evaluation images of the digits test split (the defender's reserve excluded)."""

    clean: np.ndarray  # float32 NCHW
    labels: np.ndarray
    poisoned: np.ndarray  # non-target images with the trigger
    poisoned_labels: np.ndarray  # their true labels
    target: int


@pytest.fixture(scope="session")
def badnets_eval() -> EvalImages:
    from fire_backend.data import load_dataset, resolve_attack, to_tensor
    from fire_backend.defaults import evaluation_indices

    data = load_dataset("digits")
    evaluated = evaluation_indices(data.y_test)
    x, y = to_tensor(data.x_test[evaluated]), data.y_test[evaluated]
    keep = y != 0
    poisoned = resolve_attack("badnets")(x[keep])
    return EvalImages(x.numpy(), y, poisoned.numpy(), y[keep], 0)
