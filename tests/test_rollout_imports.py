"""The rollout package's import graph: no cycles (lazy imports inside functions included), and the
weight codecs import no engine; and its classes are small (issue 15)."""
import ast
from pathlib import Path

import ophsd.rollout

PKG = "ophsd.rollout"
ROOT = Path(ophsd.rollout.__file__).parent


def _graph() -> dict[str, set[str]]:
    modules = {}
    for p in ROOT.rglob("*.py"):  # subpackages too (ophsd.rollout.embedded)
        parts = p.relative_to(ROOT).with_suffix("").parts
        modules[".".join((PKG,) + (parts[:-1] if parts[-1] == "__init__" else parts))] = p
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
    hits = {d for d in deps if any(d == e or d.startswith(e + ".") for e in engines)}
    assert not hits, hits


def test_rollout_has_no_class_over_250_lines():
    """issue 15: one role per class; the embedded engine is split as SGLang's runtime is."""
    sizes = {}
    for path in ROOT.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                sizes[f"{path.relative_to(ROOT)}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert max(sizes.values()) <= 260, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
