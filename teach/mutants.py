"""Exercise 2's grader, the teacher's (teach/run.py make leaves this file out of student copies): students write
tests of week 1's functions (UNDER_TEST in teach/run.py) in tests/test_week2.py; grade runs that one file against the
reference and against hidden mutants, each a copy of one function with one small change, and scores the share of
mutants that some test which passes on the reference catches.

    python teach/run.py grade hw2 --week 2 --seed SECRET [--mutants 12] [--verbose]

Mutants are made from the reference's syntax tree, not its text: every operator, comparison, constant, `min`/`max`
style call name and `if` of a function's body gives candidates (`>` -> `>=`, `+` -> `-`, 0.2 -> 1.2, `torch.min` ->
`torch.max`, ...). A candidate counts only if the project's own tests of that function catch it (so no hidden mutant
is equivalent to the reference: each one changes something a test can see), and the seed picks which of those are
hidden, in turn from each function. The seed is the teacher's secret.

The student's tests run in a child process (teach/sandbox.py, "tests" mode), a fresh one for the reference and for
each mutant: the functions under test stay in the grader's process, and each call from a test crosses as plain
data (teach/wire.py), so a test sees only what the function returns, never its code.
"""

import ast
import copy
import functools
import importlib
import json
import os
import random
import subprocess
import sys
import tempfile

from teach import assignable, sandbox

POINTS = 20  # exercise 2's points: times the share of hidden mutants caught
SWAP_BINARY = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Div,
    ast.Div: ast.Mult,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
    ast.Pow: ast.Mult,
}
SWAP_COMPARE = {
    ast.Gt: (ast.GtE, ast.Lt),
    ast.GtE: (ast.Gt,),
    ast.Lt: (ast.LtE, ast.Gt),
    ast.LtE: (ast.Lt,),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
}
SWAP_NAME = {"min": "max", "max": "min", "minimum": "maximum", "maximum": "minimum", "mean": "sum"}


# ================================================================ candidates
def changes(node):
    """The one-step changes of a node: (what it becomes, a new node or a function that edits a copy in place)."""
    out = []
    if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINARY:
        out.append(ast.BinOp(node.left, SWAP_BINARY[type(node.op)](), node.right))
    if isinstance(node, ast.Compare):
        for k, op in enumerate(node.ops):
            for new in SWAP_COMPARE.get(type(op), ()):
                ops = list(node.ops)
                ops[k] = new()
                out.append(ast.Compare(node.left, ops, node.comparators))
    if isinstance(node, ast.BoolOp):
        out.append(ast.BoolOp(ast.Or() if isinstance(node.op, ast.And) else ast.And(), node.values))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
        out.append(node.operand)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        out.append(ast.Constant(node.value + 1 if node.value != 0 else 1))
    if isinstance(node, ast.Constant) and type(node.value) is bool:
        out.append(ast.Constant(not node.value))
    if isinstance(node, ast.Attribute) and node.attr in SWAP_NAME:
        out.append(ast.Attribute(node.value, SWAP_NAME[node.attr], node.ctx))
    if isinstance(node, ast.If):
        out.append(ast.If(ast.UnaryOp(ast.Not(), node.test), node.body, node.orelse))
    return out


def put(tree, target, replacement):
    """Put `replacement` where `target` is in `tree` (in its parent's field)."""
    ast.copy_location(replacement, target)
    for parent in ast.walk(tree):
        for field, value in ast.iter_fields(parent):
            if value is target:
                setattr(parent, field, replacement)
                return
            if isinstance(value, list) and any(v is target for v in value):
                value[[v is target for v in value].index(True)] = replacement
                return
    raise ValueError("the node to change is not in the tree")


def candidates(source, name):
    """Every one-step mutant of the top-level function `name` in `source`: dicts (function, change, source)."""
    fn = next(
        n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name
    )
    body = fn.body[1:] if ast.get_docstring(fn) else fn.body
    nodes = [n for stmt in body for n in ast.walk(stmt)]
    out = []
    for k, node in enumerate(nodes):
        for new in changes(node):
            mutant = copy.deepcopy(fn)
            mutant.decorator_list = []
            mutant_nodes = [
                n for stmt in mutant.body[len(fn.body) - len(body) :] for n in ast.walk(stmt)
            ]
            put(mutant, mutant_nodes[k], copy.deepcopy(new))
            ast.fix_missing_locations(mutant)
            line = source.splitlines()[node.lineno - 1].strip()
            shown = (
                ast.unparse(node)
                if not isinstance(node, ast.If)
                else f"if {ast.unparse(node.test)}:"
            )
            becomes = (
                ast.unparse(new) if not isinstance(new, ast.If) else f"if {ast.unparse(new.test)}:"
            )
            out.append(
                dict(
                    function=name,
                    change=f"{name}: `{shown[:60]}` -> `{becomes[:60]}` in `{line[:90]}`",
                    source=ast.unparse(mutant),
                )
            )
    return out


