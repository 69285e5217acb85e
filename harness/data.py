"""The data model and its checks: situations and perspectives, our JSONL files and their one-line errors. A reader
of the method may skip this file: it holds no rule of the paper."""

import hashlib
import json
import os
from dataclasses import dataclass, field

KINDS = ("value", "right", "duty")


PERSPECTIVE = (
    "name",
    "explanation",
    "kind",
    "paraphrase",
)  # a perspective's fields, in Perspective's order


@dataclass
class Perspective:
    name: str
    explanation: str
    kind: str = None  # value / right / duty, when the source says
    paraphrase: str = None  # the same point in other words (positive of a contrastive triplet)


@dataclass
class Situation:
    id: str
    situation: str
    perspectives: list = field(default_factory=list)
    domain: str = None
    where: str = field(
        default=None, compare=False
    )  # file and line it came from, for error messages


class DataError(ValueError):
    pass


def load_situations(path):
    """Situations from our JSONL (data/README.md): {"id", "situation", "perspectives": [{"name", "explanation",
    "kind", "paraphrase"}], "domain"} per line; tools/convert_data.py converts the authors' CSV and ValueKaleidoscope
    JSON to it. Every bad row is an error that names the file and line; nothing is skipped silently."""
    if os.path.isfile(path) and not path.lower().endswith(".jsonl"):
        raise DataError(
            f"{path}: not our JSONL; convert the authors' .csv or a ValueKaleidoscope .json first: "
            f"python tools/convert_data.py {path} --out NEW.jsonl"
        )
    items = [situation_of(f"{path}, line {n}", row) for n, row in read_jsonl(path)]
    if not items:
        raise DataError(f"{path}: the file holds no situations")
    again = next((s for k, s in enumerate(items) if s.id in {t.id for t in items[:k]}), None)
    if again:
        raise DataError(f"{again.where}: situation id {again.id!r} appears more than once")
    return items


def situation_of(where, row):
    """One Situation from one row of our format; a missing or empty field, or one of the wrong type, is a DataError
    that names `where`."""
    missing = next((k for k in ("id", "situation", "perspectives") if k not in row), None)
    if missing:
        raise DataError(f"{where}: missing field {missing!r}")
    if not isinstance(row["situation"], str) or not row["situation"].strip():
        raise DataError(f"{where}: missing or empty 'situation'")
    if not isinstance(row["perspectives"], list) or not row["perspectives"]:
        raise DataError(f"{where}: 'perspectives' must be a non-empty list")
    for p in row["perspectives"]:
        if not isinstance(p, dict) or not all(
            isinstance(p.get(k), str) and p[k].strip() for k in PERSPECTIVE[:2]
        ):
            raise DataError(
                f"{where}: each perspective needs a non-empty text 'name' and 'explanation'"
            )
        if any(p.get(k) is not None and not isinstance(p[k], str) for k in PERSPECTIVE[2:]):
            raise DataError(f"{where}: a perspective's 'kind' and 'paraphrase' must be text")
        if p.get("kind") not in KINDS + (None,):
            raise DataError(f"{where}: perspective kind {p['kind']!r} is not one of {KINDS}")
    ps = [
        Perspective(
            *(p.get(k) and p[k].strip() if k in PERSPECTIVE[:2] else p.get(k) for k in PERSPECTIVE)
        )
        for p in row["perspectives"]
    ]
    domain = row.get("domain") if isinstance(row.get("domain"), str) else None
    return Situation(str(row["id"]), row["situation"].strip(), ps, domain, where)


def read_jsonl(path, what="data"):
    """(line number, object) for each non-blank line of a JSONL file; a missing file, bytes that are not UTF-8 and a
    line that is not a JSON object are DataErrors that name the file and line (every JSONL reader here uses this)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such {what} file")
    try:
        lines = open(path, encoding="utf-8").read().split("\n")
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not JSON ({e.msg})") from None
        if row is not None and not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object")
        if row is not None:
            yield n, row


def not_utf8(path):
    """The DataError for a file that is not UTF-8, naming the line of its first bad byte."""
    raw = open(path, "rb").read()
    try:
        raw.decode("utf-8")
        return DataError(f"{path}: not UTF-8 text")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return DataError(
            f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        )


def sha256_of(*paths):
    """One sha256 over the files' bytes, in order: what a resume compares."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def check_prompts(tokenizer, items, max_prompt_len, prompt):
    """Every situation's prompt (prompt(situation text) -> the text the model reads) fits max_prompt_len tokens
    (cutting one would cut the situation): a DataError that names the situation's file and line otherwise."""
    for s in items:
        if (
            n := len(tokenizer(prompt(s.situation), add_special_tokens=False).input_ids)
        ) > max_prompt_len:
            raise DataError(
                f"{s.where or s.id}: the prompt of situation {s.id!r} has {n} tokens, over "
                f"--max-prompt-len {max_prompt_len}: raise it or shorten the situation"
            )
