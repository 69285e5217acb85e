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
import copy
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
from harness.cli import StopAfterStep, check_ranges, dataclass_args, oom_hint, run_cli
from harness.data import check_prompts, load_situations
from harness.models import (
    check_device,
    check_model_path,
    load_embedder,
    load_policy,
    model_fingerprint,
)
from harness.report import plot_rewards
from harness.runs import (
    atomic_save,
    claim_out_dir,
    fingerprints,
    lock_run_folder,
    no_run_above,
    save_checkpoint,
    write_text,
)

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
    coverage_threshold: float = None  # cosine that covers one (paper 0.70) | -1 <= v <= 1
    # -- logging
    sample_every: int = 5  # print one sampled answer every N steps (0: never) | v >= 0
    save_every: int = 10  # checkpoint every N steps, at the end, on Ctrl-C | v >= 0


RANGES = {  # what resolve_config accepts (the comments above say the same); NaN and inf never
    "seed": lambda v: 0 <= v < 2**32,
    "preset": lambda v: v in ("cpu", "gpu"),
    "dtype": lambda v: v in ("bfloat16", "float32"),
    "sft_steps": lambda v: v >= 0,
    "sft_batch": lambda v: v >= 1,
    "sft_lr": lambda v: 0 < v < 1,
    "steps": lambda v: v >= 1,
    "prompts_per_step": lambda v: v >= 1,
    "group_size": lambda v: v >= 2,
    "max_new_tokens": lambda v: v >= 1,
    "max_prompt_len": lambda v: v >= 1,
    "temperature": lambda v: v > 0,
    "top_p": lambda v: 0 < v <= 1,
    "lr": lambda v: 0 < v < 1,
    "weight_decay": lambda v: v >= 0,
    "grad_clip": lambda v: v > 0,
    "clip_eps": lambda v: 0 < v < 1,
    "dual_clip": lambda v: v == 0 or v > 1,
    "beta": lambda v: v >= 0,
    "adv_eps": lambda v: v > 0,
    "updates_per_step": lambda v: v >= 1,
    "micro_batch": lambda v: v >= 1,
    "gradient_checkpointing": lambda v: v in (0, 1),
    "lora_rank": lambda v: v >= 0,
    "mask_keywords": lambda v: v in reward.MASK_MODES,
    "min_perspectives": lambda v: v >= 0,
    "coverage_threshold": lambda v: -1 <= v <= 1,
    "sample_every": lambda v: v >= 0,
    "save_every": lambda v: v >= 0,
}

PRESETS = {  # knob: (cpu, gpu), what a knob left at None above takes; the gpu preset is the paper's recipe
    "sft_steps": (12, None),  # None: one epoch; on 2 CPU cores that alone takes longer than the run
    "sft_lr": (1e-4, 1e-5),
    "steps": (16, 150),  # the cpu run takes about 11 min on 2 cores
    "prompts_per_step": (2, 8),
    "group_size": (4, 10),
    "max_new_tokens": (128, 800),
    "lr": (5e-6, 1e-6),
    "micro_batch": (8, 8),
    "gradient_checkpointing": (0, 1),
    # a 135M policy seldom reaches the paper's 0.70 against the untuned MiniLM (coverage 0 in most steps); 0.455 is
    # where MiniLM best separates the training paraphrase pairs from other pairs: a deviation (docs/training.md)
    "coverage_threshold": (0.455, reward.COVERAGE_THRESHOLD),
}


