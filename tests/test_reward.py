"""reward.py as a specification: each test states one rule of the OP reward (Stage 2 of PAPER_NOTES.md)
and checks it on numbers small enough to verify by hand. The last block runs the real MiniLM."""

import os
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch

import reward
from reward import (
    coverage_reward,
    format_score,
    greedy_matches,
    ladder_bucket,
    mask_words,
    prompt_keywords,
    redundant_flags,
    score_answers,
    similarity_text,
    split_perspectives,
    tag_reward,
    uniqueness_bucket,
    uniqueness_reward,
)


def tagged(lines, summary):
    """An answer in the target format."""
    return (
        "<core perspectives>\n"
        + "\n".join(lines)
        + "\n</core perspectives>\n\n<summary>\n"
        + summary
        + "\n</summary>"
    )


def line(name, text="it matters."):
    return f"In the perspective of {name}, {text}"


# ================================================================ splitting
def test_split_cuts_before_each_opener_that_starts_the_text_or_a_line():
    text = (
        line("A") + "\nfrom the perspective of B, b\ncontinues here.\r\nIN THE PERSPECTIVE OF C, c."
    )
    assert split_perspectives(text) == [
        line("A"),
        "from the perspective of B, b\ncontinues here.",
        "IN THE PERSPECTIVE OF C, c.",
    ], (
        "split_perspectives: cut before 'In/From the perspective of ' (any case) "
        "at the start of the text or of a line; pieces stripped"
    )
    assert split_perspectives("Intro.\nIn the perspective of A, a.\n\n") == [
        "Intro.",
        "In the perspective of A, a.",
    ], "split_perspectives: a preamble before the first opener is a piece; blank pieces are dropped"


def test_split_ignores_indented_openers_and_openers_inside_a_line():
    # the authors' regex (?:^|\n)(?=(?:From|In) the perspective of ): column 0 only, and a space after "of"
    assert split_perspectives(
        "In the perspective of A, a.\n  In the perspective of B, b.\n\tFrom the perspective "
        "of C, c."
    ) == [
        "In the perspective of A, a.\n  In the perspective of B, b.\n\tFrom "
        "the perspective of C, c."
    ], "split_perspectives: an indented opener starts no perspective (column 0 only)"
    assert split_perspectives("So. In the perspective of A, a.") == [
        "So. In the perspective of A, a."
    ], "split_perspectives: an opener inside a line starts no perspective"
    assert split_perspectives("Just prose, no perspectives.") == ["Just prose, no perspectives."], (
        "split_perspectives: text without an opener is one piece"
    )
    assert split_perspectives("  \n ") == [], "split_perspectives: blank text has no piece"


def test_similarity_text_is_the_core_block_of_the_strict_layout_else_the_whole_stripped_answer():
    assert similarity_text(tagged([line("A")], "A.")) == "\n" + line("A") + "\n"
    for text in (
        "Sure!\n" + tagged([line("A")], "A."),
        "<core perspectives>\nx\n</core perspectives>\n",
        " <summary>A.</summary><core perspectives>x</core perspectives>\n",
        "",
    ):
        assert similarity_text(text) == text.strip()


# ================================================================ 1. coverage
def test_coverage_bucket_edges_are_half_open():
    rates = [0.0, 1e-9, 0.19999, 0.2, 0.39999, 0.4, 0.59999, 0.6, 0.79999, 0.8, 1.0]
    assert [ladder_bucket(r) for r in rates] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5], (
        "ladder_bucket: 0 for rate 0, else 1 + the edges 0.2/0.4/0.6/0.8 that rate reaches (rate >= edge)"
    )


def test_coverage_bucket_is_exact_for_every_fraction_matches_over_references():
    for n in range(1, 61):
        for k in range(n + 1):
            q = Fraction(k, n)
            expected = (
                0 if k == 0 else 1 + sum(q >= Fraction(e) for e in ("0.2", "0.4", "0.6", "0.8"))
            )
            assert ladder_bucket(k / n) == expected, (k, n)


