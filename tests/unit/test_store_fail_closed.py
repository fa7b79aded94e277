"""Issue 25: the file store fails closed, whatever the store directory looks like.

Each fault the issue lists, on the store and the follower a repair instance uses (the same faults against the real
tritonserver under load: tests/integration/test_store_faults.py): a missing, emptied or unreadable directory, a
deleted history, a symbolic link swapped in, a version of the wrong shape, a full disk mid-commit. In every case a
running instance keeps the version it verified, a starting one holds (never version 0), the damage is named, and
removing the fault recovers without a restart. Plus what makes the store cheap to keep: compaction, request nonces,
costs read from the history's end.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fire_backend import nofollow
from fire_backend.fire import Direction
from fire_backend.stores.files import BUILD_ACTION, CURRENT, HISTORY, DirectionStore, InstanceFollower, StoreFollower
from fire_backend.stores.format import DirectionSet, LayeredSet, StoreError, fits_network
from fire_backend.stores.instances import InstanceRegistry

DIM = 6


def direction_set(seed: int, dim: int = DIM) -> DirectionSet:
    rng = np.random.default_rng(seed)
    beta = torch.from_numpy(rng.standard_normal(dim).astype(np.float32))
    return DirectionSet(rng.standard_normal(dim).astype(np.float32), [Direction(beta, 0.5, name=f"d{seed}")])


@pytest.fixture
def store(tmp_path: Path) -> DirectionStore:
    store = DirectionStore(tmp_path / "store")
    store.initialize()
    store.commit(direction_set(1), "push")
    store.commit(direction_set(2), "push")
    return store


def running(store: DirectionStore) -> StoreFollower:
    follower = StoreFollower(store)
    assert follower.poll() is True and follower.version == 2 and not follower.held
    return follower


def assert_kept(follower: StoreFollower, version: int = 2) -> None:
    """Whatever the store looks like, the running instance keeps what it verified, and says it is degraded."""
    follower.poll()
    follower.recheck()
    assert follower.version == version and follower.current is not None and follower.degraded


def test_a_missing_store_directory_never_means_version_0_and_is_never_recreated(store: DirectionStore) -> None:
    """The issue's first finding: `mv store store.away` made every instance serve version 0 within a second."""
    follower = running(store)
    away = store.root.with_name("store.away")
    store.root.rename(away)
    assert_kept(follower)
    state = store.resolve()
    assert (state.version, state.verified) == (None, None) and state.damage == ("store directory missing",)
    starting = StoreFollower(store)
    assert starting.poll() is False and starting.held and starting.current is None  # holds, never version 0
    InstanceFollower(store, "fire_ensemble_0_0-1").close()
    store.follower("fire_ensemble_0_1-1")  # what a starting stage does
    with pytest.raises(StoreError, match="store directory missing"):
        store.commit(direction_set(3), "push")
    assert not store.root.exists()  # nobody re-created it
    away.rename(store.root)  # the volume comes back: recovery without a restart
    assert starting.poll() is True and starting.version == 2 and not starting.held
    follower.recheck()
    assert follower.version == 2 and not follower.degraded


def test_an_emptied_store_is_damage(store: DirectionStore) -> None:
    follower = running(store)
    saved = store.root.with_name("saved")
    shutil.copytree(store.root, saved)
    for path in store.root.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert_kept(follower)
    assert store.resolve().damage == ("store directory empty (no CURRENT, history.jsonl or versions/)",)
    assert StoreFollower(store).poll() is False
    shutil.rmtree(store.root)
    saved.rename(store.root)
    follower.recheck()
    assert not follower.degraded


def test_a_deleted_history_is_named_and_the_verified_pointer_kept(store: DirectionStore) -> None:
    follower = running(store)
    history = store.history_path.read_bytes()
    store.history_path.unlink()
    assert_kept(follower)
    state = store.resolve()
    assert (state.version, state.verified) == (2, 2) and f"{HISTORY} missing" in state.damage
    assert StoreFollower(store).poll() is True  # CURRENT names a version that verifies: a new instance applies it
    store.history_path.write_bytes(history)
    assert store.resolve().damage == ()


def test_a_store_that_looks_new_never_drops_a_running_instance_to_0(store: DirectionStore) -> None:
    follower = running(store)
    store.history_path.write_bytes(b"")
    for version in store.versions_dir.iterdir():
        version.unlink()
    store.current_path.write_text(json.dumps({"version": 0, "sha256": ""}))
    assert store.resolve().pristine
    assert_kept(follower)
    assert any("looks new" in line for line in follower.damage)


def test_only_a_rollback_to_0_drops_an_instance_to_0(store: DirectionStore) -> None:
    follower = running(store)
    store.current_path.write_text(json.dumps({"version": 0, "sha256": ""}))  # a forged pointer: not a rollback
    assert_kept(follower)
    assert "CURRENT names version 0, the history version 2" in store.resolve().damage
    store.rollback(0)
    assert follower.poll() is True and follower.version == 0 and not follower.degraded


def unreadable(path: Path) -> None:
    """Mode 000, and for root an owner outside the user namespace the reader runs in (root ignores mode bits)."""
    os.chmod(path, 0)
    if os.geteuid() == 0:
        os.chown(path, 12345, 12345)


