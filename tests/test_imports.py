"""The project's imports as a specification: no module imports its way back to itself (function-local imports
included); the harness imports nothing of the project outside itself, reward.py nothing of the project; and the
scripts at the top import nothing of the folders made for other users (study, teach, bench, tools, scale)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("harness", "extras", "tools", "scale", "study", "teach", "bench")


def project_modules():
    """{module name: path} of every project module: the scripts at the top and the modules of its packages."""
    mods = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for pkg in PACKAGES:
        for f in os.listdir(os.path.join(ROOT, pkg)):
            if f.endswith(".py"):
                mods[pkg if f == "__init__.py" else f"{pkg}.{f[:-3]}"] = os.path.join(ROOT, pkg, f)
    return mods


def imports(path, mods):
    """The project modules that `path` imports anywhere in it, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in mods}
    return found


def cycle(graph):
    """One import cycle of `graph` ({module: modules it imports}) as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()

    return next((c for m in sorted(graph) if m not in state and (c := visit(m))), None)


def test_the_cycle_finder_finds_a_cycle_by_hand():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_its_way_back_to_itself():
    mods = project_modules()
    graph = {m: imports(p, mods) - {m} for m, p in mods.items()}
    assert {"opgrpo_min", "reward", "harness.data", "extras.resume", "study.run"} <= set(graph)
    assert "extras.resume" in graph["opgrpo_min"]  # a function-local import is an edge too
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_bottom_layers_import_nothing_of_the_project():
    mods = project_modules()
    harness = [m for m in mods if m.split(".")[0] == "harness"]
    assert len(harness) >= 6
    for m in harness:
        assert all(n.startswith("harness") for n in imports(mods[m], mods)), m
    assert imports(mods["reward"], mods) == set()


def test_the_scripts_at_the_top_import_no_folder_made_for_other_users():
    mods = project_modules()
    top = [m for m in mods if "." not in m and m not in PACKAGES]
    assert {"opgrpo_min", "reward", "sim_train", "eval_nli", "eval_judge"} == set(top)
    for m in top:
        used = {n.split(".")[0] for n in imports(mods[m], mods)}
        assert used <= {"harness", "extras", *top}, (m, used)
