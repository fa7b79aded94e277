"""Triton entry point of fire_head; the logic lives in fire_backend (see triton_models)."""

from fire_backend.serving.triton_models import HeadModel as TritonPythonModel  # noqa: F401
