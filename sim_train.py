"""Stage 1 of OP-GRPO: a contrastive fine-tune of the similarity estimator, with a measured gain.

The reward (reward.py) decides "this answer perspective covers that reference perspective" by a cosine >= 0.70 and
"these two answer perspectives repeat each other" by a cosine >= 0.78. This script makes the Sentence Transformer
better at telling "same perspective" from "different perspective", and measures by how much:

    mine:      (anchor, positive, hard negative) per perspective, prefix 'In the perspective of X,' stripped
    train:     MultipleNegativesRankingLoss (in-batch negatives + the hard negative), the paper's hyperparameters
    measure:   triplet accuracy and matching quality at the reward's thresholds, before and after, on held-out
               situations (no situation is in both splits)

    python sim_train.py --out runs/sim_minilm                       # offline: positives = our paraphrases
    python sim_train.py --judge Qwen/Qwen2.5-7B-Instruct --out ...  # the paper's way: an LLM judges pairs
    python sim_train.py --judge gpt-4.1 --judge-url https://api.openai.com/v1 --out ...   # a judge behind an API
    python opgrpo_min.py --sim-model runs/sim_minilm                # then train the policy with it
"""

import dataclasses
import json
import os
import random
import time

import numpy as np
import torch
from transformers import set_seed

import reward
from harness.cli import check_ranges, dataclass_args, run_cli
from harness.data import load_situations
from harness.models import check_model_path, load_embedder
from harness.runs import claim_out_dir, lock_run_folder, write_text

HERE = os.path.dirname(os.path.abspath(__file__))
JUDGE_THRESHOLD = 0.75  # paper: only pairs with base cosine >= 0.75 go to the judge (--judge: eval_judge.judge_triplets)
FIELDS = ("anchor", "positive", "negative")
MODEL_FILES = (
    "sim_eval.json",
    "model.safetensors",
    "triplets.jsonl",
)  # what makes --out hold a trained model


# ================================================================ knobs: '# what it does | values it takes'
@dataclasses.dataclass
class Config:
    data: str = os.path.join(HERE, "data", "train.jsonl")  # situations to mine from
    eval_data: str = None  # also report on every situation of this file (e.g. data/test.jsonl)
    base: str = None  # Sentence Transformer to start from: hub id or dir; None = embedded MiniLM
    out: str = "runs/sim_minilm"  # model, triplets, sim_eval.json; never one holding a model
    overwrite: bool = False  # into an --out that holds a model (moved aside, not deleted)
    judge: str = None  # mine with an LLM judge (paper): a causal LM, 'embedded', or a model
    judge_url: str = None  # OpenAI-compatible endpoint serving --judge (http://host:8000/v1)
    judge_threshold: float = JUDGE_THRESHOLD  # base cosine from which to judge | -1 <= v <= 1
    scale: float = 64.0  # MNRL scale = 1 / temperature (paper ~60-70, ST 20) | v > 0
    batch_size: int = 32  # paper 32; also the number of in-batch negatives | v >= 2
    epochs: int = 2  # paper 2 | v >= 1
    lr: float = 2e-5  # paper about 2e-5 | 0 < v < 1
    warmup: float = 0.03  # share of the steps with linear warm-up (paper 3 %) | 0 <= v < 1
    no_duplicates: bool = False  # no text twice in a batch (ST's NO_DUPLICATES sampler)
    held_out: float = 0.1  # share of situations held out for evaluation | 0 < v < 1
    seed: int = 0  # shuffles, split and training | 0 <= v < 2**32


RANGES = {  # what main accepts (the comments above say the same); NaN and inf never
    "judge_threshold": lambda v: -1 <= v <= 1,
    "scale": lambda v: v > 0,
    "batch_size": lambda v: v >= 2,
    "epochs": lambda v: v >= 1,
    "lr": lambda v: 0 < v < 1,
    "warmup": lambda v: 0 <= v < 1,
    "held_out": lambda v: 0 < v < 1,
    "seed": lambda v: 0 <= v < 2**32,
}


# ================================================================ data: triplets
def mine_triplets(situations, model):
    """Offline triplets, one per perspective i that has a paraphrase, in the order of situations and perspectives:
    anchor = explanation i (the bare sentence, no 'In the perspective of X,'), positive = its paraphrase, negative =
    the explanation j != i of the same situation with the largest cos(i, j) (ties: the first j). Cosines come from
    reward.unit_embeddings(model, the explanations); a situation with one perspective gives none. Returns a list of
    dicts {"situation": its id, "anchor", "positive", "negative"}.
    Example: explanations [a, b, c] with cos(a, c) > cos(a, b) give (a, paraphrase of a, c)."""
    vec = reward.unit_embeddings(model, [p.explanation for s in situations for p in s.perspectives])
    out = []
    for s in situations:
        E = np.stack([vec[p.explanation] for p in s.perspectives])  # [n, dim]
        S = E @ E.T - 3 * np.eye(len(E))  # [n, n], self never the negative
        out += [
            dict(
                situation=s.id,
                anchor=p.explanation,
                positive=p.paraphrase,
                negative=s.perspectives[int(S[i].argmax())].explanation,
            )
            for i, p in enumerate(s.perspectives)
            if p.paraphrase and len(E) > 1
        ]
    return out


