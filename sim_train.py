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
    python opgrpo_min.py --sim-model runs/sim_minilm                # then train the policy with it
"""
import argparse
import json
import os
import random
import time

import numpy as np
import torch
from transformers import set_seed
from transformers.trainer_callback import ProgressCallback

import reward
from support import (ArgumentParser, DataError, check_model_path, check_out_dir, load_policy, load_situations,
                     read_jsonl, run_cli, write_text)

HERE = os.path.dirname(os.path.abspath(__file__))
JUDGE_THRESHOLD = 0.75   # paper: only pairs with base cosine >= 0.75 go to the judge
EMBEDDED = "embedded"    # --judge with no model name: the embedded SmolLM2-135M (weak judge, see README)
JUDGE_QUESTION = ("Do these two statements express the same meaning or perspective?\n\nA: {a}\nB: {b}\n\n"
                  "Answer with Yes or No.")
FIELDS = ("anchor", "positive", "negative")


# ================================================================ data: triplets
def mine_triplets(situations, model):
    """Offline triplets, one per perspective i that has a paraphrase: anchor = explanation i (load_situations has
    stripped 'In the perspective of X,'), positive = its paraphrase, negative = the explanation j != i of the same
    situation with the largest cos(i, j) under `model`.
    Example: explanations [a, b, c] with cos(a, c) > cos(a, b) give (a, paraphrase of a, c)."""
    vec = reward.unit_embeddings(model, [p.explanation for s in situations for p in s.perspectives])
    out = []
    for s in situations:
        E = np.stack([vec[p.explanation] for p in s.perspectives])           # [n, dim]
        S = E @ E.T - 3 * np.eye(len(E))                                      # [n, n], self never the negative
        out += [dict(situation=s.id, anchor=p.explanation, positive=p.paraphrase,
                     negative=s.perspectives[int(S[i].argmax())].explanation)
                for i, p in enumerate(s.perspectives) if p.paraphrase and len(E) > 1]
    return out


def judge_margins(model, tokenizer, pairs, batch_size=8):
    """logit('Yes') - logit('No') of the next token after the judge question (in the model's chat template), one
    forward per batch of pairs and no generation: > 0 means the model says Yes. 'Yes' / ' Yes' both count."""
    from tqdm.auto import tqdm
    ids = {w: sorted({tokenizer.encode(v, add_special_tokens=False)[0] for v in (w, " " + w)}) for w in ("Yes", "No")}
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": JUDGE_QUESTION.format(a=a, b=b)}],
                                             add_generation_prompt=True, tokenize=False) for a, b in pairs]
    tokenizer.padding_side, margins = "left", []            # left padding: every prompt's last token is at -1
    for k in tqdm(range(0, len(prompts), batch_size), desc="judge", disable=len(prompts) <= batch_size):
        enc = tokenizer(prompts[k:k + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)           # [b, T]: padding does not shift RoPE
        with torch.no_grad():
            last = model(**enc, position_ids=pos).logits[:, -1].float()       # [b, vocab]
        margins += (last[:, ids["Yes"]].max(-1).values - last[:, ids["No"]].max(-1).values).tolist()
    return np.array(margins)


def judge_triplets(situations, model, judge, threshold=JUDGE_THRESHOLD):
    """The paper's triplets. Per situation the pool is every perspective sentence (explanations, and paraphrases
    where the data has them); for each explanation (anchor) the pool sentences with base cosine >= threshold are
    shown to `judge` (a list of (a, b) pairs -> list of bools, "same meaning or perspective?") most similar first:
    the first Yes is the positive, the most similar No the negative; an anchor without both gives no triplet.
    Example: candidates [x 0.9 No, y 0.8 Yes, z 0.76 No] give (anchor, y, x)."""
    pools = [list(dict.fromkeys([p.explanation for p in s.perspectives]
                                + [p.paraphrase for p in s.perspectives if p.paraphrase])) for s in situations]
    vec, asks = reward.unit_embeddings(model, [t for pool in pools for t in pool]), []  # asks: (sid, anchor, cands)
    for s, pool in zip(situations, pools):
        E = np.stack([vec[t] for t in pool])                                  # [n_pool, dim]
        for a in [p.explanation for p in s.perspectives]:
            cos = E @ vec[a]                                                  # [n_pool]
            asks.append((s.id, a, [pool[j] for j in np.argsort(-cos) if pool[j] != a and cos[j] >= threshold]))
    pairs = [(a, c) for _, a, cands in asks for c in cands]
    print(f"judging {len(pairs)} pairs with base cosine >= {threshold} ({len(situations)} situations)")
    said = dict(zip(pairs, map(bool, judge(pairs)))) if pairs else {}
    out = []
    for sid, a, cands in asks:
        yes, no = [c for c in cands if said[(a, c)]], [c for c in cands if not said[(a, c)]]
        if yes and no:
            out.append(dict(situation=sid, anchor=a, positive=yes[0], negative=no[0]))
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
    E = reward.unit_embeddings(model, texts + [t for s in situations for p in s.perspectives
                                               for t in (p.explanation, p.paraphrase) if t])
    pos, neg = np.array([[E[r["anchor"]] @ E[r[k]] for r in triplets] for k in FIELDS[1:]], float)   # [n] each
    flags, hits, found = [], [], []      # one per explanation, per match, per explanation with a paraphrase
    for s in situations:
        R = np.stack([E[p.explanation] for p in s.perspectives])             # [n, dim]
        flags += reward.redundant_flags(R @ R.T).tolist()
        ps = [p for p in s.perspectives if p.paraphrase]
        if ps:
            R, C = np.stack([E[p.explanation] for p in ps]), np.stack([E[p.paraphrase] for p in ps])
            pairs = reward.coverage_reward(R @ C.T)[2]                        # R @ C.T: [n_ref, n_cand]
            hits += [i == j for i, j in pairs]
            found += [(i, i) in pairs for i in range(len(ps))]
    mean = lambda x: float(np.mean(x)) if len(x) else None
    return dict(triplet_accuracy=mean(pos > neg), n_triplets=len(triplets), cos_positive=mean(pos),
                cos_negative=mean(neg), match_precision=mean(hits), match_recall=mean(found),
                redundant_rate=mean(flags), n_situations=len(situations))


# ================================================================ train
class LossOnBar(ProgressCallback):
    """The loss on the progress bar, instead of ProgressCallback's print of every logged step."""
    def on_log(self, args, state, control, logs=None, **kw):
        if self.training_bar is not None and "loss" in (logs or {}):
            self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")