READ_AS_SERVER = """
import json, sys
from fire_backend.stores.files import DirectionStore
state = DirectionStore(sys.argv[1]).resolve()
print(json.dumps([state.version, state.verified, list(state.damage)]))
"""


def test_a_store_with_permissions_000_is_named_unreadable(store: DirectionStore) -> None:
    """As `fire serve` runs Triton: in a user namespace (unshare -Ur), where root's override of the mode bits does
    not reach an unmapped owner; an ordinary user needs no namespace."""
    command = [sys.executable, "-c", READ_AS_SERVER, str(store.root)]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(["unshare", "-Ur", "true"]).returncode:
            pytest.skip("root without user namespaces cannot be refused by mode bits")
        command = ["unshare", "-Ur", *command]
    unreadable(store.root)
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=60)
    finally:
        os.chown(store.root, os.getuid(), os.getgid())
        os.chmod(store.root, 0o755)
    version, verified, damage = json.loads(out.stdout)
    assert (version, verified) == (None, None) and damage == ["store directory unreadable (Permission denied)"]


@pytest.mark.parametrize("name", [CURRENT, HISTORY, "versions"])
def test_a_symbolic_link_swapped_in_is_never_followed(store: DirectionStore, tmp_path: Path, name: str) -> None:
    follower = running(store)
    elsewhere = tmp_path / f"elsewhere-{name}"
    (store.root / name).rename(elsewhere)
    (store.root / name).symlink_to(elsewhere)  # the same content, through a link
    assert_kept(follower)
    state = store.resolve()
    assert any("symbolic link" in line for line in state.damage), state.damage
    before = elsewhere.read_bytes() if elsewhere.is_file() else None
    if name == HISTORY:
        with pytest.raises(StoreError, match="symbolic link"):
            store.commit(direction_set(3), "push")
        assert elsewhere.read_bytes() == before  # nothing appended through the link
    (store.root / name).unlink()
    elsewhere.rename(store.root / name)
    follower.recheck()
    assert not follower.degraded and store.resolve().damage == ()


def test_a_dangling_lock_link_is_refused_not_created(store: DirectionStore, tmp_path: Path) -> None:
    (store.root / ".lock").unlink(missing_ok=True)
    target = tmp_path / "created-through-the-link"
    (store.root / ".lock").symlink_to(target)
    with pytest.raises(StoreError, match="symbolic link"):
        store.commit(direction_set(3), "push")
    assert not target.exists() and store.resolve().version == 2


