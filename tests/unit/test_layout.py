"""The package's shape, checked: no import circles, the library never imports the CLI, each process's package (the
Triton stubs, the launcher, the HTTP front, the repository builder, the stores, the wire layer) imports only what
its process runs, no package outgrows its share, and each wire name is spelled once (in fire_backend.wire)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fire_backend.wire import names, token

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "fire_backend"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(path: Path, known: set[str]) -> set[str]:
    """The package modules a file imports, anywhere in it (module level, in functions, under TYPE_CHECKING)."""
    base = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names_ = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join(base.split(".")[: len(base.split(".")) - node.level + 1] + [module]).strip(".")
            names_ = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names_:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_no_import_circles() -> None:
    graph = import_graph()
    # A package's __init__ that only re-exports its own submodules is not a circle of code.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    circles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert circles == [], "\n".join(" -> ".join(c) for c in circles)


def test_only_the_cli_imports_the_cli() -> None:
    offenders = {name: sorted(t for t in targets if t == "fire_backend.cli" or t.startswith("fire_backend.cli."))
                 for name, targets in import_graph().items() if not name.startswith("fire_backend.cli")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_wire_layer_imports_only_itself_and_the_torch_free_defaults() -> None:
    allowed = {"fire_backend.defaults", "fire_backend.wire"}
    for name, targets in import_graph().items():
        if name.startswith("fire_backend.wire"):
            stray = {t for t in targets if not t.startswith("fire_backend.wire.")} - allowed
            assert not stray, f"{name} imports {sorted(stray)}"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, **env}, check=False)


STUB = """
import sys, types
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")  # a stub's own module
import {entry}
loaded = sorted({{m for m in sys.modules for p in {forbidden!r} if m == p or m.startswith(p + ".")}})
print("LOADED", loaded)
"""
#: what a stub process must never load: another process's code, or the offline tools
STUB_NEVER_LOADS = ("fire_backend.launcher", "fire_backend.front", "fire_backend.repository.build",
                    "fire_backend.offline", "fire_backend.cli", "fire_backend.loadtest")


@pytest.mark.parametrize("entry", ["fire_backend.stub.triton_models", "fire_backend.serving.triton_models"])
def test_a_stub_loads_only_what_runs_inside_tritonserver(entry: str) -> None:
    """Through the entry point built repositories name (``fire_backend.serving.triton_models`` in those built before
    the package was laid out by process: it must keep loading)."""
    proc = run_python(STUB.format(entry=entry, forbidden=STUB_NEVER_LOADS))
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout, proc.stdout


def test_the_old_entry_point_is_the_stub_s_own() -> None:
    proc = run_python('import sys, types\nsys.modules["triton_python_backend_utils"] = types.ModuleType("pb")\n'
                      "from fire_backend.serving import triton_models as old\n"
                      "from fire_backend.stub import triton_models as new\n"
                      "names = [n for n in dir(new) if n.endswith('Model') and not n.startswith('_')]\n"
                      "print('SAME', bool(names) and all(getattr(old, n) is getattr(new, n) for n in names))")
    assert "SAME True" in proc.stdout, proc.stdout + proc.stderr


# -- the package by process -----------------------------------------------------------------------
#: package -> packages (or modules) it must never import, anywhere in its code: each process loads its own code
#: only. The stub reads a built repository through repository.layout alone; the builder and the launcher run none
#: of the stub's code; the stores know nothing of serving.
NEVER_IMPORTS = {
    "fire_backend.stub": ("fire_backend.launcher", "fire_backend.front", "fire_backend.repository.build",
                          "fire_backend.offline", "fire_backend.cli", "fire_backend.loadtest"),
    "fire_backend.repository": ("fire_backend.stub", "fire_backend.launcher", "fire_backend.front",
                                "fire_backend.cli"),
    "fire_backend.launcher": ("fire_backend.stub", "fire_backend.repository.build", "fire_backend.offline",
                              "fire_backend.cli", "fire_backend.loadtest"),
    "fire_backend.front": ("fire_backend.stub", "fire_backend.launcher", "fire_backend.repository",
                           "fire_backend.stores", "fire_backend.cli"),
    "fire_backend.stores": ("fire_backend.stub", "fire_backend.launcher", "fire_backend.front",
                            "fire_backend.repository", "fire_backend.offline", "fire_backend.cli",
                            "fire_backend.models"),
}
#: no package (with its subpackages) holds more than this share of the package's lines
MAX_PACKAGE_SHARE = 0.15


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def rule_breaches(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{name} imports {target}" for name, targets in graph.items() for target in targets
                  for package, never in NEVER_IMPORTS.items() if within(name, package)
                  for banned in never if within(target, banned))


def test_each_process_package_imports_only_what_its_process_runs() -> None:
    assert rule_breaches(import_graph()) == []


def test_the_rule_check_finds_a_stub_importing_the_launcher() -> None:
    graph = {"fire_backend.stub.stages": {"fire_backend.launcher.server", "fire_backend.repository.layout"},
             "fire_backend.repository.build": {"fire_backend.stub.controller"}}
    assert rule_breaches(graph) == ["fire_backend.repository.build imports fire_backend.stub.controller",
                                    "fire_backend.stub.stages imports fire_backend.launcher.server"]


def package_shares() -> dict[str, float]:
    """Each package's share of the package's lines, its subpackages included (the root: its own modules)."""
    lines = {path: len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    total = sum(lines.values())
    shares = {}
    for folder in {path.parent for path in lines}:
        inside = folder.rglob("*.py") if folder != PACKAGE else folder.glob("*.py")
        shares[".".join(folder.relative_to(ROOT).parts)] = sum(lines[p] for p in inside) / total
    return shares


def test_no_package_holds_more_than_its_share_of_the_code() -> None:
    shares = package_shares()
    assert len(shares) >= 10, shares
    big = {name: f"{share:.1%}" for name, share in shares.items() if share > MAX_PACKAGE_SHARE}
    assert big == {}


FROZEN = """
import gc, sys, types
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
from fire_backend.stub import triton_models

