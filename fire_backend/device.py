"""Where the offline commands compute (`fire train`, `eval`, `sweep`, `import --measure`, `repo build`).

``auto`` takes the GPU whenever torch sees one: a full-size PreActResNet18 evaluation that takes seconds on a
GPU takes tens of minutes on two CPU cores. Serving places its stages through the repository's own settings
(`fire repo build --gpu`), not here. torch is imported only when a device is resolved: the CLI builds its
parser (these choices) in torch-free commands too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: images per forward pass offline (``--batch-size``)
DEFAULT_BATCH_SIZE = 256


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``; a ValueError naming the fix
    when CUDA is asked for and torch cannot use it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"--device {name}: torch sees no CUDA device (torch {torch.__version__}, {build}); "
                             "use --device cpu, or auto to take a GPU only when there is one")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}: use one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")


def check_batch_size(batch_size: int) -> int:
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    return batch_size
