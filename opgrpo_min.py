"""OP-GRPO from first principles: an SFT warm start, then GRPO on the dual OP reward.

Fu, Son, Bogunovic, "Overton Pluralistic Reinforcement Learning for Large Language Models" (2026);
GRPO as in DeepSeekMath (Shao et al. 2024, eq. 3-4). One step of RL reads as

    rollout:     G answers per prompt, sampled from the current policy       sample_groups
    reward:      the OP reward of reward.py, one number per answer           rollout_rewards
    advantages:  A_i = (r_i - mean(r_group)) / (std(r_group) + eps)          group_advantages
    update:      clipped ratio loss + beta * k3 KL to the frozen reference   token_logprobs, grpo_loss

    python opgrpo_min.py                                      # embedded SmolLM2-135M, CPU preset
    python opgrpo_min.py --model Qwen/Qwen2.5-3B-Instruct     # one CUDA GPU, paper-like preset
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

import reward
from harness.cli import StopAfterStep, check_knobs, dataclass_args, oom_hint, run_cli
from harness.data import check_prompts, load_situations
from harness.models import (
    check_device,
    check_model_path,
    load_embedder,
    load_policy,
    model_fingerprint,
)
from harness.report import plot_rewards
from harness.runs import atomic_save, claim_out_dir, fingerprints, save_checkpoint, write_text

HERE = os.path.dirname(os.path.abspath(__file__))


# ================================================================ knobs: '# what it does | values it takes'
@dataclasses.dataclass
class Config:
    # -- models and data
    model: str = None  # policy: hub id or local dir; None = embedded SmolLM2-135M-Instruct
    sim_model: str = None  # Sentence Transformer of the reward; None = embedded all-MiniLM-L6-v2
    train_data: str = os.path.join(HERE, "data", "train.jsonl")  # our JSONL (data/README.md)
    out: str = "runs/opgrpo"  # metrics, config, plot, sft/, checkpoint/; never one that holds a run
    overwrite: bool = False  # start over in an --out that holds a run (moved aside, not deleted)
    resume: str = None  # continue the run saved in this dir (model, optimizer, RNG, step)
    seed: int = 0  # same seed, same metrics on CPU | 0 <= v < 2**32
    device: str = None  # None = cuda when present, else cpu
    preset: str = None  # 'cpu' or 'gpu' defaults below; None = by device | v in ("cpu", "gpu")
    dtype: str = None  # None = bfloat16 on cuda, else float32 | v in ("bfloat16", "float32")
    trust_remote_code: bool = False  # only for hub models that need their own code
    # -- stage 0: SFT warm start (paper: 1 epoch, lr 1e-5, cosine, 10% warm-up, AdamW(0.9, 0.95), wd 0.01)
    sft_steps: int = None  # None = one epoch; 0 skips SFT (--model is an SFT model) | v >= 0
    sft_batch: int = 4  # situations per SFT step | v >= 1
    sft_lr: float = None  # paper 1e-5 | 0 < v < 1
    # -- stage 2: GRPO
    steps: int = None  # RL steps (paper about 150) | v >= 1
    prompts_per_step: int = None  # paper 1024; what fits one machine is far fewer | v >= 1
    group_size: int = None  # G answers per prompt (paper 10); one has no spread | v >= 2
    max_new_tokens: int = None  # paper 800 | v >= 1
    max_prompt_len: int = 512  # a longer prompt is refused at load, never cut | v >= 1
    temperature: float = 1.0  # sampling temperature; log-probs use the same one | v > 0
    top_p: float = 1.0  # nucleus sampling in training (paper 1.0); top_k is always off | 0 < v <= 1
    lr: float = None  # paper 1e-6 (3B); a 135M model needs more to move in minutes | 0 < v < 1
    weight_decay: float = 0.01  # AdamW | v >= 0
    grad_clip: float = 1.0  # max global grad norm | v > 0
    clip_eps: float = 0.2  # PPO ratio clip | 0 < v < 1
    dual_clip: float = 3.0  # loss cap for A < 0 (Ye et al. 2020); 0 = off | v == 0 or v > 1
    beta: float = 0.001  # weight of the k3 KL to the reference (DeepSeekMath 0.04) | v >= 0
    adv_eps: float = 1e-6  # eps in A = (r - mean) / (std + eps) | v > 0
    updates_per_step: int = 4  # mini-batch updates per rollout batch (paper 4) | v >= 1
    micro_batch: int = None  # answers per forward/backward (gradients add up) | v >= 1
    gradient_checkpointing: int = None  # 1: recompute activations, less memory | v in (0, 1)
    lora_rank: int = 0  # > 0: train a LoRA adapter of this rank (pip install peft) | v >= 0
    # -- reward options (reward.py has the paper's defaults)
    mask_keywords: str = "answer"  # 'answer' (paper), 'both' or 'none' | v in reward.MASK_MODES
    min_perspectives: int = 0  # uniqueness is 0 below this many (paper: 0, off) | v >= 0
    coverage_threshold: float = reward.COVERAGE_THRESHOLD  # paper 0.70 | -1 <= v <= 1
    # -- logging
    sample_every: int = 5  # print one sampled answer every N steps (0: never) | v >= 0
    save_every: int = 10  # checkpoint every N steps, at the end, on Ctrl-C | v >= 0


PRESETS = {  # knobs left at None above take these
    "cpu": dict(
        sft_steps=12,
        sft_lr=1e-4,
        steps=16,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=128,
        lr=5e-6,
        micro_batch=8,
        gradient_checkpointing=0,
    ),  # ~11 min on 2 cores; one SFT epoch alone takes longer
    "gpu": dict(
        sft_lr=1e-5,
        steps=150,
        prompts_per_step=8,
        group_size=10,
        max_new_tokens=800,
        lr=1e-6,
        micro_batch=8,
        gradient_checkpointing=1,
    ),
}


# ================================================================ the step's helpers: timing, train/eval mode, EOS
def clock(model):
    """time.perf_counter() after the GPU has finished its queued work, so phase timings are true."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


