"""Our situations -> verl's parquet layout (one row per situation), for python -m verl.trainer.main_ppo:

data_source   "opgrpo"                       verl groups validation metrics by it
prompt        [{"role": "user", "content": IMPLICIT_PROMPT.format(situation=...)}]   verl applies the chat template
ability       "pluralism"                    free text, not read by the trainer
reward_model  {"style": "rule", "ground_truth": ["In the perspective of X, ...", ...]}
                                             the reference perspectives, what verl_reward.compute_score receives
extra_info    {"split", "index", "id", "situation", "domain", "perspectives"}
                                             the situation feeds keyword masking; the rest makes read_parquet exact

python scale/to_verl_parquet.py --out runs/verl_data    # data/train.jsonl, data/test.jsonl -> train/test.parquet
"""

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the core and the scale package live one folder up
    sys.path.insert(0, ROOT)
import harness.cli
import harness.data
import harness.runs
import opgrpo_min as om
import reward
from scale import prompt_messages

DATA_SOURCE = "opgrpo"


def verl_rows(items, split):
    """One verl row per Situation. The ground truth is the reference answer's perspective lines, the same pieces
    that reward.split_perspectives cuts from opgrpo_min.reference_answer, so the reward is the same on both paths."""
    return [
        dict(
            data_source=DATA_SOURCE,
            prompt=prompt_messages(s.situation),
            ability="pluralism",
            reward_model=dict(
                style="rule",
                ground_truth=[
                    reward.perspective_line(p.name, p.explanation) for p in s.perspectives
                ],
            ),
            extra_info=dict(
                split=split,
                index=i,
                id=s.id,
                situation=s.situation,
                domain=s.domain,
                perspectives=[dataclasses.asdict(p) for p in s.perspectives],
            ),
        )
        for i, s in enumerate(items)
    ]


def write_parquet(rows, path):
    """rows -> one parquet file, written whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with harness.runs.replaced(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def read_parquet(path):
    """The Situations of a file that verl_rows wrote (the reader back: to_verl_parquet's output round-trips)."""
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise harness.data.DataError(f"{path}: no such parquet file")
    items = []
    for n, row in enumerate(pq.read_table(path).to_pylist()):
        try:
            info = row["extra_info"]
            items.append(
                harness.data.Situation(
                    id=info["id"],
                    situation=info["situation"],
                    domain=info["domain"],
                    perspectives=[harness.data.Perspective(**p) for p in info["perspectives"]],
                )
            )
        except (KeyError, TypeError) as e:
            raise harness.data.DataError(
                f"{path}, row {n}: not a row written by scale/to_verl_parquet.py ({e!r})"
            ) from None
    return items


def main(argv=None):
    p = harness.cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--train-data",
        default=os.path.join(om.HERE, "data", "train.jsonl"),
        help="our JSONL, the authors' CSV or ValueKaleidoscope JSON (default: data/train.jsonl)",
    )
    p.add_argument(
        "--test-data",
        default=os.path.join(om.HERE, "data", "test.jsonl"),
        help="the same formats; '' skips it (default: data/test.jsonl)",
    )
    p.add_argument(
        "--out", default="runs/verl_data", help="folder for train.parquet and test.parquet"
    )
    args = p.parse_args(argv)
    splits = [("train", args.train_data)] + ([("test", args.test_data)] if args.test_data else [])
    data = {
        split: harness.data.load_situations(path) for split, path in splits
    }  # every file checked before any is written
    harness.runs.claim_out_dir(args.out)
    for split, items in data.items():
        path = os.path.join(args.out, f"{split}.parquet")
        write_parquet(verl_rows(items, split), path)
        print(f"{path}: {len(items)} situations")


if __name__ == "__main__":
    harness.cli.run_cli(main)