@pytest.mark.parametrize(
    "matched, reward_", [(0, 0.0), (1, 0.6), (2, 0.9), (3, 1.2), (4, 1.5), (5, 1.5)]
)
def test_coverage_reward_of_k_matches_out_of_five_references(matched, reward_):
    sim = np.full((5, 5), 0.1)
    sim[np.arange(matched), np.arange(matched)] = 0.9  # rates 0, 1/5, 2/5, 3/5, 4/5, 5/5
    r, rate, pairs = coverage_reward(sim)
    assert r == pytest.approx(reward_) and rate == matched / 5 and len(pairs) == matched, (
        "coverage_reward: (0.3 x ladder_bucket(matches / references), rate, pairs)"
    )


def test_coverage_bucket_one_needs_a_rate_below_one_fifth():
    sim = np.full((6, 3), 0.1)
    sim[0, 0] = 0.9  # 1 of 6 references: rate 1/6 < 0.2
    assert coverage_reward(sim)[:2] == (pytest.approx(0.3), 1 / 6), (
        "coverage_reward: a rate above 0 and below 0.2 is bucket 1: R_cov 0.3"
    )


def test_coverage_threshold_is_inclusive_also_in_float32_and_torch():
    assert greedy_matches(np.array([[0.70]])) == [(0, 0)], (
        "greedy_matches: a cosine equal to the threshold matches (>=)"
    )
    assert greedy_matches(np.array([[0.69999]])) == [], (
        "greedy_matches: a cosine below the threshold does not match"
    )
    assert greedy_matches(np.array([[0.70]], dtype=np.float32)) == [(0, 0)], (
        "greedy_matches: a float32 0.7 counts as 0.7 (compare in the matrix's precision)"
    )
    assert greedy_matches(torch.tensor([[0.70]])) == [(0, 0)], (
        "greedy_matches: takes a torch tensor; a float32 0.7 counts as 0.7"
    )
    assert greedy_matches(torch.tensor([[0.9, 0.1]], dtype=torch.bfloat16)) == [(0, 0)], (
        "greedy_matches: takes a bfloat16 tensor (converted to float32)"
    )
    assert greedy_matches(np.array([[0.5]]), threshold=0.5) == [(0, 0)], (
        "greedy_matches: uses the threshold it is given"
    )


def test_coverage_matching_is_one_to_one():
    sim = np.array([[0.90], [0.85]])  # one candidate cannot cover two references
    assert coverage_reward(sim) == (pytest.approx(0.9), 0.5, [(0, 0)]), (
        "greedy_matches: one-to-one: a candidate covers at most one reference"
    )


def test_coverage_non_mutual_maximum_falls_back_to_the_next_best_candidate():
    # reference 0 prefers candidate 0 (0.9) but candidate 0 prefers reference 1 (0.95): 1 -> 0 first,
    # then reference 0 takes candidate 1 if that still reaches the threshold
    assert greedy_matches([[0.90, 0.80], [0.95, 0.10]]) == [(1, 0), (0, 1)], (
        "greedy_matches: the largest cell first; a reference whose best candidate is taken falls back on its next "
        "best"
    )
    assert greedy_matches([[0.90, 0.60], [0.95, 0.10]]) == [(1, 0)], (
        "greedy_matches: the fallback must still reach the threshold"
    )


def test_coverage_ties_go_to_the_lowest_reference_then_the_lowest_candidate():
    assert greedy_matches([[0.8, 0.8], [0.8, 0.8]]) == [(0, 0), (1, 1)], (
        "greedy_matches: ties go to the first cell in row-major order"
    )
    # the tie in row 0 decides the outcome: (0, 0) first leaves (1, 1) = 0.75 for reference 1
    assert greedy_matches([[0.8, 0.8], [0.1, 0.75]]) == [(0, 0), (1, 1)], (
        "greedy_matches: ties go to the first cell in row-major order"
    )
    assert greedy_matches([[0.8, 0.8], [0.75, 0.1]]) == [(0, 0)], (
        "greedy_matches: a removed column cannot match again"
    )


def test_coverage_of_an_empty_answer_is_zero():
    assert coverage_reward(np.zeros((3, 0))) == (0.0, 0.0, []), (
        "coverage_reward: no candidate perspective: (0.0, 0.0, [])"
    )


