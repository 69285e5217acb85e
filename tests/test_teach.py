"""teach/ as a specification: the full project scores full marks and a blank copy zero; functions written from their
docstrings alone score full marks, each graded with the reference versions of the others; the student's code runs
in a process of its own that only plain data leaves, so none of the cheats of issue 35 (one test each, each a real
attempt) earns a point; nine endless loops cost only their own points, within their limits; week 2 grades tests by
the hidden mutants they catch; planted copies cannot be told apart by diff or file times; bad input ends in one
line. Grading runs pytest on the teacher's side and a child process per function: the file takes a few minutes."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from teach import assignable, sandbox, wire
from teach import run as teach

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANDLOCK = sandbox.landlock_abi() >= 1


def cli(*argv, cwd=ROOT, root=ROOT):
    return subprocess.run(
        [sys.executable, os.path.join(root, "teach/run.py"), *map(str, argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def table(stdout):
    """{function or 'total': its cells} of grade's printed table."""
    rows = {}
    for line in stdout.splitlines()[1:]:
        cells = line.split()
        if cells and (cells[0] in teach.ASSIGNABLE or cells[0] == "total"):
            rows[cells[0]] = cells
    return rows


def write_defs(copy, defs, root=ROOT):
    """The copy with each def of `defs` ({name: its source}) put in place of the copy's def of that name."""
    where = teach.find_functions(root, list(defs))
    for script in set(where.values()):
        path = os.path.join(copy, script)
        with open(path) as f:
            text = f.read()
        mine = {n: textwrap.dedent(d) for n, d in defs.items() if where[n] == script}
        with open(path, "w") as f:
            f.write(teach.replace_functions(text, mine))


def reference_defs(*names):
    """The reference source of each named def, as a student who wrote exactly our code."""
    out = {}
    for name, script in teach.find_functions(ROOT, names).items():
        with open(os.path.join(ROOT, script)) as f:
            source = f.read()
        first, last = assignable.spans(source, [name])[name]
        out[name] = "".join(source.splitlines(keepends=True)[first - 1 : last])
    return out


def by_name(rows):
    return {r["function"]: r for r in rows}


