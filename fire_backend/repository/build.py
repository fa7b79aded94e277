"""Write a Triton model repository for any checkpoint (built-in or user network), repair layers and layout.

The public model ``fire_ensemble`` serves the network with FIRE in the chosen layout (see
:data:`~fire_backend.repository.layout.LAYOUTS`): ``fused`` (default) is one Python model; ``inline`` is an
ensemble of a repairing head and a tail; ``separate`` is head -> repair -> tail. ``fire_control`` is the control
endpoint. ``undefended_ensemble`` (head -> tail, no repair) and ``fire_monolithic`` (unsplit, no repair) are
written only on request (``baselines``), so a production repository offers no way around the defence;
``compare_layouts`` adds the other layouts under their own names (``fire_fused``, ``fire_inline``,
``fire_separate``) for side-by-side benchmarks. The models go to ``models/``; beside it, ``artifacts/`` holds
the network's weights, the serving settings, the clean centroid and the direction store (layout:
:mod:`fire_backend.repository.layout`). Configs carry the model's own shapes.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from fire_backend.data.datasets import to_uint8
from fire_backend.defaults import ESTIMATION_MODES, MAX_CLEAN_CHANGE, RETAIN_VERSIONS
from fire_backend.device import DEFAULT_BATCH_SIZE, check_batch_size, resolve_device
from fire_backend.fire import Direction
from fire_backend.models.layers import CutError
from fire_backend.models.network import Network
from fire_backend.models.spec import load_network_spec, save_network_file
from fire_backend.multilayer import EstimationSettings, Evidence, default_layers, learn
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.offline.evaluation import LayerView, load_defender_samples
from fire_backend.repository.layout import (
    ARTIFACTS_DIR,
    CENTROID_FILE,
    DEFAULT_LAYOUT,
    FULL_FILE,
    GUARD_PARAMETER,
    LAYOUTS,
    STORE_DIR,
    Limits,
    ServingSettings,
    models_dir,
    save_centroid,
    save_reserve,
)
from fire_backend.stores.backends import open_store
from fire_backend.stores.files import BUILD_ACTION, DirectionStore
from fire_backend.stores.format import DirectionSet, LayeredSet
from fire_backend.wire.names import (
    DIRECTION_VERSION,
    FIRE_CONTROL,
    FIRE_ENSEMBLE,
    FIRE_FUSED,
    FIRE_INLINE,
    FIRE_MONOLITHIC,
    FIRE_SEPARATE,
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

#: the defended model of each layout under its own name (``compare_layouts``)
LAYOUT_MODELS = {"fused": FIRE_FUSED, "inline": FIRE_INLINE, "separate": FIRE_SEPARATE}
HEAD, REPAIR, TAIL = "head", "repair", "tail"


@dataclass(frozen=True)
class RepositoryOptions:
    """Knobs of the generated repository (the defaults suit 2 CPU cores)."""

    layout: str = DEFAULT_LAYOUT
    #: other layouts written beside fire_ensemble under their own names (LAYOUT_MODELS), for comparisons
    compare_layouts: tuple[str, ...] = ()
    #: also write undefended_ensemble and fire_monolithic (no repair: for benchmarks, never for production)
    baselines: bool = False
    #: honour fire_bypass on requests signed with the control token (off: every request is repaired)
    allow_bypass: bool = False
    max_batch_size: int = 64
    gpu: bool = False
    #: instances of the one-model stages (fused, and the monolithic baseline alike)
    model_instances: int = 2
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
    #: the direction store's URL (fire_backend.stores.backends: file:///DIR or etcd://HOST:PORT/PREFIX); empty: the
    #: file store in the repository's artifacts
    store: str = ""
    #: how observe estimates several layers: independent (measured default) or ordered (fire_backend.multilayer)
    estimation: str = "independent"
    #: how many of the newest committed versions keep their payload file in a file store (compaction)
    retain_versions: int = RETAIN_VERSIONS
    #: the largest share of the clean reserve's predictions a push may change without being forced
    max_clean_change: float = MAX_CLEAN_CHANGE

    def __post_init__(self) -> None:
        for layout in (self.layout, *self.compare_layouts):
            if layout not in LAYOUTS:
                raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        if not 1 <= self.max_batch_size <= 1024:
            raise ValueError(f"max batch size must be in 1..1024, got {self.max_batch_size}")
        counts = (self.model_instances, self.head_instances, self.repair_instances, self.tail_instances,
                  self.torch_threads)
        if min(counts) < 1:
            raise ValueError("instance and thread counts must be >= 1")
        if self.store:
            open_store(self.store)  # the URL's form only (ValueError naming the fix); nothing is contacted
        if self.estimation not in ESTIMATION_MODES:
            raise ValueError(f"estimation must be one of {', '.join(ESTIMATION_MODES)}, not {self.estimation!r}")
        if self.retain_versions < 1:
            raise ValueError(f"retain versions must be >= 1, got {self.retain_versions}")
        if not 0.0 <= self.max_clean_change <= 1.0:
            raise ValueError(f"max clean change must be a share in [0, 1], got {self.max_clean_change}")

    @classmethod
    def from_record(cls, record: dict) -> RepositoryOptions:
        """Options as recorded in a repository's settings (unknown or missing keys: defaults)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        if "compare_layouts" in values:
            values["compare_layouts"] = tuple(values["compare_layouts"])
        return cls(**values)


