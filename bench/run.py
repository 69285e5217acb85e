"""Speed and memory of OP-GRPO steps, phase by phase, through the real opgrpo_min.py code path.

    python bench/run.py                                  # embedded SmolLM2-135M, 2 prompts x G 4 x 64 answer tokens
    python bench/run.py --vs-trl                         # the same steps through TRL's GRPOTrainer too (pip install trl)
    python bench/run.py --sweep                          # G = 2, 4, 8 x answer length 32, 64, 128: is the cost linear?
    python bench/run.py --shape qwen2.5-3b --random-init # one GPU, random weights of the real Qwen2.5-3B shape

Every answer is forced to exactly --max-new-tokens tokens (min = max), so every step does the same work; the first
--warmup steps of a run are not timed. Each run starts from the same weights. With --vs-trl the two implementations
alternate run by run (--rounds), so drift of the machine hits both. All figures and the environment go to --out.
"""

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
import weakref
import zlib
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the core lives one folder up
    sys.path.insert(0, ROOT)

import harness.allocator
import harness.data
import harness.models
import harness.runs
import opgrpo_min as om

SHAPES = {
    "qwen2.5-3b": dict(
        hidden_size=2048,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=11008,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    "small": dict(
        hidden_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=2816,
        vocab_size=32768,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
}  # --validate: a real run
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
        ids = torch.stack(
            [
                torch.randint(
                    0,
                    self.pad_token_id,
                    (self.prompt_len,),
                    generator=torch.Generator().manual_seed(zlib.crc32(t.encode())),
                )
                for t in texts
            ]
        )  # [n, prompt_len]
        return SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))

    def batch_decode(self, ids, **kw):
        return [" ".join(map(str, row.tolist())) for row in ids]


def build_policy(args):
    """(model, tokenizer): harness.models.load_policy, or random weights of a named shape (bf16 on a GPU)."""
    if not args.shape:
        return harness.models.load_policy(args.model, args.device)
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = dict(SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {}))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(
            Qwen2Config(**shape), dtype=dtype, attn_implementation="sdpa"
        )
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
    return om.resolve_config(
        om.Config(
            device=args.device,
            steps=steps,
            prompts_per_step=args.prompts,
            group_size=args.group_size,
            max_new_tokens=args.max_new_tokens,
            beta=args.beta,
            lr=args.lr,
            updates_per_step=args.updates_per_step,
            micro_batch=args.micro_batch,
            max_prompt_len=10**6,
            gradient_checkpointing=args.gradient_checkpointing,
            sft_steps=0,
            sample_every=0,
            save_every=0,
            seed=0,
        )
    )


@contextlib.contextmanager
def forced_length(tokens):
    """Every answer exactly `tokens` long, so every step does the same work: opgrpo_min's sampler with no EOS id (no
    answer ends before max_new_tokens; run_trl asks TRL for min_new_tokens)."""
    real = om.eos_ids
    om.eos_ids = lambda model, tokenizer: []
    try:
        yield
    finally:
        om.eos_ids = real


class UpdateProfile:
    """--profile: torch.profiler over the update (forward, backward, optimizer step) of the last step of a run, with
    the page faults the process took meanwhile (fresh memory from the kernel shows as time spent in the ops that first
    touch it). Prints the ops with the most self CPU time; result() is what the JSON keeps."""

    def __init__(self, name, on):
        self.name, self.on, self.table, self.faults, self.seconds = name, on, None, None, None

    def start(self):
        import resource

        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.rusage = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()
        self.prof.__enter__()

    def stop(self):
        import resource

        self.prof.__exit__(None, None, None)
        self.seconds = time.perf_counter() - self.t0
        now = resource.getrusage(resource.RUSAGE_SELF)
        self.faults = now.ru_minflt - self.rusage.ru_minflt
        self.sys_s = now.ru_stime - self.rusage.ru_stime
        ops = self.prof.key_averages()
        self.table = ops.table(sort_by="self_cpu_time_total", row_limit=12)
        self.top = {
            e.key: e.self_cpu_time_total / 1e6
            for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:12]
        }
        print(
            f"\n{self.name}: profile of the last update, {self.seconds:.2f} s, {self.faults} page faults, "
            f"{self.sys_s:.2f} s in the kernel\n{self.table}"
        )

    def result(self):
        return dict(
            seconds=self.seconds, page_faults=self.faults, kernel_s=self.sys_s, self_cpu_s=self.top
        )


