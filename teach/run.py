"""The teaching kit: blank the functions a student should write, then grade only what the student wrote.

    python teach/run.py list                                  # the assignable functions, points, tests, weeks
    python teach/run.py make --week 1 --out hw1               # week 1's copy: its functions (and later weeks') blanked
    python teach/run.py grade hw1 --week 1                    # points per function and a total
    python teach/run.py make --week 2 --out hw2               # week 2: students write tests (tests/test_week2.py)
    python teach/run.py grade hw2 --week 2 --seed SECRET      # the share of hidden bugs their tests catch
    python teach/run.py make --blank NAMES --out DIR          # any functions blanked; grade DIR --blank NAMES
    python teach/run.py make --blank none --plant 17 --out demo   # an in-class demo: a copy with a planted bug

make copies the project (what git tracks or would track; not runs/, .git, nor the teacher's files of TEACHER_ONLY).
Each named function keeps its decorators, signature and docstring, worked example and contract included; its body
becomes `raise NotImplementedError`. A week's copy also blanks the functions of later weeks (week_blanks), so it
hands out no solution that is not due yet. A test that would show a blanked function's body (marked
@pytest.mark.reveals("NAME")) is left out of the copy, and a link to a file the copy lacks becomes plain text.

grade takes from the copy only the def of each function the teacher names (--week or --blank: the copy's own
assignment.json is never read) and refuses a def whose decorators or default values would run code when it is
defined. The project's own tests then run in a pytest process of the teacher's (teach/referee.py); during a test of
a graded function, each call of it goes to a child process that holds the student's def among the reference code
(teach/sandbox.py, teach/child.py) and only plain data comes back (teach/wire.py), so nothing the student's code
does reaches the test, pytest or the report. Each function is graded with the reference versions of the others.
A function is worth its points in ASSIGNABLE, shared equally by its test cases: points x passed / cases; a case
that does not report is failed. A call past --case-timeout, or past --timeout for all of a function's cases, is
killed and fails. Every failing check prints the rule it checks; --verbose prints pytest's whole report.
Write everything a function needs inside it: the module's own imports are there, helpers written beside it are not.
"""

import argparse
import ast
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project
if ROOT not in sys.path:  # run as a script: the kit's modules are found from the project
    sys.path.insert(0, ROOT)
from teach.assignable import (  # noqa: E402  (the table and the source surgery that make and grade share)
    ASSIGNABLE,
    STARTER,
    STUDENT_TESTS,
    WEEKS,
    TeachError,
    blank_source,
    check_names,
    find_functions,
    parse_names,
    read,
    replace_functions,
    week_blanks,
)

MANIFEST = "assignment.json"  # written by make into the student copy for the student's eyes; grade never reads it
CASE_TIMEOUT = 15  # seconds the student's code may run in one test case (--case-timeout)
TIMEOUT = 45  # seconds the student's code may run in all the cases of one function (--timeout)
TEACHER_ONLY = (
    "runs",
    "docs/assignments.md",
    "teach/measure.py",
    "teach/mutants.py",
    "teach/planted_bugs.json",
)
BUGS = os.path.join(
    ROOT, "teach", "planted_bugs.json"
)  # {"bugs": {name: [script, old, new]}, "decoys": [...]}
FIXED_TIME = 1767225600  # 2026-01-01 00:00 UTC: the time every file of a planted copy carries


def without_revealing_tests(source, blanked):
    """A test file without the tests marked @pytest.mark.reveals(NAME) for a blanked NAME: they spell out its body."""
    cut = []
    for node in ast.parse(source).body:
        marks = [
            d
            for d in getattr(node, "decorator_list", [])
            if isinstance(d, ast.Call) and ast.unparse(d.func).endswith("mark.reveals")
        ]
        if any(isinstance(a, ast.Constant) and a.value in blanked for m in marks for a in m.args):
            cut.append((min(d.lineno for d in node.decorator_list), node.end_lineno))
    lines = source.splitlines(keepends=True)
    for first, last in sorted(cut, reverse=True):
        lines[first - 1 : last] = []
    return "".join(lines)


LINK = re.compile(r"\[([^\]]+)\]\(([^)#\s]+)(#[^)]*)?\)")


