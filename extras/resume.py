"""--resume DIR: continue the run saved in DIR exactly, or refuse with one line that says what differs.

Where a run goes on from (load): its last checkpoint (harness.runs.save_checkpoint: the policy, the optimizer, every
RNG, the step, the config, and fingerprints of what the run depends on); else, when it stopped before its first
checkpoint, GRPO step 0 from its saved SFT model (out/sft); else, when it stopped during SFT, its start: SFT runs
again, since nothing of it was saved. A resume refuses:
- a knob given with another value than the run's, except --steps, --save-every and --sample-every;
- a KL reference, training data file or chat template whose sha256 differs from the one the run started with;
- a metrics.jsonl that is missing, shorter than the checkpoint's step, or not that run's history;
- a checkpoint past --steps, a damaged checkpoint file, and a trainer state that holds Python objects (loading those
  could run code: tensors load with weights_only=True).
"""

import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import zipfile

import numpy as np
import torch

from harness.data import DataError, check_prompts, load_situations
from harness.models import load_policy, model_fingerprint
from harness.runs import fingerprints, settle, write_text


@dataclasses.dataclass
class Saved:
    """What --resume found in a run folder, and where the run goes on from (see load)."""

    cfg: object  # the run's config, with the knobs a resume may change changed
    step: int  # the GRPO step it goes on from
    start: str  # the model loaded first: out/sft, or --model (no SFT, or SFT to run again)
    start_over_sft: bool  # it stopped during SFT: SFT runs again
    where: str  # what the log line says of the start
    fingerprints: dict  # what the run started with
    checkpoint: str = None  # out/checkpoint, when there is one
    state: dict = None  # its trainer_state.json
    tensors: dict = None  # its trainer_state.pt
    history: list = None  # the lines of metrics.jsonl up to its step

    def check_same(self, now):
        """Refuse a resume whose data, chat template or (when `now` holds it) KL reference is not the run's."""
        what = dict(
            reference="the KL reference (sft/, or --model when SFT was skipped)",
            data="the training data file",
            chat_template="the chat template of the checkpoint's tokenizer",
        )
        for k in [k for k in what if k in now]:
            if self.fingerprints.get(k) != now[k]:
                raise ValueError(
                    f"--resume {self.cfg.out}: {what[k]} is not what the run started with (its fingerprint "
                    f"{now[k][:16]} is not {str(self.fingerprints.get(k))[:16]}): the resume would continue "
                    f"another run; restore it, or start over with --overwrite"
                )

    def restore(self, policy, optimizer, prints):
        """Put the saved run in place of a fresh GRPO start: the checkpoint's weights (its adapter's, for a LoRA
        policy) into `policy`, the optimizer's state, every RNG, and metrics.jsonl up to the step. Returns the step.
        Without a checkpoint the fresh start is the run's own: an empty metrics.jsonl, step 0."""
        metrics = os.path.join(self.cfg.out, "metrics.jsonl")
        if self.checkpoint is None:
            write_text(metrics, "")
            return 0
        self.check_same(prints)
        if hasattr(policy, "disable_adapter"):
            from extras.lora import load_adapter_weights

            load_adapter_weights(policy, self.checkpoint)
        else:
            from transformers import AutoModelForCausalLM

            trust = self.cfg.trust_remote_code
            saved = AutoModelForCausalLM.from_pretrained(
                self.checkpoint, dtype=policy.dtype, trust_remote_code=trust
            )
            policy.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(self.tensors["optimizer"])
        set_rng_state(self.state["rng"], self.tensors)
        write_text(metrics, "".join(self.history))
        return self.step


