"""sim_train.py --judge MODEL: Stage 1's triplets the paper's way, an LLM judging which similar sentences say the same.

The judge is a local causal LM (read from its next-token logits) or, with --judge-url, any model behind an
OpenAI-compatible endpoint (eval_judge.py's client).
"""

import numpy as np
import torch

import reward
from harness.models import load_policy

JUDGE_QUESTION = (
    "Do these two statements express the same meaning or perspective?\n\nA: {a}\nB: {b}\n\n"
    "Answer with Yes or No."
)


def judge_triplets(situations, model, judge, threshold=0.75):
    """The paper's triplets. Per situation the pool is every distinct perspective sentence (explanations, then
    paraphrases where the data has them); for each explanation (anchor) its candidates are the other pool sentences
    with cosine >= threshold to it (reward.unit_embeddings(model, the pool), one call), most similar first. `judge`
    is called once, with every (anchor, candidate) pair of all situations as a list of tuples (not at all when there
    is none), and returns one bool per pair ("same meaning or perspective?"): the first Yes candidate is the
    positive, the most similar No the negative; an anchor without both gives no triplet. Returns a list of dicts
    {"situation": its id, "anchor", "positive", "negative"} in the order of situations and explanations.
    Example: candidates [x 0.9 No, y 0.8 Yes, z 0.76 No] give (anchor, y, x)."""
    pools = [
        list(
            dict.fromkeys(
                [p.explanation for p in s.perspectives]
                + [p.paraphrase for p in s.perspectives if p.paraphrase]
            )
        )
        for s in situations
    ]
    vec, asks = (
        reward.unit_embeddings(model, [t for pool in pools for t in pool]),
        [],
    )  # asks: (sid, anchor, cands)
    for s, pool in zip(situations, pools):
        E = np.stack([vec[t] for t in pool])  # [n_pool, dim]
        for a in [p.explanation for p in s.perspectives]:
            cos = E @ vec[a]  # [n_pool]
            asks.append(
                (
                    s.id,
                    a,
                    [pool[j] for j in np.argsort(-cos) if pool[j] != a and cos[j] >= threshold],
                )
            )
    pairs = [(a, c) for _, a, cands in asks for c in cands]
    print(
        f"judging {len(pairs)} pairs with base cosine >= {threshold} ({len(situations)} situations)"
    )
    said = dict(zip(pairs, map(bool, judge(pairs)))) if pairs else {}
    out = []
    for sid, a, cands in asks:
        yes, no = [c for c in cands if said[(a, c)]], [c for c in cands if not said[(a, c)]]
        if yes and no:
            out.append(dict(situation=sid, anchor=a, positive=yes[0], negative=no[0]))
    return out


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