def test_coverage_rejects_bad_matrices_clearly():
    with pytest.raises(ValueError, match="2-D"):
        coverage_reward(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        coverage_reward(np.array([[np.nan]]))


# ================================================================ 2. uniqueness
def test_uniqueness_bucket_edges_are_open_below():
    us = [1.0, 0.99, 5 / 6, 0.80001, 0.8, 4 / 5, 3 / 4, 0.60001, 0.6, 3 / 5, 0.0]
    assert [uniqueness_bucket(u) for u in us] == [
        1.0,
        0.75,
        0.75,
        0.75,
        0.4,
        0.4,
        0.4,
        0.4,
        0.0,
        0.0,
        0.0,
    ], (
        "uniqueness_bucket: u == 1 -> 1.0; u > 0.8 -> 0.75; u > 0.6 -> 0.4; else 0.0 (strictly above the edges)"
    )


def redundant(n, pairs, value=0.9):
    """An n x n cosine matrix: 1 on the diagonal, `value` at the given (i, j) pairs, 0.1 elsewhere."""
    sim = np.full((n, n), 0.1)
    np.fill_diagonal(sim, 1.0)
    for i, j in pairs:
        sim[i, j] = sim[j, i] = value
    return sim


@pytest.mark.parametrize(
    "n, pairs, u, reward_",
    [
        (5, [], 1.0, 0.3),  # all unique
        (6, [(0, 5)], 5 / 6, 0.225),  # u = 5/6 > 0.8 -> 0.75
        (5, [(0, 4)], 4 / 5, 0.12),  # u = 0.8 exactly -> 0.4
        (4, [(0, 3)], 3 / 4, 0.12),  # 0.75 -> 0.4
        (5, [(0, 3), (0, 4)], 3 / 5, 0.0),  # u = 0.6 exactly -> 0
    ],
)
def test_uniqueness_reward_buckets(n, pairs, u, reward_):
    assert uniqueness_reward(redundant(n, pairs)) == (pytest.approx(reward_), u), (
        "uniqueness_reward: (0.3 x uniqueness_bucket(u), u), u = (n - redundant) / n"
    )


def test_uniqueness_threshold_is_inclusive():
    assert uniqueness_reward(redundant(2, [(0, 1)], value=0.78))[1] == 0.5, (
        "redundant_flags: a cosine equal to the threshold 0.78 is a repeat (>=)"
    )
    assert uniqueness_reward(redundant(2, [(0, 1)], value=0.77999))[1] == 1.0, (
        "redundant_flags: a cosine below the threshold is no repeat"
    )
    assert (
        uniqueness_reward(torch.tensor(redundant(2, [(0, 1)], value=0.78), dtype=torch.float32))[1]
        == 0.5
    ), "redundant_flags: takes a torch tensor; a float32 0.78 counts as 0.78"


def test_a_flagged_perspective_flags_nobody():
    sim = redundant(3, [(0, 1), (1, 2)])  # A~B, B~C, A and C apart
    assert redundant_flags(sim).tolist() == [False, True, False], (
        "redundant_flags: a flagged perspective flags nobody (B repeats A; C is apart from A though it repeats B)"
    )
    assert uniqueness_reward(sim) == (pytest.approx(0.12), 2 / 3), (
        "uniqueness_reward: u = 2/3 -> step 0.4 -> 0.12"
    )


def test_one_perspective_gets_full_uniqueness_unless_min_perspectives_asks_for_more():
    assert uniqueness_reward(np.ones((1, 1))) == (pytest.approx(0.3), 1.0), (
        "uniqueness_reward: one perspective has u = 1"
    )
    assert uniqueness_reward(np.ones((1, 1)), min_perspectives=2) == (0.0, 1.0), (
        "uniqueness_reward: below min_perspectives R_uniq is 0.0 (u as it is)"
    )
    assert uniqueness_reward(redundant(2, []), min_perspectives=2) == (pytest.approx(0.3), 1.0), (
        "uniqueness_reward: exactly min_perspectives perspectives are paid"
    )


def test_uniqueness_of_no_perspectives_is_zero():
    assert uniqueness_reward(np.zeros((0, 0))) == (0.0, 0.0), (
        "uniqueness_reward: no perspective: (0.0, 0.0)"
    )


# ================================================================ 3. format score
def test_format_full_marks_for_perspective_lines_and_a_summary_naming_them():
    assert format_score(tagged([line("A"), line("B")], "A and B.")) == pytest.approx(0.2), (
        "format_score: all segments named, no repeats, every name in the summary: 0.1 x 2 = 0.2"
    )


@pytest.mark.parametrize("named, reward_", [(4, 0.2), (3, 0.2), (2, 0.15), (1, 0.125), (0, 0.1)])
def test_format_summary_term_by_share_of_names(named, reward_):
    names = ["Alpha", "Beta", "Gamma", "Delta"]  # shares 1, 3/4, 1/2, 1/4, 0
    text = tagged([line(n) for n in names], " ".join(names[:named]) or "Nothing named.")
    assert format_score(text) == pytest.approx(reward_), (
        "format_score: summary term by the share f of names in <summary>: >= .75 -> 0, >= .5 -> -0.5, >= .25 -> "
        "-0.75, else -1"
    )


def test_format_names_without_a_summary_cost_the_full_summary_term():
    assert format_score("\n".join([line("A"), line("B")])) == pytest.approx(0.1), (
        "format_score: names but no <summary> block: the summary term is -1"
    )


def test_format_segment_share_edges_are_inclusive():
    bad = "In the perspective of , nothing named."  # starts a segment but names nothing
    seven_of_ten = ["Preamble.", bad, bad + "!"] + [
        line(c) for c in "ABCDEFG"
    ]  # varied: no duplicate cost
    three_of_ten = ["Preamble."] + [f"{bad} {k}" for k in range(6)] + [line(c) for c in "ABC"]
    two_of_ten = ["Preamble."] + [f"{bad} {k}" for k in range(7)] + [line(c) for c in "AB"]
    assert format_score(tagged(seven_of_ten, "ABCDEFG")) == pytest.approx(0.2), (
        "format_score: 70 % of segments named is 2 points (>=)"
    )
    assert format_score(tagged(three_of_ten, "A B C")) == pytest.approx(0.1), (
        "format_score: 30 % of segments named is 1 point (>=)"
    )
    assert format_score(tagged(two_of_ten, "A B")) == 0.0, (
        "format_score: under 30 % named is 0 points"
    )


def test_format_duplicate_sentences_and_names_cost_half_a_point_each():
    # a repeated line is a repeated sentence and a repeated name: 2 - 1.0 = 1 point
    assert format_score(
        tagged([line("A"), line("a", "IT MATTERS."), line("B")], "A, B")
    ) == pytest.approx(0.1), (
        "format_score: a repeated sentence (ignoring case) and a repeated name cost 0.5 each"
    )
    # a repeated name alone: 2 - 0.5
    assert format_score(
        tagged([line("A", "x."), line("A", "y."), line("B")], "A, B")
    ) == pytest.approx(0.15), "format_score: a repeated name costs 0.5"
    # clipped at 0
    assert format_score(tagged([line("A")] * 5, "A")) == 0.0, (
        "format_score: the score is clipped at 0"
    )


def test_format_of_prose_and_of_an_empty_answer_is_zero():
    assert format_score("A plain paragraph with no perspectives.") == 0.0, (
        "format_score: prose has no named segment: 0"
    )
    assert format_score("") == 0.0, "format_score: an empty answer: 0"


# ================================================================ 4. tag check
@pytest.mark.parametrize(
    "text",
    [
        tagged([line("A")], "A."),
        "<CORE PERSPECTIVES>a</Core Perspectives><summary>s</SUMMARY>",
        "  \n<core  perspectives>\na\n</core perspectives>\n\n\n<summary>s</summary>\n ",
    ],
)
def test_tag_accepts_exactly_one_core_block_then_one_summary(text):
    assert tag_reward(text) == 0.0, (
        "tag_reward: one non-empty core block then one non-empty summary, whitespace only around them, any case: 0.0"
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "In the perspective of A, a.",
        "<core perspectives>a</core perspectives>",  # no summary
        "<core perspectives> \n </core perspectives><summary>s</summary>",  # empty core
        "<core perspectives>a</core perspectives><summary>  </summary>",  # empty summary
        "<summary>s</summary><core perspectives>a</core perspectives>",  # wrong order
        "Sure! <core perspectives>a</core perspectives><summary>s</summary>",  # text before
        "<core perspectives>a</core perspectives><summary>s</summary> Hope this helps.",  # text after
        "<core perspectives>a</core perspectives><core perspectives>b</core perspectives><summary>s</summary>",
        "<core perspectives>a</core perspectives><summary>s</summary><summary>t</summary>",
    ],
)
def test_tag_penalises_everything_else(text):
    assert tag_reward(text) == -0.2, "tag_reward: anything but exactly that layout: -0.2"