@pytest.fixture(scope="module")
def all_blanked(tmp_path_factory):
    out = tmp_path_factory.mktemp("copies") / "all_blanked"
    teach.make(list(teach.ASSIGNABLE), str(out))
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A plain copy of the project to act as the teacher's folder where a test lets a student's code try to write
    into it: the repository itself is never put at risk."""
    out = tmp_path_factory.mktemp("teacher") / "project"
    teach.make([], str(out))
    return out


# ================================================================ the table
def test_every_assignable_function_is_defined_once_and_every_test_it_names_exists():
    assert set(teach.find_functions(ROOT, teach.ASSIGNABLE)) == set(teach.ASSIGNABLE)
    defined, seen = {}, set()
    for name, (points, ids) in teach.ASSIGNABLE.items():
        assert ids and points > 0, name
        for node_id in ids:
            path, test = node_id.split("::")
            if path not in defined:
                tree = ast.parse(open(os.path.join(ROOT, path)).read())
                defined[path] = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert test in defined[path], f"{name}: {node_id} is not defined"
            assert node_id not in seen, f"{node_id} grades two functions"  # a case belongs to one
            seen.add(node_id)
    weeks = [n for names in teach.WEEKS.values() for n in names]
    assert len(weeks) == len(set(weeks)) and set(weeks) | set(assignable.UNDER_TEST) <= set(
        teach.ASSIGNABLE
    )
    assert set(assignable.UNDER_TEST) == set(teach.WEEKS[1]) and teach.WEEKS[2] == ()


def test_list_prints_each_functions_points_and_nine_endless_loops_fit_in_ten_minutes():
    run = cli("list")
    assert run.returncode == 0
    for name, (points, _) in teach.ASSIGNABLE.items():
        line = next(line for line in run.stdout.splitlines() if line.startswith(name + " "))
        assert f"{points} points" in line
    assert "week 1" in next(x for x in run.stdout.splitlines() if x.startswith("grpo_loss "))
    # a function's cases share teach.TIMEOUT seconds, restarts of its process included; the first start, about
    # 2 s for a core script (5 s for sim_train.py, which imports transformers), is the teacher's
    assert 9 * (teach.TIMEOUT + 5) + 60 <= 600 and teach.CASE_TIMEOUT <= teach.TIMEOUT


# ================================================================ grading: blank, reference, honest
def test_a_copy_with_every_function_blanked_scores_zero_each_by_its_own_not_implemented_error(
    all_blanked,
):
    rows, _ = teach.grade(str(all_blanked), list(teach.ASSIGNABLE))
    assert [r["function"] for r in rows] == list(teach.ASSIGNABLE)
    for r in rows:
        assert r["points"] == 0 and r["cases"] > 0 and r["passed"] == 0, r
        assert {m for _, m in r["failed"]} == {
            f"NotImplementedError: {r['function']}: {assignable.TODO}"
        }


def test_the_full_project_scores_full_marks(all_blanked, tmp_path):
    """The copy with the reference bodies put back (a student who wrote exactly our code), graded by the command
    line: every function all its points, the total all points, and the isolation that was in force is printed."""
    full = tmp_path / "full"
    shutil.copytree(all_blanked, full)
    write_defs(full, reference_defs(*teach.ASSIGNABLE))
    run = cli("grade", full, "--blank", "all")
    assert run.returncode == 0, run.stderr
    rows = table(run.stdout)
    assert set(rows) == set(teach.ASSIGNABLE) | {"total"}, run.stdout
    for name, cells in rows.items():
        assert float(cells[-3]) == float(cells[-1]), (name, cells)
        if name != "total":
            passed, cases = map(int, cells[-4].split("/"))
            assert passed == cases > 0, (name, cells)
    assert float(rows["total"][-1]) == sum(points for points, _ in teach.ASSIGNABLE.values())
    assert "isolation: " in run.stdout and "Traceback" not in run.stderr


# Nine functions written from nothing but their docstrings, in other words than ours; coverage_reward and
# uniqueness_reward are left unfinished.
HONEST = {
    "group_advantages": """
        def group_advantages(rewards, group_size, eps=1e-6):
            groups = torch.as_tensor(rewards, dtype=torch.float32).reshape(-1, group_size)
            centred = groups - groups.mean(dim=1, keepdim=True)
            spread = centred.pow(2).mean(dim=1, keepdim=True).sqrt()  # the population std
            return (centred / (spread + eps)).flatten()
        """,
    "grpo_loss": """
        def grpo_loss(
            logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.001, dual_clip=3.0, num_tokens=None
        ):
            m = mask.to(torch.float32)
            divisor = m.sum().clamp(min=1) if num_tokens is None else num_tokens
            adv = advantages.reshape(-1, 1)
            ratio = (logp - old_logp).clamp(-20, 20).exp()
            pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
            if dual_clip:
                pg = torch.where(adv < 0, torch.minimum(pg, -dual_clip * adv), pg)
            if ref_logp is None or beta == 0:
                kl = torch.zeros_like(logp)
            else:
                d = (ref_logp - logp).clamp(-20, 20)
                kl = d.exp() - d - 1
            loss = (m * (pg + beta * kl)).sum() / divisor
            n = m.sum().clamp(min=1).item()
            active = ((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))
            stats = {
                "kl": float((kl.detach() * m).sum()) / n,
                "ratio": float((ratio.detach() * m).sum()) / n,
                "clip_frac": float((active.float() * m).sum()) / n,
            }
            return loss, stats
        """,
    "greedy_matches": """
        def greedy_matches(sim, threshold=COVERAGE_THRESHOLD):
            if isinstance(sim, __import__("torch").Tensor):
                t = sim.detach().cpu()
                S = (t.float() if t.dtype in (__import__("torch").bfloat16, __import__("torch").float16) else t).numpy()
            else:
                S = np.asarray(sim)
            S = (S if S.dtype == np.float32 else S.astype(np.float64)).copy()
            if S.ndim != 2:
                raise ValueError(f"greedy_matches: a 2-D matrix, please; got shape {S.shape}")
            if np.isnan(S).any():
                raise ValueError("greedy_matches: the matrix holds NaN")
            limit, pairs = S.dtype.type(threshold), []
            while S.size:
                i, j = divmod(int(np.argmax(S)), S.shape[1])
                if not S[i, j] >= limit:
                    break
                pairs.append((i, j))
                S[i, :] = -np.inf
                S[:, j] = -np.inf
            return pairs
        """,
    "ladder_bucket": """
        def ladder_bucket(rate):
            if rate <= 0:
                return 0
            return 1 + len([edge for edge in (0.2, 0.4, 0.6, 0.8) if rate >= edge])
        """,
    "redundant_flags": """
        def redundant_flags(sim_cc, threshold=UNIQUENESS_THRESHOLD):
            if hasattr(sim_cc, "detach"):
                sim_cc = sim_cc.detach().float().numpy()
            S = np.asarray(sim_cc)
            S = S if S.dtype == np.float32 else S.astype(np.float64)
            if S.ndim != 2 or S.shape[0] != S.shape[1]:
                raise ValueError(f"redundant_flags: a square matrix, please; got shape {S.shape}")
            limit, flags = S.dtype.type(threshold), np.zeros(S.shape[0], dtype=bool)
            for i in range(S.shape[0]):
                for j in range(i + 1, S.shape[0]):
                    if not flags[i] and S[i, j] >= limit:
                        flags[j] = True
            return flags
        """,
    "uniqueness_bucket": """
        def uniqueness_bucket(u):
            if u == 1:
                return 1.0
            if u > 0.8:
                return 0.75
            if u > 0.6:
                return 0.4
            return 0.0
        """,
    "situation_score": """
        def situation_score(P):
            P = np.asarray(P, dtype=float)
            return 0.0 if P.size == 0 else float(np.mean(np.max(P, axis=1)))
        """,
    "summarize": """
        def summarize(scores, threshold=ACCURACY_THRESHOLD):
            x = np.asarray(scores, dtype=float)
            std = float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")
            return {
                "n": len(x),
                "mean": float(np.mean(x)),
                "std": std,
                "se": std / len(x) ** 0.5,
                "accuracy": float(np.mean(x > threshold)),
            }
        """,
    "entailment_index": """
        def entailment_index(config, name="the NLI model"):
            labels = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
            hits = [k for k, v in labels.items() if v.strip().lower() in ("entailment", "entail")]
            if not hits:
                raise ValueError(f"{name}: no 'entailment' label in its id2label {labels}")
            if len(hits) > 1:
                raise ValueError(f"{name}: more than one 'entailment' label in its id2label {labels}")
            return hits[0]
        """,
}
UNFINISHED = ("coverage_reward", "uniqueness_reward")


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    copy = tmp_path_factory.mktemp("copies") / "honest"
    names = [*HONEST, *UNFINISHED]
    teach.make(names, str(copy))
    write_defs(copy, HONEST)
    rows, _ = teach.grade(str(copy), names)
    return by_name(rows)


def test_functions_written_from_their_docstrings_alone_score_full_marks(honest):
    for name in HONEST:
        r = honest[name]
        assert r["cases"] > 0 and r["passed"] == r["cases"] and r["points"] == r["of"], r
    assert sum(honest[n]["points"] for n in HONEST) == 75  # 10 + 20 + 10 + 5 + 10 + 5 + 5 + 5 + 5


def test_a_function_keeps_its_points_while_the_function_its_tests_go_through_is_unfinished(honest):
    """redundant_flags' tests go through uniqueness_reward and greedy_matches' through coverage_reward; both are
    unfinished here (0 points), yet each of the written functions keeps all its points: the tests of a function
    run with the reference versions of the others, here and in the student's process."""
    for unfinished in UNFINISHED:
        assert honest[unfinished]["points"] == 0 and honest[unfinished]["cases"] > 0
    assert honest["redundant_flags"]["points"] == 10 and honest["greedy_matches"]["points"] == 10


