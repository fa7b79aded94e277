"""How the control client splits a large observe into requests within the wire's bound (no server: the requests a
server would get are recorded; tests/integration/test_control.py sends them to the real one)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fire_backend.wire.control import ControlClient, observe_chunk
from fire_backend.wire.errors import FireClientError
from fire_backend.wire.names import FIRE_CONTROL, IMAGES, MAX_CONTROL_REQUEST_BYTES, OBSERVE_CHUNK_IMAGES


@pytest.mark.parametrize(("shape", "expected"), [
    ((8, 8, 1), OBSERVE_CHUNK_IMAGES),  # digits: the count bounds it
    ((32, 32, 3), OBSERVE_CHUNK_IMAGES),  # CIFAR-10: 64 images are 196,608 bytes
    ((224, 224, 3), 6),  # ImageNet-size: the bytes bound it
])
def test_a_request_carries_at_most_a_chunk_and_the_byte_bound(shape: tuple[int, ...], expected: int) -> None:
    images = np.zeros((100, *shape), np.uint8)
    per_request = observe_chunk(images, 40)
    assert per_request == expected
    assert per_request * images[0].nbytes + 40 <= MAX_CONTROL_REQUEST_BYTES


def test_an_image_larger_than_a_request_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="at most 1048576 bytes"):
        observe_chunk(np.zeros((1, 1024, 1024, 3), np.uint8), 40)
    with pytest.raises(ValueError, match="chunk"):
        observe_chunk(np.zeros((1, 8, 8, 1), np.uint8), 40, chunk=0)


class Recording(ControlClient):
    """A ControlClient whose server is a list: each call is recorded and answered as fire_control would."""

    def __init__(self, refuse_at: int | None = None, image_shape: tuple[int, int, int] | None = None) -> None:
        super().__init__("grpc://127.0.0.1:1", "token")
        self.sent: list[tuple[dict, np.ndarray]] = []
        self.refuse_at = refuse_at
        self.image_dims = [-1, *(image_shape or (-1, -1, -1))]

    def model_config(self, model: str) -> dict:
        """fire_control's config as `fire repo build` writes it: IMAGES is N x H x W x C (open with a -1)."""
        assert model == FIRE_CONTROL
        return {"name": model, "input": [{"name": "REQUEST", "dims": [1]}, {"name": IMAGES, "dims": self.image_dims}]}

    def call(self, request: dict, images: np.ndarray | None = None) -> dict:
        assert images is not None
        assert len(json.dumps(request).encode()) + images.nbytes <= MAX_CONTROL_REQUEST_BYTES
        if len(self.sent) == self.refuse_at:
            raise FireClientError("fire_control: observe: the live version already holds 256 flagged images")
        self.sent.append((request, images))
        version = len(self.sent)
        return {"version": version, "versions": [version], "action": "observe", "poisoned_count": 0}


def test_a_large_observe_goes_in_requests_within_the_bound_in_order() -> None:
    images = np.arange(150 * 224 * 224 * 3, dtype=np.uint64).astype(np.uint8).reshape(150, 224, 224, 3)
    client = Recording()
    result = client.observe(images, publish_every=10)
    assert result["requests"] == len(client.sent) == 25 and result["versions"] == list(range(1, 26))
    assert np.array_equal(np.concatenate([sent for _, sent in client.sent]), images)
    assert all(request == {"action": "observe", "clean": False, "publish_every": 10} for request, _ in client.sent)


def test_a_refusal_after_commits_names_what_was_committed() -> None:
    client = Recording(refuse_at=2)
    with pytest.raises(FireClientError, match=r"request 3 of 4 \(images 128 to 191\) failed after versions \[1, 2\] "
                                              r"were committed from images 0 to 127: .*256 flagged"):
        client.observe(np.zeros((200, 8, 8, 1), np.uint8))
    with pytest.raises(FireClientError, match="^fire_control: observe"):  # nothing committed: the server's words
        Recording(refuse_at=0).observe(np.zeros((10, 8, 8, 1), np.uint8))


def test_images_of_another_shape_than_the_servers_are_refused_before_anything_is_sent() -> None:
    """Issue 26: 32 x 32 x 3 images observed on a digits server got Triton's raw text back; the client reads the
    shape from fire_control's config and names both shapes and the fix."""
    client = Recording(image_shape=(8, 8, 1))
    with pytest.raises(FireClientError, match=r"images are 32 x 32 x 3 \(H x W x C\) but this server's model "
                                              r"takes 8 x 8 x 1: export images for its data set"):
        client.observe(np.zeros((4, 32, 32, 3), np.uint8))
    assert client.sent == []
    assert client.observe(np.zeros((4, 8, 8, 1), np.uint8))["versions"] == [1]