def run_ours(make_model, tok, items, embedder, args):
    """warmup + steps steps of opgrpo_min.grpo_train (reference = frozen copy, as in train()); per-step rows."""
    cfg = bench_config(args, args.warmup + args.steps)
    prof, update, calls = UpdateProfile("ours", args.profile), om.grpo_update, []

    def profiled_update(*a, **kw):  # the last step's update, under the profiler
        calls.append(1)
        if not (prof.on and len(calls) == cfg.steps):
            return update(*a, **kw)
        prof.start()
        try:
            return update(*a, **kw)
        finally:
            prof.stop()

    with PeakMemory(args.device) as mem, forced_length(args.max_new_tokens):
        model = make_model()
        ref = copy.deepcopy(model).requires_grad_(False) if cfg.beta else None  # beta 0: none
        om.grpo_update = profiled_update
        try:
            rows = om.grpo_train(model, tok, items, om.rollout_rewards(embedder, cfg), cfg, ref)
        finally:
            om.grpo_update = update
    return dict(rows=rows[args.warmup :], peak_gb=mem.peak, **profile_result(prof))


def profile_result(prof):
    return dict(profile=prof.result()) if prof.on else {}


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

    from scale.trl_opgrpo import TRLReward

    if args.updates_per_step != 1:
        raise SystemExit("--vs-trl compares one update per batch: use --updates-per-step 1")
    P, G, T, n = args.prompts, args.group_size, args.max_new_tokens, args.warmup + args.steps
    order = [
        i for step in range(n) for i in om.prompts_for_step(len(items), step, P, 0)
    ]  # ours' prompt order
    data = Dataset.from_dict(
        dict(
            prompt=[om.chat_prompt(tok, items[i].situation) for i in order],
            reference=[om.reference_answer(items[i]) for i in order],
            situation=[items[i].situation for i in order],
        )
    )
    clock = dict(generate=0.0, reward=0.0, logprob=0.0, forward=0.0)
    ours = bench_config(args, n)
    score = TRLReward(
        embedder, ours.mask_keywords, ours.min_perspectives
    )  # ours' reward, TRL's interface

    def op_reward(**kw):
        t0 = time.perf_counter()
        out = score(**kw)
        clock["reward"] += time.perf_counter() - t0
        return out

    prof = UpdateProfile("TRL", args.profile)

    class Timed(GRPOTrainer):
        def compute_loss(
            self, *a, **kw
        ):  # the update starts here: forward, loss, then backward and the step
            if prof.on and len(rows) == n - 1:
                prof.start()
            return super().compute_loss(*a, **kw)

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
            if prof.on and len(rows) == n - 1:
                prof.stop()
            t = time.perf_counter() - self.t0
            rows.append(
                dict(
                    t_generate=clock["generate"],
                    t_reward=clock["reward"],
                    t_logprob=clock["logprob"],
                    t_update=t - clock["generate"] - clock["reward"] - clock["logprob"],
                    t_update_forward=clock["forward"],
                    t_step=t,
                )
            )

    model = make_model()
    generate = model.generate

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        clock["generate"] += time.perf_counter() - t0
        return out

    model.generate = timed_generate
    with tempfile.TemporaryDirectory() as tmp:
        cfg = GRPOConfig(
            output_dir=tmp,
            max_steps=n,
            per_device_train_batch_size=P * G,
            num_generations=G,
            gradient_accumulation_steps=1,
            num_iterations=1,
            max_completion_length=T,
            generation_kwargs=dict(min_new_tokens=T, top_k=0),
            temperature=1.0,
            top_p=1.0,
            beta=args.beta,
            epsilon=0.2,
            learning_rate=args.lr,
            weight_decay=0.01,
            lr_scheduler_type="constant",
            shuffle_dataset=False,
            bf16=False,
            use_cpu=not args.device.startswith("cuda"),
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            seed=0,
            disable_tqdm=True,
        )
        trainer = Timed(
            model=model,
            reward_funcs=op_reward,
            args=cfg,
            train_dataset=data,
            processing_class=tok,
            callbacks=[Steps()],
        )
        with PeakMemory(args.device) as mem:
            trainer.train()
    settings = {
        k: getattr(cfg, k)
        for k in ("gradient_checkpointing", "loss_type", "bf16", "scale_rewards")
        if hasattr(cfg, k)
    }
    return dict(
        rows=rows[args.warmup :], peak_gb=mem.peak, settings=settings, **profile_result(prof)
    )