def model_dir(out: Path, name: str) -> Path:
    """Where a model's directory goes (the layout is decided in :mod:`fire_backend.repository.layout`)."""
    return models_dir(out) / name


def stage_name(public: str, role: str) -> str:
    """The stage models of a public model: fire_ensemble's are fire_head, fire_repair, fire_tail; another's
    are <model>_<role> (undefended_head, fire_inline_head, ...)."""
    return f"{public.removesuffix('_ensemble')}_{role}"


def served_models(public: str, layout: str) -> list[str]:
    """Every model that serves ``public`` in ``layout``, the public one first (its stages in pipeline order)."""
    roles = {"fused": (), "inline": (HEAD, TAIL), "separate": (HEAD, REPAIR, TAIL)}[layout]
    return [public, *(stage_name(public, role) for role in roles)]


def _dims(shape) -> str:
    return "[ " + ", ".join(str(int(s)) for s in shape) + " ]"


def _io(kind: str, name: str, dtype: str, dims, optional: bool = False) -> str:
    flag = "\n  optional: true" if optional else ""
    return f'{kind} {{\n  name: "{name}"\n  data_type: {dtype}\n  dims: {_dims(dims)}{flag}\n}}'


def _logits_outputs(settings: ServingSettings) -> list[str]:
    return [_io("output", LOGITS, "TYPE_FP32", [settings.num_classes]), _io("output", LABEL, "TYPE_INT64", [1])]


#: the repair's per-sample outputs, which fire_ensemble passes on
SCORE_OUTPUTS = (REPAIR_SCORE, FLAGGED, DIRECTION_VERSION)


def _score_outputs() -> list[str]:
    return [_io("output", REPAIR_SCORE, "TYPE_FP32", [1]), _io("output", FLAGGED, "TYPE_BOOL", [1]),
            _io("output", DIRECTION_VERSION, "TYPE_INT64", [1])]


def _params(values: dict[str, str]) -> str:
    return "\n".join(
        f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}' for k, v in values.items()
    )


@dataclass(frozen=True)
class _Model:
    config: str
    #: the TritonPythonModel class in fire_backend.stub.triton_models (None for an ensemble)
    python_class: str | None = None


def _stage(name: str, python_class: str, options: RepositoryOptions, inputs: list[str], outputs: list[str],
           instances: int, delay_us: int, extra_params: dict[str, str] | None = None) -> _Model:
    kind = "KIND_GPU" if options.gpu else "KIND_CPU"
    params = {"artifacts_dir": ARTIFACTS_DIR, "torch_threads": str(options.torch_threads), **(extra_params or {})}
    if options.gpu:
        # Let GPU tensors reach the stage as they are (DLPack), instead of a copy to host memory.
        params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    batching = f"dynamic_batching {{\n  max_queue_delay_microseconds: {delay_us}\n}}"
    return _Model("\n".join([
        f'name: "{name}"', 'backend: "python"', f"max_batch_size: {options.max_batch_size}",
        *inputs, *outputs,
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]",
        batching, _params(params), "",
    ]), python_class)


