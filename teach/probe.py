"""Measurements for the exercises of the teaching kit, run on the code of the folder this file is in (a student copy
measures its own code). Each takes seconds to a few minutes on a laptop CPU:

    python teach/probe.py toy                     # a toy GRPO run: reward, KL, entropy, ratio, clip share per step
    python teach/probe.py sampler --temperature 0.7   # what the sampler drew each token from vs what the learner scores
    python teach/probe.py threshold               # zero-spread groups of saved answers, by coverage threshold
    python teach/probe.py uniqueness              # what the uniqueness term sees in restated perspectives, and costs

threshold and uniqueness score the saved answers of data/exercise_answers.jsonl (the study's answers to the held-out
situations: docs/study.md), with the embedded MiniLM or --sim DIR.
"""

import argparse
import copy
import os
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the core modules live one folder up
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np
import torch

import harness.cli
import harness.data
import harness.models
import opgrpo_min as om
import reward
from harness.data import Perspective, Situation

ANSWERS = os.path.join(ROOT, "data", "exercise_answers.jsonl")


# ================================================================ a toy GRPO run
def tiny_policy():
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template (as tests/conftest.py builds); its
    embeddings scaled up, so that sampling is peaked and the target token shows up from the start."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src, gguf = harness.models.default_policy_source()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    model.get_input_embeddings().weight.data.mul_(8.0)
    return model.eval(), tok


def toy(args):
    """The toy task of tests/test_opgrpo_min.py: reward = the share of answer tokens equal to one target token,
    2 prompts x G 4 per step, 2 updates per step, lr 1e-2, a frozen copy of the start as the KL reference."""
    model, tok = tiny_policy()
    items = [Situation(str(i), f"situation number {i}", [Perspective("A", "b")]) for i in range(6)]
    torch.manual_seed(0)
    roll = om.sample_groups(model, tok, [om.chat_prompt(tok, s.situation) for s in items], 4, 16)
    target = torch.mode(roll.input_ids[:, -16:].flatten()).values.item()

    def toy_reward(roll, _items):
        answer = roll.input_ids[:, -roll.answer_mask.shape[1] :]  # [P*G, T]
        hits = ((answer == target) * roll.answer_mask).sum(1) / roll.answer_mask.sum(1).clamp(min=1)
        return hits.tolist(), {}

    cfg = om.resolve_config(
        om.Config(
            device="cpu",
            steps=args.steps,
            prompts_per_step=2,
            group_size=4,
            max_new_tokens=16,
            lr=1e-2,
            micro_batch=8,
            updates_per_step=2,
            beta=args.beta,
            temperature=args.temperature,
            sample_every=0,
            save_every=0,
        )
    )
    t0 = time.time()
    ref = copy.deepcopy(model).requires_grad_(False)
    rows = om.grpo_train(model, tok, items, toy_reward, cfg, ref)
    r = [row["reward"] for row in rows]
    third = max(1, len(r) // 3)
    print(
        f"toy run: {len(r)} steps, beta {args.beta}, temperature {args.temperature} ({time.time() - t0:.0f} s)"
    )
    print(
        f"mean reward, first {third} steps {np.mean(r[:third]):.3f} -> last {third} steps {np.mean(r[-third:]):.3f}"
    )
    for key, label in (
        ("reward", "reward"),
        ("kl", "KL to the start"),
        ("entropy", "sampling entropy (nats)"),
        ("ratio", "ratio"),
        ("clip_frac", "clipped share"),
        ("zero_spread", "zero-spread groups"),
        ("answer_len", "answer tokens"),
    ):
        print(f"{label + ' per step:':<32}" + " ".join(f"{row[key]:.3f}" for row in rows))


# ================================================================ the sampler and the learner
def sampler(args):
    """Sample with the embedded SmolLM2-135M, keep what the sampler drew each token from (generate's scores), and
    score the same tokens with this code's token_logprobs at the sampler's temperature, as the training loop does."""
    t0 = time.time()
    model, tok = harness.models.load_policy(None, "cpu")
    items = harness.data.load_situations(os.path.join(ROOT, "data", "train.jsonl"))[:2]
    scores, generate = [], model.generate

    def spy(
        **kw,
    ):  # the same call, also keeping the processed next-token scores the sampler drew from
        out = generate(**kw, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1))  # [B, T, V']
        return out.sequences

    model.generate = spy
    torch.manual_seed(0)
    roll = om.sample_groups(
        model,
        tok,
        [om.chat_prompt(tok, s.situation) for s in items],
        4,
        args.tokens,
        temperature=args.temperature,
    )
    T, V, mask = roll.answer_mask.shape[1], len(tok), roll.answer_mask.bool()
    answer = roll.input_ids[:, -T:]  # [B, T]
    drawn = (
        scores[0].float()[..., :V].log_softmax(-1).gather(2, answer[..., None]).squeeze(2)
    )  # [B, T]
    with torch.no_grad():
        logp, ent = om.token_logprobs(
            model, roll.input_ids, roll.attention_mask, T, args.temperature, vocab=V, entropy=True
        )  # [B, T]
    true_ratio = (logp - drawn)[mask].exp()  # pi_learner / pi_sampler of each drawn token
    _, stats = om.grpo_loss(logp, logp, None, torch.ones(len(logp)), roll.answer_mask, beta=0.0)
    print(
        f"SmolLM2-135M, {len(items)} prompts x G 4, sampled at temperature {args.temperature}, "
        f"{int(mask.sum())} answer tokens ({time.time() - t0:.0f} s)"
    )
    print(
        f"ratio the first update logs {stats['ratio']:.3f}; learner/sampler ratio: mean {true_ratio.mean():.3f}, "
        f"median {true_ratio.median():.3f}, {float(((true_ratio < 0.8) | (true_ratio > 1.2)).float().mean()):.0%} "
        f"of the tokens outside [0.8, 1.2], mean |log ratio| {float((logp - drawn)[mask].abs().mean()):.3f}; "
        f"logged entropy {float(ent[mask].mean()):.2f} nats"
    )