# ================================================================ keyword masking
def test_prompt_keywords_are_the_situations_content_words():
    assert prompt_keywords("Should I tell my Friend the truth?") == {"tell", "friend", "truth"}, (
        "prompt_keywords: the situation's words, lower-cased, stopwords left out"
    )


def test_stopwords_are_nltks_english_list():
    # NLTK masks the lone "s" of a possessive and the stems of n't forms, and keeps "could" and "would" as content
    assert prompt_keywords("My friend's cake: I couldn't say it would taste bad") == {
        "friend",
        "cake",
        "say",
        "would",
        "taste",
        "bad",
    }, (
        "prompt_keywords: NLTK's "
        "list masks the lone 's', "
        "'t' and 'couldn'; 'would' "
        "is a content word"
    )
    assert len(reward.STOPWORDS) == 179 and sum("'" in w for w in reward.STOPWORDS) == 26, (
        "STOPWORDS: NLTK's English list, 179 words, 26 of them with an apostrophe"
    )


def test_mask_words_replaces_keywords_whatever_their_case_and_keeps_punctuation():
    assert (
        mask_words("Truth, friend: TRUTH-telling.", {"truth", "friend"})
        == "[KW], [KW]: [KW]-telling."
    ), "mask_words: each keyword word (any case) becomes [KW]; punctuation stays"
    assert mask_words("unchanged.", set()) == "unchanged.", (
        "mask_words: no keywords: the text unchanged"
    )


