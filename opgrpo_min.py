"""OP-GRPO from first principles: an SFT warm start, then GRPO on the dual OP reward.

Fu, Son, Bogunovic, "Overton Pluralistic Reinforcement Learning for Large Language Models" (2026);
GRPO as in DeepSeekMath (Shao et al. 2024, eq. 3-4). One step of RL reads as

    rollout:     G answers per prompt, sampled from the current policy       sample_groups
    reward:      the OP reward of reward.py, one number per answer           reward.score_answers
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
from dataclasses import dataclass

import numpy as np
import torch

import reward
from support import (StopAfterStep, atomic_save, check_model_path, check_out_dir, dataclass_args, find_checkpoint,
                     load_policy, load_situations, load_trainer_state, oom_hint, plot_rewards, resumed_config,
                     rows_up_to, run_cli, save_checkpoint, set_rng_state, write_text)

HERE = os.path.dirname(os.path.abspath(__file__))


# ================================================================ config
@dataclass
class Config:
    # -- models and data
    model: str = None            # policy: hub id, local dir or .gguf file; None = embedded SmolLM2-135M-Instruct
    sim_model: str = None        # similarity estimator (Sentence Transformer); None = embedded all-MiniLM-L6-v2
    train_data: str = os.path.join(HERE, "data", "train.jsonl")  # our JSONL, the authors' CSV or ValueKaleidoscope JSON
    out: str = "runs/opgrpo"     # metrics, config, plot, checkpoints
    resume: str = None           # continue the run saved in this dir (model, optimizer, RNG, step)
    seed: int = 0                # same seed, same metrics on CPU
    device: str = None           # None = cuda when present, else cpu
    preset: str = None           # 'cpu' or 'gpu' defaults below; None = by device
    dtype: str = None            # policy weights: bfloat16 or float32; None = bfloat16 on cuda, float32 on cpu
    trust_remote_code: bool = False  # only for hub models that need their own code
    # -- stage 0: SFT warm start (paper: 1 epoch, lr 1e-5, cosine, 10% warm-up, AdamW(0.9, 0.95), wd 0.01)
    sft_steps: int = None        # None = one epoch (gpu preset); 0 skips SFT (e.g. --model is an SFT checkpoint)
    sft_batch: int = 4           # situations per SFT step
    sft_lr: float = None         # paper 1e-5
    # -- stage 2: GRPO
    steps: int = None            # RL steps (paper about 150)
    prompts_per_step: int = None # paper 1024; what fits one machine is far fewer
    group_size: int = None       # G answers per prompt (paper 10)
    max_new_tokens: int = None   # paper 800
    min_new_tokens: int = 0      # force at least this many answer tokens (bench.py: the same work every step)
    max_prompt_len: int = 512    # longer prompts are rejected with an error (the situation would be cut)
    temperature: float = 1.0     # sampling temperature; log-probs use the same one
    top_p: float = 1.0           # nucleus sampling during training (paper 1.0); top_k is always off
    lr: float = None             # paper 1e-6 constant for a 3B model; a 135M model needs more to move in minutes
    weight_decay: float = 0.01   # AdamW
    grad_clip: float = 1.0       # max global grad norm
    clip_eps: float = 0.2        # PPO ratio clip
    dual_clip: float = 3.0       # cap of the loss for negative advantages (recipe: 3); 0 disables
    beta: float = 0.001          # weight of the k3 KL to the reference (DeepSeekMath used 0.04); 0 drops the reference
    adv_eps: float = 1e-6        # eps in A = (r - mean) / (std + eps)
    updates_per_step: int = 4    # mini-batch updates per batch of rollouts (paper 4): ratio != 1 after the first
    micro_batch: int = None      # answers per forward/backward; gradients accumulate over a mini-batch
    gradient_checkpointing: int = None  # 1: recompute activations in the backward: less memory, one more forward
    lora_rank: int = 0           # > 0: train a LoRA adapter of this rank (pip install peft); reference = adapter off
    # -- reward options (reward.py has the paper's defaults)
    mask_keywords: str = "answer"  # 'answer' (paper), 'both' or 'none'
    min_perspectives: int = 0    # uniqueness is 0 below this many perspectives (paper: 0, i.e. off)
    coverage_threshold: float = reward.COVERAGE_THRESHOLD  # cosine from which a perspective is covered (paper 0.70)
    # -- logging
    sample_every: int = 5        # print one sampled answer every N steps
    save_every: int = 10         # checkpoint every N steps (and at the end, and on Ctrl-C)


PRESETS = {  # knobs left at None above take these
    "cpu": dict(sft_steps=12, sft_lr=1e-4, steps=16, prompts_per_step=2, group_size=4, max_new_tokens=128, lr=5e-6,
                micro_batch=8, gradient_checkpointing=0),  # ~15 min on 2 cores; one SFT epoch alone takes longer
    "gpu": dict(sft_lr=1e-5, steps=150, prompts_per_step=8, group_size=10, max_new_tokens=800, lr=1e-6, micro_batch=8,
                gradient_checkpointing=1),
}


VALID = {  # knob: (test, the range in words); --help shows the range, and a value outside it is one clear error
    "steps": (lambda v: v >= 1, ">= 1"), "prompts_per_step": (lambda v: v >= 1, ">= 1"),
    "group_size": (lambda v: v >= 2, ">= 2: one answer has no spread, so no advantage"),
    "max_new_tokens": (lambda v: v >= 1, ">= 1"), "min_new_tokens": (lambda v: v >= 0, ">= 0"),
    "max_prompt_len": (lambda v: v >= 1, ">= 1"), "sft_batch": (lambda v: v >= 1, ">= 1"),
    "sft_steps": (lambda v: v >= 0, ">= 0"), "sft_lr": (lambda v: v > 0, "> 0"), "lr": (lambda v: v > 0, "> 0"),
    "temperature": (lambda v: v > 0, "> 0"), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "weight_decay": (lambda v: v >= 0, ">= 0"), "grad_clip": (lambda v: v > 0, "> 0"),
    "clip_eps": (lambda v: 0 < v < 1, "in (0, 1)"), "dual_clip": (lambda v: v == 0 or v > 1, "0 (off) or > 1"),
    "beta": (lambda v: v >= 0, ">= 0"), "adv_eps": (lambda v: v > 0, "> 0"),
    "updates_per_step": (lambda v: v >= 1, ">= 1"), "micro_batch": (lambda v: v >= 1, ">= 1"),
    "gradient_checkpointing": (lambda v: v in (0, 1), "0 or 1"), "lora_rank": (lambda v: v >= 0, ">= 0"),
    "mask_keywords": (lambda v: v in reward.MASK_MODES, " or ".join(reward.MASK_MODES)),
    "min_perspectives": (lambda v: v >= 0, ">= 0"),
    "coverage_threshold": (lambda v: -1 <= v <= 1, "a cosine in [-1, 1]"),
    "sample_every": (lambda v: v >= 0, ">= 0 (0: never)"),
    "save_every": (lambda v: v >= 0, ">= 0 (0: only at the end)"), "preset": (lambda v: v in PRESETS, "cpu or gpu"),
    "dtype": (lambda v: v in ("bfloat16", "float32"), "bfloat16 or float32"),
}


def resolve_config(cfg):
    """Fill the device, preset and the knobs the preset owns; refuse a value outside its range (NaN included)."""
    cfg = dataclasses.replace(cfg)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {cfg.device}: use cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: torch sees no CUDA GPU on this machine: use --device cpu")
    cfg.preset = cfg.preset or ("gpu" if cfg.device.startswith("cuda") else "cpu")
    cfg.dtype = cfg.dtype or ("bfloat16" if cfg.device.startswith("cuda") else "float32")
    for k, v in PRESETS.get(cfg.preset, {}).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    for k, (ok, words) in VALID.items():
        v = getattr(cfg, k)
        if v is not None and not ok(v):
            raise ValueError(f"--{k.replace('_', '-')} {v}: must be {words}")
    if cfg.updates_per_step > cfg.prompts_per_step * cfg.group_size:
        raise ValueError("--updates-per-step cannot exceed the number of answers per step")
    if cfg.min_new_tokens > cfg.max_new_tokens:
        raise ValueError("--min-new-tokens cannot exceed --max-new-tokens")
    return cfg


# ================================================================ data
IMPLICIT_PROMPT = "Provide a structured comprehensive analysis and your opinions on this topic: {situation}\n\n"
EXPLICIT_PROMPT = ("Provide a multi-perspective analysis of this topic: {situation}\n"
                   "Write each sentence as one distinct perspective, in the form "
                   "'In the perspective of <name>, <explanation>'.\n\n")


def reference_answer(s):
    """The SFT target and the reward's reference: one perspective line each, then a summary.
    The authors had an LLM write the summary; ours is a fixed rule that names every perspective,
    so the summary term of the format score is satisfied by construction."""
    lines = "\n".join(reward.perspective_line(p.name, p.explanation) for p in s.perspectives)
    names = [p.name for p in s.perspectives]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    summary = (f"{s.situation.rstrip('.')} touches on {listed}. No single one of them settles the question: "
               f"a fair judgement weighs each against the others and against the people affected.")
    return f"<core perspectives>\n{lines}\n</core perspectives>\n\n<summary>\n{summary}\n</summary>"


PROMPT_STYLES = {  # implicit: what SFT and GRPO train on; explicit: the paper's baseline; the rest: never trained on
    "implicit": IMPLICIT_PROMPT, "explicit": EXPLICIT_PROMPT,
    "bare": "What do you think about: {situation}",
    "brief": "Briefly, your view on: {situation}",
    "advisor": "You are an advisor. {situation}",
}


def chat_prompt(tokenizer, situation, style="implicit"):
    """The user turn in one of PROMPT_STYLES (implicit by default), wrapped in the model's own chat template."""
    msgs = [{"role": "user", "content": PROMPT_STYLES[style].format(situation=situation)}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


# ================================================================ models: LoRA and the optimizer
def lora_config(rank):
    """The LoRA adapter of --lora-rank: every linear layer of the blocks, alpha = 2 x rank, no dropout (dropout
    would make the sampler and the learner differ). peft keeps the adapter in float32 on a bf16 model."""
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def with_lora(model, rank):
    """The model frozen, with a fresh LoRA adapter (peft) that trains instead: optimizer state for the adapter only,
    and with the adapter off (model.disable_adapter()) the model is the base again, so the reference needs no copy."""
    try:
        from peft import get_peft_model
    except ImportError:
        raise ImportError("--lora-rank needs peft: pip install peft (or pip install -r requirements-extra.txt)") from None
    return get_peft_model(model, lora_config(rank))


def adamw(model, lr, **kw):
    """AdamW with its fused kernel: one pass over the weights per step instead of several (on a 2-core CPU
    0.07 s instead of 0.61 s per step for 135M parameters; the same update up to float rounding).
    Only trainable weights (a LoRA adapter, or all). bfloat16 weights (the GPU path) get float32 master copies:
    see MasterAdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, lr=lr, fused=True, **kw)
    return MasterAdamW(params, lr=lr, fused=True, **kw)


class MasterAdamW(torch.optim.AdamW):
    """AdamW on float32 master copies of low-precision weights. bfloat16 keeps 8 significant bits, so near 0.02 its
    spacing is 1.2e-4 and a step of lr 1e-6 rounds back to the same weight: plain AdamW at the paper's lr leaves 98 %
    of N(0, 0.02) bf16 weights unchanged after 10 steps. The masters add up the small steps; the bf16 weights that
    generate and run the forward are rounded from them after every step. Cost: 4 more bytes per parameter."""
    def __init__(self, params, **kw):
        self.low = list(params)
        super().__init__([p.detach().float() for p in self.low], **kw)
        self.master = self.param_groups[0]["params"]                 # the float32 copies AdamW steps on

    @torch.no_grad()
    def step(self, closure=None):
        for p, m in zip(self.low, self.master):
            m.grad, p.grad = (None if p.grad is None else p.grad.float()), None   # freed as they go: peak memory
        loss = super().step(closure)
        for p, m in zip(self.low, self.master):
            p.copy_(m)
            m.grad = None
        return loss

    def zero_grad(self, set_to_none=True):
        for p in self.low:
            p.grad = None
        super().zero_grad(set_to_none)

    def state_dict(self):  # the masters too: a resumed run continues from them, not from the rounded weights
        return dict(super().state_dict(), master=list(self.master))

    def load_state_dict(self, state):  # a float32 run's state has no masters: they stay the loaded weights
        with torch.no_grad():
            for m, saved in zip(self.master, state.get("master", [])):
                m.copy_(saved)
        super().load_state_dict({k: v for k, v in state.items() if k != "master"})


# ================================================================ stage 0: SFT warm start
def sft_examples(tokenizer, items, max_len):
    """(input_ids, labels) per situation: chat prompt -> reference answer + EOS; labels -100 on the prompt."""
    out = []
    for s in items:
        prompt = tokenizer(chat_prompt(tokenizer, s.situation), add_special_tokens=False).input_ids
        answer = tokenizer(reference_answer(s), add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:max_len]
        out.append((ids, ([-100] * len(prompt) + answer)[:max_len]))
    return out


def sft_warmup(model, tokenizer, items, cfg):
    """Stage 0: plain supervised fine-tuning, cross-entropy on answer tokens only.
    Paper recipe: lr 1e-5, cosine schedule, 10 % warm-up, AdamW(0.9, 0.95), weight decay 0.01, clip 1.0."""
    from transformers import get_cosine_schedule_with_warmup
    from tqdm.auto import tqdm
    examples = sft_examples(tokenizer, items, cfg.max_prompt_len + cfg.max_new_tokens)
    steps = cfg.sft_steps if cfg.sft_steps is not None else math.ceil(len(examples) / cfg.sft_batch)
    opt = adamw(model, cfg.sft_lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, round(0.1 * steps)), steps)
    order = np.random.default_rng(cfg.seed).permutation(len(examples))
    bar = tqdm(range(steps), desc="SFT", dynamic_ncols=True)
    with training(model, cfg.gradient_checkpointing):
        for step in bar:
            batch = [examples[order[(step * cfg.sft_batch + k) % len(examples)]] for k in range(cfg.sft_batch)]
            width = max(len(ids) for ids, _ in batch)
            pad = tokenizer.pad_token_id
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])      # [b, width]
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])        # [b, width]
            attn = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
            loss = model(input_ids=input_ids.to(model.device), attention_mask=attn.to(model.device),
                         labels=labels.to(model.device)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model


# ================================================================ stage 2: GRPO
@dataclass
class Rollout:
    """G answers for each of P prompts, answers of prompt i at rows i*G .. i*G+G-1."""
    input_ids: torch.Tensor      # [P*G, L+T]  left-padded prompt, then the answer (padded after EOS)
    attention_mask: torch.Tensor # [P*G, L+T]
    answer_mask: torch.Tensor    # [P*G, T]    1 on answer tokens up to and including EOS
    texts: list                  # P*G decoded answers
    group_ids: torch.Tensor      # [P*G]       which prompt each answer answers


@torch.no_grad()
def sample_groups(model, tokenizer, prompts, group_size, max_new_tokens, temperature=1.0, top_p=1.0,
                  max_prompt_len=512, min_new_tokens=0):
    """Rollout: one batched, KV-cached `generate` call for all P*G answers (left padding)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    too_long = [i for i, n in enumerate(enc.attention_mask.sum(1).tolist()) if n > max_prompt_len]
    if too_long:  # cutting a prompt would cut the situation: reject rather than train on a half question
        raise ValueError(f"prompt {too_long[0]} has {int(enc.attention_mask[too_long[0]].sum())} tokens, "
                         f"over --max-prompt-len {max_prompt_len}; raise it or shorten the situation")
    ids = enc.input_ids.repeat_interleave(group_size, 0).to(model.device)                 # [P*G, L]
    attn = enc.attention_mask.repeat_interleave(group_size, 0).to(model.device)           # [P*G, L]
    vocab, eos = len(tokenizer), _eos_ids(model, tokenizer)
    extra = model.get_output_embeddings().weight.shape[0] - vocab  # Qwen pads its output layer
    gen = sampling_config(temperature, top_p, max_new_tokens, min_new_tokens, tokenizer.pad_token_id, eos,
                          suppress=list(range(vocab, vocab + extra)) if extra > 0 else None)
    with own_sampling_only(model):
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)
    answers = out[:, ids.shape[1]:]                                                       # [P*G, T]
    is_eos = torch.isin(answers, torch.tensor(eos, device=answers.device))
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    answer_mask = (~after_eos).long()                                                     # [P*G, T]
    group_ids = torch.arange(len(prompts)).repeat_interleave(group_size)
    texts = tokenizer.batch_decode(answers * answer_mask + tokenizer.pad_token_id * (1 - answer_mask),
                                   skip_special_tokens=True)
    return Rollout(out, torch.cat([attn, answer_mask], 1), answer_mask, texts, group_ids)


