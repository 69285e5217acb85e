"""The data model and its checks: situations and perspectives, our JSONL files and their one-line errors. A reader
of the method may skip this file: it holds no rule of the paper."""

import difflib
import hashlib
import json
import os
import stat
from dataclasses import dataclass, field

KINDS = ("value", "right", "duty")


PERSPECTIVE = (
    "name",
    "explanation",
    "kind",
    "paraphrase",
)  # a perspective's fields, in Perspective's order
SITUATION = ("id", "situation", "perspectives", "domain")  # a row's fields


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
    first = {}
    for s in items:
        if first.setdefault(s.id, s) is not s:
            raise DataError(
                f"{s.where}: situation id {s.id!r} appears more than once (first at "
                f"{first[s.id].where.rpartition(', ')[2]})"
            )
    return items


def situation_of(where, row):
    """One Situation from one row of our format; a missing or empty field, or one of the wrong type, is a DataError
    that names `where`."""
    missing = next((k for k in ("id", "situation", "perspectives") if k not in row), None)
    if missing:
        raise DataError(f"{where}: missing field {missing!r}")
    unknown_fields(where, row, SITUATION)
    sid = text_id(where, row)
    if not isinstance(row["situation"], str) or not visible(row["situation"]):
        raise DataError(f"{where}: missing or empty 'situation'")
    if not isinstance(row["perspectives"], list) or not row["perspectives"]:
        raise DataError(f"{where}: 'perspectives' must be a non-empty list")
    for p in row["perspectives"]:
        if not isinstance(p, dict) or not all(
            isinstance(p.get(k), str) and visible(p[k]) for k in PERSPECTIVE[:2]
        ):
            raise DataError(
                f"{where}: each perspective needs a non-empty text 'name' and 'explanation'"
            )
        unknown_fields(where, p, PERSPECTIVE, "a perspective")
        if any(p.get(k) is not None and not isinstance(p[k], str) for k in PERSPECTIVE[2:]):
            raise DataError(f"{where}: a perspective's 'kind' and 'paraphrase' must be text")
        if p.get("paraphrase") is not None and not visible(p["paraphrase"]):
            raise DataError(
                f"{where}: a perspective's 'paraphrase' is blank: write it, or leave it out"
            )
        if p.get("kind") not in KINDS + (None,):
            raise DataError(f"{where}: perspective kind {p['kind']!r} is not one of {KINDS}")
    ps = [
        Perspective(
            *(p.get(k) and p[k].strip() if k in PERSPECTIVE[:2] else p.get(k) for k in PERSPECTIVE)
        )
        for p in row["perspectives"]
    ]
    domain = row.get("domain")
    if domain is not None and (not isinstance(domain, str) or not visible(domain)):
        raise DataError(f"{where}: 'domain' must be text (or left out), not {described(domain)}")
    return Situation(sid, row["situation"].strip(), ps, domain and domain.strip(), where)


def text_id(where, row, key="id"):
    """row[key] as an id: non-empty text that prints, without spaces at its ends. Anything else is a DataError naming `where`:
    str() would make null "None", NaN "nan" and a dict its repr, ids that match nothing, or each other by accident."""
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        example = '; write it in quotes, e.g. "id": "train-001"' if key == "id" else ""
        raise DataError(f"{where}: {key!r} must be non-empty text, not {described(value)}{example}")
    if value != value.strip():
        raise DataError(
            f"{where}: {key!r} {value!r} has spaces at its ends; ids are matched exactly: remove them"
        )
    # a NUL, a zero-width space: "t-1\u200b" would be a second "t-1" that nobody sees
    if not value.isprintable():
        raise DataError(
            f"{where}: {key!r} {value!r} holds a character that does not print (a control character, a "
            f"zero-width or non-breaking space); ids are matched exactly: remove it"
        )
    # a situation's id is ASCII: "t-1\u0301", "cafe\u0301" and "caf\u00e9" would look like ids they are not
    if key == "id" and not value.isascii():
        raise DataError(
            f"{where}: 'id' {value!r} is not ASCII; ids are matched exactly, and letters that look alike "
            f"(an accent written two ways, a blank from another script) would make two ids of one: use "
            f"ASCII letters, digits and punctuation"
        )
    return value


