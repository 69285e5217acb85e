"""The OP-GRPO dual reward (Fu, Son, Bogunovic 2026, Stage 2), one small function per term.

    R = max(0, R_cov + R_uniq + R_fmt + R_tag)        in [0, 2.0]

R_cov rewards covering the reference perspectives, R_uniq perspectives that repeat no other (both by the cosine of
Sentence Transformer embeddings), R_fmt and R_tag the answer format of the SFT warm start:

    <core perspectives>
    In the perspective of X, ...
    </core perspectives>
    <summary>one paragraph that weaves the perspectives together</summary>

One entry point scores a batch of answers: score_answers (scale/trl_opgrpo.py adapts it to TRL's reward-function
interface). This module imports nothing of the project. Where it differs from the authors' released code, and why:
docs/reward_vs_authors.md.
"""

import re
import weakref
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------- the paper's numbers (Stage 2)
COVERAGE_THRESHOLD = 0.70  # cosine from which an answer perspective covers a reference perspective
UNIQUENESS_THRESHOLD = 0.78  # cosine from which a later answer perspective repeats an earlier one
COVERAGE_EDGES = (
    0.2,
    0.4,
    0.6,
    0.8,
)  # ladder: rate 0 -> 0, (0, .2) -> 1, [.2, .4) -> 2, ... [.8, 1] -> 5
COVERAGE_WEIGHT = 0.3  # R_cov = 0.3 x bucket, 0 .. 1.5
UNIQUENESS_STEPS = (
    (0.8, 0.75),
    (0.6, 0.4),
)  # u == 1 -> 1.0; u > 0.8 -> 0.75; u > 0.6 -> 0.4; else 0
UNIQUENESS_WEIGHT = 0.3  # R_uniq = 0.3 x bucket, 0 .. 0.3
FORMAT_STEPS = (
    (0.7, 2.0),
    (0.3, 1.0),
)  # share of segments carrying a perspective >= edge -> points; else 0
DUPLICATE_PENALTY = 0.5  # per repeated sentence and per repeated perspective name
SUMMARY_STEPS = (
    (0.75, 0.0),
    (0.5, -0.5),
    (0.25, -0.75),
)  # share of names in the summary >= edge -> term
SUMMARY_MISS = -1.0  # ... below the last edge, or names but no <summary> block
FORMAT_WEIGHT = 0.1  # R_fmt = 0.1 x score, 0 .. 0.2
TAG_PENALTY = -0.2  # R_tag when the answer is not exactly <core perspectives>...</> <summary>...</>
MASK_TOKEN = "[KW]"  # what a prompt word in an answer becomes before embedding
MASK_MODES = (
    "answer",
    "both",
    "none",
)  # 'answer' = the paper; 'both' also masks references; 'none' = off

# ---------------------------------------------------------------- perspectives as text
# A perspective starts where an opener begins the text or a line, followed by a space; an indented opener starts none.
# This is the authors' regex (vllm_rollout_spmd.py and op_reward_batch.py, _split_sentences).
PERSPECTIVE_START = re.compile(r"(?:^|\n)(?=(?:From|In) the perspective of )", re.IGNORECASE)
PERSPECTIVE_LINE = re.compile(
    r"^\s*(?:In|From) the perspective of\s+([^,\n]+?)\s*,\s*(.*)$", re.IGNORECASE | re.DOTALL
)
CORE_BLOCK = re.compile(
    r"<core\s+perspectives>(.*?)</core\s+perspectives>", re.IGNORECASE | re.DOTALL
)


def perspective_line(name, explanation):
    """The paper's reference line for one perspective: 'In the perspective of {name}, {explanation}'."""
    return f"In the perspective of {name}, {explanation}"


def split_perspectives(text):
    """`text` cut before every 'In/From the perspective of ' (any case) that starts the text or a line; an indented
    opener cuts nothing. Pieces are stripped; blank ones are dropped. A preamble before the first opener is a piece.

    >>> split_perspectives("Hi.\\nIn the perspective of A, a.\\n  In the perspective of B.\\nfrom the perspective of C")
    ['Hi.', 'In the perspective of A, a.\\n  In the perspective of B.', 'from the perspective of C']
    """
    if not isinstance(text, str):
        raise TypeError(f"split_perspectives expects a string, got {type(text).__name__}")
    return [p.strip() for p in PERSPECTIVE_START.split(text) if p.strip()]