# ================================================================ the cheats of issue 35, each attempted for real
SEARCH = '''
def teacher_folders():
    """Every folder this process could learn of: its ancestors' working folders, command lines and
    environments (through /proc), its own environment, arguments, sys.path, open files and folder."""
    import os, sys
    places, seen, pid = [], set(), os.getpid()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            places.append(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            pass
        for what in ("cmdline", "environ"):
            try:
                raw = open(f"/proc/{pid}/{what}", "rb").read().decode(errors="replace")
                places += raw.replace("=", "\\0").replace(" ", "\\0").split("\\0")
            except OSError:
                pass
        try:
            pid = int(open(f"/proc/{pid}/status").read().split("PPid:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            break
    places += list(os.environ.values()) + sys.argv + sys.path
    for fd in os.listdir("/proc/self/fd"):
        try:
            places.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    mine, found = os.path.realpath(os.getcwd()), []
    for place in places:
        folder = place if os.path.isabs(place) else ""
        while folder not in ("", "/"):
            if os.path.isfile(os.path.join(folder, "teach", "run.py")) and os.path.realpath(folder) != mine:
                found.append(folder)
            folder = os.path.dirname(folder)
    return found
'''


def cheat(name, signature, body, decorator=""):
    """A def that carries out a cheat: `body` below the signature, SEARCH available inside it."""
    inner = textwrap.indent(
        textwrap.dedent(SEARCH).strip() + "\n" + textwrap.dedent(body).strip(), "    "
    )
    return f"{decorator}def {name}({signature}):\n{inner}\n"


CHEATS = {
    # the frame of the test that called: its local `expected`, or the literal its assert compares with
    "ladder_bucket": cheat(
        "ladder_bucket",
        "rate",
        """
        import ast, inspect
        for info in inspect.stack():
            frame = info.frame
            if frame.f_code.co_name.startswith("test_"):
                if "expected" in frame.f_locals:
                    return frame.f_locals["expected"]
                tree = ast.parse(open(frame.f_code.co_filename).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Compare) and isinstance(node.comparators[0], ast.List):
                        return ast.literal_eval(node.comparators[0])[frame.f_locals["rates"].index(rate)]
        return -1
        """,
    ),
    # pytest.approx, torch.allclose and numpy.allclose made always true, at call time
    "group_advantages": cheat(
        "group_advantages",
        "rewards, group_size, eps=1e-6",
        """
        import numpy, pytest, torch
        yes = type("Yes", (), {"__eq__": lambda self, other: True, "__ne__": lambda self, other: False})
        pytest.approx = lambda *a, **k: yes()
        torch.allclose = numpy.allclose = lambda *a, **k: True
        return torch.zeros(len(rewards))
        """,
    ),
    # the same patch in a decorator, and in a default value: both run when the def is executed
    "uniqueness_bucket": cheat(
        "uniqueness_bucket",
        "u",
        "return 0.0",
        decorator='@(lambda f: (__import__("pytest").__setattr__("approx", lambda *a, **k: True), f)[1])\n',
    ),
    "mask_words": cheat(
        "mask_words",
        'text, keywords, _=__import__("pytest").__setattr__("approx", lambda *a, **k: True)',
        "return text",
    ),
    # stop the session after this case (and the loss is wrong: no dual clip)
    "grpo_loss": cheat(
        "grpo_loss",
        "logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.001, dual_clip=3.0, num_tokens=None",
        """
        import gc, pytest
        for thing in gc.get_objects():
            if isinstance(thing, pytest.Session):
                thing.shouldstop = "stopped by the student"
        m = mask.float()
        divisor = m.sum().clamp(min=1) if num_tokens is None else num_tokens
        A = advantages[:, None]
        ratio = torch.exp((logp - old_logp).clamp(-20, 20))
        pg = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)
        if ref_logp is not None and beta:
            d = (ref_logp - logp).clamp(-20, 20)
            kl = torch.exp(d) - d - 1
        else:
            kl = torch.zeros_like(logp)
        n = m.sum().clamp(min=1).item()
        on = (((ratio > 1 + clip_eps) & (A > 0)) | ((ratio < 1 - clip_eps) & (A < 0))).float()
        stats = dict(
            kl=(kl * m).sum().item() / n, clip_frac=(on * m).sum().item() / n, ratio=(ratio * m).sum().item() / n
        )
        return ((pg + beta * kl) * m).sum() / divisor, stats
        """,
    ),
    # a report in which every case passed, then the process ends with status 0
    "format_score": cheat(
        "format_score",
        "text",
        """
        import glob, json, os
        forged = {"case": "tests/test_reward.py::test_format_of_prose_and_of_an_empty_answer_is_zero",
                  "when": "call", "passed": True, "message": ""}
        for path in glob.glob("/tmp/teach-grade-*/results.jsonl"):
            try:
                with open(path, "a") as f:
                    f.write(json.dumps({"collected": {forged["case"]: "format_score"}}) + "\\n")
                    f.write(json.dumps(forged) + "\\n")
            except OSError:
                pass
        os._exit(0)
        """,
    ),
    # pytest's report class told that every report passed
    "tag_reward": cheat(
        "tag_reward",
        "text",
        """
        import _pytest.reports
        _pytest.reports.TestReport.passed = property(lambda self: True)
        _pytest.reports.TestReport.failed = property(lambda self: False)
        return 1.0
        """,
    ),
    # the teacher's folder found through the parent, the environment or the arguments: run the reference there
    "redundant_flags": cheat(
        "redundant_flags",
        "sim_cc, threshold=UNIQUENESS_THRESHOLD",
        """
        import importlib.util, os
        for folder in teacher_folders():
            spec = importlib.util.spec_from_file_location("theirs", os.path.join(folder, "reward.py"))
            theirs = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(theirs)
            return theirs.redundant_flags(sim_cc, threshold)
        return "no teacher's folder found"
        """,
    ),
    # a pass-everything hook appended to the teacher's tests/conftest.py (KNOWN: a path found by a disk search)
    "prompt_keywords": cheat(
        "prompt_keywords",
        "situation",
        """
        import os
        hook = ("\\nimport pytest\\n@pytest.hookimpl(hookwrapper=True)\\n"
                "def pytest_runtest_makereport(item, call):\\n"
                "    outcome = yield\\n    outcome.get_result().outcome = 'passed'\\n")
        for folder in teacher_folders() + [f for f in [KNOWN] if f]:
            try:
                with open(os.path.join(folder, "tests", "conftest.py"), "a") as f:
                    f.write(hook)
            except OSError:
                pass
        return set()
        """,
    ),
    # values whose == is always true: a tuple and floats of classes of one's own, and an object of one's own
    "uniqueness_reward": cheat(
        "uniqueness_reward",
        "sim_cc, threshold=UNIQUENESS_THRESHOLD, min_perspectives=0",
        """
        class Same(float):
            def __eq__(self, other):
                return True
        class Pair(tuple):
            def __eq__(self, other):
                return True
        return Pair((Same(-1.0), Same(-1.0)))
        """,
    ),
    "coverage_reward": cheat(
        "coverage_reward",
        "sim, threshold=COVERAGE_THRESHOLD",
        """
        class Anything:
            def __eq__(self, other):
                return True
        return Anything()
        """,
    ),
    # the process told to stop: KeyboardInterrupt, and pytest.exit()
    "summarize": cheat(
        "summarize", "scores, threshold=ACCURACY_THRESHOLD", "raise KeyboardInterrupt"
    ),
    "entailment_index": cheat(
        "entailment_index",
        'config, name="the NLI model"',
        'import pytest\npytest.exit("all done", returncode=0)',
    ),
}
WRITTEN = (
    "split_perspectives",
    "greedy_matches",
)  # written honestly beside the cheats: they keep their points


