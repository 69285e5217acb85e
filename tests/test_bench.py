import json
from types import SimpleNamespace

import pytest
import torch

import bench
import opgrpo_min as om

TINY = dict(bench.SHAPES["qwen2.5-3b"], hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64)


def test_floors_match_a_hand_computed_step():
    config = SimpleNamespace(num_hidden_layers=2, num_key_value_heads=1, hidden_size=8, num_attention_heads=2)
    f = bench.floors((config, 100, 4), P=1, G=2, L=3, T=2, bandwidth=1000.0, flops=1e4, n_logprob_forwards=1)
    # KV bytes per token 2 x 2 layers x 1 head x 4 dims x 4 bytes = 64; decode (2 x 400 + 2 x 64 x (6 + 3)) / 1000
    assert f["t_generate"] == pytest.approx(1.952)
    assert f["t_logprob"] == pytest.approx(2 * 100 * 10 / 1e4)        # 10 tokens = 2 answers x (3 + 2)
    assert f["t_update"] == pytest.approx(6 * 100 * 10 / 1e4)
    assert f["t_step"] == pytest.approx(1.952 + 0.2 + 0.6)


def test_synthetic_tokenizer_is_deterministic_per_prompt_and_narrower_than_the_model():
    tok = bench.SyntheticTokenizer(prompt_len=7)
    a, b = tok(["one prompt", "another"]).input_ids, tok(["one prompt"]).input_ids
    assert a.shape == (2, 7) and torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1])
    assert int(a.max()) < tok.pad_token_id and len(tok) < bench.SHAPES["qwen2.5-3b"]["vocab_size"]


def test_shape_needs_random_init_said_out_loud():
    with pytest.raises(SystemExit):
        bench.parse_args(["--shape", "qwen2.5-3b"])


@pytest.mark.parametrize("beta, updates, forwards_per_step", [(0.001, 1, 2), (0.0, 1, 1), (0.001, 2, 4)])
def test_a_step_does_no_forward_it_does_not_need(monkeypatch, tmp_path, beta, updates, forwards_per_step):
    """beta = 0: no reference forward; one update per batch: no old log-prob forward (ratio is 1 by definition).
    With 2 updates the 2 answers go one per mini-batch: old + ref + 2 policy forwards."""
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)
    calls = []
    real = om.token_logprobs
    monkeypatch.setattr(om, "token_logprobs", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = tmp_path / "bench.json"
    bench.main(["--shape", "tiny", "--random-init", "--device", "cpu", "--prompts", "1", "--group-size", "2",
                "--max-new-tokens", "4", "--prompt-len", "6", "--steps", "2", "--warmup", "0", "--beta", str(beta),
                "--updates-per-step", str(updates), "--out", str(out)])
    res = json.load(open(out))
    run, = res["runs"]
    assert len(calls) == 2 * forwards_per_step
    assert [r["answer_len"] for r in run["rows"]] == [4.0, 4.0]         # length forced: the same work every step
    assert set(run["summary"]) >= set(bench.PHASES) and run["floor"]["t_step"] > 0 and run["peak_gb"] > 0
    assert res["env"]["torch"] == torch.__version__
