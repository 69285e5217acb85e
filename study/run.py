"""The small reproduction: does OP-GRPO make the answers to held-out situations more pluralistic than SFT alone?

python study/run.py                  # the whole study on the CPU -> runs/study/ (docs/study.md gives the times)
python study/run.py --smoke          # the same pipeline at tiny settings, a few minutes (CI runs it)
python study/run.py --out runs/study_powered --coverage-threshold 0.547 --styles bare,brief,advisor

1. Stage 1: sim_train.py fine-tunes MiniLM on the training paraphrases; the reward uses it (the paper's order).
2. SFT warm start: one full epoch over data/train.jsonl (31 steps of 4), saved once and shared by every seed.
3. GRPO from that SFT model, reward under the Stage-1 estimator, for each of --seeds. --coverage-threshold moves
   the reward's 0.70 (an option, off by default); the Stage-1 model's own calibrated threshold is in the report.
4. Answers to the held-out situations of data/test.jsonl (temperature 0.7, top_p 0.9, the paper's eval sampling):
   --answers per situation from SFT and every seed, --base-answers from base (implicit and explicit prompt), and
   --style-answers from each model in every prompt style of --styles, which no model was trained on.
   Answers are appended as each batch is done; a rerun (or a second sitting) answers only what is missing.
5. Per answer: coverage under the Stage-1 estimator (what GRPO trained against) and under the untuned MiniLM at
   a threshold calibrated on the *training* paraphrase pairs; distinct perspectives, format, length, repeats.
   Per situation the mean of its answers; paired differences with a 95 % bootstrap interval and a paired
   sign-flip test. Written to OUT/study.json and OUT/report.md. The test set informs no choice made here.
"""

import argparse
import json
import math
import os
import sys
import time
import zlib

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the core lives one folder up
    sys.path.insert(0, ROOT)

import eval_nli
import harness.cli
import harness.data
import harness.models
import harness.report
import harness.runs
import opgrpo_min as om
import reward
import sim_train
from harness.answers import append_rows, check_texts, saved_rows
from harness.stats import paired

FULL = dict(
    sft_steps=31,
    steps=12,
    prompts_per_step=2,
    group_size=4,
    max_new_tokens=160,
    lr=5e-6,
    seeds=3,
    answers=16,
    base_answers=4,
    style_answers=4,
    eval_tokens=160,
    sim_epochs=2,
    situations=None,
    coverage_threshold=reward.COVERAGE_THRESHOLD,
)
SMOKE = dict(
    sft_steps=2,
    steps=2,
    prompts_per_step=2,
    group_size=2,
    max_new_tokens=8,
    lr=5e-6,
    seeds=2,
    answers=4,
    base_answers=2,
    style_answers=2,
    eval_tokens=8,
    sim_epochs=1,
    situations=4,
    coverage_threshold=reward.COVERAGE_THRESHOLD,
)
GROWS = (
    "seeds",
    "answers",
    "base_answers",
    "style_answers",
)  # knobs a rerun may change: they add to what is there
VALID = {
    "sft_steps": lambda v: v >= 1,
    "steps": lambda v: v >= 1,
    "prompts_per_step": lambda v: v >= 1,
    "group_size": lambda v: v >= 2,
    "max_new_tokens": lambda v: v >= 1,
    "lr": lambda v: 0 < v < 1,
    "seeds": lambda v: v >= 1,
    "answers": lambda v: v >= 2,
    "base_answers": lambda v: v >= 1,
    "style_answers": lambda v: v >= 1,
    "eval_tokens": lambda v: v >= 1,
    "sim_epochs": lambda v: v >= 1,
    "situations": lambda v: v >= 1,
    "coverage_threshold": lambda v: -1 <= v <= 1,
}
BLOCK = (
    4  # answers per prompt in one generate call; a block is also the unit a rerun skips or redoes
)
METRICS = (
    "coverage_stage1",
    "coverage_stage1_at_t",
    "coverage_minilm",
    "distinct",
    "in_format",
    "words",
    "repeats",
)
COVERAGE = METRICS[:3]


