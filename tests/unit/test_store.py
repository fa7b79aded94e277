"""The direction store without Triton: commits, torn history lines, checksum failures, concurrent writers, rollback,
the follower a repair instance uses, and the estimator state a version carries."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fire_backend.fire import AugmentedEstimator, Direction, EstimatorState, RunningMean, UnpairedEstimator
from fire_backend.stores import files as file_engine
from fire_backend.stores.files import DirectionStore, StoreFollower
from fire_backend.stores.format import (
    MAGIC,
    MAGIC_LAYERED,
    SPLIT,
    DirectionSet,
    LayeredSet,
    LiveState,
    StoreError,
    validate_direction_set,
)

DIM = 6


def direction_set(seed: int, estimator: EstimatorState | None = None) -> DirectionSet:
    rng = np.random.default_rng(seed)
    beta = torch.from_numpy(rng.standard_normal(DIM).astype(np.float32))
    return DirectionSet(rng.standard_normal(DIM).astype(np.float32), [Direction(beta, 0.5, name=f"d{seed}")],
                        estimator)


@pytest.fixture
def store(tmp_path: Path) -> DirectionStore:
    store = DirectionStore(tmp_path / "store").ensure()
    store.initialize()
    return store


def files(store: DirectionStore) -> dict[str, bytes]:
    return {str(p.relative_to(store.root)): p.read_bytes() for p in sorted(store.root.rglob("*")) if p.is_file()}


def test_a_new_store_is_version_0(store: DirectionStore) -> None:
    assert store.live_version() == 0 and store.history() == [] and store.read_pointer() == (0, "")
    assert store.resolve() == LiveState(0, "", 0, (), pristine=True)


def test_commit_round_trips_the_direction_set(store: DirectionStore) -> None:
    ds = direction_set(1)
    number = store.commit(ds, "push", "tok-x", {"directions": 1})
    assert number == 1 and store.live_version() == 1
    version = store.read_version(1)
    np.testing.assert_array_equal(version.directions.center, ds.center)
    assert torch.equal(version.directions.directions[0].beta, ds.directions[0].beta)
    assert version.directions.directions[0].alpha == 0.5 and version.directions.directions[0].name == "d1"
    (entry,) = store.history()
    assert entry["action"] == "push" and entry["actor"] == "tok-x" and entry["directions"] == 1
    assert store.read_pointer() == (1, version.sha256) == (1, entry["sha256"])


def test_a_torn_history_line_is_skipped_and_the_next_commit_starts_a_fresh_line(store: DirectionStore) -> None:
    store.commit(direction_set(1), "push")
    # A crash in the middle of committing version 2: its file was written, its history line only half.
    store.version_path(2).write_bytes(store.version_path(1).read_bytes())
    with store.history_path.open("ab") as handle:
        handle.write(b'{"action": "push", "version": 2, "li')
    assert [e["version"] for e in store.history()] == [1]
    assert store.live_version() == 1
    assert store.commit(direction_set(2), "push") == 3  # version 2's number stays burnt: never reused
    assert [e["version"] for e in store.history()] == [1, 3]
    assert store.history_path.read_bytes().count(b"\n") == 3  # the torn line was closed, not glued to the next


def test_an_edited_history_line_fails_its_checksum(store: DirectionStore) -> None:
    store.commit(direction_set(1), "push")
    store.commit(direction_set(2), "push")
    lines = store.history_path.read_text().splitlines()
    forged = json.loads(lines[1])
    forged["live"] = 1  # tampered without recomputing the line checksum
    store.history_path.write_text(lines[0] + "\n" + json.dumps(forged) + "\n")
    assert [e["version"] for e in store.history()] == [1]


def test_a_corrupt_version_is_never_served(store: DirectionStore) -> None:
    store.commit(direction_set(1), "push")
    store.commit(direction_set(2), "push")
    path = store.version_path(2)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # one flipped bit of the payload
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="checksum mismatch"):
        store.read_version(2)
    assert store.live_version() == 1  # falls back to the previous committed version
    follower = StoreFollower(store)
    assert follower.poll() is True and follower.version == 1  # CURRENT names 2, which does not verify
    state = store.resolve()
    assert (state.version, state.verified) == (2, 1)
    assert any("version 2: checksum mismatch" in line for line in state.damage)
    store.repair_pointer()  # never replaces a damaged committed version by an older one
    assert store.read_pointer()[0] == 2


def test_a_partial_version_file_is_not_a_version(store: DirectionStore) -> None:
    store.version_path(5).write_bytes(b'{"magic": "x"}\n\x00\x01')
    with pytest.raises(StoreError):
        store.read_version(5)
    with pytest.raises(StoreError, match="does not exist"):
        store.read_version(9)


def test_a_crash_between_history_and_pointer_is_repaired(store: DirectionStore) -> None:
    store.commit(direction_set(1), "push")
    sha = store.read_pointer()[1]
    store.current_path.write_text(json.dumps({"version": 0, "sha256": ""}))  # the pointer was not rewritten
    store.repair_pointer()
    assert store.read_pointer() == (1, sha)


@pytest.mark.parametrize("damage", [b"", b"garbage", b'{"version": "7"}', b'{"version": 1}', b"\xff\xfe"])
def test_an_unreadable_pointer_never_drops_an_instance_to_version_0(store: DirectionStore, damage: bytes) -> None:
    """Finding 3 of issue 12: a damaged CURRENT made every repair instance apply version 0 (no defence)."""
    store.commit(direction_set(1), "push")
    store.commit(direction_set(2), "push")
    running = StoreFollower(store)
    assert running.poll() is True and running.version == 2
    store.current_path.write_bytes(damage)
    assert store.read_pointer() is None
    assert running.poll() is False and running.version == 2  # keeps what it verified
    starting = StoreFollower(store)
    assert starting.poll() is True and starting.version == 2  # the history decides
    state = store.resolve()
    assert (state.version, state.verified) == (2, 2) and "CURRENT unreadable" in state.damage
    store.repair_pointer()
    assert store.read_pointer() == (2, store.read_version(2).sha256) and store.resolve().damage == ()


def test_a_missing_pointer_defers_to_the_history(store: DirectionStore) -> None:
    store.commit(direction_set(1), "push")
    store.current_path.unlink()
    follower = StoreFollower(store)
    assert follower.poll() is True and follower.version == 1
    assert follower.poll() is False
    assert "CURRENT missing" in store.resolve().damage


def test_a_corrupt_last_history_line_keeps_the_published_version(store: DirectionStore) -> None:
    """Finding 6 of issue 12: a corrupted last history line made status say N-1 while N was served."""
    store.commit(direction_set(1), "push")
    store.commit(direction_set(2), "push")
    lines = store.history_path.read_bytes().splitlines(keepends=True)
    store.history_path.write_bytes(b"".join(lines[:-1]) + lines[-1][:20] + b"X" + lines[-1][21:])
    state = store.resolve()
    assert (state.version, state.verified) == (2, 2)
    assert state.damage == ("history line 2 torn or corrupt",)
    store.repair_pointer()
    assert store.read_pointer()[0] == 2  # not rolled back to the history's version 1
    follower = StoreFollower(store)
    assert follower.poll() is True and follower.version == 2


def test_a_truncated_live_version_is_named_and_running_instances_keep_it(store: DirectionStore) -> None:
    """Finding 6 of issue 12: a truncated live version file; status must say what instances apply, and why."""
    store.commit(direction_set(1), "push")
    store.commit(direction_set(2), "push")
    running = StoreFollower(store)
    running.poll()
    path = store.version_path(2)
    path.write_bytes(path.read_bytes()[:-40])
    state = store.resolve()
    assert (state.version, state.verified) == (2, 1)
    assert any(line.startswith("version 2: checksum mismatch") for line in state.damage)
    assert running.poll() is False and running.version == 2
    assert StoreFollower(store).poll() is True and store.live_version() == 1


def test_nothing_verifiable_keeps_what_an_instance_has(store: DirectionStore) -> None:
    store.commit(direction_set(1), "push")
    running = StoreFollower(store)
    running.poll()
    store.version_path(1).write_bytes(b"")
    store.current_path.write_bytes(b"")
    state = store.resolve()
    assert state.verified is None and "no committed version verifies" in state.damage
    assert running.poll() is False and running.version == 1


def test_the_instance_registry_lists_running_instances_only(store: DirectionStore) -> None:
    import subprocess
    import sys

    store.registry.report("fire_repair_0_0-me", 3)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = {"instance": "fire_repair_0_1-gone", "version": 2, "pid": int(dead.stdout), "host": os.uname().nodename}
    (store.instances_dir / "fire_repair_0_1-gone.json").write_text(json.dumps(stale))
    remote = {**stale, "instance": "fire_repair_0_0-remote", "host": "another-host"}
    (store.instances_dir / "fire_repair_0_0-remote.json").write_text(json.dumps(remote))
    listed = {e["instance"]: e["alive"] for e in store.instances()}
    assert listed == {"fire_repair_0_0-me": True, "fire_repair_0_0-remote": None}
    assert [e["instance"] for e in store.registry.prune()] == ["fire_repair_0_1-gone"]
    assert sorted(p.name for p in store.instances_dir.iterdir()) == ["fire_repair_0_0-me.json",
                                                                     "fire_repair_0_0-remote.json"]


def test_damage_is_reported_by_kind_once_per_distinct_damage(tmp_path: Path) -> None:
    from fire_backend.stores.damage import CHECKSUM, TORN_LINE, UNREADABLE_POINTER

    met: list[str] = []
    store = DirectionStore(tmp_path / "store", met.append).ensure()
    store.initialize()
    store.commit(direction_set(1), "push")
    store.commit(direction_set(2), "push")
    assert met == []  # a healthy store reports nothing
    # A flipped byte in version 2's payload: met on every read, reported once.
    path = store.version_path(2)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    for _ in range(3):
        assert store.resolve().verified == 1
    assert met == [CHECKSUM]
    # A torn line in the middle of the history counts; a last line still without its newline (an append in
    # progress, as a reader may see it) does not, until it is followed.
    with open(store.history_path, "ab") as handle:
        handle.write(b'{"action": "push", "ver')
    store.history()
    assert met == [CHECKSUM]
    with open(store.history_path, "ab") as handle:
        handle.write(b"\n")
    store.history()
    store.history()
    assert met == [CHECKSUM, TORN_LINE]
    store.current_path.write_bytes(b"{not json")
    assert store.read_pointer() is None and store.read_pointer() is None
    assert met == [CHECKSUM, TORN_LINE, UNREADABLE_POINTER]
    store.current_path.write_bytes(b'{"version": "2"}')  # other damage: reported again
    store.read_pointer()
    assert met == [CHECKSUM, TORN_LINE, UNREADABLE_POINTER, UNREADABLE_POINTER]
    # The same damage met by a follower (a repair instance) and without a listener: nothing breaks.
    assert StoreFollower(DirectionStore(store.root)).poll() is True


def test_committed_at_is_the_time_of_the_newest_line_that_made_a_version_live(store: DirectionStore) -> None:
    first = store.commit(direction_set(1), "push")
    store.commit(direction_set(2), "push")
    store.rollback(first)
    lines = store.history()
    assert store.committed_at(first) == lines[-1]["time"] > lines[0]["time"]
    assert store.committed_at(first, lines[0]["sha256"]) == lines[-1]["time"]
    assert store.committed_at(first, "0" * 64) is None and store.committed_at(7) is None


def test_rollback(store: DirectionStore) -> None:
    for seed in (1, 2, 3):
        store.commit(direction_set(seed), "push")
    assert store.rollback(1, "tok-op") == 1
    assert store.live_version() == 1 and store.read_pointer() == (1, store.read_version(1).sha256)
    assert store.history()[-1] == {**store.history()[-1], "action": "rollback", "version": 1, "live": 1}
    assert store.commit(direction_set(4), "push") == 4  # numbers keep growing after a rollback
    assert store.rollback(0) == 0 and store.live_version() == 0 and store.read_pointer() == (0, "")


def test_rollback_to_an_uncommitted_version_changes_nothing(store: DirectionStore) -> None:
    store.commit(direction_set(1), "push")
    before = files(store)
    with pytest.raises(StoreError, match="never committed"):
        store.rollback(7)
    assert files(store) == before


def _commit_many(root: str, worker: int, count: int, queue) -> None:
    store = DirectionStore(Path(root))
    queue.put([store.commit(direction_set(100 * worker + i), "push", f"worker-{worker}") for i in range(count)])


def test_concurrent_writers_each_get_a_distinct_version(store: DirectionStore) -> None:
    workers, count = 4, 8
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [context.Process(target=_commit_many, args=(str(store.root), w, count, queue)) for w in range(workers)]
    for p in processes:
        p.start()
    numbers = [n for _ in processes for n in queue.get(timeout=120)]
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(numbers) == list(range(1, workers * count + 1))  # every commit landed, none shared a number
    history = store.history()
    assert sorted(e["version"] for e in history) == sorted(numbers)
    for entry in history:  # each history line names the version its writer wrote
        version = store.read_version(entry["version"])
        assert version.sha256 == entry["sha256"] and version.header["actor"] == entry["actor"]
    assert store.live_version() == history[-1]["version"]


def test_the_follower_sees_each_new_version_once(store: DirectionStore) -> None:
    follower = StoreFollower(store)
    assert follower.held  # nothing verified yet: a stage refuses requests
    assert follower.poll() is True and follower.current is None and not follower.held  # a new store: version 0
    assert follower.poll() is False
    store.commit(direction_set(1), "push")
    assert follower.poll() is True and follower.version == 1
    assert follower.poll() is False
    store.rollback(0)
    assert follower.poll() is True and follower.version == 0 and follower.current is None


@pytest.mark.parametrize("kind", ["unpaired", "augmented"])
def test_estimator_state_survives_a_version(store: DirectionStore, kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    center = torch.randn(DIM, generator=g)
    if kind == "unpaired":
        estimator, clean = UnpairedEstimator(DIM, center, clean_count=5), None
        estimator.observe(poisoned=torch.randn(3, DIM, generator=g), clean=torch.randn(2, DIM, generator=g))
        state = estimator.state()
    else:
        estimator, clean = AugmentedEstimator(DIM), RunningMean(DIM, center, 5)
        estimator.observe_augmented(torch.randn(3, DIM, generator=g), [torch.randn(3, DIM, generator=g)])
        state = estimator.state(clean)
    store.commit(direction_set(1, state), "observe")
    restored, centroid = store.read_version(1).directions.estimator.restore()
    assert type(restored) is type(estimator) and restored.count == 3
    assert torch.equal(restored.direction(), estimator.direction())
    assert centroid.count == (7 if kind == "unpaired" else 5)
    more = torch.randn(2, DIM, generator=g)  # learning goes on where it stopped
    if kind == "unpaired":
        restored.observe(poisoned=more)
        estimator.observe(poisoned=more)
    else:
        restored.observe_augmented(more, [more * 0])
        estimator.observe_augmented(more, [more * 0])
    torch.testing.assert_close(restored.direction(), estimator.direction())


def test_validation_rejects_what_a_repair_must_never_apply() -> None:
    ds = direction_set(1)
    validate_direction_set(ds, DIM, 1e4, 10.0, 8)
    bad = [
        (DirectionSet(ds.center[:-1], ds.directions), "center has shape"),
        (DirectionSet(ds.center, [Direction(torch.full((DIM,), float("nan")))]), "NaN"),
        (DirectionSet(ds.center, [Direction(torch.ones(DIM), alpha=50.0)]), "alpha"),
        (DirectionSet(ds.center, [Direction(torch.zeros(DIM))]), "norm"),
        (DirectionSet(ds.center, [Direction(torch.ones(DIM))] * 9), "at most 8"),
    ]
    for candidate, message in bad:
        with pytest.raises(ValueError, match=message):
            validate_direction_set(candidate, DIM, 1e4, 10.0, 8)


def test_several_layers_commit_as_one_version_and_round_trip(store: DirectionStore) -> None:
    flagged = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    ranking = [{"layers": ["early"], "flip": 1.0, "change": 0.0, "clean_tv": 0.001, "score": 1.0}]
    layered = LayeredSet({"early": direction_set(1), "late": DirectionSet(np.ones(3, np.float32))}, flagged, ranking)
    assert store.commit(layered, "observe") == 1
    assert len(list(store.versions_dir.glob("*.fire"))) == 1 and store.live_version() == 1
    version = store.read_version(1)
    assert version.header["magic"] == MAGIC_LAYERED
    back = version.layered
    assert list(back.sets) == ["early", "late"] and back.ranking == ranking
    np.testing.assert_array_equal(back.flagged, flagged)
    assert torch.equal(back.sets["early"].directions[0].beta, layered.sets["early"].directions[0].beta)
    assert back.sets["late"].directions == [] and back.counts("late") == {"early": 1, "late": 0}
    with pytest.raises(StoreError, match="holds 2 layers"):
        _ = version.directions


def test_a_bare_set_is_committed_in_the_one_written_format_as_the_split_layer(store: DirectionStore) -> None:
    ds = direction_set(2)
    store.commit(ds, "push")
    version = store.read_version(1)
    assert version.header["magic"] == MAGIC_LAYERED and list(version.layered.at("layer4.0")) == ["layer4.0"]
    assert torch.equal(version.directions.directions[0].beta, ds.directions[0].beta)


class OneLayerFormat(LayeredSet):
    """What fire-backend wrote for one set before every version was layered: the set's arrays alone."""

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, **self.sets[SPLIT].arrays())
        return buffer.getvalue()


def test_a_version_of_the_one_layer_format_loads_as_the_split_layer(store: DirectionStore,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    ds = direction_set(3)
    with monkeypatch.context() as old_writer:
        old_writer.setattr(file_engine, "MAGIC_LAYERED", MAGIC)
        store.commit(OneLayerFormat({SPLIT: ds}), "push")
    version = store.read_version(1)
    assert version.header["magic"] == MAGIC
    assert version.directions.center.tobytes() == ds.center.tobytes()
    sets = version.layered.at("layer4.0")
    assert list(sets) == ["layer4.0"] and torch.equal(sets["layer4.0"].directions[0].beta, ds.directions[0].beta)
    store.commit(LayeredSet({"layer1.0": direction_set(4), "layer4.0": ds}), "push")
    assert store.rollback(1) == 1 and store.read_version(store.live_version()).layered.counts("layer4.0") == \
        {"layer4.0": 1}