def without_broken_links(text, here, copy):
    """Markdown whose relative links to files the copy lacks become their plain text (the teacher's docs)."""

    def fix(m):
        target = m.group(2)
        if re.match(r"[a-z]+:", target) or os.path.exists(os.path.join(copy, here, target)):
            return m.group(0)
        return m.group(1)

    return LINK.sub(fix, text)


# ================================================================ make
def copied(rel):
    """Whether make copies the file at `rel` (relative to the project)."""
    parts = rel.split(os.sep)
    return not (
        rel.startswith(TEACHER_ONLY)
        or {".git", "__pycache__", ".pytest_cache"} & set(parts)
        or rel.endswith(".pyc")
    )


def project_files(root):
    """The files make copies, relative to root: what git tracks plus new files it does not ignore (without git:
    every file), less those `copied` leaves out and any student copy made inside root (its assignment.json)."""
    files = None
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True
        )
        if top.returncode == 0 and os.path.samefile(top.stdout.strip(), root):
            files = subprocess.run(
                ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pass
    if files is None:
        files = []
        for here, dirs, names in os.walk(root):
            dirs[:] = [
                d for d in dirs if copied(os.path.relpath(os.path.join(here, d), root) + os.sep)
            ]
            files += [os.path.relpath(os.path.join(here, n), root) for n in names]
    files = [f for f in files if f and copied(f) and os.path.isfile(os.path.join(root, f))]
    copies = [
        os.path.dirname(f) + os.sep
        for f in files
        if os.path.basename(f) == MANIFEST and os.sep in f
    ]
    return sorted(
        f for f in files if not f.startswith(tuple(copies))
    )  # nor student copies made inside root


def planted(texts, seed, root=ROOT):
    """The scripts in `texts` ({script: source}) with the bug that `seed` picks from teach/planted_bugs.json, among a
    seeded half of its decoys. Returns (the bug's name, the new texts). The bugs and decoys are exact snippets of the
    scripts: every one is checked, whatever the seed, and one the scripts no longer hold once is a TeachError that
    names it (the list must follow the code)."""
    path = os.path.join(root, "teach", "planted_bugs.json")
    if not os.path.isfile(path):
        raise TeachError(
            f"--plant needs the teacher's bug list {path}; it is not in a student copy"
        )
    table = json.loads(read(path))
    entries = [(f"bug {name!r}", edit) for name, edit in table["bugs"].items()]
    entries += [(f"decoy {k}", edit) for k, edit in enumerate(table["decoys"])]
    for label, (script, old, _) in entries:
        held = texts.get(script) or read(os.path.join(root, script))
        if held.count(old) != 1:
            raise TeachError(
                f"{path} is out of date: its {label} looks for {old!r} in {script}, which holds it "
                f"{held.count(old)} times, not once; update that snippet to the code"
            )
    names = sorted(table["bugs"])
    bug = names[seed % len(names)]
    rng = random.Random(seed)
    edits = [table["bugs"][bug]] + [d for d in table["decoys"] if rng.random() < 0.5]
    for script, old, new in edits:
        text = texts.setdefault(script, read(os.path.join(root, script)))
        texts[script] = text.replace(old, new)
    return bug, texts


def make(names, out, root=ROOT, plant=None, week=None):
    """Write a student copy of the project under root to `out` (new, or an empty directory) with the named functions
    blanked (none: a plain copy) and, with `plant`, a planted bug; week 2's copy also gets the starter of
    STUDENT_TESTS. Everything is checked before anything is written;
    the copy appears whole or not at all. Returns the manifest."""
    check_names(names)
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise TeachError(f"--out {out}: is a file; give a new directory")
    if os.path.isdir(out) and os.listdir(out):
        raise TeachError(
            f"--out {out}: the directory is not empty; give a new directory, so no work is overwritten"
        )
    where = find_functions(root, names)
    texts = {
        script: blank_source(
            read(os.path.join(root, script)), [n for n in names if where[n] == script]
        )
        for script in sorted(set(where.values()))
    }
    bug = None
    if plant is not None:
        bug, texts = planted(texts, plant, root)
    for script, text in texts.items():  # a copy that does not parse: our bug
        compile(text, os.path.join(out, script), "exec")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".teach-", dir=parent)
    try:
        for rel in project_files(root):
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(root, rel), os.path.join(tmp, rel))
            if rel.startswith("tests" + os.sep) and rel.endswith(".py"):
                texts[rel] = without_revealing_tests(read(os.path.join(root, rel)), names)
        if week == 2:
            texts[STUDENT_TESTS] = STARTER
        for rel, text in texts.items():
            with open(os.path.join(tmp, rel), "w", encoding="utf-8") as f:
                f.write(text)
        for rel in [f for f in project_files(root) if f.endswith(".md")]:
            with open(os.path.join(tmp, rel), "w", encoding="utf-8") as f:
                f.write(
                    without_broken_links(read(os.path.join(root, rel)), os.path.dirname(rel), tmp)
                )
        manifest = dict(
            blanked={n: where[n] for n in names}, points={n: ASSIGNABLE[n][0] for n in names}
        )
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if plant is not None:  # every file the same time: ls -lt tells nothing
            for here, dirs, files in os.walk(tmp):
                for name in dirs + files:
                    os.utime(os.path.join(here, name), (FIXED_TIME, FIXED_TIME))
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
        if plant is not None:
            os.utime(out, (FIXED_TIME, FIXED_TIME))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(manifest, bug=bug)