def parse_perspective(piece):
    """(name, explanation) of one 'In the perspective of NAME, EXPLANATION' piece, or None."""
    m = PERSPECTIVE_LINE.match(piece)
    return (m.group(1).strip(), m.group(2).strip()) if m else None


# ---------------------------------------------------------------- the similarity estimator (harness.models.load_embedder)
def unit_embeddings(embedder, texts):
    """{text: L2-normalised float32 embedding} of the distinct texts, one encode call: a dot product is the cosine."""
    texts = list(dict.fromkeys(texts))
    if not texts:
        return {}
    E = _matrix(embedder.encode(texts)).astype(np.float32)  # [n_texts, dim]
    return dict(zip(texts, E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)))


def _matrix(x, square=False):
    """A 2-D (square) float numpy array from numpy or torch; float32 stays float32 (see greedy_matches)."""
    if hasattr(x, "detach"):  # torch: numpy has no bfloat16, float32 holds it
        x = (x.float() if x.element_size() < 4 else x).detach().cpu().numpy()
    x = np.asarray(x)
    x = x if x.dtype == np.float32 else x.astype(np.float64)
    if x.ndim != 2 or np.isnan(x).any() or square and x.shape[0] != x.shape[1]:
        raise ValueError(
            f"expected a 2-D {'square ' * square}similarity matrix without NaN, got shape {x.shape}"
        )
    return x


# ---------------------------------------------------------------- keyword masking (the authors' [KW])
# NLTK's English stopword list (nltk_data corpora/stopwords/english, the 179-word revision that the authors' code
# loaded with stopwords.words("english")), embedded because NLTK's corpus cannot be downloaded at run time. Its 26 forms
# with an apostrophe are kept for exactness, though a \w+ token never is one; for the same reason the 2024 revision,
# which adds only apostrophe forms ("i'm", "they're", ...), masks exactly the same words.
STOPWORDS = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
yourselves he him his himself she she's her hers herself it it's its itself they them their theirs themselves what which
who whom this that that'll these those am is are was were be been being have has had having do does did doing a an the
and but if or because as until while of at by for with about against between into through during before after above
below to from up down in out on off over under again further then once here there when where why how all any both each
few more most other some such no nor not only own same so than too very s t can will just don don't should should've
now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn
isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't
wouldn wouldn't""".split()
)
WORD = re.compile(r"\w+")


def prompt_keywords(situation):
    """The set of the situation's words (WORD: runs of \\w), lower-cased, less STOPWORDS and any that are not
    alphanumeric (an underscore), as the authors' code keeps them (their words came from the whole prompt).

    >>> sorted(prompt_keywords("Lying to my friend about her cooking"))
    ['cooking', 'friend', 'lying']
    """
    return {w for w in WORD.findall(situation.lower()) if w not in STOPWORDS and w.isalnum()}


def mask_words(text, keywords):
    """`text` with every word (WORD) whose lower-case form is in `keywords` (a set of lower-case words) replaced by
    MASK_TOKEN '[KW]'; everything else, punctuation and spacing included, stays (the authors' code lost it). No
    keywords: the text as it is.

    >>> mask_words("In the perspective of honesty, lying hurts.", {"lying"})
    'In the perspective of honesty, [KW] hurts.'
    """
    return (
        WORD.sub(lambda m: MASK_TOKEN if m.group().lower() in keywords else m.group(), text)
        if keywords
        else text
    )


# ---------------------------------------------------------------- 1. coverage: the ladder
def greedy_matches(sim, threshold=COVERAGE_THRESHOLD):
    """Matched (reference i, candidate j) pairs of the paper's rule: take the largest remaining S[i, j]; if it is
    >= threshold and the maximum of its row and column, match it and remove row i and column j. The largest remaining
    cell always is the maximum of its row and column, so this is plain greedy matching: a reference whose best
    candidate went to another falls back on its next best. Ties go to the first cell in row-major order.
    Takes sim [n_ref, n_cand]: a nested list, numpy array or torch tensor of any float dtype (bfloat16 and float16
    tensors become float32; other inputs that are not float32 become float64), compared with the threshold in that
    precision, so a float32 cosine of 0.7 counts as 0.7 at threshold 0.7. Returns a list of (i, j) pairs of Python
    ints, in the order they were matched; an empty matrix gives []. A matrix that is not 2-D or holds NaN: ValueError.

    >>> greedy_matches([[0.9, 0.8], [0.95, 0.1]])    # both references prefer candidate 0
    [(1, 0), (0, 1)]
    """
    S = _matrix(sim).copy()  # [n_ref, n_cand]
    threshold, pairs = S.dtype.type(threshold), []  # in S's precision: a float32 0.7 counts as 0.7
    for _ in range(min(S.shape)):  # at most min(n_ref, n_cand) matches
        i, j = np.unravel_index(np.argmax(S), S.shape)
        if not S[i, j] >= threshold:
            break
        pairs.append((int(i), int(j)))
        S[i, :], S[:, j] = -np.inf, -np.inf
    return pairs


