"""--resume DIR: continue the run saved in DIR exactly, or refuse with one line that says what differs.

A checkpoint (harness.runs.save_checkpoint) holds the policy, the optimizer, every RNG, the step, the config, and
fingerprints of what the run depends on. A resume refuses:
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

from harness.data import DataError
from harness.runs import settle


def find_checkpoint(out):
    """out/checkpoint, after settling a swap that a kill interrupted (harness.runs.settle)."""
    ckpt = os.path.join(out, "checkpoint")
    settle(ckpt)
    if os.path.isfile(os.path.join(ckpt, "trainer_state.json")):
        return ckpt
    hint = (
        f"; its SFT warm start is saved: start a new run from it with --model {out}/sft --sft-steps 0 --out NEW"
        if os.path.isdir(os.path.join(out, "sft"))
        else ""
    )
    raise FileNotFoundError(
        f"--resume {out}: no checkpoint in that directory (expected {ckpt}){hint}"
    )


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

    return (  # bytes that are not UTF-8 become U+FFFD: the history then differs and is refused
        [
            line
            for line in open(metrics, encoding="utf-8", errors="replace")
            if row_step(line) <= step
        ]
        if os.path.exists(metrics)
        else []
    )


def load(given, config_class, resumable):
    """(config, checkpoint dir, trainer state, tensors, metrics lines up to its step) of the run in --resume DIR,
    after every check that needs no model: the knobs, the step, and the metrics history."""
    ckpt = find_checkpoint(given.resume)
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
    if hashlib.sha256("".join(lines).encode()).hexdigest() != state.get("fingerprints", {}).get(
        "metrics"
    ):
        why = (
            "is missing"
            if not os.path.exists(metrics)
            else (
                f"is not the history of the checkpoint (it holds "
                f"{len(lines)} rows up to step {step}, or another run's)"
            )
        )
        raise ValueError(
            f"{metrics} {why}: a resume would lose or mix metrics; restore the file, or start over with "
            f"--overwrite"
        )
    return cfg, ckpt, state, tensors, lines


def check_same(saved, now, out):
    """Refuse a resume whose KL reference, data or chat template is not the one the run started with."""
    what = dict(
        reference="the KL reference (sft/, or --model when SFT was skipped)",
        data="the training data file",
        chat_template="the chat template of the checkpoint's tokenizer",
    )
    for k, name in what.items():
        if saved.get(k) != now[k]:
            raise ValueError(
                f"--resume {out}: {name} is not what the run started with (its fingerprint "
                f"{now[k][:16]} is not {str(saved.get(k))[:16]}): the resume would continue another "
                f"run; restore it, or start over with --overwrite"
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
