"""Speed and memory of OP-GRPO steps, phase by phase, through the real opgrpo_min.py code path.

    python bench.py                                  # embedded SmolLM2-135M, 2 prompts x G 4 x 64 answer tokens
    python bench.py --vs-trl                         # the same steps through TRL's GRPOTrainer too (pip install trl)
    python bench.py --sweep                          # G = 2, 4, 8 x answer length 32, 64, 128: is the cost linear?
    python bench.py --shape qwen2.5-3b --random-init # one GPU, random weights of the real Qwen2.5-3B shape

Every answer is forced to exactly --max-new-tokens tokens (min = max), so every step does the same work; the first
--warmup steps of a run are not timed. Each run starts from the same weights. With --vs-trl the two implementations
alternate run by run (--rounds), so drift of the machine hits both. All figures and the environment go to --out.
"""
import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import threading
import time
import zlib
from types import SimpleNamespace

import torch

import opgrpo_min as om
import reward

SHAPES = {"qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                             intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True,
                             max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                             bos_token_id=151643, eos_token_id=151645)}
PHASES = ("t_generate", "t_reward", "t_logprob_old", "t_logprob_ref", "t_update", "t_step")


# ================================================================ models and prompts
class SyntheticTokenizer:
    """Stands in for a tokenizer when the model is random (nothing to download): every prompt becomes
    `prompt_len` ids drawn from a seed that is the prompt's CRC, and answers decode to their ids as text.
    Its vocabulary (151665, Qwen2.5's) is smaller than the model's output layer, as with the real one."""
    pad_token_id, eos_token_id, padding_side = 151643, 151645, "left"

    def __init__(self, prompt_len=512, vocab=151665):
        self.prompt_len, self.vocab = prompt_len, vocab

    def __len__(self):
        return self.vocab

    def apply_chat_template(self, msgs, **kw):
        return msgs[-1]["content"]

    def __call__(self, texts, **kw):
        texts = [texts] if isinstance(texts, str) else texts
        ids = torch.stack([torch.randint(0, self.pad_token_id, (self.prompt_len,),
                                         generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                           for t in texts])                                               # [n, prompt_len]
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))

    def batch_decode(self, ids, **kw):
        return [" ".join(map(str, row.tolist())) for row in ids]


def build_policy(args):
    """(model, tokenizer): opgrpo_min.load_policy, or random weights of a named shape (bf16 on a GPU)."""
    if not args.shape:
        return om.load_policy(args.model, args.device)
    from transformers import AutoModelForCausalLM, Qwen2Config
    shape = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=dtype, attn_implementation="sdpa")
    return model.eval(), SyntheticTokenizer(args.prompt_len)


class PeakMemory:
    """Peak memory (GB) of a block: torch.cuda.max_memory_allocated on a GPU, else the process's resident set
    sampled every 5 ms (the lifetime peak of ru_maxrss would mix runs that share the process)."""
    def __init__(self, device):
        self.cuda, self.peak = str(device).startswith("cuda"), 0.0

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9

    def _watch(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self):
        gc.collect()  # what earlier runs left must not count: free it, and hand freed heap back to the OS
        if self.cuda:
            torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            except OSError:
                pass
            self.done, self.peak = threading.Event(), self._rss()
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() / 1e9
        else:
            self.done.set(), self.thread.join()


# ================================================================ the two implementations
def bench_config(args, steps):
    return om.resolve_config(om.Config(
        device=args.device, steps=steps, prompts_per_step=args.prompts, group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, beta=args.beta, lr=args.lr,
        updates_per_step=args.updates_per_step, micro_batch=args.micro_batch, max_prompt_len=10 ** 6,
        gradient_checkpointing=args.gradient_checkpointing, sft_steps=0, sample_every=0, save_every=0, seed=0))