def preset(name):
    """{knob: value} of the 'cpu' or 'gpu' preset."""
    return {k: v[("cpu", "gpu").index(name)] for k, v in PRESETS.items()}


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
    one_epoch = math.ceil(len(examples) / cfg.sft_batch)
    steps = one_epoch if cfg.sft_steps is None else cfg.sft_steps
    opt = adamw(model, cfg.sft_lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, round(0.1 * steps)), steps)
    order = np.random.default_rng(cfg.seed).permutation(len(examples))
    pad = tokenizer.pad_token_id
    bar = tqdm(range(steps), desc="SFT", dynamic_ncols=True)
    with training(model, cfg.gradient_checkpointing):
        for step in bar:
            picks = range(step * cfg.sft_batch, (step + 1) * cfg.sft_batch)
            batch = [examples[order[k % len(examples)]] for k in picks]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.tensor(
                [ids + [pad] * (width - len(ids)) for ids, _ in batch]
            )  # [b, w]
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])  # [b, w]
            attn = (torch.arange(width) < torch.tensor([[len(ids)] for ids, _ in batch])).long()
            loss = model(
                input_ids=input_ids.to(model.device),
                attention_mask=attn.to(model.device),
                labels=labels.to(model.device),
            ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
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


def next_token_logprobs(logits, temperature=1.0, vocab=None):
    """log pi(. | q, a_<t) = log softmax(logits / temperature), over the first `vocab` logits (None: all; an output
    layer padded past the tokenizer, as Qwen's is, has ids that are never drawn and never scored). The one
    definition of the policy's next-token distribution: sample_groups draws from it, token_logprobs scores with it.
    logits [..., V'] -> float32 [..., V]. Example: logits [0, ln 2, ln 4] at temperature 1 -> probabilities
    [1/7, 2/7, 4/7]; at temperature 0.5 -> [1/21, 4/21, 16/21]."""
    return (logits[..., :vocab].float() / temperature).log_softmax(-1)


def nucleus(probs, top_p):
    """The top-p cut (Holtzman et al. 2020): keep the most likely tokens until their mass reaches top_p, i.e. each
    token whose more likely tokens hold less than top_p, and renormalise; top_p = 1 keeps every token, exactly.
    probs [N, V] -> [N, V]. Example: [1/7, 2/7, 4/7] at top_p 0.8 -> [0, 1/3, 2/3] (4/7 < 0.8 <= 6/7)."""
    if top_p >= 1:
        return probs
    ranked, order = probs.sort(-1, descending=True)  # [N, V] each
    before = ranked.cumsum(-1) - ranked  # mass of the tokens ranked above each one
    kept = torch.zeros_like(probs).scatter(-1, order, ranked * (before < top_p))
    return kept / kept.sum(-1, keepdim=True)


def eos_ids(model, tokenizer):
    """Every id that ends an answer: the generation config's EOS ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return sorted(e for e in eos if e is not None)


def positions(attention_mask):
    """Position ids that count real tokens only (left padding changes nothing): cumsum(mask) - 1, at least 0."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def sample_groups(
    model, tokenizer, prompts, group_size, max_new_tokens, temperature=1.0, top_p=1.0
):
    """Rollout: G answers to each of P prompts, drawn token by token from next_token_logprobs at `temperature`,
    cut to its top_p nucleus, and from nothing else (no top-k, no repetition penalty, nothing of the model's own
    generation config): the distribution token_logprobs scores, exactly when top_p = 1.
    Each prompt goes through the model once (prefill); its KV cache and next-token logits are copied to its G
    answers, which then decode one token per forward. An answer that has drawn an EOS only pads from then on; the
    loop ends when every answer has, or after max_new_tokens. Prompts are left-padded (check_prompts has made
    sure none is too long)."""
    from transformers import DynamicCache

    P, G, dev = len(prompts), group_size, model.device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, attn = enc.input_ids.to(dev), enc.attention_mask.to(dev)  # [P, L] each
    eos = torch.tensor(eos_ids(model, tokenizer), device=dev)
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    # ---- prefill: each prompt once, then its cache and logits go to each of its G answers
    cache = DynamicCache(config=model.config)
    out = model(
        ids, attention_mask=attn, position_ids=positions(attn), cache=cache, logits_to_keep=1
    )
    cache.batch_repeat_interleave(G)
    logits = out.logits[:, -1].repeat_interleave(G, 0)  # [P*G, V']
    attn = attn.repeat_interleave(G, 0)  # [P*G, L]
    # ---- decode
    tokens, done = [], torch.zeros(P * G, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        probs = nucleus(next_token_logprobs(logits, temperature, vocab).exp(), top_p)  # [P*G, V]
        token = torch.multinomial(probs, 1).squeeze(1).masked_fill(done, pad)  # [P*G]
        tokens.append(token)
        done |= torch.isin(token, eos)
        if done.all() or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, attn.new_ones(P * G, 1)], 1)  # [P*G, L+t+1]
        out = model(
            token[:, None], attention_mask=attn, position_ids=positions(attn)[:, -1:], cache=cache
        )
        logits = out.logits[:, -1]  # [P*G, V']
    answers = torch.stack(tokens, 1)  # [P*G, T]
    is_eos = torch.isin(answers, eos).long()
    # 1 on answer tokens up to and including the first EOS, 0 on what follows it
    answer_mask = 1 - ((is_eos.cumsum(1) - is_eos) > 0).long()  # [P*G, T]
    texts = tokenizer.batch_decode(
        answers * answer_mask + pad * (1 - answer_mask), skip_special_tokens=True
    )
    prompt_ids = ids.repeat_interleave(G, 0)  # [P*G, L]
    input_ids = torch.cat([prompt_ids, answers], 1)  # [P*G, L+T]
    attention_mask = torch.cat([attn[:, : ids.shape[1]], answer_mask], 1)  # [P*G, L+T]
    return Rollout(
        input_ids, attention_mask, answer_mask, texts, torch.arange(P).repeat_interleave(G)
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


def answer_logits(model, input_ids, attention_mask, answer_len, share_prompts=True):
    """The logits that score the answer tokens, the last T = answer_len columns of input_ids [B, L+T]: [B, T, V'],
    the logits of token t taken at the position before it. Answers to the same prompt share it: the prompt goes
    through the model once, its KV cache is copied to each of its answers, and only answer tokens run after it
    (the same numbers as a forward of every row, up to float rounding; G times less prompt work). Under gradient
    checkpointing (or with share_prompts False) every row runs whole: recomputing a layer would write into the
    shared cache a second time."""
    from transformers import DynamicCache

    T = answer_len
    L = input_ids.shape[1] - T
    pos = positions(attention_mask)  # [B, L+T]
    kind = "activation" if hasattr(model, "is_activation_checkpointing") else "gradient"
    if not share_prompts or getattr(model, f"is_{kind}_checkpointing", False) and model.training:
        out = model(
            input_ids, attention_mask=attention_mask, position_ids=pos, logits_to_keep=T + 1
        )
        return out.logits[:, :-1]  # [B, T, V']
    prompt = torch.cat([input_ids[:, :L], attention_mask[:, :L]], 1)  # [B, 2L]: tokens and mask
    prompts, which = prompt.unique(dim=0, return_inverse=True)  # [p, 2L], [B]: each row's prompt
    cache = DynamicCache(config=model.config)
    first = model(
        prompts[:, :L],
        attention_mask=prompts[:, L:],
        position_ids=positions(prompts[:, L:]),
        cache=cache,
        logits_to_keep=1,
    ).logits  # [p, 1, V']: the logits of the first answer token
    cache.batch_select_indices(which)
    rest = model(
        input_ids[:, L:],
        attention_mask=attention_mask,
        position_ids=pos[:, L:],
        cache=cache,
        logits_to_keep=T,
    ).logits  # [B, T, V']: the last position scores no answer token
    return torch.cat([first[which], rest[:, :-1]], 1)  # [B, T, V']


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
    pi is next_token_logprobs: softmax(logits / temperature) over the first `vocab` logits (None: all), the logits
    of token t taken at the position before it (answer_logits); position ids count real tokens only
    (cumsum(attention_mask) - 1, at least 0), so left padding changes nothing. Rows go through the model micro_batch
    at a time; full-vocabulary logits are computed only for answer positions and turned to float32 one row at a
    time, never for the whole batch.
    entropy=True returns (logp, H), H [B, T] = -sum_v pi(v) log pi(v) of each position's distribution (no grad)."""
    rows, ents = [], []
    for i in range(0, input_ids.shape[0], micro_batch):
        sl = slice(i, i + micro_batch)
        logits = answer_logits(model, input_ids[sl], attention_mask[sl], answer_len)  # [mb, T, V']
        for row, target in zip(logits, input_ids[sl, -answer_len:]):
            logp = next_token_logprobs(row, temperature, vocab)  # [T, V]
            rows.append(logp.gather(1, target[:, None]).squeeze(1))  # [T]
            if entropy:  # 64 positions at a time: no second [T, V] copy at the peak
                with torch.no_grad():
                    ents.append(
                        torch.cat([torch.special.entr(c.exp()).sum(1) for c in logp.split(64)])
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
            ids, attn, mask = (
                roll.input_ids[micro],
                roll.attention_mask[micro],
                roll.answer_mask[micro],
            )
            t0 = clock(model)
            # the entropy is that of the sampler's policy: measured in the first update only
            out = token_logprobs(
                model, ids, attn, T, cfg.temperature, cfg.micro_batch, vocab, u == 0
            )
            logp, ent = out if u == 0 else (out, None)  # [mb, T] each
            t_forward += clock(model) - t0
            # one update: the sampler is the policy itself, ratio = 1, and no forward is needed for it
            old = logp.detach() if old_logp is None else old_logp[micro]
            ref = None if ref_logp is None else ref_logp[micro]
            loss, s = grpo_loss(
                logp,
                old,
                ref,
                adv[micro].to(logp.device),
                mask,
                cfg.clip_eps,
                cfg.beta,
                cfg.dual_clip,
                num_tokens,
            )
            loss.backward()
            total += loss.item()
            if ent is not None:
                s["entropy"] = ((ent * mask).sum() / mask.sum().clamp(min=1)).item()
            parts.append((s, int(mask.sum())))
        n = sum(w for _, w in parts) or 1
        s = {k: sum(p[k] * w for p, w in parts) / n for k in parts[0][0]}
        s.update(loss=total, t_forward=t_forward, skipped=int(not math.isfinite(total)))
        if s["skipped"]:
            optimizer.zero_grad(set_to_none=True)
            stats.append(dict(s, grad_norm=float("nan")))
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
        stats.append(dict(s, grad_norm=grad_norm))
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
def clock(model):
    """time.perf_counter() after the GPU has finished its queued work, so phase timings are true."""
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


@contextlib.contextmanager
def training(model, checkpointing):
    """model.train() for a block of updates, with gradient checkpointing if asked; eval mode again after it (the
    sampler needs no checkpointing). transformers 5.23 renamed gradient_checkpointing_* to activation_*."""
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


def grpo_step(model, tokenizer, batch, reward_fn, cfg, ref_model, optimizer):
    """One step of stage 2 on a batch of situations: rollout -> reward -> group advantages -> log-probs of the
    sampler and the reference -> mini-batch updates. Returns (the step's metrics, the rollout). ref_model is the
    model itself for a LoRA policy: its adapter is switched off for the reference's log-probs."""
    vocab, G = len(tokenizer), cfg.group_size
    t_start = clock(model)
    # ---- rollout: G answers per prompt
    prompts = [chat_prompt(tokenizer, s.situation) for s in batch]
    model.eval()
    roll = sample_groups(
        model, tokenizer, prompts, G, cfg.max_new_tokens, cfg.temperature, cfg.top_p
    )
    assert roll.group_ids.tolist() == [
        i // G for i in range(len(batch) * G)
    ]  # each answer in its group
    t_rollout = clock(model)
    # ---- reward and group-normalised advantages
    rewards, means = reward_fn(roll, [batch[g] for g in roll.group_ids.tolist()])
    adv = group_advantages(rewards, G, cfg.adv_eps)  # [P*G]
    r = torch.tensor(rewards).view(-1, G)  # [P, G]
    # the share of groups with no signal: all G rewards equal, so every advantage is 0
    zero_spread = float((r.max(1).values == r.min(1).values).float().mean())
    t_reward = clock(model)
    # ---- log-probs of the sampler (needed only when several updates share the batch) and of the reference
    T = roll.answer_mask.shape[1]
    scored = (roll.input_ids, roll.attention_mask, T, cfg.temperature, cfg.micro_batch, vocab)
    ref_off = ref_model.disable_adapter if ref_model is model else contextlib.nullcontext
    with torch.no_grad():
        old_logp = token_logprobs(model, *scored) if cfg.updates_per_step > 1 else None
        t_old = clock(model)
        with ref_off():
            use_ref = ref_model is not None and cfg.beta
            ref_logp = token_logprobs(ref_model, *scored) if use_ref else None
    t_ref = clock(model)
    # ---- update (gradient checkpointing, when on, only here)
    with training(model, cfg.gradient_checkpointing):
        upd = grpo_update(model, optimizer, roll, adv, old_logp, ref_logp, cfg, vocab)
    t_update = clock(model)
    # ---- the step's metrics (the entropy is that of the sampler's policy: the first update's)
    row = dict(reward=float(np.mean(rewards)), reward_std=float(np.std(rewards)), **means)
    row.update(zero_spread=zero_spread, entropy=upd[0]["entropy"])
    for k in ("kl", "clip_frac", "ratio", "loss", "grad_norm"):
        row[k] = float(np.nanmean([u[k] for u in upd]))
    row["skipped_updates"] = sum(u["skipped"] for u in upd)
    row["answer_len"] = float(roll.answer_mask.sum(1).float().mean())
    row.update(t_generate=t_rollout - t_start, t_reward=t_reward - t_rollout)
    row.update(t_logprob=t_ref - t_reward, t_logprob_old=t_old - t_reward)
    row["t_logprob_ref"] = t_ref - t_old
    row.update(t_update=t_update - t_ref, t_update_forward=sum(u["t_forward"] for u in upd))
    row["t_step"] = t_update - t_start
    return row, roll


def grpo_train(
    model, tokenizer, items, score, cfg, ref=None, optimizer=None, start=0, out=None, prints=None
):
    """Stage 2: grpo_step for steps start .. cfg.steps - 1, each on the situations prompts_for_step picks; `score`
    is the reward function (rollout_rewards). Returns the list of per-step metric rows (also appended to out/metrics.jsonl when `out` is set; its checkpoints
    carry `prints`, the fingerprints a resume checks). Ctrl-C stops after the step in progress, with a checkpoint."""
    from tqdm.auto import tqdm

    optimizer = optimizer or adamw(model, cfg.lr, weight_decay=cfg.weight_decay)
    rows, bad_steps = [], 0
    bar = tqdm(
        range(start, cfg.steps),
        "GRPO",
        initial=start,
        total=cfg.steps,
        dynamic_ncols=True,
    )
    with StopAfterStep() as stop:
        for step in bar:
            batch = [
                items[i] for i in prompts_for_step(len(items), step, cfg.prompts_per_step, cfg.seed)
            ]
            row, roll = grpo_step(model, tokenizer, batch, score, cfg, ref, optimizer)
            rows.append(row := dict(step=step + 1, **row))
            shown = ("reward", "coverage", "uniqueness", "zero_spread", "entropy", "clip_frac")
            bar.set_postfix(
                {k: f"{row[k]:.2f}" for k in shown if k in row},
                kl=f"{row['kl']:.4f}",
                s=f"{row['t_step']:.1f}",
            )
            if out:
                with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                if cfg.save_every and (step + 1) % cfg.save_every == 0:
                    save_checkpoint(out, model, tokenizer, optimizer, step + 1, cfg, prints)
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                tqdm.write(
                    f"--- step {step + 1}, {batch[0].situation!r}, reward {row['reward']:.2f}:"
                )
                tqdm.write(roll.texts[0] + "\n")
            bad_steps = bad_steps + 1 if row["skipped_updates"] == cfg.updates_per_step else 0
            if bad_steps >= 3:
                raise RuntimeError(
                    "the loss was not finite in 3 steps in a row: lower --lr (or raise --beta); "
                    f"the last good checkpoint is in {out}"
                )
            if stop.requested:
                break
    done = start + len(rows)
    if out and (not cfg.save_every or done % cfg.save_every):
        save_checkpoint(out, model, tokenizer, optimizer, done, cfg, prints)
    if stop.requested:
        print(
            f"\ninterrupted: checkpoint of step {done} saved; continue with --resume {out}",
            file=sys.stderr,
        )
        raise KeyboardInterrupt
    return rows


# ================================================================ main: the recipe, stage by stage
RESUMABLE = (
    "steps",
    "save_every",
    "sample_every",
)  # the knobs a resume may change: they extend a run
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint", "sft")  # what makes a folder hold a run
RUN_MARKS = (
    "fingerprints.json",
    "metrics.jsonl",
    "checkpoint/trainer_state.json",
)  # ours, not any model's


def resolve_config(cfg):
    """Fill the device, preset and the knobs the preset owns; refuse a value outside its range (NaN and inf too)."""
    cfg = dataclasses.replace(cfg)
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(cfg.device)
    cfg.preset = cfg.preset or ("gpu" if cfg.device.startswith("cuda") else "cpu")
    cfg.dtype = cfg.dtype or ("bfloat16" if cfg.device.startswith("cuda") else "float32")
    check_ranges(cfg, RANGES)  # what was given; the presets' values are in range
    for k, v in preset(cfg.preset).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    if cfg.updates_per_step > cfg.prompts_per_step * cfg.group_size:
        raise ValueError("--updates-per-step cannot exceed the number of answers per step")
    return cfg


def adapter(model, rank):
    """What trains: every weight of the model (rank 0), or a LoRA adapter of that rank on it (extras/lora.py)."""
    if not rank:
        return model
    from extras.lora import with_lora

    return with_lora(model, rank)


def frozen_reference(policy):
    """The KL reference: the policy as RL starts, frozen. A copy; for a LoRA policy the policy itself, whose adapter
    grpo_train switches off for the reference's forward (the base model is that start, and nothing is copied)."""
    if hasattr(policy, "disable_adapter"):
        return policy
    return copy.deepcopy(policy).eval().requires_grad_(False)


def sft_stage(model, tokenizer, items, cfg):
    """Stage 0 and what it leaves: sft_warmup, then the model saved whole as out/sft (the paper's SFT row, the KL
    reference, and where a resume starts when no GRPO checkpoint was saved yet). With --lora-rank the warm start
    trains an adapter, merged into the model before it is saved."""
    tuned = adapter(model, cfg.lora_rank)
    with oom_hint("--sft-batch"):
        sft_warmup(tuned, tokenizer, items, cfg)
    model = tuned.merge_and_unload() if tuned is not model else model
    save = lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp))
    atomic_save(os.path.join(cfg.out, "sft"), save)
    return model


