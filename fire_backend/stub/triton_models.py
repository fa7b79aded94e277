"""``TritonPythonModel`` classes for the repository's thin ``model.py`` files.

Only importable inside Triton's Python-backend stub (it imports ``triton_python_backend_utils``);
all logic is in :mod:`fire_backend.stub.stages` and :mod:`fire_backend.stub.control_stage`. The class names
are part of the repository format (each ``model.py`` imports one): HeadModel, RepairModel, TailModel,
MonolithicModel and ControlModel keep serving repositories built before layouts existed (as ``separate``).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
from typing import Any

import triton_python_backend_utils as pb_utils

from fire_backend.stub import control_stage, stages


def _leave_without_teardown() -> None:
    """End the stub before its interpreter tears its modules down (atexit runs first in ``Py_Finalize``).

    By then the stub has answered its finalize and released its queues; what the teardown would still do is
    delete every metric handle, and Triton 2.51 frees a series on the first delete even while a stub of a
    reloaded copy updates it (:mod:`fire_backend.stub.metrics`).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


atexit.register(_leave_without_teardown)


class _Model:
    stage_class: type = stages.Stage

    def initialize(self, args: dict[str, str]) -> None:
        self.stage = self.stage_class(args, pb_utils)
        # A stub process holds this one stage until it exits, and what it built at load (torch, the network, the
        # compiled plan) lives as long. Frozen out of the cyclic collector, a full collection no longer walks those
        # ~170k objects: 85 ms measured on this project's CI machine, a pause that fell on whichever request or
        # push was being served (benchmarks/RESULTS.md, propagation).
        gc.collect()
        gc.freeze()

    def execute(self, requests: list[Any]) -> list[Any]:
        with self.stage.serving():
            return self.stage.execute(requests)

    def finalize(self) -> None:
        self.stage.finalize()


class FusedModel(_Model):
    stage_class = stages.FusedStage


class InlineHeadModel(_Model):
    stage_class = stages.InlineHeadStage


class HeadModel(_Model):
    stage_class = stages.HeadStage


class RepairModel(_Model):
    stage_class = stages.RepairStage


class TailModel(_Model):
    stage_class = stages.TailStage


class MonolithicModel(_Model):
    stage_class = stages.MonolithicStage


class ControlModel(_Model):
    stage_class = control_stage.ControlStage
