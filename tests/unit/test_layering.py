"""The layering rules (README "Layout"): each layer imports only itself and the layers below it,
every import counted (those inside functions too), and the module graph has no cycle; Ray only in
the Ray runner, fsspec only in pipeline.io, jobs never imported."""

import ast
import re
from pathlib import Path

PIPELINE = Path(__file__).parents[2] / "pipeline"

# Lowest first. A module may import its own layer and those listed before it.
LAYERS = [
    ("shared", {"config", "errors", "failpoints", "peft_format", "progress", "runners"}),
    ("linalg", {"linalg"}),
    ("io", {"io"}),
    ("flow", {"flow"}),
    ("operations", {"operations"}),
    ("entry", {"cli", "commands", "jobspec", "subspace", "adapter", "synthetic", "benchmark"}),
]
RANK = {top: i for i, (_, tops) in enumerate(LAYERS) for top in tops}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PIPELINE.rglob("*.py"):
        parts = list(path.relative_to(PIPELINE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["pipeline", *parts])] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The pipeline modules a file imports (`from pipeline import x` names module x when it is one;
    otherwise the package itself, whose only attributes are the version and the lazy API)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pipeline":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer():
    assert sorted(m for m in MODULES if m != "pipeline" and _layer(m) is None) == []


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, path in sorted(MODULES.items()):
        mine = _layer(module)
        for imported in _imports(path):
            theirs = _layer(imported)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} ({LAYERS[mine][0]}) imports {imported} ({LAYERS[theirs][0]})")
    assert upward == []


def test_no_import_cycle():
    graph = {m: {i for i in _imports(p) if i in MODULES and i != "pipeline"} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module, path):
        state[module] = 1
        for nxt in sorted(graph[module]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_io_and_linalg_are_apart_from_the_flow():
    """linalg is pure math: it imports no storage; io never imports the flow or above."""
    linalg = {m for m in MODULES if m.startswith("pipeline.linalg")}
    assert {i for m in linalg for i in _imports(MODULES[m]) if i.startswith("pipeline.io")} == set()


def test_the_store_format_is_one_module():
    """Schemas and manifest building live in pipeline.io.format, the lock in pipeline.io.lock."""
    defined = {
        name: {
            m
            for m, p in MODULES.items()
            if re.search(rf"^(class {name}\b|{name} = |def {name}\()", p.read_text(), re.M)
        }
        for name in ("LOADINGS_SCHEMA", "CATALOG_SCHEMA", "build_manifest", "manifest_problems", "encode_basis")
    }
    assert defined == {name: {"pipeline.io.format"} for name in defined}
    assert {m for m, p in MODULES.items() if re.search(r"^class WriterLock\b", p.read_text(), re.M)} == {
        "pipeline.io.lock"
    }


def _importers(module: str) -> set[str]:
    pattern = re.compile(rf"^\s*(import {module}\b|from {module}\b)", re.M)
    return {str(p.relative_to(PIPELINE)) for p in PIPELINE.rglob("*.py") if pattern.search(p.read_text())}


def test_ray_is_imported_only_by_the_ray_runner():
    assert _importers("ray") == {"runners/ray_runner.py"}


def test_fsspec_is_imported_only_by_the_io_package():
    assert all(path.startswith("io/") for path in _importers("fsspec"))


def test_the_library_never_imports_jobs():
    assert _importers("jobs") == set()
