"""sim_train.py --judge MODEL: the judge that eval_judge.judge_triplets asks which similar sentences say the same.

The judge is a local causal LM (read from its next-token logits) or, with --judge-url, any model behind an
OpenAI-compatible endpoint (eval_judge.py's client). The rule that turns its answers into triplets is the paper's and
lives with the judge: eval_judge.judge_triplets.
"""

import numpy as np
import torch

from eval_judge import JUDGE_QUESTION
from harness.models import load_policy


def judge_for(judge, url=None, device="cpu"):
    """The pair judge of sim_train.py --judge: a list of (a, b) pairs -> list of bools, Yes = the same meaning or
    perspective. With --judge-url the model behind that OpenAI-compatible endpoint answers (eval_judge.py's client);
    else a local causal LM ('embedded': the SmolLM2-135M, a weak judge), read from its next-token logits."""
    if url:
        from eval_judge import ask_yes_no

        return lambda pairs: ask_yes_no(pairs, judge, JUDGE_QUESTION, base_url=url)
    lm, tok = load_policy(None if judge == "embedded" else judge, device)
    return lambda pairs: judge_margins(lm, tok, pairs, JUDGE_QUESTION) > 0


def judge_margins(model, tokenizer, pairs, question, batch_size=8):
    """logit('Yes') - logit('No') of the next token after `question` (a format string with {a} and {b}, in the
    model's chat template), one forward per batch of pairs and no generation: > 0 means the model says Yes.
    'Yes' / ' Yes' both count."""
    from tqdm.auto import tqdm

    ids = {
        w: sorted({tokenizer.encode(v, add_special_tokens=False)[0] for v in (w, " " + w)})
        for w in ("Yes", "No")
    }
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question.format(a=a, b=b)}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for a, b in pairs
    ]
    tokenizer.padding_side, margins = "left", []  # left padding: every prompt's last token is at -1
    for k in tqdm(
        range(0, len(prompts), batch_size), desc="judge", disable=len(prompts) <= batch_size
    ):
        enc = tokenizer(
            prompts[k : k + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        enc = enc.to(model.device)
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(
            min=0
        )  # [b, T]: padding does not shift RoPE
        with torch.no_grad():
            last = model(**enc, position_ids=pos).logits[:, -1].float()  # [b, vocab]
        margins += (last[:, ids["Yes"]].max(-1).values - last[:, ids["No"]].max(-1).values).tolist()
    return np.array(margins)
