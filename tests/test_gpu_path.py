"""The one-GPU path without a GPU: LoRA (--lora-rank) and the gpu preset's choices (bf16 weights, MasterAdamW,
gradient checkpointing, G 10) run end to end on the CPU with tiny models."""

import json
import os

import pytest
import torch

import harness.data
import harness.models
import opgrpo_min as om
from extras.lora import with_lora
from extras.precision import MasterAdamW


def alternating_reward(roll, _items):
    """Rewards 0, 1, 0, 1, ... within every group: every group has spread, so every answer has an advantage."""
    return [float(i % 2) for i in range(len(roll.texts))], {}


def test_lora_trains_the_adapter_only_and_its_reference_is_the_base_model(
    tiny_model_dir, monkeypatch
):
    pytest.importorskip("peft")
    model, tok = harness.models.load_policy(tiny_model_dir)
    policy = with_lora(model, 4)
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" not in n}
    adapter = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    assert adapter and all(p.requires_grad == ("lora_" in n) for n, p in policy.named_parameters())
    no_grad_calls, real = [], om.token_logprobs

    def spy(
        m, *a, **k
    ):  # the log-probs taken without gradients: per step the sampler's (old), then the reference
        out = real(m, *a, **k)
        if not torch.is_grad_enabled():
            no_grad_calls.append((a[0].clone(), a[1].clone(), out))
        return out

    monkeypatch.setattr(om, "token_logprobs", spy)
    cfg = om.resolve_config(
        om.Config(
            device="cpu",
            steps=2,
            prompts_per_step=2,
            group_size=2,
            max_new_tokens=6,
            lr=1e-2,
            micro_batch=4,
            updates_per_step=2,
            beta=0.1,
            lora_rank=4,
            sample_every=0,
            save_every=0,
        )
    )
    items = harness.data.load_situations(cfg.train_data)[:2]
    torch.manual_seed(0)
    om.grpo_train(policy, tok, items, alternating_reward, cfg, ref=policy)
    trained = dict(policy.named_parameters())
    assert all(torch.equal(trained[n], p) for n, p in base.items())  # the base never moves
    assert all(
        not torch.equal(trained[n], p) for n, p in adapter.items() if "lora_B" in n
    )  # the adapter does
    # step 2's reference log-probs are the untouched base model's, and differ from the trained policy's
    (ids, attn, ref_logp), (_, _, old_logp) = no_grad_calls[3], no_grad_calls[2]
    plain = harness.models.load_policy(tiny_model_dir)[0]
    T = ref_logp.shape[1]
    assert torch.allclose(ref_logp, real(plain, ids, attn, T), atol=1e-6)
    assert not torch.allclose(old_logp, ref_logp, atol=1e-4)


def tiny_run(model, out, steps, *extra):
    return [
        "--model",
        str(model),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--sft-steps",
        "2",
        "--sft-batch",
        "2",
        "--steps",
        str(steps),
        "--prompts-per-step",
        "1",
        "--max-new-tokens",
        "8",
        "--lr",
        "1e-3",
        "--sample-every",
        "0",
        "--save-every",
        "2",
        *extra,
    ]


def clean(rows):
    return [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]


def even_share(embedder, cfg):
    """A reward that differs within a group whatever a random model says (the share of even token ids), so the
    advantages are not all 0 and the adapter must move."""

    def fn(roll, items):
        answers, mask = roll.input_ids[:, -roll.answer_mask.shape[1] :], roll.answer_mask
        return (((answers % 2 == 0) * mask).sum(1) / mask.sum(1)).tolist(), {}

    return fn


def test_lora_run_saves_its_sft_merged_resumes_exactly_and_loads(
    tiny_model_dir, tmp_path, monkeypatch
):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(om, "rollout_rewards", even_share)

    argv = (
        "--lora-rank",
        "4",
        "--group-size",
        "2",
        "--micro-batch",
        "4",
        "--updates-per-step",
        "2",
    )
    straight = om.main(tiny_run(tiny_model_dir, tmp_path / "a", 3, *argv))
    om.main(tiny_run(tiny_model_dir, tmp_path / "b", 2, *argv))
    resumed = om.main(["--resume", str(tmp_path / "b"), "--steps", "3"])
    assert [r["step"] for r in resumed] == [1, 2, 3] and clean(resumed) == clean(straight)
    assert any(r["zero_spread"] < 1 for r in straight)  # some step has a learning signal
    # sft/ is a plain model (the SFT adapter merged); the checkpoint is the GRPO adapter over it, and loads as one
    assert os.path.isfile(tmp_path / "b" / "sft" / "config.json")
    assert os.path.isfile(tmp_path / "b" / "checkpoint" / "adapter_config.json")
    sft = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "sft")
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "checkpoint")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert not torch.allclose(sft(ids).logits, tuned(ids).logits)
    sft_plain = harness.models.load_policy(str(tmp_path / "b" / "sft"))[0]
    assert torch.equal(sft(ids).logits, sft_plain(ids).logits)


@pytest.mark.parametrize("lora", ["0", "4"])
def test_gpu_preset_runs_a_tiny_qwen_end_to_end_then_resumes_and_loads(
    tiny_qwen_dir, tmp_path, monkeypatch, lora
):
    """bf16 weights, MasterAdamW, gradient checkpointing and G 10 (the gpu preset's own), on a Qwen2ForCausalLM with
    Qwen's chat template and generation defaults: 2 steps, a resume to 3, and the checkpoint loads in bf16. With
    LoRA (the 24 GB card's way) the adapter trains in float32 under plain AdamW over the bf16 base."""
    if lora != "0":
        pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    optimizers, checkpointing = [], []
    real_adamw, real_training = om.adamw, om.training
    monkeypatch.setattr(
        om, "adamw", lambda *a, **k: optimizers.append(real_adamw(*a, **k)) or optimizers[-1]
    )
    monkeypatch.setattr(om, "training", lambda m, c: checkpointing.append(c) or real_training(m, c))
    gpu = ("--preset", "gpu", "--dtype", "bfloat16", "--lora-rank", lora)
    straight = om.main(tiny_run(tiny_qwen_dir, tmp_path / "a", 3, *gpu))
    om.main(tiny_run(tiny_qwen_dir, tmp_path / "b", 2, *gpu))
    resumed = om.main(["--resume", str(tmp_path / "b"), "--steps", "3"])
    assert [r["step"] for r in resumed] == [1, 2, 3] and clean(resumed) == clean(straight)
    cfg = json.load(open(tmp_path / "b" / "config.json"))
    assert (cfg["group_size"], cfg["gradient_checkpointing"], cfg["dtype"]) == (10, 1, "bfloat16")
    assert optimizers and all(isinstance(o, MasterAdamW) == (lora == "0") for o in optimizers)
    assert checkpointing and all(checkpointing)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "checkpoint")
    assert model.dtype == torch.bfloat16 and type(model).__name__ == "Qwen2ForCausalLM"
    assert all(r["answer_len"] > 0 for r in resumed)
