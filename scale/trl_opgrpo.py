"""OP-GRPO on TRL's GRPOTrainer: the same data, prompt and OP reward as opgrpo_min.py, on as many GPUs as
`accelerate launch` gives it (DDP, or DeepSpeed ZeRO-3 when the model no longer fits one GPU).

    accelerate launch --config_file scale/accelerate_ddp.yaml   scale/trl_opgrpo.py --model runs/x/sft
    accelerate launch --config_file scale/accelerate_zero3.yaml scale/trl_opgrpo.py --model Qwen/Qwen2.5-3B-Instruct \\
        --sft-steps -1          # -1: first one epoch of TRL's SFTTrainer on the reference answers (the paper's stage 0)

The defaults are the paper's recipe: opgrpo_min.Config with its gpu preset, at the paper's 1024 prompts per step.
Outputs in --out: TRL's checkpoints, sft/ (the warm start, when --sft-steps is not 0) and final/ (the policy).
"""

import argparse
import dataclasses
import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the core and the scale package live one folder up
    sys.path.insert(0, ROOT)
import harness.cli
import harness.data
import harness.models
import harness.runs
import opgrpo_min as om
import reward
from scale import prompt_messages

# ================================================================ config: opgrpo_min's knobs, the paper's values
DEFAULTS = {
    **{f.name: f.default for f in dataclasses.fields(om.Config)},
    **om.preset("gpu"),
    "prompts_per_step": 1024,  # the paper's batch; opgrpo_min's gpu preset holds what fits one GPU (8)
    "sft_steps": 0,  # --model is normally the warm start that opgrpo_min.py saved (runs/x/sft)
    "out": "runs/trl_opgrpo",
}
HELP = {
    "model": "policy: hub id or local dir (e.g. runs/x/sft or runs/x/checkpoint from opgrpo_min.py); "
    "default: the embedded SmolLM2-135M-Instruct",
    "sim_model": "Sentence Transformer of the reward: hub id or local dir; default: the embedded all-MiniLM-L6-v2",
    "train_data": "situations: our JSONL (tools/convert_data.py converts the authors' CSV or ValueKaleidoscope JSON)",
    "out": "folder for TRL's checkpoints, sft/ and final/",
    "seed": "seed of TRL's data order, sampling and init",
    "sft_steps": "0: no SFT; N: N steps of TRL's SFTTrainer on the reference answers; -1: one epoch (the paper)",
    "sft_batch": "situations per SFT step on each process",
    "sft_lr": "SFT learning rate, cosine, 10%% warm-up",
    "steps": "RL steps (the paper: about 150); 0: only the SFT warm start (e.g. for verl)",
    "prompts_per_step": "prompts per RL step, all processes together",
    "group_size": "G answers per prompt",
    "max_new_tokens": "answer cap in tokens",
    "temperature": "sampling temperature (log-probs use the same)",
    "top_p": "nucleus sampling; top-k is off",
    "lr": "AdamW learning rate, constant",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "max grad norm",
    "clip_eps": "PPO ratio clip e",
    "dual_clip": "ratio cap c (for A < 0 the recipe's dual clip); 0: off",
    "beta": "weight of the k3 KL to the frozen start policy; 0 loads no reference model",
    "updates_per_step": "optimizer steps per batch of rollouts (mini-batches)",
    "micro_batch": "answers per forward/backward on each process",
    "gradient_checkpointing": "1: recompute activations (less memory)",
    "lora_rank": "> 0: LoRA of this rank",
    "mask_keywords": "where the situation's words become [KW]: " + ", ".join(reward.MASK_MODES),
    "min_perspectives": "uniqueness is 0 below this many perspectives",
    "save_every": "checkpoint every N RL steps",
    "trust_remote_code": "only for hub models that need their own code",
}


def parse_args(argv=None):
    """The knobs above plus TRL-only ones; opgrpo_min.resolve_config checks every range, with its messages."""
    p = harness.cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for k, words in HELP.items():
        flag, d = "--" + k.replace("_", "-"), DEFAULTS[k]
        if isinstance(d, bool):
            p.add_argument(flag, action="store_true", help=words)
        else:
            p.add_argument(
                flag,
                type=str if d is None else type(d),
                default=d,
                metavar=k.upper(),
                help=words if d is None else f"{words} (default: {d})",
            )
    p.add_argument(
        "--vllm", action="store_true", help="generate with vLLM in colocate mode (pip install vllm)"
    )
    p.add_argument(
        "--report-to", default="none", help="TRL's loggers: none, wandb, tensorboard, ..."
    )
    a = p.parse_args(argv)
    knobs = {k: getattr(a, k) for k in HELP}
    om.resolve_config(
        om.Config(
            **dict(knobs, sft_steps=None if a.sft_steps == -1 else a.sft_steps, steps=a.steps or 1),
            preset="gpu",
        )
    )
    if a.steps == 0 and a.sft_steps == 0:
        p.error(
            "--steps 0 --sft-steps 0: nothing to do; --steps 0 runs only the SFT warm start (--sft-steps -1 or N)"
        )
    if a.dual_clip and a.dual_clip <= 1 + a.clip_eps:
        p.error(
            f"--dual-clip {a.dual_clip}: TRL's cap (delta) acts as a dual clip only above 1 + --clip-eps"
        )
    return a


