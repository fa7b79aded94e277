"""KServe v2 inference requests, checked against the model's config before anything is allocated.

Triton 2.51's HTTP server allocates a JSON request's claimed shape before it compares it with the body (one
417-byte request claiming 2^40 floats aborts it) and parses JSON recursively. The HTTP front
(:mod:`fire_backend.front.proxy`) therefore passes on only what :func:`check_infer` accepts:

- every input named once, known to the model, of the model's datatype, with a shape of the model's rank whose
  fixed dimensions match and whose batch is within ``max_batch_size``;
- the bytes backing each input exactly what its shape x datatype needs: a JSON ``data`` array with that many
  elements of the right kind (numbers for numeric types, booleans for BOOL, strings for BYTES), or a binary
  segment (``binary_data_size``, the binary-tensor extension with ``Inference-Header-Content-Length``) of exactly
  that size, the segments adding up to the body's length; a BYTES segment must frame that many elements;
- nothing else: unknown fields, shared-memory parameters and nested values where scalars belong are refused.

What is forwarded is the header re-serialised from what was checked, never the client's bytes, so Triton's JSON
parser sees only what Python's understood (no duplicate keys, no deep nesting, no parser differences). Pure
functions; no I/O, no torch.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: bytes per element of each KServe v2 datatype (BYTES: length-prefixed, variable)
DATATYPE_SIZES: dict[str, int | None] = {
    "BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4, "INT64": 8,
    "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8, "BYTES": None,
}
_INT_RANGES = {name: ((0, 2 ** (8 * size) - 1) if name.startswith("U") else (-(2 ** (8 * size - 1)),
                                                                           2 ** (8 * size - 1) - 1))
               for name, size in DATATYPE_SIZES.items() if name.startswith(("INT", "UINT")) and size}
#: the largest request body the front reads, whatever the model (use the binary extension for big batches)
MAX_BODY_BYTES = 64 << 20
#: what a JSON number may take in a body, separators and indentation included, when bounding a model's body
JSON_BYTES_PER_ELEMENT = 48
#: room for the JSON header (names, shapes, parameters) on top of the tensors
HEADER_ALLOWANCE = 64 << 10
#: a dimension above this is refused (Triton keeps shapes as int64 and multiplies them)
MAX_DIM = 2**31 - 1
#: elements of one BYTES input (each is framed by a 4-byte length that the front walks)
MAX_BYTES_ELEMENTS = 1 << 16
MAX_STRING_CHARS = 4096
MAX_PARAMETERS = 64
_REQUEST_FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
_INPUT_FIELDS = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_FIELDS = frozenset({"name", "parameters"})
_OUTPUT_PARAMETERS = {"binary_data": bool, "classification": int}
BINARY_SIZE = "binary_data_size"


class RequestError(ValueError):
    """A request the front refuses: ``status`` is the HTTP status (4xx), the message says what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _bad(message: str) -> RequestError:
    return RequestError(400, message)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    #: the per-sample dims of the config (-1: any)
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """What the front needs of a model's config to check a request against it."""

    name: str
    max_batch_size: int
    inputs: dict[str, TensorSpec]
    outputs: frozenset[str]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        """From Triton's model config as its HTTP API returns it (``TYPE_FP32``, dims as numbers)."""
        def datatype(value: str) -> str:
            name = str(value).removeprefix("TYPE_")
            return "BYTES" if name == "STRING" else name

        inputs = {str(t["name"]): TensorSpec(str(t["name"]), datatype(t.get("data_type", "")),
                                             tuple(int(d) for d in t.get("dims", ())), bool(t.get("optional")))
                  for t in config.get("input", ())}
        return cls(str(config.get("name", "")), int(config.get("max_batch_size") or 0), inputs,
                   frozenset(str(t["name"]) for t in config.get("output", ())))

    def body_limit(self) -> int:
        """The most bytes a well-formed request to this model can take: its largest batch in JSON text plus a
        header, or :data:`MAX_BODY_BYTES` where a variable dimension or BYTES input leaves the size open."""
        batch = max(self.max_batch_size, 1)
        binary = text = 0
        for spec in self.inputs.values():
            size = DATATYPE_SIZES.get(spec.datatype)
            if size is None or any(d < 0 for d in spec.dims):
                return MAX_BODY_BYTES
            elements = batch * math.prod(spec.dims)
            binary += elements * size
            text += elements * JSON_BYTES_PER_ELEMENT
        return min(MAX_BODY_BYTES, max(binary, text) + HEADER_ALLOWANCE)


