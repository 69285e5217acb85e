"""sim_train.py --judge MODEL: a local causal LM answers Stage 1's pair question, read from its next-token logits."""
import numpy as np
import torch


def judge_margins(model, tokenizer, pairs, question, batch_size=8):
    """logit('Yes') - logit('No') of the next token after `question` (a format string with {a} and {b}, in the
    model's chat template), one forward per batch of pairs and no generation: > 0 means the model says Yes.
    'Yes' / ' Yes' both count."""
    from tqdm.auto import tqdm
    ids = {w: sorted({tokenizer.encode(v, add_special_tokens=False)[0] for v in (w, " " + w)}) for w in ("Yes", "No")}
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": question.format(a=a, b=b)}],
                                             add_generation_prompt=True, tokenize=False) for a, b in pairs]
    tokenizer.padding_side, margins = "left", []            # left padding: every prompt's last token is at -1
    for k in tqdm(range(0, len(prompts), batch_size), desc="judge", disable=len(prompts) <= batch_size):
        enc = tokenizer(prompts[k:k + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)           # [b, T]: padding does not shift RoPE
        with torch.no_grad():
            last = model(**enc, position_ids=pos).logits[:, -1].float()       # [b, vocab]
        margins += (last[:, ids["Yes"]].max(-1).values - last[:, ids["No"]].max(-1).values).tolist()
    return np.array(margins)
