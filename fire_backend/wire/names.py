"""Every name two processes must agree on: models, tensors, the bypass parameter, protocols and ports.

The model repository's configs, the Triton stages, both clients and the Locust users all take their names
from here, so a rename is one edit. Plain constants: importing this module imports nothing.
"""

from __future__ import annotations

# -- models ------------------------------------------------------------------------------------------
#: the defended model, in the repository's layout (fused by default: one model, repair in-process)
FIRE_ENSEMBLE = "fire_ensemble"
#: head -> tail, the split network without the repair (only in repositories built with --baselines)
UNDEFENDED_ENSEMBLE = "undefended_ensemble"
#: the unsplit model in one stage, no repair (only with --baselines; the benchmarks' reference)
FIRE_MONOLITHIC = "fire_monolithic"
#: the control endpoint: push / observe / status / history / rollback
FIRE_CONTROL = "fire_control"
#: fire_ensemble's stages in the inline and separate layouts
FIRE_HEAD = "fire_head"
FIRE_REPAIR = "fire_repair"
FIRE_TAIL = "fire_tail"
#: the defended model in each layout under its own name, beside fire_ensemble, for side-by-side comparisons
#: (`fire bench`); their stages are named <model>_head, <model>_repair, <model>_tail
FIRE_FUSED = "fire_fused"
FIRE_INLINE = "fire_inline"
FIRE_SEPARATE = "fire_separate"
#: the models an inference client may address (fire_control is not one)
INFERENCE_MODELS = (FIRE_ENSEMBLE, UNDEFENDED_ENSEMBLE, FIRE_MONOLITHIC, FIRE_FUSED, FIRE_INLINE, FIRE_SEPARATE)
DEFAULT_MODEL = FIRE_ENSEMBLE

# -- tensors -----------------------------------------------------------------------------------------
#: float32 N x C x H x W in [0, 1]: the input of the ensembles, the head and the monolithic model
IMAGE = "IMAGE"
LOGITS = "LOGITS"
LABEL = "LABEL"
#: largest projection coefficient over the live directions (about 0 clean, about 1 triggered)
REPAIR_SCORE = "REPAIR_SCORE"
FLAGGED = "FLAGGED"
#: the direction-set version that repaired the sample
DIRECTION_VERSION = "DIRECTION_VERSION"
#: the head's output and the repair's input
LATENT = "LATENT"
#: the repair's output and the tail's input
REPAIRED = "REPAIRED"
#: fire_control's inputs (a JSON request, the control token, optional uint8 N x H x W x C images) and output
REQUEST = "REQUEST"
TOKEN = "TOKEN"
IMAGES = "IMAGES"
RESPONSE = "RESPONSE"
#: the most one control request may carry, REQUEST and IMAGES bytes together: fire_control refuses more, and the
#: control client splits a larger observe into requests within it. Bounded so that a request and its answer fit the
#: stub's shared-memory region as it starts (serving.server.STUB_REGION_BYTES), which then never has to grow.
MAX_CONTROL_REQUEST_BYTES = 1 << 20
#: images per observe request the control client sends at most (a repository's ``max_observe_images`` may be lower)
OBSERVE_CHUNK_IMAGES = 64

#: request parameter (a JSON boolean) that makes fire_ensemble keep that request's latents unrepaired (scores still
#: computed); honoured only by repositories built with --allow-bypass, and only with CREDENTIAL_PARAMETER
BYPASS_PARAMETER = "fire_bypass"
#: request parameter with the bypass credential: wire.auth.sign(token, BYPASS, digest(IMAGE bytes as sent))
CREDENTIAL_PARAMETER = "fire_credential"
#: how a repairing stage's UNAVAILABLE answer begins while it holds requests (no verified direction version yet):
#: clients tell it from "nothing listens", which gRPC also reports as UNAVAILABLE
HOLDING = "no verified direction version yet"

# -- endpoints ---------------------------------------------------------------------------------------
PROTOCOLS = ("grpc", "http")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}
DEFAULT_METRICS_PORT = 8002
#: `fire serve`'s own health endpoint (/live, /ready): Triton's readiness cannot see a dead stage
DEFAULT_HEALTH_PORT = 8003
DEFAULT_URL = f"grpc://{DEFAULT_HOST}:{DEFAULT_PORTS['grpc']}"