def sampler_vs_generate(args):
    """The rollout alone, --rounds times each way, alternating: sample_groups (the written-out sampler: a prompt's
    prefill shared by its G answers) and model.generate with the same sampling (temperature 1, top_p 1, top_k off)
    over the P x G prompt copies, both forced to --max-new-tokens. Prints seconds and the ratio."""
    from transformers import GenerationConfig

    model, tok = build_policy(args)
    items = harness.data.load_situations(os.path.join(om.HERE, "data", "train.jsonl"))
    P, G = args.prompts or 2, args.group_size or 4
    T = args.max_new_tokens or 64
    prompts = [om.chat_prompt(tok, s.situation) for s in items[:P]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    gen = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=T, min_new_tokens=T
    )
    gen.pad_token_id = tok.pad_token_id
    ids, attn = enc.input_ids.repeat_interleave(G, 0), enc.attention_mask.repeat_interleave(G, 0)
    ways = dict(
        sample_groups=lambda: om.sample_groups(model, tok, prompts, G, T),
        generate=lambda: model.generate(input_ids=ids, attention_mask=attn, generation_config=gen),
    )
    times = {k: [] for k in ways}
    with forced_length(T), torch.no_grad():
        ways["sample_groups"](), ways["generate"]()  # warm-up
        for r in range(args.rounds):
            for k in ways if r % 2 == 0 else list(ways)[::-1]:
                t0 = om.clock(model)
                ways[k]()
                times[k].append(om.clock(model) - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["sample_groups"] / med["generate"]
    print(
        f"rollout of {P} prompts x G {G} x {T} tokens, median of {args.rounds}: sample_groups "
        f"{med['sample_groups']:.2f} s, generate {med['generate']:.2f} s; ratio {ratio:.3f}"
    )
    result = dict(args=vars(args), seconds=times, median=med, ratio=ratio)
    harness.runs.write_text(args.out, json.dumps(result, indent=1))
    return result


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
        bw = max(bw, 2 * n_bytes / (om.clock(x) - t0))  # read + write
        t0 = om.clock(x)
        for _ in range(4):
            x @ x
        mm = max(mm, 4 * 2 * n**3 / (om.clock(x) - t0))
    return bw, mm


def floors(shape, P, G, L, T, bandwidth, flops, n_logprob_forwards):
    """Seconds a step cannot beat on this device:
    generate  T decode steps, each reading every weight once plus the KV cache so far:
              (T x weight bytes + B x kv_bytes_per_token x (T L + T (T + 1) / 2)) / bandwidth, B = P G;
    logprob   2 x params x B (L + T) FLOP per extra forward (old, reference) / matmul rate;
    update    6 x params x B (L + T) FLOP (forward + backward) / matmul rate.
    Example: 1e6 params in fp32, no KV, T = 10, bandwidth 4e8 B/s -> generate floor 10 x 4e6 / 4e8 = 0.1 s."""
    c, params, size = shape  # model config, parameters, bytes each
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = (
        2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * size
    )  # K and V, all layers
    B, tokens = P * G, P * G * (L + T)
    gen = (T * params * size + B * kv_per_token * (T * L + T * (T + 1) / 2)) / bandwidth
    logprob = n_logprob_forwards * 2 * params * tokens / flops
    update = 6 * params * tokens / flops
    return dict(t_generate=gen, t_logprob=logprob, t_update=update, t_step=gen + logprob + update)


def summary(rows):
    """median [min, max] of every timing over the timed steps."""
    keys = [k for k in rows[0] if k.startswith("t_")] if rows else []
    return {
        k: dict(
            median=statistics.median(r[k] for r in rows),
            min=min(r[k] for r in rows),
            max=max(r[k] for r in rows),
        )
        for k in keys
    }


def show(name, res, T_total):
    s = res["summary"]
    print(
        f"\n{name}: peak memory {res['peak_gb']:.2f} GB, {T_total / s['t_generate']['median']:.0f} tokens/s "
        f"generated (median of {len(res['rows'])} steps)"
    )
    for k, v in s.items():
        print(f"  {k:18}{v['median']:9.2f} s   [{v['min']:.2f}, {v['max']:.2f}]")


def cpu_name():
    try:
        return next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ================================================================ simulated memory (--simulate): one step, no weights
GB = 1e9
CATEGORIES = (
    "weights",
    "gradients",
    "master copies",
    "AdamW moments",
    "reference model",
    "KV cache",
    "activations",
    "logits",
)
KNOBS = dict(
    lora_rank=(16,),
    micro_batch=(1, 2, 4),
    gradient_checkpointing=(0,),
    max_new_tokens=(200, 1200),
    group_size=(4,),
)  # --simulate --sweep: each moved alone away from the gpu preset (G 10, T 800, mb 8, gc 1)


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensors as the dispatcher sees them: the storage of every op's output counts once (views share
    it) from that op until Python frees it. Keeps the peak, the phase it fell in and what was alive by category:
    `groups` ({category: function -> tensors}) names tensors; the rest are logits (last dim a vocabulary size) or
    activations. Naming walks every group, so it runs only when the live total first passes 1.005 x the level it last
    ran at: the breakdown is of a moment within 0.5 % of the peak (it runs in the dispatcher, never in a free, where
    reading a .grad that is being replaced crashes). Fake tensors hold no values, so with fake=True .item() answers 1
    (False for a bool): in a step only the loss check, the logged stats and transformers' skip-the-mask test read one."""

    def __init__(self, fake, vocab_sizes):
        super().__init__()
        self.fake, self.vocab, self.groups, self.phase = fake, set(vocab_sizes), {}, "setup"
        self.live, self.now, self.peak, self.named_at, self.at_peak, self.peaks = (
            {},
            0,
            0,
            0,
            {},
            {},
        )

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake and func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        if self.now > 1.005 * self.named_at:
            self.at_peak, self.named_at = self.breakdown(), self.now
        return out

    def add(self, t):
        s = t.untyped_storage()  # one Python object per storage while it lives, so id() names it
        if id(s) not in self.live and s.nbytes():
            logits = t.dim() > 0 and t.shape[-1] in self.vocab
            self.live[id(s)] = (
                s.nbytes(),
                logits,
                weakref.ref(s, functools.partial(self.free, id(s))),
            )
            self.now += s.nbytes()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.now)
            if self.now > self.peak:
                self.peak, self.peak_phase = self.now, self.phase

    def free(self, key, _):
        self.now -= self.live.pop(key)[0]

    def breakdown(self):
        named = {
            id(t.untyped_storage()): c
            for c, tensors in self.groups.items()
            for t in tensors()
            if t is not None
        }
        out = dict.fromkeys(CATEGORIES, 0)
        for key, (n, logits, _) in self.live.items():
            out[named.get(key, "logits" if logits else "activations")] += n
        return out

    def reset_peak(self, phase):
        """Forget the peak of setup (building the model, warming the optimizer): a step starts here."""
        self.phase, self.peak, self.peak_phase, self.peaks = phase, self.now, phase, {}
        self.at_peak, self.named_at = self.breakdown(), self.now

    def result(self):
        return dict(
            peak_gb=self.peak / GB,
            phase=self.peak_phase,
            at_peak_gb={k: v / GB for k, v in self.at_peak.items()},
            phase_peaks_gb={k: v / GB for k, v in self.peaks.items()},
        )


