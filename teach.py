"""Assignments built on this project: blank the functions a student should write, then grade the student's copy.

    python teach.py list                                                  # the assignable functions and their tests
    python teach.py make --blank group_advantages,grpo_loss --out hw1     # a student copy with those bodies removed
    python teach.py grade hw1                                             # points per function and a total

make copies the project (the files git tracks or would track: scripts, tests/, data/, scale/, requirements,
README; not runs/, .git or docs/, which is the teacher's: what students should observe, the bugs to plant). Each
named function keeps its decorators, signature and docstring, worked example included; its body becomes
`raise NotImplementedError`. Functions are found by name with `ast` in the core scripts,
wherever they live today. make writes assignment.json into the copy: what was blanked, and a hash of every file
under tests/ so that grade can tell when a test was edited.

grade runs, in the copy, the tests that check each blanked function by hand-computed values (ASSIGNABLE below),
all in one pytest run, and counts each function's cases. If that run hangs past --timeout or crashes, each function
runs again on its own, so a student's endless loop costs only that function's points.

Points rule: every blanked function is worth 10 points, shared equally by its test cases (a parametrised test counts
once per case): points = 10 x passed / cases. A skipped case counts as not passed. A function whose test file does
not import, or whose tests run longer than --timeout, scores 0.
Some functions are graded through others (measured: blank one, run every test of the table): coverage_reward's
tests also need greedy_matches and ladder_bucket, format_score's need split_perspectives, uniqueness_reward's need
redundant_flags and uniqueness_bucket, and redundant_flags' call uniqueness_reward. Blank such functions together
and the caller scores only once its callees work: set the callees first, or say so in the assignment.
"""
import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
CORE = ("opgrpo_min.py", "reward.py", "eval_nli.py", "sim_train.py", "plumbing.py")  # where functions are looked up
MANIFEST = "assignment.json"     # written by make into the student copy; grade reads it
POINTS = 10                      # per blanked function
TIMEOUT = 600                    # seconds a pytest run of grade may take (--timeout)
TODO = "write this function (its docstring says what it must do)"   # the message of a blanked body
TEACHER_ONLY = ("runs", "docs")  # top-level folders make leaves out: results, and what would give answers away


def tests(file, *names):
    return [f"tests/{file}::{name}" for name in names]


