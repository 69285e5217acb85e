"""The small reproduction: does OP-GRPO make the answers to held-out situations more pluralistic than SFT alone?

    python study.py                  # the whole study on the CPU -> runs/study/ (61 min on 2 free cores)
    python study.py --smoke          # the same pipeline at tiny settings, a few minutes (CI runs it)
    python study.py --out runs/study_t547 --coverage-threshold 0.547   # a fix attempt (README: "Does it work?")

    1. Stage 1: sim_train.py fine-tunes MiniLM on the training paraphrases; the reward uses it (the paper's order).
    2. SFT warm start: one full epoch over data/train.jsonl (31 steps of 4), saved once and shared by every seed.
    3. GRPO from that SFT model, reward under the Stage-1 estimator, for each of --seeds. --coverage-threshold moves
       the reward's 0.70 (an option, off by default); the Stage-1 model's own calibrated threshold is in the report.
    4. 4 answers per held-out situation of data/test.jsonl (temperature 0.7, top_p 0.9, the paper's eval sampling)
       from: base (implicit prompt), base (explicit prompt), SFT, and OP-GRPO of every seed.
    5. Per answer: coverage under the Stage-1 estimator (what GRPO trained against) and under the untuned MiniLM at
       a threshold calibrated on the *training* paraphrase pairs; distinct perspectives, format, length, repeats.
       Per situation the mean of its answers; paired differences with a 95 % bootstrap interval and a paired
       sign-flip test. Written to OUT/study.json and OUT/report.md. The test set informs no choice made here.
"""
import argparse
import json
import os
import time

import numpy as np

import eval_nli
import opgrpo_min as om
import reward
import support
import sim_train

FULL = dict(sft_steps=31, steps=12, prompts_per_step=2, group_size=4, max_new_tokens=160, lr=5e-6, seeds=3,
            samples=4, eval_tokens=160, sim_epochs=2, situations=None, coverage_threshold=reward.COVERAGE_THRESHOLD)
SMOKE = dict(sft_steps=2, steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8, lr=5e-6, seeds=2,
             samples=2, eval_tokens=8, sim_epochs=1, situations=4, coverage_threshold=reward.COVERAGE_THRESHOLD)
METRICS = ("coverage_stage1", "coverage_stage1_at_t", "coverage_minilm", "distinct", "in_format", "words", "repeats")


# ================================================================ the yardsticks
def calibrated_threshold(embedder, items):
    """The cosine that best separates paraphrase pairs (a perspective and its paraphrase) from non-pairs (it and the
    paraphrase of another perspective of the same situation), by balanced accuracy (TPR + TNR) / 2, on `items`
    (the training set). Returns (threshold, balanced accuracy, n pairs, n non-pairs)."""
    pos, neg = [], []
    for s in items:
        ps = [p for p in s.perspectives if p.paraphrase]
        E = reward.unit_embeddings(embedder, [p.explanation for p in ps] + [p.paraphrase for p in ps])
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
    refs = {s.id: [reward.perspective_line(p.name, p.explanation) for p in s.perspectives] for s in items}
    sents = [eval_nli.split_sentences(r["answer"]) for r in rows]
    E = reward.unit_embeddings(embedder, [x for r in rows for x in refs[r["id"]]] + [x for ss in sents for x in ss])
    out = []
    for r, ss in zip(rows, sents):
        R = np.stack([E[x] for x in refs[r["id"]]])                                        # [n_ref, dim]
        out.append(float((R @ np.stack([E[x] for x in ss]).T).max()) if ss else 0.0)      # R @ C.T: [n_ref, n_sent]
    return out


def answer_stats(text, embedder):
    """Distinct perspectives (the answer's own, minus those reward.redundant_flags marks at 0.78), whether it has
    the required form (>= 2 perspectives, >= 70 % of its pieces carry one, a <summary> block), its length in words,
    and whether it repeats itself (a redundant perspective, a repeated name or a repeated sentence)."""
    pieces = reward.split_perspectives(text)
    names = [m.group(1).strip().lower() for m in map(reward.PERSPECTIVE_NAME.search, pieces) if m]
    flags = np.zeros(0, bool)
    if pieces:
        E = reward.unit_embeddings(embedder, pieces)
        C = np.stack([E[p] for p in pieces])                                               # [n, dim]
        flags = reward.redundant_flags(C @ C.T)
    sents = [x.lower() for x in eval_nli.split_sentences(text)]
    in_format = len(names) >= 2 and len(names) >= 0.7 * len(pieces) and bool(reward.SUMMARY_BLOCK.search(text))
    repeats = bool(flags.any()) or len(set(names)) < len(names) or len(set(sents)) < len(sents)
    named = [bool(reward.PERSPECTIVE_NAME.search(p)) for p in pieces]
    distinct = sum(n and not f for n, f in zip(named, flags))
    return dict(distinct=distinct, in_format=float(in_format), words=len(text.split()), repeats=float(repeats))


