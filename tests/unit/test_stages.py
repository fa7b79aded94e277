"""The Triton stages in-process, driven through a faithful double of ``triton_python_backend_utils`` (pb_double).

The real tritonserver runs these same stages in tests/integration; here the parts a server cannot show: that a
GPU-resident input is read through DLPack and never ``as_numpy()`` (Triton refuses that), that the small outputs
leave the device in one packed copy and come back exact, and every bypass decision per request in one batch.
No GPU is used: "GPU" tensors of the double hold CPU memory behind Triton's GPU interface.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pb_double as pb
import pytest
import torch
from observability import Exposition

from fire_backend import metric_families as mf
from fire_backend.fire import compile_directions, repair
from fire_backend.offline.checkpoint import load_checkpoint
from fire_backend.repository.build import RepositoryOptions, build_repository, rebuild_repository, write_configs
from fire_backend.repository.layout import ARTIFACTS_DIR, ServingSettings, models_dir, require_fire_repository
from fire_backend.stores.files import DirectionStore
from fire_backend.stores.instances import INSTANCES_DIR, InstanceRegistry
from fire_backend.stub import live_plan as stages_live_plan
from fire_backend.stub import stages
from fire_backend.stub.control_stage import ControlStage
from fire_backend.stub.tensors import from_triton, pack, to_host, unpack
from fire_backend.wire.auth import BYPASS, CONTROL, digest, sign
from fire_backend.wire.names import (
    BYPASS_PARAMETER,
    CREDENTIAL_PARAMETER,
    DIRECTION_VERSION,
    FIRE_CONTROL,
    FIRE_ENSEMBLE,
    FIRE_HEAD,
    FLAGGED,
    HOLDING,
    LABEL,
    LATENT,
    LOGITS,
    REPAIR_SCORE,
    REPAIRED,
)
from fire_backend.wire.token import pinned_token

TOKEN = "stage-test-token"


# -- tensors -------------------------------------------------------------------------------------------

def test_cpu_inputs_are_read_without_a_copy_and_gpu_inputs_only_through_dlpack() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    cpu = from_triton(pb.Tensor("X", x), torch.device("cpu"))
    assert np.shares_memory(cpu.numpy(), x)
    gpu = pb.Tensor("X", x, on_gpu=True)
    with pytest.raises(pb.TritonModelException, match="stored in GPU"):
        gpu.as_numpy()
    assert torch.equal(from_triton(gpu, torch.device("cpu")), torch.from_numpy(x))


def test_small_outputs_survive_the_one_packed_copy_exactly() -> None:
    """The GPU branch of to_host is pack -> one .cpu() -> unpack; the values, shapes and dtypes come back exact."""
    rng = np.random.default_rng(0)
    values = {
        LOGITS: torch.from_numpy(rng.standard_normal((5, 10)).astype(np.float32) * 1e6),
        LABEL: torch.tensor([[0], [9], [3], [7], [1]], dtype=torch.int64),
        REPAIR_SCORE: torch.tensor([[-1.5], [0.0], [1e-30], [3.25], [float(np.float32(0.1))]]),
        FLAGGED: torch.tensor([[True], [False], [True], [False], [False]]),
        DIRECTION_VERSION: torch.full((5, 1), 2**40 + 3, dtype=torch.int64),
    }
    packed = pack(values)
    assert packed.shape == (5, 14) and packed.dtype == torch.float64
    back = unpack(packed.cpu().numpy(), values)
    for name, value in values.items():
        assert back[name].dtype == value.numpy().dtype, name
        assert np.array_equal(back[name], value.numpy()), name
    on_cpu = to_host(values)  # already on the CPU: no packing, no copy
    assert all(np.shares_memory(on_cpu[n], values[n].numpy()) for n in values)


# -- stages on a digits repository --------------------------------------------------------------------

def stage_args(repository: Path, model: str, gpu: bool = False) -> dict[str, str]:
    """The args Triton hands initialize(), from the model's written config (parameters as the builder wrote)."""
    config = (models_dir(repository) / model / "config.pbtxt").read_text()
    params = {k: {"string_value": v} for k, v in
              re.findall(r'key: "(\w+)"\n  value: \{ string_value: "([^"]*)" \}', config)}
    return {"model_config": json.dumps({"parameters": params}), "model_name": model,
            "model_instance_name": f"{model}_0", "model_repository": str(models_dir(repository) / model),
            "model_instance_kind": "GPU" if gpu else "CPU", "model_instance_device_id": "0"}


