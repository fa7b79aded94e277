"""Where the offline commands compute: ``--device auto|cpu|cuda`` and ``--batch-size``.

There is no GPU here: "a GPU is present" is a faithful double (``torch.cuda.is_available`` answering True on this
CPU-only torch, so anything that then really moves to CUDA fails with torch's own "not compiled with CUDA"), and
the "meta" device stands in for an accelerator where data must move. What is checked on real hardware is that
models and tensors land on the chosen device, the CPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fire_backend.cli import main
from fire_backend.data import load_dataset, resolve_attack
from fire_backend.data.reserve import defender_samples
from fire_backend.device import resolve_device
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.offline.evaluation import LayerView, batched, evaluation_set, module_device
from fire_backend.offline.training import TrainConfig, train_backdoored

FIRE = Path(sys.executable).with_name("fire")
no_gpu_here = pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU is present: the double is not needed")


@pytest.fixture
def gpu_present(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch reports a CUDA device (nothing can really use it: the build is CPU-only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_auto_picks_cuda_when_torch_sees_a_gpu(gpu_present: None) -> None:
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cpu") == torch.device("cpu")


@no_gpu_here
def test_auto_is_the_cpu_without_a_gpu_and_cuda_is_a_clear_error() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="torch sees no CUDA device.*use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_batches_move_to_the_device_and_stay_there() -> None:
    out = batched(lambda t: t * 2, torch.ones(5, 3), batch=2, device="meta")
    assert out.device.type == "meta" and out.shape == (5, 3)


def test_models_and_latents_land_on_the_chosen_device(digits_checkpoint) -> None:
    model, meta = load_checkpoint(digits_checkpoint("badnets"), resolve_device("cpu"))
    assert module_device(model) == torch.device("cpu")
    data = load_dataset(meta.dataset)
    attack = resolve_attack(meta.attack)
    samples = defender_samples(data.x_test, data.y_test, attack, meta.target, 20, 5)
    view = LayerView(model, "block2", samples, evaluation_set(data.x_test, data.y_test, attack, meta.target, 30))
    assert view.device == torch.device("cpu") and view.clean_latents.device == torch.device("cpu")
    assert view.mu.device == torch.device("cpu")  # the centroid goes to the store as numpy


@no_gpu_here
@pytest.mark.parametrize("command", [
    ["eval", "--flagged", "5", "--eval-images", "20"],
    ["sweep", "--flagged", "5", "--eval-images", "20"],
    ["repo", "build", "--flagged", "5", "--out", "{tmp}/repo"],
])
def test_the_commands_compute_on_cuda_when_a_gpu_is_present(
    command: list[str], digits_checkpoint, gpu_present: None, tmp_path: Path
) -> None:
    argv = [part.format(tmp=tmp_path) for part in command]
    with pytest.raises(AssertionError, match="not compiled with CUDA"):  # torch's own: it did go for the GPU
        main([*argv, "--checkpoint", str(digits_checkpoint("badnets"))])
    assert not (tmp_path / "repo").exists()  # the build failed before writing anything


@no_gpu_here
def test_training_computes_on_cuda_when_a_gpu_is_present(gpu_present: None, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="not compiled with CUDA"):
        train_backdoored(TrainConfig(epochs=1, train_subset=64, width=4), tmp_path / "run", progress=False)
    meta = train_backdoored(TrainConfig(epochs=1, train_subset=64, width=4, device="cpu", batch_size=16),
                            tmp_path / "cpu", progress=False)
    assert meta.ca is not None


def fire(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(FIRE), *argv], capture_output=True, text=True, timeout=300, check=False)


@no_gpu_here
@pytest.mark.skipif(not FIRE.is_file(), reason=f"no console script at {FIRE}")
def test_device_and_batch_size_through_the_console_script(digits_checkpoint, tmp_path: Path) -> None:
    checkpoint = str(digits_checkpoint("badnets"))
    proc = fire("eval", "--checkpoint", checkpoint, "--device", "cuda")
    assert proc.returncode == 2 and "fire eval: error: --device cuda: torch sees no CUDA device" in proc.stderr
    proc = fire("repo", "build", "--checkpoint", checkpoint, "--out", str(tmp_path / "repo"), "--batch-size", "0")
    assert proc.returncode == 2 and "--batch-size must be at least 1" in proc.stderr
    assert not (tmp_path / "repo").exists()
    proc = fire("eval", "--checkpoint", checkpoint, "--device", "cpu", "--batch-size", "7", "--eval-images", "40",
                "--flagged", "5", "--out", str(tmp_path / "eval"), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["defender"]["evaluated"] == 40 and report["defender"]["flagged"] == 5
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["defender"] == report["defender"]
