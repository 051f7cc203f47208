"""The rollout package's import graph: no cycles (lazy imports inside functions included), and the
weight codecs import no engine."""
import ast
from pathlib import Path

import ophsd.rollout

PKG = "ophsd.rollout"
ROOT = Path(ophsd.rollout.__file__).parent


def _graph() -> dict[str, set[str]]:
    modules = {f"{PKG}.{p.stem}" if p.stem != "__init__" else PKG: p for p in ROOT.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _cycle(graph):
    state = {}

    def visit(n, path):
        state[n] = "open"
        for d in sorted(graph[n]):
            if state.get(d) == "open":
                return path + [n, d]
            if d not in state and (found := visit(d, path + [n])):
                return found
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n, [])):
            return found
    return None


def test_rollout_has_no_import_cycle():
    assert _cycle(_graph()) is None, " -> ".join(_cycle(_graph()))


def test_weight_codecs_import_no_engine():
    deps = _graph()[f"{PKG}.weight_sync"]
    engines = {f"{PKG}.{m}" for m in ("sglang", "embedded", "serve", "server_pool", "weight_updaters", "launcher")}
    assert not deps & engines, deps & engines