# ================================================================ the yardsticks
def calibrated_threshold(embedder, items):
    """The cosine that best separates paraphrase pairs (a perspective and its paraphrase) from non-pairs (it and the
    paraphrase of another perspective of the same situation), by balanced accuracy (TPR + TNR) / 2, on `items`
    (the training set). Returns (threshold, balanced accuracy, n pairs, n non-pairs)."""
    pos, neg = [], []
    for s in items:
        ps = [p for p in s.perspectives if p.paraphrase]
        E = reward.unit_embeddings(
            embedder, [p.explanation for p in ps] + [p.paraphrase for p in ps]
        )
        for i, a in enumerate(ps):
            for j, b in enumerate(ps):
                (pos if i == j else neg).append(float(E[a.explanation] @ E[b.paraphrase]))
    pos, neg = np.array(pos), np.array(neg)
    cands = np.unique(np.concatenate([pos, neg]))
    bal = [((pos >= t).mean() + (neg < t).mean()) / 2 for t in cands]
    best = int(np.argmax(bal))
    return float(cands[best]), float(bal[best]), len(pos), len(neg)


def best_cosines(rows, items, embedder):
    """For each answer, the highest cosine between one of its sentences and one of its situation's reference
    perspective lines: how close the answers come to a coverage match at all."""
    refs = {
        s.id: [reward.perspective_line(p.name, p.explanation) for p in s.perspectives]
        for s in items
    }
    sents = [eval_nli.split_sentences(r["answer"]) for r in rows]
    E = reward.unit_embeddings(
        embedder, [x for r in rows for x in refs[r["id"]]] + [x for ss in sents for x in ss]
    )
    out = []
    for r, ss in zip(rows, sents):
        R = np.stack([E[x] for x in refs[r["id"]]])  # [n_ref, dim]
        out.append(
            float((R @ np.stack([E[x] for x in ss]).T).max()) if ss else 0.0
        )  # R @ C.T: [n_ref, n_sent]
    return out


def answer_stats(text, embedder):
    """Distinct perspectives (the pieces the reward embeds that name one, minus those reward.redundant_flags marks
    at 0.78), whether it has
    the required form (>= 2 perspectives, >= 70 % of its pieces carry one, a <summary> block), its length in words,
    and whether it repeats itself (a redundant perspective, a repeated name or a repeated sentence)."""
    pieces = reward.split_perspectives(reward.similarity_text(text))
    names = [m.group(1).strip().lower() for m in map(reward.PERSPECTIVE_NAME.search, pieces) if m]
    flags = np.zeros(0, bool)
    if pieces:
        E = reward.unit_embeddings(embedder, pieces)
        C = np.stack([E[p] for p in pieces])  # [n, dim]
        flags = reward.redundant_flags(C @ C.T)
    sents = [x.lower() for x in eval_nli.split_sentences(text)]
    in_format = (
        len(names) >= 2
        and len(names) >= 0.7 * len(pieces)
        and bool(reward.SUMMARY_BLOCK.search(text))
    )
    repeats = bool(flags.any()) or len(set(names)) < len(names) or len(set(sents)) < len(sents)
    named = [bool(reward.PERSPECTIVE_NAME.search(p)) for p in pieces]
    distinct = sum(n and not f for n, f in zip(named, flags))
    return dict(
        distinct=distinct,
        in_format=float(in_format),
        words=len(text.split()),
        repeats=float(repeats),
    )


def per_answer(rows, items, stage1, minilm, threshold, reward_threshold):
    """{metric: [[the value of each answer] for each situation of items]} for one model's answers (rows: dicts with
    id and answer). coverage_stage1 is at the paper's 0.70, coverage_stage1_at_t at the threshold the GRPO reward
    used, coverage_minilm at the calibrated threshold of the untuned MiniLM."""
    by_id = {s.id: s for s in items}
    texts, its = [r["answer"] for r in rows], [by_id[r["id"]] for r in rows]
    value = dict(
        coverage_stage1=eval_nli.embedding_coverage(texts, its, stage1),
        coverage_stage1_at_t=eval_nli.embedding_coverage(texts, its, stage1, reward_threshold),
        coverage_minilm=eval_nli.embedding_coverage(texts, its, minilm, threshold),
    )
    stats = [answer_stats(t, stage1) for t in texts]
    value.update({m: [x[m] for x in stats] for m in METRICS[3:]})
    return {
        m: [[v for r, v in zip(rows, value[m]) if r["id"] == s.id] for s in items] for m in METRICS
    }