def ladder_bucket(rate):
    """The ladder's bucket, an int: 0 if rate <= 0, else 1 + the number of edges (0.2, 0.4, 0.6, 0.8) that rate
    reaches (rate >= edge); exact for rate = k / n, as k / n and the literal 0.2 are both the double nearest to 1/5.

    >>> [ladder_bucket(k / 5) for k in range(6)]
    [0, 2, 3, 4, 5, 5]
    """
    return 0 if rate <= 0 else 1 + sum(rate >= edge for edge in COVERAGE_EDGES)


def coverage_reward(sim, threshold=COVERAGE_THRESHOLD):
    """R_cov = 0.3 x ladder_bucket(#matches / #references) from reference x candidate cosines sim [n_ref, n_cand]
    (as greedy_matches takes it) -> (R_cov float, rate float, pairs: greedy_matches' list). No reference or no
    candidate: rate 0.0 and R_cov 0.0; a bad matrix: greedy_matches' ValueError.

    >>> coverage_reward([[0.9, 0.2], [0.3, 0.75], [0.1, 0.1]])[:2]   # 2 of 3 covered: bucket 4
    (1.2, 0.6666666666666666)
    """
    pairs, n_ref = greedy_matches(sim, threshold), np.shape(sim)[0]  # sim: [n_ref, n_cand]
    rate = len(pairs) / n_ref if n_ref else 0.0
    return COVERAGE_WEIGHT * ladder_bucket(rate), rate, pairs


# ---------------------------------------------------------------- 2. uniqueness
def redundant_flags(sim_cc, threshold=UNIQUENESS_THRESHOLD):
    """For each perspective i not yet flagged, flag every later j with cos(i, j) >= threshold; a flagged one flags none.
    Takes sim_cc [n, n], the answer's perspectives against themselves (as greedy_matches takes a matrix, compared in
    the same precision; not square: ValueError). Returns a numpy bool array [n]; n = 0 gives an empty one.

    >>> redundant_flags([[1, .8, .5], [.8, 1, .8], [.5, .8, 1]]).tolist()     # A~B, B~C, A and C apart
    [False, True, False]
    """
    S = _matrix(sim_cc, square=True)  # [n, n]
    threshold, flagged = S.dtype.type(threshold), np.zeros(len(S), dtype=bool)  # [n]
    for i in range(len(S)):  # by row: whether i flags depends on earlier rows
        if not flagged[i]:
            flagged[i + 1 :] |= S[i, i + 1 :] >= threshold
    return flagged


def uniqueness_bucket(u):
    """The uniqueness step, a float: u == 1 -> 1.0; u > 0.8 -> 0.75; u > 0.6 -> 0.4; else 0.0 (so exactly 0.8 ->
    0.4, exactly 0.6 -> 0.0).

    >>> [uniqueness_bucket(u) for u in (1, 5 / 6, 4 / 5, 3 / 4, 3 / 5)]
    [1.0, 0.75, 0.4, 0.4, 0.0]
    """
    return 1.0 if u == 1 else next((value for edge, value in UNIQUENESS_STEPS if u > edge), 0.0)


def uniqueness_reward(sim_cc, threshold=UNIQUENESS_THRESHOLD, min_perspectives=0):
    """R_uniq = 0.3 x uniqueness_bucket(u), u = (n - #redundant) / n, from sim_cc [n, n] (redundant_flags at
    `threshold`) -> (R_uniq float, u float). One perspective has u = 1 as in the paper; no perspective has u = 0.0
    (the authors' u = 1 paid an empty answer). With fewer than min_perspectives perspectives R_uniq is 0.0 (u as is).

    >>> uniqueness_reward([[1, .9], [.9, 1]])       # the second repeats the first: u = 1/2
    (0.0, 0.5)
    """
    flags = redundant_flags(sim_cc, threshold)  # [n]
    n = len(flags)
    u = (n - int(flags.sum())) / n if n else 0.0
    return (0.0 if n < min_perspectives else UNIQUENESS_WEIGHT * uniqueness_bucket(u)), u


