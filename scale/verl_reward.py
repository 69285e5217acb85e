"""The OP reward as verl's custom reward function (verl.trainer.main_ppo loads it by file path):

    custom_reward_function.path=scale/verl_reward.py custom_reward_function.name=compute_score

verl's reward manager calls compute_score once per answer, with the row's data_source, the decoded answer, the
row's reward_model.ground_truth and extra_info (scale/to_verl_parquet.py writes those rows). Options reach it as
keyword arguments through custom_reward_function.reward_kwargs, e.g.
+custom_reward_function.reward_kwargs.mask_keywords=both. The similarity model is loaded once per process, on
first use: $OPGRPO_SIM_MODEL (hub id or local dir), else the embedded all-MiniLM-L6-v2.
"""

import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # verl imports this file by path, so reward.py's folder is not on sys.path
    sys.path.insert(0, ROOT)
import harness.models
import reward

_EMBEDDER = None


def embedder():
    """The reward's Sentence Transformer, loaded on the first call and kept for the life of the process."""
    global _EMBEDDER
    if _EMBEDDER is None:
        _EMBEDDER = harness.models.load_embedder(os.environ.get("OPGRPO_SIM_MODEL") or None)
    return _EMBEDDER


def reference_of(ground_truth):
    """The reference perspectives as reward.score_answers takes them: the reference answer text (split like the
    answers) or a list of perspective strings. Parquet lists may come back as numpy arrays; anything else is a
    ValueError that says what verl handed over."""
    if hasattr(ground_truth, "tolist") and not isinstance(ground_truth, str):
        ground_truth = ground_truth.tolist()
    ok = isinstance(ground_truth, str) or (
        isinstance(ground_truth, (list, tuple)) and all(isinstance(p, str) for p in ground_truth)
    )
    if not ok or not any(
        p.strip() for p in ([ground_truth] if isinstance(ground_truth, str) else ground_truth)
    ):
        raise ValueError(
            f"verl_reward: ground_truth must be the reference perspectives, a non-empty str or list of "
            f"str (reward_model.ground_truth of the parquet row; see scale/to_verl_parquet.py), got "
            f"{type(ground_truth).__name__} {ground_truth!r:.80}"
        )
    return ground_truth


def compute_score(
    data_source,
    solution_str,
    ground_truth,
    extra_info=None,
    mask_keywords="answer",
    min_perspectives=0,
    **unused,
):
    """{"score": R, and R's terms} for one answer: verl trains on "score" and logs the other keys.
    R = reward.score_answers(...).total for the same answer, reference and situation; extra_info["situation"]
    supplies the words that become [KW] in the answer (the paper's keyword masking). `unused` takes what newer
    verl versions pass besides (e.g. reward_router_address)."""
    situation = (extra_info or {}).get("situation")
    if situation is None and mask_keywords != "none":
        warnings.warn(
            "verl_reward: no extra_info['situation'] in the row, so no keyword is masked",
            stacklevel=2,
        )
    parts = reward.score_answers(
        [solution_str],
        [reference_of(ground_truth)],
        embedder(),
        situations=[situation],
        mask_keywords=mask_keywords,
        min_perspectives=min_perspectives,
    )[0]
    terms = vars(parts).copy()
    return dict(score=terms.pop("total"), **terms)