def grpo_stage(model, tokenizer, items, cfg, saved=None):
    """Stage 2 and what it leaves: GRPO from `model` (the SFT model) against its frozen copy, metrics and checkpoints
    in out/, then the reward plot. A resume passes `saved` (extras/resume.py), which puts the checkpoint's weights,
    optimizer, RNG and metrics in place: the same run from there on."""
    set_seed(cfg.seed)
    policy = adapter(model, cfg.lora_rank)
    ref = frozen_reference(policy) if cfg.beta else None
    optimizer = adamw(policy, cfg.lr, weight_decay=cfg.weight_decay)
    reference = os.path.join(cfg.out, "sft") if cfg.sft_steps != 0 else cfg.model
    prints = dict(fingerprints(cfg.train_data, tokenizer), reference=model_fingerprint(reference))
    metrics, start = os.path.join(cfg.out, "metrics.jsonl"), 0
    if saved:  # a resume: the checkpoint's weights, optimizer, RNG and metrics (extras/resume.py)
        start = saved.restore(policy, optimizer, prints)
    else:
        write_text(metrics, "")
    embedder = load_embedder(cfg.sim_model, device=cfg.device)
    rewards = rollout_rewards(embedder, cfg)
    with oom_hint("--micro-batch first, then --group-size, --max-new-tokens or --prompts-per-step"):
        grpo_train(policy, tokenizer, items, rewards, cfg, ref, optimizer, start, cfg.out, prints)
    rows = [json.loads(line) for line in open(metrics, encoding="utf-8")]
    plot_rewards(cfg.out, rows)
    q = max(1, len(rows) // 4)
    first, last = (np.mean([r["reward"] for r in part]) for part in (rows[:q], rows[-q:]))
    print(f"mean reward: first quarter {first:.3f}, last quarter {last:.3f}; outputs in {cfg.out}")
    return rows


def set_seed(seed):
    """Python's, numpy's and torch's RNG from one seed: the same seed, the same run on the CPU."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg):
    """The whole job in the paper's order: check every input, load the policy, the SFT warm start, GRPO against the
    frozen reference, the plot."""
    if cfg.resume:  # extras/resume.py continues a saved run with this recipe's stages
        from extras.resume import resume_training

        return resume_training(cfg, sys.modules[__name__])
    cfg = resolve_config(cfg)
    # ---- every input is checked before anything is written
    items = load_situations(cfg.train_data)
    check_model_path(cfg.model, "--model")
    check_model_path(cfg.sim_model, "--sim-model", tokenizer=False)
    hint = f"continue it with --resume {cfg.out}, or "
    claim_out_dir(cfg.out, RUN_FILES, cfg.overwrite, hint, dry_run=True)
    no_run_above(cfg.out, RUN_MARKS)  # an --out inside another run would break that run
    model, tok = load_policy(
        cfg.model, cfg.device, getattr(torch, cfg.dtype), cfg.trust_remote_code
    )
    check_prompts(tok, items, cfg.max_prompt_len, lambda s: chat_prompt(tok, s))
    claim_out_dir(cfg.out, RUN_FILES, cfg.overwrite, hint)
    print("config:", json.dumps(dataclasses.asdict(cfg), indent=1))
    write_text(os.path.join(cfg.out, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
    write_text(
        os.path.join(cfg.out, "fingerprints.json"), json.dumps(fingerprints(cfg.train_data, tok))
    )
    # ---- stage 0: SFT warm start; stage 2: GRPO
    set_seed(cfg.seed)
    if cfg.sft_steps != 0:
        model = sft_stage(model, tok, items, cfg)
    return grpo_stage(model, tok, items, cfg)


def parse_args(argv=None):
    """Config fields as --flags (the comment beside a field: help | range); only the flags given are recorded."""
    return dataclass_args(Config, argv, __doc__)


def main(argv=None):
    cfg = parse_args(argv)
    with lock_run_folder(
        cfg.resume or cfg.out, "--resume" if cfg.resume else "--out"
    ):  # one process per run
        return train(cfg)


if __name__ == "__main__":
    run_cli(main)