@contextlib.contextmanager
def training(model, checkpointing):
    """model.train() for a block of updates, with gradient checkpointing if asked; eval mode (and the KV cache that
    generation needs) again after it. transformers 5.23 renamed gradient_checkpointing_* to activation_*."""
    kind = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    model.train()
    if checkpointing:
        getattr(model, f"{kind}_checkpointing_enable")()
    try:
        yield
    finally:
        if checkpointing:
            getattr(model, f"{kind}_checkpointing_disable")()
        model.eval()


def eos_ids(model, tokenizer):
    """Every id that ends an answer: the generation config's EOS ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return sorted(e for e in eos if e is not None)


@contextlib.contextmanager
def own_sampling_only(model):
    """generate() fills every field our config leaves unset from the model's generation_config.json, e.g.
    Qwen2.5-Instruct's repetition_penalty 1.05, which would make the samples come from another distribution than
    the one the learner scores. For the call, the model's own generation config is a blank one."""
    from transformers import GenerationConfig

    base = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # a peft model generates with it
    saved, base.generation_config = base.generation_config, GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


# ================================================================ data: prompts and the reference answer
IMPLICIT_PROMPT = (
    "Provide a structured comprehensive analysis and your opinions on this topic: {situation}\n\n"
)
EXPLICIT_PROMPT = (
    "Provide a multi-perspective analysis of this topic: {situation}\n"
    "Write each sentence as one distinct perspective, in the form "
    "'In the perspective of <name>, <explanation>'.\n\n"
)
PROMPT_STYLES = {  # implicit: what SFT and GRPO train on; explicit: the paper's baseline; the rest: never trained on
    "implicit": IMPLICIT_PROMPT,
    "explicit": EXPLICIT_PROMPT,
    "bare": "What do you think about: {situation}",
    "brief": "Briefly, your view on: {situation}",
    "advisor": "You are an advisor. {situation}",
}


def reference_answer(s):
    """The SFT target and the reward's reference: one perspective line each, then a summary. The authors had an LLM
    write the summary; ours is a fixed rule that names every perspective, so the format's summary term is met."""
    lines = "\n".join(reward.perspective_line(p.name, p.explanation) for p in s.perspectives)
    names = [p.name for p in s.perspectives]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    summary = (
        f"{s.situation.rstrip('.')} touches on {listed}. No single one of them settles the question: "
        f"a fair judgement weighs each against the others and against the people affected."
    )
    return f"<core perspectives>\n{lines}\n</core perspectives>\n\n<summary>\n{summary}\n</summary>"