@pytest.fixture(scope="module")
def cheating(project, tmp_path_factory):
    """One student copy that tries every cheat of the table at once, graded by the command line, from `project`
    (the teacher's folder here); its assignment.json is edited to list two functions the teacher did not assign."""
    copy = tmp_path_factory.mktemp("copies") / "cheating"
    names = [*CHEATS, *WRITTEN]
    teach.make(names, str(copy), root=str(project))
    defs = dict(CHEATS)
    known = (
        repr(str(project)) if LANDLOCK else "None"
    )  # without Landlock a disk search can write it (docs)
    defs["prompt_keywords"] = defs["prompt_keywords"].replace("[KNOWN]", f"[{known}]")
    write_defs(copy, {**defs, **reference_defs(*WRITTEN)})
    manifest = {"blanked": {"split_perspectives": "reward.py", "token_logprobs": "opgrpo_min.py"}}
    (copy / teach.MANIFEST).write_text(json.dumps(manifest))
    conftest = (project / "tests" / "conftest.py").read_text()
    folders = lambda: {f for f in os.listdir(tempfile.gettempdir()) if f.startswith("teach-")}  # noqa: E731
    before = folders()
    run = cli("grade", copy, "--blank", ",".join(names), root=project)
    left = folders() - before
    return dict(run=run, rows=table(run.stdout), names=names, conftest=conftest, left=left)


def points(cheating, name):
    return float(cheating["rows"][name][-3])


def test_walking_the_stack_to_the_tests_frame_finds_no_test(cheating):
    """In-process the cheat returns what the calling test expects; in the student's process there is no test."""
    namespace = {}
    exec(CHEATS["ladder_bucket"], namespace)

    def test_like_frame():
        expected = 4  # noqa: F841  (the cheat reads it from this frame)
        return namespace["ladder_bucket"](0.3)

    assert test_like_frame() == 4  # the cheat works where the test and the function share a process
    assert points(cheating, "ladder_bucket") == 0.0, cheating["run"].stdout


def test_patching_approx_and_allclose_at_call_time_patches_only_the_students_process(cheating):
    import numpy
    import torch

    namespace, kept = {}, (pytest.approx, torch.allclose, numpy.allclose)
    exec(CHEATS["group_advantages"], namespace)
    try:
        namespace["group_advantages"]([1.0, 0.0], 2)
        assert [0.0] == pytest.approx([5.0]) and numpy.allclose(0, 1)  # in-process: anything passes
    finally:
        pytest.approx, torch.allclose, numpy.allclose = kept
    assert points(cheating, "group_advantages") == 0.0, cheating["run"].stdout


def test_a_decorator_or_a_default_value_that_runs_code_is_refused_by_name(cheating):
    out = cheating["run"].stdout
    assert points(cheating, "uniqueness_bucket") == 0.0 and points(cheating, "mask_words") == 0.0
    assert "uniqueness_bucket: refused: a decorator the reference lacks (@lambda f:" in out, out
    assert "mask_words: refused: the default value of _, `__import__('pytest')" in out, out