# ================================================================ the batch
class BagOfWords:
    """A stand-in embedder: hashed word counts, and a record of every encode call."""

    def __init__(self, dim=64):
        self.dim, self.calls = dim, []

    def encode(self, texts):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1
        return out


REF = tagged(
    [line("Honesty", "truth builds trust."), line("Kindness", "spare feelings.")],
    "Honesty and Kindness.",
)
SITUATION = "Lying about a gift to spare feelings"


def test_score_answers_returns_each_term_and_their_clipped_sum():
    (b,) = score_answers([REF], [REF], BagOfWords(), situations=[SITUATION], mask_keywords="both")
    assert (b.coverage, b.rate, b.uniqueness, b.u, b.tag) == (
        pytest.approx(1.5),
        1.0,
        pytest.approx(0.3),
        1.0,
        0.0,
    )
    assert b.format == pytest.approx(0.2) and b.total == pytest.approx(2.0)


def test_an_empty_answer_scores_zero_on_every_term_but_the_tag():
    (b,) = score_answers([""], [REF], BagOfWords())
    assert (b.coverage, b.rate, b.uniqueness, b.u, b.format, b.tag, b.total) == (
        0,
        0,
        0,
        0,
        0,
        -0.2,
        0,
    )


def test_untagged_answer_pays_the_tag_penalty_and_total_is_never_negative():
    (b,) = score_answers(["Some unrelated chatter."], [REF], BagOfWords())
    assert (
        b.tag == -0.2 and b.coverage == 0 and b.total == pytest.approx(0.1)
    )  # uniqueness 0.3 of one piece
    (b,) = score_answers(["Some unrelated chatter."], [REF], BagOfWords(), min_perspectives=2)
    assert b.total == 0.0


def test_one_encode_call_per_batch_and_references_embedded_once():
    emb = BagOfWords()
    answers = [tagged([line("A"), line("B")], "A B"), tagged([line("C")], "C"), ""]
    score_answers(answers, [REF] * 3, emb)
    assert (
        len(emb.calls) == 1 and len(emb.calls[0]) == 3 + 2
    )  # 3 answer pieces, 2 new reference pieces
    score_answers(answers, [REF] * 3, emb)
    assert len(emb.calls) == 2 and len(emb.calls[1]) == 3  # the references come from the cache


def test_masking_modes_mask_answers_references_or_nothing():
    answer = tagged([line("Honesty", "lying about a gift hurts.")], "Honesty.")
    for mode, in_answer, in_ref in (
        ("answer", True, False),
        ("both", True, True),
        ("none", False, False),
    ):
        emb = BagOfWords()
        ref = [line("Kindness", "a gift deserves thanks.")]
        score_answers([answer], [ref], emb, situations=[SITUATION], mask_keywords=mode)
        answer_text, ref_text = emb.calls[0]
        assert ("[KW] about a [KW]" in answer_text) == in_answer and (
            "a [KW] deserves" in ref_text
        ) == in_ref, mode
    emb = BagOfWords()
    score_answers([answer], [REF], emb)  # no situations: nothing to mask
    assert "[KW]" not in " ".join(emb.calls[0])


