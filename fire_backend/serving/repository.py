"""Write a Triton model repository for any supported checkpoint and split layer.

The repository's ``models/`` holds the ensemble ``fire_ensemble`` (head -> FIRE repair -> tail), the comparison
``undefended_ensemble`` (head -> tail), the unsplit ``fire_monolithic`` model, and ``fire_control``; beside it,
``artifacts/`` holds the model halves, serving settings, clean centroid and the direction store (layout:
:mod:`fire_backend.serving.artifacts`). Configs carry the model's own input/latent shapes and batch sizes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from fire_backend.checkpoint import load_checkpoint
from fire_backend.device import DEFAULT_BATCH_SIZE, check_batch_size, resolve_device
from fire_backend.evaluation import DEFAULT_LAYERS, LayerView, load_defender_samples
from fire_backend.fire import Direction
from fire_backend.serving.artifacts import (
    ARTIFACTS_DIR,
    FULL_FILE,
    HEAD_FILE,
    STORE_DIR,
    TAIL_FILE,
    ServingSettings,
    models_dir,
    save_centroid,
)
from fire_backend.split import Part, candidate_layers, save_part, split
from fire_backend.store import DirectionSet, DirectionStore
from fire_backend.wire.names import (
    DIRECTION_VERSION,
    FIRE_CONTROL,
    FIRE_ENSEMBLE,
    FIRE_HEAD,
    FIRE_MONOLITHIC,
    FIRE_REPAIR,
    FIRE_TAIL,
    FLAGGED,
    IMAGE,
    IMAGES,
    LABEL,
    LATENT,
    LOGITS,
    REPAIR_SCORE,
    REPAIRED,
    REQUEST,
    RESPONSE,
    TOKEN,
    UNDEFENDED_ENSEMBLE,
)

STAGES = {  # model name -> class in fire_backend.serving.triton_models
    FIRE_HEAD: "HeadModel",
    FIRE_REPAIR: "RepairModel",
    FIRE_TAIL: "TailModel",
    FIRE_MONOLITHIC: "MonolithicModel",
    FIRE_CONTROL: "ControlModel",
}


@dataclass(frozen=True)
class RepositoryOptions:
    """Knobs of the generated configs (the defaults suit 2 CPU cores)."""

    max_batch_size: int = 64
    gpu: bool = False
    head_instances: int = 1
    repair_instances: int = 2
    tail_instances: int = 1
    torch_threads: int = 1
    head_queue_delay_us: int = 200
    repair_queue_delay_us: int = 0
    tail_queue_delay_us: int = 0
    flag_threshold: float = 0.5
    alpha: float = 1.0
    publish_every: int = 1
    clean_samples: int = 100


def _dims(shape) -> str:
    return "[ " + ", ".join(str(int(s)) for s in shape) + " ]"


def _io(kind: str, name: str, dtype: str, dims, optional: bool = False) -> str:
    flag = "\n  optional: true" if optional else ""
    return f'{kind} {{\n  name: "{name}"\n  data_type: {dtype}\n  dims: {_dims(dims)}{flag}\n}}'


def _logits_outputs(settings: ServingSettings) -> list[str]:
    return [_io("output", LOGITS, "TYPE_FP32", [settings.num_classes]), _io("output", LABEL, "TYPE_INT64", [1])]


def _score_outputs() -> list[str]:
    """The repair's per-sample outputs, which fire_ensemble passes on."""
    return [_io("output", REPAIR_SCORE, "TYPE_FP32", [1]), _io("output", FLAGGED, "TYPE_BOOL", [1]),
            _io("output", DIRECTION_VERSION, "TYPE_INT64", [1])]


def _params(values: dict[str, str]) -> str:
    return "\n".join(
        f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}' for k, v in values.items()
    )


def _stage_config(name: str, options: RepositoryOptions, inputs: list[str], outputs: list[str], instances: int,
                  delay_us: int, extra_params: dict[str, str] | None = None) -> str:
    kind = "KIND_GPU" if options.gpu else "KIND_CPU"
    params = {"artifacts_dir": ARTIFACTS_DIR, "torch_threads": str(options.torch_threads), **(extra_params or {})}
    if options.gpu:
        # Let GPU tensors reach the stage as they are (DLPack), instead of a copy to host memory.
        params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    batching = f"dynamic_batching {{\n  max_queue_delay_microseconds: {delay_us}\n}}"
    return "\n".join([
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {options.max_batch_size}",
        *inputs, *outputs,
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]",
        batching, _params(params), "",
    ])