def train(model, triplets, scale=64.0, batch_size=32, epochs=2, lr=2e-5, warmup=0.03, seed=0, no_duplicates=False):
    """MultipleNegativesRankingLoss through sentence-transformers' own trainer: for anchor a_k of a batch, softmax
    cross-entropy over scale x cos(a_k, d) for every positive and hard negative d of the batch, target its own
    positive. AdamW, linear warm-up then linear decay, grad clip 1.0. Returns the per-step losses.
    Our hard negatives are other triplets' anchors, so a plain batch can hold a text twice: anchor b then meets its
    own text as a negative it can never beat. `no_duplicates` keeps such texts apart (see the README)."""
    import tempfile
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    if len(triplets) < batch_size:
        raise ValueError(f"only {len(triplets)} training triplets, fewer than one batch of {batch_size}: add "
                         f"situations, lower --batch-size, or with --judge lower --judge-threshold")
    data = Dataset.from_dict({c: [r[c] for r in triplets] for c in FIELDS})
    with tempfile.TemporaryDirectory() as tmp:  # the trainer wants an output_dir; we save the model ourselves
        args = SentenceTransformerTrainingArguments(
            output_dir=tmp, num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=lr,
            warmup_steps=warmup, weight_decay=0.0, max_grad_norm=1.0, seed=seed, data_seed=seed,
            batch_sampler="no_duplicates" if no_duplicates else "batch_sampler", save_strategy="no",
            report_to="none", logging_steps=1, use_cpu=model.device.type == "cpu")
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                             loss=MultipleNegativesRankingLoss(model, scale=scale))
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossOnBar)
        trainer.train()
    model.eval()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ================================================================ main
