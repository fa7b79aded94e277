"""Triton tensors to torch and back, on the CPU or a GPU, with one device->host copy for a batch's small outputs.

Every stage reads its inputs through :func:`from_triton`: a Triton tensor may sit in CPU memory (``as_numpy`` works)
or in GPU memory (``as_numpy`` raises; DLPack works), depending on the instance kind and on
``FORCE_CPU_ONLY_INPUT_TENSORS``. Latents stay on the device between stages (:func:`to_triton` hands them over by
DLPack). The small per-sample outputs (scores, flags, versions, labels, logits) leave the GPU once per batch:
:func:`to_host` packs them into one tensor, copies it, and splits it on the CPU. Nothing here imports Triton; the
``pb_utils`` module is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.utils.dlpack

#: a packed column holds any of these exactly: float32, int64 below 2**53, bool
_PACK_DTYPE = torch.float64


def from_triton(tensor: Any, device: torch.device) -> torch.Tensor:
    """A Triton tensor (CPU or GPU memory) as a torch tensor on ``device``; no copy where none is needed."""
    if tensor.is_cpu():
        value = torch.from_numpy(tensor.as_numpy())
    else:
        value = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
    return value if value.device == device else value.to(device, non_blocking=True)


def to_triton(pb_utils: Any, name: str, value: torch.Tensor | np.ndarray) -> Any:
    """An output tensor: numpy and CPU tensors as they are, GPU tensors by DLPack (they stay on the device)."""
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, value)
    if value.device.type == "cpu":
        return pb_utils.Tensor(name, value.contiguous().numpy())
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))


def pack(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(N, ...) tensors of any dtype as one float64 (N, total width) tensor, on their device."""
    return torch.cat([v.reshape(v.shape[0], -1).to(_PACK_DTYPE) for v in values.values()], dim=1)


def unpack(packed: np.ndarray, like: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The inverse of :func:`pack` on the host: each column block back to its tensor's shape and dtype."""
    out, start = {}, 0
    for name, value in like.items():
        width = int(np.prod(value.shape[1:], dtype=np.int64))
        block = packed[:, start:start + width].reshape(value.shape)
        out[name] = block.astype(_numpy_dtype(value.dtype))
        start += width
    return out


def to_host(values: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The batch's small outputs as numpy: as they are on the CPU, in ONE device->host copy from a GPU."""
    if all(v.device.type == "cpu" for v in values.values()):
        return {name: v.numpy() for name, v in values.items()}
    return unpack(pack(values).cpu().numpy(), values)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype
