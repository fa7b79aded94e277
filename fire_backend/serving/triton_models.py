"""The Triton entry points under the path older repositories' ``model.py`` files import; see
:mod:`fire_backend.stub.triton_models` (``fire repo build`` writes that path now)."""

from fire_backend.stub.triton_models import (  # noqa: F401
    ControlModel,
    FusedModel,
    HeadModel,
    InlineHeadModel,
    MonolithicModel,
    RepairModel,
    TailModel,
)
