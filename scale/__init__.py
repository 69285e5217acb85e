"""Outgrowing one GPU (issue 16): the OP reward and our data on TRL (trl_opgrpo.py) and on verl (verl_reward.py,
to_verl_parquet.py). The core scripts one folder up import nothing from here."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the core modules (opgrpo_min, reward) live one folder up
    sys.path.insert(0, ROOT)


def prompt_messages(situation):
    """The implicit prompt as a conversation of one user turn, the form TRL and verl put through the model's chat
    template themselves (opgrpo_min.chat_prompt builds the same turn and renders it to text)."""
    from opgrpo_min import IMPLICIT_PROMPT

    return [{"role": "user", "content": IMPLICIT_PROMPT.format(situation=situation)}]
