"""Files of saved answers: eval_nli.py --answers FILE re-scores them without generating, every row checked against
the test set; study/run.py and eval_judge.py append to theirs after a kill."""

import json
import os

from harness.data import DataError, described, read_jsonl, text_id


def load_answers(path, items):
    """{(model, prompt): answers in the order of `items`}, matched by id (never by row order). Every id must be in
    the test set, and every (model, prompt) must answer every test situation exactly once; a null answer is empty."""
    known, groups = {s.id for s in items}, {}
    for n, row in read_jsonl(path, "answers"):
        missing = [k for k in ("id", "model", "prompt", "answer") if k not in row]
        if missing:
            raise ValueError(
                f"{path}, line {n}: expected a JSON object with id, model, prompt, answer "
                f"(missing {', '.join(missing)})"
            )
        where = f"{path}, line {n}"
        key = text_id(where, row, "model"), text_id(where, row, "prompt")
        sid = text_id(where, row)
        if row["answer"] is not None and not isinstance(row["answer"], str):
            raise DataError(
                f"{where}: 'answer' must be text (or null for an empty answer), not "
                f"{described(row['answer'])}"
            )
        if sid not in known:
            raise ValueError(
                f"{path}, line {n}: id {sid!r} is not in the test set; the answers were made for "
                f"another data file: pass that file as --data"
            )
        if sid in groups.setdefault(key, {}):
            raise ValueError(
                f"{path}, line {n}: a second answer of model {key[0]!r}, prompt {key[1]!r} to {sid!r}"
            )
        groups[key][sid] = row["answer"] or ""
    if not groups:
        raise ValueError(f"{path}: no answers in the file")
    for (model, prompt), answers in groups.items():
        missing = [s.id for s in items if s.id not in answers]
        if missing:
            raise ValueError(
                f"{path}: model {model!r}, prompt {prompt!r} has no answer for {len(missing)} test "
                f"situation(s), e.g. {missing[0]!r}: regenerate, or pass the matching --data"
            )
    return {key: [answers[s.id] for s in items] for key, answers in groups.items()}


def drop_torn_tail(path):
    """Before appending to a JSONL file: cut away a last line that a kill left half written, or end a whole last row
    that lacks only its newline (study/run.py's answers, eval_judge.py's judgments)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        cut = data.rfind(b"\n") + 1
        if cut == len(data):
            return
        try:
            json.loads(data[cut:])
            f.write(b"\n")
        except ValueError:
            f.truncate(cut)