@pytest.fixture(scope="module")
def repos(tmp_path_factory, digits_checkpoint) -> dict[str, Path]:
    """allowing: every layout + baselines, bypass allowed, version 1 from 20 flagged; strict: same, bypass off."""
    root = tmp_path_factory.mktemp("stage-repos")
    options = RepositoryOptions(compare_layouts=("inline", "separate"), baselines=True, allow_bypass=True,
                                max_batch_size=4)
    build_repository(digits_checkpoint("badnets"), root / "allowing", flagged=20, options=options)
    rebuild_repository(root / "allowing", root / "strict", RepositoryOptions(
        compare_layouts=("inline", "separate"), baselines=True, max_batch_size=4))
    return {"allowing": root / "allowing", "strict": root / "strict", "checkpoint": digits_checkpoint("badnets")}


def test_a_rebuilt_copy_follows_the_store_its_options_name(repos, tmp_path: Path) -> None:
    """`fire bench`'s copy of a repository whose servers share an etcd store follows a file store of its own, so a
    bench never commits to nor serves from the production store."""
    source = tmp_path / "shared"
    shutil.copytree(repos["allowing"], source)
    settings = ServingSettings.read(source / ARTIFACTS_DIR)
    dataclasses.replace(settings, store="etcd://etcd:2379/fire/prod").write(source / ARTIFACTS_DIR)
    copy = rebuild_repository(source, tmp_path / "copy", RepositoryOptions(max_batch_size=4))
    assert copy.store == "" and ServingSettings.read(tmp_path / "copy" / ARTIFACTS_DIR).store == ""
    assert DirectionStore(tmp_path / "copy" / ARTIFACTS_DIR / "store").live_version() == 1  # the source's file copy


def make(stage_class, repository: Path, model: str, instance: str | None = None):
    """The stage as Triton would load it; ``instance``: its instance name (its own metric series)."""
    args = stage_args(repository, model)
    if instance is not None:
        args["model_instance_name"] = instance
    with pytest.MonkeyPatch.context() as mp:
        for key, value in pinned_token(TOKEN).items():
            mp.setenv(key, value)
        return stage_class(args, pb)


@pytest.fixture(scope="module")
def offline(repos):
    """The offline reference: the checkpoint's model and the store's version 1, repaired by fire.repair."""
    model, _ = load_checkpoint(repos["checkpoint"])
    settings = ServingSettings.read(repos["allowing"] / ARTIFACTS_DIR)
    version = DirectionStore(repos["allowing"] / ARTIFACTS_DIR / "store").read_version(1)
    compiled = compile_directions(version.directions.directions, torch.from_numpy(version.directions.center),
                                  settings.latent_dim)
    head, tail = model.cut(settings.layer)

    def run(x: np.ndarray, repaired: bool = True) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            latent = head(torch.from_numpy(x))
            fixed, score, _ = repair(latent, compiled)
            return tail(fixed if repaired else latent).numpy(), score.numpy()

    return run


def digits(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 8, 8), dtype=np.float32)


def credential(x: np.ndarray, token: str = TOKEN, now: float | None = None, purpose: str = BYPASS) -> str:
    return sign(token, purpose, digest(np.ascontiguousarray(x, dtype=np.float32).tobytes()), now=now)


