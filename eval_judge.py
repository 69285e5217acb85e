"""The paper's LLM-judge evaluation: a judge model grades every answer 1-5 on five aspects, through any server that
speaks the OpenAI chat completions API (OpenAI, vLLM, Ollama, llama.cpp server, transformers serve).

The paper backs its NLI results with GPT-4.1 as the judge (the authors' benchmark_new/llm_eval/gpt.py: the Batch API,
300 rows per test set, 450 output tokens). Here there is one request per answer, and each reply is saved as it comes:

    ask:       the situation and the answer; for helpfulness, clarity, factuality, depth and engagement a short
               reason and a score 1-5, as one JSON object                                       judge_messages
    read:      the five scores, whole numbers 1-5 (a ```json fence or a "4" is fine)              parse_scores
    ask again: an unusable reply, at most --max-retries times; then the answer is counted as failed   judge_answer
    report:    per system the mean and standard error of each aspect and of their mean; every system minus the
               baseline, paired by situation, with a 95 % bootstrap interval             score_rows, paired_rows

    python eval_judge.py --answers runs/eval/answers.jsonl --dry-run                  # requests and tokens, no cost
    python eval_judge.py --answers runs/eval/answers.jsonl --model gpt-4.1            # needs OPENAI_API_KEY
    python eval_judge.py --answers runs/study/answers.jsonl --model qwen2.5:7b --base-url http://localhost:11434/v1

Run it again with the same arguments and it asks only for the answers that have no judgment yet or a failed one
(docs/judge.md). The API key is read from the environment, and is never printed or written to a file, not even
in part.
"""

import argparse
import csv
import dataclasses
import decimal
import hashlib
import io
import ipaddress
import itertools
import json
import logging
import os
import re
import socket
import sys
import time
import traceback
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np

import reward
from harness.answers import drop_torn_tail
from harness.cli import ArgumentParser, run_cli, text_arg
from harness.data import (
    DataError,
    described,
    json_line,
    read_jsonl,
    read_text,
    text_id,
    unique_keys,
)
from harness.report import pyplot, save_figure
from harness.runs import claim_out_dir, lock_run_folder, write_text

ASPECTS = ("helpfulness", "clarity", "factuality", "depth", "engagement")
METRICS = ASPECTS + ("overall",)  # overall: the mean of an answer's five scores
PAPER_JUDGE = "gpt-4.1"
PAPER_MAX_TOKENS = (
    450  # the authors' MAX_OUTPUT_TOKENS; a shorter cap cuts the reasons, then the JSON
)
OPENAI_URL = "https://api.openai.com/v1"
MAX_TIMEOUT = 86400  # seconds for one reply; more is no timeout (and overflows the client's clock)
MAX_CONCURRENCY = 1024  # requests in flight at once: a thread each
DUMMY_KEY = "none"  # local servers started without a key accept any key, but the client needs one
ANSWER_FIELDS = ("id", "model", "prompt", "answer", "situation")

# ================================================================ the question (any edit changes the fingerprint)
SYSTEM_PROMPT = (
    "You are an impartial judge of answers written by AI assistants. You reply with a single JSON object "
    "and no other text."
)

USER_TEMPLATE = """Below is a question that a user put to an AI assistant, followed by the assistant's answer. Judge \
the answer on each of the five aspects listed, giving each a score from 1 (very poor) to 5 (excellent) and a short \
reason.

# Question
{situation}

# Answer
{answer}

# Aspects
- helpfulness: how far the answer takes up the user's question and leaves them with something useful. 5: it serves \
the user fully; 1: it is of little or no help.
- clarity: how well organised and easy to follow the answer is. 5: clear, in a logical order; 1: muddled or hard to \
follow.
- factuality: whether what the answer states is accurate and true. 5: no errors; 1: serious factual mistakes.
- depth: how thorough and detailed its treatment of the topic is. 5: it goes into the topic in depth; 1: it stays \
on the surface.
- engagement: how natural and engaging it sounds as a turn in a conversation. 5: lively and humanlike; 1: \
mechanical or dull.

# Reply
Score every aspect on its own, with a whole number from 1 to 5. Reply with this JSON object only, replacing each \
bracket with your reason (a sentence or two) and your score:
{{
  "helpfulness": {{"reason": "[reason]", "score": [1-5]}},
  "clarity": {{"reason": "[reason]", "score": [1-5]}},
  "factuality": {{"reason": "[reason]", "score": [1-5]}},
  "depth": {{"reason": "[reason]", "score": [1-5]}},
  "engagement": {{"reason": "[reason]", "score": [1-5]}}
}}"""


