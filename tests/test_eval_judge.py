"""eval_judge.py as a specification, against a real HTTP server on 127.0.0.1 that speaks the OpenAI chat completions
API, reached through the real openai client. Each answer carries a mark, [[id=... mode=... scores=...]], that tells
the fake judge how to reply to it, and the fake counts the requests per answer: so every test knows exactly what
was asked, how often, and what came back. No test reaches an address outside the loopback range."""

import base64
import collections
import csv
import hashlib
import html
import http.server
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import warnings

import pytest

openai = pytest.importorskip("openai")

import eval_judge as ej  # noqa: E402  (after the skip: the module itself imports openai only when asked to)
import harness.cli  # noqa: E402
import harness.data  # noqa: E402
from eval_judge import JUDGE_QUESTION  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sk-test-DO-NOT-LEAK-7f3a9c1e5b"  # recognisable, so a leak into any file or output is found
LONG_KEY = (
    "sk-proj-" + base64.urlsafe_b64encode(hashlib.sha512(b"issue 34").digest() * 2).decode()[:160]
)
MARK = re.compile(r"\[\[(.*?)\]\]")


# ================================================================ the fake judge
CUT = object()  # a reply that sends its headers and half its body, then closes the connection


def completion(content, usage=None):
    """A chat completion body whose reply content is `content` (any JSON value, for the hostile ones)."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": usage or {"prompt_tokens": 100, "completion_tokens": len(str(content)) // 4},
    }


def hostile_replies(good, other, key):
    """Issue 34's replies, by mode: each is what the server sends back (a body, raw bytes or CUT). `good`, `other`:
    two score objects that differ; `key`: the key the request carried, for the modes that echo it."""
    text = lambda obj: json.dumps(obj)
    fence = lambda obj: "```json\n" + json.dumps(obj, indent=1) + "\n```"
    return {
        "number": completion(5),
        "list": completion([1, 2]),
        "object": completion(good),
        "message-null": {"choices": [{"index": 0, "message": None}]},
        "no-message": {"choices": [{"index": 0, "finish_reason": "stop"}]},
        "choices-text": {"choices": "none today"},
        "html": b"<html><body><h1>502 Bad Gateway</h1></body></html>",
        "body-list": b"[1, 2]",
        "empty-body": b"",
        "refusal": {"choices": [{"message": {"content": None, "refusal": "I will not grade."}}]},
        "junk-usage": completion(text(good), {"prompt_tokens": "many", "completion_tokens": [1]}),
        "two": text(good) + " or, on reflection, " + text(other),
        "two-fenced": fence(good) + "\nOr rather:\n" + fence(other),
        "fence-and-bare": fence(good) + "\nIn short: " + text(other),
        "case-twice": text(dict(good, Depth={"reason": "r", "score": 1})),
        "key-twice": text(good)[:-1] + ', "depth": {"reason": "r", "score": 1}}',
        "nested": '{"helpfulness": ' + "[" * 5000 + "]" * 5000 + "}",
        "cut": CUT,
        "no-choices": {"choices": [], "usage": {"prompt_tokens": 9}},
        "huge": "x" * 150_000 + text(good),
        "surrogate": "\ud800 " + text(good),
        "echo-at": "y" * 40 + key + " " + text(good),
        "echo-escaped": f"I was sent {key[:5]}\\u{ord(key[5:6] or 'k'):04x}{key[6:]}. "
        + text(good),
        "echo-all-escaped": "".join(f"\\u{ord(c):04x}" for c in key) + " " + text(good),
    }


class FakeJudge:
    """What the server replies, decided by the mark in the request, and what it saw. Modes:
    good, fenced (```json fence), string ("4"), range (a 7), broken (cut-off JSON, then good), echo (repeats the
    Authorization header before good JSON), 429 (Retry-After: 1, then good), 500 (every time, until `healthy`),
    slow (sleeps `sleep` s, default 3, then good); hold (good once `release` is set); error (HTTP `status` whose message holds the key after `at`
    characters); 401 (the key refused); the hostile replies of hostile_replies; for the pair question: yes, no,
    bold (**Yes**), other."""

    def __init__(self):
        self.asked, self.times, self.bodies, self.auth = (
            collections.Counter(),
            collections.defaultdict(list),
            [],
            [],
        )
        self.lock, self.healthy, self.release = threading.Lock(), False, threading.Event()

    def respond(self, body, auth):
        """(HTTP status, extra headers, what to send): reply text (sent inside a completion), a JSON body, raw bytes,
        or CUT."""
        user = body["messages"][-1]["content"]
        spec = dict(kv.split("=", 1) for kv in MARK.search(user).group(1).split())
        with self.lock:
            self.asked[spec["id"]] += 1
            self.times[spec["id"]].append(time.monotonic())
            self.bodies.append(body)
            self.auth.append(auth)
            n = self.asked[spec["id"]]
        scores = [int(x) for x in spec.get("scores", "4,4,4,4,4").split(",")]
        good = {
            a: {"reason": f"the {a} is as scored", "score": x} for a, x in zip(ej.ASPECTS, scores)
        }
        key = auth.removeprefix("Bearer ")
        mode = spec.get("mode", "good")
        time.sleep(float(spec.get("sleep", 3 if mode == "slow" else 0)))
        if mode == "hold":  # until the test lets it go
            self.release.wait(60)
        error = lambda status, message: (
            status,
            {},
            {"error": {"message": message, "type": "fake", "code": None}},
        )
        if mode == "429" and n == 1:
            return 429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}
        if mode == "500" and not self.healthy:
            return 500, {"Retry-After-Ms": "10"}, {"error": {"message": "fake error 500"}}
        if mode == "error":
            return error(int(spec["status"]), "x" * int(spec["at"]) + key + " was not accepted")
        if mode == "401":
            return error(401, "invalid key")
        if mode == "header-echo":  # the key in a header the openai client logs at OPENAI_LOG=debug
            return 200, {"x-request-id": f"req-{key}"}, json.dumps(good)
        hostile = hostile_replies(good, dict(good, depth={"reason": "r", "score": 1}), key)
        if mode in hostile:
            return 200, {"Content-Type": "text/html"} if mode == "html" else {}, hostile[mode]
        replies = dict(
            fenced="Here is my grading.\n```json\n"
            + json.dumps(good, indent=2)
            + "\n```\nThat is all.",
            string=json.dumps(
                {a: {"reason": "ok", "score": str(v["score"])} for a, v in good.items()}
            ),
            range=json.dumps(dict(good, depth={"reason": "very deep", "score": 7})),
            broken='{"helpfulness": {"reason": "cut sh' if n == 1 else json.dumps(good),
            echo=f"I was sent {auth}. " + json.dumps(good),
            yes="Yes, they make the same point.",
            no="No.",
            bold="**Yes**",
            other="Perhaps; it depends.",
        )
        return 200, {}, replies.get(mode, json.dumps(good))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/chat/completions":
            status, headers, reply = 404, {}, {"error": {"message": "no such route"}}
        else:
            status, headers, reply = self.server.fake.respond(
                body, self.headers.get("Authorization")
            )
        if isinstance(reply, str):
            reply = completion(reply)
        data = reply if isinstance(reply, bytes) else json.dumps(completion("{}")).encode()
        data = json.dumps(reply).encode() if isinstance(reply, dict | list) else data
        try:
            self.send_response(status)
            for k, v in dict(
                {"Content-Type": "application/json"}, **headers, **{"Content-Length": len(data)}
            ).items():
                self.send_header(k, str(v))
            self.end_headers()
            if reply is CUT:  # half the body, then the connection closes
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass


