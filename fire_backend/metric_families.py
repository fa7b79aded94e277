"""What FIRE exports on Triton's /metrics: every family's name, type, help and labels, the label values, the
score buckets, and the summary a run prints. Written by the stubs (:mod:`fire_backend.stub.metrics`), read by the
launcher's store-health gauge, ``fire demo`` and the dashboards and alerts (tests/unit/test_observability_files.py):
the names are defined here once, for every process."""

from __future__ import annotations

from dataclasses import dataclass

from fire_backend.stores import damage
from fire_backend.wire.names import BYPASS_PARAMETER

COUNTER = "counter"
GAUGE = "gauge"


@dataclass(frozen=True)
class Family:
    """One exported metric family: its name, type, unit (in the name, Prometheus style), help and labels."""

    name: str
    kind: str
    help: str
    #: labels beyond ``model`` and ``model_instance`` (and ``layout`` on the serving families)
    labels: tuple[str, ...] = ()


MODEL_LABEL = "model"
INSTANCE_LABEL = "model_instance"
LAYOUT_LABEL = "layout"
BASE_LABELS = (MODEL_LABEL, INSTANCE_LABEL)

REQUESTS_TOTAL = Family("fire_requests_total", COUNTER,
                        "Requests the FIRE repair scored (requests rejected as invalid are not counted here).")
SAMPLES_TOTAL = Family("fire_samples_total", COUNTER, "Samples (images) the FIRE repair scored.")
FLAGGED_SAMPLES_TOTAL = Family("fire_flagged_samples_total", COUNTER,
                               "Samples whose REPAIR_SCORE exceeded the threshold (bypassed requests included).")
BYPASSED_REQUESTS_TOTAL = Family("fire_bypassed_requests_total", COUNTER,
                                 f"Requests served with {BYPASS_PARAMETER}: latent left unrepaired, score still "
                                 "computed.")
#: the score distribution: these three form the histogram ``fire_repair_score`` (see the module docstring)
SCORE_HISTOGRAM = "fire_repair_score"
SCORE_BUCKET = Family(f"{SCORE_HISTOGRAM}_bucket", COUNTER,
                      "Samples with REPAIR_SCORE <= le (cumulative histogram buckets).", ("le",))
SCORE_COUNT = Family(f"{SCORE_HISTOGRAM}_count", COUNTER, "Samples scored (the histogram's count).")
SCORE_SUM = Family(f"{SCORE_HISTOGRAM}_sum", GAUGE,
                   "Sum of the finite REPAIR_SCOREs (the histogram's sum; a gauge: scores can be negative).")
APPLIED_VERSION = Family("fire_direction_version", GAUGE, "Direction-set version this repair instance applies.")
APPLY_LAG_SECONDS = Family("fire_direction_apply_lag_seconds", GAUGE,
                           "Seconds from the commit of the applied version until this instance applied it "
                           "(last propagation; NaN until the instance has seen one).")
LIVE_VERSION = Family("fire_direction_live_version", GAUGE,
                      "The store's committed live direction-set version, as the control stage reads it.")
CONTROL_ACTIONS_TOTAL = Family("fire_control_actions_total", COUNTER, "Control actions by action and result.",
                               ("action", "result"))
STORE_ERRORS_TOTAL = Family("fire_store_errors_total", COUNTER,
                            "Direction-store problems met (never served): by kind.", ("kind",))
STORE_DEGRADED = Family("fire_store_degraded", GAUGE,
                        "1 while the direction store, as this process sees it, is missing, unreadable, damaged or "
                        "unreachable (repair instances keep serving the version they verified), else 0.")
REPAIR_UNAVAILABLE = Family("fire_repair_unavailable", GAUGE,
                            "1 while this repair instance has no verified direction version and refuses requests "
                            "(it started while the store was unreadable), else 0.")

BATCH_FAMILIES = (REQUESTS_TOTAL, SAMPLES_TOTAL, FLAGGED_SAMPLES_TOTAL, BYPASSED_REQUESTS_TOTAL, SCORE_BUCKET,
                  SCORE_COUNT, SCORE_SUM, APPLIED_VERSION, APPLY_LAG_SECONDS, STORE_ERRORS_TOTAL, STORE_DEGRADED,
                  REPAIR_UNAVAILABLE)
CONTROL_FAMILIES = (CONTROL_ACTIONS_TOTAL, LIVE_VERSION, STORE_ERRORS_TOTAL, STORE_DEGRADED)
#: every family FIRE exports, once each
FAMILIES = tuple(dict.fromkeys(BATCH_FAMILIES + CONTROL_FAMILIES))

#: ``result`` of a control action
RESULT_OK = "ok"
RESULT_REFUSED_AUTH = "refused_auth"
RESULT_REFUSED_VALIDATION = "refused_validation"
RESULT_ERROR = "error"
CONTROL_RESULTS = (RESULT_OK, RESULT_REFUSED_AUTH, RESULT_REFUSED_VALIDATION, RESULT_ERROR)
#: ``action`` label of an action name the controller does not know (client-chosen text never becomes a label)
OTHER_ACTION = "other"

#: ``kind`` of a store error (the store reports them: fire_backend.stores.damage)
STORE_CHECKSUM = damage.CHECKSUM
STORE_TORN_LINE = damage.TORN_LINE
STORE_UNREADABLE_POINTER = damage.UNREADABLE_POINTER
STORE_SHAPE = damage.SHAPE
STORE_ERROR_KINDS = damage.KINDS

#: REPAIR_SCORE is about 0 for clean inputs and about 1 for triggered ones (threshold 0.5 by default): fine
#: buckets in between, a few below 0 and up to 2.
SCORE_BUCKETS = (-0.5, -0.25, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0)


def exported_names() -> set[str]:
    """Every metric name FIRE's families put on /metrics (what dashboards and alerts may query)."""
    return {family.name for family in FAMILIES}


#: what a short summary of a run shows (``fire demo``): traffic, the attack signal, versions, control actions
SUMMARY_FAMILIES = (REQUESTS_TOTAL, SAMPLES_TOTAL, FLAGGED_SAMPLES_TOTAL, BYPASSED_REQUESTS_TOTAL, APPLIED_VERSION,
                    APPLY_LAG_SECONDS, LIVE_VERSION, CONTROL_ACTIONS_TOTAL, STORE_ERRORS_TOTAL, STORE_DEGRADED,
                    REPAIR_UNAVAILABLE)


def summary_lines(page: str) -> list[str]:
    """The sample lines of a /metrics page that tell what FIRE did: SUMMARY_FAMILIES, counters that moved
    (a counter at 0 says nothing), every gauge."""
    kinds = {family.name: family.kind for family in SUMMARY_FAMILIES}
    lines = []
    for line in page.splitlines():
        name, _, rest = line.partition("{")
        kind = kinds.get(name)
        if kind is not None and (kind == GAUGE or rest.rsplit(" ", 1)[-1] not in ("0", "0.0")):
            lines.append(line)
    return lines