# ================================================================ which candidates the project's tests catch
def pytest_runtestloop(session):
    """The killing run (python -m pytest -p teach.mutants, TEACH_MUTANTS set): each candidate in turn takes its
    function's place in its module, and the function's own tests run until one fails."""
    path = os.environ.get("TEACH_MUTANTS")
    if not path:
        return None
    from _pytest.runner import runtestprotocol

    with open(path) as f:
        plan = json.load(f)
    tests = {t: n for n in plan["functions"] for t in assignable.ASSIGNABLE[n][1]}
    items = {}
    for item in session.items:
        items.setdefault(tests.get(item.nodeid.split("[")[0]), []).append(item)

    def caught(name, module, fn):
        reference = getattr(module, name)
        holders = [m for m in list(sys.modules.values()) if getattr(m, name, None) is reference]
        for m in holders:
            setattr(m, name, fn)
        try:
            for item in items.get(name, []):
                if any(r.failed for r in runtestprotocol(item, nextitem=None, log=False)):
                    return True
            return False
        finally:
            for m in holders:
                setattr(m, name, reference)

    killed = []
    for name in plan["functions"]:
        module = importlib.import_module(plan["functions"][name])
        if caught(name, module, getattr(module, name)):
            killed.append(-1)  # the reference itself fails: the project's tests are broken
    for k, mutant in enumerate(plan["mutants"]):
        module = importlib.import_module(plan["functions"][mutant["function"]])
        try:
            fn = compiled(module, mutant)
        except Exception:
            continue
        if caught(mutant["function"], module, fn):
            killed.append(k)
    with open(os.environ["TEACH_KILLED"], "w") as f:
        json.dump(killed, f)
    return True


def compiled(module, mutant):
    """The mutant as a function whose globals are a copy of its module's: it calls the reference for the rest."""
    namespace = dict(vars(module))
    exec(compile(mutant["source"], f"<mutant of {mutant['function']}>", "exec"), namespace)
    return namespace[mutant["function"]]


@functools.cache
def killable(root, names):
    """The candidates of `names` that the project's own tests catch, in a stable order (one pytest run)."""
    where = assignable.find_functions(root, list(names))
    mutants = [
        m for n in names for m in candidates(assignable.read(os.path.join(root, where[n])), n)
    ]
    with tempfile.TemporaryDirectory(prefix="teach-mutants-") as tmp:
        plan = dict(functions={n: where[n][:-3].replace("/", ".") for n in names}, mutants=mutants)
        with open(os.path.join(tmp, "plan.json"), "w") as f:
            json.dump(plan, f)
        ids = [t for n in names for t in assignable.ASSIGNABLE[n][1]]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
        env.update(
            TEACH_MUTANTS=os.path.join(tmp, "plan.json"),
            TEACH_KILLED=os.path.join(tmp, "killed.json"),
            PYTHONDONTWRITEBYTECODE="1",
        )
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull]
        cmd += ["--rootdir", root, "-p", "teach.mutants", *ids]
        run = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=1800)
        try:
            with open(os.path.join(tmp, "killed.json")) as f:
                killed = json.load(f)
        except OSError:
            said = (run.stdout + run.stderr).strip().splitlines()
            raise assignable.TeachError(
                f"the mutant run failed: {said[-1] if said else run.returncode}"
            ) from None
    if -1 in killed:
        raise assignable.TeachError(
            f"the project's own tests of {', '.join(names)} fail on the reference"
        )
    return [mutants[k] for k in killed]


def hidden(root, names, seed, k):
    """The k mutants the teacher's seed hides: a seeded shuffle of each function's killable ones, taken in turn."""
    rng = random.Random(seed)
    pools = {n: [m for m in killable(root, tuple(names)) if m["function"] == n] for n in names}
    for pool in pools.values():
        rng.shuffle(pool)
    chosen = []
    while len(chosen) < k and any(pools.values()):
        for n in names:
            if pools[n] and len(chosen) < k:
                chosen.append(pools[n].pop())
    return [dict(m, id=f"M{i + 1}") for i, m in enumerate(chosen)]