def noise_budget(a, b, n_seeds=1, answers=(4, 8, 16, 32)):
    """Why a paired difference mean(a) - mean(b) over n situations is within noise: its variance, split into answer
    sampling (the answers to one situation vary around that situation's mean: within-variance / answers) and the
    rest (situations differ in what a model gains there). a, b: per situation, the value of each answer (a: every
    seed's answers pooled). Returns the standard error now, the share of its variance that is answer sampling, and
    for m answers per situation from SFT and from each of n_seeds seeds the standard error and the smallest effect
    a two-sided 5 % test finds 80 % of the time (2.8 standard errors).

    >>> r = noise_budget([[1, 0], [1, 1]], [[0, 0], [0, 0]]); r["se"], r["sampling_share"], r["by_answers"][8]["se"]
    (0.25, 1.0, 0.125)
    """
    if min(len(x) for x in list(a) + list(b)) < 2:
        return None  # one answer per situation shows no within-situation variance
    d = np.array([np.mean(x) - np.mean(y) for x, y in zip(a, b)])  # [n]
    wa, wb = (float(np.mean([np.var(x, ddof=1) for x in rows])) for rows in (a, b))
    var_d, sampling = float(np.var(d, ddof=1)), wa / len(a[0]) + wb / len(b[0])
    between = max(var_d - sampling, 0.0)
    se = {m: float(np.sqrt((between + wa / (n_seeds * m) + wb / m) / len(d))) for m in answers}
    return dict(
        se=float(np.sqrt(var_d / len(d))),
        sampling_share=min(sampling / var_d, 1.0) if var_d else 0.0,
        by_answers={m: dict(se=v, detectable=2.8 * v) for m, v in se.items()},
    )


# ================================================================ answers: appended as they are made
def design(S, styles):
    """[(model row, prompt style, answers per situation)] of the study: base in the implicit and the explicit
    prompt, SFT and every seed in the implicit one, and every model in each unseen style."""
    seeds = [f"seed{k}" for k in range(S["seeds"])]
    plan = [
        ("base", "implicit", S["base_answers"]),
        ("base", "explicit", S["base_answers"]),
        ("sft", "implicit", S["answers"]),
    ] + [(g, "implicit", S["answers"]) for g in seeds]
    return plan + [
        (m, style, S["style_answers"]) for style in styles for m in ["base", "sft"] + seeds
    ]


def read_answers(path):
    """{(row, style, id, sample): answer row} of OUT/answers.jsonl. A kill mid-append can leave a torn last line;
    it is cut off here (those answers are made again), any other bad line is an error that names it."""
    return saved_rows(path, ("row", "prompt", "id", "sample"))


def block_seed(seed, row, style, batch, block):
    """The torch seed of one block: fixed by what it answers, so a rerun that makes a block again draws the same
    answers, and --answers 32 after 16 adds blocks 4-7 without touching blocks 0-3."""
    return zlib.crc32(f"{seed}/{row}/{style}/{batch}/{block}".encode())


