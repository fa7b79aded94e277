"""The stub health keeper without tritonserver: the control-block layout checks, and which stubs a round keeps.
(A stub stopped under load on the real server: tests/security/test_supervision.py.)"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest

from fire_backend.launcher.stub_health import StubHealthKeeper, control_block_problem, stub_args
from fire_backend.procfs import Process

BINARY = "/opt/tritonserver/backends/python/triton_python_backend_stub"
HANDLE = 336
REGION_BYTES = 1 << 20


def control_block(stub_health: int = 0, kind: int = 0x90, handles: tuple[int, ...] = (496, 8688, 16880, 25072, 33264),
                  refcount: int = 1) -> bytes:
    """The ownership header and an IPCControlShm as Triton 2.51 lays them out (read off a live server)."""
    header = struct.pack("<I12x", refcount)
    stub_mutex = bytearray(40)
    stub_mutex[16:20] = struct.pack("<i", kind)
    return header + struct.pack("<4B4x40s40s5q", stub_health, 0, 0, 0, bytes(40), bytes(stub_mutex), *handles)


def argv(region: str, instance: str = "fire_ensemble_0_0", handle: int = HANDLE) -> tuple[str, ...]:
    return (BINARY, "/repo/models/fire_ensemble/1/model.py", region, str(REGION_BYTES), str(REGION_BYTES), "4242",
            "/opt/tritonserver/backends/python", str(handle), instance, "DEFAULT")


@pytest.fixture
def regions(tmp_path: Path) -> Path:
    for name in ("good", "zombie", "odd"):
        data = bytearray(REGION_BYTES)
        block = control_block(kind=0 if name == "odd" else 0x90)
        data[HANDLE:HANDLE + len(block)] = block
        (tmp_path / name).write_bytes(bytes(data))
    return tmp_path


def flag(regions: Path, name: str) -> int:
    return (regions / name).read_bytes()[HANDLE + 16]


def test_a_control_block_of_triton_2_51_reads_as_one() -> None:
    assert control_block_problem(control_block(), REGION_BYTES) is None
    assert control_block_problem(control_block(stub_health=1), REGION_BYTES) is None


@pytest.mark.parametrize(("block", "why"), [
    (control_block(refcount=0), "reference count"),
    (control_block(stub_health=7), "not booleans"),
    (control_block(kind=0), "not robust"),
    (control_block(handles=(496, 8688, 16880, 25072, REGION_BYTES + 8)), "do not lie"),
    (control_block(handles=(496, 496, 16880, 25072, 33264)), "do not lie"),
    (control_block()[:40], "too short"),
])
def test_anything_else_is_left_alone(block: bytes, why: str) -> None:
    assert why in (control_block_problem(block, REGION_BYTES) or "")


def test_a_stubs_command_line_says_what_it_serves() -> None:
    stub = stub_args(Process(7, "S", argv("fire-0-ab-region"), 0))
    assert stub is not None
    assert (stub.model, stub.region, stub.control, stub.instance) == ("fire_ensemble", "fire-0-ab-region", HANDLE,
                                                                      "fire_ensemble_0_0")
    assert stub_args(Process(8, "S", ("/usr/bin/python3", "-c", "pass"), 0)) is None
    assert stub_args(Process(9, "S", argv("r")[:5], 0)) is None


def test_a_round_keeps_every_stub_that_has_not_exited(regions: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stopped stub (T) is kept like a running one; a zombie never (tritonserver must see it die); a control block
    that does not read as Triton 2.51's is left alone, with one warning."""
    processes = [Process(10, "T", argv("good"), 0), Process(11, "Z", argv("zombie"), 0),
                 Process(12, "S", argv("odd", "fire_control_0_0"), 0), Process(13, "S", ("/bin/sh",), 0)]
    keeper = StubHealthKeeper(4242, lambda region: regions / region, processes=lambda pid: processes)
    with caplog.at_level(logging.WARNING):
        assert keeper.tend() == {10}
        assert keeper.tend() == {10}
    assert (flag(regions, "good"), flag(regions, "zombie"), flag(regions, "odd")) == (1, 0, 0)
    assert sum("fire_control_0_0" in r.getMessage() for r in caplog.records) == 1
    processes[0] = Process(10, "Z", argv("good"), 0)  # the kept stub died: the next round leaves it
    (regions / "good").write_bytes((regions / "good").read_bytes()[:HANDLE + 16] + b"\0"
                                   + (regions / "good").read_bytes()[HANDLE + 17:])
    assert keeper.tend() == set() and flag(regions, "good") == 0
