"""The logic of every Triton stage: batch assembly, validation, bypass authorisation, compute.

Triton's Python backend hands ``execute()`` a list of requests (a dynamic batch). Each stage reads every
request's input, validates it on its own (a bad request gets its own INVALID_ARG error and never fails its
neighbours), concatenates the valid ones into one tensor, runs once, and splits the result back. The
Triton-facing ``pb_utils`` module is passed in, so this module imports no Triton.

The stages by layout (see docs/architecture.md): ``fused`` is :class:`FusedStage` alone; ``inline`` is
:class:`InlineHeadStage` -> :class:`TailStage`; ``separate`` is :class:`HeadStage` -> :class:`RepairStage` ->
:class:`TailStage`. :class:`MonolithicStage` and a plain head/tail make the baselines. Repairing stages run the
network with the live plan's hooks, so the repair happens where the latent is computed.

Every stage that computes REPAIR_SCORE exports FIRE's metrics (:mod:`fire_backend.stub.metrics`): one
``record_batch`` per batch, local totals only, sent by a background thread.

Device: CPU by default; on a GPU instance (``fire repo build --gpu``) inputs are read wherever Triton put them,
latents stay on the device between stages, and the small outputs leave the GPU in one copy per batch
(:mod:`fire_backend.stub.tensors`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fire_backend.fire import RepairPass
from fire_backend.models.layers import CutError
from fire_backend.models.network import Network
from fire_backend.models.spec import load_network_file
from fire_backend.repository.layout import ARTIFACTS_DIR, FULL_FILE, GUARD_PARAMETER, ServingSettings, resolve_artifacts
from fire_backend.stub.live_plan import LivePlan
from fire_backend.stub.metrics import BatchMetrics
from fire_backend.stub.tensors import from_triton, to_host, to_triton
from fire_backend.wire.auth import BYPASS, AuthError, digest, verify
from fire_backend.wire.names import (
    BYPASS_PARAMETER,
    CREDENTIAL_PARAMETER,
    DIRECTION_VERSION,
    FLAGGED,
    HOLDING,
    IMAGE,
    LABEL,
    LATENT,
    LOGITS,
    REPAIR_SCORE,
    REPAIRED,
)
from fire_backend.wire.token import read_token

LOG = logging.getLogger("fire_backend.stub")

class RequestError(ValueError):
    """This request is invalid; only it fails."""


def request_parameters(request: Any) -> dict[str, Any]:
    raw = request.parameters()
    if not raw or raw == "{}":
        return {}
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def asks_bypass(request: Any) -> bool:
    """Whether the request's parameters may hold ``fire_bypass`` at all: a substring test of the JSON text, so the
    common request (no such parameter) is never parsed. True only means "parse and check"."""
    raw = request.parameters()
    return bool(raw) and (not isinstance(raw, str) or BYPASS_PARAMETER in raw)


def requested_outputs(request: Any, outputs: dict[str, Any]) -> list[str]:
    """The names among ``outputs`` the request asked for, in ``outputs``' order. Triton lists every output of the
    model when the client named none, so an empty list is what a client asking for other outputs only gets."""
    asked = request.requested_output_names()
    return [name for name in outputs if name in asked]


def bypass_flag(parameters: dict[str, Any]) -> bool:
    """The request's ``fire_bypass``: absent is False; anything but a JSON boolean is refused."""
    value = parameters.get(BYPASS_PARAMETER, False)
    if not isinstance(value, bool):
        shown = repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"
        raise RequestError(f"{BYPASS_PARAMETER} must be a JSON boolean (true or false), got {shown}")
    return value


def instance_device(args: dict[str, str]) -> torch.device:
    """The device of this model instance: its GPU for KIND_GPU, else the CPU."""
    if args.get("model_instance_kind") == "GPU":
        return torch.device(f"cuda:{args['model_instance_device_id']}")
    return torch.device("cpu")