def chat_prompt(tokenizer, situation, style="implicit"):
    """The user turn in one of PROMPT_STYLES (implicit by default), wrapped in the model's own chat template."""
    msgs = [{"role": "user", "content": PROMPT_STYLES[style].format(situation=situation)}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


# ================================================================ stage 0: SFT warm start
def adamw(model, lr, **kw):
    """AdamW with its fused kernel: one pass over the weights per step (on a 2-core CPU 0.07 s instead of 0.61 s for
    135M parameters; the same update up to float rounding), on the trainable weights (a LoRA adapter, or all).
    bfloat16 weights (the GPU path) get float32 master copies: extras/precision.py."""
    params = [p for p in model.parameters() if p.requires_grad]
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, lr=lr, fused=True, **kw)
    from extras.precision import MasterAdamW

    return MasterAdamW(params, lr=lr, fused=True, **kw)


def sft_examples(tokenizer, items, max_len):
    """(input_ids, labels) per situation: chat prompt -> reference answer + EOS; labels -100 on the prompt."""
    out = []
    for s in items:
        prompt = tokenizer(chat_prompt(tokenizer, s.situation), add_special_tokens=False).input_ids
        answer = tokenizer(reference_answer(s), add_special_tokens=False).input_ids + [
            tokenizer.eos_token_id
        ]
        ids = (prompt + answer)[:max_len]
        out.append((ids, ([-100] * len(prompt) + answer)[:max_len]))
    return out