@pytest.fixture
def fake():
    """A FakeJudge serving on 127.0.0.1, port chosen by the OS; fake.url is its /v1 base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.fake = FakeJudge()
    server.fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.fake
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    """The test key in JUDGE_TEST_KEY; no real key or base URL of this machine takes part."""
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def answers_file(tmp, marks, systems=(("m", "implicit"),), name="answers.jsonl"):
    """An answers JSONL as eval_nli.py writes it: for each system, situation s1, s2, ... answered with marks[k]."""
    rows = [
        dict(
            id=f"s{k + 1}",
            model=model,
            prompt=prompt,
            situation=f"Situation {k + 1}: may I skip the meeting?",
            answer=f"An answer by {model} ({prompt}). [[{mark}]]",
        )
        for (model, prompt), sys_marks in zip(systems, marks)
        for k, mark in enumerate(sys_marks)
    ]
    path = tmp / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def judge(fake, answers, out, *extra):
    """eval_judge.main against the fake with fast retries; returns the rows of judgments.jsonl."""
    ej.main(
        [
            "--answers",
            answers,
            "--out",
            str(out),
            "--base-url",
            fake.url,
            "--api-key-env",
            "JUDGE_TEST_KEY",
            "--timeout",
            "2",
            "--http-retries",
            "1",
            "--concurrency",
            "2",
            *extra,
        ]
    )
    return [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]


def judgment_row(**fields):
    """A row of judgments.jsonl as eval_judge.py writes it, with `fields` changed."""
    row = dict(
        system="m",
        id="s1",
        sample=0,
        status="ok",
        scores=dict.fromkeys(ej.ASPECTS, 4),
        reply="{}",
        error=None,
        attempts=1,
        http_retries=0,
        tokens=dict(prompt=10, completion=5),
        sent_sha256="0123456789abcdef",
        fingerprint="fp",
    )
    return dict(row, **fields)


def cli_error(argv):
    """The one line that run_cli ends a bad run with."""
    with pytest.raises(SystemExit) as e:
        harness.cli.run_cli(ej.main, argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def files(out):
    """Every file in `out`, name -> bytes (nothing when `out` does not exist)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())} if out.is_dir() else {}


# ================================================================ reading a reply
def test_parse_scores_takes_whole_numbers_1_to_5_from_json_anywhere_in_the_reply():
    good = {a: {"reason": "r", "score": 3} for a in ej.ASPECTS}
    three = dict.fromkeys(ej.ASPECTS, 3)
    assert ej.parse_scores(json.dumps(good)) == three
    assert ej.parse_scores("Sure!\n```json\n" + json.dumps(good) + "\n```") == three
    assert ej.parse_scores("Scores: " + json.dumps(good) + " -- done") == three
    assert ej.parse_scores(json.dumps({a.title(): {"score": " 3"} for a in ej.ASPECTS})) == three
    assert ej.parse_scores(json.dumps({a: 3.0 for a in ej.ASPECTS})) == three
    assert ej.parse_scores(json.dumps({a: {"Score": 3} for a in ej.ASPECTS})) == three
    assert ej.parse_scores(json.dumps(good).replace('"score": 3}}', '"score": 3.000e0}}')) == three
    refused = {
        "no JSON object": "I liked it.",
        "not JSON": '{"helpfulness": {"score": 4}',
        "no 'depth'": json.dumps({a: v for a, v in good.items() if a != "depth"}),
        "outside 1-5": json.dumps(dict(good, clarity={"score": 0})),
        "not a whole number": json.dumps(dict(good, clarity={"score": 4.5})),
        "4/5": json.dumps(dict(good, clarity={"score": "4/5"})),
        "True": json.dumps(dict(good, clarity={"score": True})),
        # issue 34's outside probe: a float parser would read both as 5, and keep the first 'score'
        "score 4.99999999999999999 is not a whole number": json.dumps(good).replace(
            '"clarity": {"reason": "r", "score": 3}',
            '"clarity": {"reason": "r", "score": 4.99999999999999999}',
        ),
        "score 5.0000000000000001 is not a whole number": json.dumps(good).replace(
            '"score": 3}}', '"score": 5.0000000000000001}}'
        ),
        "score 1E+400 is outside 1-5": json.dumps(good).replace('"score": 3}}', '"score": 1e400}}'),
        "'depth' has 'score' twice ('score' and 'Score')": json.dumps(
            dict(good, depth={"score": 4, "Score": 1})
        ),
        # a second object that cannot be read may be the one meant (the re-probe)
        "2 JSON objects, 1 of them unusable": json.dumps(good)
        + '\nActually: {"depth": {"score": 1}}',
        "2 JSON objects, 1 of them unusable ('depth' has 'score' twice": json.dumps(good)
        + "\n"
        + json.dumps(dict(good, depth={"score": 2, "Score": 1})),
    }
    for says, reply in refused.items():
        with pytest.raises(ValueError, match=re.escape(says)):
            ej.parse_scores(reply)