# ================================================================ grade: only the def is taken, and it runs apart
SAFE_ANNOTATION = (
    ast.Name,
    ast.Attribute,
    ast.Constant,
    ast.Subscript,
    ast.Tuple,
    ast.List,
    ast.Load,
)


def refusal(student, reference):
    """Why the student's def cannot be taken, or None: only what runs when a function is called is the student's,
    so a decorator the reference lacks, a default value that is no constant (a literal, or a plain name like the
    reference's COVERAGE_THRESHOLD) and an annotation that is no plain name are refused, since they run at import."""
    if type(student) is not type(reference):
        return "it is an async def; the reference is a plain def"
    theirs, ours = ([ast.dump(d) for d in f.decorator_list] for f in (student, reference))
    if theirs != ours:
        extra = [ast.unparse(d) for d in student.decorator_list if ast.dump(d) not in ours]
        return (
            f"a decorator the reference lacks (@{extra[0]})"
            if extra
            else "its decorators are not the reference's"
        )
    a = student.args
    positional = a.posonlyargs + a.args
    defaults = list(zip(positional[len(positional) - len(a.defaults) :], a.defaults))
    defaults += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
    for arg, default in defaults:
        if isinstance(default, ast.Name):
            continue
        try:
            ast.literal_eval(default)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return (
                f"the default value of {arg.arg}, `{ast.unparse(default)[:60]}`, is not a constant"
            )
    every = positional + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]
    for where, note in [(f"of {x.arg}", x.annotation) for x in every] + [
        ("of its return", student.returns)
    ]:
        if note is not None and not all(
            isinstance(n, SAFE_ANNOTATION)
            or isinstance(n, ast.BinOp)
            and isinstance(n.op, ast.BitOr)
            for n in ast.walk(note)
        ):
            return f"the annotation {where}, `{ast.unparse(note)[:60]}`, is not a plain name"
    return None


def reference_def(root, script, name):
    return next(
        n
        for n in ast.parse(read(os.path.join(root, script))).body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
    )


def students_functions(copy, where, root=ROOT):
    """({name: the source of its def in the student's copy}, {name: why it cannot be taken}) for `where`
    ({name: script}). Only the def itself is taken (decorators, signature, docstring, body), and only if it stands
    alone as that def and refusal() finds nothing."""
    found, broken = {}, {}
    for name, script in where.items():
        try:
            source = read(os.path.join(copy, script))
            tree = ast.parse(source)
        except (OSError, SyntaxError, ValueError) as e:
            broken[name] = f"{script} does not parse: {type(e).__name__}: {e}"
            continue
        defs = [
            n
            for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
        ]
        if not defs:
            broken[name] = f"no top-level def {name} in {script}"
            continue
        node = defs[-1]  # Python keeps the last
        first = min([d.lineno for d in node.decorator_list] + [node.lineno])
        text = "".join(source.splitlines(keepends=True)[first - 1 : node.end_lineno])
        try:
            alone = ast.parse(text).body
        except SyntaxError:
            alone = []
        if len(alone) != 1 or getattr(alone[0], "name", None) != name:
            broken[name] = f"the lines of def {name} in {script} are not that def alone"
            continue
        why = refusal(alone[0], reference_def(root, script, name))
        if why:
            broken[name] = f"refused: {why}"
        else:
            found[name] = text
    return found, broken


