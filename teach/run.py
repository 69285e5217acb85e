"""The teaching kit: blank the functions a student should write, then grade only what the student wrote.

    python teach/run.py list                                                  # the assignable functions, points, tests
    python teach/run.py make --blank group_advantages,grpo_loss --out hw1     # a student copy with those bodies removed
    python teach/run.py make --blank none --plant 17 --out hw2-17             # a full copy with student 17's planted bug
    python teach/run.py grade hw1                                             # points per function and a total

make copies the project (what git tracks or would track; not runs/, .git, nor the teacher's files of TEACHER_ONLY).
Each named function keeps its decorators, signature and docstring, worked example and contract included; its body
becomes `raise NotImplementedError`. A test that would show a blanked function's body (marked
@pytest.mark.reveals("NAME")) is left out of the copy, and a link to a file the copy lacks becomes plain text.
With --plant SEED the copy gets one of the bugs of teach/planted_bugs.json (chosen by SEED) among a seeded half of its
decoys (rewrites that change nothing), and every file of the copy carries the same time: neither a diff of two
copies nor `ls -lt` points at the bug.

grade takes only the source of each assigned function from the copy and puts it into a fresh copy of this project
(the teacher's), where the project's own tests run: nothing else of the student's files takes part (no conftest.py,
pytest.ini, sitecustomize, edited test or module-level code). A function is worth its points in ASSIGNABLE, shared
equally by its test cases: points x passed / cases. A function whose tests do not import or run past --timeout scores
0, and is shown as such. Every failing check prints the rule it checks; --verbose prints pytest's whole report.
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
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project
CORE = (
    "opgrpo_min.py",
    "reward.py",
    "eval_nli.py",
    "sim_train.py",
    "extras/judge.py",
)  # where functions are
MANIFEST = (
    "assignment.json"  # written by make into the student copy: what was assigned, and its points
)
TIMEOUT = 120  # seconds the tests of one function may run (--timeout)
TODO = "write this function (its docstring says what it must do)"  # the message of a blanked body
TEACHER_ONLY = (
    "runs",
    "docs/assignments.md",
    "teach/measure.py",
    "teach/planted_bugs.json",
)
BUGS = os.path.join(
    ROOT, "teach", "planted_bugs.json"
)  # {"bugs": {name: [script, old, new]}, "decoys": [...]}
FIXED_TIME = 1767225600  # 2026-01-01 00:00 UTC: the time every file of a planted copy carries


def tests(file, *names):
    return [f"tests/{file}::{name}" for name in names]


# ================================================================ what can be assigned, and what grades it
# function -> (points, the tests that check it by hand-computed values). They call pure functions or the tiny models
# of tests/conftest.py; nothing trains. The comments name the paper's stage (docs/paper_to_code.md).
ASSIGNABLE = {
    # GRPO (DeepSeekMath eq. 3-4): opgrpo_min.py
    "group_advantages": (
        10,
        tests(
            "test_opgrpo_min.py",
            "test_group_advantages_hand_example",
            "test_group_advantages_are_per_group_and_zero_without_spread",
        ),
    ),
    "token_logprobs": (
        15,
        tests(
            "test_opgrpo_min.py",
            "test_token_logprobs_match_a_plain_forward_and_ignore_left_padding",
        ),
    ),
    "grpo_loss": (
        20,
        tests(
            "test_opgrpo_min.py",
            "test_grpo_loss_clip_cases_by_hand",
            "test_dual_clip_off_leaves_the_ppo_loss",
            "test_k3_kl_is_zero_at_the_reference_and_matches_its_formula",
            "test_loss_is_a_token_mean_and_ignores_masked_tokens",
        ),
    ),
    # Stage 2, the reward: reward.py
    "split_perspectives": (
        5,
        tests(
            "test_reward.py",
            "test_split_cuts_before_each_opener_that_starts_the_text_or_a_line",
            "test_split_ignores_indented_openers_and_openers_inside_a_line",
        ),
    ),
    "greedy_matches": (
        10,
        tests(
            "test_reward.py",
            "test_coverage_threshold_is_inclusive_also_in_float32_and_torch",
            "test_coverage_non_mutual_maximum_falls_back_to_the_next_best_candidate",
            "test_coverage_ties_go_to_the_lowest_reference_then_the_lowest_candidate",
            "test_coverage_matching_is_one_to_one",
        ),
    ),
    "ladder_bucket": (
        5,
        tests(
            "test_reward.py",
            "test_coverage_bucket_edges_are_half_open",
            "test_coverage_bucket_is_exact_for_every_fraction_matches_over_references",
        ),
    ),
    "coverage_reward": (
        5,
        tests(
            "test_reward.py",
            "test_coverage_reward_of_k_matches_out_of_five_references",
            "test_coverage_bucket_one_needs_a_rate_below_one_fifth",
            "test_coverage_of_an_empty_answer_is_zero",
            "test_coverage_rejects_bad_matrices_clearly",
        ),
    ),
    "redundant_flags": (
        10,
        tests(
            "test_reward.py",
            "test_a_flagged_perspective_flags_nobody",
            "test_uniqueness_threshold_is_inclusive",
        ),
    ),
    "uniqueness_bucket": (
        5,
        tests("test_reward.py", "test_uniqueness_bucket_edges_are_open_below"),
    ),
    "uniqueness_reward": (
        5,
        tests(
            "test_reward.py",
            "test_uniqueness_reward_buckets",
            "test_one_perspective_gets_full_uniqueness_unless_min_perspectives_asks_for_more",
            "test_uniqueness_of_no_perspectives_is_zero",
        ),
    ),
    "format_score": (
        10,
        tests(
            "test_reward.py",
            "test_format_full_marks_for_perspective_lines_and_a_summary_naming_them",
            "test_format_summary_term_by_share_of_names",
            "test_format_names_without_a_summary_cost_the_full_summary_term",
            "test_format_segment_share_edges_are_inclusive",
            "test_format_duplicate_sentences_and_names_cost_half_a_point_each",
            "test_format_of_prose_and_of_an_empty_answer_is_zero",
        ),
    ),
    "tag_reward": (
        5,
        tests(
            "test_reward.py",
            "test_tag_accepts_exactly_one_core_block_then_one_summary",
            "test_tag_penalises_everything_else",
        ),
    ),
    "prompt_keywords": (
        5,
        tests(
            "test_reward.py",
            "test_prompt_keywords_are_the_situations_content_words",
            "test_stopwords_are_nltks_english_list",
        ),
    ),
    "mask_words": (
        5,
        tests(
            "test_reward.py",
            "test_mask_words_replaces_keywords_whatever_their_case_and_keeps_punctuation",
        ),
    ),
    # Stage 1, the similarity estimator's triplets: sim_train.py and extras/judge.py (a fake judge answers)
    "mine_triplets": (
        10,
        tests(
            "test_sim_train.py",
            "test_mine_triplets_pairs_each_explanation_with_its_paraphrase_and_most_similar_sibling",
            "test_mine_triplets_skips_perspectives_without_paraphrase_or_sibling",
        ),
    ),
    "judge_triplets": (
        10,
        tests(
            "test_sim_train.py",
            "test_judge_triplets_take_first_yes_as_positive_and_most_similar_no_as_negative",
            "test_judge_triplets_ask_nothing_below_the_threshold",
        ),
    ),
    # Evaluation (Modular Pluralism's NLI score): eval_nli.py
    "situation_score": (
        5,
        tests(
            "test_eval_nli.py",
            "test_situation_score_is_the_mean_over_perspectives_of_the_max_over_sentences",
            "test_an_empty_answer_scores_zero_and_sends_no_pair_to_the_nli_model",
        ),
    ),
    "summarize": (
        5,
        tests(
            "test_eval_nli.py",
            "test_summary_uses_the_sample_std_and_accuracy_counts_scores_strictly_above_0_33",
        ),
    ),
    "entailment_index": (
        5,
        tests(
            "test_eval_nli.py",
            "test_entailment_index_is_read_from_id2label_in_any_order_and_case",
            "test_nli_model_without_an_entailment_label_is_a_clear_error",
        ),
    ),
}


class TeachError(ValueError):
    """Bad input to make or grade: main prints it as one line."""


# ================================================================ finding and replacing functions
def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def find_functions(root, names):
    """{name: core script} for each name: a module-level def in exactly one of the core scripts under root."""
    places = {name: [] for name in names}
    for script in CORE:
        path = os.path.join(root, script)
        if os.path.isfile(path):
            for node in ast.parse(read(path), filename=path).body:
                if (
                    isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and node.name in places
                ):
                    places[node.name].append(script)
    for name, found in places.items():
        if len(found) != 1:
            where = " and ".join(found) if found else "none of " + ", ".join(CORE)
            raise TeachError(
                f"{name} must be defined once at the top level of a core script; it is in {where}"
            )
    return {name: found[0] for name, found in places.items()}


def spans(source, names, kind=ast.FunctionDef):
    """{name: (first line, last line)} (1-based, decorators included) of the top-level defs of `names`."""
    return {
        node.name: (min([d.lineno for d in node.decorator_list] + [node.lineno]), node.end_lineno)
        for node in ast.parse(source).body
        if isinstance(node, kind) and node.name in names
    }


def indent(line):
    return len(line) - len(line.lstrip())


def blank_source(source, names):
    """`source` with the body of each named top-level function replaced by `raise NotImplementedError(...)`.
    Decorators, signature, docstring and everything outside the body stay; comments that trail the body go with it.

    >>> print(blank_source('def f(x):\\n    "Doubles x."\\n    return 2 * x\\n', ["f"]), end="")
    def f(x):
        "Doubles x."
        raise NotImplementedError("f: write this function (its docstring says what it must do)")
    """
    lines = source.splitlines(keepends=True)
    cuts = []  # (first, last) 1-based lines, their new text
    for node in ast.parse(source).body:
        if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names):
            continue
        body, has_doc = node.body, ast.get_docstring(node, clean=False) is not None
        if body[0].lineno == node.lineno:
            raise TeachError(
                f"{node.name}: its body starts on the def line; put it on lines of its own to blank it"
            )
        first = (
            body[0].end_lineno + 1 if has_doc else body[0].lineno
        )  # the first line of code after the docstring
        while not has_doc and lines[first - 2].lstrip().startswith(
            "#"
        ):  # comments that open the body: body too
            first -= 1
        last = node.end_lineno
        for k in range(last, len(lines)):  # comments indented under the def: body too
            if lines[k].strip() and not (
                lines[k].lstrip().startswith("#") and indent(lines[k]) > node.col_offset
            ):
                break
            if lines[k].strip():
                last = k + 1
        pad = lines[body[0].lineno - 1][: indent(lines[body[0].lineno - 1])]
        cuts.append((first, last, f'{pad}raise NotImplementedError("{node.name}: {TODO}")\n'))
    for first, last, raise_line in reversed(cuts):
        lines[first - 1 : last] = [raise_line]
    return "".join(lines)


def replace_functions(source, new):
    """`source` with each top-level function named in `new` ({name: its whole source}) put in its place."""
    lines = source.splitlines(keepends=True)
    for name, (first, last) in sorted(spans(source, new).items(), key=lambda kv: -kv[1][0]):
        lines[first - 1 : last] = [new[name].rstrip("\n") + "\n"]
    return "".join(lines)


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


def parse_names(text):
    """--blank's value: 'a, b' -> ['a', 'b']; 'all' -> every assignable function; 'none' -> []."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise TeachError(
            f"--blank {text!r} names no function; give names separated by commas, 'all' or 'none'"
        )
    return list(ASSIGNABLE) if names == ["all"] else [] if names == ["none"] else names