def sft_warmup(model, tokenizer, items, cfg):
    """Stage 0: plain supervised fine-tuning, cross-entropy on answer tokens only.
    Paper recipe: lr 1e-5, cosine schedule, 10 % warm-up, AdamW(0.9, 0.95), weight decay 0.01, clip 1.0."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    examples = sft_examples(tokenizer, items, cfg.max_prompt_len + cfg.max_new_tokens)
    steps = cfg.sft_steps if cfg.sft_steps is not None else math.ceil(len(examples) / cfg.sft_batch)
    opt = adamw(model, cfg.sft_lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, round(0.1 * steps)), steps)
    order = np.random.default_rng(cfg.seed).permutation(len(examples))
    bar = tqdm(range(steps), desc="SFT", dynamic_ncols=True)
    with training(model, cfg.gradient_checkpointing):
        for step in bar:
            batch = [
                examples[order[(step * cfg.sft_batch + k) % len(examples)]]
                for k in range(cfg.sft_batch)
            ]
            width, pad = max(len(ids) for ids, _ in batch), tokenizer.pad_token_id
            input_ids = torch.tensor(
                [ids + [pad] * (width - len(ids)) for ids, _ in batch]
            )  # [b, width]
            labels = torch.tensor(
                [lab + [-100] * (width - len(lab)) for _, lab in batch]
            )  # [b, width]
            attn = (
                torch.arange(width)[None] < torch.tensor([len(i) for i, _ in batch])[:, None]
            ).long()
            loss = model(
                input_ids=input_ids.to(model.device),
                attention_mask=attn.to(model.device),
                labels=labels.to(model.device),
            ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model


# ================================================================ stage 2: GRPO
@dataclasses.dataclass
class Rollout:
    """G answers for each of P prompts, answers of prompt i at rows i*G .. i*G+G-1."""

    input_ids: torch.Tensor  # [P*G, L+T]  left-padded prompt, then the answer (padded after EOS)
    attention_mask: torch.Tensor  # [P*G, L+T]
    answer_mask: torch.Tensor  # [P*G, T]    1 on answer tokens up to and including EOS
    texts: list  # P*G decoded answers
    group_ids: torch.Tensor  # [P*G]       which prompt each answer answers


@torch.no_grad()
def sample_groups(
    model, tokenizer, prompts, group_size, max_new_tokens, temperature=1.0, top_p=1.0
):
    """Rollout: one batched, KV-cached `generate` call for all P*G answers (left padding; check_prompts has made
    sure that no prompt is too long)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = enc.input_ids.repeat_interleave(group_size, 0).to(model.device)  # [P*G, L]
    attn = enc.attention_mask.repeat_interleave(group_size, 0).to(model.device)  # [P*G, L]
    vocab, eos = len(tokenizer), eos_ids(model, tokenizer)
    extra = model.get_output_embeddings().weight.shape[0] - vocab  # Qwen pads its output layer
    gen = sampling_config(
        temperature,
        top_p,
        max_new_tokens,
        tokenizer.pad_token_id,
        eos,
        suppress=list(range(vocab, vocab + extra)) if extra > 0 else None,
    )
    with own_sampling_only(model):
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)
    answers = out[:, ids.shape[1] :]  # [P*G, T]
    is_eos = torch.isin(answers, torch.tensor(eos, device=answers.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    answer_mask = (~after_eos).long()  # [P*G, T]
    group_ids = torch.arange(len(prompts)).repeat_interleave(group_size)
    texts = tokenizer.batch_decode(
        answers * answer_mask + tokenizer.pad_token_id * (1 - answer_mask), skip_special_tokens=True
    )
    return Rollout(out, torch.cat([attn, answer_mask], 1), answer_mask, texts, group_ids)


def sampling_config(temperature, top_p, max_new_tokens, pad_id, eos_ids, suppress=None):
    """The sampler is pi(. | q, a_<t) at `temperature`, cut to its top_p nucleus, and nothing else: that is the
    distribution token_logprobs scores (top_p = 1: exactly). top_k 0 is off; `suppress` names the ids of an output
    layer padded past the tokenizer, which token_logprobs leaves out of its softmax too."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        suppress_tokens=suppress,
    )


def rollout_rewards(embedder, cfg):
    """The loop's reward function: (rollout, the situation of each answer) -> (R per answer, the mean of each term).
    R is reward.score_answers' total against the situation's reference answer."""

    def fn(roll, items):
        parts = reward.score_answers(
            roll.texts,
            [reference_answer(s) for s in items],
            embedder,
            situations=[s.situation for s in items],
            mask_keywords=cfg.mask_keywords,
            min_perspectives=cfg.min_perspectives,
            coverage_threshold=cfg.coverage_threshold,
        )
        means = {
            k: float(np.mean([getattr(p, k) for p in parts]))
            for k in vars(parts[0])
            if k not in ("total", "u")
        }
        return [p.total for p in parts], means

    return fn


def group_advantages(rewards, group_size, eps=1e-6):
    """A_i = (r_i - mean(r_g)) / (std(r_g) + eps) over each group g of G answers to one prompt.
    Takes rewards: P*G floats (a list, numpy array or tensor), the G answers of prompt p at p*G .. p*G+G-1; returns
    a float32 torch tensor [P*G] in the same order (the loop indexes it with torch index tensors).
    std is the population std (divide by G): it is defined for any G >= 2 and matches the recipe's
    numpy-style std; the sample std (G - 1) would only rescale all advantages of a group by a constant.
    A group whose answers all score the same has no signal and gets A = 0.
    Example: rewards [1, 0, 0, 0] -> mean 0.25, std 0.433 -> A = [1.732, -0.577, -0.577, -0.577]."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)  # [P, G]
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps)  # [P, G]
    return adv.view(-1)  # [P*G]


def token_logprobs(
    model,
    input_ids,
    attention_mask,
    answer_len,
    temperature=1.0,
    micro_batch=8,
    vocab=None,
    entropy=False,
):
    """log pi(a_t | q, a_<t) of the answer tokens, the last `answer_len` = T columns of input_ids [B, L+T] (long;
    left-padded prompts, attention_mask [B, L+T] 0 on the padding): a float32 tensor [B, T] that carries the gradient.
    pi is softmax(logits / temperature) over the first `vocab` logits (None: all), the logits of token t taken at the
    position before it; position ids count real tokens only (cumsum(attention_mask) - 1, at least 0), so left padding
    changes nothing. Rows go through the model micro_batch at a time; full-vocabulary logits are computed only for
    answer positions (logits_to_keep) and turned to float32 one row at a time, never for the whole batch.
    entropy=True returns (logp, H), H [B, T] = -sum_v pi(v) log pi(v) of each position's distribution (no grad)."""
    # left padding: positions count real tokens only
    pos = (attention_mask.cumsum(1) - 1).clamp(min=0)
    rows, ents = [], []
    for i in range(0, input_ids.shape[0], micro_batch):
        sl = slice(i, i + micro_batch)
        logits = model(
            input_ids=input_ids[sl],
            attention_mask=attention_mask[sl],
            position_ids=pos[sl],
            logits_to_keep=answer_len + 1,
        ).logits[:, :-1]  # [mb, T, V']
        if vocab is not None:
            logits = logits[..., :vocab]  # ids past the tokenizer are never sampled, never scored
        targets = input_ids[sl, -answer_len:]  # [mb, T]
        for row, tgt in zip(logits, targets):
            row = row.float() / temperature  # [T, V]
            lse = row.logsumexp(1)  # [T]
            rows.append(row.gather(1, tgt[:, None]).squeeze(1) - lse)  # [T]
            if entropy:  # H = logsumexp(z) - sum_v p_v z_v, 64 positions at a time: no [T, V] copy at the peak
                with torch.no_grad():
                    ents.append(
                        torch.cat(
                            [c.logsumexp(1) - (c.softmax(1) * c).sum(1) for c in row.split(64)]
                        )
                    )
    return (torch.stack(rows), torch.stack(ents)) if entropy else torch.stack(rows)  # [B, T]


def grpo_loss(
    logp,
    old_logp,
    ref_logp,
    advantages,
    mask,
    clip_eps=0.2,
    beta=0.001,
    dual_clip=3.0,
    num_tokens=None,
):
    """The GRPO loss of a batch of answers: the per-token terms of DeepSeekMath eq. 3, averaged over every answer
    token of the batch (the recipe's token-mean; eq. 3 itself averages per answer, 1/G sum_i 1/|o_i| sum_t), with the
    dual clip of Ye et al. (2020) for negative advantages:
        ratio_t = exp(logp_t - old_t)                                 (log-ratio clamped to [-20, 20] first)
        pg_t    = -min(ratio_t A, clip(ratio_t, 1 - e, 1 + e) A);   for A < 0 then min(pg_t, -c A)   (dual clip)
        kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1         (k3 estimator, >= 0; log-ratio clamped too)
        loss    = sum_t mask_t (pg_t + beta kl_t) / num_tokens
    The token-mean keeps long answers from being down-weighted per token.
    Takes logp, old_logp, ref_logp: float tensors [B, T] of log-probs (logp carries the gradient; ref_logp None or
    beta 0: kl_t = 0); advantages: float tensor [B], one per answer, the same for all its tokens; mask: [B, T], 1 on
    answer tokens (EOS included), 0 on padding; dual_clip c: 0 turns it off; num_tokens: the divisor, by default
    mask.sum() (at least 1), or the mini-batch's total when micro-batches accumulate.
    Returns (loss, stats): loss a 0-d tensor that carries the gradient; stats a dict of Python floats, each a mean
    over the tokens where mask is 1: "kl" of kl_t, "ratio" of ratio_t, and "clip_frac", the share of those tokens
    whose clip is active (ratio_t > 1 + e with A > 0, or ratio_t < 1 - e with A < 0).
    Example: A = 1, ratio 1.5, e = 0.2 -> pg = -min(1.5, 1.2) = -1.2; the clipped branch has no gradient."""
    mask = mask.float()
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    A = advantages[:, None]  # [B, 1]
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))  # [B, T]
    pg = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)  # [B, T]
    if dual_clip:
        pg = torch.where(A < 0, torch.min(pg, -dual_clip * A), pg)
    if ref_logp is not None and beta:
        delta = (ref_logp - logp).clamp(
            -20, 20
        )  # clamp before exp: one rare token must not overflow
        kl = torch.exp(delta) - delta - 1  # [B, T]
    else:
        kl = torch.zeros_like(logp)
    loss = ((pg + beta * kl) * mask).sum() / num_tokens
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        # the clip is active: the ratio is past its edge in the direction the advantage pushes
        clipped = (((ratio > 1 + clip_eps) & (A > 0)) | ((ratio < 1 - clip_eps) & (A < 0))).float()
        stats = dict(
            kl=(kl * mask).sum().item() / n.item(),
            clip_frac=(clipped * mask).sum().item() / n.item(),
            ratio=(ratio * mask).sum().item() / n.item(),
        )
    return loss, stats


