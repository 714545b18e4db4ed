"""The package's imports run one way: no module imports, directly or through others, itself.

Imports inside functions count too: a lazy import hides a circle from Python, not from a reader.
"""

import ast
from pathlib import Path

import minivseg

PACKAGE = Path(minivseg.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """{module: the minivseg modules it imports anywhere in its source}."""
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "minivseg":  # from minivseg import data, checkpoint
                    found |= {alias.name for alias in node.names if alias.name in modules}
                elif node.module.startswith("minivseg."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
                found |= {n.split(".")[1] for n in names if n.startswith("minivseg.")}
        graph[name] = found - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with three colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_imports_inside_functions():
    graph = import_graph()
    assert "tasks" in graph["train"] and "tasks" in graph["evaluate"]
    assert "inference" in graph["tasks"]  # imported inside tubeformer_frames


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