def resume_training(cfg, om):
    """--resume DIR of opgrpo_min.py (`om`, passed in: no module imports its way back to itself): the run in DIR goes
    on as if it had not stopped, from its last checkpoint, or from GRPO step 0 with its saved SFT model when it
    stopped before the first checkpoint (a stop during SFT runs SFT again: nothing of it was saved). Refused, with
    one line, when it would not continue the run exactly: another knob, reference, data file or chat template."""
    saved = load(cfg, om.Config, om.RESUMABLE)
    cfg = om.resolve_config(saved.cfg)
    items = load_situations(cfg.train_data)
    dtype = getattr(torch, cfg.dtype)
    model, tok = load_policy(saved.start, cfg.device, dtype, cfg.trust_remote_code)
    check_prompts(tok, items, cfg.max_prompt_len, lambda s: om.chat_prompt(tok, s))
    saved.check_same(fingerprints(cfg.train_data, tok))
    write_text(os.path.join(cfg.out, "config.json"), json.dumps(dataclasses.asdict(cfg), indent=1))
    print(f"resuming {cfg.out} at {saved.where}")
    if saved.start_over_sft:
        om.set_seed(cfg.seed)
        model = om.sft_stage(model, tok, items, cfg)
    return om.grpo_stage(model, tok, items, cfg, saved)


def load(given, config_class, resumable):
    """Saved: where the run in --resume DIR goes on from, after every check that needs no model (the knobs, the
    step, the metrics history)."""
    ckpt = os.path.join(given.resume, "checkpoint")
    settle(ckpt)
    if not os.path.isfile(os.path.join(ckpt, "trainer_state.json")):
        return before_checkpoint(given, config_class, resumable)
    state, tensors = load_trainer_state(ckpt, config_class)
    check_weights(ckpt)
    cfg = resumed_config(given, state["config"], resumable)
    step, metrics = state["step"], os.path.join(cfg.out, "metrics.jsonl")
    if step > cfg.steps:
        raise ValueError(
            f"--steps {cfg.steps}: the checkpoint in {cfg.out} is at step {step}; pass --steps {step} "
            f"or more"
        )
    lines = history(metrics, step)
    prints = state.get("fingerprints", {})
    if hashlib.sha256("".join(lines).encode()).hexdigest() != prints.get("metrics"):
        why = (
            "is missing"
            if not os.path.exists(metrics)
            else f"is not the history of the checkpoint (it holds {len(lines)} rows up to step "
            f"{step}, or another run's)"
        )
        raise ValueError(
            f"{metrics} {why}: a resume would lose or mix metrics; restore the file, or start over with "
            f"--overwrite"
        )
    start = os.path.join(cfg.out, "sft") if cfg.sft_steps != 0 else cfg.model
    saved = Saved(cfg, step, start, False, f"step {step}", prints, ckpt, state, tensors, lines)
    saved.check_same(dict(reference=model_fingerprint(start)))  # before any model loads
    return saved


def before_checkpoint(given, config_class, resumable):
    """Saved for a run that stopped before its first checkpoint: GRPO step 0 from its saved SFT model (from --model
    when it skips SFT), or its start when it stopped during SFT."""
    out = given.resume
    config, prints = os.path.join(out, "config.json"), os.path.join(out, "fingerprints.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(
            f"--resume {out}: no run in that directory (no checkpoint/ and no config.json)"
        )
    try:
        with open(config, encoding="utf-8") as f:
            saved = config_class(**json.load(f))
        with open(prints, encoding="utf-8") as f:
            fingerprints = json.load(f)
    except (OSError, ValueError, TypeError) as e:
        raise DataError(
            f"--resume {out}: it holds no checkpoint, and its config.json or fingerprints.json cannot be "
            f"read ({' '.join(str(e).split())[:80]}): start over with --overwrite"
        ) from None
    cfg = resumed_config(given, saved, resumable)
    sft = os.path.join(out, "sft")
    settle(sft)
    if cfg.sft_steps == 0:
        return Saved(cfg, 0, cfg.model, False, "GRPO step 0", fingerprints)
    if os.path.isfile(os.path.join(sft, "config.json")):
        check_weights(sft)
        return Saved(cfg, 0, sft, False, "GRPO step 0, from its saved SFT model", fingerprints)
    where = "its start: it stopped during SFT, which was not saved and runs again"
    return Saved(cfg, 0, cfg.model, True, where, fingerprints)


