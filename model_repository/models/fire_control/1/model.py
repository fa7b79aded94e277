"""Triton entry point of fire_control; the logic lives in fire_backend (see triton_models)."""

from fire_backend.stub.triton_models import ControlModel as TritonPythonModel  # noqa: F401