# ================================================================ what can be assigned, and what grades it
# function -> the tests that check it by hand-computed values. They call pure functions or the tiny models of
# tests/conftest.py; nothing trains. The comments name the paper's stage (README, "Paper to code").
ASSIGNABLE = {
    # GRPO (DeepSeekMath eq. 3-4): opgrpo_min.py
    "group_advantages": tests("test_opgrpo_min.py", "test_group_advantages_hand_example",
                              "test_group_advantages_are_per_group_and_zero_without_spread"),
    "token_logprobs": tests("test_opgrpo_min.py",
                            "test_token_logprobs_match_a_plain_forward_and_ignore_left_padding"),
    "grpo_loss": tests("test_opgrpo_min.py", "test_grpo_loss_clip_cases_by_hand",
                       "test_dual_clip_off_leaves_the_ppo_loss",
                       "test_k3_kl_is_zero_at_the_reference_and_matches_its_formula",
                       "test_loss_is_a_token_mean_and_ignores_masked_tokens"),
    # Stage 2, the reward: reward.py
    "split_perspectives": tests("test_reward.py", "test_split_cuts_before_each_opener_that_starts_the_text_or_a_line",
                                "test_split_ignores_indented_openers_and_openers_inside_a_line"),
    "greedy_matches": tests("test_reward.py", "test_coverage_threshold_is_inclusive_also_in_float32_and_torch",
                            "test_coverage_non_mutual_maximum_falls_back_to_the_next_best_candidate",
                            "test_coverage_ties_go_to_the_lowest_reference_then_the_lowest_candidate"),
    "ladder_bucket": tests("test_reward.py", "test_coverage_bucket_edges_are_half_open",
                           "test_coverage_bucket_is_exact_for_every_fraction_matches_over_references"),
    "coverage_reward": tests("test_reward.py", "test_coverage_reward_of_k_matches_out_of_five_references",
                             "test_coverage_bucket_one_needs_a_rate_below_one_fifth",
                             "test_coverage_matching_is_one_to_one", "test_coverage_of_an_empty_answer_is_zero",
                             "test_coverage_rejects_bad_matrices_clearly"),
    "redundant_flags": tests("test_reward.py", "test_a_flagged_perspective_flags_nobody",
                             "test_uniqueness_threshold_is_inclusive"),
    "uniqueness_bucket": tests("test_reward.py", "test_uniqueness_bucket_edges_are_open_below"),
    "uniqueness_reward": tests("test_reward.py", "test_uniqueness_reward_buckets",
                               "test_one_perspective_gets_full_uniqueness_unless_min_perspectives_asks_for_more",
                               "test_uniqueness_of_no_perspectives_is_zero"),
    "format_score": tests("test_reward.py",
                          "test_format_full_marks_for_perspective_lines_and_a_summary_naming_them",
                          "test_format_summary_term_by_share_of_names",
                          "test_format_names_without_a_summary_cost_the_full_summary_term",
                          "test_format_segment_share_edges_are_inclusive",
                          "test_format_duplicate_sentences_and_names_cost_half_a_point_each",
                          "test_format_of_prose_and_of_an_empty_answer_is_zero"),
    "tag_reward": tests("test_reward.py", "test_tag_accepts_exactly_one_core_block_then_one_summary",
                        "test_tag_penalises_everything_else"),
    "prompt_keywords": tests("test_reward.py", "test_prompt_keywords_are_the_situations_content_words"),
    "mask_words": tests("test_reward.py",
                        "test_mask_words_replaces_keywords_whatever_their_case_and_keeps_punctuation"),
    # Stage 1, the similarity estimator's triplets: sim_train.py (the real MiniLM embeds, a fake judge answers)
    "mine_triplets": tests("test_sim_train.py",
                           "test_mine_triplets_pairs_each_explanation_with_its_paraphrase_and_most_similar_sibling",
                           "test_mine_triplets_skips_perspectives_without_paraphrase_or_sibling"),
    "judge_triplets": tests("test_sim_train.py",
                            "test_judge_triplets_take_first_yes_as_positive_and_most_similar_no_as_negative",
                            "test_judge_triplets_ask_nothing_below_the_threshold"),
    # Evaluation (Modular Pluralism's NLI score): eval_nli.py
    "situation_score": tests("test_eval_nli.py",
                             "test_situation_score_is_the_mean_over_perspectives_of_the_max_over_sentences",
                             "test_an_empty_answer_scores_zero_and_sends_no_pair_to_the_nli_model"),
    "summarize": tests("test_eval_nli.py",
                       "test_summary_uses_the_sample_std_and_accuracy_counts_scores_strictly_above_0_33"),
    "entailment_index": tests("test_eval_nli.py", "test_entailment_index_is_read_from_id2label_in_any_order_and_case",
                              "test_nli_model_without_an_entailment_label_is_a_clear_error"),
}


class TeachError(ValueError):
    """Bad input to make or grade: main prints it as one line."""