@torch.no_grad()
def decode_rollout(model, tracker, P, G, L, T, vocab, steps=0):
    """The memory of opgrpo_min.sample_groups without its stopping check (done.all() reads values fake tensors do not
    have): P left-padded prompts prefilled once into a DynamicCache that keeps the logits of the last position only,
    the cache and logits repeated for G answers each, then one-token steps that grow the cache, each drawing from
    next_token_logprobs of the new position. steps > 0 runs only the last `steps` of the T - 1 decode forwards: the
    cache first grows in one piece to where they start, which leaves the tensors the skipped steps leave (not their
    transients, smaller than the last steps'; test_skipped_decode_steps_...)."""
    from transformers import DynamicCache

    attn = torch.ones(P, L, dtype=torch.long)
    attn[0, 0] = 0  # prompts of different lengths: transformers builds the 4D mask
    ids = torch.randint(0, vocab, (P, L))  # [P, L]
    cache, B = DynamicCache(config=model.config), P * G
    alive = weakref.ref(cache)  # the tracker must not keep the cache alive after the rollout
    tracker.groups["KV cache"] = lambda: (
        []
        if alive() is None
        else [x for layer in alive().layers for x in (layer.keys, layer.values)]
    )
    out = model(
        ids, attention_mask=attn, position_ids=om.positions(attn), cache=cache, logits_to_keep=1
    )
    cache.batch_repeat_interleave(G)
    logits = out.logits[:, -1].repeat_interleave(G, 0)  # [B, V']
    del out
    ids, attn = ids.repeat_interleave(G, 0), attn.repeat_interleave(G, 0)  # [B, L] each
    grow = max(T - 1 - steps, 0) if steps else 0
    if grow:
        c = model.config
        kv = (B, c.num_key_value_heads, grow, c.hidden_size // c.num_attention_heads)
        for i in range(c.num_hidden_layers):
            cache.update(torch.empty(kv, dtype=model.dtype), torch.empty(kv, dtype=model.dtype), i)
        ids = torch.cat([ids, ids.new_zeros(B, grow)], 1)
        attn = torch.cat([attn, attn.new_ones(B, grow)], 1)
    for n in range(grow, T):
        probs = om.next_token_logprobs(logits, 1.0, vocab).exp()  # [B, V]
        ids = torch.cat([ids, torch.multinomial(probs, 1)], 1)  # [B, L + n + 1]
        if n == T - 1:
            break  # the last token is never fed back: the cache ends at L + T - 1 positions
        attn = torch.cat([attn, attn.new_ones(B, 1)], 1)  # [B, L + n + 1]
        pos = om.positions(attn)[:, -1:]
        logits = model(ids[:, -1:], attention_mask=attn, position_ids=pos, cache=cache).logits[
            :, -1
        ]
    attn = torch.cat([attn, attn.new_ones(B, 1)], 1)  # [B, L + T]
    answer_mask = attn[:, L:].clone()  # [B, T]
    return om.Rollout(ids, attn, answer_mask, [""] * B, torch.arange(P).repeat_interleave(G))


def peft_model(model, rank):
    import peft

    from extras.lora import lora_config

    return peft.get_peft_model(model, lora_config(rank))


def materialize(model):
    """A meta-device model with every parameter and buffer replaced by an empty tensor of the active mode (fake
    tensors under FakeTensorMode); a tied parameter stays one tensor."""
    new = {}
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is not None:
                    if id(t) not in new:
                        e = torch.empty(t.shape, dtype=t.dtype)
                        new[id(t)] = (
                            torch.nn.Parameter(e, t.requires_grad)
                            if store is mod._parameters
                            else e
                        )
                    store[name] = new[id(t)]
    return model


answer_logits = om.answer_logits


def simulate_step(a, fake=True):
    """One training step after the first (the AdamW moments exist) of the gpu preset with a's knobs, on the real
    opgrpo_min functions: rollout (decode_rollout), old and reference log-probs (token_logprobs), mini-batch updates
    (grpo_update inside training(): gradient checkpointing, adamw's optimizer). fake=True: under FakeTensorMode, so
    nothing is allocated; fake=False runs it for real (tests check the tracker against the allocator there).
    After the rollout, the log-probs and the updates repeat the same work per micro-batch, and what persists between
    micro-batches (gradients, optimizer state, [B, T] log-probs) does not grow with their number, so by default only
    updates_per_step x 2 x micro_batch answers go on: two micro-batches per mini-batch, the second one adding to the
    gradients (a.two_micro_batches=False runs them all; test_two_micro_batches_per_update_give_the_full_peak).
    Returns LiveBytes.result() with the seconds it took."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM, Qwen2Config

    t0 = time.perf_counter()
    shape = dict(SHAPES[a.shape], **({"num_hidden_layers": a.layers} if a.layers else {}))
    vocab = min(
        len(SyntheticTokenizer()), shape["vocab_size"]
    )  # the tokenizer's (Qwen pads its output layer)
    cfg = om.resolve_config(
        om.Config(
            device="cpu",
            preset="gpu",
            prompts_per_step=a.prompts,
            group_size=a.group_size,
            max_new_tokens=a.max_new_tokens,
            micro_batch=a.micro_batch,
            gradient_checkpointing=a.gradient_checkpointing,
            beta=a.beta,
            updates_per_step=a.updates_per_step,
        )
    )
    tracker = LiveBytes(fake, {shape["vocab_size"], vocab})
    build = lambda: AutoModelForCausalLM.from_config(
        Qwen2Config(**shape), dtype=torch.bfloat16, attn_implementation="sdpa"
    ).eval()
    if a.lora_rank:  # the reference is the same model with the adapter off: no copy
        with torch.device(
            "meta"
        ):  # peft cannot add an adapter to fake tensors (its .to() swaps them): build it here
            lora = peft_model(build(), a.lora_rank)
    with FakeTensorMode() if fake else contextlib.nullcontext(), tracker:
        model = materialize(lora) if a.lora_rank else build()
        # train() deep-copies the policy; a fake tensor's deepcopy lands in another fake mode, a new model is as big
        ref = build().requires_grad_(False) if cfg.beta and not a.lora_rank else None
        opt = om.adamw(model, cfg.lr, weight_decay=cfg.weight_decay)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step(), opt.zero_grad(set_to_none=True)  # the moments of earlier steps
        tracker.groups.update(
            {
                "weights": model.parameters,
                "reference model": lambda: ref.parameters() if ref else [],
                "master copies": lambda: getattr(opt, "master", []),
                "AdamW moments": lambda: [x for s in opt.state.values() for x in s.values()],
                "gradients": lambda: (
                    [p.grad for g in opt.param_groups for p in g["params"]]
                    + [p.grad for p in getattr(opt, "low", [])]
                ),
            }
        )
        opt.register_step_pre_hook(lambda *_: setattr(tracker, "phase", "optimizer step"))
        opt.register_step_post_hook(lambda *_: setattr(tracker, "phase", "update"))
        P, G, T = cfg.prompts_per_step, cfg.group_size, cfg.max_new_tokens
        tracker.reset_peak("rollout")
        roll = decode_rollout(model, tracker, P, G, a.prompt_len, T, vocab, a.decode_steps)
        adv = om.group_advantages([float(i % 2) for i in range(P * G)], G)  # [P*G]
        if getattr(
            a, "two_micro_batches", True
        ):  # what follows repeats per micro-batch: keep two per update
            keep = torch.arange(
                min(P * G, cfg.updates_per_step * 2 * cfg.micro_batch)
            )  # (the 2nd adds to grads)
            roll = om.Rollout(
                roll.input_ids[keep],
                roll.attention_mask[keep],
                roll.answer_mask[keep],
                [],
                roll.group_ids[keep],
            )
            adv = adv[keep]
        tracker.phase = "log-probs"
        # whole rows: fake tensors cannot run the grouping by prompt (its shape depends on values), and whole rows
        # hold at least as much memory, so the simulated peak is an upper bound there
        om.answer_logits = functools.partial(answer_logits, share_prompts=False)
        with torch.no_grad():
            old = (
                None
                if cfg.updates_per_step == 1
                else om.token_logprobs(
                    model,
                    roll.input_ids,
                    roll.attention_mask,
                    T,
                    cfg.temperature,
                    cfg.micro_batch,
                    vocab,
                )
            )
            ref_logp = None
            if cfg.beta:
                with model.disable_adapter() if a.lora_rank else contextlib.nullcontext():
                    ref_logp = om.token_logprobs(
                        ref or model,
                        roll.input_ids,
                        roll.attention_mask,
                        T,
                        cfg.temperature,
                        cfg.micro_batch,
                        vocab,
                    )
        tracker.phase = "update"
        with om.training(model, cfg.gradient_checkpointing):
            om.grpo_update(model, opt, roll, adv, old, ref_logp, cfg, vocab)
        om.answer_logits = answer_logits
    return dict(tracker.result(), seconds=time.perf_counter() - t0)


def simulate_runs(args, save=lambda rows: None):
    """--simulate: the gpu preset's step (or the knobs given) under fake tensors, then with --sweep each knob of KNOBS
    moved alone. Returns one row per run: the knobs, the peak, its phase and what was alive at it by category."""
    base = dict(
        shape=args.shape,
        layers=args.layers,
        prompts=args.prompts,
        group_size=args.group_size,
        max_new_tokens=args.max_new_tokens,
        micro_batch=args.micro_batch,
        beta=args.beta,
        gradient_checkpointing=args.gradient_checkpointing,
        updates_per_step=args.updates_per_step,
        lora_rank=args.lora_rank,
        prompt_len=args.prompt_len,
        decode_steps=args.decode_steps,
    )
    variants = [("preset", {})] + (
        [(f"{k} {v}", {k: v}) for k, vs in KNOBS.items() for v in vs] if args.sweep else []
    )
    done = {}  # runs already in --out with the same knobs are not run again (a sweep interrupted goes on)
    if os.path.isfile(args.out):
        with open(args.out, encoding="utf-8") as f:
            done = {json.dumps(r["knobs"], sort_keys=True): r for r in json.load(f).get("runs", [])}
    rows = []
    for name, change in variants:
        a = argparse.Namespace(**dict(base, **change))
        key = json.dumps(vars(a), sort_keys=True)
        r = (
            dict(done[key], name=name)
            if key in done
            else dict(name=name, knobs=vars(a), **simulate_step(a))
        )
        rows.append(r)
        save(rows)  # after every run: a sweep takes a while
        print(
            f"{name:>26}: peak {r['peak_gb']:6.1f} GB in {r['phase']:<15} "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["at_peak_gb"].items() if v >= 0.05)
            + f"  ({r['seconds']:.0f} s)",
            flush=True,
        )
    return rows


CARDS = (80, 48, 24)  # GB of the usual cards
HEADROOM = (
    0.9  # a peak fits a card when it is under 90 % of it: CUDA context, allocator fragmentation
)


def fits_table(rows):
    """{run name: {card GB: fits}} of the simulated peaks."""
    return {r["name"]: {c: r["peak_gb"] <= HEADROOM * c for c in CARDS} for r in rows}


def validate_tracker(a):
    """The fake-tensor tracker against a real run of the same step on the CPU: the peak the tracker predicts without
    allocating, and the rise of the process's resident memory during the real step (sampled every 5 ms)."""
    fake = simulate_step(a, fake=True)
    gc.collect()
    mem = PeakMemory("cpu")
    base = mem._rss()
    with mem:
        real = simulate_step(a, fake=False)
    rss = mem.peak - base
    return dict(
        fake_peak_gb=fake["peak_gb"],
        real_tracked_gb=real["peak_gb"],
        real_rss_rise_gb=rss,
        fake_over_rss=fake["peak_gb"] / rss,
    )


# ================================================================ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", help="policy: hub id or local dir (default: embedded SmolLM2-135M)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler over the last update of each run, with its page faults",
    )
    p.add_argument(
        "--whole-rows",
        action="store_true",
        help="log-probs over whole rows: no prompt forward shared by the answers to it",
    )
    p.add_argument(
        "--malloc-default",
        action="store_true",
        help="leave glibc's malloc as it is (harness/allocator.py normally keeps freed memory)",
    )
    p.add_argument(
        "--shape", choices=sorted(SHAPES), help="random weights of this shape instead of --model"
    )
    p.add_argument(
        "--random-init", action="store_true", help="required with --shape (nothing is downloaded)"
    )
    p.add_argument(
        "--layers", type=int, help="with --shape: fewer layers, for a quick try of the code path"
    )
    p.add_argument(
        "--prompt-len", type=int, default=512, help="with --shape: synthetic prompt tokens"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, help="prompts per step (default: cpu 2, --shape 8)")
    p.add_argument("--group-size", type=int, help="G (default: cpu 4, --shape 8)")
    p.add_argument(
        "--max-new-tokens", type=int, help="forced answer length (default: cpu 64, --shape 800)"
    )
    p.add_argument(
        "--beta", type=float, default=0.001, help="KL weight; 0 drops the reference forward"
    )
    p.add_argument(
        "--updates-per-step",
        type=int,
        help="1: no old log-prob forward (TRL's default; --simulate: 4)",
    )
    p.add_argument("--micro-batch", type=int, default=8, help="answers per forward/backward")
    p.add_argument(
        "--gradient-checkpointing",
        type=int,
        help="ours: 1 recomputes activations in the backward "
        "(default: preset, on for CUDA, off on CPU; TRL keeps its own default, on)",
    )
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="runs of each implementation (alternating with --vs-trl)",
    )
    p.add_argument(
        "--vs-trl", action="store_true", help="also run TRL's GRPOTrainer (pip install trl)"
    )
    p.add_argument(
        "--sweep", action="store_true", help="G = 2, 4, 8 x answer length 32, 64, 128 (ours only)"
    )
    p.add_argument(
        "--vs-generate",
        action="store_true",
        help="the rollout alone: opgrpo_min.sample_groups against transformers' generate, alternating",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="peak memory of one gpu-preset step of --shape (default "
        "qwen2.5-3b) under fake tensors: nothing is allocated, no GPU needed; with --sweep, each knob moved",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        help="with --simulate: train a LoRA adapter of this rank",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=4,
        help="with --simulate: decode forwards run (the last ones, "
        "where the KV cache is largest; 0: all)",
    )
    p.add_argument(
        "--validate",
        action="store_true",
        help="with --simulate: check the tracker against a real CPU "
        "run of the 'small' shape (2 prompts x G 4 x 64 tokens, the step's other knobs as given)",
    )
    p.add_argument("--out", default="runs/bench.json", help="JSON of every figure")
    args = p.parse_args(argv)
    if (
        args.simulate
    ):  # the gpu preset unless a knob is given; the shape's weights are never allocated
        args.shape = args.shape or "qwen2.5-3b"
        gpu = om.preset("gpu")
        args.prompts = args.prompts or gpu["prompts_per_step"]
        args.group_size = args.group_size or gpu["group_size"]
        args.max_new_tokens = args.max_new_tokens or gpu["max_new_tokens"]
        args.updates_per_step = args.updates_per_step or om.Config.updates_per_step
        args.gradient_checkpointing = (
            gpu["gradient_checkpointing"]
            if args.gradient_checkpointing is None
            else args.gradient_checkpointing
        )
        return args
    args.updates_per_step = args.updates_per_step or 1
    if args.shape and not args.random_init:
        p.error("--shape builds a model with random weights: add --random-init to say so")
    big = bool(args.shape)
    args.prompts = args.prompts or (8 if big else 2)
    args.group_size = args.group_size or (8 if big else 4)
    args.max_new_tokens = args.max_new_tokens or (800 if big else 64)
    return args


