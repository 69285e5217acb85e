"""Files of answers (JSONL, one answer per row): appended as they are made, read back after a kill, checked against
the test set. eval_nli.py and study/ write them, eval_nli.py --answers and eval_judge.py read them. A reader of the
method may skip this file: it holds no rule of the paper."""

import json
import os

from harness.data import DataError, described, json_line, read_jsonl, text_id


def load_answers(path, items):
    """{(model, prompt): answers in the order of `items`}, matched by id (never by row order). Every id must be in
    the test set, and every (model, prompt) must answer every test situation exactly once; a null answer is empty."""
    known, groups, texts = {s.id for s in items}, {}, {s.id: s.situation for s in items}
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
        if "situation" in row and not isinstance(row["situation"], str):
            raise DataError(f"{where}: 'situation' must be text, not {described(row['situation'])}")
        if "situation" in row and row["situation"] != texts[sid]:
            raise ValueError(
                f"{path}, line {n}: the answer to {sid!r} was made for another text of that situation than "
                f"--data holds; pass the data file it was made with"
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
    that lacks only its newline (study/run.py's answers, eval_judge.py's judgments). "Whole" is what the readers
    accept (json_line): a last line they would refuse (a key twice, nested too deep) is cut, not kept."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        cut = data.rfind(b"\n") + 1
        if cut == len(data):
            return
        try:
            json_line(path, 0, data[cut:].decode("utf-8"))
            f.write(b"\n")
        except ValueError:  # DataError, UnicodeDecodeError
            f.truncate(cut)


def append_rows(path, rows):
    """Append rows (dicts) to a JSONL file in one write, on disk before this returns: a kill afterwards loses none of
    them, a kill during it leaves a torn last line that saved_rows cuts away."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def saved_rows(path, fields):
    """{(row[f] for f in fields): row} of an answers file that is being appended to (empty when there is none yet),
    after cutting a torn last line (those answers are made again). Each key field must be there, as an id's text
    (`sample`: a whole number >= 0), and the situation's text: anything else is a DataError naming the line."""
    if not os.path.exists(path):
        return {}
    drop_torn_tail(path)
    rows = {}
    for n, r in read_jsonl(path, "answers"):
        where = f"{path}, line {n}"
        for f in (*fields, "situation"):
            if f not in r:
                raise DataError(f"{where}: missing field {f!r}; not a row this script writes")
        for f in fields:
            if f != "sample":
                text_id(where, r, f)
            elif not isinstance(r[f], int) or isinstance(r[f], bool) or r[f] < 0:
                raise DataError(
                    f"{where}: 'sample' must be a whole number >= 0, not {described(r[f])}"
                )
        if not isinstance(r["situation"], str):
            raise DataError(f"{where}: 'situation' must be text, not {described(r['situation'])}")
        rows[tuple(r[f] for f in fields)] = r
    return rows


def check_texts(rows, items, path):
    """Refuse, by id, a saved answer whose situation text is not the one `items` holds for that id now: it answered
    another question than the one asked now (the data file changed since)."""
    texts = {s.id: s.situation for s in items}
    for r in rows:
        if r["id"] in texts and r.get("situation") != texts[r["id"]]:
            raise DataError(
                f"{path}: the saved answer to {r['id']!r} was made for another text of that situation than the "
                f"data file holds now; use another --out, or restore the data file"
            )
