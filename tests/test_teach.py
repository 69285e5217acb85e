"""teach.py as a specification: the full project scores full marks, a copy with every assignable function blanked
scores zero, blanking any one function fails at least one of its own tests (so every function is really graded),
blanking keeps what a student needs, and bad input ends in one line. Each grade runs pytest once per function in
the copy: the file takes a few minutes on a busy 2-core CPU."""
import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

import teach

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def all_blanked(tmp_path_factory):
    out = tmp_path_factory.mktemp("copies") / "all_blanked"
    teach.make(list(teach.ASSIGNABLE), str(out))
    return out


def cli(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, os.path.join(ROOT, "teach.py"), *map(str, argv)], cwd=cwd,
                          capture_output=True, text=True)


# ================================================================ the table
def test_every_assignable_function_is_defined_once_and_every_test_it_names_exists():
    assert set(teach.find_functions(ROOT, teach.ASSIGNABLE)) == set(teach.ASSIGNABLE)
    defined = {}
    for name, ids in teach.ASSIGNABLE.items():
        assert ids, name
        for node_id in ids:
            path, test = node_id.split("::")
            if path not in defined:
                tree = ast.parse(open(os.path.join(ROOT, path)).read())
                defined[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert test in defined[path], f"{name}: {node_id} is not defined"


# ================================================================ grading
def test_a_copy_with_every_function_blanked_scores_zero(all_blanked):
    rows = teach.grade(str(all_blanked))
    assert [r["function"] for r in rows] == list(teach.ASSIGNABLE)
    assert [(r["function"], r["points"]) for r in rows if r["points"] != 0 or not r["cases"]] == []


def test_the_full_project_scores_full_marks(all_blanked, tmp_path):
    """The copy with the original bodies put back (a student who wrote exactly the reference code), graded by the
    command line: every function 10 of 10 and the total all points."""
    full = tmp_path / "full"
    shutil.copytree(all_blanked, full)
    for script in set(json.loads((full / teach.MANIFEST).read_text())["blanked"].values()):
        shutil.copy(os.path.join(ROOT, script), full / script)
    run = cli("grade", full)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(teach.ASSIGNABLE) | {"total"}, run.stdout
    for name, cells in rows.items():
        passed, cases = map(int, cells[-4].split("/"))
        assert passed == cases > 0 and float(cells[-3]) == float(cells[-1]), (name, cells)
    assert float(rows["total"][-3]) == teach.POINTS * len(teach.ASSIGNABLE)


@pytest.mark.parametrize("name", list(teach.ASSIGNABLE))
def test_blanking_one_function_fails_at_least_one_of_its_own_tests(name, tmp_path):
    teach.make([name], str(tmp_path / "copy"))
    (row,) = teach.grade(str(tmp_path / "copy"))
    assert row["cases"] > 0 and row["passed"] < row["cases"], row
    assert any("NotImplementedError" in message for _, message in row["failed"]), row["failed"]


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
        kept = lambda f: [ast.dump(x) for x in [f.args, *f.decorator_list]]            # noqa: E731
        assert kept(new) == kept(old)
        assert ast.get_docstring(new) == ast.get_docstring(old)
        raise_ = new.body[-1]
        assert isinstance(raise_, ast.Raise) and raise_.exc.func.id == "NotImplementedError"
        assert len(new.body) == (2 if ast.get_docstring(old) else 1)
    assert ast.dump(after.body[3]) == ast.dump(before.body[3])                  # `kept` untouched
    text = teach.blank_source(SOURCE, ["double", "plain"])
    assert "trails it" not in text and "no docstring" not in text and "a signature over two lines" in text


def test_the_copy_holds_the_project_but_not_runs_git_or_the_teachers_docs(all_blanked):
    names = set(os.listdir(all_blanked))
    assert {"opgrpo_min.py", "reward.py", "README.md", "tests", "data", "scale", "requirements.txt",
            teach.MANIFEST} <= names
    assert not {"runs", ".git", "docs"} & names
    with open(os.path.join(ROOT, "data", "train.jsonl"), "rb") as f:
        assert (all_blanked / "data" / "train.jsonl").read_bytes() == f.read()


def test_a_student_copy_made_inside_the_project_is_not_copied_again(tmp_path):
    project = tmp_path / "project"                                  # a plain copy: no .git, so files are walked
    teach.make([], str(project))
    teach.make(["ladder_bucket"], str(project / "hw1"), root=str(project))
    teach.make(["ladder_bucket"], str(tmp_path / "hw2"), root=str(project))
    assert (tmp_path / "hw2" / "reward.py").exists() and not (tmp_path / "hw2" / "hw1").exists()


# ================================================================ bad input
def test_help_runs_and_import_has_no_side_effects(tmp_path):
    assert cli("--help").returncode == 0 and "grade" in cli("--help").stdout
    run = subprocess.run([sys.executable, "-c", "import teach"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert (run.returncode, run.stdout, run.stderr, os.listdir(tmp_path)) == (0, "", "", [])


@pytest.mark.parametrize("argv, words", [
    (["make", "--blank", "no_such_function", "--out", "{tmp}/s"], "'no_such_function' is not an assignable function"),
    (["make", "--blank", "grpo_update", "--out", "{tmp}/s"], "'grpo_update' is not an assignable function"),
    (["make", "--blank", " , ", "--out", "{tmp}/s"], "names no function"),
    (["make", "--blank", "grpo_loss", "--out", "{tmp}/full"], "is not empty"),
    (["make", "--blank", "grpo_loss", "--out", "{tmp}/full/a_file"], "is a file"),
    (["grade", "{tmp}/full"], "no student copy"),
    (["grade", "{tmp}/nowhere"], "no such directory"),
    (["grade", "{tmp}/full", "--timeout", "0"], "--timeout 0: must be > 0"),
])
def test_bad_input_is_one_line_without_a_traceback_and_writes_nothing(tmp_path, argv, words):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a_file").write_text("x")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    run = cli(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert run.returncode == 2 and words in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_grade_refuses_a_copy_whose_tests_were_edited(tmp_path):
    teach.make(["ladder_bucket"], str(tmp_path / "copy"))
    test_file = tmp_path / "copy" / "tests" / "test_reward.py"
    test_file.write_text(test_file.read_text().replace("def test_coverage_bucket_edges_are_half_open():",
                                                       "def test_coverage_bucket_edges_are_half_open():\n    return"))
    run = cli("grade", tmp_path / "copy")
    assert run.returncode == 2 and "test_reward.py is missing or was edited" in run.stderr, run.stderr
    (tmp_path / "copy" / teach.MANIFEST).write_text("{not json")
    assert "not a manifest written by teach.py make" in cli("grade", tmp_path / "copy").stderr


def test_a_student_function_that_breaks_its_module_scores_zero_with_the_reason(tmp_path):
    teach.make(["uniqueness_bucket"], str(tmp_path / "copy"))
    script = tmp_path / "copy" / "reward.py"
    broken = script.read_text().replace('raise NotImplementedError("uniqueness_bucket', 'return (u ==\n    ("')
    script.write_text(broken)                                                    # an unclosed bracket
    (row,) = teach.grade(str(tmp_path / "copy"))
    assert (row["points"], row["cases"]) == (0, 0) and "does not import" in row["note"] and "SyntaxError" in row["note"]


def test_a_function_that_never_returns_costs_only_its_own_points(tmp_path):
    """ladder_bucket loops forever, uniqueness_bucket is written: the joint run times out, each function then runs
    on its own, and uniqueness_bucket keeps its 10 points."""
    teach.make(["ladder_bucket", "uniqueness_bucket"], str(tmp_path / "copy"))
    script = tmp_path / "copy" / "reward.py"
    looping = teach.blank_source(open(os.path.join(ROOT, "reward.py")).read(), ["ladder_bucket"])
    script.write_text(looping.replace('raise NotImplementedError("ladder_bucket', 'while True: pass  # ("'))
    loops, written = teach.grade(str(tmp_path / "copy"), timeout=5)
    assert (loops["points"], loops["cases"]) == (0, 0) and "ran past --timeout 5 s" in loops["note"]
    assert (written["function"], written["points"]) == ("uniqueness_bucket", teach.POINTS)