def sampling_config(temperature, top_p, max_new_tokens, min_new_tokens, pad_id, eos_ids, suppress=None):
    """The sampler is pi(. | q, a_<t) at `temperature`, cut to its top_p nucleus, and nothing else: that is the
    distribution token_logprobs scores (top_p = 1: exactly). top_k 0 is off."""
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, pad_token_id=pad_id,
                            eos_token_id=eos_ids, suppress_tokens=suppress)


@contextlib.contextmanager
def own_sampling_only(model):
    """generate() fills every field our config leaves unset from the model's generation_config.json, e.g.
    Qwen2.5-Instruct's repetition_penalty 1.05, which would make the samples come from another distribution than
    the one the learner scores. For the call, the model's own generation config is a blank one."""
    from transformers import GenerationConfig
    base = model.get_base_model() if hasattr(model, "get_base_model") else model   # a peft model generates with it
    saved, base.generation_config = base.generation_config, GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


def _eos_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return sorted(e for e in eos if e is not None)


def group_advantages(rewards, group_size, eps=1e-6):
    """A_i = (r_i - mean(r_g)) / (std(r_g) + eps) over each group g of G answers to one prompt.
    std is the population std (divide by G): it is defined for any G >= 2 and matches the recipe's
    numpy-style std; the sample std (G - 1) would only rescale all advantages of a group by a constant.
    A group whose answers all score the same has no signal and gets A = 0.
    Example: rewards [1, 0, 0, 0] -> mean 0.25, std 0.433 -> A = [1.732, -0.577, -0.577, -0.577]."""
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, group_size)               # [P, G]
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + eps) # [P, G]
    return adv.view(-1)                                                                  # [P*G]