# ================================================================ make: find, blank, copy
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
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in places:
                    places[node.name].append(script)
    for name, found in places.items():
        if len(found) != 1:
            where = " and ".join(found) if found else "none of " + ", ".join(CORE)
            raise TeachError(f"{name} must be defined once at the top level of a core script; it is in {where}")
    return {name: found[0] for name, found in places.items()}


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
    cuts = []                                                       # (first, last) 1-based lines, their new text
    for node in ast.parse(source).body:
        if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names):
            continue
        body, has_doc = node.body, ast.get_docstring(node, clean=False) is not None
        if body[0].lineno == node.lineno:
            raise TeachError(f"{node.name}: its body starts on the def line; put it on lines of its own to blank it")
        first = body[0].end_lineno + 1 if has_doc else body[0].lineno   # the first line of code after the docstring
        while not has_doc and lines[first - 2].lstrip().startswith("#"):   # comments that open the body: body too
            first -= 1
        last = node.end_lineno
        for k in range(last, len(lines)):                           # comments indented under the def: body too
            if lines[k].strip() and not (lines[k].lstrip().startswith("#") and indent(lines[k]) > node.col_offset):
                break
            if lines[k].strip():
                last = k + 1
        pad = lines[body[0].lineno - 1][:indent(lines[body[0].lineno - 1])]
        cuts.append((first, last, f'{pad}raise NotImplementedError("{node.name}: {TODO}")\n'))
    for first, last, raise_line in reversed(cuts):
        lines[first - 1:last] = [raise_line]
    return "".join(lines)


def copied(rel):
    """Whether make copies the file at `rel` (relative to the project)."""
    parts = rel.split(os.sep)
    return parts[0] not in TEACHER_ONLY and not {".git", "__pycache__", ".pytest_cache"} & set(parts) \
        and not rel.endswith(".pyc")


def project_files(root):
    """The files make copies, relative to root: what git tracks plus new files it does not ignore (without git:
    every file), less those `copied` leaves out and any student copy made inside root (its assignment.json)."""
    files = None
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True)
        if top.returncode == 0 and os.path.samefile(top.stdout.strip(), root):
            files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                   cwd=root, capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pass
    if files is None:
        files = []
        for here, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if copied(os.path.relpath(os.path.join(here, d), root))]   # never enter runs/
            files += [os.path.relpath(os.path.join(here, n), root) for n in names]
    files = [f for f in files if f and copied(f) and os.path.isfile(os.path.join(root, f))]
    copies = [os.path.dirname(f) + os.sep for f in files if os.path.basename(f) == MANIFEST and os.sep in f]
    return sorted(f for f in files if not f.startswith(tuple(copies)))   # nor student copies made inside root