def run_ours(make_model, tok, items, embedder, args):
    """warmup + steps steps of opgrpo_min.grpo_train (reference = frozen copy, as in train()); per-step rows."""
    cfg = bench_config(args, args.warmup + args.steps)
    with PeakMemory(args.device) as mem:
        model = make_model()
        ref = copy.deepcopy(model).requires_grad_(False) if cfg.beta else None  # beta = 0: no reference at all
        rows = om.grpo_train(model, tok, items, om.op_reward_fn(embedder, cfg), cfg, ref)
    return dict(rows=rows[args.warmup:], peak_gb=mem.peak)


def run_trl(make_model, tok, items, embedder, args):
    """The same steps through TRL's GRPOTrainer: same weights, prompts (already in the chat template), G, answer
    length, beta, clip, lr, weight decay and reward; TRL's per-device batch counts answers (P x G), and one
    optimizer step per generation batch matches --updates-per-step 1. Its other defaults stay (they are what a
    TRL user gets; gradient checkpointing, bf16 off on CPU). Phases: generate and the reward are timed by
    wrapping them, log-probs by timing TRL's log-prob function (no grad: old/ref, grad: update)."""
    import tempfile
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    if args.updates_per_step != 1:
        raise SystemExit("--vs-trl compares one update per batch: use --updates-per-step 1")
    P, G, T, n = args.prompts, args.group_size, args.max_new_tokens, args.warmup + args.steps
    order = [i for step in range(n) for i in om.prompts_for_step(len(items), step, P, 0)]  # ours' prompt order
    data = Dataset.from_dict(dict(prompt=[om.chat_prompt(tok, items[i].situation) for i in order],
                                  reference=[om.reference_answer(items[i]) for i in order],
                                  situation=[items[i].situation for i in order]))
    clock = dict(generate=0.0, reward=0.0, logprob=0.0, forward=0.0)
    ours = bench_config(args, n)
    score = reward.OPReward(embedder, ours.mask_keywords, ours.min_perspectives)  # ours' reward, TRL's interface

    def op_reward(**kw):
        t0 = time.perf_counter()
        out = score(**kw)
        clock["reward"] += time.perf_counter() - t0
        return out

    class Timed(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, *a, **kw):
            t0 = time.perf_counter()
            out = super()._get_per_token_logps_and_entropies(*a, **kw)
            clock["forward" if torch.is_grad_enabled() else "logprob"] += time.perf_counter() - t0
            return out

    rows = []

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.t0 = time.perf_counter()
            clock.update(dict.fromkeys(clock, 0.0))

        def on_step_end(self, *a, **kw):
            t = time.perf_counter() - self.t0
            rows.append(dict(t_generate=clock["generate"], t_reward=clock["reward"], t_logprob=clock["logprob"],
                             t_update=t - clock["generate"] - clock["reward"] - clock["logprob"],
                             t_update_forward=clock["forward"], t_step=t))

    model = make_model()
    generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        clock["generate"] += time.perf_counter() - t0
        return out
    model.generate = timed_generate
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(output_dir=tmp, max_steps=n, per_device_train_batch_size=P * G, num_generations=G,
                         gradient_accumulation_steps=1, num_iterations=1, max_completion_length=T,
                         generation_kwargs=dict(min_new_tokens=T, top_k=0), temperature=1.0, top_p=1.0,
                         beta=args.beta, epsilon=0.2, learning_rate=args.lr, weight_decay=0.01,
                         lr_scheduler_type="constant", shuffle_dataset=False, bf16=False,
                         use_cpu=not args.device.startswith("cuda"), report_to="none", save_strategy="no",
                         logging_steps=1, seed=0, disable_tqdm=True)
        trainer = Timed(model=model, reward_funcs=op_reward, args=cfg, train_dataset=data, processing_class=tok,
                        callbacks=[Steps()])
        with PeakMemory(args.device) as mem:
            trainer.train()
    settings = {k: getattr(cfg, k) for k in ("gradient_checkpointing", "loss_type", "bf16", "scale_rewards")
                if hasattr(cfg, k)}
    return dict(rows=rows[args.warmup:], peak_gb=mem.peak, settings=settings)