def _ensemble(name: str, options: RepositoryOptions, settings: ServingSettings, outputs: list[str],
              steps: list[tuple[str, dict[str, str], dict[str, str]]]) -> _Model:
    def step(model: str, inputs: dict[str, str], outs: dict[str, str]) -> str:
        ins = "\n".join(f'      input_map {{ key: "{k}" value: "{v}" }}' for k, v in inputs.items())
        outs_ = "\n".join(f'      output_map {{ key: "{k}" value: "{v}" }}' for k, v in outs.items())
        return f'    {{\n      model_name: "{model}"\n      model_version: -1\n{ins}\n{outs_}\n    }}'

    return _Model("\n".join([
        f'name: "{name}"', 'platform: "ensemble"', f"max_batch_size: {options.max_batch_size}",
        _io("input", IMAGE, "TYPE_FP32", settings.input_shape), *outputs,
        "ensemble_scheduling {\n  step [\n" + ",\n".join(step(*s) for s in steps) + "\n  ]\n}", "",
    ]))


def _layout(public: str, layout: str, settings: ServingSettings, options: RepositoryOptions) -> dict[str, _Model]:
    """The models that serve ``public`` in ``layout``."""
    image_in = _io("input", IMAGE, "TYPE_FP32", settings.input_shape)
    latent_in = _io("input", LATENT, "TYPE_FP32", settings.latent_shape)
    latent_out = _io("output", LATENT, "TYPE_FP32", settings.latent_shape)
    logits, scores = _logits_outputs(settings), _score_outputs()
    passed = {name: name for name in SCORE_OUTPUTS}
    o = options
    if layout == "fused":
        return {public: _stage(public, "FusedModel", o, [image_in], logits + scores, o.model_instances,
                               o.head_queue_delay_us)}
    head, repair, tail = (stage_name(public, role) for role in (HEAD, REPAIR, TAIL))
    models = {tail: _stage(tail, "TailModel", o, [latent_in], logits, o.tail_instances, o.tail_queue_delay_us)}
    if layout == "inline":
        models[head] = _stage(head, "InlineHeadModel", o, [image_in], [latent_out, *scores], o.head_instances,
                              o.head_queue_delay_us)
        steps = [(head, {IMAGE: IMAGE}, {LATENT: "latent", **passed}),
                 (tail, {LATENT: "latent"}, {LOGITS: LOGITS, LABEL: LABEL})]
    else:
        models[head] = _stage(head, "HeadModel", o, [image_in], [latent_out], o.head_instances,
                              o.head_queue_delay_us, {GUARD_PARAMETER: "true"})
        models[repair] = _stage(repair, "RepairModel", o, [latent_in],
                                [_io("output", REPAIRED, "TYPE_FP32", settings.latent_shape), *scores],
                                o.repair_instances, o.repair_queue_delay_us)
        steps = [(head, {IMAGE: IMAGE}, {LATENT: "latent"}),
                 (repair, {LATENT: "latent"}, {REPAIRED: "repaired", **passed}),
                 (tail, {LATENT: "repaired"}, {LOGITS: LOGITS, LABEL: LABEL})]
    models[public] = _ensemble(public, o, settings, logits + scores, steps)
    return models