# ---------------------------------------------------------------- 3. format score and 4. tag check
PERSPECTIVE_NAME = re.compile(r"(?:^|\s)(?:In|From) the perspective of ([^,.\n]+)", re.IGNORECASE)
SUMMARY_BLOCK = re.compile(r"<summary>(.*?)</summary>", re.IGNORECASE | re.DOTALL)
ANY_TAG = re.compile(r"</?(?:core\s+perspectives|summary)>", re.IGNORECASE)
TAGGED_ANSWER = re.compile(
    rf"\s*{CORE_BLOCK.pattern}\s*{SUMMARY_BLOCK.pattern}\s*", re.IGNORECASE | re.DOTALL
)


def format_score(text):
    """R_fmt = 0.1 x max(0, points - 0.5 x repeats + summary term), a float in [0, 0.2], of the answer `text`.
    Segments: split_perspectives of the inside of the first <core perspectives> block (CORE_BLOCK), else of the whole
    text (as the authors' format score). A segment carries a perspective if PERSPECTIVE_NAME finds 'In/From the
    perspective of X' in it; X, stripped and lower-cased, is its name (X runs to the first , . or newline).
    points: 2 if >= 70 % of the segments carry one, 1 if >= 30 %, else 0 (no segments: 0).
    repeats: 1 per segment equal to an earlier one (ignoring case), 1 per name X equal to an earlier one.
    summary term, by the share f of the names (repeats included) found in the <summary> block (ignoring case):
    f >= .75 -> 0, >= .5 -> -0.5, >= .25 -> -0.75, else -1; no names -> 0; names but no <summary> -> -1 (a name is
    found if it is a substring of the lower-cased inside of the first <summary> block, SUMMARY_BLOCK)
    (the authors' code then searched the whole text, so an untagged answer escaped the term).

    >>> round(format_score("In the perspective of A, a.\\nIn the perspective of B, b.\\n<summary>A.</summary>"), 3)
    0.15
    """
    block = CORE_BLOCK.search(text)
    segments = split_perspectives(block.group(1) if block else text)
    names = [m.group(1).strip().lower() for m in map(PERSPECTIVE_NAME.search, segments) if m]
    points = next(
        (value for edge, value in FORMAT_STEPS if segments and len(names) / len(segments) >= edge),
        0.0,
    )
    repeats = len(segments) - len({s.lower() for s in segments}) + len(names) - len(set(names))
    summary = SUMMARY_BLOCK.search(text)
    shown = (
        sum(n in summary.group(1).lower() for n in names) / len(names) if names and summary else 0.0
    )
    term = (
        next((value for edge, value in SUMMARY_STEPS if shown >= edge), SUMMARY_MISS)
        if names
        else 0.0
    )
    return FORMAT_WEIGHT * max(0.0, points - DUPLICATE_PENALTY * repeats + term)


def tag_reward(text):
    """R_tag, a float: 0.0 if the whole answer is one <core perspectives> block, then one <summary> block, with only
    whitespace around and between them, tags in any case (and any whitespace inside 'core perspectives'), both
    blocks holding more than whitespace and no other of these four tags anywhere; else TAG_PENALTY -0.2.

    >>> tag_reward("<core perspectives>x</core perspectives>\\n<summary>y</summary>"), tag_reward("x")
    (0.0, -0.2)
    """
    m = TAGGED_ANSWER.fullmatch(text)
    ok = m and len(ANY_TAG.findall(text)) == 4 and m.group(1).strip() and m.group(2).strip()
    return 0.0 if ok else TAG_PENALTY


def similarity_text(answer):
    """The text whose perspectives coverage and uniqueness embed: the inside of <core perspectives> when the answer
    has the strict layout (tag_reward 0), else the whole answer, stripped, tags, preamble and summary included (the
    paper: "the inside of <core perspectives> when the format parses, else the whole text"; the authors' "parses" is
    this strict layout).

    >>> similarity_text("Sure! <core perspectives>In the perspective of A, a.</core perspectives> ")
    'Sure! <core perspectives>In the perspective of A, a.</core perspectives>'
    """
    return CORE_BLOCK.search(answer).group(1) if tag_reward(answer) == 0 else answer.strip()