def split_by_situation(situations, held_out=0.1, seed=0):
    """(train, eval): a seeded shuffle, the last round(held_out x n) (at least 1) held out; by situation, not triplet,
    so a measured situation's sentences are never trained on. Example: 124 situations -> 112 train, 12 eval."""
    order = random.Random(seed).sample(situations, len(situations))
    k = max(1, round(held_out * len(situations)))
    return order[:-k], order[-k:]


# ================================================================ measure
def evaluate(model, situations, triplets):
    """Before/after figures on the held-out situations:
    triplet_accuracy  share of triplets with cos(anchor, positive) > cos(anchor, negative) (the negatives were
        mined under the base model, which favours any other model a little: see the matching figures too);
    cos_positive / cos_negative  their means: where they sit against the thresholds 0.70 and 0.78;
    match_precision / match_recall  per situation, reward.coverage_reward at 0.70 matches the paraphrases
        (candidates) to the explanations (references); a match (i, j) is correct iff j is the paraphrase of i;
    redundant_rate  share of the (all distinct) explanations that reward.redundant_flags flags at 0.78.
    Example: 3 explanations, matches [(0, 0), (1, 2)] -> precision 1/2, recall 1/3."""
    texts = [r[k] for r in triplets for k in FIELDS]
    E = reward.unit_embeddings(
        model,
        texts
        + [
            t
            for s in situations
            for p in s.perspectives
            for t in (p.explanation, p.paraphrase)
            if t
        ],
    )
    pos, neg = np.array(
        [[E[r["anchor"]] @ E[r[k]] for r in triplets] for k in FIELDS[1:]], float
    )  # [n] each
    flags, hits, found = (
        [],
        [],
        [],
    )  # one per explanation, per match, per explanation with a paraphrase
    for s in situations:
        R = np.stack([E[p.explanation] for p in s.perspectives])  # [n, dim]
        flags += reward.redundant_flags(R @ R.T).tolist()
        ps = [p for p in s.perspectives if p.paraphrase]
        if ps:
            R, C = np.stack([E[p.explanation] for p in ps]), np.stack([E[p.paraphrase] for p in ps])
            pairs = reward.coverage_reward(R @ C.T)[2]  # R @ C.T: [n_ref, n_cand]
            hits += [i == j for i, j in pairs]
            found += [(i, i) in pairs for i in range(len(ps))]
    mean = lambda x: float(np.mean(x)) if len(x) else None
    return dict(
        triplet_accuracy=mean(pos > neg),
        n_triplets=len(triplets),
        cos_positive=mean(pos),
        cos_negative=mean(neg),
        match_precision=mean(hits),
        match_recall=mean(found),
        redundant_rate=mean(flags),
        n_situations=len(situations),
    )