def per_answer(rows, items, stage1, minilm, threshold, reward_threshold):
    """{metric: [[the value of each answer] for each situation of items]} for one model's answers.
    coverage_stage1 is at the paper's 0.70, coverage_stage1_at_t at the threshold the GRPO reward used."""
    by_id = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r["answer"])
    out = {m: [] for m in METRICS}
    for s in items:
        answers = by_id[s.id]
        out["coverage_stage1"].append(eval_nli.embedding_coverage(answers, [s] * len(answers), stage1))
        out["coverage_stage1_at_t"].append(eval_nli.embedding_coverage(answers, [s] * len(answers), stage1,
                                                                        reward_threshold))
        out["coverage_minilm"].append(eval_nli.embedding_coverage(answers, [s] * len(answers), minilm, threshold))
        stats = [answer_stats(a, stage1) for a in answers]
        for m in ("distinct", "in_format", "words", "repeats"):
            out[m].append([x[m] for x in stats])
    return out


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
    d = np.array([np.mean(x) - np.mean(y) for x, y in zip(a, b)])                           # [n]
    wa, wb = (float(np.mean([np.var(x, ddof=1) for x in rows])) for rows in (a, b))
    var_d, sampling = float(np.var(d, ddof=1)), wa / len(a[0]) + wb / len(b[0])
    between = max(var_d - sampling, 0.0)
    se = {m: float(np.sqrt((between + wa / (n_seeds * m) + wb / m) / len(d))) for m in answers}
    return dict(se=float(np.sqrt(var_d / len(d))), sampling_share=min(sampling / var_d, 1.0) if var_d else 0.0,
                by_answers={m: dict(se=v, detectable=2.8 * v) for m, v in se.items()})


def paired(a, b, n_boot=10000, seed=0):
    """Mean of the per-situation differences a - b, its 95 % bootstrap interval (situations resampled), and the
    two-sided p-value of a paired sign-flip permutation test (H0: the difference is symmetric around 0).

    >>> r = paired([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0]); r["mean"], r["p"]
    (1.0, 0.125)
    """
    d = np.asarray(a, float) - np.asarray(b, float)                                        # [n]
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)                            # [n_boot]
    if len(d) <= 16:   # every sign pattern: the exact test
        signs = np.array(np.meshgrid(*[[1, -1]] * len(d))).reshape(len(d), -1).T           # [2^n, n]
    else:
        signs = rng.choice([1, -1], (n_boot, len(d)))                                      # [n_boot, n]
    null = np.abs((signs * d).mean(1))
    p = float((null >= abs(d.mean()) - 1e-12).mean())
    return dict(mean=float(d.mean()), lo=float(np.percentile(boot, 2.5)), hi=float(np.percentile(boot, 97.5)), p=p)