def test_fused_stage_repairs_per_request_and_bypasses_only_signed_rows(repos, offline) -> None:
    fused = make(stages.FusedStage, repos["allowing"], FIRE_ENSEMBLE)
    a, b, c = digits(2, 1), digits(3, 2), digits(1, 3)
    responses = fused.execute([
        pb.image_request(a, on_gpu=True),
        pb.image_request(b, on_gpu=True, **{BYPASS_PARAMETER: True, CREDENTIAL_PARAMETER: credential(b)}),
        pb.image_request(c),
    ])
    assert all(r.error is None for r in responses)
    for x, response, repaired in ((a, responses[0], True), (b, responses[1], False), (c, responses[2], True)):
        out = response.outputs()
        logits, score = offline(x, repaired)
        assert np.allclose(out[LOGITS], logits, atol=1e-5)
        assert (out[LABEL].ravel() == logits.argmax(1)).all()
        assert np.allclose(out[REPAIR_SCORE].ravel(), score, atol=1e-5)  # scored even when bypassed
        assert out[DIRECTION_VERSION].ravel().tolist() == [1] * len(x)
        assert out[FLAGGED].dtype == np.bool_ and out[LABEL].dtype == np.int64


def test_each_request_gets_only_the_outputs_it_asked_for(repos, offline) -> None:
    """A client asking only for LABEL gets only LABEL (the stage never builds the others' tensors), alone or batched
    beside a request asking for everything; the metrics still count every sample's score and flag."""
    instance = f"{FIRE_ENSEMBLE}_requested_outputs"
    fused = make(stages.FusedStage, repos["allowing"], FIRE_ENSEMBLE, instance)
    a, b = digits(1, 4), digits(3, 5)
    before = scrape()
    (alone,) = fused.execute([pb.image_request(a, requested=[LABEL])])
    assert alone.error is None and list(alone.outputs()) == [LABEL]
    assert alone.outputs()[LABEL].ravel().tolist() == offline(a)[0].argmax(1).tolist()
    label_only, everything, scores = fused.execute([
        pb.image_request(b, requested=[LABEL]), pb.image_request(a),
        pb.image_request(b, requested=[REPAIR_SCORE, FLAGGED])])
    assert list(label_only.outputs()) == [LABEL] and label_only.outputs()[LABEL].shape == (3, 1)
    assert set(everything.outputs()) == {LOGITS, LABEL, REPAIR_SCORE, FLAGGED, DIRECTION_VERSION}
    assert list(scores.outputs()) == [REPAIR_SCORE, FLAGGED]
    assert np.allclose(scores.outputs()[REPAIR_SCORE].ravel(), offline(b)[1], atol=1e-5)
    fused.metrics.flush()
    counted = scrape().total(mf.SAMPLES_TOTAL.name, model=FIRE_ENSEMBLE, model_instance=instance, layout="fused") - \
        before.total(mf.SAMPLES_TOTAL.name, model=FIRE_ENSEMBLE, model_instance=instance, layout="fused")
    assert counted == 1 + 7  # every sample scored and counted, whatever its request asked for


@pytest.mark.parametrize("case", ["not_allowed", "string", "number", "no_credential", "other_images", "expired",
                                  "wrong_token", "control_purpose"])
