"""A runnable tritonserver tree, from the ``nvidia-pytriton`` wheel.

The wheel ships a complete Triton Inference Server build (``pytriton/tritonserver``) plus one Python-backend
stub per CPython minor version. We do not use PyTriton's own server wrapper (it assumes its proxy backend);
instead the shipped tree is copied once into a per-Python-version cache directory, and the stub matching the
running interpreter is dropped into ``backends/python/`` (Triton looks for it next to ``libtriton_python.so``).
The bundled shared libraries live in ``site-packages/nvidia_pytriton.libs`` (:func:`libs_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from fire_backend.defaults import cache_dir

LOGGER = logging.getLogger(__name__)
_STAMP_NAME = ".fire-backend-stamp"


class ServerTreeError(RuntimeError):
    """The tritonserver tree cannot be prepared (wheel missing, no stub for this Python)."""


def _pytriton_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerTreeError("nvidia-pytriton is not installed: pip install nvidia-pytriton==0.7.0")
    return Path(next(iter(spec.submodule_search_locations)))


def libs_dir() -> Path:
    # auditwheel puts the wheel's bundled .so files next to the package as "<dist>.libs".
    return _pytriton_root().parent / "nvidia_pytriton.libs"


def _py_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def prepare_server_tree(cache_root: Path | None = None) -> Path:
    """Return a ready-to-run copy of the wheel's tritonserver tree with this Python's stub installed.

    Built once per (Python minor version, source wheel) and rebuilt when the tree is damaged. Building
    happens in a temp dir that is renamed into place, so concurrent launchers (parallel tests) never see
    a half-copied tree.
    """
    src = _pytriton_root() / "tritonserver"
    stub_src = src / "python_backend_stubs" / _py_version() / "triton_python_backend_stub"
    binary_src = src / "bin" / "tritonserver"
    if not binary_src.is_file():
        raise ServerTreeError(f"tritonserver binary not found at {binary_src}")
    if not stub_src.is_file():
        raise ServerTreeError(
            f"no Python-backend stub for Python {_py_version()} in {stub_src.parent.parent}; "
            "use a Python version the nvidia-pytriton wheel supports"
        )
    bst, sst = binary_src.stat(), stub_src.stat()
    stamp = f"{src}|{bst.st_size}|{bst.st_mtime_ns}|{sst.st_size}|{sst.st_mtime_ns}"

    root = cache_root or cache_dir()
    # Keyed by the source too, so two venvs with the same Python never rebuild each other's live tree.
    dest = root / f"tritonserver-{_py_version()}-{hashlib.sha256(stamp.encode()).hexdigest()[:10]}"
    if _tree_ok(dest, stamp):
        return dest

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tritonserver-{_py_version()}-", dir=root))
    try:
        build = tmp / "tree"
        shutil.copytree(src, build, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        stub_dst = build / "backends" / "python" / "triton_python_backend_stub"
        shutil.copy2(stub_src, stub_dst)
        for exe in (stub_dst, build / "bin" / "tritonserver"):
            exe.chmod(0o755)
        (build / _STAMP_NAME).write_text(stamp)
        if dest.exists():
            # Damaged: move aside first (rename is atomic; rmtree of a live dir is not).
            stale = tmp / "stale"
            with contextlib.suppress(OSError):
                dest.rename(stale)
        try:
            build.rename(dest)
        except OSError:
            if not _tree_ok(dest, stamp):  # lost a race to a concurrent builder that produced a bad tree
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    LOGGER.info("prepared tritonserver tree in %s", dest)
    return dest


def _tree_ok(dest: Path, stamp: str) -> bool:
    try:
        return (
            (dest / _STAMP_NAME).read_text() == stamp
            and (dest / "bin" / "tritonserver").is_file()
            and (dest / "backends" / "python" / "triton_python_backend_stub").is_file()
            and (dest / "backends" / "python" / "libtriton_python.so").is_file()
        )
    except OSError:
        return False