# ================================================================ the report, by hand
def test_table_of_six_answers_is_right_by_hand(fake, tmp_path):
    # helpfulness: A 5, 4, 3 -> mean 4, std 1, se 1/sqrt(3) = 0.577; B 2, 2, 5 -> mean 3, std sqrt(3), se 1
    # overall (mean of five): A 3, 4, 4 -> 3.667, std sqrt(1/3), se 1/3 = 0.333
    #                         B 2, 3, 5 -> 3.333, std sqrt(7/3), se sqrt(7)/3 = 0.882
    # B - A: helpfulness -3, -2, +2 -> -1, sign-flip p 6/8 = 0.75; overall -1, -1, +1 -> -1/3, p 8/8 = 1
    marks = [
        [
            "id=a1 mode=good scores=5,4,3,2,1",
            "id=a2 mode=fenced scores=4,4,4,4,4",
            "id=a3 mode=string scores=3,5,5,5,2",
        ],
        [
            "id=b1 mode=good scores=2,2,2,2,2",
            "id=b2 mode=fenced scores=2,3,3,3,4",
            "id=b3 mode=string scores=5,5,5,5,5",
        ],
    ]
    out = tmp_path / "judge"
    rows = judge(fake, answers_file(tmp_path, marks, [("m", "implicit"), ("m", "explicit")]), out)
    assert sorted(r["id"] for r in rows) == ["s1", "s1", "s2", "s2", "s3", "s3"]
    assert all(
        r["status"] == "ok" and r["attempts"] == 1 and r["tokens"]["prompt"] > 0 for r in rows
    )
    assert {r["system"] for r in rows} == {"m / implicit", "m / explicit"}
    a3 = next(r for r in rows if r["system"] == "m / implicit" and r["id"] == "s3")
    assert a3["scores"] == dict(zip(ej.ASPECTS, [3, 5, 5, 5, 2])) and '"score": "3"' in a3["reply"]

    body = fake.bodies[0]  # what the judge was asked: the paper's 450 tokens, greedy, our question
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("gpt-4.1", 450, 0.0)
    assert body["messages"][0] == {"role": "system", "content": ej.SYSTEM_PROMPT}
    assert (
        "Situation" in body["messages"][1]["content"]
        and "An answer by m" in body["messages"][1]["content"]
    )

    table = csv.DictReader((out / "judge_results.csv").read_text().splitlines())
    csv_rows = {(r["table"], r["system"], r["metric"]): r for r in table}
    expect = {
        ("m / implicit", "helpfulness"): (4, 1 / 3**0.5),
        ("m / explicit", "helpfulness"): (3, 1),
        ("m / implicit", "overall"): (11 / 3, 1 / 3),
        ("m / explicit", "overall"): (10 / 3, 7**0.5 / 3),
    }
    for (system, metric), (mean, se) in expect.items():
        r = csv_rows[("scores", system, metric)]
        assert (float(r["mean"]), float(r["se"])) == pytest.approx((mean, se), abs=1e-6)
        assert (r["judged"], r["failed"], r["situations"]) == ("3", "0", "3")
    d = csv_rows[("paired", "m / explicit", "helpfulness")]
    assert (float(d["mean"]), float(d["p"]), d["vs"]) == (
        pytest.approx(-1),
        pytest.approx(0.75),
        "m / implicit",
    )
    assert float(d["lo"]) <= -1 <= float(d["hi"])
    d = csv_rows[("paired", "m / explicit", "overall")]
    assert (float(d["mean"]), float(d["p"])) == (pytest.approx(-1 / 3), pytest.approx(1.0))
    md = (out / "judge_results.md").read_text()
    assert (
        "| m / implicit | 3 | 0 | 4.00 ± 0.58 |" in md
        and "| m / explicit | 3 | 0 | 3.00 ± 1.00 |" in md
    )
    assert "3.67 ± 0.33 |" in md and "3.33 ± 0.88 |" in md and "-1.00 [" in md and "p=0.750" in md
    assert os.path.getsize(out / "judge.png") > 0


# ================================================================ retries and failures
def test_unusable_replies_are_asked_again_and_failures_are_counted_never_scored(fake, tmp_path):
    marks = [
        [
            "id=broken mode=broken",
            "id=range mode=range",
            "id=rate mode=429",
            "id=down mode=500",
            "id=slow mode=slow sleep=3",
        ]
    ]
    out = tmp_path / "judge"
    rows = {r["id"]: r for r in judge(fake, answers_file(tmp_path, marks), out, "--timeout", "0.5")}
    by_mark = dict(
        zip(["broken", "range", "rate", "down", "slow"], [rows[f"s{k}"] for k in range(1, 6)])
    )
    # broken JSON, then a good reply: asked twice, judged
    assert (by_mark["broken"]["status"], by_mark["broken"]["attempts"], fake.asked["broken"]) == (
        "ok",
        2,
        2,
    )
    # a 7, every time: asked 1 + --max-retries (2) times, then failed with its reply and the reason; no score
    r = by_mark["range"]
    assert (r["status"], r["attempts"], r["scores"], fake.asked["range"]) == ("failed", 3, None, 3)
    assert '"score": 7' in r["reply"] and "outside 1-5" in r["error"]
    # 429: the client waits the server's Retry-After (1 s, where its own backoff is <= 0.5 s), then succeeds
    r = by_mark["rate"]
    assert (r["status"], r["attempts"], r["http_retries"], fake.asked["rate"]) == ("ok", 1, 1, 2)
    assert fake.times["rate"][1] - fake.times["rate"][0] >= 0.95
    # 500 every time, and a reply slower than --timeout: the client's own retry (--http-retries 1), then failed
    assert (by_mark["down"]["status"], fake.asked["down"]) == ("failed", 2)
    assert by_mark["down"]["error"].startswith("HTTP 500")
    assert (by_mark["slow"]["status"], fake.asked["slow"]) == ("failed", 2)
    assert by_mark["slow"]["error"].startswith("timeout")
    md = (out / "judge_results.md").read_text()
    assert "| m / implicit | 2 | 3 |" in md and "3 answer(s) failed" in md
    table = csv.DictReader((out / "judge_results.csv").read_text().splitlines())
    row = next(r for r in table if r["metric"] == "overall")
    assert (row["judged"], row["failed"]) == ("2", "3")