def _baselines(settings: ServingSettings, options: RepositoryOptions) -> dict[str, _Model]:
    """undefended_ensemble (the split network, no repair; only where the network can be cut) and fire_monolithic
    (unsplit, no repair)."""
    o = options
    image_in = _io("input", IMAGE, "TYPE_FP32", settings.input_shape)
    logits = _logits_outputs(settings)
    monolithic = _stage(FIRE_MONOLITHIC, "MonolithicModel", o, [image_in], logits, o.model_instances,
                        o.head_queue_delay_us)
    if settings.cut_reason:
        return {FIRE_MONOLITHIC: monolithic}
    head, tail = stage_name(UNDEFENDED_ENSEMBLE, HEAD), stage_name(UNDEFENDED_ENSEMBLE, TAIL)
    return {
        head: _stage(head, "HeadModel", o, [image_in], [_io("output", LATENT, "TYPE_FP32", settings.latent_shape)],
                     o.head_instances, o.head_queue_delay_us),
        tail: _stage(tail, "TailModel", o, [_io("input", LATENT, "TYPE_FP32", settings.latent_shape)], logits,
                     o.tail_instances, o.tail_queue_delay_us),
        UNDEFENDED_ENSEMBLE: _ensemble(UNDEFENDED_ENSEMBLE, o, settings, logits, [
            (head, {IMAGE: IMAGE}, {LATENT: "latent"}), (tail, {LATENT: "latent"}, {LOGITS: LOGITS, LABEL: LABEL})]),
        FIRE_MONOLITHIC: monolithic,
    }


def _control(settings: ServingSettings, options: RepositoryOptions) -> _Model:
    kind = "KIND_GPU" if options.gpu else "KIND_CPU"
    return _Model("\n".join([
        f'name: "{FIRE_CONTROL}"', 'backend: "python"', "max_batch_size: 0",
        _io("input", REQUEST, "TYPE_STRING", [1]),
        _io("input", TOKEN, "TYPE_STRING", [1]),
        _io("input", IMAGES, "TYPE_UINT8", [-1, *settings.input_shape[1:], settings.input_shape[0]], optional=True),
        _io("output", RESPONSE, "TYPE_STRING", [1]),
        f"instance_group [\n  {{\n    count: 1\n    kind: {kind}\n  }}\n]",
        _params({"artifacts_dir": ARTIFACTS_DIR, "torch_threads": "1"}), "",
    ]), "ControlModel")


def repository_models(settings: ServingSettings, options: RepositoryOptions) -> dict[str, _Model]:
    """Every model of the repository by name."""
    models = _layout(FIRE_ENSEMBLE, options.layout, settings, options)
    for layout in options.compare_layouts:
        models.update(_layout(LAYOUT_MODELS[layout], layout, settings, options))
    if options.baselines:
        models.update(_baselines(settings, options))
    models[FIRE_CONTROL] = _control(settings, options)
    return models


def servable(options: RepositoryOptions, cut_reason: str) -> RepositoryOptions:
    """``options`` without the comparison layouts a network that cannot be cut (``cut_reason``) has no models for
    (``fire bench`` then compares what exists); the served layout itself is never changed."""
    if not cut_reason:
        return options
    return replace(options, compare_layouts=tuple(layout for layout in options.compare_layouts if layout == "fused"))


def check_layouts(settings: ServingSettings, options: RepositoryOptions) -> None:
    """A ValueError naming the fix when a layout cannot serve this configuration."""
    if len(settings.repair_layers) > 1 and "separate" in (options.layout, *options.compare_layouts):
        raise ValueError(f"the separate layout repairs one layer; {len(settings.repair_layers)} are configured "
                         f"({', '.join(settings.repair_layers)}): use --layout fused or --layout inline")
    split_layouts = [layout for layout in (options.layout, *options.compare_layouts) if layout != "fused"]
    if settings.cut_reason and split_layouts:
        raise ValueError(f"the {split_layouts[0]} layout serves the network as two models, cut at the split layer "
                         f"{settings.layer!r}; {settings.cut_reason}")


