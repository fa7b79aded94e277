"""A user's own network: a module file with a factory and a state dict, or a ``torch.export`` program (``.pt2``).

Loading a module file **runs it** (it is Python); ``torch.export.load`` unpickles parts of a ``.pt2``: bring files
you wrote or trust, as you would ``import`` them. A state dict is read with ``torch.load(weights_only=True)``:
tensors only. Each file is identified by its SHA-256 (recorded when it is imported, checked whenever it is loaded
again), so a checkpoint or repository runs the very file it was built from.

Every refusal is a :class:`UserModelError` that says what to change.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import pickle
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fire_backend.models.layers import near

#: the names a user network's file takes inside a checkpoint or repository
MODULE_FILE = "network.py"
PROGRAM_FILE = "network.pt2"
#: what a state dict is often wrapped in by training code (the one key whose value is the state dict)
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
EXPORT_CALL = ("torch.export.save(torch.export.export(model.eval(), (torch.rand(2, C, H, W),), "
               "dynamic_shapes=({0: torch.export.Dim('batch')},)), 'network.pt2')")


class UserModelError(ValueError):
    """A user network, file or weights that cannot be used as given (the message says what to change)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str | None) -> None:
    """UserModelError unless ``path`` exists and has the recorded digest (``None``: no record, not checked)."""
    if not Path(path).is_file():
        raise UserModelError(f"{path}: missing (a checkpoint or repository keeps its network's file beside its "
                             "weights; import the network again with `fire import model`)")
    if expected is not None and file_sha256(path) != expected:
        raise UserModelError(f"{path}: changed since it was imported (SHA-256 differs from the recorded "
                             f"{expected[:16]}...); import the network again with `fire import model`")


def parse_factory(text: str) -> tuple[Path, str]:
    """``FILE.py:FACTORY`` -> (file, factory name)."""
    path, sep, name = text.rpartition(":")
    if not sep or not path or not name:
        raise UserModelError(f"--module {text!r}: expected FILE.py:FACTORY (a Python file and the name of the class "
                             "or function in it that builds the network)")
    if not path.endswith(".py"):
        raise UserModelError(f"--module {text!r}: {path} is not a .py file")
    return Path(path), name


def load_module_file(path: Path, sha256: str | None = None) -> ModuleType:
    """Run the module file (once per content in a process) and return the module."""
    path = Path(path)
    check_sha256(path, sha256)
    digest = sha256 or file_sha256(path)
    name = f"fire_user_network_{digest[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserModelError(f"{path}: not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name while they load
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - anything the user's file raises is theirs to fix; say what it was
        del sys.modules[name]
        raise UserModelError(f"{path}: running it failed: {type(exc).__name__}: {exc} (it must import without "
                             "side effects and need only installed packages: it is copied alone)") from None
    return module


def _defined_callables(module: ModuleType) -> list[str]:
    return sorted(name for name, value in vars(module).items()
                  if callable(value) and getattr(value, "__module__", None) == module.__name__
                  and not name.startswith("_"))


def build_from_file(path: Path, factory: str, kwargs: Mapping[str, Any] | None = None,
                    sha256: str | None = None) -> nn.Module:
    """``factory(**kwargs)`` from the module file: the user's network, as their code builds it."""
    module = load_module_file(path, sha256)
    target: Any = module
    for part in factory.split("."):
        target = getattr(target, part, None)
        if target is None:
            defined = _defined_callables(module)
            close = near(factory, defined)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserModelError(f"{path} defines no {factory!r}{hint} (it defines: {', '.join(defined) or 'nothing'})")
    if not callable(target):
        raise UserModelError(f"{path}: {factory!r} is a {type(target).__name__}, not a class or function")
    try:
        model = target(**dict(kwargs or {}))
    except TypeError as exc:
        try:
            signature = f"{factory}{inspect.signature(target, eval_str=True)}"
        except Exception:  # noqa: BLE001 - annotations that do not evaluate: show them as written
            try:
                signature = f"{factory}{inspect.signature(target)}"
            except (TypeError, ValueError):
                signature = factory
        raise UserModelError(f"{path}: {factory}(**{json.dumps(dict(kwargs or {}))}) failed: {exc}; it takes "
                             f"{signature} (pass arguments with --kwargs JSON)") from None
    if not isinstance(model, nn.Module):
        raise UserModelError(f"{path}: {factory}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/__torch__" in name or name.endswith("/constants.pkl") for name in archive.namelist())