def module_with(root, script, name, source):
    """The reference `script` with the student's def of `name` in place of ours (body and comments gone first)."""
    return replace_functions(blank_source(read(os.path.join(root, script)), [name]), {name: source})


def run_referee(root, plan, seconds):
    """One pytest run of the teacher's tests under teach/referee.py: (its records, trouble, pytest's output)."""
    with tempfile.TemporaryDirectory(prefix="teach-grade-") as tmp:
        plan_path, results = os.path.join(tmp, "plan.json"), os.path.join(tmp, "results.jsonl")
        with open(plan_path, "w") as f:
            json.dump(plan, f)
        ids = [i for name in plan["functions"] for i in plan["tests"][name]]
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            os.devnull,
            "--rootdir",
            root,
            "-p",
            "teach.referee",
            *dict.fromkeys(ids),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
        env.update(TEACH_PLAN=plan_path, TEACH_RESULTS=results, PYTHONDONTWRITEBYTECODE="1")
        trouble = ""
        try:
            proc = subprocess.run(
                cmd, cwd=root, capture_output=True, text=True, timeout=seconds, env=env
            )
            output = proc.stdout + proc.stderr
            if proc.returncode not in (0, 1):  # e.g. 4: a test id of ASSIGNABLE no longer exists
                said = [line for line in output.strip().splitlines() if line.strip()]
                said = [line for line in said if line.startswith("ERROR")] or said[-1:]
                trouble = f"the grading run ended with exit status {proc.returncode}: "
                trouble += said[0][:300] if said else "no output"
        except subprocess.TimeoutExpired as e:
            output = (
                (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else ""
            )
            trouble = f"the grading run passed its {seconds:.0f} s and was stopped"
        records = []
        if os.path.isfile(results):
            for line in read(results).splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass  # a line torn by the kill
    return records, trouble, output


def rows_of(names, where, broken, records, trouble, output):
    """One row per function: dict(function, script, of, cases, passed, points, failed, note, report, timeouts).
    Its cases are those pytest collected for its tests; one that did not report is failed."""
    collected, outcome = None, {}
    for r in records:  # the referee writes the collected cases once, before any student code runs
        if collected is None and isinstance(r.get("collected"), dict):
            collected = r["collected"]
        elif collected is not None and r.get("case") in collected:
            case, before = r["case"], outcome.get(r["case"])
            if not r["passed"] and (before is None or before["passed"]):
                outcome[case] = r  # the first failure of a case decides it
            elif r["passed"] and before is None:
                outcome[case] = r
    collected = collected or {}
    if names and not collected and not trouble and all(n not in broken for n in names):
        said = output.strip().splitlines()
        raise TeachError(f"pytest collected none of the tests: {said[-1] if said else '?'}")
    rows = []
    for name in names:
        of = ASSIGNABLE[name][0]
        cases = [c for c, f in collected.items() if f == name]
        failed, timeouts, report = [], 0, []
        for case in cases:
            r = outcome.get(case)
            if r is None:
                failed.append((case, "did not report: the grading run ended before it"))
            elif not r["passed"]:
                failed.append((case, r["message"]))
                timeouts += bool(r.get("timeout"))
                report.append(
                    r.get("report", "")
                    + (f"\n---- the student's traceback\n{r['trace']}" if r.get("trace") else "")
                )
        note = broken.get(name, "")
        if name not in broken and not cases:
            note = trouble or "none of its tests ran"
        elif timeouts:
            note = f"timeout: {timeouts} case(s) ran past the time limit (an endless loop?)"
        if (
            trouble
            and name not in broken
            and any(m.startswith("did not report") for _, m in failed)
        ):
            note = (note + "; " if note else "") + trouble
        passed = len(cases) - len(failed) if name not in broken else 0
        rows.append(
            dict(
                function=name,
                script=where[name],
                of=of,
                cases=len(cases) if name not in broken else 0,
                passed=passed,
                failed=failed if name not in broken else [],
                note=note,
                points=round(of * passed / len(cases), 1) if cases and name not in broken else 0.0,
                report="\n".join(report),
                timeouts=timeouts,
            )
        )
    return rows


def grade(copy, names, root=ROOT, case_timeout=CASE_TIMEOUT, timeout=TIMEOUT, log=None):
    """Grade the functions `names` (the teacher's record: never the copy's assignment.json) of a student copy.
    Returns (rows, isolation): a row per function (rows_of) and what the student's processes dropped."""
    copy = os.path.abspath(copy)
    if not os.path.isdir(copy):
        raise TeachError(f"{copy}: no such directory")
    check_names(names)
    where = find_functions(root, names)
    found, broken = students_functions(copy, where, root)
    plan = dict(
        root=root,
        functions={
            n: dict(
                script=where[n],
                module=where[n][:-3].replace("/", "."),
                module_source=module_with(root, where[n], n, found[n]),
            )
            for n in names
            if n in found
        },
        tests={n: ASSIGNABLE[n][1] for n in names},
        limits=dict(case=case_timeout, function=timeout),
    )
    records, trouble, output = [], "", ""
    if plan["functions"]:
        seconds = 300 + len(plan["functions"]) * (
            timeout + 60
        )  # the teacher's own work, then each function
        records, trouble, output = run_referee(root, plan, seconds)
    rows = rows_of(names, where, broken, records, trouble, output)
    for row in rows:
        if log:
            log(row)
    said = {s for r in records for s in r.get("isolation", []) + r.get("warnings", [])}
    return rows, sorted(said)


# ================================================================ command line
def print_row(r):
    done = (
        "timeout"
        if r["timeouts"] and not r["passed"]
        else f"{r['passed']}/{r['cases']}"
        if r["cases"]
        else "-"
    )
    print(
        f"{r['function']:<20} {r['script']:<16} {done:>8} {r['points']:>7.1f} / {r['of']}",
        flush=True,
    )


def print_notes(rows, verbose):
    for r in rows:
        if r["note"]:
            print(f"{r['function']}: {r['note']}")
        messages = {message for _, message in r["failed"]}
        if len(r["failed"]) > 1 and len(messages) == 1:  # e.g. every case: NotImplementedError
            print(f"{r['function']}: failed all {len(r['failed'])} cases: {messages.pop()}")
        else:
            for case, message in r["failed"]:
                print(f"{r['function']}: failed {case.split('::')[1]}: {message}")
        if verbose and r["failed"] and r["report"]:
            print(f"---- {r['function']}: pytest's report\n{r['report']}")


def assigned(args):
    """The functions to grade, from the teacher's command line: --week N or --blank NAMES."""
    if (args.week is None) == (args.blank is None):
        raise TeachError(
            "name what was assigned: --week N (1-5) or --blank NAMES, as you gave make; "
            "the copy's own assignment.json is not trusted"
        )
    return list(WEEKS[args.week]) if args.week is not None else parse_names(args.blank)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="teach/run.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Points: each function's points (teach/run.py list), times the share of its test "
        "cases passed.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "list",
        help="the assignable functions, where they are, their points, weeks and the tests that grade them",
    )
    m = sub.add_parser(
        "make",
        help="write a student copy with some functions blanked (and a bug planted)",
        description="Write a student copy of the project: the named functions keep signature and "
        "docstring, their bodies raise NotImplementedError; with --plant SEED, one of the "
        "planted bugs (chosen by SEED) hides among rewrites that change nothing.",
    )
    m.add_argument("--week", type=int, help="the exercise of that week (1-5, docs/assignments.md)")
    m.add_argument(
        "--blank",
        help="functions to blank, separated by commas, 'all', or 'none' "
        "(python teach/run.py list shows them)",
    )
    m.add_argument(
        "--plant", type=int, metavar="SEED", help="plant the bug SEED picks (e.g. a student number)"
    )
    m.add_argument("--out", required=True, help="a new (or empty) directory for the student copy")
    g = sub.add_parser(
        "grade",
        help="grade a student copy: each assigned function in a process of its own",
        description="Take the assigned functions from a student copy and run this project's tests on "
        "them, each function in a fresh process of its own that only plain data leaves; print points per "
        "function. Week 2: run the student's tests against the reference and hidden bugs.",
    )
    g.add_argument("dir", help="a student copy written by teach/run.py make")
    g.add_argument("--week", type=int, help="grade that week's exercise (1-5)")
    g.add_argument("--blank", help="the functions to grade, as given to make --blank")
    g.add_argument(
        "--seed", type=int, help="week 2: the teacher's secret seed that picks the hidden bugs"
    )
    g.add_argument(
        "--mutants", type=int, default=12, help="week 2: how many hidden bugs (default 12)"
    )
    g.add_argument(
        "--case-timeout",
        type=float,
        default=CASE_TIMEOUT,
        help=f"seconds the student's code may run in one test case (default {CASE_TIMEOUT})",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT,
        help=f"seconds the student's code may run in all of one function's cases (default {TIMEOUT}); "
        "week 2: in one run of their tests",
    )
    g.add_argument(
        "--verbose",
        action="store_true",
        help="also print pytest's whole report of each failing function",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if getattr(args, "week", None) is not None and args.week not in WEEKS:
            raise TeachError(f"--week {args.week}: there are weeks {min(WEEKS)} to {max(WEEKS)}")
        if args.command == "list":
            where = find_functions(ROOT, ASSIGNABLE)
            week = {n: w for w, names in WEEKS.items() for n in names}
            for name, (points, ids) in ASSIGNABLE.items():
                when = f"week {week[name]}" if name in week else "      "
                print(f"{name:<20} {where[name]:<16} {points:>3} points  {when}  {'  '.join(ids)}")
        elif args.command == "make":
            if (args.week is None) == (args.blank is None):
                raise TeachError("say what to blank: --week N (1-5) or --blank NAMES")
            names = week_blanks(args.week) if args.week is not None else parse_names(args.blank)
            t0 = time.time()
            manifest = make(names, args.out, plant=args.plant, week=args.week)
            print(
                f"wrote {args.out}: {len(manifest['blanked'])} function(s) blanked "
                f"({', '.join(manifest['blanked']) or 'none'}) in {time.time() - t0:.1f} s; grade with "
                f"python teach/run.py grade {args.out} "
                + (f"--week {args.week}" if args.week is not None else f"--blank {args.blank}")
                + (" --seed SECRET" if args.week == 2 else "")
            )
            if manifest["bug"]:
                print(
                    f"planted for seed {args.plant}: {manifest['bug']} (teacher only: the copy does not say)"
                )
        else:
            for flag in ("case_timeout", "timeout"):
                if not getattr(args, flag) > 0:
                    raise TeachError(
                        f"--{flag.replace('_', '-')} {getattr(args, flag):g}: must be > 0 seconds"
                    )
            names = assigned(args)
            if not os.path.isdir(args.dir):
                raise TeachError(f"{args.dir}: no such directory")
            t0 = time.time()
            if args.week == 2:
                if args.seed is None:
                    raise TeachError(
                        "--week 2 needs --seed: your secret seed that picks the hidden bugs"
                    )
                from teach import mutants

                said = mutants.main_grade(args)
            else:
                print(f"{'function':<20} {'in':<16} {'passed':>8} {'points':>7}")
                rows, said = grade(
                    args.dir,
                    names,
                    case_timeout=args.case_timeout,
                    timeout=args.timeout,
                    log=print_row,
                )
                print(
                    f"{'total':<20} {'':<16} {sum(r['passed'] for r in rows):>8} "
                    f"{sum(r['points'] for r in rows):>7.1f} / {sum(r['of'] for r in rows)}"
                )
                print_notes(rows, args.verbose)
            for line in said:
                print(f"isolation: {line}")
            print(f"({time.time() - t0:.1f} s)")
    except TeachError as e:
        print(f"teach/run.py {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