# ---------------------------------------------------------------- the total, for a batch of answers
@dataclass
class RewardBreakdown:
    total: float  # max(0, coverage + uniqueness + format + tag), 0 .. 2
    coverage: float  # R_cov, 0 .. 1.5
    rate: float  # share of the reference perspectives matched
    uniqueness: float  # R_uniq, 0 .. 0.3
    u: float  # share of the answer's perspectives that repeat no earlier one
    format: float  # R_fmt, 0 .. 0.2
    tag: float  # R_tag, 0 or -0.2


_REFERENCE_CACHE = (
    weakref.WeakKeyDictionary()
)  # embedder -> {reference perspective text: unit vector}


def score_answers(
    answers,
    references,
    embedder,
    situations=None,
    mask_keywords="answer",
    min_perspectives=0,
    coverage_threshold=COVERAGE_THRESHOLD,
    uniqueness_threshold=UNIQUENESS_THRESHOLD,
):
    """RewardBreakdowns of answers[k] against references[k] (text or a list of perspectives), one encode call per batch.
    situations[k]'s words become [KW] in the answer ('answer', the paper: the masked answer feeds coverage and
    uniqueness), in answer and reference ('both') or nowhere ('none', or situations=None). An empty answer scores 0
    on every term but R_tag. Each reference perspective is embedded once per embedder (cached).
    Example: a reference answer against itself ('both') gets 1.5 + 0.3 + 0.2 + 0 = 2.0 if no two perspectives repeat.
    """
    if mask_keywords not in MASK_MODES:
        raise ValueError(f"mask_keywords must be one of {MASK_MODES}, got {mask_keywords!r}")
    if not hasattr(embedder, "encode"):
        raise TypeError(
            f"embedder must have .encode(list of str), e.g. harness.models.load_embedder(); got {embedder!r:.60}"
        )
    if isinstance(answers, str) or isinstance(references, str):
        raise TypeError(
            "answers and references must be lists with one item per answer, not one string"
        )
    answers, references = list(answers), list(references)
    situations = [None] * len(answers) if situations is None else list(situations)
    if not len(answers) == len(references) == len(situations):
        raise ValueError(
            f"got {len(answers)} answers, {len(references)} references, {len(situations)} situations:"
            f" pass one of each per answer (repeat them for every answer of a group)"
        )

    cands, refs = [], []  # each answer's and reference's perspectives
    for i, (a, r, s) in enumerate(zip(answers, references, situations)):
        for name, x, ok in (("answers", a, str), ("situations", s, (str, type(None)))):
            if not isinstance(x, ok):
                raise TypeError(f"{name}[{i}] is {type(x).__name__}, expected a string")
        if not (
            isinstance(r, str)
            or isinstance(r, (list, tuple))
            and all(isinstance(p, str) for p in r)
        ):
            raise TypeError(
                f"references[{i}] is {type(r).__name__}: expected text or a list of perspective strings"
            )
        ps = (
            split_perspectives(similarity_text(r))
            if isinstance(r, str)
            else [p.strip() for p in r if p.strip()]
        )
        if not ps:
            raise ValueError(f"references[{i}] has no perspectives: {r!r:.80}")
        kw = prompt_keywords(s) if s is not None and mask_keywords != "none" else set()
        cands.append([mask_words(p, kw) for p in split_perspectives(similarity_text(a))])
        refs.append([mask_words(p, kw) for p in ps] if mask_keywords == "both" else ps)

    cache = _REFERENCE_CACHE.setdefault(embedder, {})
    vec = unit_embeddings(
        embedder, [p for ps in cands for p in ps] + [p for ps in refs for p in ps if p not in cache]
    )
    cache.update((p, vec[p]) for ps in refs for p in ps if p not in cache)

    out = []
    for answer, ps, rs in zip(answers, cands, refs):
        R = np.stack([cache[p] for p in rs])  # [n_ref, dim]
        C = (
            np.stack([vec[p] for p in ps]) if ps else np.zeros((0, R.shape[1]), np.float32)
        )  # [n_cand, dim]
        cov, rate, _ = coverage_reward(R @ C.T, coverage_threshold)  # R @ C.T: [n_ref, n_cand]
        uniq, u = uniqueness_reward(
            C @ C.T, uniqueness_threshold, min_perspectives
        )  # C @ C.T: [n_cand, n_cand]
        fmt, tag = format_score(answer), tag_reward(answer)
        out.append(RewardBreakdown(max(0.0, cov + uniq + fmt + tag), cov, rate, uniq, u, fmt, tag))
    return out
