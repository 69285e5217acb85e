import argparse
import json
from types import SimpleNamespace

import pytest
import torch

import opgrpo_min as om
from bench import run as bench

TINY = dict(
    bench.SHAPES["qwen2.5-3b"],
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
)


def test_floors_match_a_hand_computed_step():
    config = SimpleNamespace(
        num_hidden_layers=2, num_key_value_heads=1, hidden_size=8, num_attention_heads=2
    )
    f = bench.floors(
        (config, 100, 4), P=1, G=2, L=3, T=2, bandwidth=1000.0, flops=1e4, n_logprob_forwards=1
    )
    # KV bytes per token 2 x 2 layers x 1 head x 4 dims x 4 bytes = 64; decode (2 x 400 + 2 x 64 x (6 + 3)) / 1000
    assert f["t_generate"] == pytest.approx(1.952)
    assert f["t_logprob"] == pytest.approx(2 * 100 * 10 / 1e4)  # 10 tokens = 2 answers x (3 + 2)
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


@pytest.mark.parametrize(
    "beta, updates, forwards_per_step", [(0.001, 1, 2), (0.0, 1, 1), (0.001, 2, 4)]
)
def test_a_step_does_no_forward_it_does_not_need(
    monkeypatch, tmp_path, beta, updates, forwards_per_step
):
    """beta = 0: no reference forward; one update per batch: no old log-prob forward (ratio is 1 by definition).
    With 2 updates the 2 answers go one per mini-batch: old + ref + 2 policy forwards."""
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)
    calls = []
    real = om.token_logprobs
    monkeypatch.setattr(om, "token_logprobs", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out = tmp_path / "bench.json"
    bench.main(
        [
            "--shape",
            "tiny",
            "--random-init",
            "--device",
            "cpu",
            "--prompts",
            "1",
            "--group-size",
            "2",
            "--max-new-tokens",
            "4",
            "--prompt-len",
            "6",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--beta",
            str(beta),
            "--updates-per-step",
            str(updates),
            "--out",
            str(out),
        ]
    )
    res = json.load(open(out))
    (run,) = res["runs"]
    assert len(calls) == 2 * forwards_per_step
    assert [r["answer_len"] for r in run["rows"]] == [
        4.0,
        4.0,
    ]  # length forced: the same work every step
    assert (
        set(run["summary"]) >= set(bench.PHASES)
        and run["floor"]["t_step"] > 0
        and run["peak_gb"] > 0
    )
    assert res["env"]["torch"] == torch.__version__


# ---------------------------------------------------------------- --simulate: peak memory under fake tensors
def sim_args(**kw):
    base = dict(
        shape="small",
        layers=1,
        prompts=1,
        group_size=2,
        max_new_tokens=4,
        micro_batch=2,
        beta=0.001,
        gradient_checkpointing=1,
        updates_per_step=2,
        lora_rank=0,
        prompt_len=8,
        decode_steps=0,
    )
    return argparse.Namespace(**dict(base, **kw))


def test_the_fake_step_counts_what_the_real_step_allocates_and_names_it():
    """The same step under fake tensors and for real (bf16, CPU): the tracker sees the same peak, and its categories
    are the sizes they must be: bf16 weights 2 bytes per parameter, float32 masters 4, AdamW's two moments 8."""
    fake, real = (
        bench.simulate_step(sim_args(), fake=True),
        bench.simulate_step(sim_args(), fake=False),
    )
    assert fake["peak_gb"] == pytest.approx(real["peak_gb"], rel=1e-6)
    shape = dict(bench.SHAPES["small"], num_hidden_layers=1)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2ForCausalLM(Qwen2Config(**shape)).parameters())
    at = fake["at_peak_gb"]
    assert at["weights"] == pytest.approx(2 * n / 1e9) and at["reference model"] == pytest.approx(
        2 * n / 1e9
    )
    assert at["master copies"] == pytest.approx(4 * n / 1e9) and at[
        "AdamW moments"
    ] == pytest.approx(8 * n / 1e9)
    assert (
        sum(at.values()) <= fake["peak_gb"] + 1e-9
        and sum(at.values()) >= fake["peak_gb"] / 1.005 - 1e-9
    )


def test_lora_needs_no_reference_copy_and_few_moments():
    pytest.importorskip("peft")
    at = bench.simulate_step(sim_args(lora_rank=4), fake=True)["at_peak_gb"]
    assert at["reference model"] == 0 and at["master copies"] == 0
    assert 0 < at["AdamW moments"] < at["weights"] / 20


def test_simulate_from_the_command_line_writes_the_runs_and_which_card_they_fit(tmp_path):
    out = tmp_path / "sim.json"
    r = bench.main(
        [
            "--simulate",
            "--shape",
            "small",
            "--layers",
            "1",
            "--prompts",
            "1",
            "--group-size",
            "2",
            "--max-new-tokens",
            "4",
            "--micro-batch",
            "2",
            "--updates-per-step",
            "2",
            "--prompt-len",
            "8",
            "--out",
            str(out),
        ]
    )
    saved = json.load(open(out))
    assert [x["name"] for x in saved["runs"]] == ["preset"] and saved["runs"][0]["knobs"][
        "gradient_checkpointing"
    ] == 1
    assert saved["fits"]["preset"] == {str(c): True for c in bench.CARDS}  # well under 1 GB
    assert r["runs"][0]["peak_gb"] == saved["runs"][0]["peak_gb"]


def test_two_micro_batches_per_update_give_the_full_peak():
    """--simulate keeps two micro-batches per mini-batch update after the rollout; all of them give the same peak."""
    kw = dict(prompts=2, group_size=4, micro_batch=1, updates_per_step=2)
    short = bench.simulate_step(sim_args(**kw), fake=True)
    full = bench.simulate_step(sim_args(two_micro_batches=False, **kw), fake=True)
    # equal but for the rows left out of the small [B, T] log-probs and [B, L + T] masks: 1 KB here
    assert short["peak_gb"] == pytest.approx(full["peak_gb"], abs=2e-6)