def grpo_update(model, optimizer, roll, adv, old_logp, ref_logp, cfg, vocab):
    """The batch of one step in `updates_per_step` mini-batch updates (the paper splits its 1024
    prompts into 4), so from the second update on the policy differs from the sampler and the
    ratio/clip matter. Gradients accumulate over micro-batches; the loss is a token-mean over the
    whole mini-batch. Returns per-update stats (t_forward: seconds of that update in the policy forward); a
    non-finite loss skips that optimizer step."""
    T = roll.answer_mask.shape[1]
    stats = []
    for u, mb in enumerate(torch.randperm(len(adv)).chunk(cfg.updates_per_step)):
        num_tokens = roll.answer_mask[mb].sum().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        total, parts, t_forward = 0.0, [], 0.0
        for micro in mb.split(cfg.micro_batch):
            t0 = clock(model)
            out = token_logprobs(
                model,
                roll.input_ids[micro],
                roll.attention_mask[micro],
                T,
                cfg.temperature,
                cfg.micro_batch,
                vocab,
                entropy=u == 0,
            )  # entropy: of the sampler's policy only
            logp, ent = out if u == 0 else (out, None)  # [mb, T] each
            t_forward += clock(model) - t0
            old = (
                logp.detach() if old_logp is None else old_logp[micro]
            )  # one update: ratio = 1, no extra forward
            ref = None if ref_logp is None else ref_logp[micro]
            loss, s = grpo_loss(
                logp,
                old,
                ref,
                adv[micro].to(logp.device),
                roll.answer_mask[micro],
                cfg.clip_eps,
                cfg.beta,
                cfg.dual_clip,
                num_tokens,
            )
            loss.backward()
            total += loss.item()
            m = roll.answer_mask[micro]
            if ent is not None:
                s = dict(s, entropy=((ent * m).sum() / m.sum().clamp(min=1)).item())
            parts.append((s, int(m.sum())))
        n = sum(w for _, w in parts) or 1
        s = {k: sum(p[k] * w for p, w in parts) / n for k in parts[0][0]}
        if not math.isfinite(total):
            optimizer.zero_grad(set_to_none=True)
            stats.append(
                dict(s, loss=total, grad_norm=float("nan"), skipped=1, t_forward=t_forward)
            )
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        stats.append(dict(s, loss=total, grad_norm=grad_norm, skipped=0, t_forward=t_forward))
    return stats