# ================================================================ saved answers, scored
class Memo:
    """An embedder that encodes each text once: the sweeps score the same answers many times."""

    def __init__(self, model):
        self.model, self.seen = model, {}

    def encode(self, texts, **_):
        new = [t for t in dict.fromkeys(texts) if t not in self.seen]
        if new:
            self.seen.update(zip(new, self.model.encode(new, batch_size=64, convert_to_numpy=True)))
        return np.stack([self.seen[t] for t in texts])


def answer_groups(path):
    """{(row, situation id): [answers]} of a saved answers file, and the test situations by id."""
    items = {
        s.id: s for s in harness.data.load_situations(os.path.join(ROOT, "data", "test.jsonl"))
    }
    groups = defaultdict(list)
    for _, a in harness.data.read_jsonl(path, "answers"):
        groups[(a.get("row") or a["model"], a["id"])].append(a["answer"])
    return groups, items


def score_groups(groups, items, embedder, **options):
    """{key: [RewardBreakdown]} for every group, scored as training scores (keywords masked in the answers)."""
    keys = list(groups)
    answers = [a for k in keys for a in groups[k]]
    refs = [om.reference_answer(items[k[1]]) for k in keys for _ in groups[k]]
    sits = [items[k[1]].situation for k in keys for _ in groups[k]]
    parts, out = reward.score_answers(answers, refs, embedder, situations=sits, **options), {}
    for k in keys:
        out[k], parts = parts[: len(groups[k])], parts[len(groups[k]) :]
    return out


def no_spread(values):
    return max(values) == min(values)


def threshold(args):
    """The share of groups whose rewards are all equal (no advantage, nothing learned), by coverage threshold."""
    t0, embedder = time.time(), Memo(harness.models.load_embedder(args.sim, device="cpu"))
    groups, items = answer_groups(args.answers)
    print(
        f"{len(groups)} groups of answers ({len({r for r, _ in groups})} models x {len({i for _, i in groups})} "
        f"situations), similarity model {args.sim or 'all-MiniLM-L6-v2'}"
    )
    print(
        f"{'threshold':>9} {'zero-spread groups':>19} {'coverage differs':>17} {'mean match rate':>16}"
    )
    for t in args.thresholds:
        scored = score_groups(groups, items, embedder, coverage_threshold=t)
        zero = [no_spread([p.total for p in parts]) for parts in scored.values()]
        cov = [not no_spread([p.coverage for p in parts]) for parts in scored.values()]
        rate = [p.rate for parts in scored.values() for p in parts]
        print(f"{t:>9.2f} {np.mean(zero):>19.0%} {np.mean(cov):>17.0%} {np.mean(rate):>16.3f}")
    print(f"({time.time() - t0:.0f} s)")