def judge_messages(situation, answer):
    """The chat request for one answer: the system turn, then USER_TEMPLATE with the situation and the answer."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(situation=situation, answer=answer)},
    ]


def question_sha256():
    """sha256 of the system turn and the user template: the judgments of two different questions never mix."""
    return hashlib.sha256(f"{SYSTEM_PROMPT}\n\n{USER_TEMPLATE}".encode()).hexdigest()


# ================================================================ data
@dataclasses.dataclass
class Answer:
    system: str  # study/run.py's `row`, or 'MODEL / PROMPT' for eval_nli.py's rows
    id: str  # the situation
    sample: int  # which answer to that situation (0 when there is one)
    situation: str
    text: str

    @property
    def key(self):
        return self.system, self.id, self.sample


def answers_to_judge(path, limit=None):
    """The answers to judge, in file order, from the answers JSONL that eval_nli.py or study/run.py writes. A system is
    'ROW / PROMPT' when the row has a `row` (study/run.py), else 'MODEL / PROMPT'; an answer's key is (system, id, sample
    or 0).
    `limit`: only the first N answers of each system. Every row is checked before anything is asked or written.
    Example: rows (m, implicit, s1), (m, implicit, s2), (m, explicit, s1) with limit 1 -> the first and the third."""
    answers, keys, per_system = [], set(), {}
    for n, row in read_jsonl(path, "answers"):
        where = f"{path}, line {n}"
        missing = [k for k in ANSWER_FIELDS if k not in row]
        if missing:
            raise DataError(
                f"{where}: missing field(s) {', '.join(missing)}; an answers file (eval_nli.py writes "
                f"one) has {', '.join(ANSWER_FIELDS)}"
            )
        if not isinstance(row["situation"], str) or not row["situation"].strip():
            raise DataError(f"{where}: 'situation' must be non-empty text (the judge is shown it)")
        if row["answer"] is not None and not isinstance(row["answer"], str):
            raise DataError(
                f"{where}: 'answer' must be text (or null for an empty answer), not "
                f"{described(row['answer'])}"
            )
        sample = row.get("sample", 0)
        if not isinstance(sample, int) or isinstance(sample, bool) or sample < 0:
            raise DataError(
                f"{where}: 'sample' must be a whole number >= 0, not {described(sample)}"
            )
        names = [text_id(where, row, k) for k in ("row" if "row" in row else "model", "prompt")]
        system = " / ".join(names)
        a = Answer(
            system, text_id(where, row), sample, row["situation"].strip(), row["answer"] or ""
        )
        if a.key in keys:
            raise DataError(
                f"{where}: a second answer of {system!r} to situation {a.id!r} (sample {sample}); "
                f"number the answers to one situation with 'sample'"
            )
        keys.add(a.key)
        per_system[system] = per_system.get(system, 0) + 1
        if limit is None or per_system[system] <= limit:
            answers.append(a)
    if not answers:
        raise DataError(f"{path}: the file holds no answers")
    return answers


# ================================================================ reading a reply
WHOLE_NUMBER = re.compile(r"\s*[+-]?\d+\s*")


def parse_scores(reply):
    """{aspect: score} from the judge's reply, or a ValueError saying why it is unusable (it is then asked again).
    The object may sit in a ```json fence or among other words; an aspect is {"reason": ..., "score": s} or just s,
    its name in any case; a score is a whole number 1-5, as a number (4, 4.0) or as text ("4"). 4.5, "4/5", 0 and 6
    are refused: never rounded, clipped or read as 0. Nothing ambiguous is guessed: two objects with different
    scores, or one aspect (or any key) twice, are refused.
    Example: 'Here: {"helpfulness": {"reason": "ok", "score": "4"}, ...}' -> {"helpfulness": 4, ...}"""
    if not reply.strip():
        raise ValueError("an empty reply")
    found, problems = [], []
    for data in json_objects(reply):
        try:
            found.append(scores_of(data))
        except ValueError as e:
            problems.append(e)
    if not found:
        raise problems[0]
    if problems:  # a second object that cannot be read may be the one meant
        raise ValueError(
            f"{len(found) + len(problems)} JSON objects, {len(problems)} of them unusable ({problems[0]}): "
            f"which is meant is a guess"
        )
    if any(f != found[0] for f in found[1:]):
        raise ValueError(
            f"{len(found)} JSON objects with different scores: which is meant is a guess"
        )
    return found[0]


def json_objects(reply):
    """The JSON values in a reply, in order, from its first '{' to its last '}': each one decoded, and the words
    between two of them (a closing fence, 'and in short:') skipped. ValueError when there is none or one does not
    decode (a key twice in an object included: JSON would keep the last silently).
    Example: 'A: {"x": 1} or B: {"x": 2}.' -> [{"x": 1}, {"x": 2}]"""
    start, end = reply.find("{"), reply.rfind("}")
    if start < 0 or end < start:
        raise ValueError("no JSON object in the reply")
    body, values, at = reply[start : end + 1], [], 0
    # numbers as written (decimal): a float would read 4.99999999999999999 as 5
    decoder = json.JSONDecoder(object_pairs_hook=unique_keys, parse_float=decimal.Decimal)
    while at >= 0:
        try:
            value, at = decoder.raw_decode(body, at)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError("JSON nested too deeply to read") from None
        except ValueError as e:  # unique_keys; a number of more than 4300 digits
            raise ValueError(str(e)) from None
        values.append(value)
        at = body.find("{", at)
    return values


def scores_of(data):
    """The five scores of one decoded JSON object (see parse_scores)."""
    if not isinstance(data, dict):
        raise ValueError("the JSON is not an object")
    named, spelled = {}, {}
    for k, v in data.items():
        name = k.strip().lower()
        if name in named and name in ASPECTS:
            raise ValueError(f"{name!r} appears twice ({spelled[name]!r} and {k!r})")
        named[name], spelled[name] = v, k
    return {aspect: aspect_score(aspect, named) for aspect in ASPECTS}


def shown(value):
    """A value in an error line: its repr, cut at 40 characters."""
    text = str(value) if isinstance(value, decimal.Decimal) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def aspect_score(aspect, data):
    """The whole-number score 1-5 of one aspect (see parse_scores)."""
    if aspect not in data:
        raise ValueError(f"no {aspect!r} in the reply")
    entry = data[aspect]
    if isinstance(entry, dict):
        keys = [k for k in entry if k.strip().lower() == "score"]  # "Score" too, never two
        if not keys:
            raise ValueError(f"{aspect!r} has no 'score'")
        if len(keys) > 1:
            raise ValueError(f"{aspect!r} has 'score' twice ({keys[0]!r} and {keys[1]!r})")
        entry = entry[keys[0]]
    if isinstance(entry, bool) or not isinstance(entry, (int, float, decimal.Decimal, str)):
        raise ValueError(f"{aspect}: score {shown(entry)} is not a number")
    if isinstance(entry, str) and WHOLE_NUMBER.fullmatch(entry):
        entry = int(entry)
    if isinstance(entry, decimal.Decimal):  # a number with a point or an exponent: 4.0, 1e400
        whole = entry == entry.to_integral_value()
    else:  # a string that is no whole number; NaN and Infinity (floats)
        whole = not isinstance(entry, str) and (isinstance(entry, int) or entry.is_integer())
    if not whole:
        raise ValueError(f"{aspect}: score {shown(entry)} is not a whole number")
    if not 1 <= entry <= 5:
        raise ValueError(f"{aspect}: score {shown(entry)} is outside 1-5")
    return int(entry)


# ================================================================ the client
class Unusable(RuntimeError):
    """A failure that every other request would share (no server, a refused key, an unknown model): the run stops
    with one line instead of recording every answer as failed."""


def need_openai():
    try:
        import openai
    except ImportError:
        raise ImportError(
            "the judge talks to its server through the openai package: pip install openai"
        ) from None
    return openai


def resolve_base_url(flag, env_name):
    """--base-url, else $OPENAI_BASE_URL (as the openai client would), else OpenAI's own API. A refused URL is
    printed with the key (from $env_name) redacted: a user may have pasted it into the URL."""
    url = flag or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (a port that is no number 0-65535 raises here)
        well_formed = parts.scheme in ("http", "https") and parts.hostname
    except ValueError:  # an unclosed "[", a port "abc" or 99999
        well_formed = False
    if not well_formed:
        shown_url = redact(url, os.environ.get(env_name, "").strip())
        raise ValueError(
            f"--base-url {shown_url}: expected http(s)://HOST[:PORT]/v1, e.g. http://localhost:8000/v1"
        )
    return url


def is_loopback(url):
    """Whether the URL's host is this machine (localhost, 127.0.0.0/8, ::1).

    >>> is_loopback("http://127.0.0.1:8000/v1"), is_loopback("https://api.openai.com/v1")
    (True, False)
    """
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key(base_url, env_name):
    """The key from the environment variable `env_name`, never from a flag or a file. `none` sends a dummy key, and
    so does an unset variable for a loopback URL: vLLM, Ollama, llama.cpp and transformers serve take any key unless
    started with one. An unset variable for any other server is an error before any request is made."""
    if env_name.lower() == DUMMY_KEY:
        return DUMMY_KEY
    key = os.environ.get(env_name, "").strip()
    if key:
        return key
    if is_loopback(base_url):
        print(
            f"[judge] ${env_name} is not set: sending the dummy key {DUMMY_KEY!r} to the local server at {base_url}",
            file=sys.stderr,
        )
        return DUMMY_KEY
    raise ValueError(
        f"--api-key-env {env_name}: the environment variable {env_name} is not set, and {base_url} needs "
        f"a key: export {env_name}=... (or --api-key-env NAME of another variable; --api-key-env none "
        f"for a server that needs no key)"
    )


KEY_PIECE = 8  # no run of this many characters of the key is ever stored or printed
ESCAPE = re.compile(  # one character as a server may have escaped it: \u0073 (also \\u0073), \U00000073,
    # %u0073, \x73, %73, &#115;, &#x73; or a separator it may have put between characters (spaces, newlines,
    # zero-width and soft-hyphen characters), which a reader skips
    r"\\+u([0-9a-fA-F]{4})|\\+U([0-9a-fA-F]{8})|%u([0-9a-fA-F]{4})|\\+x([0-9a-fA-F]{2})|%([0-9a-fA-F]{2})"
    r"|&#[xX]([0-9a-fA-F]{1,6});|&#([0-9]{1,7});|\\+(.)|([\s\u00ad\u200b-\u200f\u2060-\u2064\ufeff])",
    re.S,
)


def unescaped(m):
    """The character an ESCAPE match stands for ("" for a separator)."""
    for group, base in ((1, 16), (2, 16), (3, 16), (4, 16), (5, 16), (6, 16), (7, 10)):
        if m.group(group):
            n = int(m.group(group), base)
            return chr(n) if n <= 0x10FFFF else "\ufffd"
    return m.group(8) or ""


def redact(text, key):
    """`text` with every piece of the key that is KEY_PIECE (8) characters or longer replaced by [API KEY], also where
    the server escaped some of its characters (\\u0073, \\x73, %73, &#115;) or put separators between them (spaces,
    newlines, zero-width characters: see ESCAPE). So no cut, before or after, can leave
    more than 7 characters of the key in a message, a stored reply or a printed line. A key of fewer than 8
    characters is replaced only whole; the dummy key is not secret.
    Example, key 'sk-abcdefghijk': 'x s\\u006b-abcdefgh[cut]' -> 'x [API KEY][cut]', but 'sk-abcd' stays."""
    if not text or not key or key == DUMMY_KEY:
        return text
    k = min(KEY_PIECE, len(key))
    pieces = {key[i : i + k] for i in range(len(key) - k + 1)}
    # the text as a reader sees it, escapes decoded and separators skipped, and where each of its characters
    # starts and ends in `text`
    chars, starts, ends, pos = [], [], [], 0
    for m in ESCAPE.finditer(text):
        chars.append(text[pos : m.start()])
        starts += range(pos, m.start())
        ends += range(pos + 1, m.start() + 1)
        c = unescaped(m)
        if c:
            chars.append(c)
            starts.append(m.start())
            ends.append(m.end())
        pos = m.end()
    chars.append(text[pos:])
    starts += range(pos, len(text))
    ends += range(pos + 1, len(text) + 1)
    plain, spans = "".join(chars), []
    for i in range(len(plain) - k + 1):
        if plain[i : i + k] in pieces:
            a, b = starts[i], ends[i + k - 1]
            if spans and a <= spans[-1][1]:
                spans[-1][1] = b
            else:
                spans.append([a, b])
    out, pos = [], 0
    for a, b in spans:
        out += [text[pos:a], "[API KEY]"]
        pos = b
    return "".join(out) + text[pos:]


def one_line(text, key, limit):
    """`text` on one line, redacted, then cut to `limit` characters: redaction always comes before the cut."""
    text = no_surrogates(redact(" ".join(str(text).split()), key))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def no_surrogates(text):
    """`text` with each lone surrogate (a server's "\\ud800", half of a pair: no character) as U+FFFD, so that
    what is stored reads back (harness.data.json_line refuses them)."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


SECRETS = []  # the keys this process has been given: no log record shows them (hide_in_logs)


def hide_in_logs(key):
    """From now on every log record of this process is made with the key redacted: with OPENAI_LOG=debug the
    openai client logs the server's headers, and a server may echo the key in one (x-request-id)."""
    if not key or key == DUMMY_KEY or key in SECRETS:
        return
    if not SECRETS:  # the record factory is wrapped once; it reads SECRETS at each record
        make = logging.getLogRecordFactory()

        def record(*args, **kwargs):
            r = make(*args, **kwargs)
            try:
                text = r.getMessage()
            except Exception:  # arguments that do not fit: logging itself reports it later
                text = f"{r.msg!r} % {r.args!r}"
            if r.exc_info:  # a traceback's last line may hold the key too
                text += "\n" + "".join(traceback.format_exception(*r.exc_info))
                r.exc_info = r.exc_text = None
            for secret in SECRETS:
                text = redact(text, secret)
            r.msg, r.args = text, ()
            return r

        logging.setLogRecordFactory(record)
    SECRETS.append(key)


def make_client(base_url, key, timeout, http_retries):
    """The openai client. Its own retries (http_retries) cover timeouts, lost connections, 408, 409, 429 and 5xx,
    with exponential backoff from 0.5 s (at most 8 s), or the server's Retry-After when it sends one up to 2 min."""
    hide_in_logs(key)
    return need_openai().OpenAI(
        base_url=base_url, api_key=key, timeout=timeout, max_retries=http_retries
    )


class RequestFailed(RuntimeError):
    """A request that failed after the client's own retries: its answer is recorded as failed, the run goes on."""


class BadReply(RequestFailed):
    """A reply that came (and is paid for) but is no chat completion with text in it: asked again like an unusable
    reply, and its body is kept as the answer's `reply`."""

    def __init__(self, reason, body, tokens, retries):
        super().__init__(reason)
        self.reason, self.body, self.tokens, self.retries = reason, body, tokens, retries


def chat(client, model, messages, max_tokens, temperature):
    """One chat completion: (reply text, {"prompt", "completion"} tokens from the server's usage, HTTP retries the
    client took), or BadReply. max_tokens, not max_completion_tokens: every local server reads the former. The body
    is read by read_completion, not by the client, which hands on a number or a list as the text and fails with an
    AttributeError on a null message or an HTML page."""
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=temperature
    )
    retries = getattr(raw, "retries_taken", 0)
    text, tokens, problem = read_completion(raw.text)
    if problem:
        raise BadReply(problem, raw.text, tokens, retries)
    return text, tokens, retries


def read_completion(body):
    """(text, tokens, problem) of a chat completion's body. problem: None, or why the body holds no reply text (text
    is then ""); tokens: {"prompt", "completion"}, each the server's count if it is a whole number >= 0, else None.
    Example: '{"choices": [{"message": {"content": 5}}]}' -> ("", both None, "the reply's content is the number 5,
    not text")."""
    tokens = dict(prompt=None, completion=None)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        what = "an HTML page" if body.lstrip()[:1] == "<" else "not JSON"
        return "", tokens, f"the server's body is {what}, not a chat completion"
    if not isinstance(data, dict):
        return "", tokens, f"the server's body is {described(data)}, not a chat completion object"
    if isinstance(data.get("usage"), dict):
        tokens = {k: count_of(data["usage"].get(f"{k}_tokens")) for k in tokens}
    choices = data.get("choices")
    if choices == []:
        return "", tokens, "'choices' is an empty list: the server sent no reply"
    if not isinstance(choices, list):
        return "", tokens, f"'choices' is {described(choices)}, not a list of replies"
    if not isinstance(choices[0], dict) or "message" not in choices[0]:
        return "", tokens, "the first choice has no 'message'"
    message = choices[0]["message"]
    if not isinstance(message, dict):
        return "", tokens, f"the first choice's 'message' is {described(message)}, not an object"
    content, refusal = message.get("content"), message.get("refusal")
    if content is None and isinstance(refusal, str) and refusal.strip():
        return "", tokens, f"the judge refused: {refusal}"
    if content is not None and not isinstance(content, str):
        return "", tokens, f"the reply's content is {described(content)}, not text"
    return content or "", tokens, None


def count_of(value):
    """A token count as the server sent it, if it is one (a whole number >= 0), else None."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**15
    return value if ok else None


def cannot_connect(e):
    """Whether a connection error means no server is reachable at all (refused, unknown host), as opposed to a
    connection that opened and was lost before the whole reply came."""
    while e is not None:
        if type(e).__name__ == "ConnectError" or isinstance(
            e, ConnectionRefusedError | socket.gaierror
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def request_error(e, base_url, model, env_name, key):
    """The one-line reason an openai error ended a request, for the answer's failed row; an Unusable instead when
    no other request can succeed either. Every piece of the server's text is redacted before it is cut."""
    openai = need_openai()
    said = lambda limit: one_line(e, key, limit)
    if isinstance(e, openai.APITimeoutError):
        return "timeout: no reply within --timeout, on every try"
    if isinstance(e, openai.APIConnectionError):
        if cannot_connect(e):
            raise Unusable(
                f"--base-url {base_url}: cannot connect ({one_line(e.__cause__ or e, key, 160)}); is the "
                f"server running, and does the URL end in /v1?"
            )
        return (
            f"connection lost before the whole reply came, on every try (--http-retries) "
            f"({one_line(e.__cause__ or e, key, 160)})"
        )
    if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
        raise Unusable(
            f"{base_url} refused the key from ${env_name} (HTTP {e.status_code}); check the key, or pass "
            f"--api-key-env with the variable that holds the right one"
        )
    if isinstance(e, openai.NotFoundError):
        raise Unusable(
            f"--model {model}: {base_url} answered 404 (no such model there, or the URL lacks /v1): "
            f"{said(160)}"
        )
    if isinstance(e, openai.APIStatusError):
        return f"HTTP {e.status_code}: {said(300)}"
    return f"{type(e).__name__}: {said(300)}"


MAX_BODY = 100_000  # characters of a reply kept and read; the object asked for takes under 3,000


def make_ask(base_url, env_name, key, model, max_tokens, temperature, timeout, http_retries):
    """ask(messages) -> (reply text, tokens, HTTP retries) through one client shared by every thread; a failed
    request raises RequestFailed (BadReply for a reply without text), or Unusable, with a one-line reason. No reply,
    body or reason holds a piece of the key (a server may echo it, whole or escaped)."""
    openai = need_openai()
    client = make_client(base_url, key, timeout, http_retries)
    kept = lambda text: no_surrogates(redact(text[: MAX_BODY + len(key)], key)[:MAX_BODY])

    def ask(messages):
        try:
            text, tokens, retries = chat(client, model, messages, max_tokens, temperature)
            if len(text) > MAX_BODY:
                raise BadReply(
                    f"a reply of {len(text)} characters, far over the object asked for",
                    text,
                    tokens,
                    retries,
                )
            return kept(text), tokens, retries
        except BadReply as e:
            raise BadReply(
                one_line(e.reason, key, 300), kept(e.body), e.tokens, e.retries
            ) from None
        except openai.OpenAIError as e:
            try:
                reason = request_error(e, base_url, model, env_name, key)
            except Unusable as stop:
                raise Unusable(redact(str(stop), key)) from None
            raise RequestFailed(reason) from None
        except Exception as e:  # anything else the client met: this answer fails, the run goes on
            raise RequestFailed(f"{type(e).__name__}: {one_line(e, key, 300)}") from None

    return ask


def in_parallel(work, items, concurrency):
    """(item, work(item)) for each item, on `concurrency` threads, yielded as each finishes so that the caller saves
    every result the moment it exists. Only `concurrency` items are out at a time, so a stop leaves just those. A
    stop (Ctrl-C, or an exception from work) sends nothing more; the items still in flight are yielded as they finish
    (they are paid for), and then the stop is raised: KeyboardInterrupt, or the first exception. A second Ctrl-C
    drops them."""
    items, stop = iter(items), None
    with ThreadPoolExecutor(concurrency) as pool:
        running = {pool.submit(work, x): x for x in itertools.islice(items, concurrency)}
        while running:
            try:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt as e:
                if isinstance(stop, KeyboardInterrupt):
                    raise
                stop = e
                print(
                    f"\nCtrl-C: saving the {len(running)} replies in flight, then stopping (Ctrl-C again to drop "
                    f"them)",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            for f in done:
                x = running.pop(f)
                try:
                    result = f.result()
                except Exception as e:
                    stop = stop or e
                    continue
                yield x, result
                for nxt in itertools.islice(items, 0 if stop else 1):
                    running[pool.submit(work, nxt)] = nxt
    if stop is not None:
        raise stop


# ================================================================ judging
@dataclasses.dataclass
class JudgeSettings:
    model: str
    max_tokens: int
    temperature: float
    max_retries: int  # asks again after an unusable reply


def sent_digest(answer):
    """What the judge is shown of an answer, its situation and its text, as 16 hex digits of sha256: each judgment
    carries it, so a judgment is never reported for a text it did not judge."""
    return hashlib.sha256(json.dumps([answer.situation, answer.text]).encode()).hexdigest()[:16]


def judge_answer(ask, answer, s):
    """The judgment row of one answer: asked until the reply parses, at most 1 + s.max_retries times; after that,
    or when the request itself failed (after the client's own retries), status 'failed' with the last reply and why.
    A reply that is no chat completion with text (BadReply) counts as an unusable reply.
    ask: see make_ask. Example: replies 'oops', then a good one -> status 'ok', attempts 2."""
    tokens, http_retries, reply, why = dict(prompt=0, completion=0), 0, None, None
    row = lambda status, attempts, scores=None: dict(
        system=answer.system,
        id=answer.id,
        sample=answer.sample,
        status=status,
        scores=scores,
        reply=reply,
        error=why,
        attempts=attempts,
        http_retries=http_retries,
        tokens=tokens,
        sent_sha256=sent_digest(answer),
    )
    for attempt in range(1, s.max_retries + 2):
        try:
            reply, used, retries = ask(judge_messages(answer.situation, answer.text))
            problem = None
        except BadReply as e:
            reply, used, retries, problem = e.body, e.tokens, e.retries, e.reason
        except RequestFailed as e:
            why = str(e)
            return row("failed", attempt)
        http_retries += retries
        tokens = {k: tokens[k] + (used[k] or 0) for k in tokens}
        try:
            if problem:
                raise ValueError(problem)
            return row("ok", attempt, parse_scores(reply))
        except ValueError as e:
            why = f"unusable reply: {e}"
    return row("failed", s.max_retries + 1)


# ================================================================ files: nothing is paid for twice
def settings_fingerprint(s):
    """What makes two judgments comparable: the judge model, the question, max_tokens and temperature; and its short
    hash, which every judgment row carries."""
    fields = dict(
        model=s.model,
        question_sha256=question_sha256(),
        max_tokens=s.max_tokens,
        temperature=float(s.temperature) + 0.0,  # + 0.0: -0.0 is 0.0, and hashes as 0.0
    )
    return fields, hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def check_fingerprint(out, fields, fingerprint):
    """The fingerprint the rows in --out carry, or a refusal with one line naming the flag that changed (its value
    shown as repr, so 'judge ' and 'judge' differ visibly). Settings equal in value keep the saved fingerprint, so
    -0.0 and 0.0 written by an earlier version are the same temperature. Reads only: a refused run writes nothing."""
    path = os.path.join(out, "judge_config.json")
    if not os.path.isfile(path):
        return fingerprint
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        saved = config["fingerprint"]
        if not isinstance(saved, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError, RecursionError):
        raise DataError(
            f"{path}: not a judge config written by eval_judge.py; use another --out, or delete it "
            f"together with judgments.jsonl"
        ) from None
    fresh = (
        f"use another --out, or delete {out}/judgments.jsonl and {path} to judge everything again"
    )
    for k, flag in (
        ("model", "--model"),
        ("max_tokens", "--max-tokens"),
        ("temperature", "--temperature"),
    ):
        if saved.get(k) != fields[k]:
            raise ValueError(
                f"{flag} {fields[k]!r}: the judgments in {out} were made with {flag} {saved.get(k)!r}; "
                f"{fresh}"
            )
    if saved.get("question_sha256") != fields["question_sha256"]:
        raise ValueError(
            f"the judge question (SYSTEM_PROMPT, USER_TEMPLATE of eval_judge.py, sha256 "
            f"{fields['question_sha256'][:12]}) is not the one the judgments in {out} were asked with "
            f"(sha256 {str(saved.get('question_sha256'))[:12]}); {fresh}"
        )
    kept = config.get("fingerprint_sha256")
    return kept if isinstance(kept, str) else fingerprint


ROW_FIELDS = dict(system=str, id=str, sample=int, status=str, fingerprint=str)


def judgment_problem(row):
    """Why a row of judgments.jsonl is not one that eval_judge.py writes, or None. The fields the report and the
    rerun use are checked: an ok row holds five whole-number scores 1-5."""
    if not isinstance(row, dict):
        return "not a JSON object"
    for k, kind in ROW_FIELDS.items():
        if k not in row:
            return f"no {k!r}"
        if not isinstance(row[k], kind) or isinstance(row[k], bool):
            return f"{k!r} is {described(row[k])}"
    if row["status"] not in ("ok", "failed"):
        return f"status {shown(row['status'])} is neither 'ok' nor 'failed'"
    if not isinstance(row.get("sent_sha256", ""), str):
        return f"'sent_sha256' is {described(row['sent_sha256'])}"
    for k in ("attempts", "http_retries"):
        if count_of(row.get(k)) is None:
            return f"{k!r} is {described(row.get(k))}, not a whole number >= 0"
    tokens = row.get("tokens")
    if not isinstance(tokens, dict) or any(
        tokens.get(k) is not None and count_of(tokens.get(k)) is None
        for k in ("prompt", "completion")
    ):
        return "'tokens' is not {'prompt': N, 'completion': N}"
    if not row["id"].strip() or not row["id"].isprintable() or row["id"] != row["id"].strip():
        return f"'id' {shown(row['id'])} is no id eval_judge.py writes"
    if row["status"] == "failed":
        return None if row.get("scores") is None else "a failed row that holds scores"
    scores = row.get("scores")
    if not isinstance(scores, dict):
        return f"an ok row whose 'scores' is {described(scores)}"
    extra = [k for k in scores if k not in ASPECTS]
    if extra:
        return f"an ok row with a score for {shown(extra[0])}, which is no aspect"
    for aspect in ASPECTS:
        if aspect not in scores:
            return f"an ok row without a score for {aspect!r}"
        v = scores[aspect]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 5:
            return f"{aspect} score {shown(v)} is not a whole number 1-5"
    return None


def read_judgments(path, fingerprint):
    """{key: the last row for that key} of judgments.jsonl: a rerun appends, so a later row replaces an earlier
    failed one. A last line without its newline that does not parse is an append cut short by a kill, and is ignored;
    any other bad line, a row that is not one eval_judge.py writes (judgment_problem), or a row made under another
    fingerprint, is an error naming the line. (Not read_jsonl: that refuses the torn last line.)"""
    if not os.path.exists(path):
        return {}
    lines, rows = read_text(path, "judgments").split("\n"), {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json_line(path, n, line)
        except DataError as e:
            if n == len(lines):
                continue
            raise DataError(f"{e}; delete that line to judge its answer again") from None
        problem = judgment_problem(row)
        if problem:
            raise DataError(
                f"{path}, line {n}: not a judgment row of eval_judge.py ({problem}); delete that line "
                f"to judge its answer again"
            )
        if row["fingerprint"] != fingerprint:
            raise DataError(
                f"{path}, line {n}: judged under settings {row['fingerprint']}, not this run's "
                f"{fingerprint} (see judge_config.json); use another --out"
            )
        rows[(row["system"], row["id"], row["sample"])] = row
    return rows


class JudgmentLog:
    """judgments.jsonl opened for appending. A row is one line written and flushed at once, so a killed process
    loses no row it has written; fsync every `fsync_every` rows and at the end, so a power cut loses at most those."""

    def __init__(self, path, fsync_every):
        drop_torn_tail(path)
        self.f, self.every, self.n = open(path, "a", encoding="utf-8"), fsync_every, 0

    def add(self, row):
        self.f.write(
            json.dumps(row) + "\n"
        )  # ASCII (ensure_ascii): cut anywhere, still valid UTF-8
        self.f.flush()
        self.n += 1
        if self.n % self.every == 0:
            os.fsync(self.f.fileno())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


# ================================================================ report
def mean_se(values):
    """(mean, standard error = sample std (ddof 1) / sqrt(n)); the standard error is NaN for one value.

    >>> mean_se([4, 2, 3])                  # std 1, so se = 1 / sqrt(3)
    (3.0, 0.5773502691896258)
    """
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def by_situation(answers, judged):
    """{system: {"judged", "failed", "values": {metric: {situation id: value}}}} over the answers asked for. A
    situation's value is the mean over its judged answers, so several samples of one situation count once; a failed
    answer has no score and is only counted. Example: samples scored 4 and 2 on one situation -> 3 there."""
    out = {}
    for a in answers:
        s = out.setdefault(a.system, dict(judged=0, failed=0, scores={}))
        row = judged.get(a.key)
        if row is None or row["status"] != "ok":
            s["failed"] += row is not None
            continue
        s["judged"] += 1
        scores = dict(row["scores"], overall=float(np.mean([row["scores"][k] for k in ASPECTS])))
        for m in METRICS:
            s["scores"].setdefault(m, {}).setdefault(a.id, []).append(scores[m])
    for s in out.values():
        scores = s.pop("scores")
        s["values"] = {
            m: {sid: float(np.mean(v)) for sid, v in scores.get(m, {}).items()} for m in METRICS
        }
    return out


def score_rows(systems):
    """One row per system and metric: judged, failed, situations, mean and standard error over situations."""
    return [
        dict(
            table="scores",
            system=name,
            vs="",
            metric=m,
            judged=s["judged"],
            failed=s["failed"],
            situations=len(s["values"][m]),
            **dict(zip(("mean", "se"), mean_se(list(s["values"][m].values())))),
        )
        for name, s in systems.items()
        for m in METRICS
    ]


def paired_rows(systems, baseline):
    """One row per other system and metric: that system minus the baseline over the situations both have a score
    for (mean, 95 % bootstrap interval, sign-flip p: stats.paired)."""
    from harness.stats import paired

    rows, base = [], systems[baseline]["values"]
    for name, s in systems.items():
        for m in METRICS if name != baseline else ():
            common = [sid for sid in base[m] if sid in s["values"][m]]
            if common:
                d = paired(
                    [s["values"][m][sid] for sid in common], [base[m][sid] for sid in common]
                )
                rows.append(
                    dict(
                        table="paired",
                        system=name,
                        vs=baseline,
                        metric=m,
                        situations=len(common),
                        mean=d["mean"],
                        lo=d["lo"],
                        hi=d["hi"],
                        p=d["p"],
                    )
                )
    return rows


def csv_text(rows):
    fields = [
        "table",
        "system",
        "vs",
        "metric",
        "judged",
        "failed",
        "situations",
        "mean",
        "se",
        "lo",
        "hi",
        "p",
    ]
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return text.getvalue()


def markdown(rows, notes):
    """The notes, a table of mean ± standard error per system and metric, and the paired differences."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"
    pm = lambda r: f"{r['mean']:.2f}" + ("" if np.isnan(r["se"]) else f" ± {r['se']:.2f}")
    cell = {(r["table"], r["system"], r["metric"]): r for r in rows}
    systems = list(dict.fromkeys(r["system"] for r in rows if r["table"] == "scores"))
    md = notes + [
        "",
        line(["system", "judged", "failed", *METRICS]),
        "|" + "---|" * (3 + len(METRICS)),
    ]
    for name in systems:
        first = cell[("scores", name, METRICS[0])]
        md.append(
            line(
                [name, first["judged"], first["failed"]]
                + [pm(cell[("scores", name, m)]) for m in METRICS]
            )
        )
    others = [name for name in systems if ("paired", name, METRICS[0]) in cell]
    if others:
        base = cell[("paired", others[0], METRICS[0])]["vs"]
        md += [
            "",
            f"Paired by situation: system minus {base}, mean [95 % bootstrap interval], sign-flip p",
            "",
            line(["system", "situations", *METRICS]),
            "|" + "---|" * (2 + len(METRICS)),
        ]
        for name in others:
            d = [cell[("paired", name, m)] for m in METRICS]
            md.append(
                line(
                    [name, d[0]["situations"]]
                    + [
                        f"{r['mean']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}] p={r['p']:.3f}"
                        for r in d
                    ]
                )
            )
    return "\n".join(md)


def plot_scores(rows, path):
    """One bar group per metric, a bar per system, error bar = standard error; without matplotlib, a note."""
    plt = pyplot(os.path.basename(path))
    if plt is None:
        return
    systems = list(dict.fromkeys(r["system"] for r in rows if r["table"] == "scores"))
    cell = {(r["system"], r["metric"]): r for r in rows if r["table"] == "scores"}
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(METRICS), 3.8))
    width, x = 0.8 / len(systems), np.arange(len(METRICS))
    for k, name in enumerate(systems):
        mean, se = np.array(
            [[cell[(name, m)][key] for m in METRICS] for key in ("mean", "se")]
        )  # [n_metrics] each
        ax.bar(x + k * width, mean, width, yerr=np.nan_to_num(se), capsize=3, label=name)
    ax.set_xticks(x + 0.4 - width / 2, METRICS, fontsize=8)
    ax.set_ylabel("judge score (1-5)"), ax.set_ylim(0, 5.4), ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(plt, fig, path)


# ================================================================ dry run
def prompt_tokens(requests, tokenizer=None):
    """(prompt tokens of the requests, how they were counted): with the judge's own tokenizer and chat template
    when one is given, else characters / 4, the usual rule of thumb for English text."""
    if tokenizer is None:
        return sum(len(m["content"]) for r in requests for m in r) // 4, "characters / 4"
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as e:
        raise OSError(
            f"--tokenizer {tokenizer}: cannot load it ({str(e).splitlines()[0][:160]})"
        ) from None
    if tok.chat_template:
        texts = [
            tok.apply_chat_template(r, tokenize=False, add_generation_prompt=True) for r in requests
        ]
    else:  # no template: the bare texts, a slight undercount
        texts = ["\n\n".join(m["content"] for m in r) for r in requests]
    return sum(
        len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts
    ), f"the tokenizer of {tokenizer}"


# ================================================================ Stage 1 through the same client
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


YES_NO = re.compile(r"\W*([A-Za-z]+)")


def ask_yes_no(
    pairs,
    model,
    question,
    base_url=None,
    api_key_env="OPENAI_API_KEY",
    concurrency=4,
    timeout=120.0,
    http_retries=4,
    max_tokens=8,
    temperature=0.0,
):
    """Stage 1's pair question (`question`, a format string with {a} and {b}: JUDGE_QUESTION) for each
    (a, b) through the judge's client: True when the
    reply's first word is 'yes' in any case (markdown and punctuation before it ignored). Any other first word, and a
    request that failed after the client's retries, counts as No and is reported on stderr with an example.
    Example: replies ['Yes, same point.', '**No**', 'Maybe'] -> [True, False, False], one reply reported."""
    base_url = resolve_base_url(base_url, api_key_env)
    ask = make_ask(
        base_url,
        api_key_env,
        api_key(base_url, api_key_env),
        model,
        max_tokens,
        temperature,
        timeout,
        http_retries,
    )

    def ask_pair(pair):
        try:
            return ask([{"role": "user", "content": question.format(a=pair[0], b=pair[1])}])[0]
        except RequestFailed as e:
            return e

    pairs = [tuple(p) for p in pairs]
    replies = dict(in_parallel(ask_pair, list(dict.fromkeys(pairs)), concurrency))
    said, odd, failed = [], [], []
    for pair in pairs:
        reply = replies[pair]
        first = YES_NO.match(reply) if isinstance(reply, str) else None
        said.append(bool(first) and first.group(1).lower() == "yes")
        if isinstance(reply, Exception):
            failed.append(str(reply))
        elif not first or first.group(1).lower() not in ("yes", "no"):
            odd.append(reply)
    if odd:
        print(
            f"[judge] {len(odd)} of {len(pairs)} replies start with neither Yes nor No and count as No, e.g. "
            f"{odd[0][:80]!r}",
            file=sys.stderr,
        )
    if failed:
        print(
            f"[judge] {len(failed)} of {len(pairs)} requests failed and count as No, e.g. {failed[0]}",
            file=sys.stderr,
        )
    return said


# ================================================================ main
def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--answers",
        required=True,
        type=text_arg,
        help="answers JSONL of eval_nli.py or study/run.py (id, model, prompt, "
        "answer, situation; study/run.py's `row` and `sample` are used when present)",
    )
    p.add_argument(
        "--model",
        default=PAPER_JUDGE,
        type=text_arg,
        help="the judge, as the server names it (default: %(default)s, the paper's)",
    )
    p.add_argument(
        "--base-url",
        type=text_arg,
        help="any OpenAI-compatible server, e.g. http://localhost:8000/v1 (default: "
        f"$OPENAI_BASE_URL, else {OPENAI_URL})",
    )
    p.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        type=text_arg,
        help="the environment variable that holds the key; "
        "'none' = a dummy key, which an unset variable also gives for a loopback URL (default: "
        "%(default)s)",
    )
    p.add_argument(
        "--out",
        default="runs/judge",
        type=text_arg,
        help="judgments.jsonl, judge_results.md/.csv, judge.png, "
        "judge_config.json (default: %(default)s)",
    )
    p.add_argument(
        "--limit",
        type=int,
        help="judge only the first N answers of each system (default: all; the "
        "paper judged 300 per test set)",
    )
    p.add_argument(
        "--baseline",
        type=text_arg,
        help="the system the others are compared with (default: the first in the file)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="requests in flight at once (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for one reply (default: %(default)s)",
    )
    p.add_argument(
        "--http-retries",
        type=int,
        default=4,
        help="the openai client's own retries of timeouts, lost "
        "connections, 429 and 5xx, with backoff and Retry-After (default: %(default)s)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="times an unusable reply (not JSON, an aspect "
        "missing, a score outside 1-5) is asked again before the answer counts as failed (default: "
        "%(default)s)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=PAPER_MAX_TOKENS,
        help="reply cap (default: %(default)s, the paper's)",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="judge sampling temperature (default: "
        "%(default)s, greedy: the same reply on a rerun, where the server allows)",
    )
    p.add_argument(
        "--fsync-every",
        type=int,
        default=8,
        help="fsync judgments.jsonl every N rows (each row is "
        "flushed at once; fsync guards against a power cut) (default: %(default)s)",
    )
    p.add_argument(
        "--rejudge-changed",
        action="store_true",
        help="ask again for an answer whose situation or text differs from what its saved judgment in --out was "
        "given (default: off: such a run is refused, naming the answer)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the number of requests and prompt tokens; send "
        "nothing, write nothing (default: off)",
    )
    p.add_argument(
        "--tokenizer",
        type=text_arg,
        help="the judge's tokenizer (hub id or dir) to count --dry-run's tokens (default: "
        "characters / 4)",
    )
    args = p.parse_args(argv)
    checks = [(k, getattr(args, k) >= 1, ">= 1") for k in ("max_tokens", "fsync_every")]
    checks += [
        ("concurrency", 1 <= args.concurrency <= MAX_CONCURRENCY, f"in [1, {MAX_CONCURRENCY}]")
    ]
    checks += [(k, getattr(args, k) >= 0, ">= 0") for k in ("http_retries", "max_retries")]
    checks += [
        ("limit", args.limit is None or args.limit >= 1, ">= 1"),
        ("timeout", 0 < args.timeout <= MAX_TIMEOUT, f"> 0 and at most {MAX_TIMEOUT} (a day)"),
        ("temperature", 0 <= args.temperature <= 2, "in [0, 2]"),
    ]
    for k, ok, words in checks:
        if not ok:  # NaN fails every comparison, so it lands here too
            p.error(f"--{k.replace('_', '-')} {getattr(args, k)}: must be {words}")
    args.temperature += 0.0  # -0.0 is 0.0
    return args


def to_ask(args, answers, fields, fingerprint):
    """(the fingerprint of --out's rows, the saved judgments, the answers to ask for): those with no judgment yet or
    a failed one, and with --rejudge-changed those whose text differs from what their judgment was given. Without
    it, such an answer is refused by name: its saved scores belong to another text. Reads only."""
    fingerprint = check_fingerprint(args.out, fields, fingerprint)
    judged = read_judgments(os.path.join(args.out, "judgments.jsonl"), fingerprint)
    ok = lambda a: judged.get(a.key, {}).get("status") == "ok"
    changed = [a for a in answers if ok(a) and judged[a.key].get("sent_sha256") != sent_digest(a)]
    if changed and not args.rejudge_changed:
        a = changed[0]
        unknown = "sent_sha256" not in judged[a.key]
        raise ValueError(
            f"--answers {args.answers}: {len(changed)} answer(s) differ from the text their judgment in "
            f"{args.out} was given"
            + (
                " (or it was judged by an earlier eval_judge.py, which kept no digest)"
                if unknown
                else ""
            )
            + f", e.g. the answer of {a.system!r} to {a.id!r} (sample {a.sample}); pass "
            f"--rejudge-changed to ask for them again, or use another --out"
        )
    return fingerprint, judged, [a for a in answers if not ok(a) or a in changed]


def main(argv=None):
    """Judge every answer not yet judged in --out, append each judgment as it arrives, then write the report."""
    args = parse_args(argv)
    answers = answers_to_judge(args.answers, args.limit)  # inputs first, then any request or output
    systems = list(dict.fromkeys(a.system for a in answers))
    baseline = args.baseline or systems[0]
    if baseline not in systems:
        raise ValueError(
            f"--baseline {baseline!r}: no such system in {args.answers}; the systems are "
            f"{', '.join(map(repr, systems))}"
        )
    base_url = resolve_base_url(args.base_url, args.api_key_env)
    s = JudgeSettings(args.model, args.max_tokens, args.temperature, args.max_retries)
    fields, fingerprint = settings_fingerprint(s)
    if args.dry_run:
        _, _, todo = to_ask(args, answers, fields, fingerprint)
        n, how = prompt_tokens([judge_messages(a.situation, a.text) for a in todo], args.tokenizer)
        print(
            f"dry run: {len(todo)} requests ({len(answers) - len(todo)} of {len(answers)} answers already judged "
            f"in {args.out}), about {n} prompt tokens ({how}) and at most {len(todo) * args.max_tokens} completion "
            f"tokens (--max-tokens {args.max_tokens}); each unusable reply asked again (--max-retries "
            f"{args.max_retries}) adds one request more; nothing was sent or written"
        )
        return
    key = api_key(
        base_url, args.api_key_env
    )  # a missing key or package: an error before any output
    ask = make_ask(
        base_url,
        args.api_key_env,
        key,
        s.model,
        s.max_tokens,
        s.temperature,
        args.timeout,
        args.http_retries,
    )
    with lock_run_folder(args.out):  # one process per --out: two would pay for every answer twice
        judge_all(args, answers, baseline, s, fields, fingerprint, ask, redact(base_url, key))


def judge_all(args, answers, baseline, s, fields, fingerprint, ask, base_url):
    """main's work under the lock of --out: ask for what is missing, save each row as it comes, write the report.
    base_url: as shown (a key written into the URL is redacted)."""
    fingerprint, judged, todo = to_ask(args, answers, fields, fingerprint)
    claim_out_dir(args.out)
    config = dict(vars(args), base_url=base_url, fingerprint=fields, fingerprint_sha256=fingerprint)
    print("config:", json.dumps(config))
    write_text(os.path.join(args.out, "judge_config.json"), json.dumps(config, indent=1))

    # ---- ask for every answer not judged yet; each row is saved as it arrives
    log_path = os.path.join(args.out, "judgments.jsonl")
    work = lambda answer: dict(judge_answer(ask, answer, s), fingerprint=fingerprint)
    t0, stats = time.time(), dict(ok=0, failed=0)
    print(
        f"[judge] {len(todo)} of {len(answers)} answers to judge with {s.model} at {base_url}",
        flush=True,
    )
    every = max(1, len(todo) // 20)
    try:
        with JudgmentLog(log_path, args.fsync_every) as log:
            for k, (_, row) in enumerate(in_parallel(work, todo, args.concurrency), 1):
                log.add(row)
                stats[row["status"]] += 1
                if k % every == 0 or k == len(todo):
                    print(
                        f"[judge] {k}/{len(todo)}: {stats['ok']} ok, {stats['failed']} failed, "
                        f"{time.time() - t0:.0f} s",
                        flush=True,
                    )
    except Unusable as e:
        raise Unusable(
            f"{e} ({stats['ok'] + stats['failed']} judgments saved in {log_path}; a rerun asks only for "
            f"the rest)"
        ) from None

    # ---- report over every answer asked for, this run's and earlier runs'
    judged = read_judgments(log_path, fingerprint)
    scores = by_situation(answers, judged)
    rows = score_rows(scores) + (paired_rows(scores, baseline) if len(scores) > 1 else [])
    fails = sum(s_["failed"] for s_ in scores.values())
    notes = [
        f"Judge {s.model} at {base_url}; question sha256 {fields['question_sha256'][:12]}, max_tokens "
        f"{s.max_tokens}, temperature {s.temperature}. Scores 1-5; 'overall' is the mean of the five aspects. "
        f"Each situation counts once (the mean of its judged answers); ± is the standard error over situations. "
        f"{fails} answer(s) failed (no usable reply after {1 + s.max_retries} asks, or the request failed): "
        f"they have no score, and a rerun asks for them again."
    ]
    write_text(os.path.join(args.out, "judge_results.csv"), csv_text(rows))
    table = markdown(rows, notes)
    write_text(os.path.join(args.out, "judge_results.md"), table + "\n")
    plot_scores(rows, os.path.join(args.out, "judge.png"))
    print(table)
    used = [judged[a.key] for a in answers if a.key in judged]
    print(
        f"[judge] {len(used)} judgments, {sum(r['attempts'] for r in used)} asks, "
        f"{sum(r['tokens']['prompt'] or 0 for r in used)} prompt and "
        f"{sum(r['tokens']['completion'] or 0 for r in used)} completion tokens; results in {args.out}"
    )


if __name__ == "__main__":
    run_cli(main)