def token_logprobs(model, input_ids, attention_mask, answer_len, temperature=1.0, micro_batch=8, vocab=None,
                   entropy=False):
    """log pi(a_t | q, a_<t) of the answer tokens (the last `answer_len` columns), in float32,
    at the sampling temperature. Full-vocabulary logits are computed only for answer positions
    (logits_to_keep) and turned to float32 one row at a time, never for the whole batch.
    entropy=True also returns H_t = -sum_v pi(v) log pi(v) of each position's distribution (a diagnostic, no grad)."""
    pos = (attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    rows, ents = [], []
    for i in range(0, input_ids.shape[0], micro_batch):
        sl = slice(i, i + micro_batch)
        logits = model(input_ids=input_ids[sl], attention_mask=attention_mask[sl], position_ids=pos[sl],
                       logits_to_keep=answer_len + 1).logits[:, :-1]                   # [mb, T, V']
        if vocab is not None:
            logits = logits[..., :vocab]  # ids past the tokenizer are never sampled, never scored
        targets = input_ids[sl, -answer_len:]                                            # [mb, T]
        for row, tgt in zip(logits, targets):
            row = row.float() / temperature                                               # [T, V]
            lse = row.logsumexp(1)                                                        # [T]
            rows.append(row.gather(1, tgt[:, None]).squeeze(1) - lse)                    # [T]
            if entropy:  # H = logsumexp(z) - sum_v p_v z_v, 64 positions at a time: no [T, V] copy at the peak
                with torch.no_grad():
                    ents.append(torch.cat([c.logsumexp(1) - (c.softmax(1) * c).sum(1) for c in row.split(64)]))
    return (torch.stack(rows), torch.stack(ents)) if entropy else torch.stack(rows)       # [B, T]


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, beta=0.001, dual_clip=3.0,
              num_tokens=None):
    """Per-token GRPO objective (DeepSeekMath eq. 3), token-mean over the batch:
        ratio_t = exp(logp_t - old_t)
        pg_t    = -min(ratio_t A, clip(ratio_t, 1-e, 1+e) A)        (for A < 0 capped at -c A: dual clip)
        kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1         (k3 estimator, >= 0)
        loss    = sum_t mask_t (pg_t + beta kl_t) / num_tokens
    Token-mean (not a mean per answer) keeps long answers from being down-weighted per token.
    num_tokens defaults to mask.sum(); pass the mini-batch total when accumulating micro-batches.
    Example: A = 1, ratio 1.5, e = 0.2 -> pg = -min(1.5, 1.2) = -1.2 and the clipped branch has no gradient.
    Shapes: logp, old_logp, ref_logp, mask [B, T]; advantages [B]. ref_logp may be None (beta = 0)."""
    mask = mask.float()
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    A = advantages[:, None]                                                              # [B, 1]
    ratio = torch.exp((logp - old_logp).clamp(-20, 20))                                 # [B, T]
    pg = -torch.min(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps) * A)              # [B, T]
    if dual_clip:
        pg = torch.where(A < 0, torch.min(pg, -dual_clip * A), pg)
    if ref_logp is not None and beta:
        delta = (ref_logp - logp).clamp(-20, 20)  # clamp before exp: one rare token must not overflow
        kl = torch.exp(delta) - delta - 1                                                # [B, T]
    else:
        kl = torch.zeros_like(logp)
    loss = ((pg + beta * kl) * mask).sum() / num_tokens
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = (((ratio > 1 + clip_eps) & (A > 0)) | ((ratio < 1 - clip_eps) & (A < 0))).float()  # clip active
        stats = dict(kl=(kl * mask).sum().item() / n.item(), clip_frac=(clipped * mask).sum().item() / n.item(),
                     ratio=(ratio * mask).sum().item() / n.item())
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
            out = token_logprobs(model, roll.input_ids[micro], roll.attention_mask[micro], T, cfg.temperature,
                                 cfg.micro_batch, vocab, entropy=u == 0)  # entropy: of the sampler's policy only
            logp, ent = out if u == 0 else (out, None)                                    # [mb, T] each
            t_forward += clock(model) - t0
            old = logp.detach() if old_logp is None else old_logp[micro]  # one update: ratio = 1, no extra forward
            ref = None if ref_logp is None else ref_logp[micro]
            loss, s = grpo_loss(logp, old, ref, adv[micro].to(logp.device), roll.answer_mask[micro],
                                cfg.clip_eps, cfg.beta, cfg.dual_clip, num_tokens)
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
            stats.append(dict(s, loss=total, grad_norm=float("nan"), skipped=1, t_forward=t_forward))
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        stats.append(dict(s, loss=total, grad_norm=grad_norm, skipped=0, t_forward=t_forward))
    return stats


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