# ================================================================ train
def mnrl(model, scale):
    """The Stage-1 loss, sentence-transformers' MultipleNegativesRankingLoss at `scale` (the paper: about 60-70)."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    return MultipleNegativesRankingLoss(model, scale=scale)


def train(
    model,
    triplets,
    scale=64.0,
    batch_size=32,
    epochs=2,
    lr=2e-5,
    warmup=0.03,
    seed=0,
    no_duplicates=False,
):
    """MultipleNegativesRankingLoss through sentence-transformers' own trainer: for anchor a_k of a batch, softmax
    cross-entropy over scale x cos(a_k, d) for every positive and hard negative d of the batch, target its own
    positive. AdamW, linear warm-up then linear decay, grad clip 1.0. Returns the per-step losses.
    Our hard negatives are other triplets' anchors, so a plain batch can hold a text twice: anchor b then meets its
    own text as a negative it can never beat. `no_duplicates` keeps such texts apart (docs/training.md)."""
    import tempfile

    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    if len(triplets) < batch_size:
        raise ValueError(
            f"only {len(triplets)} training triplets, fewer than one batch of {batch_size}: add "
            f"situations, lower --batch-size, or with --judge lower --judge-threshold"
        )
    data = Dataset.from_dict({c: [r[c] for r in triplets] for c in FIELDS})
    with (
        tempfile.TemporaryDirectory() as tmp
    ):  # the trainer wants an output_dir; we save the model ourselves
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp,
            num_train_epochs=epochs,
            per_device_train_batch_size=batch_size,
            learning_rate=lr,
            warmup_steps=warmup,
            weight_decay=0.0,
            max_grad_norm=1.0,
            seed=seed,
            data_seed=seed,
            batch_sampler="no_duplicates" if no_duplicates else "batch_sampler",
            save_strategy="no",
            report_to="none",
            logging_steps=1,
            use_cpu=model.device.type == "cpu",
        )
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=data, loss=mnrl(model, scale)
        )
        trainer.train()
    model.eval()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ================================================================ main
def main(argv=None):
    """Mine, measure, train, save, measure the saved model again; print the table, write OUT/sim_eval.json."""
    cfg = dataclass_args(Config, argv, __doc__)
    check_ranges(cfg, RANGES)
    t0, device = time.time(), "cuda" if torch.cuda.is_available() else "cpu"
    named = dict(
        zip(
            ("train", "eval"), split_by_situation(load_situations(cfg.data), cfg.held_out, cfg.seed)
        )
    )
    named["extra"] = (
        load_situations(cfg.eval_data) if cfg.eval_data else []
    )  # inputs first, then output
    if {s.id for s in named["extra"]} & {s.id for s in named["train"] + named["eval"]}:
        raise ValueError(
            f"--eval-data {cfg.eval_data} shares situation ids with --data: use another set"
        )
    for ss, where in ((named["train"] + named["eval"], cfg.data), (named["extra"], cfg.eval_data)):
        if ss and not cfg.judge and not any(p.paraphrase for s in ss for p in s.perspectives):
            raise ValueError(
                f"{where}: no perspective has a 'paraphrase', so there is no offline positive. Add a "
                f"'paraphrase' field to the perspectives, or pass --judge MODEL (the paper's way: an LLM "
                f"picks the positives among similar sentences)"
            )
    if cfg.judge_url and not cfg.judge:
        raise ValueError(
            f"--judge-url {cfg.judge_url}: name the model it serves with --judge MODEL"
        )
    check_model_path(cfg.base, "--base", tokenizer=False)
    if not cfg.judge_url and cfg.judge != "embedded":
        check_model_path(cfg.judge, "--judge")
    with lock_run_folder(cfg.out):  # one process per --out, for the whole run
        return train_and_measure(cfg, named, device, t0)


def train_and_measure(cfg, named, device, t0):
    """main's work once the inputs are checked and --out is locked."""
    everything = named["train"] + named["eval"] + named["extra"]
    claim_out_dir(cfg.out, MODEL_FILES, cfg.overwrite, "use another --out, or ")
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    set_seed(cfg.seed)
    model = load_embedder(cfg.base, device=device)
    if cfg.judge:  # the paper's way: an LLM judges the candidate pairs (extras/judge.py)
        from eval_judge import judge_triplets
        from extras.judge import judge_for

        rows = judge_triplets(
            everything, model, judge_for(cfg.judge, cfg.judge_url, device), cfg.judge_threshold
        )
    else:
        rows = mine_triplets(everything, model)
    split = {
        s.id: name for name, ss in named.items() for s in ss
    }  # a triplet's split is its situation's
    rows = [dict(r, split=split[r["situation"]]) for r in rows]
    write_text(os.path.join(cfg.out, "triplets.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    triplets = {name: [r for r in rows if r["split"] == name] for name in named}
    print(f"wrote {len(rows)} triplets to {cfg.out}/triplets.jsonl")
    sets = {name: (named[name], triplets[name]) for name in ("eval", "extra") if named[name]}

    before = {k: evaluate(model, *v) for k, v in sets.items()}
    losses = train(
        model,
        triplets["train"],
        cfg.scale,
        cfg.batch_size,
        cfg.epochs,
        cfg.lr,
        cfg.warmup,
        cfg.seed,
        cfg.no_duplicates,
    )
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError(
            f"training diverged (weights are not finite): lower --lr or --scale; nothing was saved "
            f"in {cfg.out} but triplets.jsonl"
        )
    model.save(cfg.out)
    saved = load_embedder(cfg.out, device=device)  # measure what reward.py will load
    after = {k: evaluate(saved, *v) for k, v in sets.items()}
    result = dict(
        config=dataclasses.asdict(cfg),
        n_train_triplets=len(triplets["train"]),
        before=before,
        after=after,
        losses=losses,
        wall_s=round(time.time() - t0, 1),
    )
    write_text(os.path.join(cfg.out, "sim_eval.json"), json.dumps(result, indent=1))
    for k in sets:
        print(
            f"\n{'held-out' if k == 'eval' else cfg.eval_data}: {before[k]['n_situations']} situations, "
            f"{before[k]['n_triplets']} triplets\n{'':18}{'before':>8}{'after':>8}"
        )
        for m in [
            m for m in before[k] if not m.startswith("n_")
        ]:  # the figures, in evaluate's order
            cells = ["-" if d[k][m] is None else f"{d[k][m]:.3f}" for d in (before, after)]
            print(f"{m:18}{cells[0]:>8}{cells[1]:>8}")
    print(
        f"\nsaved to {cfg.out} (use it: opgrpo_min.py --sim-model {cfg.out}); wall time {result['wall_s']} s"
    )
    return result


if __name__ == "__main__":
    run_cli(main)
