"""The house reads top-down: imports point down the layers and no module cycles back.

    cxr.{config, errors, atomic, labels}  <-  models/  <-  tasks/  <-  flows/, app/  <-  cxr.cli

Checked on the source (every import, including the lazy ones inside functions), so a cycle
hidden behind a function-level import is found too.
"""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PACKAGES = ("cxr", "models", "tasks", "flows", "app")
# Rank of each layer: a module may import only from layers of lower or equal rank.
RANK = {"base": 0, "models": 1, "tasks": 2, "flows": 3, "app": 3, "cli": 4}


def layer(module: str) -> str:
    if module == "cxr.cli":
        return "cli"
    top = module.split(".")[0]
    return "base" if top == "cxr" else top


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its source)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            targets = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    # `from tasks import cache_store` imports the submodule tasks.cache_store
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                targets.update(n for n in names if n.split(".")[0] in PACKAGES)
            graph[module] = targets
    known = set(graph)
    return {m: {t for t in ts if t in known and t != m} for m, ts in graph.items()}


def test_imports_point_down_the_layers():
    wrong = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, ts in project_imports().items() for t in sorted(ts)
             if RANK[layer(t)] > RANK[layer(m)] or (layer(t) == "cli" and m != "cxr.cli")
             or {layer(m), layer(t)} == {"flows", "app"}]
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