def check_names(names):
    """Unknown names are an error that lists the choices."""
    unknown = [n for n in names if n not in ASSIGNABLE]
    if unknown:
        raise TeachError(
            f"--blank: {', '.join(map(repr, unknown))} is not an assignable function; choose from "
            f"{', '.join(ASSIGNABLE)} (python teach/run.py list)"
        )


def planted(texts, seed, root=ROOT):
    """The scripts in `texts` ({script: source}) with the bug that `seed` picks from teach/planted_bugs.json, among a
    seeded half of its decoys. Returns (the bug's name, the new texts)."""
    path = os.path.join(root, "teach", "planted_bugs.json")
    if not os.path.isfile(path):
        raise TeachError(
            f"--plant needs the teacher's bug list {path}; it is not in a student copy"
        )
    table = json.loads(read(path))
    names = sorted(table["bugs"])
    bug = names[seed % len(names)]
    rng = random.Random(seed)
    edits = [table["bugs"][bug]] + [d for d in table["decoys"] if rng.random() < 0.5]
    for script, old, new in edits:
        text = texts.setdefault(script, read(os.path.join(root, script)))
        if text.count(old) != 1:
            raise TeachError(
                f"{path}: {old!r} is not in {script} exactly once; update the bug list"
            )
        texts[script] = text.replace(old, new)
    return bug, texts