def test_a_refused_bypass_fails_alone_and_says_why(repos, case) -> None:
    repository = repos["strict" if case == "not_allowed" else "allowing"]
    fused = make(stages.FusedStage, repository, FIRE_ENSEMBLE)
    x, other = digits(2, 4), digits(2, 5)
    parameters, expected = {
        "not_allowed": ({BYPASS_PARAMETER: True, CREDENTIAL_PARAMETER: credential(x)}, "--allow-bypass"),
        "string": ({BYPASS_PARAMETER: "true", CREDENTIAL_PARAMETER: credential(x)}, "JSON boolean"),
        "number": ({BYPASS_PARAMETER: 0.5}, "JSON boolean"),
        "no_credential": ({BYPASS_PARAMETER: True}, f"needs {CREDENTIAL_PARAMETER}"),
        "other_images": ({BYPASS_PARAMETER: True, CREDENTIAL_PARAMETER: credential(other)}, "wrong control token"),
        "expired": ({BYPASS_PARAMETER: True, CREDENTIAL_PARAMETER: credential(x, now=time.time() - 300)},
                    "off the server's clock"),
        "wrong_token": ({BYPASS_PARAMETER: True, CREDENTIAL_PARAMETER: credential(x, token="guess")},
                        "wrong control token"),
        "control_purpose": ({BYPASS_PARAMETER: True, CREDENTIAL_PARAMETER: credential(x, purpose=CONTROL)},
                            "wrong control token"),
    }[case]
    good = digits(3, 6)
    responses = fused.execute([pb.image_request(good), pb.image_request(x, **parameters), pb.image_request(good)])
    assert responses[0].error is None and responses[2].error is None
    error = responses[1].error
    assert error is not None and error.code == pb.TritonError.INVALID_ARG
    assert expected in error.message(), error.message()
    assert TOKEN not in error.message()
    assert np.allclose(responses[0].outputs()[LOGITS], responses[2].outputs()[LOGITS], atol=1e-5)
    unbypassed = fused.execute([pb.image_request(x, **{BYPASS_PARAMETER: False})])[0]
    assert unbypassed.error is None  # false is just "no bypass"


def test_inline_and_separate_stages_give_the_fused_answer(repos) -> None:
    repository = repos["allowing"]
    x = digits(4, 7)
    fused = make(stages.FusedStage, repository, FIRE_ENSEMBLE).execute([pb.image_request(x)])[0].outputs()
    head = make(stages.InlineHeadStage, repository, "fire_inline_head").execute([pb.image_request(x)])[0]
    tail = make(stages.TailStage, repository, "fire_inline_tail")
    latent = {t.name(): t for t in head.output_tensors}[LATENT]
    inline = tail.execute([pb.InferenceRequest({LATENT: latent})])[0].outputs()
    assert np.allclose(inline[LOGITS], fused[LOGITS], atol=1e-5)
    for name in (REPAIR_SCORE, FLAGGED, DIRECTION_VERSION):
        assert np.array_equal(head.outputs()[name], fused[name]), name

    plain = make(stages.HeadStage, repository, "fire_separate_head").execute([pb.image_request(x)])[0]
    repair_stage = make(stages.RepairStage, repository, "fire_separate_repair")
    fixed = repair_stage.execute([pb.InferenceRequest({LATENT: plain.output_tensors[0]})])[0]
    repaired = {t.name(): t for t in fixed.output_tensors}[REPAIRED]
    separate = make(stages.TailStage, repository, "fire_separate_tail").execute(
        [pb.InferenceRequest({LATENT: pb.Tensor(LATENT, repaired.array)})])[0].outputs()
    assert np.allclose(separate[LOGITS], fused[LOGITS], atol=1e-5)
    assert np.array_equal(fixed.outputs()[DIRECTION_VERSION], fused[DIRECTION_VERSION])


def test_separate_head_checks_the_credential_and_repair_honours_only_allowed_bypass(repos) -> None:
    x = digits(2, 8)
    signed = {BYPASS_PARAMETER: True, CREDENTIAL_PARAMETER: credential(x)}
    head = make(stages.HeadStage, repos["allowing"], "fire_separate_head")
    assert head.execute([pb.image_request(x, **signed)])[0].error is None
    refused = head.execute([pb.image_request(x, **{BYPASS_PARAMETER: True})])[0].error
    assert refused is not None and CREDENTIAL_PARAMETER in refused.message()
    undefended = make(stages.HeadStage, repos["allowing"], "undefended_head")  # no guard: ignores the flag
    assert undefended.execute([pb.image_request(x, **{BYPASS_PARAMETER: True})])[0].error is None

    latent = pb.Tensor(LATENT, np.asarray(head.execute([pb.image_request(x)])[0].output_tensors[0].array))
    allowing = make(stages.RepairStage, repos["allowing"], "fire_separate_repair")
    kept = allowing.execute([pb.InferenceRequest({LATENT: latent}, {BYPASS_PARAMETER: True})])[0]
    assert np.array_equal(kept.outputs()[REPAIRED], latent.array)
    strict = make(stages.RepairStage, repos["strict"], "fire_separate_repair")
    error = strict.execute([pb.InferenceRequest({LATENT: latent}, {BYPASS_PARAMETER: True})])[0].error
    assert error is not None and "--allow-bypass" in error.message()


