"""The top-level modules import each other without a cycle, counting imports inside functions:
each file can be read (and copied) with only the modules below it."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def project_imports(path):
    """The project modules `path` imports anywhere in the file (top level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def find_cycle(graph):
    """One cycle of `graph` ({node: set of nodes}) as a list [a, b, ..., a], or None."""
    state = {}  # node -> "open" while on the stack, "done" after

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_import_cycle_among_the_top_level_modules():
    graph = {name: project_imports(path) - {name} for name, path in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_model_imports_only_torch_and_viewers_no_training_script():
    model = ast.parse((ROOT / "model.py").read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(model) if isinstance(n, ast.Import)
             for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(model) if isinstance(n, ast.ImportFrom)}
    assert roots <= {"torch"}, roots
    scripts = {"mae", "moco", "finetune", "study", "bench"}
    assert not project_imports(ROOT / "viewers.py") & scripts