# ================================================================ the pipeline
def run(args):
    S = dict(SMOKE if args.smoke else FULL, **{k: v for k, v in vars(args).items() if k in FULL and v is not None})
    out, t0 = args.out, time.time()
    support.check_out_dir(out)
    train_items = support.load_situations(args.train_data)
    test_items = support.load_situations(args.test_data)[:S["situations"]]
    log = lambda msg: print(f"[study {time.time() - t0:5.0f} s] {msg}", flush=True)

    # ---- 1. Stage 1: the similarity estimator the reward uses
    sim_dir = os.path.join(out, "sim")
    if not os.path.isfile(os.path.join(sim_dir, "sim_eval.json")):
        log("stage 1: sim_train.py")
        sim_train.main(["--data", args.train_data, "--out", sim_dir, "--epochs", str(S["sim_epochs"])])
    stage1, minilm = reward.load_embedder(sim_dir), reward.load_embedder(args.sim_base)
    threshold, bal, n_pos, n_neg = calibrated_threshold(minilm, train_items)
    log(f"untuned MiniLM threshold {threshold:.3f} (balanced accuracy {bal:.3f} on {n_pos} training paraphrase "
        f"pairs and {n_neg} non-pairs)")

    # ---- 2-3. SFT once, then GRPO for each seed from it
    common = ["--train-data", args.train_data, "--sim-model", sim_dir, "--prompts-per-step", str(S["prompts_per_step"]),
              "--group-size", str(S["group_size"]), "--max-new-tokens", str(S["max_new_tokens"]), "--lr", str(S["lr"]),
              "--coverage-threshold", str(S["coverage_threshold"]),
              "--sample-every", "0", "--save-every", "0", "--device", "cpu"]
    model_args = ["--model", args.model] if args.model else []
    runs = [os.path.join(out, f"grpo_seed{k}") for k in range(S["seeds"])]
    sft = os.path.join(runs[0], "sft")
    for k, run_dir in enumerate(runs):
        if os.path.isfile(os.path.join(run_dir, "checkpoint", "trainer_state.json")):
            continue
        warm = k == 0 and not os.path.isdir(sft)  # a saved SFT model (say, copied from another study) is reused
        log(f"GRPO seed {k}" + (" (after the SFT warm start)" if warm else f" from {sft}"))
        start = model_args + ["--sft-steps", str(S["sft_steps"])] if warm else ["--model", sft, "--sft-steps", "0"]
        om.main(start + common + ["--steps", str(S["steps"]), "--seed", str(k), "--out", run_dir])

    # ---- 4. answers to the held-out situations
    answers_path = os.path.join(out, "answers.jsonl")
    models = [("base implicit", args.model, "implicit"), ("base explicit", args.model, "explicit"),
              ("SFT", sft, "implicit")] + [(f"OP-GRPO seed {k}", r, "implicit") for k, r in enumerate(runs)]
    done = {}
    if os.path.exists(answers_path):
        for _, row in support.read_jsonl(answers_path, "answers"):
            done.setdefault(row["row"], []).append(row)
    gen = argparse.Namespace(device="cpu", seed=args.seed, batch_size=args.batch_size, max_new_tokens=S["eval_tokens"],
                             temperature=0.7, top_p=0.9)
    for name, model, style in models:
        if name in done:
            continue
        log(f"answers: {name}")
        rows = [dict(r, row=name) for r in eval_nli.generate_answers(model, test_items, [style], gen, S["samples"])]
        with open(answers_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        done[name] = rows

    # ---- 5. metrics, paired differences, report
    values = {name: per_answer(done[name], test_items, stage1, minilm, threshold, S["coverage_threshold"])
              for name, _, _ in models}
    table = {name: {m: [float(np.mean(x)) for x in v] for m, v in t.items()} for name, t in values.items()}
    grpo = [f"OP-GRPO seed {k}" for k in range(S["seeds"])]
    table["OP-GRPO (seed mean)"] = {m: list(np.mean([table[g][m] for g in grpo], 0)) for m in METRICS}
    diffs = {f"{a} - {b}": {m: paired(table[a][m], table[b][m]) for m in METRICS}
             for a, b in [("OP-GRPO (seed mean)", "SFT"), ("SFT", "base implicit")] +
             [(g, "SFT") for g in grpo]}
    seed_spread = {m: float(np.std([np.mean(table[g][m]) for g in grpo], ddof=1)) if len(grpo) > 1 else None
                   for m in METRICS}
    training = {g: [json.loads(line) for line in open(os.path.join(r, "metrics.jsonl"))] for g, r in zip(grpo, runs)}
    # why coverage moves or not: how near the answers come to a match, and the Stage-1 threshold the training
    # pairs would pick (both measured, neither used)
    t1 = calibrated_threshold(stage1, train_items)
    near = {name: np.quantile(best_cosines(done[name], test_items, stage1), [0.5, 0.9, 1.0]).tolist()
            for name, _, _ in models}
    why = dict(stage1_calibrated_threshold=t1[0], stage1_balanced_accuracy=t1[1], best_cosine_q50_q90_max=near,
               share_of_steps_with_coverage={g: float(np.mean([r["coverage"] > 0 for r in rows]))
                                            for g, rows in training.items()},
               zero_spread_mean={g: float(np.mean([r["zero_spread"] for r in rows])) for g, rows in training.items()},
               noise_budget={m: noise_budget([sum((values[g][m][i] for g in grpo), []) for i in range(len(test_items))],
                                             values["SFT"][m], len(grpo)) for m in METRICS[:3]})
    result = dict(settings=S, threshold=dict(minilm=threshold, balanced_accuracy=bal, pairs=n_pos, non_pairs=n_neg),
                  means={name: {m: float(np.mean(v)) for m, v in t.items()} for name, t in table.items()},
                  seed_spread=seed_spread, paired=diffs, why=why, per_situation=table, training=training,
                  wall_s=round(time.time() - t0))
    support.write_text(os.path.join(out, "study.json"), json.dumps(result, indent=1))
    plot_training(os.path.join(out, "training.png"), training)
    support.write_text(os.path.join(out, "report.md"), report(result, test_items, done))
    log(f"done: {out}/report.md")
    print(report(result, test_items, done))
    return result


def plot_training(png, training):
    """The diagnostics of every seed's metrics.jsonl over the GRPO steps: reward, coverage and format terms, the
    share of zero-spread groups (no learning signal), the entropy of the sampled tokens, and the KL."""
    plt = support.pyplot(png)
    if plt is None:
        return
    keys = ("reward", "coverage", "format", "zero_spread", "entropy", "kl")
    fig, axes = plt.subplots(2, 3, figsize=(10, 5.5), sharex=True)
    for ax, key in zip(axes.flat, keys):
        for name, rows in training.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name.replace("OP-GRPO ", ""))
        ax.set_title(key, fontsize=9)
    axes[0, 0].legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("GRPO step")
    fig.tight_layout()
    support.save_figure(plt, fig, png, dpi=110)


