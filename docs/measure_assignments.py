"""The figures of docs/assignments.md, each from one command (one CPU thread, a few minutes at most):

    python docs/measure_assignments.py mistakes                  # exercise 1: what grade gives typical mistakes
    python docs/measure_assignments.py plant sign-flip --out D   # exercise 2: a full copy with one planted bug
    python docs/measure_assignments.py sign-flip                 # exercise 2: a toy GRPO run of this directory's code
    python docs/measure_assignments.py temperature               # exercise 2: sampler vs learner log-probs
    python docs/measure_assignments.py threshold [--sim DIR]     # exercise 3: zero-spread groups by coverage threshold
    python docs/measure_assignments.py uniqueness [--sim DIR]    # exercise 4: what the uniqueness term sees, and costs

The code measured is this project's, or a student copy's with --project DIR (teach.py leaves docs/ out of the copies:
this file names the planted bugs). mistakes and plant edit the reference code, so they need the full project.
threshold and uniqueness score the held-out answers that study.py saved in this project (runs/study/answers.jsonl:
4 answers per test situation from each of 6 models); --sim defaults to the Stage-1 estimator it trained.
"""
import argparse
import json
import os
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))    # this project: runs/study is read from it


def code_dir(argv):
    """The project whose code is measured: --project DIR, else this one. Read before the imports below, which come
    from it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--project", default=HERE)
    return os.path.abspath(pre.parse_known_args(argv)[0].project)


CODE = code_dir(sys.argv[1:])
sys.path.insert(0, CODE)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np      # noqa: E402
import torch            # noqa: E402

import opgrpo_min as om  # noqa: E402
import reward           # noqa: E402
import teach            # noqa: E402
try:                    # data classes and model files live in plumbing.py, or in opgrpo_min.py before it existed
    import plumbing as plumbing  # noqa: E402
except ImportError:
    plumbing = om
Situation, Perspective, load_situations, default_policy_source = (
    getattr(plumbing, name, None) or getattr(om, name)
    for name in ("Situation", "Perspective", "load_situations", "default_policy_source"))

torch.set_num_threads(1)
STUDY = os.path.join(HERE, "runs", "study")


# ================================================================ edits of the reference code
# Each edit: (script, text that must occur exactly once in it, its replacement). Students never see them: teach.py
# leaves docs/ out of their copies.
BUGS = {   # exercise 2: planted in a full copy, for students to find
    "sign-flip": ("opgrpo_min.py", "adv = group_advantages(", "adv = -group_advantages("),
    "temperature": ("opgrpo_min.py", "row.float() / temperature", "row.float()"),   # the learner ignores T
}
MISTAKES = {   # exercise 1: what a student might write, and what grade gives it
    "sample std (torch's default)": ("opgrpo_min.py", "unbiased=False, ", ""),
    "no dual clip": ("opgrpo_min.py", "if dual_clip:", "if False:"),
    "KL of (new - ref) instead of (ref - new)": ("opgrpo_min.py", "(ref_logp - logp)", "(logp - ref_logp)"),
    "mean per answer, then over answers": ("opgrpo_min.py", ".sum() / num_tokens",
                                           ".sum(1).div(mask.sum(1).clamp(min=1)).mean()"),
}


def edited(script, old, new):
    text = open(os.path.join(CODE, script)).read()
    if text.count(old) != 1:
        sys.exit(f"{script} holds {text.count(old)} copies of {old!r}, not 1: run this in the full project "
                 f"(a student copy lacks the reference bodies), or update the edit here")
    return text.replace(old, new)


def plant(args):
    """A copy of the project (nothing blanked) with one bug planted."""
    script, old, new = BUGS[args.bug]
    text = edited(script, old, new)
    teach.make([], args.out)
    with open(os.path.join(args.out, script), "w") as f:
        f.write(text)
    print(f"wrote {args.out}: the project with the {args.bug} bug planted in {script}")


def mistakes(args):
    """Copies with group_advantages and grpo_loss blanked, then written by the reference with one mistake each."""
    import tempfile
    t0 = time.time()
    cases = {"the reference (no mistake)": ("opgrpo_min.py", "", "")}
    cases.update(MISTAKES)
    for label, (script, old, new) in cases.items():
        text = edited(script, old, new) if old else open(os.path.join(CODE, script)).read()
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "copy")
            teach.make(["group_advantages", "grpo_loss"], copy)
            with open(os.path.join(copy, script), "w") as f:
                f.write(text)
            rows = teach.grade(copy)
        failing = [case.split("::")[1] for r in rows for case, _ in r["failed"]]
        print(f"{label:<42} " + "; ".join(f"{r['function']} {r['passed']}/{r['cases']} = {r['points']:.1f}"
                                        for r in rows) + f" | failing: {', '.join(failing) or '-'}", flush=True)
    print(f"({time.time() - t0:.0f} s)")


# ================================================================ exercise 2: the advantage's sign
def tiny_policy():
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template (as tests/conftest.py builds)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    src, gguf = default_policy_source()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "left"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.get_input_embeddings().weight.data.mul_(8.0)   # peaked sampling: the target token shows up from the start
    return model.eval(), tok


def sign_flip(args):
    """The toy task of tests/test_opgrpo_min.py on a tiny random model: reward = the share of answer tokens equal
    to one target token, 2 prompts x G 4 per step, 2 updates per step, no reference model (so no KL)."""
    model, tok = tiny_policy()
    items = [Situation(str(i), f"situation number {i}", [Perspective("A", "b")]) for i in range(6)]
    torch.manual_seed(0)
    roll = om.sample_groups(model, tok, [om.chat_prompt(tok, s.situation) for s in items], 4, 16)
    target = torch.mode(roll.input_ids[:, -16:].flatten()).values.item()

    def toy_reward(roll, _items):
        answer = roll.input_ids[:, -roll.answer_mask.shape[1]:]                           # [P*G, T]
        hits = ((answer == target) * roll.answer_mask).sum(1) / roll.answer_mask.sum(1).clamp(min=1)
        return hits.tolist(), {}
    if args.flip:                                                   # the sign bug, simulated: A -> -A
        real = om.group_advantages
        om.group_advantages = lambda *a, **k: -real(*a, **k)
    cfg = om.resolve_config(om.Config(device="cpu", steps=args.steps, prompts_per_step=2, group_size=4,
                                      max_new_tokens=16, lr=1e-2, micro_batch=8, updates_per_step=2,
                                      sample_every=0, save_every=0))
    rows = om.grpo_train(model, tok, items, toy_reward, cfg)
    r = [row["reward"] for row in rows]
    third = max(1, len(r) // 3)
    print(f"advantage sign {'FLIPPED' if args.flip else 'as written'}, {len(r)} steps")
    print("reward per step:", " ".join(f"{x:.2f}" for x in r))
    print(f"mean reward, first {third} steps {np.mean(r[:third]):.3f} -> last {third} steps {np.mean(r[-third:]):.3f}")
    print("ratio per step:", " ".join(f"{row['ratio']:.3f}" for row in rows))
    print("zero-spread groups per step:", " ".join(f"{row['zero_spread']:.1f}" for row in rows))
    print("sampling entropy per step (nats):", " ".join(f"{row['entropy']:.2f}" for row in rows))
    print("clipped share per step:", " ".join(f"{row['clip_frac']:.2f}" for row in rows))


# ================================================================ exercise 2: sampler vs learner temperature
def temperature(args):
    """Sample with the embedded SmolLM2-135M, keep what the sampler drew each token from (generate's scores), and
    score the same tokens with the code's token_logprobs at the sampler's temperature, as the training loop does
    (and with --learner at another one)."""
    model, tok = om.load_policy(None, "cpu")
    items = load_situations(os.path.join(CODE, "data", "train.jsonl"))[:2]
    scores, generate = [], model.generate

    def spy(**kw):   # the same call, also keeping the processed next-token scores the sampler drew from
        out = generate(**kw, output_scores=True, return_dict_in_generate=True)
        scores.append(torch.stack(out.scores, 1))                                      # [B, T, V']
        return out.sequences
    model.generate = spy
    torch.manual_seed(0)
    roll = om.sample_groups(model, tok, [om.chat_prompt(tok, s.situation) for s in items], 4, args.tokens,
                            temperature=args.sampler)
    T, V, mask = roll.answer_mask.shape[1], len(tok), roll.answer_mask.bool()
    answer = roll.input_ids[:, -T:]                                                    # [B, T]
    sampler = scores[0].float()[..., :V].log_softmax(-1).gather(2, answer[..., None]).squeeze(2)   # [B, T]
    print(f"SmolLM2-135M, {len(items)} prompts x G 4, sampler at temperature {args.sampler}, "
          f"{int(mask.sum())} answer tokens")
    for learner_t in dict.fromkeys([args.sampler, args.learner or args.sampler]):
        with torch.no_grad():
            logp, ent = om.token_logprobs(model, roll.input_ids, roll.attention_mask, T, learner_t, vocab=V,
                                          entropy=True)                                 # [B, T]
        true_ratio = (logp - sampler)[mask].exp()                   # pi_learner / pi_sampler of each drawn token
        _, stats = om.grpo_loss(logp, logp, None, torch.ones(len(logp)), roll.answer_mask, beta=0.0)
        print(f"token_logprobs at T {learner_t}: logged ratio of the first update {stats['ratio']:.3f}; "
              f"learner/sampler ratio mean {true_ratio.mean():.3f}, median {true_ratio.median():.3f}, "
              f"{float(((true_ratio < 0.8) | (true_ratio > 1.2)).float().mean()):.0%} of tokens outside [0.8, 1.2]; "
              f"mean |log ratio| {float((logp - sampler)[mask].abs().mean()):.3f}; "
              f"logged entropy {float(ent[mask].mean()):.2f} nats")


# ================================================================ exercises 3 and 4: scoring the study's answers
class Memo:
    """An embedder that encodes each text once: the sweeps score the same answers many times."""

    def __init__(self, model):
        self.model, self.seen = model, {}

    def encode(self, texts, **_):
        new = [t for t in dict.fromkeys(texts) if t not in self.seen]
        if new:
            self.seen.update(zip(new, self.model.encode(new, batch_size=64, convert_to_numpy=True)))
        return np.stack([self.seen[t] for t in texts])


def estimator(args):
    path = args.sim or (os.path.join(STUDY, "sim") if os.path.isdir(os.path.join(STUDY, "sim")) else "minilm")
    path = None if path == "minilm" else path
    print(f"similarity model: {path or 'embedded all-MiniLM-L6-v2'}")
    return Memo(plumbing.load_embedder(path, device="cpu"))


def study_groups():
    """{(row, situation id): [answers]} of runs/study/answers.jsonl, and the test situations by id."""
    path = os.path.join(STUDY, "answers.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"{path}: not found; run python study.py --out runs/study first (see the README)")
    items = {s.id: s for s in load_situations(os.path.join(CODE, "data", "test.jsonl"))}
    groups = defaultdict(list)
    for line in open(path):
        a = json.loads(line)
        groups[(a["row"], a["id"])].append(a["answer"])
    return groups, items


def score_groups(groups, items, embedder, **options):
    """{key: [RewardBreakdown]} for every group, scored as training scores (keywords masked in the answers)."""
    keys = list(groups)
    answers = [a for k in keys for a in groups[k]]
    refs = [om.reference_answer(items[k[1]]) for k in keys for _ in groups[k]]
    sits = [items[k[1]].situation for k in keys for _ in groups[k]]
    parts, out = reward.score_answers(answers, refs, embedder, situations=sits, **options), {}
    for k in keys:
        out[k], parts = parts[:len(groups[k])], parts[len(groups[k]):]
    return out


def no_spread(values):
    return max(values) == min(values)


def uniqueness(args):
    t0, embedder = time.time(), estimator(args)
    # 1. restatements: each training situation's reference answer, plus its first perspective again in other words
    #    (the data's paraphrase) under a new name that the summary names too, so only the uniqueness term can see it
    train = [s for s in load_situations(os.path.join(CODE, "data", "train.jsonl"))
             if all(p.paraphrase for p in s.perspectives)]
    def padded(s, k):
        again = [Perspective(f"{p.name} seen again", p.paraphrase) for p in s.perspectives[:k]]
        return om.reference_answer(Situation(s.id, s.situation, s.perspectives + again))
    for k, label in ((0, "reference answer"), (1, "+ 1 restated perspective"), (None, "+ every perspective restated")):
        answers = [padded(s, k if k is not None else len(s.perspectives)) for s in train]
        parts = reward.score_answers(answers, [om.reference_answer(s) for s in train], embedder,
                                     situations=[s.situation for s in train])
        print(f"{label:<30} ({len(train)} training situations): flagged in {np.mean([p.u < 1 for p in parts]):.0%}, "
              f"R_uniq {np.mean([p.uniqueness for p in parts]):.3f}, R {np.mean([p.total for p in parts]):.3f}, "
              f"R without the uniqueness term {np.mean([max(0.0, p.coverage + p.format + p.tag) for p in parts]):.3f}")
    # 2. the study's answers, in their groups of 4: what the term does to the advantage of answers that repeat
    groups, items = study_groups()
    scored = score_groups(groups, items, embedder)
    by_row = defaultdict(lambda: dict(n=0, rep=0, adv_with=[], adv_without=[]))
    for (row, _), parts in scored.items():
        with_u = om.group_advantages([p.total for p in parts], len(parts)).tolist()
        without = om.group_advantages([max(0.0, p.coverage + p.format + p.tag) for p in parts], len(parts)).tolist()
        b = by_row[row]
        for p, a, a0 in zip(parts, with_u, without):
            b["n"] += 1
            if p.u < 1:
                b["rep"] += 1
                b["adv_with"].append(a)
                b["adv_without"].append(a0)
    for row, b in by_row.items():
        if b["rep"]:
            print(f"{row:<16} answers with a repeated perspective (u < 1): {b['rep']}/{b['n']}; their mean advantage "
                  f"{np.mean(b['adv_with']):+.2f} with the term, {np.mean(b['adv_without']):+.2f} without")
        else:
            print(f"{row:<16} answers with a repeated perspective (u < 1): 0/{b['n']}")
    print(f"({time.time() - t0:.0f} s)")


def threshold(args):
    t0, embedder = time.time(), estimator(args)
    groups, items = study_groups()
    rows = sorted({row for row, _ in groups})
    print(f"{len(groups)} groups of 4 answers ({len(rows)} models x {len(items)} test situations)")
    print(f"{'threshold':>9} {'zero-spread groups':>19} {'coverage spread':>16} {'mean rate':>10}   "
          f"zero-spread groups of the SFT model (where GRPO starts)")
    for t in args.thresholds:
        scored = score_groups(groups, items, embedder, coverage_threshold=t)
        zero = [no_spread([p.total for p in parts]) for parts in scored.values()]
        cov = [not no_spread([p.coverage for p in parts]) for parts in scored.values()]
        rate = [p.rate for parts in scored.values() for p in parts]
        sft = [no_spread([p.total for p in parts]) for (row, _), parts in scored.items() if row == "SFT"]
        print(f"{t:>9.2f} {np.mean(zero):>19.0%} {np.mean(cov):>16.0%} {np.mean(rate):>10.3f}   {np.mean(sft):.0%}")
    print(f"({time.time() - t0:.0f} s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    project = argparse.ArgumentParser(add_help=False)
    project.add_argument("--project", default=HERE, help="the project or student copy whose code is measured")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("mistakes", parents=[project], help="grade typical mistakes in group_advantages and grpo_loss")
    b = sub.add_parser("plant", parents=[project], help="a full copy of the project with one bug planted")
    b.add_argument("bug", choices=sorted(BUGS))
    b.add_argument("--out", required=True, help="a new directory")
    s = sub.add_parser("sign-flip", parents=[project], help="a toy GRPO run of the code")
    s.add_argument("--flip", action="store_true", help="negate the advantages: the sign bug, simulated")
    s.add_argument("--steps", type=int, default=24, help="GRPO steps (default 24, as the test)")
    t = sub.add_parser("temperature", parents=[project],
                       help="what the sampler drew each token from vs what token_logprobs scores")
    t.add_argument("--sampler", type=float, default=1.0, help="the run's temperature (the sampler's)")
    t.add_argument("--learner", type=float, help="also score at this temperature (a wrong one: the bug, simulated)")
    t.add_argument("--tokens", type=int, default=48, help="new tokens per answer")
    for name, fn in (("uniqueness", "restated perspectives and repeats, with and without the term"),
                     ("threshold", "zero-spread groups by coverage threshold")):
        q = sub.add_parser(name, parents=[project], help=fn)
        q.add_argument("--sim", help="similarity model: a directory, or 'minilm' for the embedded all-MiniLM-L6-v2 "
                                         "(default: runs/study/sim when it exists, else minilm)")
        if name == "threshold":
            q.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    args = p.parse_args(argv)
    {"mistakes": mistakes, "plant": plant, "sign-flip": sign_flip, "temperature": temperature, "uniqueness": uniqueness,
     "threshold": threshold}[args.what](args)


if __name__ == "__main__":
    main()