def make(names, out, root=ROOT, plant=None):
    """Write a student copy of the project under root to `out` (new, or an empty directory) with the named functions
    blanked (none: a plain copy) and, with `plant`, a planted bug. Everything is checked before anything is written;
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


# ================================================================ grade
def read_manifest(copy):
    """{function: script} that was assigned in a student copy."""
    path = os.path.join(copy, MANIFEST)
    if not os.path.isdir(copy):
        raise TeachError(f"{copy}: no such directory")
    if not os.path.isfile(path):
        raise TeachError(
            f"{copy}: no {MANIFEST}, so this is no student copy; make one with "
            f"python teach/run.py make --blank NAMES --out DIR (or name the functions with --blank)"
        )
    try:
        blanked = dict(json.loads(read(path))["blanked"])
    except (ValueError, KeyError, TypeError) as e:
        raise TeachError(
            f"{path}: not a manifest written by teach/run.py make ({type(e).__name__}: {e})"
        ) from None
    check_names(blanked)
    return blanked


def students_functions(copy, where):
    """({name: its source in the student's copy}, {name: why it cannot be taken}) for `where` ({name: script}).
    Only the def itself is taken: decorators, signature, docstring and body."""
    found, broken = {}, {}
    for name in where:
        path = os.path.join(copy, where[name])
        try:
            source = read(path)
            first, last = spans(source, [name]).get(name, (None, None))
        except (OSError, SyntaxError, ValueError) as e:
            broken[name] = f"{where[name]} does not parse: {type(e).__name__}: {e}"
            continue
        if first is None:
            broken[name] = f"no top-level def {name} in {where[name]}"
        else:
            found[name] = "".join(source.splitlines(keepends=True)[first - 1 : last])
    return found, broken


def case_id(case):
    """pytest's node id of a junit-xml <testcase>: classname 'tests.test_reward' -> 'tests/test_reward.py'."""
    return case.get("classname").replace(".", "/") + ".py::" + case.get("name")


def run_pytest(project, ids, timeout):
    """One pytest run of `ids` in `project`, ignoring any ini file around it: (outcomes, broken, trouble, report).
    outcomes: {case: '' if it passed, else the first line of its failure}; broken: {test file: why it does not
    import}; trouble: why the run gave no result (past `timeout` seconds, or crashed), else ''; report: its text."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "report.xml")
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
            project,
            "--continue-on-collection-errors",
            f"--junitxml={xml}",
            *dict.fromkeys(ids),
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
        try:
            proc = subprocess.run(
                cmd, cwd=project, capture_output=True, text=True, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired:
            return (
                {},
                {},
                f"timeout: its tests ran past --timeout {timeout:g} s (an endless loop?)",
                "",
            )
        if proc.returncode < 0 or not os.path.isfile(xml):
            return (
                {},
                {},
                f"pytest crashed (exit status {proc.returncode})",
                proc.stdout + proc.stderr,
            )
        cases = list(ET.parse(xml).getroot().iter("testcase"))
    outcomes, broken = {}, {}
    for case in cases:
        bad = [e for e in case if e.tag in ("failure", "error", "skipped")]
        why = ((bad[0].get("message") or "").strip().splitlines() or [bad[0].tag])[0] if bad else ""
        if case.get("classname"):
            outcomes[case_id(case)] = (
                outcomes.get(case_id(case)) or why
            )  # a teardown error fails a passed case
        else:  # pytest's record of a module that did not import
            said = [
                line[1:].strip()
                for line in (case.findtext("error") or "").splitlines()
                if line.startswith("E ")
            ]
            broken[case.get("name").replace(".", "/") + ".py"] = (
                said[-1] if said else "see pytest's output"
            )
    if not outcomes and not broken:  # a test id that is not there: the table is stale
        said = (proc.stdout + proc.stderr).strip().splitlines()
        raise TeachError(
            f"pytest ran none of {' '.join(ids)}: {said[-1] if said else proc.returncode}"
        )
    return outcomes, broken, "", proc.stdout + proc.stderr


def score(name, script, outcomes, broken, trouble, report=""):
    """One function's row: dict(function, script, of, cases, passed, points, failed, note, report)."""
    of, ids = ASSIGNABLE[name]
    files = sorted({i.split("::")[0] for i in ids} & set(broken))
    mine = {case: why for case, why in outcomes.items() if case.split("[")[0] in ids}
    if trouble or files:  # the tests never ran: no case to count
        mine = {}
        trouble = trouble or "; ".join(f"{f} does not import: {broken[f]}" for f in files)
    failed = [(case, why) for case, why in mine.items() if why]
    passed = len(mine) - len(failed)
    return dict(
        function=name,
        script=script,
        of=of,
        cases=len(mine),
        passed=passed,
        failed=failed,
        note=trouble,
        points=round(of * passed / len(mine), 1) if mine else 0.0,
        report=report,
    )


def grade(copy, timeout=TIMEOUT, names=None, log=None, root=ROOT, alone=False):
    """Grade the functions `names` (default: those the copy's manifest lists) of a student copy: each student's def
    goes into a fresh copy of the project under root, whose own tests then run. One pytest run for all (the tiny
    models load once); if it gives no result, or `alone`, each function runs on its own, so only the one at fault
    scores 0 (and each row's report is its own)."""
    copy = os.path.abspath(copy)
    names = list(read_manifest(copy)) if names is None else names
    check_names(names)
    where = find_functions(root, names)
    found, broken = students_functions(copy, where)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = os.path.join(tmp, "project")
        for rel in project_files(root):
            os.makedirs(os.path.join(fresh, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(root, rel), os.path.join(fresh, rel))
        for script in set(
            where.values()
        ):  # the assigned functions as the student wrote them, the rest ours
            mine = {n: found[n] for n in found if where[n] == script}
            blank = [n for n in broken if where[n] == script]
            text = blank_source(read(os.path.join(root, script)), blank)
            with open(os.path.join(fresh, script), "w", encoding="utf-8") as f:
                f.write(replace_functions(text, mine))
        ids = [i for n in names for i in ASSIGNABLE[n][1]]
        joint = (
            ({}, {}, "each alone", "") if alone else run_pytest(fresh, ids, timeout * len(names))
        )
        rows = []
        for name in names:
            if name in broken:
                row = score(name, where[name], {}, {}, broken[name])
            else:
                row = score(
                    name,
                    where[name],
                    *(run_pytest(fresh, ASSIGNABLE[name][1], timeout) if joint[2] else joint),
                )
            rows.append(row)
            if log:
                log(row)
    return rows


# ================================================================ command line
def print_row(r):
    done = (
        "timeout"
        if r["note"].startswith("timeout")
        else f"{r['passed']}/{r['cases']}"
        if r["cases"]
        else "-"
    )
    print(
        f"{r['function']:<20} {r['script']:<16} {done:>8} {r['points']:>7.1f} / {r['of']}",
        flush=True,
    )


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
        help="the assignable functions, where they are, their points and the tests that grade them",
    )
    m = sub.add_parser(
        "make",
        help="write a student copy with some functions blanked (and a bug planted)",
        description="Write a student copy of the project: the named functions keep signature and "
        "docstring, their bodies raise NotImplementedError; with --plant SEED, one of the "
        "planted bugs (chosen by SEED) hides among rewrites that change nothing.",
    )
    m.add_argument(
        "--blank",
        required=True,
        help="functions to blank, separated by commas, 'all', or 'none' "
        "(python teach/run.py list shows them)",
    )
    m.add_argument(
        "--plant", type=int, metavar="SEED", help="plant the bug SEED picks (e.g. a student number)"
    )
    m.add_argument("--out", required=True, help="a new (or empty) directory for the student copy")
    g = sub.add_parser(
        "grade",
        help="grade a student copy: its assigned functions in a fresh copy of the project",
        description="Take the assigned functions from a student copy, put them into a fresh copy of "
        "this project, run this project's tests there, and print points per function.",
    )
    g.add_argument("dir", help="a student copy written by teach/run.py make")
    g.add_argument(
        "--blank", help="the functions to grade (default: those the copy's assignment.json lists)"
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT,
        help=f"seconds the tests of one function may run (default {TIMEOUT}); past it, it scores 0",
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
        if args.command == "list":
            where = find_functions(ROOT, ASSIGNABLE)
            for name, (points, ids) in ASSIGNABLE.items():
                print(f"{name:<20} {where[name]:<16} {points:>3} points  {'  '.join(ids)}")
        elif args.command == "make":
            manifest = make(parse_names(args.blank), args.out, plant=args.plant)
            print(
                f"wrote {args.out}: {len(manifest['blanked'])} function(s) blanked "
                f"({', '.join(manifest['blanked']) or 'none'}); grade with python teach/run.py grade {args.out}"
            )
            if manifest["bug"]:
                print(
                    f"planted for seed {args.plant}: {manifest['bug']} (teacher only: the copy does not say)"
                )
        else:
            if not args.timeout > 0:
                raise TeachError(f"--timeout {args.timeout:g}: must be > 0 seconds")
            names = parse_names(args.blank) if args.blank else list(read_manifest(args.dir))
            if not os.path.isdir(args.dir):
                raise TeachError(f"{args.dir}: no such directory")
            print(f"{'function':<20} {'in':<16} {'passed':>8} {'points':>7}")
            rows = grade(args.dir, args.timeout, names, log=print_row, alone=args.verbose)
            print(
                f"{'total':<20} {'':<16} {sum(r['passed'] for r in rows):>8} "
                f"{sum(r['points'] for r in rows):>7.1f} / {sum(r['of'] for r in rows)}"
            )
            for r in rows:
                if r["note"]:
                    print(f"{r['function']}: {r['note']}")
                messages = {message for _, message in r["failed"]}
                if (
                    len(r["failed"]) > 1 and len(messages) == 1
                ):  # e.g. every case: NotImplementedError
                    print(f"{r['function']}: failed all {len(r['failed'])} cases: {messages.pop()}")
                else:
                    for case, message in r["failed"]:
                        print(f"{r['function']}: failed {case.split('::')[1]}: {message}")
                if args.verbose and (r["failed"] or r["note"]) and r["report"]:
                    print(f"---- {r['function']}: pytest's report\n{r['report']}")
    except TeachError as e:
        print(f"teach/run.py {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