TORCHSCRIPT_REFUSED = ("is a TorchScript archive (torch.jit.save). FIRE does not serve TorchScript: a scripted "
                       "module runs its submodules inside compiled code, where no repair hook can reach the layer's "
                       "output. Export the network instead: " + EXPORT_CALL + ", then `fire import model --exported "
                       "network.pt2`; or bring its code: `--module FILE.py:FACTORY --weights STATE_DICT.pt`")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (tensors only: ``weights_only=True``); a wrapper dict with one state dict under
    ``state_dict``/``model``... is unwrapped, and DataParallel's ``module.`` prefix is dropped."""
    path = Path(path)
    if not path.is_file():
        raise UserModelError(f"--weights {path}: no such file")
    if _torchscript(path):
        raise UserModelError(f"--weights {path} {TORCHSCRIPT_REFUSED}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserModelError(f"--weights {path}: holds more than tensors ({first}); a pickled nn.Module is not "
                             "read (it would run code): save the weights with torch.save(model.state_dict(), PATH)"
                             ) from None
    except Exception as exc:  # noqa: BLE001 - junk fails the unpickler in many ways
        raise UserModelError(f"--weights {path}: not a torch-saved state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(data, Mapping) and not any(isinstance(v, torch.Tensor) for v in data.values()):
        inner = [k for k in WRAPPER_KEYS if isinstance(data.get(k), Mapping)]
        if len(inner) == 1:
            data = data[inner[0]]
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserModelError(f"--weights {path}: expected a state dict (parameter name -> tensor), got "
                             f"{type(data).__name__}: save it with torch.save(model.state_dict(), PATH)")
    state = {str(k): v for k, v in data.items()}
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model`` key for key; UserModelError naming the missing, unexpected and misshapen keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (the network's {tuple(own[k].shape)})" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {listed(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} keys of another shape: {listed(shapes)}")
    if problems:
        raise UserModelError(f"{where} do not fit the network: {'; '.join(problems)} (the factory's arguments, "
                             "--kwargs, must build the network the weights were trained for)")
    model.load_state_dict(dict(state), strict=True)


#: operations whose argument says they run in training mode: (op name, index of that argument)
TRAINING_FLAGS = {"batch_norm": 5, "dropout": 2, "native_dropout": 2, "feature_dropout": 2, "alpha_dropout": 2}
TRAINING_OPS = ("_native_batch_norm_legit_functional", "_native_batch_norm_legit.default")


def _training_mode_ops(program: torch.export.ExportedProgram) -> list[str]:
    found = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target).removeprefix("aten.")
        base = name.split(".")[0]
        flag = TRAINING_FLAGS.get(base)
        if flag is not None and len(node.args) > flag and node.args[flag] is True:
            found.append(name)
        elif name.startswith(TRAINING_OPS):
            found.append(name)
    return found


def load_program(path: Path, sha256: str | None = None) -> torch.export.ExportedProgram:
    """A ``torch.export`` program from a ``.pt2``, checked: one image input with a dynamic batch dimension, exported
    in eval mode. Refuses TorchScript and state dicts with what to do instead."""
    path = Path(path)
    check_sha256(path, sha256)
    if _torchscript(path):
        raise UserModelError(f"{path} {TORCHSCRIPT_REFUSED}")
    try:
        program = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - anything but a .pt2 fails here, in many ways
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserModelError(f"{path}: not a torch.export program ({reason}). Make one with {EXPORT_CALL}; a state "
                             "dict goes with --module FILE.py:FACTORY --weights instead") from None
    inputs = [spec for spec in program.graph_signature.input_specs if spec.kind.name == "USER_INPUT"]
    if len(inputs) != 1:
        raise UserModelError(f"{path}: the program takes {len(inputs)} inputs; FIRE serves classifiers of one image "
                             "batch (FP32 NCHW in [0, 1])")
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0].arg.name)
    batch = placeholder.meta["val"].shape[0]
    if not isinstance(batch, torch.SymInt):
        raise UserModelError(f"{path}: exported for a fixed batch of {batch}: Triton batches requests, so the batch "
                             f"dimension must be dynamic. Export it again with {EXPORT_CALL}")
    training = _training_mode_ops(program) or list(program.graph_signature.buffers_to_mutate)
    if training:
        raise UserModelError(f"{path}: exported in training mode ({', '.join(sorted(set(training))[:4])}): batch "
                             f"statistics and dropout would change every answer. Export it again after model.eval(): "
                             f"{EXPORT_CALL}")
    return program


def program_input_shape(program: torch.export.ExportedProgram) -> tuple[int, ...]:
    """The per-sample input shape the program was exported for (C, H, W)."""
    placeholder = next(n for n in program.graph.nodes if n.op == "placeholder"
                       and n.name == program.graph_signature.user_inputs[0])
    return tuple(int(s) for s in placeholder.meta["val"].shape[1:])


def check_classifier(run: Callable[[torch.Tensor], Any], input_shape: tuple[int, ...], classes: int,
                     device: torch.device | str = "cpu") -> None:
    """UserModelError unless the network maps batches of 1 and 3 images to [N, classes] float logits."""
    for n in (1, 3):
        x = torch.rand((n, *input_shape), generator=torch.Generator().manual_seed(n)).to(device)
        try:
            with torch.no_grad():
                out = run(x)
        except Exception as exc:  # noqa: BLE001 - the user's forward; its error is the message
            raise UserModelError(f"the network fails on a batch of {n} images {[n, *input_shape]} (FP32 NCHW in "
                                 f"[0, 1]): {type(exc).__name__}: {exc}") from None
        if not isinstance(out, torch.Tensor):
            raise UserModelError(f"the network returns a {type(out).__name__}; FIRE serves classifiers that return "
                                 "one logits tensor [N, classes]")
        if tuple(out.shape) != (n, classes) or not out.is_floating_point():
            raise UserModelError(f"the network returns {out.dtype} {list(out.shape)} for {n} images; expected "
                                 f"float logits [{n}, {classes}] (--classes {classes})")