def test_stopping_the_session_after_a_passing_case_leaves_the_honest_score(cheating):
    """The wrong loss (no dual clip) fails exactly the dual-clip case: 8 of 9 cases, 8/9 x 20 = 17.8 points, the
    same as without the cheat; every case ran."""
    assert cheating["rows"]["grpo_loss"][-4] == "8/9" and points(cheating, "grpo_loss") == 17.8
    assert (
        "grpo_loss: failed test_grpo_loss_clip_cases_by_hand[5.0--1.0-3.0-0.0-0]"
        in cheating["run"].stdout
    )


def test_a_forged_report_and_os_exit_score_zero(cheating):
    cells = cheating["rows"]["format_score"]
    assert cells[-4] == "0/10" and points(cheating, "format_score") == 0.0, cheating["run"].stdout
    assert "the student's process stopped answering (it ended)" in cheating["run"].stdout


def test_patching_pytests_report_class_patches_only_the_students_process(cheating):
    assert cheating["rows"]["tag_reward"][-4] == "0/13" and points(cheating, "tag_reward") == 0.0


def test_the_teachers_folder_cannot_be_found_through_the_parent_or_the_environment(
    cheating, project
):
    """The same search, run by a process whose parent works in the teacher's folder (as pytest's children did),
    finds it; the student's process finds nothing and scores 0."""
    code = textwrap.dedent(SEARCH) + "print(teacher_folders())"
    inner = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {code!r}], cwd='/')"
    armed = subprocess.run(
        [sys.executable, "-c", inner], cwd=project, capture_output=True, text=True
    )
    assert str(project) in armed.stdout, armed.stdout + armed.stderr
    assert points(cheating, "redundant_flags") == 0.0, cheating["run"].stdout


def test_the_teachers_conftest_cannot_be_appended_to_and_a_later_blank_copy_scores_zero(
    cheating, project, tmp_path
):
    assert points(cheating, "prompt_keywords") == 0.0
    assert (project / "tests" / "conftest.py").read_text() == cheating["conftest"]
    teach.make(["prompt_keywords"], str(tmp_path / "later"), root=str(project))
    (row,) = teach.grade(str(tmp_path / "later"), ["prompt_keywords"], root=str(project))[0]
    assert row["cases"] == 2 and row["points"] == 0.0, row


def test_values_whose_eq_is_always_true_cross_as_plain_values_or_not_at_all(cheating):
    out = cheating["run"].stdout
    assert (
        cheating["rows"]["uniqueness_reward"][-4] == "0/7"
        and points(cheating, "uniqueness_reward") == 0
    )
    assert (
        cheating["rows"]["coverage_reward"][-4] == "0/9"
        and points(cheating, "coverage_reward") == 0
    )
    assert "its value is no plain data: a reward.coverage_reward.<locals>.Anything" in out, out


def test_the_copys_assignment_json_decides_nothing(cheating):
    graded = [n for n in cheating["rows"] if n != "total"]
    assert graded == cheating["names"] and "token_logprobs" not in graded


def test_keyboard_interrupt_and_pytest_exit_fail_only_their_own_cases(cheating):
    run, rows = cheating["run"], cheating["rows"]
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert (
        cheating["left"] == set()
    )  # every student's process, killed or not, took its folder with it
    assert points(cheating, "summarize") == 0.0 and points(cheating, "entailment_index") == 0.0
    assert (
        "summarize: failed test_summary_uses_the_sample_std_and_accuracy_counts_scores_strictly_above_0_33: "
        in (run.stdout)
        and "StudentError: KeyboardInterrupt" in run.stdout
    )
    assert "StudentError: Exit: all done" in run.stdout
    for name in WRITTEN:  # graded beside every cheat, all their points
        assert float(rows[name][-3]) == float(rows[name][-1]) > 0, rows[name]
    assert float(rows["total"][-3]) == pytest.approx(
        15 + 17.8
    )  # the two written ones, the wrong loss


# ================================================================ what the student's process is
SNOOP = '''
import os, socket, sys


def look():
    """What the student's process can learn and do."""
    seen = [os.getcwd(), *sys.argv, *sys.path, *os.environ.values(), str(os.getppid())]
    for pid in ("self", str(os.getppid())):
        for what in ("cwd", "exe"):
            try:
                seen.append(os.readlink(f"/proc/{pid}/{what}"))
            except OSError as e:
                seen.append(type(e).__name__)
    tried = {}
    for name, attempt in {
        "read the project": lambda: open(os.path.join(PROJECT, "README.md")).read(),
        "write /tmp": lambda: open("/tmp/teach-snoop-was-here", "w").close(),
        "list /tmp": lambda: os.listdir("/tmp"),
        "connect": lambda: socket.create_connection(("127.0.0.1", 22), timeout=2),
        "fork": lambda: os._exit(0) if os.fork() == 0 else os.wait(),
        "the grader's cwd": lambda: os.readlink(f"/proc/{GRADER}/cwd"),
        "the grader's memory": lambda: open(f"/proc/{GRADER}/mem", "rb").close(),
        "signal the grader": lambda: os.kill(GRADER, 0),
    }.items():
        try:
            attempt()
            tried[name] = "done"
        except BaseException as e:
            tried[name] = type(e).__name__
    return seen, tried, os.getppid()
'''