# -- FIRE's metrics from the stages that score -------------------------------------------------------

def scrape() -> Exposition:
    return Exposition(pb.METRICS.exposition())


@pytest.mark.parametrize(("layout", "stage_class", "model"), [
    ("fused", stages.FusedStage, FIRE_ENSEMBLE),
    ("inline", stages.InlineHeadStage, "fire_inline_head"),
    ("separate", stages.RepairStage, "fire_separate_repair"),
])
def test_every_scoring_stage_exports_what_its_clients_saw(repos, badnets_eval, layout, stage_class, model) -> None:
    instance = f"{model}_metrics_{layout}"
    stage = make(stage_class, repos["allowing"], model, instance)
    head = make(stages.HeadStage, repos["allowing"], "fire_separate_head") if layout == "separate" else None
    mine = {"model": model, "model_instance": instance, "layout": layout}

    def request(x: np.ndarray, bypass: bool = False, signed: bool = True):
        parameters = {BYPASS_PARAMETER: True, CREDENTIAL_PARAMETER: credential(x)} if bypass and signed else \
            {BYPASS_PARAMETER: True} if bypass else {}
        if head is None:
            return pb.image_request(x, **parameters)
        latent = head.execute([pb.image_request(x)])[0].output_tensors[0]
        return pb.InferenceRequest({LATENT: pb.Tensor(LATENT, np.asarray(latent.array))}, parameters)

    rng = np.random.default_rng(9)
    clean, triggered, bypassed = badnets_eval.clean[:3], badnets_eval.poisoned[:2], badnets_eval.poisoned[2:4]
    batches = [[request(clean), request(triggered), request(bypassed, bypass=True)],
               [request(digits(int(rng.integers(1, 4)), 13 + i)) for i in range(3)]]
    if head is None:  # an image stage refuses an unsigned bypass: not scored, not counted
        batches[1].append(request(digits(1, 20), bypass=True, signed=False))
    before = scrape()
    served = [r for b in batches for r in stage.execute(b) if r.error is None]
    stage.metrics.flush()
    page = scrape()

    def delta(family: mf.Family, **labels: str) -> float:
        return page.total(family.name, **mine, **labels) - before.total(family.name, **mine, **labels)

    scores = np.concatenate([r.outputs()[REPAIR_SCORE].ravel() for r in served]).astype(np.float64)
    flagged = sum(int(r.outputs()[FLAGGED].sum()) for r in served)
    assert 0 < flagged < len(scores)  # the mix has both
    assert delta(mf.REQUESTS_TOTAL) == len(served) == 6
    assert delta(mf.SAMPLES_TOTAL) == len(scores)
    assert delta(mf.FLAGGED_SAMPLES_TOTAL) == flagged
    assert delta(mf.BYPASSED_REQUESTS_TOTAL) == 1
    assert delta(mf.SCORE_BUCKET, le="0.5") == int(np.sum(scores <= 0.5))
    assert delta(mf.SCORE_COUNT) == len(scores)
    assert page.one(mf.APPLIED_VERSION.name, **mine) == 1
    stage.finalize()
    # its series stay (a reloaded copy counts on in them: stub/metrics.py), at their last values
    assert scrape().one(mf.REQUESTS_TOTAL.name, model_instance=instance) == page.one(mf.REQUESTS_TOTAL.name, **mine)