def load_trainer_state(ckpt, config_class):
    """(plain data with data['config'] a config_class, tensors) of a checkpoint; a damaged or foreign file is one
    line that names it. The tensors load with weights_only=True: a file holding any other Python object is refused."""
    path = os.path.join(ckpt, "trainer_state.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data["config"] = config_class(**data["config"])
        assert isinstance(data["step"], int) and {"python", "numpy"} <= set(data["rng"]), (
            "no step or RNG state"
        )
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise DataError(
            f"{path}: not a trainer state of this version of opgrpo_min.py ({e}); the checkpoint "
            f"cannot be resumed: start over with --overwrite"
        ) from None
    path = os.path.join(ckpt, "trainer_state.pt")
    try:
        if not zipfile.is_zipfile(
            path
        ):  # torch.save writes a zip archive: anything else was cut or replaced
            raise OSError("not an archive torch.save wrote")
        return data, torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(
            f"{path}: refused: it holds Python objects besides tensors, and loading them could run code "
            f"(opgrpo_min.py writes tensors only). Do not resume from files you do not trust"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise DataError(
            f"{path}: damaged ({str(e)[:80]}); the checkpoint cannot be resumed: start over with "
            f"--overwrite"
        ) from None


def check_weights(ckpt):
    """Every weights file of the checkpoint opens whole (safetensors checks its header against the file's size)."""
    from safetensors import safe_open

    for name in sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors")):
        try:
            with safe_open(os.path.join(ckpt, name), "pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error type for a damaged file
            raise DataError(
                f"{os.path.join(ckpt, name)}: damaged ({str(e)[:80]}); the checkpoint cannot be "
                f"resumed: start over with --overwrite"
            ) from None


def resumed_config(given, saved, resumable):
    """The saved run's config. A knob given again must keep its saved value, unless it only extends or reports the
    run (`resumable`): anything else (model, data, G, lengths, lr, reward options, seed, ...) would mix two runs. A
    path given in another spelling counts as the same. The knobs given are those parse_args recorded."""
    cfg = dataclasses.replace(saved, out=given.resume, resume=given.resume)
    flags = ["--" + r.replace("_", "-") for r in resumable]
    same = lambda a, b: (
        a == b
        or isinstance(a, str)
        and isinstance(b, str)
        and os.path.exists(a)
        and os.path.exists(b)
        and os.path.samefile(a, b)
    )
    knobs = getattr(given, "_set", None) or {
        f.name for f in dataclasses.fields(given) if getattr(given, f.name) != f.default
    }
    for k in sorted(knobs - {"resume"}):
        new, old = getattr(given, k), (given.resume if k == "out" else getattr(saved, k))
        if k in resumable:
            setattr(cfg, k, new)
        elif not same(new, old):
            raise ValueError(
                f"--{k.replace('_', '-')} {new}: the run in {given.resume} has {old}, and a resume keeps "
                f"it; only {', '.join(flags[:-1])} and {flags[-1]} may change. "
                f"To change it, start a new run (another --out)"
            )
    return cfg


def history(metrics, step):
    """The lines of metrics.jsonl up to `step`: rows past the checkpoint are run again, and a kill mid-append may
    have left half a row, which does not parse and is dropped."""

    def row_step(line):  # a row that is not an object with a whole-number step is no row of ours
        try:
            n = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError, IndexError, RecursionError):
            return math.inf
        return n if isinstance(n, int) and not isinstance(n, bool) else math.inf

    # bytes that are not UTF-8 become U+FFFD: the history then differs and is refused; a missing file or a
    # directory holds no history, which the checkpoint's fingerprint refuses
    return (
        [
            line
            for line in open(metrics, encoding="utf-8", errors="replace")
            if row_step(line) <= step
        ]
        if os.path.isfile(metrics)
        else []
    )


def set_rng_state(rng, tensors):
    """Every RNG as the checkpoint saved it (harness.runs.rng_state)."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_rng"])
    if tensors["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
