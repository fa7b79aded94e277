"""Real data, as it is: a full-size BadNets PreActResNet18 from shared/models, the class-ordered
shared/data/cifar10.npz, `fire import backdoorbench` + `fire eval` + `fire repo build --flagged 20` + the real
tritonserver. The served PA must be within 3 points of `fire eval`'s unpaired projection on the same layer and
the same evaluation images (benchmarks/real_data_check.py; its full-size numbers are in benchmarks/RESULTS.md).

With the reserve "the first 200 test images" (all airplanes, the target class) the served PA was 0.087 against
0.083 bypassed, on a model where offline FIRE reaches 0.855. Skipped with the reason when the shared files are
absent; EVAL_IMAGES evaluation images keep it to a few minutes of 2 CPU cores (FIRE_TEST_CACHE=DIR keeps the
imported checkpoint between runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EVAL_IMAGES = 400


def test_served_fire_matches_offline_fire_on_the_shared_model(
    shared_file, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shared_file("data/cifar10.npz")
    models = shared_file("models/cifar10_preactresnet18_badnets.fp16.pt").parent
    shared_file("models/make_attack_result.py")
    cache = os.environ.get("FIRE_TEST_CACHE")
    work = Path(cache).expanduser() / "real-data-check" if cache else tmp_path_factory.mktemp("real")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "real_data_check.py"), "--shared", str(models.parent), "--work",
         str(work), "--eval-images", str(EVAL_IMAGES), "--json"],
        capture_output=True, text=True, timeout=1800, check=False,
    )
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\n" + "\n".join(proc.stdout.strip().splitlines()[-9:-1]))
    served, offline = result["served"], result["offline"]
    assert served["images"] == result["defender"]["evaluated"] == EVAL_IMAGES
    assert served["versions"] == [1]  # every poisoned image was repaired with the build's direction
    assert abs(served["fire"]["pa"] - offline["pa"]) <= 0.03, result
    assert offline["pa"] >= 0.7 and served["bypassed"]["asr"] >= 0.8, result  # a backdoor, and FIRE repairs it
    assert served["fire"]["ca"] >= served["bypassed"]["ca"] - 0.02, result
    assert proc.returncode == 0