def test_an_idle_instance_applies_a_push_reports_its_lag_and_counts_store_damage(repos, tmp_path) -> None:
    repository = tmp_path / "repository"
    rebuild_repository(repos["allowing"], repository, RepositoryOptions(max_batch_size=4))
    store = DirectionStore(repository / ARTIFACTS_DIR / "store")
    instance = "fire_ensemble_idle"
    fused = make(stages.FusedStage, repository, FIRE_ENSEMBLE, instance)
    mine = {"model_instance": instance}
    pushed = store.commit(store.read_version(1).directions, "push")
    deadline = time.monotonic() + 5 * stages_live_plan.WATCH_INTERVAL_S + 5
    while fused.live.plan.version != pushed:  # no batch: the watcher applies it
        assert time.monotonic() < deadline, "an idle instance did not apply the pushed version"
        time.sleep(0.05)
    registry = InstanceRegistry(repository / ARTIFACTS_DIR / INSTANCES_DIR)  # beside the store, not in it

    def entry() -> dict:
        return next((e for e in registry.entries() if e["instance"] == fused.live.instance_id), {})

    while entry().get("version") != pushed:  # the watcher thread writes the record, never the serving path
        assert time.monotonic() < deadline, f"the instance record did not follow: {entry()}"
        time.sleep(0.05)
    assert 0 <= entry()["lag_s"] < 5 and not entry()["held"] and not entry()["degraded"]
    assert not store.instances_dir.exists()  # nothing written into the store by an instance
    fused.metrics.flush()
    page = scrape()
    assert page.one(mf.APPLIED_VERSION.name, **mine) == pushed
    assert 0 <= page.one(mf.APPLY_LAG_SECONDS.name, **mine) < 5
    damaged = page.total(mf.STORE_ERRORS_TOTAL.name, kind=mf.STORE_UNREADABLE_POINTER, **mine)
    store.current_path.write_bytes(b"{torn")
    deadline = time.monotonic() + 5
    while scrape().total(mf.STORE_ERRORS_TOTAL.name, kind=mf.STORE_UNREADABLE_POINTER, **mine) == damaged:
        assert time.monotonic() < deadline, "the unreadable CURRENT was not counted"
        time.sleep(0.05)
    assert fused.live.plan.version == pushed  # fails closed: the history still names the pushed version
    fused.finalize()
    assert entry() == {}


def test_a_stage_without_a_verified_version_refuses_requests_and_recovers_without_a_restart(repos, tmp_path) -> None:
    """Issue 25: a stage that starts while its store is missing holds (UNAVAILABLE, never version 0); once the store
    is back it serves the committed version; a store that goes away again changes nothing it serves, and says so on
    /metrics; the serving path never raised, the watcher never died."""
    repository = tmp_path / "repository"
    rebuild_repository(repos["allowing"], repository, RepositoryOptions(max_batch_size=4))
    store_dir = repository / ARTIFACTS_DIR / "store"
    away = store_dir.with_name("store.away")
    store_dir.rename(away)
    instance = "fire_ensemble_held"
    fused = make(stages.FusedStage, repository, FIRE_ENSEMBLE, instance)
    mine = {"model_instance": instance}
    x = digits(2, 11)
    (refused,) = fused.execute([pb.image_request(x)])
    assert refused.error.code == pb.TritonError.UNAVAILABLE and refused.error.message().startswith(HOLDING)
    fused.metrics.flush()
    assert scrape().one(mf.REPAIR_UNAVAILABLE.name, **mine) == 1 and scrape().one(mf.STORE_DEGRADED.name, **mine) == 1
    away.rename(store_dir)  # the volume is mounted: the watcher notices within its interval
    deadline = time.monotonic() + 10
    while fused.live.held:
        assert time.monotonic() < deadline, "the stage did not take the store's version once it came back"
        time.sleep(0.05)
    (served,) = fused.execute([pb.image_request(x)])
    assert served.error is None and served.outputs()[DIRECTION_VERSION].ravel().tolist() == [1, 1]
    store_dir.rename(away)  # gone again: keeps serving what it verified
    for _ in range(3):
        (served,) = fused.execute([pb.image_request(x)])
        assert served.error is None and served.outputs()[DIRECTION_VERSION].ravel().tolist() == [1, 1]
    deadline = time.monotonic() + 10
    while scrape().one(mf.STORE_DEGRADED.name, **mine) != 1 or scrape().one(mf.REPAIR_UNAVAILABLE.name, **mine) != 0:
        assert time.monotonic() < deadline, "the instance did not say the store is degraded"
        fused.metrics.flush()
        time.sleep(0.05)
    assert fused.live.failures == 0 and fused.live._watcher.is_alive()
    away.rename(store_dir)
    fused.finalize()