# ================================================================ floors and summaries
def measured_rates(device, dtype):
    """(memory bandwidth in bytes/s from a large copy, matmul rate in FLOP/s at `dtype`), best of 5 tries."""
    n_bytes, n = (1 << 30, 8192) if str(device).startswith("cuda") else (1 << 28, 1024)
    a = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    b, x = torch.empty_like(a), torch.randn(n, n, device=device, dtype=dtype)
    bw = mm = 0.0
    for _ in range(5):
        t0 = om.clock(x)
        b.copy_(a)
        bw = max(bw, 2 * n_bytes / (om.clock(x) - t0))                     # read + write
        t0 = om.clock(x)
        for _ in range(4):
            x @ x
        mm = max(mm, 4 * 2 * n ** 3 / (om.clock(x) - t0))
    return bw, mm


def floors(shape, P, G, L, T, bandwidth, flops, n_logprob_forwards):
    """Seconds a step cannot beat on this device:
    generate  T decode steps, each reading every weight once plus the KV cache so far:
              (T x weight bytes + B x kv_bytes_per_token x (T L + T (T + 1) / 2)) / bandwidth, B = P G;
    logprob   2 x params x B (L + T) FLOP per extra forward (old, reference) / matmul rate;
    update    6 x params x B (L + T) FLOP (forward + backward) / matmul rate.
    Example: 1e6 params in fp32, no KV, T = 10, bandwidth 4e8 B/s -> generate floor 10 x 4e6 / 4e8 = 0.1 s."""
    c, params, size = shape                                                # model config, parameters, bytes each
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * size     # K and V, all layers
    B, tokens = P * G, P * G * (L + T)
    gen = (T * params * size + B * kv_per_token * (T * L + T * (T + 1) / 2)) / bandwidth
    logprob = n_logprob_forwards * 2 * params * tokens / flops
    update = 6 * params * tokens / flops
    return dict(t_generate=gen, t_logprob=logprob, t_update=update, t_step=gen + logprob + update)


def summary(rows):
    """median [min, max] of every timing over the timed steps."""
    keys = [k for k in rows[0] if k.startswith("t_")] if rows else []
    return {k: dict(median=statistics.median(r[k] for r in rows), min=min(r[k] for r in rows),
                    max=max(r[k] for r in rows)) for k in keys}