def test_a_reference_may_be_text_or_a_list_of_perspectives():
    pieces = split_perspectives(similarity_text(REF))
    answer = tagged([line("Honesty", "truth builds trust.")], "Honesty")
    assert score_answers([answer], [REF], BagOfWords()) == score_answers(
        [answer], [pieces], BagOfWords()
    )


@pytest.mark.parametrize(
    "answers, references, error, match",
    [
        ([None], [REF], TypeError, r"answers\[0\] is NoneType"),
        (["ok", 3], [REF, REF], TypeError, r"answers\[1\] is int"),
        (["ok"], [""], ValueError, r"references\[0\] has no perspectives"),
        (["ok"], [["", " "]], ValueError, r"references\[0\] has no perspectives"),
        (["ok"], [None], TypeError, r"references\[0\] is NoneType"),
        (["ok", "ok"], [REF], ValueError, "2 answers, 1 references"),
        ("ok", [REF], TypeError, "lists"),
    ],
)
def test_bad_inputs_raise_clear_errors(answers, references, error, match):
    with pytest.raises(error, match=match):
        score_answers(answers, references, BagOfWords())


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="mask_keywords"):
        score_answers(["ok"], [REF], BagOfWords(), mask_keywords="prompt")
    with pytest.raises(TypeError, match=r"situations\[0\]"):
        score_answers(["ok"], [REF], BagOfWords(), situations=[1])
    with pytest.raises(TypeError, match="embedder"):
        score_answers(["ok"], [REF], None)


# ================================================================ the real MiniLM
def situations_for_minilm():
    """Three hand-written situations, plus the first three of data/train.jsonl once it exists."""
    from harness.data import Perspective as P
    from harness.data import Situation, load_situations

    items = [
        Situation(
            "white-lie",
            "Telling a friend their cooking is great when it is not",
            [
                P(
                    "Honesty",
                    "being truthful matters even in small things, because trust is built on it.",
                ),
                P("Kindness", "sparing someone's feelings shows care for their wellbeing."),
                P(
                    "Friendship",
                    "a close relationship can survive gentle criticism and may even grow from it.",
                ),
                P(
                    "Autonomy",
                    "the friend deserves accurate information to decide whether to change the recipe.",
                ),
                P(
                    "Harm avoidance",
                    "hurting someone needlessly over a trivial matter should be avoided.",
                ),
            ],
        ),
        Situation(
            "dam",
            "Building a dam that floods a village to bring electricity to a city",
            [
                P("Right to property", "villagers have a right to keep their homes and land."),
                P(
                    "Utilitarianism",
                    "cheap clean power for millions could outweigh the loss of a few hundred homes.",
                ),
                P(
                    "Cultural heritage",
                    "the village's history and graves would be lost under the water.",
                ),
                P(
                    "Environmental protection",
                    "the river's ecosystem and fish migration would be damaged.",
                ),
                P(
                    "Duty to compensate",
                    "the state must pay fair compensation and help people relocate.",
                ),
                P("Climate", "hydropower replaces coal plants and cuts carbon emissions."),
            ],
        ),
        Situation(
            "exam",
            "Reporting a classmate who cheated on an exam",
            [
                P("Fairness", "honest students are disadvantaged when cheating goes unpunished."),
                P("Loyalty", "turning in a classmate can feel like betraying a peer."),
                P(
                    "Integrity of education",
                    "grades should reflect real learning, or they lose their meaning.",
                ),
                P(
                    "Compassion",
                    "the cheater may be under pressure and deserve a chance to explain.",
                ),
            ],
        ),
    ]
    train = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "train.jsonl"
    )
    return items + (load_situations(train)[:3] if os.path.isfile(train) else [])


