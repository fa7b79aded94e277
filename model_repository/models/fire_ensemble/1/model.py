"""Triton entry point of fire_ensemble; the logic lives in fire_backend (see triton_models)."""

from fire_backend.stub.triton_models import FusedModel as TritonPythonModel  # noqa: F401