def file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def parse_names(text):
    """--blank's value: 'a, b' -> ['a', 'b']; 'all' -> every assignable function."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise TeachError(f"--blank {text!r} names no function; give names separated by commas, or 'all'")
    return list(ASSIGNABLE) if names == ["all"] else names


def check_names(names):
    """Unknown names are an error that lists the choices."""
    unknown = [n for n in names if n not in ASSIGNABLE]
    if unknown:
        raise TeachError(f"--blank: {', '.join(map(repr, unknown))} is not an assignable function; choose from "
                         f"{', '.join(ASSIGNABLE)} (python teach.py list)")


def make(names, out, root=HERE):
    """Write a student copy of the project under root to `out` (new, or an empty directory) with the named functions
    blanked (none: a plain copy), plus its manifest. Everything is checked before anything is written; the copy
    appears whole or not at all. Returns the manifest."""
    check_names(names)
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise TeachError(f"--out {out}: is a file; give a new directory")
    if os.path.isdir(out) and os.listdir(out):
        raise TeachError(f"--out {out}: the directory is not empty; give a new directory, so no work is overwritten")
    where = find_functions(root, names)
    blanked = {script: blank_source(read(os.path.join(root, script)), [n for n in names if where[n] == script])
               for script in sorted(set(where.values()))}
    for script, text in blanked.items():                            # a blanked file that does not parse: our bug
        compile(text, os.path.join(out, script), "exec")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".teach-", dir=parent)
    try:
        for rel in project_files(root):
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
            shutil.copy2(os.path.join(root, rel), os.path.join(tmp, rel))
        for script, text in blanked.items():
            with open(os.path.join(tmp, script), "w", encoding="utf-8") as f:
                f.write(text)
        test_files = sorted(os.path.relpath(os.path.join(here, n), tmp)
                            for here, _, ns in os.walk(os.path.join(tmp, "tests")) for n in ns if n.endswith(".py"))
        manifest = dict(blanked={n: where[n] for n in names}, points_per_function=POINTS,
                        tests={rel: file_hash(os.path.join(tmp, rel)) for rel in test_files})
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.isdir(out):
            os.rmdir(out)                                           # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# ================================================================ grade
def read_manifest(copy):
    """The manifest of a student copy, after checking that its tests are the ones make copied."""
    path = os.path.join(copy, MANIFEST)
    if not os.path.isdir(copy):
        raise TeachError(f"{copy}: no such directory")
    if not os.path.isfile(path):
        raise TeachError(f"{copy}: no {MANIFEST}, so this is no student copy; make one with "
                         f"python teach.py make --blank NAMES --out DIR")
    try:
        manifest = json.loads(read(path))
        blanked, hashes = dict(manifest["blanked"]), dict(manifest["tests"])
    except (ValueError, KeyError, TypeError) as e:
        raise TeachError(f"{path}: not a manifest written by teach.py make ({type(e).__name__}: {e})") from None
    unknown = [n for n in blanked if n not in ASSIGNABLE]
    if unknown:
        raise TeachError(f"{path}: {', '.join(unknown)} is not assignable in this teach.py; grade with the "
                         f"teach.py that made the copy")
    for rel, digest in hashes.items():
        if not os.path.isfile(os.path.join(copy, rel)) or file_hash(os.path.join(copy, rel)) != digest:
            raise TeachError(f"{os.path.join(copy, rel)} is missing or was edited after the copy was made; grading "
                             f"needs the tests as they were (restore the file)")
    return manifest


def case_id(case):
    """pytest's node id of a junit-xml <testcase>: classname 'tests.test_reward' -> 'tests/test_reward.py'."""
    return case.get("classname").replace(".", "/") + ".py::" + case.get("name")


def run_pytest(copy, ids, timeout):
    """One pytest run of `ids` in `copy`: (outcomes, broken, trouble). outcomes: {case: '' if it passed, else the
    first line of why}; broken: {test file: why it does not import}; trouble: why the run gave no result (it ran
    past `timeout` seconds or crashed), else ''."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               f"--junitxml={report}", *dict.fromkeys(ids)]
        try:
            proc = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {}, {}, f"its tests ran past --timeout {timeout:g} s (an endless loop?)"
        if proc.returncode < 0 or not os.path.isfile(report):
            return {}, {}, f"pytest crashed (exit status {proc.returncode})"
        cases = list(ET.parse(report).getroot().iter("testcase"))
    outcomes, broken = {}, {}
    for case in cases:
        bad = [e for e in case if e.tag in ("failure", "error", "skipped")]
        why = ((bad[0].get("message") or "").strip().splitlines() or [bad[0].tag])[0][:160] if bad else ""
        if case.get("classname"):
            outcomes[case_id(case)] = outcomes.get(case_id(case)) or why     # a teardown error fails a passed case
        else:                                                       # pytest's record of a module that did not import
            said = [line[1:].strip() for line in (case.findtext("error") or "").splitlines() if line.startswith("E ")]
            broken[case.get("name").replace(".", "/") + ".py"] = said[-1] if said else "see pytest's output"
    if not outcomes and not broken:                                 # a test id that is not there: the table is stale
        said = (proc.stdout + proc.stderr).strip().splitlines()
        raise TeachError(f"pytest ran none of {' '.join(ids)} in {copy}: {said[-1] if said else proc.returncode}")
    return outcomes, broken, ""


def score(name, script, outcomes, broken, trouble):
    """One function's row from a pytest run: dict(function, script, cases, passed, points, failed, note)."""
    ids = ASSIGNABLE[name]
    files = sorted({i.split("::")[0] for i in ids} & set(broken))
    mine = {case: why for case, why in outcomes.items() if case.split("[")[0] in ids}
    if trouble or files:                                            # the tests never ran: no case to count
        mine = {}
        trouble = trouble or "; ".join(f"{f} does not import: {broken[f]}" for f in files)
    failed = [(case, why) for case, why in mine.items() if why]
    passed = len(mine) - len(failed)
    return dict(function=name, script=script, cases=len(mine), passed=passed, failed=failed, note=trouble,
                points=round(POINTS * passed / len(mine), 1) if mine else 0.0)