def clock(model):
    """time.perf_counter() after the GPU has finished its queued work, so phase timings are true."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


def op_reward_fn(embedder, cfg):
    """The OP reward of reward.py as the loop's reward function: (rollout, situations) -> (rewards, means)."""
    def fn(roll, items):
        parts = reward.score_answers(roll.texts, [reference_answer(s) for s in items], embedder,
                                     situations=[s.situation for s in items], mask_keywords=cfg.mask_keywords,
                                     min_perspectives=cfg.min_perspectives, coverage_threshold=cfg.coverage_threshold)
        means = {k: float(np.mean([getattr(p, k) for p in parts])) for k in ("coverage", "rate", "uniqueness",
                                                                                 "format", "tag")}
        return [p.total for p in parts], means
    return fn


def prompts_for_step(n_items, step, per_step, seed):
    """Indices of the situations of one step: a fresh seeded permutation each epoch, so the data
    order depends only on (seed, step) and a resumed run sees exactly what a straight run sees."""
    idx = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, n_items)
        idx.append(int(np.random.default_rng([seed, epoch]).permutation(n_items)[i]))
    return idx


# ================================================================ the training loop
def grpo_train(model, tokenizer, items, reward_fn, cfg, ref_model=None, optimizer=None, start_step=0, out=None):
    """Stage 2. Each step: rollout -> reward -> group advantages -> log-probs -> mini-batch updates.
    Returns the list of per-step metric rows (also appended to out/metrics.jsonl when `out` is set)."""
    from tqdm.auto import tqdm
    optimizer = optimizer or adamw(model, cfg.lr, weight_decay=cfg.weight_decay)
    vocab, G = len(tokenizer), cfg.group_size
    rows, bad_steps = [], 0
    bar = tqdm(range(start_step, cfg.steps), desc="GRPO", dynamic_ncols=True, initial=start_step, total=cfg.steps)
    with StopAfterStep() as stop:
        for step in bar:
            t0 = clock(model)
            # ---- rollout: G answers per prompt
            batch = [items[i] for i in prompts_for_step(len(items), step, cfg.prompts_per_step, cfg.seed)]
            model.eval()
            roll = sample_groups(model, tokenizer, [chat_prompt(tokenizer, s.situation) for s in batch], G,
                                 cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.max_prompt_len,
                                 cfg.min_new_tokens)
            assert roll.group_ids.tolist() == [i // G for i in range(len(batch) * G)], "answers left their group"
            t1 = clock(model)
            # ---- reward and group-normalised advantages
            rewards, means = reward_fn(roll, [batch[g] for g in roll.group_ids.tolist()])
            adv = group_advantages(rewards, G, cfg.adv_eps)                                # [P*G]
            r = torch.tensor(rewards).view(-1, G)                                          # [P, G]
            zero_spread = float((r.max(1).values == r.min(1).values).float().mean())  # groups with no signal
            t2 = clock(model)
            # ---- log-probs of the sampler (only needed when several updates share one batch) and reference
            T = roll.answer_mask.shape[1]
            with torch.no_grad():
                old_logp = None if cfg.updates_per_step == 1 else token_logprobs(
                    model, roll.input_ids, roll.attention_mask, T, cfg.temperature, cfg.micro_batch, vocab)
                t_old = clock(model)
                with ref_model.disable_adapter() if ref_model is model else contextlib.nullcontext():
                    ref_logp = None if ref_model is None or not cfg.beta else token_logprobs(  # LoRA: adapter off
                        ref_model, roll.input_ids, roll.attention_mask, T, cfg.temperature, cfg.micro_batch, vocab)
            t3 = clock(model)
            # ---- update (gradient checkpointing, when on, only here: generation needs its KV cache)
            with training(model, cfg.gradient_checkpointing):
                upd = grpo_update(model, optimizer, roll, adv, old_logp, ref_logp, cfg, vocab)
            t4 = clock(model)
            # ---- log
            skipped = sum(u["skipped"] for u in upd)
            bad_steps = bad_steps + 1 if skipped == len(upd) else 0
            row = dict(step=step + 1, reward=float(np.mean(rewards)), reward_std=float(np.std(rewards)), **means,
                       zero_spread=zero_spread, entropy=upd[0]["entropy"],  # first update: the sampler's policy
                       **{k: float(np.nanmean([u[k] for u in upd])) for k in ("kl", "clip_frac", "ratio", "loss",
                                                                               "grad_norm")},
                       skipped_updates=skipped, answer_len=float(roll.answer_mask.sum(1).float().mean()),
                       t_generate=t1 - t0, t_reward=t2 - t1, t_logprob=t3 - t2, t_logprob_old=t_old - t2,
                       t_logprob_ref=t3 - t_old, t_update=t4 - t3, t_update_forward=sum(u["t_forward"] for u in upd),
                       t_step=t4 - t0)
            rows.append(row)
            bar.set_postfix(R=f"{row['reward']:.2f}", cov=f"{row['coverage']:.2f}" if "coverage" in row else "-",
                            uniq=f"{row['uniqueness']:.2f}" if "uniqueness" in row else "-", kl=f"{row['kl']:.4f}",
                            zero=f"{zero_spread:.2f}", H=f"{row['entropy']:.2f}",
                            clip=f"{row['clip_frac']:.2f}", len=f"{row['answer_len']:.0f}", s=f"{row['t_step']:.1f}")
            if out:
                with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                if cfg.save_every and (step + 1) % cfg.save_every == 0:
                    save_checkpoint(out, model, tokenizer, optimizer, step + 1, cfg)
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                tqdm.write(f"--- step {step + 1}, {batch[0].situation!r}, reward {rewards[0]:.2f}:\n{roll.texts[0]}\n")
            if bad_steps >= 3:
                raise RuntimeError("the loss was not finite in 3 steps in a row: lower --lr (or raise --beta); "
                                   f"the last good checkpoint is in {out}")
            if stop.requested:
                break
    done = start_step + len(rows)
    if out and (not cfg.save_every or done % cfg.save_every):
        save_checkpoint(out, model, tokenizer, optimizer, done, cfg)
    if stop.requested:
        print(f"\ninterrupted: checkpoint of step {done} saved; continue with --resume {out}", file=sys.stderr)
        raise KeyboardInterrupt
    return rows


# ================================================================ main
RESUMABLE = ("steps", "save_every", "sample_every")  # the knobs a resume may change: they extend or report a run


def train(cfg):
    """The whole job: load data and models, SFT warm start, frozen reference, GRPO; or resume it."""
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume)
        state, tensors = load_trainer_state(ckpt, Config)
        cfg = resumed_config(cfg, state["config"], RESUMABLE)
    cfg = resolve_config(cfg)
    items = load_situations(cfg.train_data)               # every input is checked before anything is written
    check_model_path(cfg.model, "--model"), check_model_path(cfg.sim_model, "--sim-model")
    check_out_dir(cfg.out)
    print("config:", json.dumps(dataclasses.asdict(cfg), indent=1))
    write_text(os.path.join(cfg.out, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)

    # ---- data and models
    embedder = reward.load_embedder(cfg.sim_model, device=cfg.device)
    sft_dir, metrics = os.path.join(cfg.out, "sft"), os.path.join(cfg.out, "metrics.jsonl")
    start_src = sft_dir if os.path.isdir(sft_dir) else cfg.model       # the policy at the start of RL
    if cfg.resume and cfg.lora_rank:  # the checkpoint holds the adapter; the frozen base is the start of RL
        from peft import PeftModel
        base, tok = load_policy(start_src, cfg.device, getattr(torch, cfg.dtype), cfg.trust_remote_code)
        model = PeftModel.from_pretrained(base, ckpt, is_trainable=True)
    elif cfg.resume:
        model, tok = load_policy(ckpt, cfg.device, getattr(torch, cfg.dtype), cfg.trust_remote_code)
    else:
        model, tok = load_policy(cfg.model, cfg.device, getattr(torch, cfg.dtype), cfg.trust_remote_code)
        if cfg.sft_steps != 0:  # ---- stage 0: SFT warm start, kept as its own checkpoint (the paper's SFT row)
            model = with_lora(model, cfg.lora_rank) if cfg.lora_rank else model
            with oom_hint("--sft-batch"):
                sft_warmup(model, tok, items, cfg)
            model = model.merge_and_unload() if cfg.lora_rank else model  # sft/ is a plain model either way
            atomic_save(sft_dir, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
        model = with_lora(model, cfg.lora_rank) if cfg.lora_rank else model
    ref = None
    if cfg.beta:  # reference = the frozen policy at the start of RL; with LoRA, the policy with its adapter off
        if cfg.lora_rank:
            ref = model
        elif cfg.resume:
            ref = load_policy(start_src, cfg.device, getattr(torch, cfg.dtype), cfg.trust_remote_code)[0]
        else:
            import copy
            ref = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = adamw(model, cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if cfg.resume:
        optimizer.load_state_dict(tensors["optimizer"])
        set_rng_state(state["rng"], tensors)
        start = state["step"]
        write_text(metrics, "".join(rows_up_to(metrics, start)))
        print(f"resumed from {cfg.out} at step {start}")
    else:
        write_text(metrics, "")

    # ---- stage 2: GRPO
    with oom_hint("--micro-batch first, then --group-size, --max-new-tokens or --prompts-per-step"):
        grpo_train(model, tok, items, op_reward_fn(embedder, cfg), cfg, ref, optimizer, start, cfg.out)
    rows = [json.loads(line) for line in open(metrics, encoding="utf-8")]
    if rows:
        plot_rewards(cfg.out, rows)
        q = max(1, len(rows) // 4)
        print(f"mean reward: first quarter {np.mean([r['reward'] for r in rows[:q]]):.3f}, "
              f"last quarter {np.mean([r['reward'] for r in rows[-q:]]):.3f}; outputs in {cfg.out}")
    return rows


def parse_args(argv=None):
    """Config fields as --flags (the comment beside a field is its help); only the flags given are recorded."""
    return dataclass_args(Config, VALID, argv, __doc__)


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
