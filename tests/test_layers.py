"""The house reads top-down: imports point down the layers and no module cycles back.

    cxr.core  <-  models  <-  tasks.images  <-  tasks.metadata, tasks.bundle  <-  tasks.training,
    tasks.scoring  <-  tasks.evaluation  <-  tasks.prefect_tasks  <-  flows, app  <-  cxr.cli

Checked on the source (every import, including the lazy ones inside functions), so a cycle
hidden behind a function-level import is found too. Beside the ranks, the design's rules:
scoring imports neither training, metadata nor evaluation; the app imports neither flows nor
training; nothing imports the CLI; no module imports another module's private name.
"""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGES = ("cxr", "models", "tasks", "flows", "app")
# Rank of each layer: a module may import only from layers of lower or equal rank.
LAYERS = {
    "cxr.core": 0, "models": 1, "tasks.images": 2, "tasks.metadata": 3, "tasks.bundle": 3,
    "tasks.training": 4, "tasks.scoring": 4, "tasks.evaluation": 5, "tasks.prefect_tasks": 6,
    "flows": 7, "app": 7, "cxr.cli": 8,
}
# (importer, imported) layer pairs that the ranks allow but the design does not.
FORBIDDEN = {
    ("tasks.scoring", "tasks.training"), ("tasks.scoring", "tasks.metadata"), ("tasks.scoring", "tasks.evaluation"),
    ("tasks.bundle", "tasks.metadata"), ("tasks.training", "tasks.scoring"), ("tasks.scoring", "tasks.prefect_tasks"),
    ("app", "flows"), ("app", "tasks.training"), ("app", "tasks.metadata"), ("app", "tasks.prefect_tasks"),
    ("flows", "app"),
}


def layer(module: str) -> str:
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def _modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            yield ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts), path


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its source)."""
    graph: dict[str, set[str]] = {}
    for module, path in _modules():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from tasks.images import cache_store` imports the submodule tasks.images.cache_store
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            targets.update(n for n in names if n.split(".")[0] in PACKAGES)
        graph[module] = targets
    known = set(graph)
    return {m: {t for t in ts if t in known and t != m} for m, ts in graph.items()}


def test_every_module_has_a_layer():
    for module, _ in _modules():
        if module not in ("cxr", "tasks"):  # the two top-level namespaces hold only their floors
            layer(module)


def test_imports_point_down_the_layers():
    wrong = []
    for m, ts in project_imports().items():
        if m in ("cxr", "tasks"):
            continue
        for t in sorted(ts):
            if t in ("cxr", "tasks"):
                continue
            lm, lt = layer(m), layer(t)
            if LAYERS[lt] > LAYERS[lm] or (lm, lt) in FORBIDDEN or (lt == "cxr.cli" and m != "cxr.cli"):
                wrong.append(f"{m} ({lm}) imports {t} ({lt})")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_a_private_name():
    wrong = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                wrong += [f"{module} imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and a.name != "__version__"]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = project_imports()
    # Package __init__ modules re-export their submodules; an edge into one is an edge into the package.
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