def answer(path, row, source, style, items, n, gen, loaded):
    """Append to `path` the answers of model `row` (loaded from `source`) in prompt `style` that it lacks: n per
    situation, made BLOCK at a time for a batch of gen.batch_size situations. loaded: a one-model cache
    {row: (model, tokenizer)}, so a model is loaded once for all its styles and not at all when nothing is missing.
    Returns the number of answers made."""
    have, made = read_answers(path), 0
    check_texts(
        [r for k, r in have.items() if k[:2] == (row, style)], items, path
    )  # the same questions
    for b in range(0, len(items), gen.batch_size):
        batch = items[b : b + gen.batch_size]
        for k in range(math.ceil(n / BLOCK)):
            samples = range(k * BLOCK, min(n, (k + 1) * BLOCK))
            if all((row, style, s.id, j) in have for s in batch for j in samples):
                continue
            if row not in loaded:
                loaded.clear()
                loaded[row] = harness.models.load_policy(
                    harness.models.resolve_model(source), "cpu"
                )
            model, tok = loaded[row]
            torch.manual_seed(block_seed(gen.seed, row, style, b // gen.batch_size, k))
            prompt = lambda s: om.chat_prompt(tok, s, style)  # noqa: B023 (used at once)
            harness.data.check_prompts(tok, batch, eval_nli.MAX_PROMPT_LEN, prompt)
            texts = om.sample_groups(
                model,
                tok,
                [om.chat_prompt(tok, s.situation, style) for s in batch],
                BLOCK,
                gen.max_new_tokens,
                0.7,
                0.9,
            ).texts  # prompt i: i*4 .. i*4+3
            new = [
                dict(
                    row=row,
                    prompt=style,
                    id=s.id,
                    sample=j,
                    answer=texts[i * BLOCK + j - k * BLOCK],
                    model=source or "default",
                    situation=s.situation,
                )
                for i, s in enumerate(batch)
                for j in samples
                if (row, style, s.id, j) not in have
            ]
            append_rows(path, new)  # one write per block, on disk before the next one
            made += len(new)
            print(
                f"[answers] {row} {style}: batch {b // gen.batch_size + 1}, block {k + 1}: {made} new",
                flush=True,
            )
    return made


# ================================================================ the pipeline
def check_settings(out, S, args):
    """The knobs of a study are recorded in OUT/settings.json when it starts; a rerun into the same OUT must keep
    them (it would label old models with new settings), except those that only add answers or seeds (GROWS)."""
    fixed = dict(
        {k: v for k, v in S.items() if k not in GROWS},
        model=args.model,
        sim_base=args.sim_base,
        seed=args.seed,
        batch_size=args.batch_size,
        train_data=os.path.abspath(args.train_data),
        test_data=os.path.abspath(args.test_data),
    )
    path = os.path.join(out, "settings.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        for k, v in fixed.items():
            if k in saved and saved[k] != v:
                raise ValueError(
                    f"--{k.replace('_', '-')} {v}: the study in {out} was run with {saved[k]}, and a "
                    f"rerun keeps it (only {', '.join('--' + g.replace('_', '-') for g in GROWS)} may "
                    f"change); use another --out"
                )
    return path, fixed


def train_seed(k, run_dir, sft, S, common, model_args, log):
    """GRPO seed k into run_dir, from the shared SFT model (seed 0 makes it first): skipped when its checkpoint is
    at the last step, resumed when a stopped run left one, started over when a killed run left none."""
    state = os.path.join(run_dir, "checkpoint", "trainer_state.json")
    step = json.load(open(state, encoding="utf-8"))["step"] if os.path.isfile(state) else None
    if step == S["steps"]:
        return
    if step is not None:
        log(f"GRPO seed {k}: resuming at step {step}")
        om.main(["--resume", run_dir, "--steps", str(S["steps"])])
        return
    warm = k == 0 and not os.path.isdir(
        sft
    )  # a saved SFT model (say, copied from another study) is reused
    log(f"GRPO seed {k}" + (" (after the SFT warm start)" if warm else f" from {sft}"))
    start = (
        model_args + ["--sft-steps", str(S["sft_steps"])]
        if warm
        else ["--model", sft, "--sft-steps", "0"]
    )
    again = ["--overwrite"] if os.path.exists(os.path.join(run_dir, "config.json")) else []
    om.main(
        start + common + ["--steps", str(S["steps"]), "--seed", str(k), "--out", run_dir] + again
    )


def run(args):
    S = dict(
        SMOKE if args.smoke else FULL,
        **{k: v for k, v in vars(args).items() if k in FULL and v is not None},
    )
    for k, ok in VALID.items():
        if S[k] is not None and not (math.isfinite(S[k]) and ok(S[k])):
            raise ValueError(
                f"--{k.replace('_', '-')} {S[k]}: out of range (see python study/run.py --help)"
            )
    styles = [x for x in (args.styles or "").split(",") if x]
    unknown = [x for x in styles if x not in om.PROMPT_STYLES or x in ("implicit", "explicit")]
    if unknown:
        raise ValueError(
            f"--styles {args.styles}: {unknown[0]!r} is not an unseen prompt style; choose from "
            f"{', '.join(x for x in om.PROMPT_STYLES if x not in ('implicit', 'explicit'))}"
        )
    plan = design(S, styles)
    rows = [x for x in (args.rows or "").split(",") if x] or list(
        dict.fromkeys(m for m, _, _ in plan)
    )
    bad = [r for r in rows if r not in {m for m, _, _ in plan}]
    if bad:
        raise ValueError(
            f"--rows {args.rows}: no row {bad[0]!r} in this study; its rows are "
            f"{', '.join(dict.fromkeys(m for m, _, _ in plan))}"
        )
    train_items = harness.data.load_situations(
        args.train_data
    )  # every input is checked before any output
    test_items = harness.data.load_situations(args.test_data)[: S["situations"]]
    out, t0 = args.out, time.time()
    harness.runs.claim_out_dir(out)
    settings_path, fixed = check_settings(out, S, args)
    harness.runs.write_text(settings_path, json.dumps(fixed, indent=1))
    timings_path = os.path.join(out, "timings.json")
    timings = (
        json.load(open(timings_path, encoding="utf-8")) if os.path.isfile(timings_path) else {}
    )
    log = lambda msg: print(f"[study {time.time() - t0:5.0f} s] {msg}", flush=True)

    def timed(stage, fn, *a):
        t = time.time()
        result = fn(*a)
        if time.time() - t > 1:  # a stage that was already there costs nothing and keeps its time
            timings[stage] = round(time.time() - t)
            harness.runs.write_text(timings_path, json.dumps(timings, indent=1))
        return result

    # ---- 1. Stage 1: the similarity estimator the reward uses
    sim_dir = os.path.join(out, "sim")
    if not os.path.isfile(os.path.join(sim_dir, "sim_eval.json")):
        log("stage 1: sim_train.py")
        again = (
            ["--overwrite"] if os.path.isdir(sim_dir) else []
        )  # a killed stage 1 left a part of its output
        timed(
            "stage 1 (sim_train)",
            sim_train.main,
            ["--data", args.train_data, "--out", sim_dir, "--epochs", str(S["sim_epochs"])] + again,
        )
    stage1, minilm = (
        harness.models.load_embedder(sim_dir),
        harness.models.load_embedder(args.sim_base),
    )
    threshold, bal, n_pos, n_neg = calibrated_threshold(minilm, train_items)
    log(
        f"untuned MiniLM threshold {threshold:.3f} (balanced accuracy {bal:.3f} on {n_pos} training paraphrase "
        f"pairs and {n_neg} non-pairs)"
    )

    # ---- 2-3. SFT once, then GRPO for each seed from it
    common = [
        "--train-data",
        args.train_data,
        "--sim-model",
        sim_dir,
        "--prompts-per-step",
        str(S["prompts_per_step"]),
        "--group-size",
        str(S["group_size"]),
        "--max-new-tokens",
        str(S["max_new_tokens"]),
        "--lr",
        str(S["lr"]),
        "--coverage-threshold",
        str(S["coverage_threshold"]),
        "--sample-every",
        "0",
        "--save-every",
        "0",
        "--device",
        "cpu",
    ]
    model_args = ["--model", args.model] if args.model else []
    runs = [os.path.join(out, f"grpo_seed{k}") for k in range(S["seeds"])]
    sft = os.path.join(runs[0], "sft")
    for k, run_dir in enumerate(runs):
        if f"seed{k}" in rows or ("sft" in rows and k == 0):
            timed(
                f"GRPO seed {k}" + (" (with SFT)" if k == 0 else ""),
                train_seed,
                k,
                run_dir,
                sft,
                S,
                common,
                model_args,
                log,
            )

    # ---- 4. answers to the held-out situations, appended as they are made
    answers_path = os.path.join(out, "answers.jsonl")
    source = dict(base=args.model, sft=sft, **{f"seed{k}": r for k, r in enumerate(runs)})
    gen = argparse.Namespace(
        seed=args.seed, batch_size=args.batch_size, max_new_tokens=S["eval_tokens"]
    )
    loaded = {}
    for row, style, n in plan:
        if row in rows:
            made = timed(
                f"answers: {row} {style}",
                answer,
                answers_path,
                row,
                source[row],
                style,
                test_items,
                n,
                gen,
                loaded,
            )
            if made:
                log(f"answers: {row} {style}: {made} new")
    loaded.clear()
    have = read_answers(answers_path)
    missing = [
        (m, st)
        for m, st, n in plan
        if any((m, st, s.id, j) not in have for s in test_items for j in range(n))
    ]
    if missing:
        log(
            f"answers still missing for {', '.join(f'{m} {st}' for m, st in missing)}: rerun (without --rows, or with "
            f"those rows) to complete them; the report needs every row"
        )
        return None

    # ---- 5. metrics, paired differences, report
    t5 = time.time()
    answers = {
        (m, st): [have[(m, st, s.id, j)] for s in test_items for j in range(n)] for m, st, n in plan
    }
    values = {
        key: per_answer(r, test_items, stage1, minilm, threshold, S["coverage_threshold"])
        for key, r in answers.items()
    }
    table = {
        key: {m: [float(np.mean(x)) for x in v] for m, v in t.items()} for key, t in values.items()
    }
    grpo = [f"seed{k}" for k in range(S["seeds"])]
    for style in ["implicit"] + styles:
        table[("seed mean", style)] = {
            m: list(np.mean([table[(g, style)][m] for g in grpo], 0)) for m in METRICS
        }
    diffs = {
        f"{a} - {b}": {
            m: paired(table[(a, "implicit")][m], table[(b, "implicit")][m]) for m in METRICS
        }
        for a, b in [("seed mean", "sft"), ("sft", "base")] + [(g, "sft") for g in grpo]
    }
    style_diffs = {
        style: {
            m: paired(table[("seed mean", style)][m], table[("sft", style)][m]) for m in METRICS
        }
        for style in styles
    }
    seed_spread = {
        m: float(np.std([np.mean(table[(g, "implicit")][m]) for g in grpo], ddof=1))
        if len(grpo) > 1
        else None
        for m in METRICS
    }
    training = {
        g: [json.loads(line) for line in open(os.path.join(r, "metrics.jsonl"))]
        for g, r in zip(grpo, runs)
    }
    m_now = S["answers"]
    budget = {
        m: noise_budget(
            [
                sum((values[(g, "implicit")][m][i] for g in grpo), [])
                for i in range(len(test_items))
            ],
            values[("sft", "implicit")][m],
            len(grpo),
            sorted({4, 8, 16, 32, 64, m_now}),
        )
        for m in COVERAGE
    }
    # why coverage moves or not: how near the answers come to a match, and the Stage-1 threshold the training
    # pairs would pick (both measured, neither used)
    t1 = calibrated_threshold(stage1, train_items)
    near = {
        f"{m} {st}": np.quantile(best_cosines(r, test_items, stage1), [0.5, 0.9, 1.0]).tolist()
        for (m, st), r in answers.items()
        if st == "implicit"
    }
    why = dict(
        stage1_calibrated_threshold=t1[0],
        stage1_balanced_accuracy=t1[1],
        best_cosine_q50_q90_max=near,
        share_of_steps_with_coverage={
            g: float(np.mean([r["coverage"] > 0 for r in rows])) for g, rows in training.items()
        },
        zero_spread_mean={
            g: float(np.mean([r["zero_spread"] for r in rows])) for g, rows in training.items()
        },
        noise_budget=budget,
    )
    key = lambda k: f"{k[0]} {k[1]}"
    result = dict(
        settings=S,
        styles=styles,
        threshold=dict(minilm=threshold, balanced_accuracy=bal, pairs=n_pos, non_pairs=n_neg),
        answers_per_situation={key((m, st)): n for m, st, n in plan},
        means={key(k): {m: float(np.mean(v)) for m, v in t.items()} for k, t in table.items()},
        seed_spread=seed_spread,
        paired=diffs,
        paired_by_style=style_diffs,
        verdict=verdict(
            diffs["seed mean - sft"]["coverage_stage1"], budget["coverage_stage1"], m_now, len(grpo)
        ),
        why=why,
        per_situation={key(k): t for k, t in table.items()},
        training=training,
        timings=dict(timings, **{"scoring and report": round(time.time() - t5)}),
        wall_s=round(time.time() - t0),
    )
    harness.runs.write_text(os.path.join(out, "study.json"), json.dumps(result, indent=1))
    plot_training(os.path.join(out, "training.png"), training)
    text = report(result, test_items, answers)
    harness.runs.write_text(os.path.join(out, "report.md"), text)
    log(f"done: {out}/report.md")
    print(text)
    return result


def verdict(d, budget, answers, n_seeds, target=0.012):
    """One line: the OP-GRPO - SFT Stage-1 coverage difference, read against the effect this design can see (the
    smallest a two-sided 5 % test finds 80 % of the time, from noise_budget) and against `target`, the size the
    earlier attempts pointed at."""
    see = budget["by_answers"][answers]["detectable"] if budget else float("nan")
    head = (
        f"OP-GRPO - SFT Stage-1 coverage {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}], p {d['p']:.3f}, "
        f"with {answers} answers per situation from SFT and from each of {n_seeds} seeds, a design that sees "
        f"{see:.3f} at 80 % power"
    )
    if d["p"] < 0.05:
        return head + ": an effect."
    if d["hi"] < target:
        return head + f": within noise, and the interval rules out effects above {d['hi']:+.3f}."
    return (
        head
        + f": within noise; the interval holds both 0 and {target:+.3f}, so the question stays open."
    )


def plot_training(png, training):
    """The diagnostics of every seed's metrics.jsonl over the GRPO steps: reward, coverage and format terms, the
    share of zero-spread groups (no learning signal), the entropy of the sampled tokens, and the KL."""
    plt = harness.report.pyplot(png)
    if plt is None:
        return
    keys = ("reward", "coverage", "format", "zero_spread", "entropy", "kl")
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5), sharex=True)
    for ax, key in zip(axes.flat, keys):
        for name, rows in training.items():
            ax.plot(
                [r["step"] for r in rows],
                [r[key] for r in rows],
                label=name.replace("OP-GRPO ", ""),
            )
        ax.set_title(key, fontsize=9)
    axes[0, 0].legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("GRPO step")
    fig.tight_layout()
    harness.report.save_figure(plt, fig, png, dpi=110)


NAMES = dict(base="base", sft="SFT", **{"seed mean": "OP-GRPO (seed mean)"})


def label(key):
    """'seed0 implicit' -> 'OP-GRPO seed 0', 'base explicit' -> 'base explicit', 'sft implicit' -> 'SFT'."""
    row, style = key.rsplit(" ", 1)
    name = NAMES.get(row) or f"OP-GRPO seed {row[4:]}"
    return f"{name} {style}" if row == "base" or style != "implicit" else name


def report(r, items, answers):
    """The tables of study.json as markdown, and the three answers (base, SFT, OP-GRPO seed 0) to one situation."""
    cells = lambda d: " | ".join(
        f"{x['mean']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}] p={x['p']:.3f}" for x in d
    )
    cols = (
        "| row | answers | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS) + "\n"
    )
    text = (
        f"Settings: {json.dumps(r['settings'])}; wall time {r['wall_s']} s.\n\n"
        f"Stage times (s, on the run that made them): {json.dumps(r['timings'])}\n\n"
        f"Untuned MiniLM threshold {r['threshold']['minilm']:.3f}, calibrated on the training paraphrase pairs.\n\n"
        f"**Verdict.** {r['verdict']}\n\n"
    )
    text += (
        "Means over the held-out situations (each the mean of its answers), implicit prompt\n\n"
        + cols
    )
    for key, m in r["means"].items():
        if key.endswith("implicit") or key == "base explicit":
            n = r["answers_per_situation"].get(key, "-")
            text += f"| {label(key)} | {n} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |\n"
    text += (
        "| spread over seeds (std) | | "
        + " | ".join("-" if v is None else f"{v:.3f}" for v in r["seed_spread"].values())
        + " |\n"
    )
    text += (
        "\nPaired per-situation differences: mean [95 % bootstrap interval], sign-flip p\n\n" + cols
    )
    for name, d in r["paired"].items():
        a, b = name.split(" - ")
        text += f"| {label(a + ' implicit')} - {label(b + ' implicit')} | | {cells(d.values())} |\n"
    budget = r["why"]["noise_budget"]["coverage_stage1"]
    if budget:
        text += (
            "\nNoise budget, Stage-1 coverage (answer sampling is "
            f"{budget['sampling_share']:.0%} of the variance of the difference): the smallest effect found 80 % "
            "of the time with m answers per situation: "
            + ", ".join(f"{m}: {v['detectable']:.3f}" for m, v in budget["by_answers"].items())
            + "\n"
        )
    if r["styles"]:
        cols = (
            "| style | row | answers | in_format | distinct | coverage_stage1 | words |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        text += (
            "\nPrompt styles no model was trained on: means over the held-out situations\n\n" + cols
        )
        for style in r["styles"]:
            for row in ["base", "sft", "seed mean"]:
                m, n = (
                    r["means"][f"{row} {style}"],
                    r["answers_per_situation"].get(f"{row} {style}", "-"),
                )
                text += (
                    f"| {style} | {NAMES[row]} | {n} | "
                    + " | ".join(
                        f"{m[k]:.3f}" for k in ("in_format", "distinct", "coverage_stage1", "words")
                    )
                    + " |\n"
                )
        text += (
            "\nOP-GRPO (seed mean) - SFT in each style: mean [95 % bootstrap interval], sign-flip p\n\n"
            "| style | in_format | distinct | coverage_stage1 |\n|---|---|---|---|\n"
        )
        for style, d in r["paired_by_style"].items():
            text += f"| {style} | {cells(d[m] for m in ('in_format', 'distinct', 'coverage_stage1'))} |\n"
    text += f"\nWhy: {json.dumps(r['why'])}\n"
    sid = items[0].id
    text += (
        f"\nAnswers to the held-out situation {items[0].situation!r} (the first sample of each)\n"
    )
    for key in (("base", "implicit"), ("sft", "implicit"), ("seed0", "implicit")):
        a = next(x["answer"] for x in answers[key] if x["id"] == sid)
        text += f"\n**{label(' '.join(key))}**\n\n```\n{a.strip()}\n```\n"
    return text


def parse_args(argv=None):
    p = harness.cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny settings, a few minutes: the pipeline, not a result",
    )
    p.add_argument(
        "--out",
        default="runs/study",
        help="everything; a stage whose output is there is not run again",
    )
    p.add_argument(
        "--model", help="policy: hub id or local dir (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--sim-base", help="the untuned Sentence Transformer (default: the embedded MiniLM)"
    )
    p.add_argument("--train-data", default=os.path.join(om.HERE, "data", "train.jsonl"))
    p.add_argument("--test-data", default=os.path.join(om.HERE, "data", "test.jsonl"))
    for k in FULL:  # each knob of the study, default FULL (or SMOKE with --smoke)
        p.add_argument(
            "--" + k.replace("_", "-"),
            type=int if isinstance(FULL[k], int) or k == "situations" else float,
            help=f"default {FULL[k]} ({SMOKE[k]} with --smoke)",
        )
    p.add_argument(
        "--styles",
        default="",
        help="unseen prompt styles to answer in too, separated by commas: "
        + ", ".join(x for x in om.PROMPT_STYLES if x not in ("implicit", "explicit"))
        + " (default: none)",
    )
    p.add_argument(
        "--rows",
        default="",
        help="answer only these model rows now (base, sft, seed0, ...), e.g. to "
        "split the study over two sittings; the report waits until every row is answered",
    )
    p.add_argument(
        "--batch-size", type=int, default=16, help="prompts per generate call when answering"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the answers")
    args = p.parse_args(argv)
    if args.batch_size < 1 or not 0 <= args.seed < 2**32:
        p.error("--batch-size must be >= 1 and --seed in [0, 2^32)")
    for k in ("model", "sim_base"):
        harness.models.check_model_path(getattr(args, k), "--" + k.replace("_", "-"))
    return args


def main(argv=None):
    args = parse_args(argv)
    with harness.runs.lock_run_folder(args.out):  # one process per --out, for the whole run
        return run(args)


if __name__ == "__main__":
    harness.cli.run_cli(main)
