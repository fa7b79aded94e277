"""Build the bundle the GPU check (benchmarks/gpu/run.sh) needs, HERE, on a machine with the project installed.

A GPU machine lent for one call has Python 3.12 and a CUDA torch, but no package index, no tritonserver, and a
numpy 2 that Triton 2.51's Python-backend stub cannot use; a call carries at most 64 MiB. So this writes, into
``.gpu-bundle/`` (git-ignored; name it in the call's ``carry``):

- ``triton.tar.xz``: the nvidia-pytriton tree slimmed to what runs: the server, the Python backend, ONE stub (the
  device's Python version), the bundled libraries without the wheel's libpython3.13; shared objects stripped.
- ``python.tar.xz``: a site-packages overlay for that Python: numpy 1.26 (first on the path, for the stub), the
  clients (tritonclient, its grpcio/protobuf), Locust and what they need, minus packages the device image
  already has (``--skip``); tests, type stubs and bytecode left out, shared objects stripped.
- ``models.tar.xz``: the digits checkpoint of the demo (trained here if missing), and the full-size BadNets
  PreActResNet18 as its fp16 weights (exact: the model was trained and published in fp16) with its metadata, a
  class-stratified random sample of the CIFAR-10 test split (the file is sorted by class), and the model's
  trigger as a ``module:function`` attack (benchmarks/gpu/triggers.py), so no stored poisoned set travels.
- ``manifest.json``: sizes and SHA-256 of the three archives.

It refuses (exit 1, with the sizes) when the bundle plus the working tree would exceed the call's limit.

    python benchmarks/gpu/bundle.py --checkpoint runs/c10-badnets --data shared/data/cifar10.npz
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / ".gpu-bundle"
#: what one device call carries at most (the working tree included)
CALL_LIMIT = 64 * 1024 * 1024
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64")
#: what the overlay must hold (versions as this project's environment has them, numpy below 2 for the stub)
REQUIREMENTS = ("numpy==1.26.4", "tritonclient[grpc,http]=={tritonclient}", "locust=={locust}")
#: distributions the device image already has, compatible with numpy 1.26 (see benchmarks/gpu/README.md)
SKIP = ("ml-dtypes", "aiohttp", "aiohappyeyeballs", "aiosignal", "attrs", "frozenlist", "multidict", "propcache",
        "yarl", "pygments", "pytest", "pluggy", "iniconfig", "jinja2", "markupsafe", "click", "werkzeug", "urllib3",
        "requests", "certifi", "idna", "charset-normalizer", "packaging", "typing-extensions", "msgpack", "psutil")
#: CIFAR-10 test images that travel: the defender's reserve plus an evaluation sample
TEST_IMAGES = 600
#: the full-size model's trigger, importable on the device (the repository root is on its path)
TRIGGER = "benchmarks.gpu.triggers:shared_badnets"
TRAIN_IMAGES = 10  # the .npz format has a training split; nothing trains on the device


def _xz(members: dict[str, Path | bytes], out: Path, strip: bool = False) -> int:
    """A .tar.xz of ``{archive name: file, folder or bytes}``; shared objects stripped of symbols if asked."""
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "s"
        for name, source in members.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(source, bytes):
                target.write_bytes(source)
            elif source.is_dir():
                shutil.copytree(source, target, symlinks=True)
            else:
                shutil.copy2(source, target)
        for junk in [*staging.rglob("__pycache__"), *staging.rglob("tests")]:
            if junk.is_dir():
                shutil.rmtree(junk, ignore_errors=True)
        for stub in staging.rglob("*.pyi"):
            stub.unlink()
        if strip and shutil.which("strip"):
            for so in [p for p in staging.rglob("*") if p.is_file() and (".so" in p.name or p.parent.name == "bin")]:
                subprocess.run(["strip", "--strip-unneeded", str(so)], capture_output=True, check=False)
        with tarfile.open(out, "w:xz", preset=9) as tar:
            for path in sorted(staging.iterdir()):
                tar.add(path, arcname=path.name)
    return out.stat().st_size


def triton_tree(out: Path) -> int:
    from fire_backend.launcher.server_tree import _pytriton_root, libs_dir

    root = _pytriton_root()
    tree = root / "tritonserver"
    members: dict[str, Path | bytes] = {"pytriton/__init__.py": root / "__init__.py"}
    for part in ("bin", "backends", "caches"):
        members[f"pytriton/tritonserver/{part}"] = tree / part
    stub = f"pytriton/tritonserver/python_backend_stubs/{DEVICE_PYTHON}/triton_python_backend_stub"
    members[stub] = root.parent / stub
    for lib in libs_dir().iterdir():
        if not lib.name.startswith("libpython3"):  # the stub links the device's own libpython
            members[f"{libs_dir().name}/{lib.name}"] = lib
    return _xz(members, out, strip=True)


def python_overlay(out: Path, skip: set[str]) -> int:
    from importlib.metadata import version

    wanted = [r.format(tritonclient=version("tritonclient"), locust=version("locust")) for r in REQUIREMENTS]
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp) / "wheels"
        platforms = [f"--platform={p}" for p in PLATFORMS]
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                        f"--python-version={DEVICE_PYTHON}", "--implementation=cp", *platforms, "-d", str(wheels),
                        *wanted], check=True)
        site = Path(tmp) / "site"
        for wheel in sorted(wheels.glob("*.whl")):
            dist = wheel.name.split("-")[0].lower().replace("_", "-")
            if dist not in skip:
                with zipfile.ZipFile(wheel) as archive:
                    archive.extractall(site)
        for unused in ("numpy/f2py", "numpy/distutils"):
            shutil.rmtree(site / unused, ignore_errors=True)
        return _xz({p.name: p for p in site.iterdir()}, out, strip=True)


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of ``n`` images, an equal share of each class, drawn at random and in random order (the file is
    class-ordered; whatever takes the first images of the sample gets every class)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = -(-n // len(classes))
    chosen = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in classes])
    return rng.permutation(chosen)[:n]


def check_trigger(stored: str, x: np.ndarray, y: np.ndarray, target: int) -> None:
    """The trigger module must reproduce the checkpoint's stored poisoned images exactly, on the whole sample."""
    from fire_backend.data import resolve_attack, to_tensor, to_uint8

    keep = y != target
    expected = to_uint8(resolve_attack(stored)(to_tensor(x[keep])))
    if not np.array_equal(to_uint8(resolve_attack(TRIGGER)(to_tensor(x[keep]))), expected):
        raise SystemExit(f"{TRIGGER} does not reproduce the poisoned images of {stored}: is this the shared BadNets "
                         "model?")