def visible(text):
    """Whether `text` shows anything: a zero-width space or a soft hyphen alone is as blank as spaces."""
    return any(c.isprintable() and not c.isspace() for c in text)


def unknown_fields(where, row, known, what="a row"):
    """A DataError naming a field our format does not have: a misspelt 'paraphase' would otherwise be dropped
    silently and the perspective read as having no paraphrase."""
    for k in row:
        if k not in known:
            close = difflib.get_close_matches(k, known, 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(
                f"{where}: {what} has the field {k!r}, which our format does not have (fields: "
                f"{', '.join(known)}){hint}"
            )


def described(value):
    """A JSON value in a few words, for an error line: 'null', 'the number 7', 'a number of 401 digits', 'a list'.

    >>> described(None), described(float("nan")), described(10**400), described(""), described({"a": 1})
    ('null', 'the number nan', 'a number of 401 digits', 'empty text', 'an object')
    """
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int) and len(str(abs(value))) > 20:
        return f"a number of {len(str(abs(value)))} digits"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return (
            "empty text" if not value else "blank text" if not value.strip() else repr(value[:40])
        )
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def read_text(path, what="data"):
    """The text of a file we read, or a DataError that says why not: missing, a directory, a device, not UTF-8. A
    UTF-8 byte-order mark at the start is dropped (Windows editors write one; the CSV reader drops it too). A pipe
    (bash's <(...)) is read like a file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such {what} file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not the {what} file; pass the file inside it")
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise DataError(
            f"{path}: is a device or a socket, not a regular file; pass the {what} file"
        )
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} file ({e.strerror})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(path, raw) from None


def read_jsonl(path, what="data"):
    """(line number, object) for each non-blank line of a JSONL file; a file that cannot be read (read_text) and a
    line that is not a JSON object (json_line) are DataErrors that name the file and line. Every JSONL reader here
    uses this, or json_line for each line."""
    for n, line in enumerate(read_text(path, what).split("\n"), 1):
        row = json_line(path, n, line) if line.strip() else None
        if row is not None and not isinstance(row, dict):
            raise DataError(f"{path}, line {n}: expected a JSON object")
        if row is not None:
            yield n, row


def json_line(path, n, line):
    """The JSON value on line n of `path`, or a DataError naming the file and line: not JSON, nested too deep for
    Python, a number too long for it, one key twice in an object (JSON keeps the last silently), or a lone surrogate
    escape such as \\ud800 (half of a pair, no character: the tokenizer would fail on it later)."""
    where = f"{path}, line {n}"
    try:
        value = json.loads(line, object_pairs_hook=unique_keys, parse_int=short_int)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg})") from None
    except RecursionError:
        raise DataError(
            f"{where}: JSON nested too deeply for Python to read; no file of ours nests more than 3 levels"
        ) from None
    except ValueError as e:  # unique_keys, short_int
        raise DataError(f"{where}: {e}") from None
    if "\\u" in line:  # a surrogate can only come from an escape
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(
                f"{where}: holds a lone surrogate escape (like \\ud800 without its pair), which is no "
                f"character; fix the text or drop the escape"
            ) from None
    return value


def unique_keys(pairs):
    """json's object_pairs_hook: a dict, or a ValueError when a key comes twice."""
    out = dict(pairs)
    if len(out) < len(pairs):
        again = next(k for k, _ in pairs if [j for j, _ in pairs].count(k) > 1)
        raise ValueError(f"key {again!r} appears twice in one object; keep one")
    return out


def short_int(digits):
    """json's parse_int: Python refuses to read more than 4300 digits (sys.get_int_max_str_digits), so say so here."""
    if len(digits.lstrip("-")) > 4300:
        raise ValueError(
            f"a number of {len(digits.lstrip('-'))} digits, more than Python reads (4300)"
        )
    return int(digits)


def not_utf8(path, raw=None):
    """The DataError for a file that is not UTF-8, naming the line of its first bad byte (`raw`: its bytes, when
    already read)."""
    raw = open(path, "rb").read() if raw is None else raw
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