def test_minilm_reference_scored_against_itself_reaches_the_maximum(minilm):
    from opgrpo_min import reference_answer

    for s in situations_for_minilm():
        ref = reference_answer(s)
        (b,) = score_answers([ref], [ref], minilm, situations=[s.situation], mask_keywords="both")
        assert (
            b.coverage == pytest.approx(1.5) and b.format == pytest.approx(0.2) and b.tag == 0.0
        ), s.id
        embedded = [
            mask_words(p, prompt_keywords(s.situation))
            for p in split_perspectives(similarity_text(ref))
        ]
        E = minilm.encode(embedded, normalize_embeddings=True)
        if (
            E @ E.T - np.eye(len(E)) * 2
        ).max() < reward.UNIQUENESS_THRESHOLD:  # mutually below 0.78 as embedded
            assert b.total == pytest.approx(2.0), s.id
        else:
            assert b.u < 1, s.id


def test_minilm_an_unrelated_situations_answer_scores_low(minilm):
    from opgrpo_min import reference_answer

    a, b = situations_for_minilm()[:2]
    (r,) = score_answers(
        [reference_answer(b)], [reference_answer(a)], minilm, situations=[a.situation]
    )
    assert r.coverage == 0.0 and r.total <= 0.5  # only uniqueness and format are left


def test_minilm_one_perspective_repeated_five_times_gets_no_uniqueness(minilm):
    from opgrpo_min import reference_answer

    s = situations_for_minilm()[0]
    first = split_perspectives(similarity_text(reference_answer(s)))[0]
    (r,) = score_answers(
        [tagged([first] * 5, "Honesty.")], [reference_answer(s)], minilm, situations=[s.situation]
    )
    assert r.u == pytest.approx(1 / 5) and r.uniqueness == 0.0 and r.format == 0.0


# ================================================================ the authors' released reward, layout by layout
class FirstName:
    """A stand-in embedder whose cosines are 1 or 0, so both rewards can be worked out by hand: a text is the unit
    vector of the first perspective name in it ("In the perspective of B, ..." -> e_B); a text with no name gets a
    direction of its own. The authors' values below are computed by hand from their code (fuyu12345/OPRL-LLM:
    vllm_rollout_spmd.py for the layout, split, coverage and uniqueness, op_reward_batch.py for the format score,
    reward_manager/batch.py for 0.3 x coverage + 0.1 x format + tag + 0.3 x uniqueness, clipped at 0), never run."""

    def __init__(self):
        self.dims = {}

    def encode(self, texts):
        out = np.zeros((len(texts), 64), np.float32)
        for i, t in enumerate(texts):
            m = reward.PERSPECTIVE_NAME.search(t)
            key = m.group(1).strip().lower() if m else t
            out[i, self.dims.setdefault(key, len(self.dims))] = 1.0
        return out


REF3 = tagged([line("A", "a."), line("B", "b."), line("C", "c.")], "A, B and C.")


def ours(answer):
    (b,) = score_answers([answer], [REF3], FirstName())
    return b


def test_an_empty_answer_keeps_our_zero_where_the_authors_pay_uniqueness():
    # authors: no sentence -> _uniqueness_rate returns 1.0 for n <= 1 -> 0.3 x 1.0; coverage 0, format 0, tag -0.2:
    # total max(0, 0 + 0.3 + 0 - 0.2) = 0.1. Ours (kept: it pays for saying nothing): u = 0, total 0.
    b = ours("")
    assert (b.uniqueness, b.u, b.total) == (0.0, 0.0, 0.0)


def test_names_without_a_summary_keep_our_summary_term_where_the_authors_search_the_whole_text():
    answer = (
        "<core perspectives>\n"
        + line("A", "a.")
        + "\n"
        + line("B", "b.")
        + "\n</core perspectives>"
    )
    # both: not the strict layout, so the whole stripped text is split:
    #   ["<core perspectives>", "In ... A, a.", "In ... B, b.\n</core perspectives>"] -> no name, e_A, e_B
    #   coverage 2 of 3 references -> bucket 4 -> 1.2; uniqueness 3 of 3 -> 0.3; tag -0.2
    # format, first core block [A line, B line]: 2 points. Authors: no <summary>, so the names are looked for in the
    # whole text: both found -> term 0 -> 0.2, total 1.2 + 0.3 + 0.2 - 0.2 = 1.5. Ours (kept): names but no summary
    # -> -1 -> 0.1, total 1.4.
    b = ours(answer)
    assert (b.coverage, b.uniqueness, b.tag) == (pytest.approx(1.2), pytest.approx(0.3), -0.2)
    assert b.format == pytest.approx(0.1) and b.total == pytest.approx(1.4)


