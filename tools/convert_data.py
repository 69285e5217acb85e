"""Convert the authors' data files to our JSONL (data/README.md), which every script reads:

    python tools/convert_data.py authors_test.csv --out data/authors_test.jsonl
    python tools/convert_data.py value_kaleidoscope.json --out data/vk.jsonl

    .csv    the authors' test CSVs: columns prompt, answer; one 'In the perspective of NAME, EXPLANATION' line each
            (split as the reward splits answers); a byte-order mark, as spreadsheet programs save, is allowed
    .json   Modular Pluralism's ValueKaleidoscope: [{"situation", "vrd": ["Value: Honesty", ...], "explanation": [...]}]

Every row is checked as the scripts check our JSONL (harness.data.situation_of); a bad one is one line naming the file
and the row or entry, and nothing is written.
"""

import argparse
import csv
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the core modules live one folder up
    sys.path.insert(0, ROOT)
import harness.cli
import harness.data
import harness.runs
import opgrpo_min as om
import reward

KINDS = ("value", "right", "duty")


def situations(path):
    """The Situations of an authors' .csv or a ValueKaleidoscope .json, every row checked."""
    harness.data.read_text(path)  # missing, a directory, a device, not UTF-8: one line each
    if os.path.splitext(path)[1].lower() not in (".csv", ".json"):
        raise harness.data.DataError(
            f"{path}: convert a .csv (the authors') or a .json (ValueKaleidoscope)"
        )
    try:
        rows = csv_rows(path) if path.lower().endswith(".csv") else kaleido_rows(path)
    except UnicodeDecodeError:
        raise harness.data.not_utf8(path) from None
    items = [harness.data.situation_of(where, row) for where, row in rows]
    if not items:
        raise harness.data.DataError(f"{path}: the file holds no situations")
    return items


def csv_rows(path):
    """The authors' CSV; a byte-order mark (as spreadsheet programs save) is allowed."""
    out = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.DictReader(f)
        missing = {"prompt", "answer"} - set(rows.fieldnames or [])
        if missing:
            raise harness.data.DataError(
                f"{path}: missing column(s) {sorted(missing)}; the authors' CSV has 'prompt' "
                f"and 'answer'"
            )
        try:
            for n, row in enumerate(rows, 1):
                pieces = reward.split_perspectives(row["answer"] or "")
                parsed = [reward.parse_perspective(p) for p in pieces]
                if None in parsed:
                    raise harness.data.DataError(
                        f"{path}, row {n}: answer line {pieces[parsed.index(None)][:60]!r} is not "
                        f"'In the perspective of NAME, ...'"
                    )
                text = (row["prompt"] or "").strip()
                head = om.IMPLICIT_PROMPT.split("{")[
                    0
                ].strip()  # the CSV may hold the whole implicit prompt
                text = text[len(head) :] if text.startswith(head) else text
                out.append(
                    (
                        f"{path}, row {n}",
                        dict(
                            id=row.get("id") or f"row-{n}",
                            situation=text,
                            perspectives=[
                                dict(name=name, explanation=explanation)
                                for name, explanation in parsed
                            ],
                        ),
                    )
                )
        except csv.Error as e:  # a stray quote, a NUL byte
            raise harness.data.DataError(
                f"{path}, line {rows.line_num}: not valid CSV ({e})"
            ) from None
    return out


def kaleido_rows(path):
    """ValueKaleidoscope JSON: a list of objects, or {"data": [...]}, or {"0": {...}, "1": {...}}."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise harness.data.DataError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    except RecursionError:
        raise harness.data.DataError(f"{path}: JSON nested too deeply for Python to read") from None
    except ValueError:  # a number of more than 4300 digits
        raise harness.data.DataError(
            f"{path}: holds a number too long for Python to read"
        ) from None
    if isinstance(data, dict):
        data = data["data"] if isinstance(data.get("data"), list) else list(data.values())
    if not isinstance(data, list):
        raise harness.data.DataError(
            f"{path}: expected a list of situation objects at the top level, got "
            f"{type(data).__name__}"
        )
    out = []
    for n, row in enumerate(data):
        where = f"{path}, entry {n}"
        if not isinstance(row, dict):
            raise harness.data.DataError(f"{where}: expected an object")
        missing = next((k for k in ("situation", "vrd", "explanation") if k not in row), None)
        if missing:
            raise harness.data.DataError(f"{where}: missing field {missing!r}")
        vrd, expl = row["vrd"], row["explanation"]
        if not isinstance(vrd, list) or not isinstance(expl, list) or len(vrd) != len(expl):
            raise harness.data.DataError(
                f"{where}: 'vrd' and 'explanation' must be lists of the same length"
            )
        ps = []
        for v, e in zip(vrd, expl):
            kind, _, name = str(v).partition(
                ":"
            )  # 'Value: Honesty' -> kind 'value', name 'Honesty'
            kind, name = (kind.strip().lower(), name) if name else ("", kind)
            ps.append(
                dict(
                    name=name.strip(),
                    explanation=str(e).strip(),
                    kind=kind if kind in KINDS else None,
                )
            )
        sid = row.get("id", n)  # their ids may be numbers; ours are text
        sid = str(sid) if isinstance(sid, int) and not isinstance(sid, bool) else sid
        out.append((where, dict(id=sid, situation=row["situation"], perspectives=ps)))
    return out


def main(argv=None):
    p = harness.cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("data", help="the authors' .csv or a ValueKaleidoscope .json")
    p.add_argument("--out", required=True, help="the JSONL to write (an existing file is refused)")
    args = p.parse_args(argv)
    items = situations(args.data)
    if os.path.exists(args.out):
        raise FileExistsError(f"--out {args.out}: exists; pass a new file name")
    rows = [
        {k: v for k, v in dataclasses.asdict(s).items() if k != "where" and v is not None}
        for s in items
    ]
    harness.runs.write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} situations to {args.out}")
    return items


if __name__ == "__main__":
    harness.cli.run_cli(main)