def uniqueness(args):
    """Restated perspectives, with and without the uniqueness term; then the saved answers' advantages."""
    t0, embedder = time.time(), Memo(harness.models.load_embedder(args.sim, device="cpu"))
    train = [
        s
        for s in harness.data.load_situations(os.path.join(ROOT, "data", "train.jsonl"))
        if all(p.paraphrase for p in s.perspectives)
    ]

    def restated(
        s, k
    ):  # the first k perspectives again, in the data's paraphrase, under a name the summary names
        again = [Perspective(f"{p.name} seen again", p.paraphrase) for p in s.perspectives[:k]]
        return om.reference_answer(Situation(s.id, s.situation, s.perspectives + again))

    for k, label in (
        (0, "the reference answer"),
        (1, "+ 1 restated perspective"),
        (None, "+ every one restated"),
    ):
        answers = [restated(s, len(s.perspectives) if k is None else k) for s in train]
        parts = reward.score_answers(
            answers,
            [om.reference_answer(s) for s in train],
            embedder,
            situations=[s.situation for s in train],
        )
        print(
            f"{label:<27} ({len(train)} training situations): flagged in {np.mean([p.u < 1 for p in parts]):.0%}, "
            f"R {np.mean([p.total for p in parts]):.3f}, R without the uniqueness term "
            f"{np.mean([max(0.0, p.coverage + p.format + p.tag) for p in parts]):.3f}"
        )
    groups, items = answer_groups(args.answers)
    by_row = defaultdict(lambda: dict(n=0, adv_with=[], adv_without=[]))
    for (row, _), parts in score_groups(groups, items, embedder).items():
        with_u = om.group_advantages([p.total for p in parts], len(parts)).tolist()
        without = om.group_advantages(
            [max(0.0, p.coverage + p.format + p.tag) for p in parts], len(parts)
        ).tolist()
        b = by_row[row]
        b["n"] += len(parts)
        for p, a, a0 in zip(parts, with_u, without):
            if p.u < 1:
                b["adv_with"].append(a), b["adv_without"].append(a0)
    for row, b in by_row.items():
        rep = len(b["adv_with"])
        print(
            f"{row:<10} answers that repeat a perspective (u < 1): {rep}/{b['n']}"
            + (
                f"; their mean advantage {np.mean(b['adv_with']):+.2f} with the term, {np.mean(b['adv_without']):+.2f} "
                f"without"
                if rep
                else ""
            )
        )
    print(f"({time.time() - t0:.0f} s)")


def main(argv=None):
    p = harness.cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("toy", help="a toy GRPO run of this folder's code (about half a minute)")
    t.add_argument("--steps", type=int, default=24, help="GRPO steps (default 24, as the test)")
    t.add_argument(
        "--beta",
        type=float,
        default=0.04,
        help="weight of the KL to the start (default 0.04, DeepSeekMath's: large enough to see)",
    )
    t.add_argument("--temperature", type=float, default=1.0, help="the run's sampling temperature")
    s = sub.add_parser("sampler", help="the sampler's distribution against the learner's log-probs")
    s.add_argument(
        "--temperature", type=float, default=1.0, help="the run's temperature (default 1.0)"
    )
    s.add_argument("--tokens", type=int, default=48, help="new tokens per answer")
    for name, text in (
        ("threshold", "zero-spread groups by coverage threshold"),
        ("uniqueness", "restated perspectives and repeats, with and without the term"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument(
            "--answers", default=ANSWERS, help="saved answers (JSONL with id, row or model, answer)"
        )
        q.add_argument(
            "--sim",
            help="similarity model: a Sentence Transformer folder (default: embedded MiniLM)",
        )
        if name == "threshold":
            q.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    args = p.parse_args(argv)
    {"toy": toy, "sampler": sampler, "threshold": threshold, "uniqueness": uniqueness}[args.what](
        args
    )


if __name__ == "__main__":
    harness.cli.run_cli(main)