def test_image_validation_refuses_each_bad_request_alone(repos) -> None:
    fused = make(stages.FusedStage, repos["strict"], FIRE_ENSEMBLE)
    good = digits(2, 9)
    bad = {"shape": np.zeros((1, 1, 8, 9), np.float32), "nan": np.full((1, 1, 8, 8), np.nan, np.float32),
           "range": np.full((1, 1, 8, 8), 2.0, np.float32), "empty": np.zeros((0, 1, 8, 8), np.float32)}
    responses = fused.execute([pb.image_request(good), *(pb.image_request(x) for x in bad.values())])
    assert responses[0].error is None
    messages = [r.error.message() for r in responses[1:]]
    for expected, message in zip(("shape", "NaN", "[0, 1]", "empty"), messages, strict=True):
        assert expected in message


def test_several_layers_are_configured_in_stage_order_and_separate_refuses_them(repos, tmp_path) -> None:
    out = tmp_path / "two"
    settings = build_repository(repos["checkpoint"], out, ["block2", "block1"], options=RepositoryOptions(
        layout="inline"))
    assert settings.repair_layers == ("block1", "block2") and settings.layer == "block2"
    assert set(settings.layer_dims) == {"block1", "block2"}
    head = make(stages.InlineHeadStage, out, FIRE_HEAD)
    assert head.net.layers[-1] == "block2"
    with pytest.raises(ValueError, match="separate layout repairs one layer.*--layout fused"):
        write_configs(out, settings, RepositoryOptions(layout="separate"))
    with pytest.raises(ValueError, match="separate layout repairs one layer"):
        make(stages.RepairStage, out, FIRE_HEAD)


def test_control_stage_computes_latents_in_process_in_chunks_of_the_max_batch(repos) -> None:
    control = make(ControlStage, repos["allowing"], FIRE_CONTROL)
    assert control.max_batch == 4
    calls = []
    latents_of = control.network.latents
    control.network.latents = lambda x, layer: calls.append(len(x)) or latents_of(x, layer)
    x = torch.from_numpy(digits(10, 10))
    latents = control._latents(x)
    model, _ = load_checkpoint(repos["checkpoint"])
    with torch.inference_mode():
        expected = model.latents(x, "block2")
    assert calls == [4, 4, 2]
    assert torch.allclose(latents, expected, atol=1e-6)
    assert not latents.is_inference()  # the estimators may fold it into running means


def legacy_settings(settings: ServingSettings) -> dict:
    """serving.json as the version before layouts wrote it."""
    legacy = {k: v for k, v in settings.__dict__.items()
              if k not in ("layout", "repair_layers", "layer_shapes", "allow_bypass", "max_batch_size", "build")}
    legacy["limits"] = settings.limits.__dict__
    return legacy


