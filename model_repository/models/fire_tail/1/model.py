"""Triton entry point of fire_tail; the logic lives in fire_backend (see triton_models)."""

from fire_backend.serving.triton_models import TailModel as TritonPythonModel  # noqa: F401