def limit_threads(threads: int) -> None:
    """Few torch threads per stub: on a small box every stage is its own process competing for the cores."""
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set once in this process
            pass


def load_network(artifacts: Path, device: torch.device) -> Network:
    """The whole network (eval mode, on ``device``) from the repository's one network file."""
    path = artifacts / FULL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; rebuild the repository with `fire repo build`")
    full, _, _ = load_network_file(path, device)
    return full


def cut(full: Network, settings: ServingSettings) -> tuple[Network, Network]:
    """Head and tail at the split layer (the layouts of two or three models); a ValueError with the reason where the
    network cannot be cut there (the fused layout serves it)."""
    try:
        return full.cut(settings.layer)
    except CutError as exc:
        raise ValueError(f"{exc}; this stage belongs to the {settings.layout} layout: build the repository with "
                         "`fire repo build --layout fused`") from None


class BypassGuard:
    """Decides per request whether its ``fire_bypass`` is honoured: allowed by the repository and signed.

    The credential binds the request's IMAGE bytes (float32, C order, as sent) and a time within
    :data:`fire_backend.wire.auth.WINDOW_S`, so it neither travels to another image nor outlives the window; the
    token itself never travels. A refusal is the request's own INVALID_ARG, with the reason.
    """

    def __init__(self, settings: ServingSettings) -> None:
        self.allowed = settings.allow_bypass
        self.token = read_token() if self.allowed else None

    def check(self, request: Any, image: torch.Tensor) -> bool:
        if not asks_bypass(request):
            return False
        parameters = request_parameters(request)
        if not bypass_flag(parameters):
            return False
        if not self.allowed:
            raise RequestError(f"{BYPASS_PARAMETER} refused: this repository was built without --allow-bypass, so "
                               "no request can switch the repair off")
        if not self.token:
            raise RequestError(f"{BYPASS_PARAMETER} refused: the server has no control token to check credentials")
        credential = parameters.get(CREDENTIAL_PARAMETER)
        if not isinstance(credential, str):
            raise RequestError(f"{BYPASS_PARAMETER} needs {CREDENTIAL_PARAMETER}: a credential signed with the "
                               "control token over the request's images (FireClient.infer(bypass=True) signs)")
        payload = digest(np.ascontiguousarray(image.cpu().numpy(), dtype=np.float32).tobytes())
        try:
            verify(self.token, BYPASS, payload, credential)
        except AuthError as exc:
            raise RequestError(str(exc)) from None
        return True


