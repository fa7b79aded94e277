"""The KServe v2 checks of the HTTP front: what is forwarded is exactly what was understood, and every shape bomb,
type confusion and size lie is refused before anything is allocated."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from fire_backend.front.kserve import MAX_BODY_BYTES, Checked, Checker, ModelSpec, RequestError, check_infer

#: fire_ensemble's config as Triton's HTTP API returns it (digits: FP32 [1, 8, 8], max batch 64)
ENSEMBLE = {"name": "fire_ensemble", "max_batch_size": 64,
            "input": [{"name": "IMAGE", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}],
            "output": [{"name": n, "data_type": "TYPE_FP32", "dims": [1]}
                       for n in ("LOGITS", "LABEL", "REPAIR_SCORE", "FLAGGED", "DIRECTION_VERSION")]}
#: fire_control's: BYTES request and token, optional UINT8 images of any count, no batching
CONTROL = {"name": "fire_control", "max_batch_size": 0,
           "input": [{"name": "REQUEST", "data_type": "TYPE_STRING", "dims": [1]},
                     {"name": "TOKEN", "data_type": "TYPE_STRING", "dims": [1]},
                     {"name": "IMAGES", "data_type": "TYPE_UINT8", "dims": [-1, 8, 8, 1], "optional": True}],
           "output": [{"name": "RESPONSE", "data_type": "TYPE_STRING", "dims": [1]}]}
SPEC = ModelSpec.from_config(ENSEMBLE)


def json_body(shape, data, datatype="FP32", **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "IMAGE", "shape": shape, "datatype": datatype, "data": data}],
                       **extra}).encode()


def binary_body(shape, raw: bytes, size: int | None = None, datatype="FP32", outputs=None) -> tuple[bytes, int]:
    header = {"inputs": [{"name": "IMAGE", "shape": shape, "datatype": datatype,
                          "parameters": {"binary_data_size": len(raw) if size is None else size}}]}
    if outputs is not None:
        header["outputs"] = outputs
    head = json.dumps(header).encode()
    return head + raw, len(head)


def refused(body: bytes, header_length: int | None = None, spec: ModelSpec = SPEC, status: int = 400) -> str:
    with pytest.raises(RequestError) as info:
        check_infer(spec, body, header_length)
    assert info.value.status == status
    return str(info.value)


def test_a_json_request_is_forwarded_as_the_canonical_json_it_was_understood_as() -> None:
    images = np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float32)
    body = json.dumps({"id": "a", "parameters": {"fire_bypass": False},
                       "inputs": [{"name": "IMAGE", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                   "data": images.tolist()}],  # nested, as numpy's tolist writes it
                       "outputs": [{"name": "LABEL", "parameters": {"binary_data": True}}]}, indent=2).encode()
    checked = check_infer(SPEC, body, None)
    assert checked.header_length is None and checked.binary == b""
    forwarded = json.loads(checked.body)
    assert forwarded == json.loads(body) and b" " not in checked.body and b"\n" not in checked.body
    data = np.array(forwarded["inputs"][0]["data"], np.float32)
    np.testing.assert_array_equal(data, images)


def test_a_binary_request_keeps_its_tensor_bytes_after_a_canonical_header() -> None:
    raw = np.ones((3, 1, 8, 8), np.float32).tobytes()
    body, length = binary_body([3, 1, 8, 8], raw, outputs=[{"name": "LOGITS", "parameters": {"binary_data": True}}])
    checked = check_infer(SPEC, body, length)
    assert checked.binary == raw and checked.header_length == len(checked.header)
    assert json.loads(checked.header)["inputs"][0]["parameters"] == {"binary_data_size": len(raw)}


@pytest.mark.parametrize(("shape", "match"), [
    ([1, 1, 8, 2**40], "outside 0..2147483647"),  # the 417-byte request
    ([1, 1, 8, 2**31], "outside 0..2147483647"),
    ([1, 1, 8, 2**31 - 1], "does not match"),
    ([1, 1, -8, 8], "outside"),
    ([-1, 1, 8, 8], "outside"),
    ([2**40, 1, 8, 8], "outside"),
    ([65, 1, 8, 8], "batch 65 is outside 1..64"),
    ([0, 1, 8, 8], "batch 0"),
    ([1, 1, 8, 9], "does not match the model's \\[batch, 1, 8, 8\\]"),
    ([1, 8, 8], "shape of 4 integers"),
    ([1, 1, 8, 8, 1], "shape of 4 integers"),
    ([1, 1, 8, 8.0], "shape of 4 integers"),
    ([True, 1, 8, 8], "shape of 4 integers"),
    ("1,1,8,8", "shape of 4 integers"),
])
def test_shape_bombs_are_refused_before_anything_is_allocated(shape, match) -> None:
    with pytest.raises(RequestError, match=match):
        check_infer(SPEC, json_body(shape, [0.0] * 64), None)
    with pytest.raises(RequestError, match=match):
        check_infer(SPEC, *binary_body(shape, bytes(256)))


def test_bytes_and_other_types_in_fp32_slots_are_refused() -> None:
    assert "must have datatype FP32, not 'BYTES'" in refused(json_body([1, 1, 8, 8], ["a"] * 64, "BYTES"))
    assert "not 'FP64'" in refused(json_body([1, 1, 8, 8], [0.0] * 64, "FP64"))
    assert "finite numbers" in refused(json_body([1, 1, 8, 8], ["0.5"] * 64))  # strings as FP32 data
    assert "finite numbers" in refused(json_body([1, 1, 8, 8], [True] * 64))
    assert "finite numbers" in refused(json_body([1, 1, 8, 8], [None] * 64))
    assert "finite numbers" in refused(json_body([1, 1, 8, 8], [{"a": 1}] * 64))
    assert "finite numbers" in refused(json_body([1, 1, 8, 8], [1e400] * 64))  # inf once parsed
    body, length = binary_body([1, 1, 8, 8], struct.pack("<I", 252) + bytes(252), datatype="BYTES")
    assert "not 'BYTES'" in refused(body, length)


def test_data_must_back_the_shape_exactly() -> None:
    assert "holds 64 elements, data has 63" in refused(json_body([1, 1, 8, 8], [0.0] * 63))
    assert "holds 128 elements, data has 64" in refused(json_body([2, 1, 8, 8], [0.0] * 64))
    assert "nested deeper" in refused(json_body([1, 1, 8, 8], [[[[[0.0]]]]] * 64))
    assert "must be a JSON array" in refused(json_body([1, 1, 8, 8], "AAAA"))


def test_binary_data_size_lies_are_refused() -> None:
    raw = bytes(256)
    assert "is 256 bytes, binary_data_size says 252" in refused(*binary_body([1, 1, 8, 8], raw[:252]))
    assert "not backed by the body" in refused(*binary_body([1, 1, 8, 8], raw, size=2**40))
    assert "not backed by the body" in refused(*binary_body([1, 1, 8, 8], raw, size=-1))
    body, length = binary_body([1, 1, 8, 8], raw)
    assert "add up to 256 bytes but 260 follow" in refused(body + bytes(4), length)
    assert "not backed by the body" in refused(body[:-4], length)
    assert "outside the body" in refused(body, len(body) + 1)
    assert "outside the body" in refused(body, 0)
    assert "not valid JSON" in refused(body, length - 1)  # a header length that cuts the JSON
    assert "neither data nor" in refused(json.dumps({"inputs": [{"name": "IMAGE", "shape": [1, 1, 8, 8],
                                                                 "datatype": "FP32"}]}).encode())


def test_bytes_inputs_must_frame_exactly_their_elements() -> None:
    spec = ModelSpec.from_config(CONTROL)
    request, token = b'{"action": "status"}', b"v1:credential"

    def body(*segments: bytes, sizes: list[int] | None = None) -> tuple[bytes, int]:
        sizes = sizes or [len(s) for s in segments]
        head = json.dumps({"inputs": [{"name": name, "shape": [1], "datatype": "BYTES",
                                       "parameters": {"binary_data_size": size}}
                                      for name, size in zip(("REQUEST", "TOKEN"), sizes, strict=True)]}).encode()
        return head + b"".join(segments), len(head)

    def framed(value: bytes) -> bytes:
        return struct.pack("<I", len(value)) + value

    checked = check_infer(spec, *body(framed(request), framed(token)))
    assert checked.binary == framed(request) + framed(token)
    assert "ends before its 1 elements" in refused(*body(b"", framed(token)), spec=spec)
    lie = struct.pack("<I", 2**31) + request  # an element length far past the segment
    assert "BYTES elements take" in refused(*body(lie, framed(token)), spec=spec)
    assert "BYTES elements take" in refused(*body(framed(request) + b"x", framed(token)), spec=spec)
    images = {"name": "IMAGES", "shape": [2, 8, 8, 1], "datatype": "UINT8", "data": [300] * 128}
    json_request = {"inputs": [{"name": "REQUEST", "shape": [1], "datatype": "BYTES", "data": ["{}"]},
                               {"name": "TOKEN", "shape": [1], "datatype": "BYTES", "data": ["t"]}, images]}
    assert "integers in 0..255" in refused(json.dumps(json_request).encode(), spec=spec)
    images["data"] = [255] * 128
    assert json.loads(check_infer(spec, json.dumps(json_request).encode(), None).body) == json_request
    assert "needs input(s) TOKEN" in refused(json.dumps({"inputs": json_request["inputs"][:1]}).encode(), spec=spec)


@pytest.mark.parametrize(("request_", "match"), [
    ({"inputs": [{"name": "IMAGE", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}] * 2},
     "input\\(s\\), the request names 2"),
    ({"inputs": [{"name": "OTHER", "shape": [1], "datatype": "FP32", "data": [0.0]}]}, "has no input 'OTHER'"),
    ({"inputs": [{"name": "IMAGE", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64,
                  "parameters": {"shared_memory_region": "x", "binary_data_size": 256}}]}, "shared memory is closed"),
    ({"inputs": [], "evil": 1}, "unknown field"),
    ({"inputs": []}, "non-empty 'inputs'"),
    ({"inputs": [{"name": "IMAGE", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64, "x": 1}]},
     "unknown field"),
    ({"inputs": [{"name": "IMAGE", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
      "outputs": [{"name": "SECRET"}]}, "unknown to fire_ensemble"),
    ({"inputs": [{"name": "IMAGE", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
      "outputs": [{"name": "LABEL", "parameters": {"shared_memory_region": "r"}}]}, "shared memory is closed"),
    ({"inputs": [{"name": "IMAGE", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
      "parameters": {"nested": {"deep": [1]}}}, "string, number or boolean"),
    ({"inputs": [{"name": "IMAGE", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
      "id": "x" * 5000}, "at most 4096"),
    ([1, 2], "must be a JSON object"),
])
def test_only_what_the_front_understands_is_forwarded(request_, match) -> None:
    with pytest.raises(RequestError, match=match):
        check_infer(SPEC, json.dumps(request_).encode(), None)


def test_deep_or_broken_json_is_a_clear_400() -> None:
    assert "nested too deeply" in refused(b"[" * 100_000)
    assert "not valid JSON" in refused(b'{"inputs": [')
    assert "not valid JSON" in refused(b"\xff\xfe\x00")


def test_duplicate_keys_reach_triton_once() -> None:
    """A parser difference cannot smuggle a shape past the check: Triton gets the re-serialised header, which holds
    only the value that was checked (Python keeps the last duplicate; RapidJSON would have read the first)."""
    body = (b'{"inputs": [{"name": "IMAGE", "shape": [1, 1, 8, 1099511627776], "shape": [1, 1, 8, 8], '
            b'"datatype": "FP32", "data": [' + b",".join([b"0.5"] * 64) + b"]}]}")
    checked: Checked = check_infer(SPEC, body, None)
    assert checked.body.count(b'"shape"') == 1 and b"1099511627776" not in checked.body


def test_the_body_bound_follows_the_models_largest_batch() -> None:
    limit = SPEC.body_limit()
    largest = json_body([64, 1, 8, 8], np.full(64 * 64, -1.2345678901234567e-30).tolist())
    assert len(largest) < limit < 1 << 20  # the largest JSON batch fits; a 4 MiB body does not
    assert ModelSpec.from_config(CONTROL).body_limit() == MAX_BODY_BYTES  # variable dims: the front's own cap


def test_a_checker_remembers_binary_headers_and_still_checks_every_body() -> None:
    """The front's fast path: a header seen before is not parsed again, but the bytes after it are still held to
    it (sizes, and the framing of BYTES elements), and a JSON request is always checked in full."""
    checker = Checker(SPEC)
    raw = np.ones((2, 1, 8, 8), np.float32).tobytes()
    body, length = binary_body([2, 1, 8, 8], raw)
    first = checker.check(body, length)
    assert checker.check(body, length) == first
    with pytest.raises(RequestError, match="add up to 512 bytes but 508"):
        checker.check(body[:-4], length)  # the same header, a body that no longer backs it
    with pytest.raises(RequestError, match="holds 64 elements"):
        checker.check(json_body([1, 1, 8, 8], [0.0] * 63), None)
    control = Checker(ModelSpec.from_config(CONTROL))
    head = json.dumps({"inputs": [{"name": n, "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}
                                  for n in ("REQUEST", "TOKEN")]}).encode()
    good = struct.pack("<I", 2) + b"{}" + struct.pack("<I", 2) + b"tk"
    assert control.check(head + good, len(head)).binary == good
    with pytest.raises(RequestError, match="BYTES elements take"):
        control.check(head + struct.pack("<I", 9) + b"{}" + struct.pack("<I", 2) + b"tk", len(head))