# ================================================================ grading a student's tests
def child_files(root, student_tests):
    """The child's folder: the project's modules with every assignable body blanked (the functions under test stay
    with the grader), tests/conftest.py for its fixtures, and the student's test file."""
    where = assignable.find_functions(root, list(assignable.ASSIGNABLE))
    blanked = {
        script: assignable.blank_source(
            assignable.read(os.path.join(root, script)), [n for n in where if where[n] == script]
        )
        for script in set(where.values())
    }
    files = sandbox.project_modules(root, blanked)
    files["tests/conftest.py"] = assignable.read(os.path.join(root, "tests", "conftest.py"))
    files[assignable.STUDENT_TESTS] = student_tests
    return files


def grade_tests(copy, seed, k=12, root=assignable.ROOT, seconds=60, names=assignable.UNDER_TEST):
    """Week 2: dict(points, of, tests, mutants, isolation). tests: {test id: dict(on_reference, catches)};
    mutants: the hidden ones, each with the tests that caught it."""
    path = os.path.join(copy, assignable.STUDENT_TESTS)
    if not os.path.isfile(path):
        raise assignable.TeachError(f"{path}: no such file; week 2's tests are written there")
    student = assignable.read(path)
    try:
        ast.parse(student)
    except SyntaxError as e:
        return dict(points=0.0, of=POINTS, tests={}, mutants=[], isolation=[], note=f"{e}")
    mutants = hidden(root, names, seed, k)
    where = assignable.find_functions(root, list(names))
    modules = {n: importlib.import_module(where[n][:-3].replace("/", ".")) for n in names}
    reference = {n: getattr(modules[n], n) for n in names}
    setup = dict(
        mode="tests",
        tests=assignable.STUDENT_TESTS,
        under_test={n: where[n][:-3].replace("/", ".") for n in names},
    )
    files, isolation = child_files(root, student), set()

    def run(implementations):
        try:
            child = sandbox.Child(files, setup, root, seconds + 30)
        except sandbox.StudentCrash as e:
            return {}, str(e)
        isolation.update(child.isolation + child.warnings)
        try:
            outcomes = child.run_tests(implementations, seconds)
            return outcomes, "; ".join(child.errors)
        except (sandbox.StudentTimeout, sandbox.StudentCrash) as e:
            return {}, str(e)
        finally:
            child.kill()

    on_reference, trouble = run(reference)
    kept = [t for t, outcome in on_reference.items() if outcome == "passed"]
    for m in mutants:
        fns = dict(reference, **{m["function"]: compiled(modules[m["function"]], m)})
        outcomes, why = run(fns)
        m["caught_by"] = [t for t in kept if outcomes.get(t) != "passed"]
        m["note"] = why
    tests = {
        t: dict(on_reference=o, catches=[m["id"] for m in mutants if t in m["caught_by"]])
        for t, o in on_reference.items()
    }
    caught = sum(bool(m["caught_by"]) for m in mutants)
    return dict(
        points=round(POINTS * caught / len(mutants), 1) if mutants else 0.0,
        of=POINTS,
        caught=caught,
        tests=tests,
        mutants=mutants,
        isolation=sorted(isolation),
        note=trouble,
    )


def main_grade(args):
    """grade --week 2: prints each test, what it catches, the total; --verbose adds what each mutant changed."""
    result = grade_tests(args.dir, args.seed, args.mutants, seconds=args.timeout)
    names = {t: t.split("::")[-1] for t in result["tests"]}
    width = max([len(n) for n in names.values()] + [4])
    print(f"{'test':<{width}}  {'on the reference':>16}  catches")
    for t, r in result["tests"].items():
        said = " ".join(r["catches"]) or "-"
        if r["on_reference"] != "passed":
            said = "nothing: it must pass on the reference"
        print(f"{names[t]:<{width}}  {r['on_reference']:>16}  {said}")
    print(
        f"hidden mutants caught: {result.get('caught', 0)} of {len(result['mutants'])}: "
        f"{result['points']:.1f} / {result['of']}"
    )
    if result["note"]:
        print(f"tests/test_week2.py: {result['note']}")
    for m in result["mutants"]:
        if args.verbose:
            print(f"{m['id']} ({'caught' if m['caught_by'] else 'missed'}): {m['change']}")
    return result["isolation"]