def report(r, items, answers):
    """The tables of study.json as markdown, and the three answers (base, SFT, OP-GRPO seed 0) to one situation."""
    cols = "| row | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    text = f"Settings: {json.dumps(r['settings'])}; wall time {r['wall_s']} s.\n\n" \
           f"Untuned MiniLM threshold {r['threshold']['minilm']:.3f}, calibrated on the training paraphrase pairs.\n\n"
    text += "Means over the held-out situations (each the mean of its answers)\n\n" + cols
    for name, m in r["means"].items():
        text += f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |\n"
    text += "| spread over seeds (std) | " + " | ".join("-" if v is None else f"{v:.3f}"
                                                      for v in r["seed_spread"].values()) + " |\n"
    text += "\nPaired per-situation differences: mean [95 % bootstrap interval], sign-flip p\n\n" + cols
    for name, d in r["paired"].items():
        text += f"| {name} | " + " | ".join(f"{x['mean']:+.3f} [{x['lo']:+.3f}, {x['hi']:+.3f}] p={x['p']:.3f}"
                                             for x in d.values()) + " |\n"
    text += f"\nWhy: {json.dumps(r['why'])}\n"
    sid = items[0].id
    text += f"\nAnswers to the held-out situation {items[0].situation!r}\n"
    for name in ("base implicit", "SFT", "OP-GRPO seed 0"):
        a = next(x["answer"] for x in answers[name] if x["id"] == sid)
        text += f"\n**{name}**\n\n```\n{a.strip()}\n```\n"
    return text


def parse_args(argv=None):
    p = support.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny settings, a few minutes: the pipeline, not a result")
    p.add_argument("--out", default="runs/study", help="everything; a stage whose output is there is not run again")
    p.add_argument("--model", help="policy: hub id or local dir (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sim-base", help="the untuned Sentence Transformer (default: the embedded MiniLM)")
    p.add_argument("--train-data", default=os.path.join(om.HERE, "data", "train.jsonl"))
    p.add_argument("--test-data", default=os.path.join(om.HERE, "data", "test.jsonl"))
    for k in FULL:  # each knob of the study, default FULL (or SMOKE with --smoke)
        p.add_argument("--" + k.replace("_", "-"), type=int if isinstance(FULL[k], int) or k == "situations" else float,
                       help=f"default {FULL[k]} ({SMOKE[k]} with --smoke)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call when answering")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the answers")
    args = p.parse_args(argv)
    for k in ("model", "sim_base"):
        support.check_model_path(getattr(args, k), "--" + k.replace("_", "-"))
    return args


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    support.run_cli(main)