def test_a_full_disk_mid_commit_leaves_nothing_half_committed(store: DirectionStore,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem double (ENOSPC from a chosen write); the real full disk runs on a tmpfs in
    tests/integration/test_store_faults.py. The issue found a push reported failed that was committed."""
    before = {p.name: p.read_bytes() for p in store.root.rglob("*") if p.is_file() and p.parent.name != "nonces"}
    replace = nofollow.Directory.replace

    def full(self, relative: str, data: bytes, durable: bool = True) -> None:
        if relative == CURRENT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        replace(self, relative, data, durable)

    monkeypatch.setattr(nofollow.Directory, "replace", full)  # the history line lands, CURRENT does not
    with pytest.raises(StoreError, match="no space left on the device; nothing was committed"):
        store.commit(direction_set(3), "push")
    after = {p.name: p.read_bytes() for p in store.root.rglob("*") if p.is_file() and p.parent.name != "nonces"}
    assert after == before  # the history line truncated back, the version file removed
    append = nofollow.Directory.append

    def full_append(self, relative: str, line: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nofollow.Directory, "append", full_append)
    with pytest.raises(StoreError, match="nothing was committed"):
        store.commit(direction_set(3), "push")
    monkeypatch.setattr(nofollow.Directory, "append", append)
    monkeypatch.setattr(nofollow.Directory, "replace", replace)
    assert store.commit(direction_set(3), "push") == 3  # the disk has room again: the next commit lands


def test_an_append_that_fails_midway_truncates_its_partial_line(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    files = nofollow.Directory(tmp_path)
    (tmp_path / "log").write_bytes(b"one\n")
    write = os.write
    calls = []

    def partial(fd: int, data) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return write(fd, bytes(data)[:3])  # a short write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", partial)
    with pytest.raises(OSError):
        files.append("log", b"two-two\n")
    monkeypatch.setattr(os, "write", write)
    assert (tmp_path / "log").read_bytes() == b"one\n"


def two_layer_fits():
    return fits_network({"block1": 4, "block2": DIM}, "block2", 1e4, 10.0, 8)


def test_a_version_of_the_wrong_shape_is_named_never_applied_and_never_blocks_a_start(tmp_path: Path) -> None:
    """Two repositories with different layers on one store: one's versions are damage to the other, never a dead
    watcher thread (the issue: 'direction has 2047 values; the latent has 2048')."""
    served = DirectionStore(tmp_path / "store", fits=two_layer_fits())
    served.initialize()
    served.commit(direction_set(1), "push")
    follower = StoreFollower(served)
    assert follower.poll() is True and follower.version == 1
    other = DirectionStore(tmp_path / "store")  # another repository's control endpoint: no such check
    other.commit(direction_set(2, dim=DIM - 1), "push")
    assert follower.poll() is False and follower.version == 1
    assert follower.damage == ("version 2 does not fit the served network (block2: center has shape (5,); the latent "
                               "has 6 values); not served",)
    state = served.resolve()
    assert (state.version, state.verified) == (2, 1)
    starting = StoreFollower(served)
    assert starting.poll() is True and starting.version == 1  # starts on the newest version that fits
    with pytest.raises(StoreError, match="does not fit the served network"):
        served.commit(LayeredSet({"block3": direction_set(3)}), "push")
    with pytest.raises(StoreError, match="does not fit"):
        served.rollback(2)


def test_request_nonces_are_claimed_once_on_any_server_and_expire(store: DirectionStore) -> None:
    assert store.claim_nonce("n-1", ttl_s=120) is True
    assert store.claim_nonce("n-1", ttl_s=120) is False  # a replay
    assert DirectionStore(store.root).claim_nonce("n-1", ttl_s=120) is False  # another server, or a restart
    (claimed,) = [p for p in (store.root / "nonces").iterdir()]
    os.utime(claimed, (time.time() - 300, time.time() - 300))
    fresh = DirectionStore(store.root)
    assert fresh.claim_nonce("n-2", ttl_s=120) is True
    assert not claimed.exists()  # pruned past its time to live
    shutil.rmtree(store.root / "nonces")
    assert fresh.claim_nonce("n-3", ttl_s=120) is True  # a store written before nonces: the folder is made
    store.root.rename(store.root.with_name("away"))
    with pytest.raises(StoreError, match="cannot be recorded"):
        fresh.claim_nonce("n-4", ttl_s=120)


def test_compaction_keeps_the_newest_versions_files_and_every_history_line(tmp_path: Path) -> None:
    store = DirectionStore(tmp_path / "store", retain=3)
    store.initialize()
    store.commit(direction_set(1), BUILD_ACTION)  # `fire repo build --flagged`: the repository's starting point
    for seed in range(2, 41):
        store.commit(direction_set(seed), "push")
    kept = sorted(int(p.stem) for p in store.versions_dir.glob("*.fire"))
    assert kept[0] == 1 and kept[-3:] == [38, 39, 40] and len(kept) <= 1 + 3 + 16 and 2 not in kept
    assert len(store.history()) == 40 and store.resolve().damage == ()
    with pytest.raises(StoreError, match="does not exist"):
        store.rollback(2)
    store.rollback(1)  # the build version is always there to go back to
    store.rollback(39)
    assert store.commit(direction_set(41), "push") == 41  # numbers are never reused
    (store.root / f"{nofollow.TMP_PREFIX}left-by-a-crash").write_bytes(b"x")
    os.utime(store.root / f"{nofollow.TMP_PREFIX}left-by-a-crash", (0, 0))
    store.compact()
    assert not (store.root / f"{nofollow.TMP_PREFIX}left-by-a-crash").exists()


def test_a_commit_reads_the_history_from_its_end(store: DirectionStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Push cost flat in the history's length: a commit never reads the whole history (the benchmark
    benchmarks/store_push.py measures it)."""
    for seed in range(3, 200):
        store.commit(direction_set(seed), "push")
    monkeypatch.setattr(DirectionStore, "_read_history", lambda self: pytest.fail("read the whole history"))
    assert store.commit(direction_set(200), "push") == 200
    assert store.resolve().version == 200 and store.committed_at(200) is not None
    follower = StoreFollower(store)
    assert follower.poll() is True and follower.version == 200


def test_an_instance_records_itself_beside_the_store_and_a_failed_record_fails_nothing(tmp_path: Path) -> None:
    registry = InstanceRegistry(tmp_path / "instances")
    store = DirectionStore(tmp_path / "store", registry=registry)
    store.initialize()
    store.commit(direction_set(1), "push")
    follower = store.follower("fire_ensemble_0_0-1")
    assert follower.poll() is True
    assert follower.report() is True and follower.report() is False  # written once per change
    (entry,) = registry.entries()
    assert (entry["version"], entry["held"], entry["degraded"], entry["alive"]) == (1, False, False, True)
    shutil.rmtree(tmp_path / "instances")
    (tmp_path / "instances").write_text("not a folder")  # the record cannot be written
    store.commit(direction_set(2), "push")
    assert follower.poll() is True and follower.version == 2  # applying never depended on the record
    with pytest.raises(OSError):
        follower.report()


def test_stale_entries_of_this_host_are_pruned_when_an_instance_starts(tmp_path: Path) -> None:
    registry = InstanceRegistry(tmp_path / "instances")
    store = DirectionStore(tmp_path / "store", registry=registry)
    store.initialize()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    for i in range(5):
        registry.report(f"gone-{i}", 1)
        path = tmp_path / "instances" / f"gone-{i}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "pid": int(dead.stdout)}))
    store.follower("fire_ensemble_0_0-1")
    assert registry.entries() == []