class Stage:
    """Common plumbing: configuration, device, threads, per-request validation, one compute per batch.

    ``compute`` returns whole-batch tensors; those named in ``device_outputs`` (latents) stay on the device, the
    others leave it together (:func:`~fire_backend.stub.tensors.to_host`), then both are split per request.
    """

    input_name = ""
    device_outputs: frozenset[str] = frozenset()

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        self.params = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.name = args["model_name"]
        self.instance = args.get("model_instance_name", self.name)
        self.artifacts = resolve_artifacts(args["model_repository"], self.params.get("artifacts_dir", ARTIFACTS_DIR))
        self.settings = ServingSettings.read(self.artifacts)
        self.device = instance_device(args)
        limit_threads(int(self.params.get("torch_threads", "1")))

    def error(self, message: str, code: Any = None) -> Any:
        """A request's own error response (INVALID_ARG unless ``code`` says otherwise)."""
        code = self.pb.TritonError.INVALID_ARG if code is None else code
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def unavailable(self) -> str | None:
        """Why this stage cannot serve the next batch at all (None: it can); every request then gets UNAVAILABLE."""
        return None

    # -- per request -------------------------------------------------------------------------
    def validate(self, batch: torch.Tensor) -> None:
        """Structural checks of one request's tensor (cheap: no pass over the values)."""
        if batch.shape[0] == 0:
            raise RequestError(f"{self.input_name}: empty batch")

    def values_ok(self, batch: torch.Tensor) -> bool:
        """One pass over all requests' values together; only when it fails is each request checked alone."""
        return True

    def validate_values(self, batch: torch.Tensor) -> None:
        """RequestError naming what is wrong with one request's values."""

    def admit(self, request: Any, tensor: torch.Tensor) -> bool:
        """Whether this request bypasses the repair (False unless a stage honours fire_bypass)."""
        return False

    # -- the batch loop ----------------------------------------------------------------------
    def _admitted(self, requests: Sequence[Any], responses: list[Any]) -> tuple[list[int], list[torch.Tensor]]:
        """The requests that pass every check, with their tensors; the others get their own error response."""
        owners, tensors = [], []
        for index, request in enumerate(requests):
            try:
                tensor = self.read(request)
                self.validate(tensor)
            except RequestError as exc:
                responses[index] = self.error(str(exc))
                continue
            owners.append(index)
            tensors.append(tensor)
        if tensors and not self.values_ok(tensors[0] if len(tensors) == 1 else torch.cat(tensors)):
            kept = []
            for index, tensor in zip(owners, tensors, strict=True):
                try:
                    self.validate_values(tensor)
                    kept.append((index, tensor))
                except RequestError as exc:
                    responses[index] = self.error(str(exc))
            owners, tensors = [i for i, _ in kept], [t for _, t in kept]
        return owners, tensors

    def execute(self, requests: Sequence[Any]) -> list[Any]:
        refusal = self.unavailable()
        if refusal is not None:
            return [self.error(refusal, self.pb.TritonError.UNAVAILABLE) for _ in requests]
        responses: list[Any] = [None] * len(requests)
        owners, tensors = self._admitted(requests, responses)
        bypass: list[bool] = []
        for index, tensor in list(zip(owners, tensors, strict=True)):
            try:
                bypass.append(self.admit(requests[index], tensor))
            except RequestError as exc:
                responses[index] = self.error(str(exc))
                position = owners.index(index)
                del owners[position], tensors[position]
        if not tensors:
            return responses
        batch = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        sizes = [t.shape[0] for t in tensors]
        with torch.inference_mode():
            keep = torch.tensor(np.repeat(bypass, sizes), device=self.device) if any(bypass) else None
            outputs = self.compute(batch.to(self.device), keep)
        self.record(len(sizes), outputs, sum(bypass))
        # Only what some request asked for leaves the stage: each output tensor of a response costs the stub a
        # shared-memory allocation and a copy, whether or not Triton then sends it (it drops unrequested ones).
        wanted = [requested_outputs(requests[owner], outputs) for owner in owners]
        names = set().union(*wanted)
        host = to_host({n: v for n, v in outputs.items() if n in names and n not in self.device_outputs})
        values = {n: host.get(n, v) for n, v in outputs.items() if n in names}
        if len(sizes) == 1:  # the common case at low load: no slicing at all
            responses[owners[0]] = self.pb.InferenceResponse(output_tensors=[
                to_triton(self.pb, name, values[name]) for name in wanted[0]])
            return responses
        start = 0
        for size, owner, asked in zip(sizes, owners, wanted, strict=True):
            responses[owner] = self.pb.InferenceResponse(output_tensors=[
                to_triton(self.pb, name, values[name][start:start + size]) for name in asked])
            start += size
        return responses

    def read(self, request: Any) -> torch.Tensor:
        tensor = self.pb.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            raise RequestError(f"missing input {self.input_name}")
        return from_triton(tensor, self.device)

    def compute(self, batch: torch.Tensor, keep: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Whole-batch outputs; ``keep`` marks rows of bypassing requests (None when there are none)."""
        raise NotImplementedError

    def record(self, n_requests: int, values: dict[str, Any], bypassed: int) -> None:
        """A batch of ``n_requests`` was served (``values``: its whole-batch outputs, on the device)."""

    def serving(self) -> AbstractContextManager[None]:
        """What wraps each ``execute`` (the metrics' turn to talk to Triton; nothing for stages without them)."""
        return nullcontext()

    def finalize(self) -> None:
        return None


class Scoring:
    """Mixin of the stages that compute REPAIR_SCORE: the live plan, and FIRE's metrics of every batch.

    ``layout`` is the label of the layout whose score the stage computes.
    """

    layout = ""

    def follow(self: Any) -> None:
        """Start exporting metrics and following the store (metrics first: the plan reports to them)."""
        self.metrics = BatchMetrics(self.pb, self.name, self.instance, layout=self.layout)
        self.live = LivePlan(self.artifacts, self.settings, self.device, self.instance, self.metrics)
        self.plan = self.live.plan

    def unavailable(self: Any) -> str | None:
        """Takes the plan for the whole batch; without one (no version ever verified) the batch is refused."""
        self.plan = self.live.refresh()
        if self.plan is None:
            return (f"{HOLDING}: the direction store is missing, unreadable or unreachable for this instance; it "
                    "refuses to serve without the committed defence (see `fire ctl status`)")
        return None

    def record(self, n_requests: int, values: dict[str, Any], bypassed: int) -> None:
        self.metrics.record_batch(n_requests, values[REPAIR_SCORE], values[FLAGGED], bypassed)

    def serving(self: Any) -> AbstractContextManager[None]:
        return self.metrics.serving()

    def finalize(self) -> None:
        self.live.close()
        self.metrics.close()


class ImageStage(Stage):
    """A stage fed by the client's IMAGE [N, C, H, W] in [0, 1]: validates it."""

    input_name = IMAGE

    def validate(self, batch: torch.Tensor) -> None:
        super().validate(batch)
        expected = tuple(self.settings.input_shape)
        if tuple(batch.shape[1:]) != expected:
            raise RequestError(f"{IMAGE}: each sample must have shape {list(expected)}, got {list(batch.shape[1:])}")

    def values_ok(self, batch: torch.Tensor) -> bool:
        low, high = torch.aminmax(batch)  # one pass; NaN propagates, so it fails this test too
        return bool(low >= 0) and bool(high <= 1)

    def validate_values(self, batch: torch.Tensor) -> None:
        if self.values_ok(batch):
            return
        if not bool(torch.isfinite(batch).all()):
            raise RequestError(f"{IMAGE}: contains NaN or Inf values")
        raise RequestError(f"{IMAGE}: values must lie in [0, 1] (scale uint8 pixels by 1/255)")


def _logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    return {LOGITS: logits, LABEL: logits.argmax(1, keepdim=True)}


def _scores(run: RepairPass, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    score, flagged = run.outputs(n, device)
    version = torch.full((n, 1), run.plan.version, dtype=torch.int64, device=device)
    return {REPAIR_SCORE: score[:, None], FLAGGED: flagged[:, None], DIRECTION_VERSION: version}


class RepairingStage(Scoring, ImageStage):
    """Runs (part of) the network with the live plan's repair hooks: FIRE where the latent is computed."""

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        super().__init__(args, pb_utils)
        self.net = self.cut(load_network(self.artifacts, self.device))
        self.net.check_hooks(self.settings.repair_layers)
        self.guard = BypassGuard(self.settings)
        self.follow()

    def cut(self, full: Network) -> Network:
        """The part of the network this stage runs."""
        raise NotImplementedError

    def admit(self, request: Any, tensor: torch.Tensor) -> bool:
        return self.guard.check(request, tensor)

    def run(self, batch: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The part's output and the per-sample scores, under one plan for the whole batch."""
        run = RepairPass(self.plan, keep)
        out = self.net(batch, run.hooks)
        return out, _scores(run, batch.shape[0], batch.device)


class FusedStage(RepairingStage):
    """``fused``: IMAGE -> LOGITS, LABEL, REPAIR_SCORE, FLAGGED, DIRECTION_VERSION, the whole network in one hop."""

    layout = "fused"

    def cut(self, full: Network) -> Network:
        return full

    def compute(self, batch, keep):
        logits, scores = self.run(batch, keep)
        return {**_logits(logits), **scores}


class InlineHeadStage(RepairingStage):
    """``inline``: IMAGE -> LATENT (repaired at every configured layer, kept on the device) and the scores."""

    layout = "inline"

    device_outputs = frozenset({LATENT})

    def cut(self, full: Network) -> Network:
        return cut(full, self.settings)[0]

    def compute(self, batch, keep):
        latent, scores = self.run(batch, keep)
        return {LATENT: latent.reshape(latent.shape[0], *self.settings.latent_shape), **scores}


class HeadStage(ImageStage):
    """IMAGE -> LATENT at the split layer, unrepaired (``separate``, and the undefended baseline).

    As the ``separate`` layout's head (config parameter ``bypass_guard``) it is the stage that sees the request's
    IMAGE, so it checks fire_bypass credentials and refuses a request the repair stage must not honour.
    """

    device_outputs = frozenset({LATENT})

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        super().__init__(args, pb_utils)
        self.net = cut(load_network(self.artifacts, self.device), self.settings)[0]
        self.guard = BypassGuard(self.settings) if self.params.get(GUARD_PARAMETER) == "true" else None

    def admit(self, request: Any, tensor: torch.Tensor) -> bool:
        return self.guard.check(request, tensor) if self.guard else False

    def compute(self, batch, keep):
        latent = self.net(batch)  # as the configuration declares it (a repository of an older release: flattened)
        return {LATENT: latent.reshape(latent.shape[0], *self.settings.latent_shape)}


class TailStage(Stage):
    """LATENT -> LOGITS [N, K], LABEL [N, 1]."""

    input_name = LATENT

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        super().__init__(args, pb_utils)
        self.net = cut(load_network(self.artifacts, self.device), self.settings)[1]

    def compute(self, batch, keep):
        return _logits(self.net(batch.reshape(batch.shape[0], *self.net.input_shape)))


class MonolithicStage(ImageStage):
    """The whole model in one stage, no repair: the unsplit reference for benchmarks (``--baselines``)."""

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        super().__init__(args, pb_utils)
        self.net = load_network(self.artifacts, self.device)

    def compute(self, batch, keep):
        return _logits(self.net(batch))


class RepairStage(Scoring, Stage):
    """``separate``: LATENT -> REPAIRED (kept on the device), REPAIR_SCORE, FLAGGED, DIRECTION_VERSION.

    Repairs one layer, the split layer; a repository configured with several refuses to load here. fire_bypass
    was checked by the head (which sees the IMAGE); this stage honours it only when the repository allows it.
    """

    input_name = LATENT
    device_outputs = frozenset({REPAIRED})
    layout = "separate"

    def __init__(self, args: dict[str, str], pb_utils: Any) -> None:
        super().__init__(args, pb_utils)
        layers = self.settings.repair_layers
        if len(layers) != 1:
            raise ValueError(f"the separate layout repairs one layer; this repository repairs at {', '.join(layers)}: "
                             "build it with `fire repo build --layout fused` (or inline)")
        self.follow()

    def admit(self, request: Any, tensor: torch.Tensor) -> bool:
        bypass = asks_bypass(request) and bypass_flag(request_parameters(request))
        if bypass and not self.settings.allow_bypass:
            raise RequestError(f"{BYPASS_PARAMETER} refused: this repository was built without --allow-bypass")
        return bypass

    def compute(self, batch, keep):
        run = RepairPass(self.plan, keep)
        hook = run.hooks.get(self.settings.layer)
        repaired = hook(batch) if hook else batch
        return {REPAIRED: repaired, **_scores(run, batch.shape[0], batch.device)}
