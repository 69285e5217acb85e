"""Score a file of saved answers with the OP reward, term by term:

    python tools/score_answers.py --answers runs/eval/answers.jsonl [--data data/test.jsonl] [--out runs/reward]

Each JSONL row needs 'id' (a situation of --data) and 'answer' (eval_nli.py's and study/run.py's answers.jsonl have
both). Each answer is scored against its situation's reference answer (opgrpo_min.reference_answer) by
reward.score_answers; OUT/scores.jsonl gets one breakdown per row, and the mean of each term is printed.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the core modules live one folder up
    sys.path.insert(0, ROOT)
import numpy as np

import harness.cli
import harness.data
import harness.models
import harness.runs
import opgrpo_min as om
import reward


def main(argv=None):
    p = harness.cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--answers", required=True, help="JSONL: one object with 'id' and 'answer' per line"
    )
    p.add_argument(
        "--data",
        default=os.path.join(ROOT, "data", "test.jsonl"),
        help="the situations the ids refer to (their references are scored against)",
    )
    p.add_argument(
        "--sim-model", help="Sentence Transformer: hub id or local dir (default: embedded MiniLM)"
    )
    p.add_argument(
        "--mask-keywords",
        choices=reward.MASK_MODES,
        default="answer",
        help="see reward.score_answers",
    )
    p.add_argument("--out", default="runs/reward", help="directory for scores.jsonl")
    args = p.parse_args(argv)
    items, rows = {s.id: s for s in harness.data.load_situations(args.data)}, []
    for n, row in harness.data.read_jsonl(args.answers, "answers"):
        if not isinstance(row.get("answer"), str) or row.get("id") not in items:
            raise harness.data.DataError(
                f"{args.answers}, line {n}: needs a text 'answer' and the 'id' of a situation "
                f"in {args.data}"
            )
        rows.append(row)
    if not rows:
        raise harness.data.DataError(f"{args.answers}: no answers in the file")
    harness.models.check_model_path(args.sim_model, "--sim-model")
    harness.runs.claim_out_dir(args.out)
    ss = [items[r["id"]] for r in rows]
    parts = reward.score_answers(
        [r["answer"] for r in rows],
        [om.reference_answer(s) for s in ss],
        harness.models.load_embedder(args.sim_model),
        situations=[s.situation for s in ss],
        mask_keywords=args.mask_keywords,
    )
    harness.runs.write_text(
        os.path.join(args.out, "scores.jsonl"),
        "".join(json.dumps(dict(id=r["id"], **vars(b))) + "\n" for r, b in zip(rows, parts)),
    )
    means = {k: float(np.mean([getattr(b, k) for b in parts])) for k in vars(parts[0])}
    print(f"{len(parts)} answers: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
    return means


if __name__ == "__main__":
    harness.cli.run_cli(main)