@dataclass(frozen=True)
class Checked:
    """A request as the front forwards it: the canonical JSON header and the binary segments after it."""

    header: bytes
    binary: bytes

    @property
    def body(self) -> bytes:
        return self.header + self.binary

    @property
    def header_length(self) -> int | None:
        """``Inference-Header-Content-Length`` to send (None: a JSON-only request)."""
        return len(self.header) if self.binary else None


@dataclass(frozen=True)
class _Plan:
    """What a checked all-binary header says: its canonical form and the segments that must follow it."""

    header: bytes
    segments: tuple[tuple[TensorSpec, int, int], ...]  #: (input, elements, bytes), in body order
    size: int

    def apply(self, binary: memoryview) -> Checked:
        if len(binary) != self.size:
            raise _bad(f"the inputs' binary_data_size add up to {self.size} bytes but {len(binary)} follow the "
                       "header")
        offset = 0
        for tensor, count, size in self.segments:
            if DATATYPE_SIZES[tensor.datatype] is None:
                _binary_size(tensor, count, binary[offset:offset + size])
            offset += size
        return Checked(self.header, bytes(binary))


#: all-binary headers a Checker remembers (a client sends the same header for every request of one batch size)
MAX_PLANS = 256


class Checker:
    """:func:`check_infer` for one model, remembering what each all-binary header it accepted asks of the body: a
    request whose header bytes were seen before only has its binary segments checked (sizes, BYTES framing)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._plans: dict[bytes, _Plan] = {}

    def check(self, body: bytes, header_length: int | None) -> Checked:
        if header_length is not None and 0 < header_length <= len(body):
            plan = self._plans.get(body[:header_length])
            if plan is not None:
                return plan.apply(memoryview(body)[header_length:])
        checked, plan = _check(self.spec, body, header_length)
        if plan is not None and header_length is not None:
            if len(self._plans) >= MAX_PLANS:
                self._plans.clear()
            self._plans[body[:header_length]] = plan
        return checked


def check_infer(spec: ModelSpec, body: bytes, header_length: int | None) -> Checked:
    """The request to forward for ``body`` (``header_length``: its ``Inference-Header-Content-Length``), or a
    :class:`RequestError` saying why it is refused."""
    return _check(spec, body, header_length)[0]


def _check(spec: ModelSpec, body: bytes, header_length: int | None) -> tuple[Checked, _Plan | None]:
    """The checked request, and its plan when every input is binary (nothing in the header varies per request)."""
    if header_length is None:
        header_length = len(body)
    elif not 0 < header_length <= len(body):
        raise _bad(f"Inference-Header-Content-Length {header_length} is outside the body's {len(body)} bytes")
    try:
        header = json.loads(body[:header_length])
    except RecursionError:
        raise _bad("the JSON header is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _bad(f"the request header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _bad("the request must be a JSON object")
    _fields(header, _REQUEST_FIELDS, "the request")
    request: dict[str, Any] = {}
    if "id" in header:
        request["id"] = _string(header["id"], "id")
    if "parameters" in header:
        request["parameters"] = _parameters(header["parameters"], "the request's parameters")
    binary = memoryview(body)[header_length:]
    inputs, segments = _inputs(spec, header.get("inputs"), binary)
    used = sum(size for _, _, size in segments)
    if used != len(binary):
        raise _bad(f"the inputs' binary_data_size add up to {used} bytes but {len(binary)} follow the header")
    request["inputs"] = inputs
    if "outputs" in header:
        request["outputs"] = _outputs(spec, header["outputs"])
    canonical = json.dumps(request, separators=(",", ":"), allow_nan=False).encode()
    plan = _Plan(canonical, tuple(segments), used) if len(segments) == len(inputs) else None
    return Checked(canonical, bytes(binary)), plan


def _fields(value: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise _bad(f"{what} has unknown field(s) {', '.join(map(repr, unknown[:5]))}; allowed: "
                   f"{', '.join(sorted(allowed))}")


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_STRING_CHARS:
        raise _bad(f"{what} must be a string of at most {MAX_STRING_CHARS} characters")
    return value


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) > MAX_PARAMETERS:
        raise _bad(f"{what} must be a JSON object of at most {MAX_PARAMETERS} entries")
    for key, item in value.items():
        if isinstance(item, str):
            _string(item, f"parameter {key!r}")
        elif not isinstance(item, (bool, int, float)) or (isinstance(item, float) and not math.isfinite(item)):
            raise _bad(f"parameter {key!r} must be a string, number or boolean")
        _string(key, "a parameter name")
    return value


def _inputs(spec: ModelSpec, value: Any, binary: memoryview
            ) -> tuple[list[dict[str, Any]], list[tuple[TensorSpec, int, int]]]:
    """The canonical inputs, and the binary segments they take: (input, elements, bytes) each, in body order."""
    if not isinstance(value, list) or not value:
        raise _bad("the request needs a non-empty 'inputs' list")
    if len(value) > len(spec.inputs):
        raise _bad(f"{spec.name} has {len(spec.inputs)} input(s), the request names {len(value)}")
    checked, seen, segments, offset = [], set(), [], 0
    for item in value:
        if not isinstance(item, dict):
            raise _bad("each input must be a JSON object")
        _fields(item, _INPUT_FIELDS, "an input")
        name = _string(item.get("name"), "an input's name")
        tensor = spec.inputs.get(name)
        if tensor is None:
            raise _bad(f"{spec.name} has no input {name!r}; its inputs: {', '.join(sorted(spec.inputs))}")
        if name in seen:
            raise _bad(f"input {name!r} is given twice")
        seen.add(name)
        datatype = item.get("datatype")
        if datatype != tensor.datatype:
            raise _bad(f"input {name!r} must have datatype {tensor.datatype}, not {datatype!r}")
        shape = _shape(spec, tensor, item.get("shape"))
        count = math.prod(shape)
        entry: dict[str, Any] = {"name": name, "shape": shape, "datatype": datatype}
        parameters = item.get("parameters", {})
        if not isinstance(parameters, dict) or set(parameters) - {BINARY_SIZE}:
            raise _bad(f"input {name!r}: the only input parameter accepted is {BINARY_SIZE} (shared memory is "
                       "closed)")
        if BINARY_SIZE in parameters:
            if "data" in item:
                raise _bad(f"input {name!r} has both data and {BINARY_SIZE}")
            size = parameters[BINARY_SIZE]
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise _bad(f"input {name!r}: {BINARY_SIZE} {size!r} is not backed by the body "
                           f"({len(binary) - offset} bytes left after the header)")
            _binary_size(tensor, count, binary[offset:offset + size])
            segments.append((tensor, count, size))
            offset += size
            entry["parameters"] = {BINARY_SIZE: size}
        elif "data" in item:
            entry["data"] = _data(tensor, count, len(shape), item["data"])
        else:
            raise _bad(f"input {name!r} has neither data nor {BINARY_SIZE}")
        checked.append(entry)
    missing = sorted(n for n, t in spec.inputs.items() if not t.optional and n not in seen)
    if missing:
        raise _bad(f"{spec.name} needs input(s) {', '.join(missing)}")
    return checked, segments


def _outputs(spec: ModelSpec, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > len(spec.outputs):
        raise _bad(f"'outputs' must be a list of at most {len(spec.outputs)} outputs of {spec.name}")
    checked, seen = [], set()
    for item in value:
        if not isinstance(item, dict):
            raise _bad("each requested output must be a JSON object")
        _fields(item, _OUTPUT_FIELDS, "a requested output")
        name = _string(item.get("name"), "an output's name")
        if name not in spec.outputs or name in seen:
            raise _bad(f"output {name!r} is unknown to {spec.name} or asked twice; its outputs: "
                       f"{', '.join(sorted(spec.outputs))}")
        seen.add(name)
        entry: dict[str, Any] = {"name": name}
        parameters = item.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict) or set(parameters) - set(_OUTPUT_PARAMETERS):
                raise _bad(f"output {name!r}: parameters may be {', '.join(_OUTPUT_PARAMETERS)} only (shared "
                           "memory is closed)")
            for key, kind in _OUTPUT_PARAMETERS.items():
                if key in parameters and (type(parameters[key]) is not kind
                                          or (kind is int and not 0 <= parameters[key] <= MAX_BYTES_ELEMENTS)):
                    raise _bad(f"output {name!r}: parameter {key} must be a {kind.__name__}")
            entry["parameters"] = parameters
        checked.append(entry)
    return checked


def _shape(spec: ModelSpec, tensor: TensorSpec, value: Any) -> list[int]:
    batched = spec.max_batch_size > 0
    expected = ([spec.max_batch_size] if batched else []) + list(tensor.dims)
    if not isinstance(value, list) or len(value) != len(expected) \
            or not all(type(d) is int for d in value):  # bool is an int subclass: refused too
        raise _bad(f"input {tensor.name!r} needs a shape of {len(expected)} integers "
                   f"({'batch, ' if batched else ''}{', '.join(map(str, tensor.dims))}), got {value!r:.80}")
    if any(d < 0 or d > MAX_DIM for d in value):
        raise _bad(f"input {tensor.name!r}: shape {value} has a dimension outside 0..{MAX_DIM}")
    dims = value
    if batched:
        if not 1 <= value[0] <= spec.max_batch_size:
            raise _bad(f"input {tensor.name!r}: batch {value[0]} is outside 1..{spec.max_batch_size}")
        dims = value[1:]
    if any(want >= 0 and got != want for got, want in zip(dims, tensor.dims, strict=True)):
        wanted = ", ".join(["batch"] * batched + [str(d) if d >= 0 else "any" for d in tensor.dims])
        raise _bad(f"input {tensor.name!r}: shape {value} does not match the model's [{wanted}]")
    return list(value)


def _binary_size(tensor: TensorSpec, count: int, segment: memoryview) -> None:
    size = DATATYPE_SIZES[tensor.datatype]
    if size is not None:
        if count * size != len(segment):
            raise _bad(f"input {tensor.name!r}: shape x {tensor.datatype} is {count * size} bytes, "
                       f"{BINARY_SIZE} says {len(segment)}")
        return
    if count > MAX_BYTES_ELEMENTS:
        raise _bad(f"input {tensor.name!r}: at most {MAX_BYTES_ELEMENTS} BYTES elements per input")
    offset = 0
    for _ in range(count):  # each element: a 4-byte little-endian length, then that many bytes
        if offset + 4 > len(segment):
            raise _bad(f"input {tensor.name!r}: the BYTES segment ends before its {count} elements")
        (length,) = struct.unpack_from("<I", segment, offset)
        offset += 4 + length
    if offset != len(segment):
        raise _bad(f"input {tensor.name!r}: {count} BYTES elements take {offset} bytes, "
                   f"{BINARY_SIZE} says {len(segment)}")


def _leaves(data: Any, depth: int) -> Iterable[Any]:
    """The scalars of a flat or nested JSON array, nested at most ``depth`` deep (iterative: no recursion)."""
    stack = [(data, 1)]
    while stack:
        value, level = stack.pop()
        for item in value:
            if isinstance(item, list):
                if level >= depth:
                    raise _bad(f"data is nested deeper than the shape's {depth} dimensions")
                stack.append((item, level + 1))
            else:
                yield item


def _data(tensor: TensorSpec, count: int, rank: int, data: Any) -> list[Any]:
    if not isinstance(data, list):
        raise _bad(f"input {tensor.name!r}: data must be a JSON array")
    if all(not isinstance(item, list) for item in data):
        leaves = data  # the common flat case, without copying
    else:
        leaves = list(_leaves(data, max(rank, 1)))
    if len(leaves) != count:
        raise _bad(f"input {tensor.name!r}: the shape holds {count} elements, data has {len(leaves)}")
    kind = tensor.datatype
    if kind == "BYTES":
        ok = all(type(x) is str for x in leaves)
        want = "strings"
    elif kind == "BOOL":
        ok = all(type(x) is bool for x in leaves)
        want = "booleans"
    elif kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        ok = all(type(x) is int for x in leaves) and (not leaves or low <= min(leaves) and max(leaves) <= high)
        want = f"integers in {low}..{high}"
    else:
        ok = all(type(x) is float or type(x) is int for x in leaves) \
            and all(math.isfinite(x) for x in leaves)
        want = "finite numbers"
    if not ok:
        raise _bad(f"input {tensor.name!r} ({kind}): data must hold {want}")
    return data