def load_triplets(args, model, device, named):
    """{split: triplets}, read from an existing --triplets file (the user may have edited it) or mined and written
    there. A triplet's split is its situation's: a held-out situation is never trained on, even from a reused file."""
    path = args.triplets or os.path.join(args.out, "triplets.jsonl")
    reuse = bool(args.triplets) and os.path.isfile(path)
    if reuse:
        rows = []
        for n, row in read_jsonl(path, "triplets"):
            if not all(isinstance(row.get(k), str) for k in ("situation",) + FIELDS):
                raise DataError(f"{path}, line {n}: a triplet needs the text fields situation, {', '.join(FIELDS)}")
            rows.append(row)
        print(f"reusing {len(rows)} triplets from {path}")
    else:
        for ss, where in ((named["train"] + named["eval"], args.data), (named["extra"], args.eval_data)):
            if ss and not args.judge and not any(p.paraphrase for s in ss for p in s.perspectives):
                raise ValueError(f"{where}: no perspective has a 'paraphrase', so there is no offline positive. "
                                 f"Add a 'paraphrase' field to the perspectives, or pass --judge MODEL (the paper's "
                                 f"way: an LLM picks the positives among similar sentences)")
        everything = named["train"] + named["eval"] + named["extra"]
        if args.judge:
            lm, tok = load_policy(None if args.judge == EMBEDDED else args.judge, device)
            rows = judge_triplets(everything, model, lambda pairs: judge_margins(lm, tok, pairs) > 0,
                                  args.judge_threshold)
        else:
            rows = mine_triplets(everything, model)
    split = {s.id: name for name, ss in named.items() for s in ss}
    for r in rows:
        if r["situation"] not in split:
            raise ValueError(f"{path}: a triplet of situation {r['situation']!r}, which is in neither --data nor "
                             f"--eval-data: pass the files it was mined from, or delete the file")
        r["split"] = split[r["situation"]]
    if not reuse:
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} triplets to {path}")
    return {name: [r for r in rows if r["split"] == name] for name in named}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(HERE, "data", "train.jsonl"), help="situations to mine from")
    p.add_argument("--eval-data", help="also report on every situation of this file (e.g. data/test.jsonl)")
    p.add_argument("--base", help="Sentence Transformer to start from: hub id or dir (default: embedded MiniLM)")
    p.add_argument("--out", default="runs/sim_minilm", help="where the model, triplets and results go")
    p.add_argument("--triplets", help="triplets JSONL (default OUT/triplets.jsonl); an existing file is reused")
    p.add_argument("--judge", nargs="?", const=EMBEDDED, help="mine with this causal LM as judge (no "
                   "name: the embedded SmolLM2, which judges poorly); default: offline paraphrase triplets")
    p.add_argument("--judge-threshold", type=float, default=JUDGE_THRESHOLD, help="base cosine to be judged")
    p.add_argument("--scale", type=float, default=64.0, help="MNRL scale = 1 / temperature (paper ~60-70, ST 20)")
    p.add_argument("--batch-size", type=int, default=32, help="paper 32; also the number of in-batch negatives")
    p.add_argument("--epochs", type=int, default=2, help="paper 2")
    p.add_argument("--lr", type=float, default=2e-5, help="paper about 2e-5")
    p.add_argument("--warmup", type=float, default=0.03, help="share of the steps with linear warm-up (paper 3 %%)")
    p.add_argument("--no-duplicates", action="store_true", help="no text twice in a batch (ST's NO_DUPLICATES sampler)")
    p.add_argument("--held-out", type=float, default=0.1, help="share of situations held out for evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads; on a busy shared CPU 1 can be several x faster")
    args = p.parse_args(argv)
    for k, ok, words in (("epochs", args.epochs >= 1, ">= 1"), ("batch_size", args.batch_size >= 2, ">= 2"),
                         ("lr", args.lr > 0, "> 0"), ("scale", args.scale > 0, "> 0"),
                         ("warmup", 0 <= args.warmup < 1, "in [0, 1)"),
                         ("held_out", 0 < args.held_out < 1, "in (0, 1)"),
                         ("judge_threshold", -1 <= args.judge_threshold <= 1, "a cosine in [-1, 1]"),
                         ("threads", args.threads is None or args.threads >= 1, ">= 1")):
        if not ok:  # NaN fails every comparison, so it lands here too
            p.error(f"--{k.replace('_', '-')} {getattr(args, k)}: must be {words}")
    return args


def main(argv=None):
    """Mine, measure, train, save, measure the saved model again; print the table, write OUT/sim_eval.json."""
    args = parse_args(argv)
    print("config:", json.dumps(vars(args)))
    t0, device = time.time(), "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    named = dict(zip(("train", "eval"), split_by_situation(load_situations(args.data), args.held_out, args.seed)))
    named["extra"] = load_situations(args.eval_data) if args.eval_data else []
    if {s.id for s in named["extra"]} & {s.id for s in named["train"] + named["eval"]}:
        raise ValueError(f"--eval-data {args.eval_data} shares situation ids with --data: use another set")
    check_model_path(args.base, "--base")
    check_model_path(None if args.judge == EMBEDDED else args.judge, "--judge")
    check_out_dir(args.out)                                                   # inputs first, then any output
    model = reward.load_embedder(args.base, device=device)
    triplets = load_triplets(args, model, device, named)
    sets = {name: (named[name], triplets[name]) for name in ("eval", "extra") if named[name]}

    before = {k: evaluate(model, *v) for k, v in sets.items()}
    losses = train(model, triplets["train"], args.scale, args.batch_size, args.epochs, args.lr, args.warmup, args.seed,
                   args.no_duplicates)
    model.save(args.out)
    saved = reward.load_embedder(args.out, device=device)                     # measure what reward.py will load
    after = {k: evaluate(saved, *v) for k, v in sets.items()}
    result = dict(config=vars(args), n_train_triplets=len(triplets["train"]), before=before, after=after,
                  losses=losses, wall_s=round(time.time() - t0, 1))
    write_text(os.path.join(args.out, "sim_eval.json"), json.dumps(result, indent=1))
    for k in sets:
        print(f"\n{'held-out' if k == 'eval' else args.eval_data}: {before[k]['n_situations']} situations, "
              f"{before[k]['n_triplets']} triplets\n{'':18}{'before':>8}{'after':>8}")
        for m in [m for m in before[k] if not m.startswith("n_")]:          # the figures, in evaluate's order
            cells = ["-" if d[k][m] is None else f"{d[k][m]:.3f}" for d in (before, after)]
            print(f"{m:18}{cells[0]:>8}{cells[1]:>8}")
    print(f"\nsaved to {args.out} (use it: opgrpo_min.py --sim-model {args.out}); wall time {result['wall_s']} s")
    return result


if __name__ == "__main__":
    run_cli(main)