def grade(copy, timeout=TIMEOUT, log=None):
    """Grade a student copy: one row per blanked function (see score), in the manifest's order. The tests of all
    blanked functions run in one pytest run (the tiny models and MiniLM load once); if that run gives no result
    (an endless loop, a crash), each function runs on its own, so only the function at fault scores 0."""
    copy = os.path.abspath(copy)
    blanked = read_manifest(copy)["blanked"]
    joint = run_pytest(copy, [i for name in blanked for i in ASSIGNABLE[name]], timeout)
    rows = []
    for name, script in blanked.items():
        result = run_pytest(copy, ASSIGNABLE[name], timeout) if joint[2] else joint
        rows.append(score(name, script, *result))
        if log:
            log(rows[-1])
    return rows


def print_row(name, script, passed, cases, points, of):
    print(f"{name:<20} {script:<14} {f'{passed}/{cases}' if cases else '-':>7} {points:>7.1f} / {of}", flush=True)


# ================================================================ command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="teach.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Points: 10 per blanked function, times the share of its test cases passed.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the assignable functions, where they are and the tests that grade them")
    m = sub.add_parser("make", help="write a student copy with some functions blanked")
    m.add_argument("--blank", required=True, help="functions to blank, separated by commas, or 'all' "
                                                  "(python teach.py list shows them)")
    m.add_argument("--out", required=True, help="a new (or empty) directory for the student copy")
    g = sub.add_parser("grade", help="run each blanked function's tests in a student copy; points and a total")
    g.add_argument("dir", help="a student copy written by teach.py make")
    g.add_argument("--timeout", type=float, default=TIMEOUT,
                   help=f"seconds the tests may run (default {TIMEOUT}); past it, each function runs on its own "
                        f"with the same limit and one that runs past it again scores 0")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "list":
            where = find_functions(HERE, ASSIGNABLE)
            for name, ids in ASSIGNABLE.items():
                print(f"{name:<20} {where[name]:<14} {'  '.join(ids)}")
        elif args.command == "make":
            manifest = make(parse_names(args.blank), args.out)
            print(f"wrote {args.out}: {len(manifest['blanked'])} function(s) blanked "
                  f"({', '.join(manifest['blanked'])}); grade with python teach.py grade {args.out}")
        else:
            if not args.timeout > 0:
                raise TeachError(f"--timeout {args.timeout:g}: must be > 0 seconds")
            read_manifest(args.dir)                                 # a bad DIR fails before the table starts
            print(f"{'function':<20} {'in':<14} {'passed':>7} {'points':>7}")
            rows = grade(args.dir, args.timeout, log=lambda r: print_row(r["function"], r["script"], r["passed"],
                                                                         r["cases"], r["points"], POINTS))
            print_row("total", "", sum(r["passed"] for r in rows), sum(r["cases"] for r in rows),
                      sum(r["points"] for r in rows), POINTS * len(rows))
            for r in rows:
                if r["note"]:
                    print(f"{r['function']}: {r['note']}")
                for case, message in r["failed"][:3]:
                    print(f"{r['function']}: failed {case}: {message}")
                if len(r["failed"]) > 3:
                    print(f"{r['function']}: ... and {len(r['failed']) - 3} more failed")
    except TeachError as e:
        print(f"teach.py {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
