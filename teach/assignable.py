"""The teaching kit's table (a reader of the method may skip it): the functions a student may be asked to write,
with their points and the tests that grade them, the weeks of docs/assignments.md, and the surgery on source text
that make and grade share: finding a top-level def, blanking its body, putting another def in its place."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project
CORE = (
    "opgrpo_min.py",
    "reward.py",
    "eval_nli.py",
    "sim_train.py",
    "eval_judge.py",
)  # where functions are
TODO = "write this function (its docstring says what it must do)"  # the message of a blanked body


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
    # Stage 1, the similarity estimator's triplets: sim_train.py and eval_judge.py (a fake judge answers)
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


WEEKS = {  # the exercises of docs/assignments.md: the functions each week's students write
    1: ("group_advantages", "grpo_loss"),
    2: (),  # students write tests of UNDER_TEST, which their copy holds (teach/mutants.py grades them)
    3: ("greedy_matches", "ladder_bucket", "coverage_reward"),
    4: ("redundant_flags", "uniqueness_bucket", "uniqueness_reward"),
    5: ("situation_score", "summarize", "entailment_index"),
}
UNDER_TEST = (
    "group_advantages",
    "grpo_loss",
)  # week 2: week 1's functions, whose tests students write
STUDENT_TESTS = "tests/test_week2.py"  # week 2: the one file of the copy that grade takes
STARTER = '''"""Week 2: tests that catch bugs in group_advantages and grpo_loss (opgrpo_min.py).

Write tests here, one rule per test, with values you computed by hand from the docstrings. The grader runs this file
against the reference code (each test must pass there: a test that fails on it earns nothing) and against hidden
copies of the two functions, each with one small bug; your grade is the share of those bugs that some test catches.
Only this file is taken, and only the two functions' behaviour can be seen: call them, check what they return.

    python -m pytest tests/test_week2.py
"""

import torch

import opgrpo_min as om


def test_group_advantages_returns_one_float32_advantage_per_answer():
    adv = om.group_advantages([1.0, 0.0, 0.0, 0.0], group_size=4)
    assert adv.shape == (4,) and adv.dtype == torch.float32


def test_grpo_loss_returns_a_scalar_and_its_three_stats():
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, stats = om.grpo_loss(logp, torch.zeros(1, 2), None, torch.tensor([1.0]), torch.ones(1, 2))
    assert loss.dim() == 0 and set(stats) == {"kl", "ratio", "clip_frac"}
'''


MEASURED = {
    3: WEEKS[4]
}  # later weeks' functions a week's measurements run: probe.py threshold scores whole rewards


def week_blanks(week):
    """What a week's copy blanks: that week's functions and every later week's, so it holds no solution that is
    not due yet, except those its measurements run (MEASURED); week 2's copy keeps week 1's: students test them."""
    kept = set(MEASURED.get(week, ()))
    return [n for w, names in WEEKS.items() if w >= week for n in names if n not in kept]


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