def test_the_students_process_names_nothing_of_the_teachers_and_cannot_reach_it():
    snoop = SNOOP.replace("PROJECT", repr(ROOT)).replace("GRADER", str(os.getpid()))
    files = sandbox.project_modules(ROOT, {"snoop.py": snoop})
    child = sandbox.Child(
        files, {"mode": "function", "module": "snoop", "function": "look"}, ROOT, 30
    )
    try:
        seen, tried, parent = child.call([], {}, 30)
    finally:
        child.kill()
    assert not [s for s in seen if ROOT in s], (
        seen
    )  # no path, argument, variable or parent names it
    assert parent != os.getpid()  # its parent is not the grader: it left it
    if LANDLOCK:
        tries = (
            "read the project",
            "write /tmp",
            "list /tmp",
            "the grader's cwd",
            "the grader's memory",
        )
        assert {tried[k] for k in tries} == {"PermissionError"}, tried
        if sandbox.landlock_abi() >= 6:
            assert tried["signal the grader"] == "PermissionError", tried
        assert any("Landlock" in s for s in child.isolation), child.isolation
    else:  # what a student's code can do without Landlock (docs/assignments.md)
        if os.path.exists("/tmp/teach-snoop-was-here"):
            os.remove("/tmp/teach-snoop-was-here")
    if "network namespace (no network)" in child.isolation:
        assert tried["connect"] != "done", tried


def test_plain_data_crosses_and_nothing_else_does():
    import numpy as np
    import torch

    value = [1, 2.5, float("nan"), "s", None, True, (1, (2,)), {3, 4}, {(1, 2): [np.float32(0.5)]}]
    value += [
        np.arange(6, dtype=np.int16).reshape(2, 3),
        torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
    ]
    back = wire.Decoder()(json.loads(json.dumps(wire.Encoder()(value))))
    assert back[:2] == value[:2] and np.isnan(back[2]) and back[3:9] == value[3:9]
    assert type(back[6]) is tuple and type(back[8][(1, 2)][0]) is np.float32
    assert back[9].dtype == np.int16 and back[9].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert back[10].dtype == torch.bfloat16 and back[10].tolist() == [1.0, 2.0]

    class Same(float):
        def __eq__(self, other):
            return True

    assert type(wire.Encoder()(Same(2.0))) is float  # a subclass crosses as its base type's value
    with pytest.raises(wire.NotPlain, match="no plain data"):
        wire.Encoder()(object())
    with pytest.raises(wire.WireError):
        wire.Decoder()({"t": "pickle", "v": "anything"})
    logp = torch.tensor(
        [[0.5]], requires_grad=True
    )  # a gradient crosses as a Jacobian and joins our graph
    dec = wire.Decoder()
    leaf = dec(json.loads(json.dumps(wire.Encoder()(logp))))
    loss = (leaf.exp() * 3).sum()
    enc = wire.Encoder()
    enc(logp)
    out = wire.Encoder(jacobian=wire.jacobians(dec.leaves))(loss)
    wire.Decoder(grad_sources=enc.grad_inputs)(json.loads(json.dumps(out))).backward()
    assert logp.grad.item() == pytest.approx(3 * 2.718281828**0.5)


# ================================================================ nothing but the function takes part; time
FOOLS = {  # files a student adds to a copy, hoping for points
    "conftest.py": "import pytest\n@pytest.hookimpl(hookwrapper=True)\ndef pytest_runtest_makereport(item, call):\n"
    "    outcome = yield\n    outcome.get_result().outcome = 'passed'\n",
    "pytest.ini": "[pytest]\naddopts = -p no:python --deselect tests\n",
    "setup.cfg": "[tool:pytest]\naddopts = -k nothing_at_all\n",
    "pyproject.toml": "[tool.pytest.ini_options]\naddopts = '-k nothing_at_all'\n",
    "sitecustomize.py": "import builtins\nbuiltins.NotImplementedError = type('Fine', (Exception,), {})\n",
    "pytest.py": "import sys\nsys.exit(0)\n",
    "tests/test_reward.py": "def test_coverage_bucket_edges_are_half_open():\n    pass\n",
}


def test_files_added_or_edited_in_the_copy_and_the_module_around_the_def_change_no_score(tmp_path):
    """Every file of FOOLS at once, and a module constant edited with a helper written beside the def: tag_reward
    (blank) still fails all its cases, and ladder_bucket, which calls the helper, fails with a NameError."""
    copy = tmp_path / "copy"
    teach.make(["ladder_bucket", "tag_reward"], str(copy))
    for name, text in FOOLS.items():
        (copy / name).write_text(text)
    script = copy / "reward.py"
    text = script.read_text().replace(
        "COVERAGE_EDGES = (0.2, 0.4, 0.6, 0.8)", "COVERAGE_EDGES = (0.0,)"
    )
    script.write_text(
        text.replace('raise NotImplementedError("ladder_bucket', 'return _mine(rate)  # ("')
        + "\n\ndef _mine(rate):\n    return 0\n"
    )
    rows = by_name(teach.grade(str(copy), ["ladder_bucket", "tag_reward"])[0])
    assert [(r["points"], r["cases"] > 0) for r in rows.values()] == [(0.0, True), (0.0, True)]
    assert "NameError" in " ".join(m for _, m in rows["ladder_bucket"]["failed"])


def test_a_student_function_that_breaks_its_module_scores_zero_with_the_reason(tmp_path):
    teach.make(["uniqueness_bucket"], str(tmp_path / "copy"))
    script = tmp_path / "copy" / "reward.py"
    broken = script.read_text().replace(
        'raise NotImplementedError("uniqueness_bucket', 'return (u ==\n    ("'
    )
    script.write_text(broken)  # an unclosed bracket
    (row,) = teach.grade(str(tmp_path / "copy"), ["uniqueness_bucket"])[0]
    assert (row["points"], row["cases"]) == (0, 0)
    assert "does not parse" in row["note"] and "SyntaxError" in row["note"]


LOOPS = (
    "split_perspectives",
    "greedy_matches",
    "ladder_bucket",
    "coverage_reward",
    "redundant_flags",
    "uniqueness_bucket",
    "uniqueness_reward",
    "format_score",
    "tag_reward",
)