def sample_checkpoint(checkpoint: Path, data: Path, out: Path, n: int = TEST_IMAGES) -> Path:
    """A copy of the full-size checkpoint (weights linked) on a stratified sample of its test split, with the
    trigger module as its attack: what the device serves, and a quick ``fire bench --checkpoint`` here."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    with np.load(data) as arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"].astype(np.int64)
        x_train, y_train = arrays["x_train"][:TRAIN_IMAGES], arrays["y_train"][:TRAIN_IMAGES].astype(np.int64)
    keep = stratified_sample(y_test, n)
    check_trigger(meta["attack"], x_test[keep], y_test[keep], int(meta["target"]))
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "cifar10-sample.npz", x_train=x_train, y_train=y_train, x_test=x_test[keep],
                        y_test=y_test[keep])
    meta.update(attack=TRIGGER, dataset=f"npz:{(out / 'cifar10-sample.npz').resolve()}")
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "model.pt").unlink(missing_ok=True)
    (out / "model.pt").symlink_to((checkpoint / "model.pt").resolve())
    return out


def models(out: Path, checkpoint: Path, data: Path, digits: Path) -> int:
    """The digits checkpoint, the full-size model (fp16 weights + meta) and its CIFAR-10 sample."""
    import torch

    state = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True)
    half = io.BytesIO()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, half)
    restored = {k: v.half().float() if v.is_floating_point() else v for k, v in state.items()}
    if any(not torch.equal(restored[k], v) for k, v in state.items() if v.is_floating_point()):
        raise SystemExit(f"{checkpoint}: weights are not exact in fp16; this bundle would change the model")
    with tempfile.TemporaryDirectory() as tmp:
        sample = sample_checkpoint(checkpoint, data, Path(tmp) / "full")
        meta = json.loads((sample / "meta.json").read_text())
        meta["dataset"] = "npz:cifar10-sample.npz"  # run.sh points it at the sample where it unpacks it
        members: dict[str, Path | bytes] = {
            "full/model.fp16.pt": half.getvalue(),
            "full/meta.json": json.dumps(meta, indent=2).encode(),
            "full/cifar10-sample.npz": (sample / "cifar10-sample.npz").read_bytes(),
            "digits": digits,
        }
    return _xz(members, out)


def tree_size() -> int:
    """Bytes of the working tree that travels with every call (tracked and untracked, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="the full-size checkpoint (`fire import backdoorbench` of the shared BadNets model)")
    p.add_argument("--data", type=Path, required=True, help="the CIFAR-10 .npz it was trained on")
    p.add_argument("--digits", type=Path, default=None, help="a digits checkpoint (default: the demo's)")
    p.add_argument("--skip", default=",".join(SKIP), help="distributions the device already has (comma-separated)")
    p.add_argument("--out", type=Path, default=BUNDLE)
    p.add_argument("--keep", action="store_true", help="reuse triton.tar.xz and python.tar.xz already in --out")
    p.add_argument("--sample-checkpoint", type=Path, default=None, metavar="DIR",
                   help="only write the full-size checkpoint on its CIFAR-10 sample to DIR (for a quick CPU bench)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))  # the trigger module, as the device's .pth puts the repository on the path
    if args.sample_checkpoint is not None:
        print(sample_checkpoint(args.checkpoint, args.data, args.sample_checkpoint))
        return 0
    if args.digits is None:
        from fire_backend.demo import demo_checkpoint

        args.digits = demo_checkpoint(print)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {"models.tar.xz": models(args.out / "models.tar.xz", args.checkpoint, args.data, args.digits)}
    builders = {"triton.tar.xz": triton_tree,
                "python.tar.xz": lambda out: python_overlay(out, {s.strip() for s in args.skip.split(",")})}
    for name, build in builders.items():
        kept = args.keep and (args.out / name).is_file()
        sizes[name] = (args.out / name).stat().st_size if kept else build(args.out / name)
    manifest = {name: {"bytes": size, "sha256": hashlib.sha256((args.out / name).read_bytes()).hexdigest()}
                for name, size in sizes.items()}
    manifest["device_python"] = DEVICE_PYTHON
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    tree = tree_size()
    total = sum(sizes.values()) + tree
    for name, size in sizes.items():
        print(f"{name:14s} {size / 2**20:6.1f} MiB")
    print(f"working tree   {tree / 2**20:6.1f} MiB")
    print(f"total          {total / 2**20:6.1f} MiB of {CALL_LIMIT / 2**20:.0f}")
    if total > CALL_LIMIT:
        print("too large for one device call: trim --skip or the sample", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
