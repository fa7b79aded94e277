"""What the launcher and its supervisor read from a repository's ``config.pbtxt`` files: which models run in
Python-backend stubs, and the names of their instances.

Triton names an instance ``<group name>_<i>`` for i in 0..count-1, the group name defaulting to
``<model>_<group index>`` (core r24.10, ``backend_model.cc`` / ``model_config_utils.cc``); each stub carries that
name in its argv, which is how the supervisor tells which instance died. Only the few fields needed are read, with
a small bracket matcher rather than a protobuf text parser: the configs are ours or the operator's, never a
client's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_PYTHON_BACKEND = re.compile(r'^\s*backend\s*:\s*"python"', re.MULTILINE)


@dataclass(frozen=True)
class StubModel:
    """A Python-backend model of the repository and the instance names Triton gives its stubs."""

    name: str
    directory: Path
    instances: tuple[str, ...]

    @property
    def version_dir(self) -> Path:
        """The directory poll mode watches for this model's served version (the highest numeric one)."""
        versions = sorted((p for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit()),
                          key=lambda p: int(p.name))
        return versions[-1] if versions else self.directory


def _block(text: str, start: int, open_: str, close: str) -> tuple[str, int]:
    """The text between ``text[start] == open_`` and its matching ``close`` (nesting of both kinds counted)."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "[{":
            depth += 1
        elif text[i] in "]}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    raise ValueError(f"unbalanced {open_}{close}")


def _top_level(text: str) -> str:
    """``text`` without the contents of its nested ``{...}`` and ``[...]`` (a rate limiter's ``name``, ``count``)."""
    out, depth = [], 0
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif depth == 0:
            out.append(char)
    return "".join(out)


def instance_names(model: str, config: str) -> tuple[str, ...]:
    """The instance names of ``model`` from its config text; ``(<model>_0,)`` without an instance_group."""
    found = re.search(r"\binstance_group\s*\[", config)
    if not found:
        return (f"{model}_0",)
    body, _ = _block(config, found.end() - 1, "[", "]")
    names, position, index = [], 0, 0
    while (brace := body.find("{", position)) != -1:
        group, position = _block(body, brace, "{", "}")
        group = _top_level(group)
        count = re.search(r"\bcount\s*:\s*(\d+)", group)
        name = re.search(r'\bname\s*:\s*"([^"]+)"', group)
        group_name = name.group(1) if name else f"{model}_{index}"
        names += [f"{group_name}_{i}" for i in range(int(count.group(1)) if count else 1)]
        index += 1
    return tuple(names)


def stub_models(models_dir: Path) -> list[StubModel]:
    """Every Python-backend model in a Triton models folder, with its instance names."""
    out = []
    for config in sorted(Path(models_dir).glob("*/config.pbtxt")):
        text = config.read_text(errors="replace")
        if _PYTHON_BACKEND.search(text):
            out.append(StubModel(config.parent.name, config.parent, instance_names(config.parent.name, text)))
    return out
