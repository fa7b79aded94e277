"""Triton entry point of fire_monolithic; the logic lives in fire_backend (see triton_models)."""

from fire_backend.serving.triton_models import MonolithicModel as TritonPythonModel  # noqa: F401