def test_nine_functions_that_loop_forever_cost_only_their_own_points_within_their_limits(tmp_path):
    """Each loops in every case: a case is killed after 1 s, a function stops after 3 s in all (restarts
    included); prompt_keywords, written, keeps its points. The run takes the nine functions' limits plus the
    teacher's own start, whatever the loops (the default limits, 15 s and 45 s, give at most 7.5 minutes)."""
    copy = tmp_path / "copy"
    teach.make([*LOOPS, "prompt_keywords"], str(copy))
    text = (copy / "reward.py").read_text()
    for name in LOOPS:
        text = text.replace(f'raise NotImplementedError("{name}', 'while True: pass  # ("')
    (copy / "reward.py").write_text(text)
    write_defs(copy, reference_defs("prompt_keywords"))
    t0 = time.time()
    rows, _ = teach.grade(str(copy), [*LOOPS, "prompt_keywords"], case_timeout=1, timeout=3)
    took = time.time() - t0
    rows = by_name(rows)
    for name in LOOPS:
        r = rows[name]
        assert r["points"] == 0 and r["timeouts"] >= 1 and r["note"].startswith("timeout"), r
        assert all("time limit" in m or "used up" in m for _, m in r["failed"]), r["failed"]
    assert rows["prompt_keywords"]["points"] == 5.0
    assert took < 9 * (3 + 2) + 60, took  # each function at most its 3 s and a start of its own


def test_a_failing_check_names_the_rule_it_checks(tmp_path):
    """A grpo_loss (the docstring-only one above) that counts every clipped-ratio token, whatever the advantage's
    sign: the grader's output says which rule of clip_frac it broke; --verbose adds pytest's whole report."""
    copy = tmp_path / "copy"
    teach.make(["grpo_loss"], str(copy))
    right = "((ratio > 1 + clip_eps) & (adv > 0)) | ((ratio < 1 - clip_eps) & (adv < 0))"
    assert right in HONEST["grpo_loss"]
    wrong = HONEST["grpo_loss"].replace(right, "(ratio > 1 + clip_eps) | (ratio < 1 - clip_eps)")
    write_defs(copy, {"grpo_loss": wrong})
    run = cli("grade", copy, "--week", "1", "--verbose")
    assert "clip_frac: share of answer tokens whose clip is active" in run.stdout, run.stdout
    assert "pytest's report" in run.stdout and "def test_grpo_loss_clip_cases_by_hand" in run.stdout
    assert "Traceback" not in run.stderr and table(run.stdout)["grpo_loss"][-4] == "6/9"


# ================================================================ week 2: tests that catch hidden mutants
def projects_own_tests():
    """The project's own tests of week 1's functions, as a student's test file (with the module's helpers and the
    imports the student's process has): by construction they catch every mutant the grader may hide."""
    source = open(os.path.join(ROOT, "tests", "test_opgrpo_min.py")).read()
    wanted = {i.split("::")[1] for n in assignable.UNDER_TEST for i in assignable.ASSIGNABLE[n][1]}
    there = {"math", "numpy", "pytest", "torch", "opgrpo_min", "reward", "harness"}
    lines, out = source.splitlines(), []
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            )
            keep = all(m and m.split(".")[0] in there for m in modules)
        else:
            name = getattr(node, "name", "")
            keep = isinstance(node, ast.FunctionDef) and (
                name in wanted or not name.startswith("test_")
            )
        if keep:
            first = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
            out.append("\n".join(lines[first - 1 : node.end_lineno]))
    return "\n\n\n".join(out) + "\n"


WEAK = """import inspect

import opgrpo_min as om


def test_the_functions_exist():
    assert callable(om.group_advantages) and callable(om.grpo_loss)


def test_a_wrong_expectation():
    assert om.group_advantages([1.0, 0.0], group_size=2).tolist() == [5.0, 5.0]


def test_the_source_is_the_hand_outs():
    hand_out = open("opgrpo_min.py").read()
    assert inspect.getsource(om.grpo_loss) in hand_out
"""


@pytest.fixture(scope="module")
def week2(tmp_path_factory):
    copy = tmp_path_factory.mktemp("copies") / "hw2"
    teach.make(teach.week_blanks(2), str(copy), week=2)
    return copy


def test_week2_copy_keeps_week_1s_functions_blanks_every_later_weeks_and_holds_the_starter(week2):
    reward = (week2 / "reward.py").read_text()
    opgrpo = (week2 / "opgrpo_min.py").read_text()
    for name in assignable.UNDER_TEST:
        assert f'NotImplementedError("{name}' not in opgrpo
    for week in (3, 4, 5):
        for name in teach.WEEKS[week]:
            script = (week2 / teach.find_functions(ROOT, [name])[name]).read_text()
            assert f'NotImplementedError("{name}: {assignable.TODO}")' in script, name
    assert (
        "def ladder_bucket" in reward and (week2 / teach.STUDENT_TESTS).read_text() == teach.STARTER
    )
    assert set(teach.week_blanks(1)) == {n for names in teach.WEEKS.values() for n in names}
    assert set(teach.week_blanks(3)) == set(
        teach.WEEKS[3] + teach.WEEKS[5]
    )  # probe threshold: whole rewards


def test_week2_tests_that_catch_every_mutant_score_full(week2, tmp_path):
    copy = tmp_path / "hw2"
    shutil.copytree(week2, copy)
    (copy / teach.STUDENT_TESTS).write_text(projects_own_tests())
    from teach import mutants

    result = mutants.grade_tests(str(copy), seed=35, k=3)
    assert result["points"] == mutants.POINTS and result["caught"] == 3, result["note"]
    assert all(r["on_reference"] == "passed" for r in result["tests"].values())