def grpo_config(a, world_size):
    """The paper's GRPO as TRL GRPOConfig fields (TRL 1.16). One optimizer step sees P x G / updates answers:
    micro_batch per process x world_size processes x gradient accumulation."""
    from trl import GRPOConfig

    answers, per_pass = a.prompts_per_step * a.group_size, a.micro_batch * world_size
    if answers % (a.updates_per_step * per_pass):
        raise ValueError(
            f"--prompts-per-step {a.prompts_per_step} x --group-size {a.group_size} = {answers} answers "
            f"must split into --updates-per-step {a.updates_per_step} updates of --micro-batch "
            f"{a.micro_batch} x {world_size} processes; change one of them"
        )
    cuda = torch.cuda.is_available()
    return GRPOConfig(
        output_dir=a.out,
        seed=a.seed,
        report_to=a.report_to,
        trust_remote_code=a.trust_remote_code,
        num_generations=a.group_size,  # G answers per prompt (paper 10)
        generation_batch_size=answers,  # P x G answers sampled per RL step, all processes (paper 10240)
        max_completion_length=a.max_new_tokens,  # answer cap (paper 800); TRL 1.16 never cuts a prompt
        temperature=a.temperature,  # paper 1.0; TRL scores log-probs at this temperature too
        top_p=a.top_p,
        top_k=0,  # paper 1.0, and no top-k
        per_device_train_batch_size=a.micro_batch,  # answers per forward/backward on each process
        gradient_accumulation_steps=answers
        // (a.updates_per_step * per_pass),  # ... up to one mini-batch update
        num_iterations=1,  # passes over each batch (verl: ppo_epochs); the paper's 4 updates
        # are mini-batches of one pass: steps_per_generation = 4 x accum
        epsilon=a.clip_eps,
        epsilon_high=a.clip_eps,  # ratio clip [1 - e, 1 + e], symmetric (paper 0.2)
        delta=a.dual_clip
        or None,  # ratio capped at c in the unclipped branch: for A < 0 this is the
        # recipe's dual clip c = 3; for A > 0 it changes nothing (c > 1 + e)
        beta=a.beta,  # k3 KL weight (paper 0.001); TRL does not clamp its log-ratio
        loss_type="dapo",  # token-mean over all answer tokens of the mini-batch, all processes
        scale_rewards="group",  # A = (r - mean) / (std + 1e-4) per group; TRL fixes eps at 1e-4
        learning_rate=a.lr,
        lr_scheduler_type="constant",  # paper 1e-6, constant (TRL's default schedule is linear)
        weight_decay=a.weight_decay,  # paper 0.01 (TrainingArguments' default is 0)
        max_grad_norm=a.grad_clip,  # paper 1.0
        max_steps=a.steps * a.updates_per_step,  # TRL counts optimizer steps
        logging_steps=a.updates_per_step,  # one log row per RL step
        save_strategy="steps" if a.save_every else "no",
        save_steps=max(1, a.save_every * a.updates_per_step),
        disable_dropout=True,  # the sampler and the learner must be the same function
        gradient_checkpointing=bool(a.gradient_checkpointing),
        bf16=cuda,
        use_cpu=not cuda,
        use_vllm=a.vllm,
        vllm_mode="colocate",  # vLLM shares each GPU with training
        vllm_importance_sampling_correction=False,  # as the paper's verl run: no vLLM-vs-trainer reweighting
    )


# ================================================================ data: our loaders, conversational rows
def grpo_dataset(items):
    """One row per situation: the implicit prompt as chat messages (TRL applies the template), and the columns
    TRLReward reads: the reference answer and the situation (its words are masked in answers)."""
    from datasets import Dataset

    return Dataset.from_dict(
        dict(
            prompt=[prompt_messages(s.situation) for s in items],
            reference=[om.reference_answer(s) for s in items],
            situation=[s.situation for s in items],
        )
    )