def prompts_for_step(n_items, step, per_step, seed):
    """Indices of the situations of one step: a fresh seeded permutation each epoch, so the data
    order depends only on (seed, step) and a resumed run sees exactly what a straight run sees."""
    idx = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, n_items)
        idx.append(int(np.random.default_rng([seed, epoch]).permutation(n_items)[i]))
    return idx


# ================================================================ the training loop
def grpo_train(
    model,
    tokenizer,
    items,
    reward_fn,
    cfg,
    ref_model=None,
    optimizer=None,
    start_step=0,
    out=None,
    fingerprints=None,
):
    """Stage 2. Each step: rollout -> reward -> group advantages -> log-probs -> mini-batch updates.
    Returns the list of per-step metric rows (also appended to out/metrics.jsonl when `out` is set; its checkpoints
    carry `fingerprints`, what a resume checks)."""
    from tqdm.auto import tqdm

    optimizer = optimizer or adamw(model, cfg.lr, weight_decay=cfg.weight_decay)
    vocab, G = len(tokenizer), cfg.group_size
    rows, bad_steps = [], 0
    bar = tqdm(
        range(start_step, cfg.steps),
        desc="GRPO",
        dynamic_ncols=True,
        initial=start_step,
        total=cfg.steps,
    )
    with StopAfterStep() as stop:
        for step in bar:
            t0 = clock(model)
            # ---- rollout: G answers per prompt
            batch = [
                items[i] for i in prompts_for_step(len(items), step, cfg.prompts_per_step, cfg.seed)
            ]
            model.eval()
            roll = sample_groups(
                model,
                tokenizer,
                [chat_prompt(tokenizer, s.situation) for s in batch],
                G,
                cfg.max_new_tokens,
                cfg.temperature,
                cfg.top_p,
            )
            assert roll.group_ids.tolist() == [i // G for i in range(len(batch) * G)], (
                "answers left their group"
            )
            t1 = clock(model)
            # ---- reward and group-normalised advantages
            rewards, means = reward_fn(roll, [batch[g] for g in roll.group_ids.tolist()])
            adv = group_advantages(rewards, G, cfg.adv_eps)  # [P*G]
            r = torch.tensor(rewards).view(-1, G)  # [P, G]
            # the share of groups with no signal: all G rewards equal, so every advantage is 0
            zero_spread = float((r.max(1).values == r.min(1).values).float().mean())
            t2 = clock(model)
            # ---- log-probs of the sampler (only needed when several updates share one batch) and reference
            T = roll.answer_mask.shape[1]
            with torch.no_grad():
                old_logp = (
                    None
                    if cfg.updates_per_step == 1
                    else token_logprobs(
                        model,
                        roll.input_ids,
                        roll.attention_mask,
                        T,
                        cfg.temperature,
                        cfg.micro_batch,
                        vocab,
                    )
                )
                t_old = clock(model)
                with (
                    ref_model.disable_adapter() if ref_model is model else contextlib.nullcontext()
                ):
                    ref_logp = (
                        None
                        if ref_model is None or not cfg.beta
                        else token_logprobs(  # LoRA: adapter off
                            ref_model,
                            roll.input_ids,
                            roll.attention_mask,
                            T,
                            cfg.temperature,
                            cfg.micro_batch,
                            vocab,
                        )
                    )
            t3 = clock(model)
            # ---- update (gradient checkpointing, when on, only here: generation needs its KV cache)
            with training(model, cfg.gradient_checkpointing):
                upd = grpo_update(model, optimizer, roll, adv, old_logp, ref_logp, cfg, vocab)
            t4 = clock(model)
            # ---- log
            skipped = sum(u["skipped"] for u in upd)
            bad_steps = bad_steps + 1 if skipped == len(upd) else 0
            row = dict(
                step=step + 1,
                reward=float(np.mean(rewards)),
                reward_std=float(np.std(rewards)),
                **means,
                zero_spread=zero_spread,
                entropy=upd[0]["entropy"],  # first update: the sampler's policy
                **{
                    k: float(np.nanmean([u[k] for u in upd]))
                    for k in ("kl", "clip_frac", "ratio", "loss", "grad_norm")
                },
                skipped_updates=skipped,
                answer_len=float(roll.answer_mask.sum(1).float().mean()),
                t_generate=t1 - t0,
                t_reward=t2 - t1,
                t_logprob=t3 - t2,
                t_logprob_old=t_old - t2,
                t_logprob_ref=t3 - t_old,
                t_update=t4 - t3,
                t_update_forward=sum(u["t_forward"] for u in upd),
                t_step=t4 - t0,
            )
            rows.append(row)
            bar.set_postfix(
                {
                    k: f"{row[k]:.2f}"
                    for k in (
                        "reward",
                        "coverage",
                        "uniqueness",
                        "zero_spread",
                        "entropy",
                        "clip_frac",
                    )
                    if k in row
                },
                kl=f"{row['kl']:.4f}",
                len=f"{row['answer_len']:.0f}",
                s=f"{row['t_step']:.1f}",
            )
            if out:
                with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                if cfg.save_every and (step + 1) % cfg.save_every == 0:
                    save_checkpoint(out, model, tokenizer, optimizer, step + 1, cfg, fingerprints)
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                tqdm.write(
                    f"--- step {step + 1}, {batch[0].situation!r}, reward {rewards[0]:.2f}:\n{roll.texts[0]}\n"
                )
            if bad_steps >= 3:
                raise RuntimeError(
                    "the loss was not finite in 3 steps in a row: lower --lr (or raise --beta); "
                    f"the last good checkpoint is in {out}"
                )
            if stop.requested:
                break
    done = start_step + len(rows)
    if out and (not cfg.save_every or done % cfg.save_every):
        save_checkpoint(out, model, tokenizer, optimizer, done, cfg, fingerprints)
    if stop.requested:
        print(
            f"\ninterrupted: checkpoint of step {done} saved; continue with --resume {out}",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
    return rows


# ================================================================ main
RESUMABLE = (
    "steps",
    "save_every",
    "sample_every",
)  # the knobs a resume may change: they extend or report a run
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint", "sft")  # what makes a folder hold a run


def resolve_config(cfg):
    """Fill the device, preset and the knobs the preset owns; refuse a value outside its range (NaN and inf too)."""
    cfg = dataclasses.replace(cfg)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(cfg.device)
    cfg.preset = cfg.preset or ("gpu" if cfg.device.startswith("cuda") else "cpu")
    cfg.dtype = cfg.dtype or ("bfloat16" if cfg.device.startswith("cuda") else "float32")
    for k, v in PRESETS.get(cfg.preset, {}).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    check_knobs(cfg)
    if cfg.updates_per_step > cfg.prompts_per_step * cfg.group_size:
        raise ValueError("--updates-per-step cannot exceed the number of answers per step")
    return cfg


def train(cfg):
    """The whole job: check every input, SFT warm start, frozen reference, GRPO; or continue a run (--resume)."""
    if cfg.resume:  # the saved run's knobs; extras/resume.py refuses anything that would not continue it exactly
        from extras import resume

        cfg, ckpt, state, tensors, history = resume.load(cfg, Config, RESUMABLE)
    cfg = resolve_config(cfg)
    items = load_situations(cfg.train_data)  # every input is checked before anything is written
    (
        check_model_path(cfg.model, "--model"),
        check_model_path(cfg.sim_model, "--sim-model", tokenizer=False),
    )
    if not cfg.resume:
        claim_out_dir(
            cfg.out,
            RUN_FILES,
            cfg.overwrite,
            f"continue it with --resume {cfg.out}, or ",
            dry_run=True,
        )
    dtype, sft_dir = getattr(torch, cfg.dtype), os.path.join(cfg.out, "sft")
    reference = (
        sft_dir if cfg.sft_steps != 0 else cfg.model
    )  # the KL reference: the policy at the start of RL

    # ---- models: the policy (from the checkpoint on a resume), its prompts checked, then the output folder
    if (
        cfg.resume and cfg.lora_rank
    ):  # the checkpoint holds the adapter; its frozen base is the reference
        from extras.lora import saved_adapter

        model, tok = load_policy(reference, cfg.device, dtype, cfg.trust_remote_code)
        model = saved_adapter(model, ckpt)
    else:
        model, tok = load_policy(
            ckpt if cfg.resume else cfg.model, cfg.device, dtype, cfg.trust_remote_code
        )
    check_prompts(tok, items, cfg.max_prompt_len, lambda s: chat_prompt(tok, s))
    prints = fingerprints(
        cfg.train_data, tok
    )  # what a resume checks is unchanged (extras/resume.py)
    if cfg.resume:
        resume.check_same(
            state["fingerprints"], dict(prints, reference=model_fingerprint(reference)), cfg.out
        )
    else:
        claim_out_dir(
            cfg.out, RUN_FILES, cfg.overwrite, f"continue it with --resume {cfg.out}, or "
        )
    print("config:", json.dumps(dataclasses.asdict(cfg), indent=1))
    write_text(os.path.join(cfg.out, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    embedder = load_embedder(cfg.sim_model, device=cfg.device)
    if not cfg.resume:
        if cfg.lora_rank:
            from extras.lora import with_lora
        if (
            cfg.sft_steps != 0
        ):  # ---- stage 0: SFT warm start, kept as its own model (the paper's SFT row)
            model = with_lora(model, cfg.lora_rank) if cfg.lora_rank else model
            with oom_hint("--sft-batch"):
                sft_warmup(model, tok, items, cfg)
            model = (
                model.merge_and_unload() if cfg.lora_rank else model
            )  # sft/ is a plain model either way
            atomic_save(sft_dir, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
        model = with_lora(model, cfg.lora_rank) if cfg.lora_rank else model
    ref = None
    if cfg.beta:  # reference = the frozen policy at the start of RL; with LoRA, the policy with its adapter off
        if cfg.lora_rank:
            ref = model
        elif cfg.resume:
            ref = load_policy(reference, cfg.device, dtype, cfg.trust_remote_code)[0]
        else:
            import copy

            ref = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer, metrics = (
        adamw(model, cfg.lr, weight_decay=cfg.weight_decay),
        os.path.join(cfg.out, "metrics.jsonl"),
    )
    if cfg.resume:
        optimizer.load_state_dict(tensors["optimizer"])
        resume.set_rng_state(state["rng"], tensors)
        start, prints = state["step"], state["fingerprints"]
        write_text(metrics, "".join(history))
        print(f"resumed from {cfg.out} at step {start}")
    else:
        start, prints = 0, dict(prints, reference=model_fingerprint(reference))
        write_text(metrics, "")

    # ---- stage 2: GRPO
    with oom_hint("--micro-batch first, then --group-size, --max-new-tokens or --prompts-per-step"):
        grpo_train(
            model,
            tok,
            items,
            rollout_rewards(embedder, cfg),
            cfg,
            ref,
            optimizer,
            start,
            cfg.out,
            prints,
        )
    rows = [json.loads(line) for line in open(metrics, encoding="utf-8")]
    if rows:
        plot_rewards(cfg.out, rows)
        q = max(1, len(rows) // 4)
        print(
            f"mean reward: first quarter {np.mean([r['reward'] for r in rows[:q]]):.3f}, "
            f"last quarter {np.mean([r['reward'] for r in rows[-q:]]):.3f}; outputs in {cfg.out}"
        )
    return rows


def parse_args(argv=None):
    """Config fields as --flags (the comment beside a field: help | range); only the flags given are recorded."""
    return dataclass_args(Config, argv, __doc__)


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