def write_configs(out: Path, settings: ServingSettings, options: RepositoryOptions) -> list[str]:
    """The config.pbtxt and thin model.py of every model (no weights); removes models of an earlier build.

    Returns the model names written.
    """
    check_layouts(settings, options)
    models = repository_models(settings, options)
    for config in sorted(models_dir(out).glob("*/config.pbtxt")):  # an earlier build's, not written by this one
        if config.parent.name not in models:
            shutil.rmtree(config.parent)
    for name, model in models.items():
        directory = model_dir(out, name)
        (directory / "1").mkdir(parents=True, exist_ok=True)
        (directory / "config.pbtxt").write_text(model.config)
        entry = directory / "1" / "model.py"
        if model.python_class:
            entry.write_text(
                f'"""Triton entry point of {name}; the logic lives in fire_backend (see triton_models)."""\n\n'
                f"from fire_backend.stub.triton_models import {model.python_class} as TritonPythonModel"
                "  # noqa: F401\n")
        elif entry.exists():
            entry.unlink()
    return list(models)


def build_repository(checkpoint: Path, out: Path, layer: str | Sequence[str] | None = None,
                     flagged: int | None = None, options: RepositoryOptions | None = None, device: str = "auto",
                     batch_size: int = DEFAULT_BATCH_SIZE) -> ServingSettings:
    """Write a servable repository for the checkpoint to ``out``, repairing at ``layer`` (one or several module
    paths; by default the network's early and deep layer, :func:`~fire_backend.multilayer.default_layers`).

    With several layers the deepest is the split layer (where ``inline`` and ``separate`` cut the network; a network
    that cannot be cut there is served ``fused`` only, and its baselines are the monolithic model alone). The clean
    centroid comes from ``options.clean_samples`` images of the defender's reserve, kept as the clean evidence of
    online learning. With ``flagged``, the store starts at version 1 learned from that many flagged poisoned reserve
    images (one layer: the unpaired estimate; several: :func:`~fire_backend.multilayer.learn`, which ranks the layer
    subsets); without it, at version 0 (no direction), to be learned online. Only those reserve images are read and
    run through the network (on ``device``), never the evaluation split. A user network's file is copied into the
    artifacts beside the network file.
    """
    options = options or RepositoryOptions()
    compute, batch_size = resolve_device(device), check_batch_size(batch_size)
    net, meta = load_checkpoint(checkpoint, compute)
    if flagged and not meta.has_attack:
        raise ValueError(f"{checkpoint} names no attack, so it has no flagged images to learn from: build without "
                         "--flagged and send flagged images to the running server (`fire ctl observe`)")
    layers = repair_layers(layer or default_repair_layers(net, options), net)
    layer = layers[-1]
    cut_reason = ""
    if options.baselines or any(layout != "fused" for layout in (options.layout, *options.compare_layouts)):
        try:
            net.cut(layer)
        except CutError as exc:
            cut_reason = str(exc)
    samples = load_defender_samples(meta.dataset, meta.attack, meta.target, options.clean_samples, flagged or 0)
    shapes = {name: net.layer(name).shape for name in layers}
    settings = ServingSettings(
        layer=layer, input_shape=meta.spec.input_shape, latent_shape=shapes[layer],
        num_classes=meta.spec.classes, arch=meta.spec.label, attack=meta.attack,
        target=meta.target, dataset=meta.dataset, default_alpha=options.alpha,
        default_threshold=options.flag_threshold, publish_every=options.publish_every,
        estimation=options.estimation,
        layout=options.layout, repair_layers=layers, layer_shapes=shapes,
        allow_bypass=options.allow_bypass, max_batch_size=options.max_batch_size, build=asdict(options),
        store=options.store, retain_versions=options.retain_versions,
        limits=Limits(max_clean_change=options.max_clean_change), cut_reason=cut_reason,
    )
    options = servable(options, cut_reason)
    settings = replace(settings, build=asdict(options))
    check_layouts(settings, options)  # a layout the network cannot serve fails before anything is written
    artifacts = out / ARTIFACTS_DIR
    if artifacts.exists():
        shutil.rmtree(artifacts)
    artifacts.mkdir(parents=True)
    state = {} if net.graph_form else net.model.state_dict()
    save_network_file(artifacts / FULL_FILE, meta.spec, layer, state, source_dir=checkpoint)
    settings.write(artifacts)

    view = LayerView(net, layer, samples, batch=batch_size)
    save_centroid(artifacts, view.mu.numpy(), len(samples.clean))
    save_reserve(artifacts, to_uint8(samples.clean))
    store = open_store(settings.store, artifacts / STORE_DIR)
    store.initialize()  # the one place a file store is created
    note = {"flagged": flagged, "defender": samples.describe()}
    if flagged and len(layers) > 1:
        evidence = Evidence(net, samples.clean, samples.flagged, layers, batch_size)
        sets, ranking = learn(evidence, EstimationSettings.of(settings))
        layered = LayeredSet({name: DirectionSet(center.numpy(), directions) for name, (directions, center)
                              in sets.items()}, to_uint8(samples.flagged), [s.to_dict() for s in ranking])
        store.commit(layered, action=BUILD_ACTION, actor="fire repo build",
                     note={**note, "layers": [name for name, (d, _) in sets.items() if d]})
    elif flagged:
        estimator = view.estimator("unpaired", flagged)
        direction = Direction(estimator.direction(), options.alpha, "projection", options.flag_threshold)
        ds = DirectionSet(view.mu.numpy(), [direction], estimator.state())
        store.commit(LayeredSet({layer: ds}), action=BUILD_ACTION, actor="fire repo build", note=note)
    write_configs(out, settings, options)
    return settings