@pytest.mark.parametrize(
    "answer, coverage, uniqueness, fmt, total",
    [
        # a preamble with a perspective line: ["Sure.", "In ... B, b.\n<core perspectives>", "In ... A, a.\n</core ...>
        # \n<summary>A.</summary>"] -> e_B, e_A: 2 of 3 -> 1.2 (the core block alone, as before: 1 of 3 -> 0.6)
        (
            "Sure.\n"
            + line("B", "b.")
            + "\n<core perspectives>\n"
            + line("A", "a.")
            + "\n</core perspectives>\n"
            "<summary>A.</summary>",
            1.2,
            0.3,
            0.2,
            1.5,
        ),
        # an empty core: ["<core perspectives></core perspectives>", "In ... A, a.\n<summary>A.</summary>"] -> 1 of 3 ->
        # 0.6, u 1 -> 0.3; the format score reads the (empty) core block: 0. Before: no piece, 0 and 0.
        (
            "<core perspectives></core perspectives>\n"
            + line("A", "a.")
            + "\n<summary>A.</summary>",
            0.6,
            0.3,
            0.0,
            0.7,
        ),
        # the summary first: ["<summary>A and B.</summary>\n<core perspectives>", "In ... A, a.", "In ... B, b.\n</core
        # perspectives>"] -> 2 of 3 -> 1.2, u 1 -> 0.3; format 2 points, names a, b in the summary -> 0.2
        (
            "<summary>A and B.</summary>\n<core perspectives>\n"
            + line("A", "a.")
            + "\n"
            + line("B", "b.")
            + "\n</core perspectives>",
            1.2,
            0.3,
            0.2,
            1.5,
        ),
    ],
)
def test_outside_the_strict_layout_similarity_reads_the_whole_stripped_answer_as_the_authors_do(
    answer, coverage, uniqueness, fmt, total
):
    b = ours(answer)  # the authors' values, by hand: the same (tag -0.2 on both sides)
    assert (b.coverage, b.uniqueness, b.format, b.tag) == (
        pytest.approx(coverage),
        pytest.approx(uniqueness),
        pytest.approx(fmt),
        -0.2,
    )
    assert b.total == pytest.approx(total)


def test_indented_perspective_lines_start_no_perspective_as_in_the_authors_split():
    answer = tagged(
        [line("A", "a."), "  " + line("B", "b."), "\t" + line("C", "c.")], "A, B and C."
    )
    # strict layout, so the core block is split, at column 0 only: one piece, e_A -> 1 of 3 -> bucket 2 -> 0.6;
    # u 1 -> 0.3; format: 1 segment with a name -> 2 points, name a in the summary -> 0.2; tag 0: 1.1 on both
    # sides (before: three pieces, 3 of 3 -> 1.5, total 2.0)
    b = ours(answer)
    assert (b.coverage, b.rate, b.uniqueness, b.format, b.tag) == (
        pytest.approx(0.6),
        1 / 3,
        pytest.approx(0.3),
        pytest.approx(0.2),
        0.0,
    )
    assert b.total == pytest.approx(1.1)


def test_two_core_blocks_keep_our_tag_penalty_where_the_authors_strict_regex_accepts_them():
    answer = (
        "<core perspectives>\n"
        + line("A", "a.")
        + "\n</core perspectives>\n<core perspectives>\n"
        + line("B", "b.")
        + "\n</core perspectives>\n<summary>\nA and B.\n</summary>"
    )
    # authors: STRICT_FORMAT_RE matches (core = from the first opening tag to the last closing one): tag 0; core
    # pieces ["In ... A, a.\n</core perspectives>\n<core perspectives>", "In ... B, b."] -> 2 of 3 -> 1.2, u 1 -> 0.3;
    # format on the first core block: 2 points, a in the summary -> 0.2: total 1.7.
    # Ours (kept: the format asks for one block): tag -0.2, the whole text: ["<core perspectives>", A..., B...] ->
    # 1.2 and 0.3, format 0.2: total 1.5.
    b = ours(answer)
    assert (b.coverage, b.uniqueness, b.format, b.tag) == (
        pytest.approx(1.2),
        pytest.approx(0.3),
        pytest.approx(0.2),
        -0.2,
    )
    assert b.total == pytest.approx(1.5)