# ================================================================ nothing paid for twice
def test_rerun_asks_only_for_missing_or_failed_answers_and_a_success_replaces_the_failure(
    fake, tmp_path
):
    marks = [["id=fine mode=good", "id=down mode=500"]]
    path, out = answers_file(tmp_path, marks), tmp_path / "judge"
    first = judge(fake, path, out)
    assert {r["id"]: r["status"] for r in first} == {"s1": "ok", "s2": "failed"}
    fake.healthy = True
    rows = judge(fake, path, out)
    assert [(r["id"], r["status"]) for r in rows[2:]] == [
        ("s2", "ok")
    ]  # appended; the fine one is not asked
    assert (fake.asked["fine"], fake.asked["down"]) == (1, 3)
    assert (
        "| m / implicit | 2 | 0 |" in (out / "judge_results.md").read_text()
    )  # the last row for a key wins
    judge(fake, path, out)
    assert (fake.asked["fine"], fake.asked["down"]) == (1, 3)  # all judged: nothing asked


def test_a_run_killed_mid_way_then_rerun_asks_every_answer_once(fake, tmp_path):
    n = 6
    path, out = (
        answers_file(tmp_path, [[f"id=k{k} mode=good sleep=0.4" for k in range(n)]]),
        tmp_path / "judge",
    )
    argv = [
        "--answers",
        path,
        "--out",
        str(out),
        "--base-url",
        fake.url,
        "--api-key-env",
        "JUDGE_TEST_KEY",
        "--concurrency",
        "1",
        "--timeout",
        "5",
    ]
    proc = subprocess.Popen(
        [sys.executable, "eval_judge.py", *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    log, deadline = out / "judgments.jsonl", time.time() + 40
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert 2 <= len(before) < n, "the kill should land mid-run"
    rows = judge(fake, path, out, "--concurrency", "1")
    keys = [(r["system"], r["id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == n and all(r["status"] == "ok" for r in rows)
    assert all(
        fake.asked[f"k{int(r['id'][1:]) - 1}"] == 1 for r in before
    )  # a saved row is never asked again
    assert sum(fake.asked.values()) <= n + 1  # + the one request in flight
    assert sum(fake.asked.values()) >= n and set(fake.asked) == {f"k{k}" for k in range(n)}


def ctrl_c_as_in_a_terminal():
    """A test run in the background (`pytest ... &`, nohup) passes SIGINT as ignored to its children, and Python then
    never turns it into KeyboardInterrupt: give the child the default a terminal gives."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_sends_nothing_more_but_saves_the_replies_in_flight(fake, tmp_path):
    n = 10
    path, out = (
        answers_file(tmp_path, [[f"id=c{k} mode=good sleep=0.5" for k in range(n)]]),
        tmp_path / "judge",
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "eval_judge.py",
            "--answers",
            path,
            "--out",
            str(out),
            "--base-url",
            fake.url,
            "--concurrency",
            "3",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_as_in_a_terminal,
    )
    log, deadline = out / "judgments.jsonl", time.time() + 40
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    before = log.read_text().count("\n")
    err = proc.communicate(timeout=30)[1]
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert proc.returncode == 130 and "Ctrl-C: saving the" in err and "Traceback" not in err
    assert (
        before < len(rows) == sum(fake.asked.values()) < n
    )  # the replies in flight were saved; none sent after


def test_a_torn_last_line_is_ignored_and_cut_before_appending_any_other_bad_line_is_named(tmp_path):
    row = lambda i: json.dumps(judgment_row(id=f"s{i}")) + "\n"
    path = tmp_path / "judgments.jsonl"
    path.write_text(row(1) + row(2)[:25])
    assert list(ej.read_judgments(str(path), "fp")) == [("m", "s1", 0)]
    with ej.JudgmentLog(str(path), fsync_every=8) as log:
        log.add(json.loads(row(3)))
    assert path.read_text() == row(1) + row(3)
    path.write_text(row(1) + row(2).rstrip("\n"))  # whole, but for its newline: kept and ended
    with ej.JudgmentLog(str(path), fsync_every=1) as log:
        log.add(json.loads(row(3)))
    assert path.read_text() == row(1) + row(2) + row(3)
    path.write_text(row(1) + "{torn\n" + row(3))
    with pytest.raises(harness.data.DataError, match=r"judgments.jsonl, line 2: not JSON"):
        ej.read_judgments(str(path), "fp")
    path.write_text(row(1).replace('"fp"', '"other"'))
    with pytest.raises(harness.data.DataError, match=r"line 1: judged under settings other"):
        ej.read_judgments(str(path), "fp")


@pytest.mark.parametrize("change", ["model", "question", "max-tokens"])
def test_a_changed_judge_or_question_is_refused_naming_it_and_nothing_is_written(
    fake, tmp_path, monkeypatch, change
):
    path, out = answers_file(tmp_path, [["id=a mode=good", "id=b mode=good"]]), tmp_path / "judge"
    judge(fake, path, out, "--model", "judge-a", "--limit", "1")
    before, asked = files(out), dict(fake.asked)
    argv = [
        "--answers",
        path,
        "--out",
        str(out),
        "--base-url",
        fake.url,
        "--api-key-env",
        "JUDGE_TEST_KEY",
        "--model",
        "judge-a",
    ]
    if change == "model":
        argv[-1] = "judge-b"
    elif change == "max-tokens":
        argv += ["--max-tokens", "300"]
    else:
        monkeypatch.setattr(ej, "USER_TEMPLATE", ej.USER_TEMPLATE + "\nBe brief.")
    msg = cli_error(argv)
    says = {
        "model": "--model 'judge-b': the judgments in",
        "max-tokens": "--max-tokens 300: the judgments in",
        "question": "the judge question",
    }[change]
    assert says in msg and str(out) in msg and "another --out" in msg
    assert files(out) == before and dict(fake.asked) == asked


# ================================================================ keys and servers
def test_the_key_is_sent_but_never_written_or_printed(fake, tmp_path, capsys):
    marks = [["id=e1 mode=echo", "id=e2 mode=500", "id=e3 mode=good"]]
    out = tmp_path / "judge"
    rows = judge(fake, answers_file(tmp_path, marks), out)
    assert f"Bearer {KEY}" in fake.auth  # the server got it
    assert "[API KEY]" in next(
        r["reply"] for r in rows if r["id"] == "s1"
    )  # echoed back, and redacted
    printed = capsys.readouterr()
    assert KEY not in printed.out + printed.err
    for name, data in files(out).items():
        assert KEY.encode() not in data, name


def test_a_missing_key_for_a_remote_server_is_one_line_before_any_request(tmp_path, monkeypatch):
    def no_client(*args, **kwargs):
        raise AssertionError("a client was made")

    monkeypatch.setattr(openai, "OpenAI", no_client)
    path, out = answers_file(tmp_path, [["id=a mode=good"]]), tmp_path / "judge"
    msg = cli_error(["--answers", path, "--out", str(out)])  # api.openai.com
    assert "OPENAI_API_KEY is not set" in msg and "https://api.openai.com/v1" in msg
    msg = cli_error(
        [
            "--answers",
            path,
            "--out",
            str(out),
            "--base-url",
            "https://judge.example.invalid/v1",
            "--api-key-env",
            "MY_JUDGE_KEY",
        ]
    )
    assert "--api-key-env MY_JUDGE_KEY" in msg and "MY_JUDGE_KEY is not set" in msg
    assert not out.exists()


def test_an_unreachable_server_is_one_line(tmp_path):
    with socket.socket() as s:  # a loopback port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path, out = answers_file(tmp_path, [["id=a mode=good", "id=b mode=good"]]), tmp_path / "judge"
    msg = cli_error(
        [
            "--answers",
            path,
            "--out",
            str(out),
            "--base-url",
            f"http://127.0.0.1:{port}/v1",
            "--http-retries",
            "0",
            "--concurrency",
            "1",
        ]
    )
    assert (
        f"--base-url http://127.0.0.1:{port}/v1: cannot connect" in msg
        and "a rerun asks only for the rest" in msg
    )
    assert (out / "judgments.jsonl").read_text() == ""


def test_a_bad_answers_row_is_one_line_naming_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    good = dict(id="s1", model="m", prompt="implicit", answer="a", situation="s")
    path.write_text(
        json.dumps(good)
        + "\n"
        + json.dumps({k: v for k, v in good.items() if k != "situation"})
        + "\n"
    )
    assert f"{path}, line 2: missing field(s) situation" in cli_error(
        ["--answers", str(path), "--dry-run"]
    )
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    assert f"{path}, line 2: a second answer of 'm / implicit'" in cli_error(
        ["--answers", str(path), "--dry-run"]
    )


def test_dry_run_counts_requests_and_tokens_and_sends_and_writes_nothing(fake, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=words,
        unk_token="[UNK]",
        chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}",
    )
    tok.save_pretrained(tmp_path / "tok")
    marks = [["id=a", "id=b", "id=c"], ["id=d", "id=e", "id=f"]]
    path, out = (
        answers_file(tmp_path, marks, [("m", "implicit"), ("m", "explicit")]),
        tmp_path / "judge",
    )
    ej.main(
        ["--answers", path, "--out", str(out), "--dry-run", "--limit", "2"]
    )  # the first 2 of each system
    chars = sum(
        len(m["content"])
        for a in ej.answers_to_judge(path, 2)
        for m in ej.judge_messages(a.situation, a.text)
    )
    said = capsys.readouterr().out
    assert (
        "dry run: 4 requests (0 of 4 answers already judged" in said
        and f"about {chars // 4} prompt" in said
    )
    assert "at most 1800 completion tokens" in said and not out.exists()
    judge(fake, path, out, "--limit", "1")  # a1 and d1 judged
    capsys.readouterr()
    ej.main(
        ["--answers", path, "--out", str(out), "--dry-run", "--tokenizer", str(tmp_path / "tok")]
    )
    said = capsys.readouterr().out
    assert (
        "dry run: 4 requests (2 of 6 answers already judged" in said and "(the tokenizer of" in said
    )
    assert sum(fake.asked.values()) == 2


def test_ask_yes_no_takes_the_first_word_through_the_same_client(fake, capsys):
    pairs = [
        ("[[id=y mode=yes]] Lies hurt.", "Lying harms people."),
        ("[[id=n mode=no]] a", "b"),
        ("[[id=o mode=other]] a", "b"),
        ("[[id=b mode=bold]] a", "b"),
        ("[[id=d mode=500]] a", "b"),
        ("[[id=y mode=yes]] Lies hurt.", "Lying harms people."),
    ]
    said = ej.ask_yes_no(
        pairs,
        "judge-small",
        JUDGE_QUESTION,
        base_url=fake.url,
        api_key_env="NO_SUCH_VARIABLE",
        http_retries=0,
    )
    assert said == [True, False, False, True, False, True]
    assert fake.asked["y"] == 1  # a repeated pair is asked once
    assert set(fake.auth) == {"Bearer none"}  # loopback and no key set: the dummy key
    user = next(b for b in fake.bodies if "Lies hurt" in b["messages"][-1]["content"])["messages"][
        -1
    ]["content"]
    assert user == JUDGE_QUESTION.format(a=pairs[0][0], b=pairs[0][1])
    err = capsys.readouterr().err
    assert "1 of 6 replies start with neither Yes nor No" in err and "'Perhaps" in err
    assert "1 of 6 requests failed" in err


# ================================================================ issue 34: a secret never leaves, not even in part
def readings(text):
    """`text` as written, and as a reader would decode its escapes: JSON and Python \\u and \\x (once, and twice for
    an escape that was escaped itself), %XX and &#NN;."""

    def unescape(t):
        with warnings.catch_warnings():  # "\y": not an escape, kept as it is
            warnings.simplefilter("ignore", DeprecationWarning)
            return t.encode("ascii", "backslashreplace").decode("unicode_escape", "replace")

    return [text, unescape(text), unescape(unescape(text)), urllib.parse.unquote(text)] + [
        html.unescape(text)
    ]


def leaked(text, key, n=12):
    """The first piece of `n` characters of the key found in any reading of `text`, or None."""
    pieces = [key[i : i + n] for i in range(len(key) - n + 1)]
    return next((p for t in readings(text) for p in pieces if p in t), None)


def by_number(row):
    """Rows of answers_file's situations s1, s2, ... in file order (they are saved in the order they come)."""
    return int(row["id"][1:])


def test_redaction_leaves_no_12_character_piece_of_the_key_wherever_a_cut_falls_or_an_escape_hides():
    assert len(LONG_KEY) == 168 and leaked("...the key: " + LONG_KEY[50:62], LONG_KEY)
    for limit in (160, 300):  # the cuts of a 404's line and of a failed row's reason
        for at in range(
            limit + 1
        ):  # the key starts at every offset before the cut, and just after it
            said = ej.one_line(
                "Error code: 400 - " + "x" * at + LONG_KEY + " was refused", LONG_KEY, limit
            )
            assert len(said) <= limit and not leaked(said, LONG_KEY), (limit, at, said)
    styles = {
        "json": lambda c: f"\\u{ord(c):04x}",
        "json twice": lambda c: f"\\\\u{ord(c):04x}",
        "python": lambda c: f"\\x{ord(c):02x}",
        "url": lambda c: f"%{ord(c):02X}",
        "html": lambda c: f"&#{ord(c)};",
        "html hex": lambda c: f"&#x{ord(c):x};",
        "python long": lambda c: f"\\U{ord(c):08x}",
        "percent u": lambda c: f"%u{ord(c):04x}",
    }
    for name, escape in styles.items():
        for i in range(len(LONG_KEY)):  # one character escaped, at every place
            text = f"sent {LONG_KEY[:i]}{escape(LONG_KEY[i])}{LONG_KEY[i + 1 :]} back"
            assert not leaked(ej.redact(text, LONG_KEY), LONG_KEY), (name, i)
        assert not leaked(ej.redact("".join(map(escape, LONG_KEY)), LONG_KEY), LONG_KEY), name
    for sep in (
        " ",
        "\n",
        "\u200b",
        "\u2060",
        "\ufeff",
        "\u00ad",
    ):  # a reader skips these (the re-probe)
        for every in (1, 4, 7):
            split = sep.join(LONG_KEY[i : i + every] for i in range(0, len(LONG_KEY), every))
            said = ej.redact(f"bad key {split} here", LONG_KEY)
            assert not leaked(said.replace(sep, ""), LONG_KEY), (sep, every, said)
            assert said.startswith("bad key [API KEY]") and said.endswith(" here"), said
    assert ej.redact(LONG_KEY[:7], LONG_KEY) == LONG_KEY[:7]  # 7 characters tell nothing: kept
    assert ej.redact("a " + LONG_KEY[9:17] + " b", LONG_KEY) == "a [API KEY] b"


def test_the_key_echoed_in_a_400_404_422_500_or_a_200_reply_leaves_no_piece_in_any_output(
    fake, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("JUDGE_TEST_KEY", LONG_KEY)
    errors = {
        400: (150, 240, 268),
        422: (200,),
        500: (260,),
    }  # the key across the 300-character cut
    marks = [
        f"id=e{c}-{at} mode=error status={c} at={at}" for c, ats in errors.items() for at in ats
    ]
    marks += ["id=r1 mode=echo-at", "id=r2 mode=echo-escaped", "id=r3 mode=echo-all-escaped"]
    rows = judge(fake, answers_file(tmp_path, [marks]), tmp_path / "judge", "--http-retries", "0")
    status = [r["status"] + " " + (r["error"] or "")[:8] for r in sorted(rows, key=by_number)]
    assert status == ["failed HTTP 400"] * 3 + ["failed HTTP 422", "failed HTTP 500"] + ["ok "] * 3
    lines = []
    for at in (20, 100, 140):  # a 404 stops the run with one line, cut at 160 characters
        path = answers_file(
            tmp_path, [[f"id=n{at} mode=error status=404 at={at}"]], name=f"{at}.jsonl"
        )
        argv = ["--answers", path, "--out", str(tmp_path / f"j{at}"), "--base-url", fake.url]
        lines.append(cli_error(argv + ["--api-key-env", "JUDGE_TEST_KEY", "--http-retries", "0"]))
        assert "answered 404" in lines[-1]
    ej.ask_yes_no(  # a reply that is no Yes/No is printed, cut at 80 characters
        [("[[id=y mode=echo-at]] a", "b")], "m", JUDGE_QUESTION, fake.url, "JUDGE_TEST_KEY"
    )
    assert set(fake.auth) == {f"Bearer {LONG_KEY}"}  # sent every time
    printed = capsys.readouterr()
    assert "start with neither Yes nor No" in printed.err
    written = [
        p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()
    ]
    for text in [printed.out, printed.err, *lines, *written]:
        assert not leaked(text, LONG_KEY)


def test_the_key_in_a_header_the_client_logs_at_debug_level_is_redacted(
    fake, tmp_path, monkeypatch, caplog, capsys
):
    """OPENAI_LOG=debug makes the openai client log every reply's x-request-id: a server that puts the key there
    must not get it printed (issue 34's outside probe)."""
    monkeypatch.setenv("JUDGE_TEST_KEY", LONG_KEY)
    caplog.set_level(logging.DEBUG)  # what OPENAI_LOG=debug turns on
    rows = judge(fake, answers_file(tmp_path, [["id=h mode=header-echo"]]), tmp_path / "judge")
    assert rows[0]["status"] == "ok" and "request_id: req-[API KEY]" in caplog.text
    printed = capsys.readouterr()
    for text in [caplog.text, printed.out, printed.err]:
        assert not leaked(text, LONG_KEY)


@pytest.mark.parametrize("where", ["--base-url", "OPENAI_BASE_URL"])
def test_a_refused_base_url_that_holds_the_key_is_printed_without_it(tmp_path, monkeypatch, where):
    monkeypatch.setenv("JUDGE_TEST_KEY", LONG_KEY)
    path = answers_file(tmp_path, [["id=a"]])
    argv = ["--answers", path, "--out", str(tmp_path / "j"), "--api-key-env", "JUDGE_TEST_KEY"]
    for url in (
        f"htp://127.0.0.1:9/{LONG_KEY}/v1",
        f"http:///{LONG_KEY}/v1",
        f"http://127.0.0.1:abc/{LONG_KEY}/v1",  # an httpx traceback before (the re-probe)
        f"http://[{LONG_KEY}/v1",  # "Invalid IPv6 URL", no flag named
        f"http://127.0.0.1:99999/{LONG_KEY}/v1",
    ):
        if where == "OPENAI_BASE_URL":
            monkeypatch.setenv("OPENAI_BASE_URL", url)
        msg = cli_error(argv + (["--base-url", url] if where == "--base-url" else []))
        assert "expected http(s)://HOST[:PORT]/v1" in msg and "[API KEY]" in msg
        assert not leaked(msg, LONG_KEY)
        msg = cli_error(
            argv + ["--dry-run"] + (["--base-url", url] if where == "--base-url" else [])
        )
        assert not leaked(msg, LONG_KEY)


def test_a_concurrency_past_its_limit_is_one_line_naming_the_flag_before_any_output(
    tmp_path, capsys
):
    out = tmp_path / "j"
    argv = ["--answers", answers_file(tmp_path, [["id=a"]]), "--out", str(out)]
    with pytest.raises(SystemExit):
        ej.main(argv + ["--concurrency", str(10**20)])
    assert (
        f"--concurrency {10**20}: must be in [1, {ej.MAX_CONCURRENCY}]" in capsys.readouterr().err
    )
    assert not out.exists()
    msg = cli_error(argv + ["--baseline", "m / implicit "])
    assert "--baseline 'm / implicit ': no such system" in msg


# ================================================================ issue 34: any reply is a row, never a traceback
HOSTILE = {  # mode of the fake (hostile_replies) -> the reason its failed row gives
    "number": "the reply's content is the number 5, not text",
    "list": "the reply's content is a list, not text",
    "object": "the reply's content is an object, not text",
    "message-null": "the first choice's 'message' is null, not an object",
    "no-message": "the first choice has no 'message'",
    "choices-text": "'choices' is 'none today', not a list of replies",
    "html": "the server's body is an HTML page, not a chat completion",
    "body-list": "the server's body is a list, not a chat completion object",
    "empty-body": "the server's body is not JSON, not a chat completion",
    "refusal": "the judge refused: I will not grade.",
    "two": "2 JSON objects with different scores",
    "two-fenced": "2 JSON objects with different scores",
    "fence-and-bare": "2 JSON objects with different scores",
    "case-twice": "'depth' appears twice ('depth' and 'Depth')",
    "key-twice": "key 'depth' appears twice in one object",
    "nested": "JSON nested too deeply to read",
    "cut": "connection lost before the whole reply came",
    "no-choices": "'choices' is an empty list: the server sent no reply",
    "huge": "a reply of 150",
}


def test_any_reply_is_a_failed_row_with_its_reason_and_the_run_goes_on(fake, tmp_path):
    marks = [f"id={m} mode={m}" for m in HOSTILE]
    marks += ["id=fine mode=good", "id=junk mode=junk-usage", "id=surrogate mode=surrogate"]
    out = tmp_path / "judge"
    rows = judge(
        fake, answers_file(tmp_path, [marks]), out, "--max-retries", "0", "--http-retries", "0"
    )
    by_mode = {m.split()[0][3:]: r for m, r in zip(marks, sorted(rows, key=by_number))}
    for mode, reason in HOSTILE.items():
        r = by_mode[mode]
        assert r["status"] == "failed" and reason in r["error"], (mode, r["error"])
        assert fake.asked[mode] == 1
    assert "<h1>502 Bad Gateway</h1>" in by_mode["html"]["reply"]  # a paid reply is kept, whatever
    assert '"content": 5' in by_mode["number"]["reply"] and "reflection" in by_mode["two"]["reply"]
    assert by_mode["fine"]["status"] == by_mode["junk"]["status"] == "ok"
    assert by_mode["surrogate"]["status"] == "ok" and by_mode["surrogate"]["reply"][0] == "\ufffd"
    assert by_mode["junk"]["tokens"] == dict(prompt=0, completion=0)  # "many" tokens is no count
    assert f"| m / implicit | 3 | {len(HOSTILE)} |" in (out / "judge_results.md").read_text()
    docs = " ".join(open(os.path.join(REPO, "docs", "judge.md")).read().split())
    assert f"{len(HOSTILE)} replies that are no usable completion" in docs


def test_a_run_stopped_by_its_server_still_saves_the_replies_in_flight(fake, tmp_path):
    marks = [["id=s1 mode=good sleep=1", "id=s2 mode=good sleep=1", "id=k mode=401"]]
    path, out = answers_file(tmp_path, marks), tmp_path / "judge"
    argv = ["--answers", path, "--out", str(out), "--base-url", fake.url, "--concurrency", "3"]
    msg = cli_error(argv + ["--api-key-env", "JUDGE_TEST_KEY"])
    assert "refused the key from $JUDGE_TEST_KEY (HTTP 401)" in msg and "2 judgments saved" in msg
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert sorted((r["id"], r["status"]) for r in rows) == [("s1", "ok"), ("s2", "ok")]


def test_a_stored_row_that_eval_judge_did_not_write_is_named_by_its_line(fake, tmp_path):
    path = tmp_path / "judgments.jsonl"
    four = dict.fromkeys(ej.ASPECTS, 4)
    cases = {
        "helpfulness score 9 is not a whole number 1-5": dict(scores=dict(four, helpfulness=9)),
        "depth score None is not a whole number 1-5": dict(scores=dict(four, depth=None)),
        "depth score 4.5 is not": dict(scores=dict(four, depth=4.5)),
        "an ok row without a score for 'clarity'": dict(
            scores={a: 4 for a in ej.ASPECTS if a != "clarity"}
        ),
        "an ok row whose 'scores' is null": dict(scores=None),
        "status 'maybe' is neither": dict(status="maybe"),
        "'sample' is '0'": dict(sample="0"),
        "'id' is the number 2": dict(id=2),
        "'attempts' is null": dict(attempts=None),
        "'tokens' is not": dict(tokens=[1, 2]),
        # the re-probe: rows the report would have read
        "an ok row with a score for 'Depth', which is no aspect": dict(scores=dict(four, Depth=1)),
        "'id' '' is no id eval_judge.py writes": dict(id=""),
        "a failed row that holds scores": dict(status="failed", scores=dict(four, depth=9)),
    }
    for says, change in cases.items():
        rows = [judgment_row(), judgment_row(**dict(dict(id="s2"), **change))]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(harness.data.DataError) as e:
            ej.read_judgments(str(path), "fp")
        assert f"judgments.jsonl, line 2: not a judgment row of eval_judge.py ({says}" in str(
            e.value
        )
    # from the command line: a 9 written into a real run's judgments is refused, nothing asked
    answers, out = answers_file(tmp_path, [["id=a mode=good"]]), tmp_path / "judge"
    row = judge(fake, answers, out)[0]
    (out / "judgments.jsonl").write_text(json.dumps(dict(row, scores=dict(four, depth=9))) + "\n")
    msg = cli_error(["--answers", answers, "--out", str(out), "--base-url", fake.url])
    assert "judgments.jsonl, line 1: not a judgment row of eval_judge.py (depth score 9" in msg
    assert fake.asked["a"] == 1


# ================================================================ issue 34: a judgment belongs to the text it judged
def test_a_rerun_whose_answer_text_changed_is_refused_by_name_or_rejudged_with_the_flag(
    fake, tmp_path
):
    out = tmp_path / "judge"
    path = answers_file(tmp_path, [["id=a mode=good scores=5,5,5,5,5", "id=b mode=good"]])
    judge(fake, path, out)
    before = files(out)
    answers_file(
        tmp_path, [["id=a mode=good scores=5,5,5,5,5", "id=b2 mode=good scores=1,1,1,1,1"]]
    )
    argv = ["--answers", path, "--out", str(out), "--base-url", fake.url]
    msg = cli_error(argv + ["--api-key-env", "JUDGE_TEST_KEY"])
    assert "1 answer(s) differ from the text their judgment in" in msg
    assert "the answer of 'm / implicit' to 's2' (sample 0); pass --rejudge-changed" in msg
    assert files(out) == before and dict(fake.asked) == {"a": 1, "b": 1}
    judge(fake, path, out, "--rejudge-changed")
    assert dict(fake.asked) == {"a": 1, "b": 1, "b2": 1}  # only the changed answer asked again
    assert "| m / implicit | 2 | 0 | 3.00 ± 2.00 |" in (out / "judge_results.md").read_text()
    judge(fake, path, out)  # now every judgment is of the text in the file: nothing asked
    assert sum(fake.asked.values()) == 3


# ================================================================ issue 34: the judge's flags
def test_a_rerun_that_differs_only_by_a_trailing_space_names_the_flag_and_minus_zero_is_zero(
    fake, tmp_path
):
    path, out = answers_file(tmp_path, [["id=a mode=good"]]), tmp_path / "judge"
    judge(fake, path, out, "--model", "judge-a", "--temperature", "-0.0")
    judge(fake, path, out, "--model", "judge-a", "--temperature", "0")  # the same temperature
    assert fake.asked["a"] == 1
    argv = ["--answers", path, "--out", str(out), "--base-url", fake.url, "--model", "judge-a "]
    msg = cli_error(argv)
    assert "--model 'judge-a ': the judgments in" in msg and "made with --model 'judge-a'" in msg


# ================================================================ issue 34: one process per --out
def test_a_second_run_into_the_same_out_is_refused_naming_the_first_and_nothing_is_paid_twice(
    fake, tmp_path
):
    n = 3
    marks = [["id=p0 mode=hold"] + [f"id=p{k} mode=good" for k in range(1, n)]]
    path, out = answers_file(tmp_path, marks), tmp_path / "judge"
    argv = [sys.executable, "eval_judge.py", "--answers", path, "--out", str(out)]
    argv += ["--base-url", fake.url, "--api-key-env", "JUDGE_TEST_KEY", "--concurrency", "1"]
    first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while (
        not fake.asked["p0"] and time.time() < deadline
    ):  # the first run is asking: it holds --out
        time.sleep(0.05)
    try:
        second = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30)
    finally:
        fake.release.set()
    assert first.wait(timeout=60) == 0 and second.returncode == 1
    assert second.stderr.strip() == (
        f"error: --out {out}: another process (PID {first.pid}) is writing there; wait for it to "
        f"end or stop it, or use another --out"
    )
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"s{k + 1}" for k in range(n)]
    assert dict(fake.asked) == {f"p{k}": 1 for k in range(n)} and not (out / ".lock").exists()
