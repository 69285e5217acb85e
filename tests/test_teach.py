"""teach/run.py as a specification: the full project scores full marks, a copy with every assignable function blanked
scores zero, blanking any one function costs points, nothing of a student's files but the assigned functions takes
part in grading, every failing check names its rule, planted copies cannot be told apart by diff or by file times,
and bad input ends in one line. Grading runs pytest in a fresh copy of the project: the file takes a few minutes."""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

from teach import run as teach

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def all_blanked(tmp_path_factory):
    out = tmp_path_factory.mktemp("copies") / "all_blanked"
    teach.make(list(teach.ASSIGNABLE), str(out))
    return out


def cli(*argv, cwd=ROOT):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "teach/run.py"), *map(str, argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def write_back(copy, *names):
    """The copy with the reference bodies of `names` written back, as a student who wrote exactly our code."""
    for name in names:
        script = teach.find_functions(ROOT, [name])[name]
        reference = open(os.path.join(ROOT, script)).read()
        first, last = teach.spans(reference, [name])[name]
        body = "".join(reference.splitlines(keepends=True)[first - 1 : last])
        path = os.path.join(copy, script)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(teach.replace_functions(text, {name: body}))


# ================================================================ the table
def test_every_assignable_function_is_defined_once_and_every_test_it_names_exists():
    assert set(teach.find_functions(ROOT, teach.ASSIGNABLE)) == set(teach.ASSIGNABLE)
    defined = {}
    for name, (points, ids) in teach.ASSIGNABLE.items():
        assert ids and points > 0, name
        for node_id in ids:
            path, test = node_id.split("::")
            if path not in defined:
                tree = ast.parse(open(os.path.join(ROOT, path)).read())
                defined[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert test in defined[path], f"{name}: {node_id} is not defined"


def test_list_prints_each_functions_points_and_the_timeout_is_at_most_two_minutes():
    run = cli("list")
    assert run.returncode == 0
    for name, (points, _) in teach.ASSIGNABLE.items():
        assert f"{points} points" in next(
            line for line in run.stdout.splitlines() if line.startswith(name + " ")
        )
    assert (
        teach.TIMEOUT <= 120
        and teach.ASSIGNABLE["grpo_loss"][0] > teach.ASSIGNABLE["tag_reward"][0]
    )


# ================================================================ grading
def test_a_copy_with_every_function_blanked_scores_zero(all_blanked):
    rows = teach.grade(str(all_blanked))
    assert [r["function"] for r in rows] == list(teach.ASSIGNABLE)
    assert [(r["function"], r["points"]) for r in rows if r["points"] != 0 or not r["cases"]] == []


def test_the_full_project_scores_full_marks(all_blanked, tmp_path):
    """The copy with the original bodies put back (a student who wrote exactly the reference code), graded by the
    command line: every function all its points and the total all points."""
    full = tmp_path / "full"
    shutil.copytree(all_blanked, full)
    write_back(full, *teach.ASSIGNABLE)
    run = cli("grade", full)
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines()[1:] if line.split()}
    assert set(rows) == set(teach.ASSIGNABLE) | {"total"}, run.stdout
    for name, cells in rows.items():
        assert float(cells[-3]) == float(cells[-1]), (name, cells)
        if name != "total":
            passed, cases = map(int, cells[-4].split("/"))
            assert passed == cases > 0, (name, cells)
    assert float(rows["total"][-1]) == sum(points for points, _ in teach.ASSIGNABLE.values())


@pytest.mark.parametrize("name", list(teach.ASSIGNABLE))
def test_blanking_any_one_function_costs_points(name, tmp_path):
    teach.make([name], str(tmp_path / "copy"))
    (row,) = teach.grade(str(tmp_path / "copy"))
    assert row["cases"] > 0 and row["passed"] < row["cases"] and row["points"] < row["of"], row
    assert any("NotImplementedError" in message for _, message in row["failed"]), row["failed"]


# ================================================================ nothing but the functions takes part
FOOLS = {  # a file a student adds to a copy, hoping for points
    "conftest.py": "import pytest\n@pytest.hookimpl(hookwrapper=True)\ndef pytest_runtest_makereport(item, call):\n"
    "    outcome = yield\n    outcome.get_result().outcome = 'passed'\n",
    "pytest.ini": "[pytest]\naddopts = -p no:python --deselect tests\n",
    "setup.cfg": "[tool:pytest]\naddopts = -k nothing_at_all\n",
    "pyproject.toml": "[tool.pytest.ini_options]\naddopts = '-k nothing_at_all'\n",
    "sitecustomize.py": "import builtins\nbuiltins.NotImplementedError = type('Fine', (Exception,), {})\n",
    "pytest.py": "import sys\nsys.exit(0)\n",
    "tests/test_reward.py": "def test_coverage_bucket_edges_are_half_open():\n    pass\n",
}


@pytest.mark.parametrize("fool", FOOLS)
def test_a_file_added_or_edited_in_the_copy_changes_no_score(fool, tmp_path):
    teach.make(["ladder_bucket", "tag_reward"], str(tmp_path / "copy"))
    (tmp_path / "copy" / fool).write_text(FOOLS[fool])
    rows = teach.grade(str(tmp_path / "copy"))
    assert [(r["points"], r["cases"] > 0) for r in rows] == [(0.0, True), (0.0, True)], rows


def test_only_the_functions_body_is_taken_not_the_rest_of_the_students_module(tmp_path):
    """A student who also edits the module around the function (a constant, a helper) gains nothing from it: the
    constant is ours again and a helper outside the function is not there."""
    teach.make(["ladder_bucket"], str(tmp_path / "copy"))
    script = tmp_path / "copy" / "reward.py"
    text = script.read_text().replace(
        "COVERAGE_EDGES = (0.2, 0.4, 0.6, 0.8)", "COVERAGE_EDGES = (0.0,)"
    )
    script.write_text(
        text.replace('raise NotImplementedError("ladder_bucket', 'return _mine(rate)  # ("')
        + "\n\ndef _mine(rate):\n    return 0\n"
    )
    (row,) = teach.grade(str(tmp_path / "copy"))
    assert row["points"] == 0 and "NameError" in " ".join(m for _, m in row["failed"]), row


def test_a_student_function_that_breaks_its_module_scores_zero_with_the_reason(tmp_path):
    teach.make(["uniqueness_bucket"], str(tmp_path / "copy"))
    script = tmp_path / "copy" / "reward.py"
    broken = script.read_text().replace(
        'raise NotImplementedError("uniqueness_bucket', 'return (u ==\n    ("'
    )
    script.write_text(broken)  # an unclosed bracket
    (row,) = teach.grade(str(tmp_path / "copy"))
    assert (
        (row["points"], row["cases"]) == (0, 0)
        and "does not parse" in row["note"]
        and "SyntaxError" in row["note"]
    )


def test_a_function_that_never_returns_costs_only_its_own_points_and_shows_as_a_timeout(tmp_path):
    """ladder_bucket loops forever, uniqueness_bucket is written: the joint run times out, each function then runs
    on its own, uniqueness_bucket keeps its points, and ladder_bucket shows as a timeout, not as cases passed."""
    teach.make(["ladder_bucket", "uniqueness_bucket"], str(tmp_path / "copy"))
    write_back(tmp_path / "copy", "uniqueness_bucket")
    script = tmp_path / "copy" / "reward.py"
    script.write_text(
        script.read_text().replace(
            'raise NotImplementedError("ladder_bucket', 'while True: pass  # ("'
        )
    )
    run = cli("grade", tmp_path / "copy", "--timeout", "30")
    loops = next(line for line in run.stdout.splitlines() if line.startswith("ladder_bucket "))
    written = next(
        line for line in run.stdout.splitlines() if line.startswith("uniqueness_bucket ")
    )
    assert "timeout" in loops.split() and loops.split()[-3] == "0.0", run.stdout
    assert "ran past --timeout 30 s" in run.stdout
    assert (
        float(written.split()[-3])
        == float(written.split()[-1])
        == teach.ASSIGNABLE["uniqueness_bucket"][0]
    ), run.stdout


def test_a_failing_check_names_the_rule_it_checks(tmp_path):
    """A grpo_loss that counts every clipped-ratio token, whatever the advantage's sign: the grader's output says
    which rule of clip_frac it broke; --verbose adds pytest's whole report."""
    teach.make(["grpo_loss"], str(tmp_path / "copy"))
    write_back(tmp_path / "copy", "grpo_loss")
    script = tmp_path / "copy" / "opgrpo_min.py"
    text = script.read_text()
    wrong = "((ratio > 1 + clip_eps) | (ratio < 1 - clip_eps)).float()"
    assert (
        "(((ratio > 1 + clip_eps) & (A > 0)) | ((ratio < 1 - clip_eps) & (A < 0))).float()" in text
    )
    script.write_text(
        text.replace(
            "(((ratio > 1 + clip_eps) & (A > 0)) | ((ratio < 1 - clip_eps) & (A < 0))).float()",
            wrong,
        )
    )
    run = cli("grade", tmp_path / "copy")
    assert "clip_frac: share of answer tokens whose clip is active" in run.stdout, run.stdout
    assert "grpo_loss" in run.stdout and "Traceback" not in run.stderr
    verbose = cli("grade", tmp_path / "copy", "--verbose")
    assert (
        "pytest's report" in verbose.stdout
        and "def test_grpo_loss_clip_cases_by_hand" in verbose.stdout
    )


# ================================================================ blanking
SOURCE = '''import functools


@functools.lru_cache(maxsize=None)
def double(x,
           k=2):  # a signature over two lines
    """Doubles x.

    >>> double(3)
    6
    """
    y = k * x      # the body goes
    return y
    # and so does a comment that trails it


def plain(x):
    # no docstring: the comment and code go
    return x + 1


def kept(x):
    return x
'''


def test_blanking_keeps_decorators_signature_and_docstring_and_nothing_of_the_body():
    before, after = ast.parse(SOURCE), ast.parse(teach.blank_source(SOURCE, ["double", "plain"]))
    for old, new in zip(before.body[1:3], after.body[1:3]):
        kept = lambda f: [ast.dump(x) for x in [f.args, *f.decorator_list]]  # noqa: E731
        assert kept(new) == kept(old)
        assert ast.get_docstring(new) == ast.get_docstring(old)
        raise_ = new.body[-1]
        assert isinstance(raise_, ast.Raise) and raise_.exc.func.id == "NotImplementedError"
        assert len(new.body) == (2 if ast.get_docstring(old) else 1)
    assert ast.dump(after.body[3]) == ast.dump(before.body[3])  # `kept` untouched
    text = teach.blank_source(SOURCE, ["double", "plain"])
    assert (
        "trails it" not in text
        and "no docstring" not in text
        and "a signature over two lines" in text
    )


def test_the_copy_holds_the_project_and_the_readers_docs_but_not_runs_git_or_the_teachers_files(
    all_blanked,
):
    names = set(os.listdir(all_blanked))
    assert {
        "opgrpo_min.py",
        "reward.py",
        "README.md",
        "tests",
        "data",
        "scale",
        "requirements.txt",
        "docs",
        teach.MANIFEST,
    } <= names
    assert not {"runs", ".git"} & names
    docs = set(os.listdir(all_blanked / "docs"))
    assert {"paper_to_code.md", "training.md"} <= docs and "assignments.md" not in docs
    assert not {"measure.py", "planted_bugs.json"} & set(os.listdir(all_blanked / "teach"))
    with open(os.path.join(ROOT, "data", "train.jsonl"), "rb") as f:
        assert (all_blanked / "data" / "train.jsonl").read_bytes() == f.read()


def test_the_copy_has_no_broken_link(all_blanked):
    import re

    for here, _, files in os.walk(all_blanked):
        for name in (f for f in files if f.endswith(".md")):
            for target in re.findall(r"\]\(([^)#\s]+)", open(os.path.join(here, name)).read()):
                if not re.match(r"[a-z]+:", target):
                    assert os.path.exists(os.path.join(here, target)), (
                        os.path.join(here, name),
                        target,
                    )
    assert "](docs/assignments.md)" in open(os.path.join(ROOT, "README.md")).read()
    assert (
        "](docs/assignments.md)" not in (all_blanked / "README.md").read_text()
    )  # the teacher's: plain text


def test_no_test_in_the_copy_spells_out_a_blanked_function(all_blanked):
    tests = "".join(
        open(os.path.join(here, f)).read()
        for here, _, fs in os.walk(all_blanked / "tests")
        for f in fs
        if f.endswith(".py") and f != "test_teach.py"
    )
    trl_test = "def test_trl_ratio_cap_delta_is_the_recipes_dual_clip"  # TRL's loss: grpo_loss in other words
    assert (
        trl_test not in tests
        and trl_test in open(os.path.join(ROOT, "tests", "test_scale.py")).read()
    )
    for name, script in teach.find_functions(ROOT, teach.ASSIGNABLE).items():
        source = open(os.path.join(ROOT, script)).read()
        first, last = teach.spans(source, [name])[name]
        node = next(n for n in ast.parse(source).body if getattr(n, "name", None) == name)
        body = source.splitlines()[node.body[1 if ast.get_docstring(node) else 0].lineno - 1 : last]
        for line in (b.strip() for b in body):
            if len(line) > 30 and not line.startswith("#"):
                assert line not in tests, f"{name}: {line!r} is in a test of the copy"


def test_a_student_copy_made_inside_the_project_is_not_copied_again(tmp_path):
    project = tmp_path / "project"  # a plain copy: no .git, so files are walked
    teach.make([], str(project))
    teach.make(["ladder_bucket"], str(project / "hw1"), root=str(project))
    teach.make(["ladder_bucket"], str(tmp_path / "hw2"), root=str(project))
    assert (tmp_path / "hw2" / "reward.py").exists() and not (tmp_path / "hw2" / "hw1").exists()


# ================================================================ planted bugs
def test_each_seed_plants_one_of_at_least_four_bugs_that_neither_diff_nor_file_times_give_away(
    tmp_path,
):
    import difflib

    table = json.load(open(os.path.join(ROOT, "teach", "planted_bugs.json")))
    assert len(table["bugs"]) >= 4
    bugs = {
        seed: teach.make([], str(tmp_path / f"s{seed}"), plant=seed)["bug"] for seed in range(6)
    }
    assert set(bugs.values()) == set(table["bugs"])  # every bug, one per seed
    texts = {seed: (tmp_path / f"s{seed}" / "opgrpo_min.py").read_text() for seed in bugs}
    for a, b in [(0, 1), (1, 2), (2, 3)]:
        hunks = [
            g
            for g in difflib.SequenceMatcher(
                None, texts[a].splitlines(), texts[b].splitlines()
            ).get_opcodes()
            if g[0] != "equal"
        ]
        assert len(hunks) >= 5, (a, b, len(hunks))  # the bug is one change among decoys
    for seed in bugs:
        copy = tmp_path / f"s{seed}"
        times = {
            os.stat(os.path.join(here, f)).st_mtime
            for here, dirs, fs in os.walk(copy)
            for f in fs + dirs
        }
        assert times == {teach.FIXED_TIME}
        assert bugs[seed] not in (copy / teach.MANIFEST).read_text()
        bug_old = table["bugs"][bugs[seed]][1]
        assert bug_old not in texts[seed]  # it is planted
    reference = open(os.path.join(ROOT, "opgrpo_min.py")).read()
    for _script, old, new in table["decoys"]:
        assert reference.count(old) == 1 and old != new


def test_the_bug_list_stays_with_the_teacher(tmp_path):
    teach.make([], str(tmp_path / "plain"))
    run = subprocess.run(
        [
            sys.executable,
            "teach/run.py",
            "make",
            "--blank",
            "none",
            "--plant",
            "3",
            "--out",
            str(tmp_path / "again"),
        ],
        cwd=tmp_path / "plain",
        capture_output=True,
        text=True,
    )
    assert (
        run.returncode == 2
        and "the teacher's bug list" in run.stderr
        and not (tmp_path / "again").exists()
    )


# ================================================================ bad input
def test_help_runs_and_import_has_no_side_effects(tmp_path):
    assert cli("--help").returncode == 0 and "grade" in cli("--help").stdout
    assert (
        "planted bugs" in cli("make", "--help").stdout
        and "fresh copy" in cli("grade", "--help").stdout
    )
    run = subprocess.run(
        [sys.executable, "-c", "import teach.run"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert (run.returncode, run.stdout, run.stderr, os.listdir(tmp_path)) == (0, "", "", [])


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["make", "--blank", "no_such_function", "--out", "{tmp}/s"],
            "'no_such_function' is not an assignable function",
        ),
        (
            ["make", "--blank", "grpo_update", "--out", "{tmp}/s"],
            "'grpo_update' is not an assignable function",
        ),
        (["make", "--blank", " , ", "--out", "{tmp}/s"], "names no function"),
        (["make", "--blank", "grpo_loss", "--out", "{tmp}/full"], "is not empty"),
        (["make", "--blank", "grpo_loss", "--out", "{tmp}/full/a_file"], "is a file"),
        (["grade", "{tmp}/full"], "no student copy"),
        (["grade", "{tmp}/nowhere"], "no such directory"),
        (["grade", "{tmp}/full", "--timeout", "0"], "--timeout 0: must be > 0"),
        (
            ["grade", "{tmp}/full", "--blank", "no_such_function"],
            "'no_such_function' is not an assignable function",
        ),
    ],
)
def test_bad_input_is_one_line_without_a_traceback_and_writes_nothing(tmp_path, argv, words):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a_file").write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    run = cli(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert run.returncode == 2 and words in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ================================================================ the paper-to-code map
def test_every_function_and_test_the_paper_to_code_map_names_exists():
    import re

    text = open(os.path.join(ROOT, "docs", "paper_to_code.md")).read()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    functions = re.findall(r"`([\w/]+\.py):(\w+)`", "\n".join(rows))
    cases = re.findall(r"`(tests/\w+\.py)::(\w+)`", "\n".join(rows))
    assert len(rows) >= 20 and len(functions) >= 25 and len(cases) >= 40
    for path, name in functions + cases:
        tree = ast.parse(open(os.path.join(ROOT, path)).read())
        assert name in {
            n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
        }, f"{path}:{name}"
    for name, (
        _,
        ids,
    ) in teach.ASSIGNABLE.items():  # the row of each assignable function cites its tests
        row = next(r for r in rows if f":{name}`" in r)
        assert any(f"`{i}`" in row for i in ids), (
            f"{name}: its row cites none of the tests that grade it"
        )
    greedy = next(r for r in rows if ":greedy_matches`" in r)
    assert all(f"`{i}`" in greedy for i in teach.ASSIGNABLE["greedy_matches"][1])