class Built:  # a stage double: what a stage builds at load stays referenced by the model
    def __init__(self, args, pb_utils):
        self.held = [[i] for i in range(50_000)]

class Model(triton_models._Model):
    stage_class = Built

before = gc.get_freeze_count()
model = Model()
model.initialize({})
print("FROZEN", gc.get_freeze_count() - before)
"""


def test_a_stub_freezes_what_its_stage_built_out_of_the_collector() -> None:
    """A full collection walking the stage's load-time objects paused serving for 85 ms (RESULTS.md)."""
    proc = run_python(FROZEN)
    assert proc.returncode == 0, proc.stderr
    frozen = int(proc.stdout.split("FROZEN")[1])
    assert frozen >= 50_000, proc.stdout


TORCH_FREE = {
    "fire infer": "from fire_backend.cli import main\n"
                  "code = main(['infer', '--url', 'grpc://127.0.0.1:{port}', '--digits', '2'])\n"
                  "assert code == 2, code",
    "fire ctl": "from fire_backend.cli import main\n"
                "code = main(['ctl', '--url', '127.0.0.1:{port}', 'status', '--json'])\n"
                "assert code == 2, code",
    "clients/infer.py": "import runpy\n"
                        "sys.argv = ['clients/infer.py', '--url', 'http://127.0.0.1:{port}', '--digits', '1']\n"
                        "try:\n    runpy.run_path('clients/infer.py', run_name='__main__')\n"
                        "except SystemExit as exc:\n    assert exc.code == 2, exc.code",
    "the Locust users": "import runpy\nrunpy.run_path('loadtest/locustfile.py')\n"
                        "from fire_backend.loadtest.users import FireGrpcUser, FireHttpUser",
}


@pytest.mark.parametrize("what", sorted(TORCH_FREE))
def test_client_side_runs_without_torch(what: str) -> None:
    """The client side (nothing listens at the port: the command fails cleanly) never imports torch."""
    from fire_backend.launcher.ports import free_port

    code = "import sys\n" + TORCH_FREE[what].format(port=free_port()) + "\n" \
           "print('TORCH', 'torch' in sys.modules)\n"
    proc = run_python(code, FIRE_CONTROL_TOKEN="t", FIRE_CONTROL_TOKEN_FILE="")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH False" in proc.stdout, proc.stdout + proc.stderr


# -- wire literals ----------------------------------------------------------------------------------

#: every name two processes must agree on, with the constant that holds it (the first, for aliases)
WIRE_NAMES: dict[str, str] = {}
for _module in (names, token):
    for _name, _value in vars(_module).items():
        if _name.isupper() and isinstance(_value, str) and re.fullmatch(r"[A-Za-z_]+", _value):
            WIRE_NAMES.setdefault(_value, _name)
#: distinctive enough to look for inside any text (tensor names like LABEL are only checked as whole strings)
DISTINCT = [v for v in WIRE_NAMES if "_" in v and (v.islower() or v.startswith("FIRE_"))]
SCANNED = [PACKAGE, ROOT / "benchmarks", ROOT / "clients", ROOT / "loadtest", ROOT / "scripts"]
#: (file, text) of strings that spell a wire name for another reason
ALLOWED = {("fire_backend/launcher/server.py", "TOKEN")}  # a marker of secret variable names, redacted from logs


def string_constants(path: Path):
    """(line, text) of every string constant and f-string piece that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def stray_wire_literals() -> list[str]:
    found = []
    for root in SCANNED:
        for path in sorted(root.rglob("*.py")):
            if PACKAGE / "wire" in path.parents:
                continue
            for line, text in string_constants(path):
                hits = {text} & set(WIRE_NAMES) or {v for v in DISTINCT if re.search(rf"\b{v}\b", text)}
                hits -= {allowed for file, allowed in ALLOWED if path == ROOT / file}
                found += [f"{path.relative_to(ROOT)}:{line}: {hit!r} (use wire.{WIRE_NAMES[hit]})" for hit in hits]
    return found


def test_wire_names_are_spelled_only_in_the_wire_package() -> None:
    assert stray_wire_literals() == []


def test_the_literal_check_finds_a_stray_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('"""fire_bypass in a docstring is prose."""\n'
                      'NAME = "fire_bypass"\n'
                      'HELP = f"set {x} FIRE_CONTROL_TOKEN"\n')
    monkeypatch.setattr(sys.modules[__name__], "SCANNED", [tmp_path])
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert sorted(stray_wire_literals()) == ["sample.py:2: 'fire_bypass' (use wire.BYPASS_PARAMETER)",
                                             "sample.py:3: 'FIRE_CONTROL_TOKEN' (use wire.TOKEN_ENV)"]