def show(name, res, T_total):
    s = res["summary"]
    print(f"\n{name}: peak memory {res['peak_gb']:.2f} GB, {T_total / s['t_generate']['median']:.0f} tokens/s "
          f"generated (median of {len(res['rows'])} steps)")
    for k, v in s.items():
        print(f"  {k:18}{v['median']:9.2f} s   [{v['min']:.2f}, {v['max']:.2f}]")


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="policy: hub id or local dir (default: embedded SmolLM2-135M)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model")
    p.add_argument("--random-init", action="store_true", help="required with --shape (nothing is downloaded)")
    p.add_argument("--layers", type=int, help="with --shape: fewer layers, for a quick try of the code path")
    p.add_argument("--prompt-len", type=int, default=512, help="with --shape: synthetic prompt tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, help="prompts per step (default: cpu 2, --shape 8)")
    p.add_argument("--group-size", type=int, help="G (default: cpu 4, --shape 8)")
    p.add_argument("--max-new-tokens", type=int, help="forced answer length (default: cpu 64, --shape 800)")
    p.add_argument("--beta", type=float, default=0.001, help="KL weight; 0 drops the reference forward")
    p.add_argument("--updates-per-step", type=int, default=1, help="1: no old log-prob forward (TRL's default)")
    p.add_argument("--micro-batch", type=int, default=8, help="answers per forward/backward")
    p.add_argument("--gradient-checkpointing", type=int, help="ours: 1 recomputes activations in the backward "
                   "(default: preset, on for CUDA, off on CPU; TRL keeps its own default, on)")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=1, help="runs of each implementation (alternating with --vs-trl)")
    p.add_argument("--vs-trl", action="store_true", help="also run TRL's GRPOTrainer (pip install trl)")
    p.add_argument("--sweep", action="store_true", help="G = 2, 4, 8 x answer length 32, 64, 128 (ours only)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="runs/bench.json", help="JSON of every figure")
    args = p.parse_args(argv)
    if args.shape and not args.random_init:
        p.error("--shape builds a model with random weights: add --random-init to say so")
    big = bool(args.shape)
    args.prompts = args.prompts or (8 if big else 2)
    args.group_size = args.group_size or (8 if big else 4)
    args.max_new_tokens = args.max_new_tokens or (800 if big else 64)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    env = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
               device=torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
               cpu_count=os.cpu_count(), threads=torch.get_num_threads())
    model, tok = build_policy(args)
    make_model = lambda: build_policy(args)[0]  # every run starts from the same weights
    p = next(model.parameters())
    shape = (model.config, sum(q.numel() for q in model.parameters()), p.element_size())
    bw, mm = measured_rates(args.device, p.dtype)
    del model, p
    embedder = reward.load_embedder(device=args.device)
    items = om.load_situations(os.path.join(om.HERE, "data", "train.jsonl"))
    result = dict(env=env, args=vars(args), bandwidth_GBps=bw / 1e9, matmul_TFLOPs=mm / 1e12, runs=[])
    prompt_len = max(len(tok([om.chat_prompt(tok, items[i].situation)], add_special_tokens=False).input_ids[0])
                     for step in range(args.warmup + args.steps)   # left padding: every prompt is the longest
                     for i in om.prompts_for_step(len(items), step, args.prompts, 0))  # the same in every run

    def record(name, res, a):
        res["summary"] = summary(res["rows"])
        n_fwd = (a.updates_per_step > 1) + (a.beta > 0)
        res["floor"] = floors(shape, a.prompts, a.group_size, prompt_len, a.max_new_tokens, bw, mm, n_fwd)
        res.update(name=name, prompts=a.prompts, group_size=a.group_size, max_new_tokens=a.max_new_tokens)
        result["runs"].append(res)
        show(name, res, a.prompts * a.group_size * a.max_new_tokens)
        s, f = res["summary"], res["floor"]
        print(f"  floor: step {f['t_step']:.2f} s (generate {f['t_generate']:.2f}, log-prob {f['t_logprob']:.2f}, "
              f"update {f['t_update']:.2f}); measured / floor {s['t_step']['median'] / f['t_step']:.1f}x")

    configs = [(g, t) for g in (2, 4, 8) for t in (32, 64, 128)] if args.sweep else [(None, None)]
    for g, t in configs:
        a = argparse.Namespace(**vars(args))
        if g:
            a.group_size, a.max_new_tokens = g, t
        for r in range(args.rounds):
            tag = f" G={a.group_size} T={a.max_new_tokens}" + (f" round {r + 1}" if args.rounds > 1 else "")
            record("ours" + tag, run_ours(make_model, tok, items, embedder, a), a)
            if args.vs_trl:
                record("TRL" + tag, run_trl(make_model, tok, items, embedder, a), a)
    if args.vs_trl:
        med = lambda who, k: statistics.median(x[k] for r in result["runs"] if r["name"].startswith(who)
                                               for x in r["rows"])
        result["ours_over_trl"] = {k: med("ours", k) / med("TRL", k)
                                   for k in ("t_generate", "t_reward", "t_update", "t_step")}
        print("\nours / TRL (median over all timed steps): " +
              ", ".join(f"{k[2:]} {v:.2f}" for k, v in result["ours_over_trl"].items()))
    if args.sweep:
        xs = [r["group_size"] * r["max_new_tokens"] for r in result["runs"]]
        ys = [r["summary"]["t_step"]["median"] for r in result["runs"]]
        slope, icpt = statistics.linear_regression(xs, ys)
        r2 = statistics.correlation(xs, ys) ** 2
        result["linear_fit"] = dict(seconds_per_answer_token=slope / args.prompts, intercept_s=icpt, r2=r2)
        print(f"\nstep time ~ {icpt:.2f} s + {slope:.4f} s x G x T ({args.prompts} prompts per step): R^2 = {r2:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