# ================================================================ the reward: reward.py's OP reward as TRL calls it
class TRLReward:
    """The OP reward as a TRL GRPOTrainer reward function, for training on many GPUs:
        GRPOTrainer(model, reward_funcs=TRLReward(), train_dataset=ds)   # columns: prompt, reference, situation
    TRL passes the prompts, the completions (strings or [{"role": "assistant", "content": ...}]) and every
    other dataset column by name. 'reference' is required; without 'situation' nothing is masked (with a warning).
    embedder: a SentenceTransformer, a hub id or local directory, or None for the embedded MiniLM."""

    def __init__(
        self,
        embedder=None,
        mask_keywords="answer",
        min_perspectives=0,
        coverage_threshold=reward.COVERAGE_THRESHOLD,
        uniqueness_threshold=reward.UNIQUENESS_THRESHOLD,
    ):
        if (
            mask_keywords not in reward.MASK_MODES
        ):  # before the embedder loads, not at the first step
            raise ValueError(
                f"mask_keywords must be one of {reward.MASK_MODES}, got {mask_keywords!r}"
            )
        self.embedder = (
            embedder if hasattr(embedder, "encode") else harness.models.load_embedder(embedder)
        )
        self.options = dict(
            mask_keywords=mask_keywords,
            min_perspectives=min_perspectives,
            coverage_threshold=coverage_threshold,
            uniqueness_threshold=uniqueness_threshold,
        )
        self.__name__ = "op_reward"  # TRL logs a reward function by its __name__

    def __call__(self, prompts=None, completions=None, reference=None, situation=None, **kwargs):
        if reference is None:
            raise ValueError(
                "TRLReward needs the dataset column 'reference' (each prompt's reference answer text "
                "or its list of perspectives)"
            )
        if situation is None and self.options["mask_keywords"] != "none":
            warnings.warn("TRLReward: no 'situation' column, so no keyword is masked", stacklevel=2)
        texts = [
            c
            if not isinstance(c, list)
            else "".join(
                m.get("content") or "" for m in c if m.get("role", "assistant") == "assistant"
            )
            for c in completions
        ]
        return [
            b.total
            for b in reward.score_answers(
                texts, reference, self.embedder, situations=situation, **self.options
            )
        ]


# ================================================================ stage 0: SFT warm start
def sft_warm_start(model, tok, items, a):
    """TRL's SFTTrainer on (implicit prompt -> reference answer), loss on the answer only; the paper's recipe:
    full fine-tune, cosine, 10 % warm-up, AdamW (0.9, 0.95), weight decay 0.01, clip 1.0. Returns the saved dir."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = Dataset.from_dict(
        dict(
            prompt=[prompt_messages(s.situation) for s in items],
            completion=[[{"role": "assistant", "content": om.reference_answer(s)}] for s in items],
        )
    )
    path, cuda = os.path.join(a.out, "sft"), torch.cuda.is_available()
    cfg = SFTConfig(
        output_dir=path,
        max_steps=a.sft_steps,
        num_train_epochs=1,
        per_device_train_batch_size=a.sft_batch,
        learning_rate=a.sft_lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.01,
        max_grad_norm=1.0,
        max_length=DEFAULTS["max_prompt_len"] + a.max_new_tokens,  # as opgrpo_min's SFT examples
        gradient_checkpointing=bool(a.gradient_checkpointing),
        bf16=cuda,
        use_cpu=not cuda,
        save_strategy="no",
        logging_steps=1,
        report_to=a.report_to,
        seed=a.seed,
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=rows, processing_class=tok)
    trainer.train()
    trainer.save_model(path)
    trainer.accelerator.wait_for_everyone()  # every process loads the warm start from disk next
    return path


# ================================================================ stage 2: GRPO on TRL
def train(a, reward_fn=None):
    """Load and check the inputs, warm-start if asked, run GRPO; returns the trainer (its state.log_history holds
    the per-step rows). reward_fn defaults to TRLReward with the chosen similarity model."""
    items = harness.data.load_situations(
        a.train_data
    )  # every input is checked before anything is loaded or written
    (
        harness.models.check_model_path(a.model, "--model"),
        harness.models.check_model_path(a.sim_model, "--sim-model"),
    )
    harness.runs.claim_out_dir(a.out)
    from trl import GRPOTrainer

    cfg = (
        grpo_config(a, int(os.environ.get("WORLD_SIZE", "1"))) if a.steps else None
    )  # checked before any SFT
    model, tok = a.model, None
    if model is None:  # the embedded GGUF: opgrpo_min's loader converts it to a plain model
        model, tok = harness.models.load_policy(
            model, device="cpu", trust_remote_code=a.trust_remote_code
        )
    if a.sft_steps:
        model, tok = (
            sft_warm_start(model, tok, items, a),
            None,
        )  # the reference model is the warm start
    if cfg is None:
        return None
    if (
        reward_fn is None
    ):  # after GRPOConfig has set up the processes: each loads the embedder on its own GPU
        reward_fn = TRLReward(
            a.sim_model, mask_keywords=a.mask_keywords, min_perspectives=a.min_perspectives
        )
    from extras.lora import lora_config

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_fn,
        args=cfg,
        train_dataset=grpo_dataset(items),
        processing_class=tok,
        peft_config=lora_config(a.lora_rank) if a.lora_rank else None,
    )
    trainer.train()
    trainer.save_model(os.path.join(a.out, "final"))
    return trainer


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    harness.cli.run_cli(main)