def _ensemble_config(name: str, options: RepositoryOptions, settings: ServingSettings, defended: bool) -> str:
    c_in = _io("input", IMAGE, "TYPE_FP32", settings.input_shape)
    outs = _logits_outputs(settings)
    if defended:
        outs += _score_outputs()

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        ins = "\n".join(f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
        outs_ = "\n".join(f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outputs.items())
        return f'    {{\n      model_name: "{model}"\n      model_version: -1\n{ins}\n{outs_}\n    }}'

    steps = [step(FIRE_HEAD, {IMAGE: IMAGE}, {LATENT: "latent"})]
    if defended:
        steps.append(step(FIRE_REPAIR, {LATENT: "latent"}, {
            REPAIRED: "repaired", REPAIR_SCORE: REPAIR_SCORE, FLAGGED: FLAGGED, DIRECTION_VERSION: DIRECTION_VERSION}))
    steps.append(step(FIRE_TAIL, {LATENT: "repaired" if defended else "latent"}, {LOGITS: LOGITS, LABEL: LABEL}))
    return "\n".join([
        f'name: "{name}"', 'platform: "ensemble"', f"max_batch_size: {options.max_batch_size}", c_in, *outs,
        "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}", "",
    ])


def _control_config(settings: ServingSettings) -> str:
    return "\n".join([
        f'name: "{FIRE_CONTROL}"', 'backend: "python"', "max_batch_size: 0",
        _io("input", REQUEST, "TYPE_STRING", [1]),
        _io("input", TOKEN, "TYPE_STRING", [1]),
        _io("input", IMAGES, "TYPE_UINT8", [-1, *settings.input_shape[1:], settings.input_shape[0]], optional=True),
        _io("output", RESPONSE, "TYPE_STRING", [1]),
        "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]",
        _params({"artifacts_dir": ARTIFACTS_DIR, "torch_threads": "1"}), "",
    ])


def write_configs(out: Path, settings: ServingSettings, options: RepositoryOptions) -> None:
    """The config.pbtxt and thin model.py of every model (no weights), under ``out/models``."""
    latent = settings.latent_shape
    image_in = _io("input", IMAGE, "TYPE_FP32", settings.input_shape)
    latent_in = _io("input", LATENT, "TYPE_FP32", latent)
    logits = _logits_outputs(settings)
    configs = {
        FIRE_HEAD: _stage_config(FIRE_HEAD, options, [image_in], [_io("output", LATENT, "TYPE_FP32", latent)],
                                 options.head_instances, options.head_queue_delay_us),
        FIRE_REPAIR: _stage_config(FIRE_REPAIR, options, [latent_in],
                                   [_io("output", REPAIRED, "TYPE_FP32", latent), *_score_outputs()],
                                   options.repair_instances, options.repair_queue_delay_us),
        FIRE_TAIL: _stage_config(FIRE_TAIL, options, [latent_in], logits, options.tail_instances,
                                 options.tail_queue_delay_us),
        FIRE_MONOLITHIC: _stage_config(FIRE_MONOLITHIC, options, [image_in], logits, 1,
                                       options.head_queue_delay_us),
        FIRE_CONTROL: _control_config(settings),
        FIRE_ENSEMBLE: _ensemble_config(FIRE_ENSEMBLE, options, settings, defended=True),
        UNDEFENDED_ENSEMBLE: _ensemble_config(UNDEFENDED_ENSEMBLE, options, settings, defended=False),
    }
    for name, text in configs.items():
        directory = models_dir(out) / name
        (directory / "1").mkdir(parents=True, exist_ok=True)
        (directory / "config.pbtxt").write_text(text)
        if name in STAGES:
            (directory / "1" / "model.py").write_text(
                f'"""Triton entry point of {name}; the logic lives in fire_backend (see triton_models)."""\n\n'
                f"from fire_backend.serving.triton_models import {STAGES[name]} as TritonPythonModel  # noqa: F401\n"
            )


def build_repository(checkpoint: Path, out: Path, layer: str | None = None, flagged: int | None = None,
                     options: RepositoryOptions | None = None, device: str = "auto",
                     batch_size: int = DEFAULT_BATCH_SIZE) -> ServingSettings:
    """Split the checkpoint at ``layer`` and write a servable repository to ``out``.

    The clean centroid comes from ``options.clean_samples`` images of the defender's reserve. With
    ``flagged``, the store starts at version 1: an unpaired estimate from that many flagged poisoned
    reserve images; without it, at version 0 (no direction), to be learned online. Only those reserve images
    are read and run through the head (on ``device``), never the evaluation split.
    """
    options = options or RepositoryOptions()
    compute, batch_size = resolve_device(device), check_batch_size(batch_size)
    model, meta = load_checkpoint(checkpoint, compute)
    layer = layer or DEFAULT_LAYERS.get(meta.spec.arch)
    shapes = dict(candidate_layers(model, meta.spec.input_shape))
    if layer not in shapes:
        raise ValueError(f"cannot split after {layer!r}; candidate layers: {', '.join(shapes)}")
    samples = load_defender_samples(meta.dataset, meta.attack, meta.target, options.clean_samples, flagged or 0)
    settings = ServingSettings(
        layer=layer, input_shape=meta.spec.input_shape, latent_shape=shapes[layer],
        num_classes=int(meta.spec.kwargs.get("num_classes", 10)), arch=meta.spec.arch, attack=meta.attack,
        target=meta.target, dataset=meta.dataset, default_alpha=options.alpha,
        default_threshold=options.flag_threshold, publish_every=options.publish_every,
    )
    artifacts = out / ARTIFACTS_DIR
    if artifacts.exists():
        shutil.rmtree(artifacts)
    artifacts.mkdir(parents=True)
    head, tail = split(model, layer)
    names = [n for n, _ in model.stages()]
    save_part(head, meta.spec, layer, "head", artifacts / HEAD_FILE)
    save_part(tail, meta.spec, layer, "tail", artifacts / TAIL_FILE)
    save_part(Part(model, 0, len(names)), meta.spec, layer, "full", artifacts / FULL_FILE)
    settings.write(artifacts)

    view = LayerView(model, layer, samples, batch=batch_size)
    save_centroid(artifacts, view.mu.numpy(), len(samples.clean))
    store = DirectionStore(artifacts / STORE_DIR).ensure()
    if flagged:
        estimator = view.estimator("unpaired", flagged)
        direction = Direction(estimator.direction(), options.alpha, "projection", options.flag_threshold)
        ds = DirectionSet(view.mu.numpy(), [direction], estimator.state())
        store.commit(ds, action="build", actor="fire repo build",
                     note={"flagged": flagged, "defender": samples.describe()})
    else:
        store.initialize()
    write_configs(out, settings, options)
    return settings