def default_repair_layers(net: Network, options: RepositoryOptions) -> tuple[str, ...]:
    """The network's default pair (:func:`~fire_backend.multilayer.default_layers`); its deepest layer alone where a
    ``separate`` layout is written (it repairs one layer)."""
    layers = default_layers(net.stages())
    return layers[-1:] if "separate" in (options.layout, *options.compare_layouts) else layers


def repair_layers(layers: str | Sequence[str], net: Network) -> tuple[str, ...]:
    """The layers to repair at, checked against the network's candidates (a LayerError names near matches) and put
    in execution order (the deepest last)."""
    chosen = [layers] if isinstance(layers, str) else list(layers)
    if not chosen:
        raise ValueError("no layer to repair at")
    net.check_hooks(chosen)
    order = net.layers
    return tuple(sorted(set(chosen), key=order.index))


def rebuild_repository(source: Path, out: Path, options: RepositoryOptions) -> ServingSettings:
    """A repository at ``out`` with ``source``'s network, settings, centroid and direction store, but the models
    of ``options`` (``fire bench`` compares every layout of a repository this way; ``source`` is left alone).
    A file store in the artifacts is copied; the copy follows the store ``options.store`` names (empty: that copy).

    Works for repositories built before layouts existed (they have the same weights file).
    """
    src = source / ARTIFACTS_DIR
    settings = ServingSettings.read(src)
    if not (src / FULL_FILE).is_file():
        raise ValueError(f"{source}: no {ARTIFACTS_DIR}/{FULL_FILE}; rebuild it with `fire repo build`")
    artifacts = out / ARTIFACTS_DIR
    if artifacts.exists():
        shutil.rmtree(artifacts)
    artifacts.mkdir(parents=True)
    for name in (FULL_FILE, CENTROID_FILE):
        shutil.copy2(src / name, artifacts / name)
    load_network_spec(src / FULL_FILE)[0].copy_source(src, artifacts)  # a user network's file goes with it
    store = DirectionStore(src / STORE_DIR)
    if store.root.is_dir():  # a file store in the artifacts (an etcd store is shared: the settings name it)
        shutil.copytree(src / STORE_DIR, artifacts / STORE_DIR,
                        ignore=lambda d, _: [store.instances_dir.name] if Path(d) == store.root else [])
    else:  # the copy's own new store, at version 0
        DirectionStore(artifacts / STORE_DIR).initialize()
    options = servable(options, settings.cut_reason)
    settings = replace(settings, layout=options.layout, allow_bypass=options.allow_bypass,
                       max_batch_size=options.max_batch_size, build=asdict(options), store=options.store)
    settings.write(artifacts)
    write_configs(out, settings, options)
    return settings
