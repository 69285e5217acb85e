"""--lora-rank R: a LoRA adapter trains instead of the whole policy (pip install peft)."""

import os


def lora_config(rank):
    """The LoRA adapter of --lora-rank: every linear layer of the blocks, alpha = 2 x rank, no dropout (dropout
    would make the sampler and the learner differ). peft keeps the adapter in float32 on a bf16 model."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def with_lora(model, rank):
    """The model frozen, with a fresh LoRA adapter (peft) that trains instead: optimizer state for the adapter only,
    and with the adapter off (model.disable_adapter()) the model is the base again, so the reference needs no copy."""
    try:
        from peft import get_peft_model
    except ImportError:
        raise ImportError(
            "--lora-rank needs peft: pip install peft (or pip install -r requirements-extra.txt)"
        ) from None
    return get_peft_model(model, lora_config(rank))


def load_adapter_weights(policy, checkpoint):
    """The adapter weights a checkpoint holds, put into a LoRA policy (a --resume of a LoRA run)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(
        policy, load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    )
