"""Run folders: nothing half written or lost (atomic writes and swaps, refusing a folder that holds a run),
checkpoints and the fingerprints a resume checks. A reader of the method may skip this file: it holds no rule of
the paper."""

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile

import numpy as np
import torch

from harness.data import sha256_of


def settle(path):
    """Put a directory that atomic_save was swapping back in order after a kill: a `path`.old beside `path` is the
    previous copy, stale (whole or half deleted) and removed; a `path`.old alone is the last whole copy (the kill fell
    between the two renames) and becomes `path` again."""
    old = path + ".old"
    if os.path.exists(old):
        if os.path.exists(path):
            shutil.rmtree(old)
        else:
            os.replace(old, path)


def atomic_save(path, write):
    """Call write(tmp_dir), then swap tmp_dir into place: a kill at any instruction leaves `path` or `path`.old
    whole, and the next save (or a resume) settles which."""
    tmp, old = path + ".tmp", path + ".old"
    settle(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)  # what a kill leaves of it, the next settle removes


@contextlib.contextmanager
def replaced(path):
    """A temporary path beside `path` that replaces it (os.replace, atomic) when the block ends without error: a kill
    or a failure leaves the old file or the new one, never half of one (a stale PATH.tmp is overwritten next time)."""
    tmp = f"{path}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    """Replace the file `path` with `text` atomically (see replaced)."""
    with replaced(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def claim_out_dir(path, holds=(), overwrite=False, hint="", flag="--out", dry_run=False):
    """Make `path` the output directory, or one clear line: it is a file, it cannot be written to, or it holds
    earlier work (any of the names in `holds`). --overwrite moves that work aside to PATH.replaced-N: nothing is
    deleted, so a new run that fails never costs the old one. dry_run: the first two checks only, nothing made."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{flag} {path}: is a file; pass a directory")
    found = [h for h in holds if os.path.exists(os.path.join(path, h))]
    if found and not overwrite:
        raise FileExistsError(
            f"{flag} {path} already holds {found[0]} of an earlier run: {hint}"
            f"start over with --overwrite (the earlier run is moved aside, not deleted)"
        )
    if dry_run:
        return
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot write there ({e.strerror})") from None
    if found:
        aside = next(
            f"{path.rstrip('/')}.replaced-{k}"
            for k in range(1, 10**6)
            if not os.path.exists(f"{path.rstrip('/')}.replaced-{k}")
        )
        os.replace(path, aside)
        os.makedirs(path)
        print(f"[out] --overwrite: the earlier run in {path} was moved to {aside}", file=sys.stderr)


def fingerprints(data_file, tokenizer):
    """The sha256 of the training data file and of the chat template: two of what a resume checks is unchanged."""
    template = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()
    return dict(data=sha256_of(data_file), chat_template=template)


def save_checkpoint(out, model, tokenizer, optimizer, step, cfg, fingerprints):
    """out/checkpoint: the policy (save_pretrained) and tokenizer; trainer_state.json (step, config, Python and numpy
    RNG, and the fingerprints a resume checks: the KL reference, the data, the chat template, metrics.jsonl up to
    this step) and trainer_state.pt (optimizer and torch RNG, tensors only: it loads with weights_only=True)."""
    history = "".join(
        line
        for line in open(os.path.join(out, "metrics.jsonl"), encoding="utf-8")
        if json.loads(line)["step"] <= step
    )
    prints = dict(fingerprints, metrics=hashlib.sha256(history.encode()).hexdigest())

    def write(tmp):
        model.save_pretrained(tmp)  # load_policy returns plain models (never GGUF-bound)
        tokenizer.save_pretrained(tmp)
        rng = rng_state()
        torch.save(
            dict(
                optimizer=optimizer.state_dict(),
                torch_rng=rng.pop("torch"),
                cuda_rng=rng.pop("cuda"),
            ),
            os.path.join(tmp, "trainer_state.pt"),
        )
        write_text(
            os.path.join(tmp, "trainer_state.json"),
            json.dumps(
                dict(step=step, config=dataclasses.asdict(cfg), rng=rng, fingerprints=prints)
            ),
        )

    atomic_save(os.path.join(out, "checkpoint"), write)


def rng_state():
    """Every RNG the run draws from, as plain data (Python, numpy) and tensors (torch, CUDA)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(
        python=random.getstate(),
        numpy=[name, keys.tolist(), pos, has_gauss, gauss],
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )
