"""The store's live direction version as a :class:`~fire_backend.fire.RepairPlan` on one instance's device.

Every stage that repairs (``fused``, the ``inline`` head, the ``separate`` repair stage) holds one. Before each
batch, never within one, :meth:`LivePlan.refresh` asks the store follower whether a new version was committed
(one ``stat``); if so the version is verified, compiled onto the device for every configured layer, and used from
that batch on, and the instance reports what it applies. No model reload is involved.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from fire_backend.fire import RepairPlan, compile_plan
from fire_backend.serving.artifacts import STORE_DIR, ServingSettings
from fire_backend.store import DirectionStore, StoreFollower, Version

LOG = logging.getLogger("fire_backend.serving")


def plan_of(version: Version | None, settings: ServingSettings, device: torch.device) -> RepairPlan:
    """Compile a store version for the repository's repaired layers (version 0: nothing to repair).

    A version holds a direction set per layer (one written in the one-layer format applies at the split layer
    ``settings.layer``); a configured layer without a direction in the version is not repaired.
    """
    if version is None:
        return RepairPlan({}, 0)
    layered = version.layered.at(settings.layer)
    sets = {layer: (ds.directions, torch.from_numpy(ds.center)) for layer, ds in layered.items()}
    return compile_plan(sets, settings.layer_dims, device, version.number)


class LivePlan:
    """Follows the direction store for one instance and keeps its compiled plan current."""

    def __init__(self, artifacts: Path, settings: ServingSettings, device: torch.device, instance: str) -> None:
        self.settings = settings
        self.device = device
        self.store = DirectionStore(artifacts / STORE_DIR).ensure()
        self.store.repair_pointer()
        self.follower = StoreFollower(self.store)
        self.instance_id = f"{instance}-{os.getpid()}".replace("/", "_").replace(" ", "_")
        self.follower.poll()
        self.plan = RepairPlan({}, 0)
        self._apply()  # reports the start version too, version 0 included

    def refresh(self) -> RepairPlan:
        """The plan to apply to the next batch (re-compiled only when the live version changed)."""
        if self.follower.poll():
            self._apply()
        return self.plan

    def _apply(self) -> None:
        self.plan = plan_of(self.follower.current, self.settings, self.device)
        self.store.report_instance(self.instance_id, self.follower.version)
        LOG.info("%s: applying direction version %d", self.instance_id, self.follower.version)

    def close(self) -> None:
        """Withdraw this instance from the store's registry (the model is unloading)."""
        path = self.store.instances_dir / f"{self.instance_id}.json"
        path.unlink(missing_ok=True)
