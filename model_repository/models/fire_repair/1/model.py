"""Triton entry point of fire_repair; the logic lives in fire_backend (see triton_models)."""

from fire_backend.serving.triton_models import RepairModel as TritonPythonModel  # noqa: F401
