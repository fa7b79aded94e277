"""The store's live direction version as a :class:`~fire_backend.fire.RepairPlan` on one instance's device.

Every stage that repairs (``fused``, the ``inline`` head, the ``separate`` repair stage) holds one. Before each
batch, never within one, :meth:`LivePlan.refresh` asks the store follower whether a new version was committed
(the file store: one ``stat``; etcd: an attribute its watch thread sets); if so the verified version is compiled
onto the device for every configured layer and used from that batch on, and the instance reports what it
applies. No model reload is involved.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from fire_backend.fire import RepairPlan, compile_plan
from fire_backend.serving.artifacts import ServingSettings, repository_store
from fire_backend.store import Version

LOG = logging.getLogger("fire_backend.serving")


def plan_of(version: Version | None, settings: ServingSettings, device: torch.device) -> RepairPlan:
    """Compile a store version for the repository's repaired layers (version 0: nothing to repair).

    Today a version holds one direction set, applied at the split layer ``settings.layer``; the plan already
    takes a set per layer, so a store that keeps one per layer only changes this function.
    """
    if version is None:
        return RepairPlan({}, 0)
    ds = version.directions
    sets = {settings.layer: (ds.directions, torch.from_numpy(ds.center))}
    return compile_plan(sets, settings.layer_dims, device, version.number)


class LivePlan:
    """Follows the direction store for one instance and keeps its compiled plan current."""

    def __init__(self, artifacts: Path, settings: ServingSettings, device: torch.device, instance: str) -> None:
        self.settings = settings
        self.device = device
        self.instance_id = f"{instance}-{os.getpid()}".replace("/", "_").replace(" ", "_")
        self.follower = repository_store(artifacts, settings).follower(self.instance_id)
        self.follower.poll()
        self.plan = RepairPlan({}, 0)
        self._apply()

    def refresh(self) -> RepairPlan:
        """The plan to apply to the next batch (re-compiled only when the live version changed)."""
        if self.follower.poll():
            self._apply()
        return self.plan

    def _apply(self) -> None:
        self.plan = plan_of(self.follower.current, self.settings, self.device)
        LOG.info("%s: applying direction version %d", self.instance_id, self.follower.version)

    def close(self) -> None:
        """Stop following and withdraw this instance from the store's registry (the model is unloading)."""
        self.follower.close()