RATIOS = dict(  # ours / TRL per phase, as printed
    generate="t_generate",
    logprob="t_logprob",
    update="t_update",
    update_forward="t_update_forward",
    step="t_step",
)


def ours_over_trl(runs):
    """{phase: median of ours / median of TRL} over the timed steps of `runs` (results named 'ours ...' and 'TRL ...')."""
    med = lambda who, k: statistics.median(
        x[k] for r in runs if r["name"].startswith(who) for x in r["rows"]
    )
    return {name: med("ours", k) / med("TRL", k) for name, k in RATIOS.items()}


def others_cpu_seconds():
    """What the rest of the machine did: the CPU seconds every other process has used (theirs and their finished
    children's, from /proc), with the wall clock; the difference of two readings is what they used in between."""
    used, me = 0.0, os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) != me and int(fields[1]) != me:  # not this process nor its own children
            used += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return Reading(cpu_s=used, wall_s=time.time())


class Reading(dict):
    """Two readings of others_cpu_seconds subtract field by field."""

    def __sub__(self, other):
        return Reading({k: v - other[k] for k, v in self.items()})


def main(argv=None):
    args = parse_args(argv)
    if args.malloc_default:  # measure without harness/allocator.py's setting
        harness.allocator._done.append(True)
    if args.whole_rows:  # measure log-probs without the prompt shared by its answers
        om.answer_logits = functools.partial(answer_logits, share_prompts=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_generate:
        return sampler_vs_generate(args)
    if args.simulate:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        result = dict(args=vars(args))

        def save(rows):
            result.update(runs=rows, fits=fits_table(rows))
            harness.runs.write_text(args.out, json.dumps(result, indent=1))

        simulate_runs(args, save)
        if args.validate:
            small = argparse.Namespace(
                **dict(
                    vars(args),
                    shape="small",
                    layers=None,
                    prompts=2,
                    group_size=4,
                    max_new_tokens=64,
                    prompt_len=64,
                    micro_batch=4,
                    decode_steps=0,
                )
            )
            v = result["validation"] = validate_tracker(small)
            print(
                f"tracker check, the 'small' shape run for real on the CPU: fake {v['fake_peak_gb']:.2f} GB, real run "
                f"{v['real_rss_rise_gb']:.2f} GB of resident memory: fake / real {v['fake_over_rss']:.3f}"
            )
        harness.runs.write_text(args.out, json.dumps(result, indent=1))
        print(f"wrote {args.out}")
        return result
    import transformers

    env = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
    )
    model, tok = build_policy(args)
    make_model = lambda: build_policy(args)[0]  # every run starts from the same weights
    p = next(model.parameters())
    shape = (model.config, sum(q.numel() for q in model.parameters()), p.element_size())
    bw, mm = measured_rates(args.device, p.dtype)
    del model, p
    embedder = harness.models.load_embedder(device=args.device)
    items = harness.data.load_situations(os.path.join(om.HERE, "data", "train.jsonl"))
    result = dict(
        env=env, args=vars(args), bandwidth_GBps=bw / 1e9, matmul_TFLOPs=mm / 1e12, runs=[]
    )
    prompt_len = max(
        len(tok([om.chat_prompt(tok, items[i].situation)], add_special_tokens=False).input_ids[0])
        for step in range(args.warmup + args.steps)  # left padding: every prompt is the longest
        for i in om.prompts_for_step(len(items), step, args.prompts, 0)
    )  # the same in every run

    def record(name, res, a):
        res["summary"] = summary(res["rows"])
        n_fwd = (a.updates_per_step > 1) + (a.beta > 0)
        res["floor"] = floors(
            shape, a.prompts, a.group_size, prompt_len, a.max_new_tokens, bw, mm, n_fwd
        )
        res.update(
            name=name, prompts=a.prompts, group_size=a.group_size, max_new_tokens=a.max_new_tokens
        )
        result["runs"].append(res)
        show(name, res, a.prompts * a.group_size * a.max_new_tokens)
        s, f = res["summary"], res["floor"]
        print(
            f"  floor: step {f['t_step']:.2f} s (generate {f['t_generate']:.2f}, log-prob {f['t_logprob']:.2f}, "
            f"update {f['t_update']:.2f}); measured / floor {s['t_step']['median'] / f['t_step']:.1f}x"
        )

    configs = [(g, t) for g in (2, 4, 8) for t in (32, 64, 128)] if args.sweep else [(None, None)]
    busy = others_cpu_seconds()
    for g, t in configs:
        a = argparse.Namespace(**vars(args))
        if g:
            a.group_size, a.max_new_tokens = g, t
        for r in range(args.rounds):
            tag = f" G={a.group_size} T={a.max_new_tokens}" + (
                f" round {r + 1}" if args.rounds > 1 else ""
            )
            runs = [("ours", run_ours)] + ([("TRL", run_trl)] if args.vs_trl else [])
            for who, run in runs if r % 2 == 0 else runs[::-1]:  # who goes first alternates
                record(who + tag, run(make_model, tok, items, embedder, a), a)
            if args.vs_trl:
                ratio = ours_over_trl(result["runs"][-2:])
                result.setdefault("rounds", []).append(ratio)
                print(
                    f"\nround {r + 1}, ours / TRL: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items())
                )
    if args.vs_trl:
        result["ours_over_trl"] = ours_over_trl(result["runs"])
        print(
            "\nours / TRL (median over all timed steps): "
            + ", ".join(f"{k} {v:.2f}" for k, v in result["ours_over_trl"].items())
        )
    busy = others_cpu_seconds() - busy
    result["others_cpu_s"] = dict(busy, load_average=os.getloadavg())
    print(
        f"other processes used {busy['cpu_s']:.0f} CPU-seconds during the {busy['wall_s']:.0f} s of the "
        f"benchmark ({busy['cpu_s'] / busy['wall_s'] / os.cpu_count():.0%} of the machine)"
    )
    if args.sweep:
        xs = [r["group_size"] * r["max_new_tokens"] for r in result["runs"]]
        ys = [r["summary"]["t_step"]["median"] for r in result["runs"]]
        slope, icpt = statistics.linear_regression(xs, ys)
        r2 = statistics.correlation(xs, ys) ** 2
        result["linear_fit"] = dict(
            seconds_per_answer_token=slope / args.prompts, intercept_s=icpt, r2=r2
        )
        print(
            f"\nstep time ~ {icpt:.2f} s + {slope:.4f} s x G x T ({args.prompts} prompts per step): R^2 = {r2:.3f}"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