def test_week2_tests_that_catch_nothing_or_fail_on_the_reference_score_zero(week2, tmp_path):
    """Three tests: one that passes whatever the functions compute, one that fails on the reference (it would
    'catch' every mutant: it earns nothing), and one that compares the function's source with the hand-out's (the
    function stays with the grader: the test sees a stand-in). Printed by the command line."""
    copy = tmp_path / "hw2"
    shutil.copytree(week2, copy)
    (copy / teach.STUDENT_TESTS).write_text(WEAK)
    run = cli("grade", copy, "--week", "2", "--seed", "35", "--mutants", "3", "--verbose")
    assert run.returncode == 0, run.stderr
    assert "hidden mutants caught: 0 of 3: 0.0 / 20" in run.stdout, run.stdout
    lines = {x.split()[0]: x for x in run.stdout.splitlines() if x.startswith("test_")}
    assert lines["test_the_functions_exist"].split()[-2:] == ["passed", "-"]
    assert "nothing: it must pass on the reference" in lines["test_a_wrong_expectation"]
    assert "failed" in lines["test_the_source_is_the_hand_outs"]
    assert (
        len(re.findall(r"^M\d \(missed\): ", run.stdout, re.M)) == 3
    )  # --verbose: what each changed


def test_week2_mutants_are_the_seeds_choice_among_those_the_projects_tests_catch():
    from teach import mutants

    a, b = (mutants.hidden(ROOT, assignable.UNDER_TEST, seed, 6) for seed in (1, 2))
    assert (
        a == mutants.hidden(ROOT, assignable.UNDER_TEST, 1, 6) and a != b
    )  # the seed decides, and only it
    catchable = {m["source"] for m in mutants.killable(ROOT, tuple(assignable.UNDER_TEST))}
    assert {m["source"] for m in a + b} <= catchable
    assert {m["function"] for m in a} == set(
        assignable.UNDER_TEST
    )  # taken in turn from each function
    for m in a:
        reference = reference_defs(m["function"])[m["function"]]
        assert ast.dump(ast.parse(m["source"])) != ast.dump(ast.parse(textwrap.dedent(reference)))


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
    kit = set(os.listdir(all_blanked / "teach"))
    assert not {"measure.py", "mutants.py", "planted_bugs.json"} & kit and "probe.py" in kit
    with open(os.path.join(ROOT, "data", "train.jsonl"), "rb") as f:
        assert (all_blanked / "data" / "train.jsonl").read_bytes() == f.read()


def test_the_copy_has_no_broken_link(all_blanked):
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
        first, last = assignable.spans(source, [name])[name]
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


# ================================================================ planted bugs (the in-class demo)
def test_each_seed_plants_one_of_at_least_four_bugs_that_neither_diff_nor_file_times_give_away(
    tmp_path,
):
    """The snippets of teach/planted_bugs.json follow opgrpo_min.py's text: after a rewrite of the script, only
    that file needs updating (make names the snippet that no longer matches)."""
    import difflib

    table_ = json.load(open(os.path.join(ROOT, "teach", "planted_bugs.json")))
    assert len(table_["bugs"]) >= 4
    bugs = {
        seed: teach.make([], str(tmp_path / f"s{seed}"), plant=seed)["bug"] for seed in range(6)
    }
    assert set(bugs.values()) == set(table_["bugs"])  # every bug, one per seed
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
        bug_old = table_["bugs"][bugs[seed]][1]
        assert bug_old not in texts[seed]  # it is planted
    reference = open(os.path.join(ROOT, "opgrpo_min.py")).read()
    for _script, old, new in table_["decoys"]:
        assert reference.count(old) == 1 and old != new


def test_a_bug_list_that_no_longer_matches_the_code_fails_loudly_and_writes_nothing(
    project, tmp_path
):
    table_ = json.load(open(os.path.join(ROOT, "teach", "planted_bugs.json")))
    table_["decoys"].append(["opgrpo_min.py", "a line the code does not hold", "x"])
    (project / "teach" / "planted_bugs.json").write_text(json.dumps(table_))
    try:
        run = cli(
            "make", "--blank", "none", "--plant", "1", "--out", tmp_path / "demo", root=project
        )
    finally:
        (project / "teach" / "planted_bugs.json").unlink()
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert (
        "is out of date: its decoy" in run.stderr
        and "'a line the code does not hold'" in run.stderr
    )
    assert not (tmp_path / "demo").exists()


def test_the_bug_list_stays_with_the_teacher(tmp_path):
    teach.make([], str(tmp_path / "plain"))
    run = cli(
        "make",
        "--blank",
        "none",
        "--plant",
        "3",
        "--out",
        tmp_path / "again",
        root=tmp_path / "plain",
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
        and "process of its own" in cli("grade", "--help").stdout
    )
    run = subprocess.run(
        [sys.executable, "-c", "import teach.run, teach.sandbox, teach.referee, teach.wire"],
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
        (["make", "--out", "{tmp}/s"], "say what to blank: --week N"),
        (["make", "--week", "9", "--out", "{tmp}/s"], "--week 9: there are weeks 1 to 5"),
        (["make", "--blank", "grpo_loss", "--out", "{tmp}/full"], "is not empty"),
        (["make", "--blank", "grpo_loss", "--out", "{tmp}/full/a_file"], "is a file"),
        (["grade", "{tmp}/full"], "name what was assigned: --week N"),
        (["grade", "{tmp}/nowhere", "--week", "1"], "no such directory"),
        (["grade", "{tmp}/full", "--week", "1", "--timeout", "0"], "--timeout 0: must be > 0"),
        (
            ["grade", "{tmp}/full", "--week", "1", "--case-timeout", "-1"],
            "--case-timeout -1: must be",
        ),
        (["grade", "{tmp}/full", "--week", "2"], "--week 2 needs --seed"),
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