def test_a_repository_written_before_layouts_serves_as_separate(repos, tmp_path) -> None:
    """The previous version's repository: serving.json without a layout, models importing HeadModel/RepairModel/
    TailModel (whose configs carry no bypass_guard); in the current directory layout it serves as ``separate``,
    refusing every bypass; with its models at the root it gets a message naming `fire repo build`."""
    settings = ServingSettings.read(repos["allowing"] / ARTIFACTS_DIR)
    old = tmp_path / "old"
    shutil.copytree(repos["strict"], old)
    (old / ARTIFACTS_DIR / "serving.json").write_text(json.dumps(legacy_settings(settings)))
    read = ServingSettings.read(old / ARTIFACTS_DIR)
    assert read.layout == "separate" and read.repair_layers == (read.layer,) and not read.allow_bypass
    assert read.layer_dims == {read.layer: settings.latent_dim}
    for name, role in (("fire_head", "head"), ("fire_repair", "repair"), ("fire_tail", "tail")):
        source = models_dir(old) / f"fire_separate_{role}"
        text = (source / "config.pbtxt").read_text().replace(f"fire_separate_{role}", name)
        text = re.sub(r'parameters \{\n  key: "bypass_guard"\n  value: \{ string_value: "true" \}\n\}\n?', "", text)
        (models_dir(old) / name / "1").mkdir(parents=True)
        (models_dir(old) / name / "config.pbtxt").write_text(text)
    x = digits(3, 11)
    head = make(stages.HeadStage, old, "fire_head")
    assert head.guard is None
    latent = head.execute([pb.image_request(x, **{BYPASS_PARAMETER: True})])[0].output_tensors[0]
    repair_stage = make(stages.RepairStage, old, "fire_repair")
    refused = repair_stage.execute([pb.InferenceRequest({LATENT: latent}, {BYPASS_PARAMETER: True})])[0]
    assert refused.error is not None and "--allow-bypass" in refused.error.message()
    fixed = {t.name(): t for t in repair_stage.execute([pb.InferenceRequest({LATENT: latent})])[0].output_tensors}
    out = make(stages.TailStage, old, "fire_tail").execute(
        [pb.InferenceRequest({LATENT: pb.Tensor(LATENT, fixed[REPAIRED].array)})])[0].outputs()
    fused = make(stages.FusedStage, repos["strict"], FIRE_ENSEMBLE).execute([pb.image_request(x)])[0].outputs()
    assert np.allclose(out[LOGITS], fused[LOGITS], atol=1e-5)

    (old / ARTIFACTS_DIR / "serving.json").write_text(json.dumps({**legacy_settings(settings), "future_field": 1}))
    with pytest.raises(ValueError, match="unknown settings future_field.*fire repo build"):
        ServingSettings.read(old / ARTIFACTS_DIR)
    for model in models_dir(old).iterdir():  # the layout before models/ existed
        model.rename(old / model.name)
    with pytest.raises(ValueError, match="fire repo build"):
        require_fire_repository(old)


def test_a_repository_of_the_previous_release_with_a_flattened_latent_still_serves(tmp_path: Path) -> None:
    """Before layers were module paths, PreActResNet18's ``avgpool`` stage flattened its latent ([C]); the module
    returns [C, 1, 1] now. A repository built then declares LATENT as [C]: its head and tail still serve it."""
    from fire_backend.models import PreActResNet18
    from fire_backend.models.spec import PART_FORMAT, ModelSpec
    from fire_backend.repository.layout import FULL_FILE
    from fire_backend.wire.names import LATENT

    torch.manual_seed(0)
    model = PreActResNet18(width=4).eval()
    spec = ModelSpec("preact_resnet18", {"num_classes": 10, "width": 4, "in_channels": 3}, (3, 32, 32))
    artifacts = tmp_path / ARTIFACTS_DIR
    artifacts.mkdir()
    torch.save({"format": PART_FORMAT, "role": "full", "layer": "avgpool", "spec": spec.to_dict(),
                "state_dict": model.state_dict()}, artifacts / FULL_FILE)
    settings = ServingSettings(layer="avgpool", input_shape=(3, 32, 32), latent_shape=(32,), num_classes=10,
                               arch="preact_resnet18", layout="separate")
    settings.write(artifacts)
    write_configs(tmp_path, settings, RepositoryOptions(layout="separate"))
    head = stages.HeadStage(stage_args(tmp_path, "fire_head"), pb)
    tail = stages.TailStage(stage_args(tmp_path, "fire_tail"), pb)
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    latent = head.execute([pb.image_request(x)])[0].outputs()[LATENT]
    assert latent.shape == (3, 32)  # as the old configuration declares it
    logits = tail.execute([pb.InferenceRequest({LATENT: pb.Tensor(LATENT, latent)}, {})])[0].outputs()[LOGITS]
    with torch.inference_mode():
        assert np.allclose(logits, model(torch.from_numpy(x)).numpy(), atol=1e-5)
