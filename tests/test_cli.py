"""The command line as a specification: every bad input is one clear line and a non-zero exit, resuming works from the
command line and survives SIGKILL at any moment, and nothing a run rewrites can be lost half-way."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import eval_judge
import eval_nli
import harness.cli
import harness.data
import harness.runs
import opgrpo_min as om
import sim_train
from extras import resume
from study import run as study
from tools import convert_data, score_answers

REPO = os.path.dirname(om.HERE) if os.path.basename(om.HERE) == "tests" else om.HERE
TRAIN, TEST = (os.path.join(REPO, "data", f"{k}.jsonl") for k in ("train", "test"))
SCRIPTS = {
    "opgrpo_min": om.main,
    "sim_train": sim_train.main,
    "eval_nli": eval_nli.main,
    "tools/score_answers": score_answers.main,
    "study": study.main,
    "tools/convert_data": convert_data.main,
    "eval_judge": eval_judge.main,
}
GOOD = {
    "id": "1",
    "situation": "Lying to a friend",
    "perspectives": [{"name": "Honesty", "explanation": "Lies hurt."}],
}


# ================================================================ bad inputs, one table
def read_only_dir(tmp):
    """An existing directory nobody may write to. root writes through chmod, so for root it is sysfs' /sys/fs."""
    d = tmp / "read-only"
    d.mkdir()
    d.chmod(0o555)
    try:
        (d / "probe").touch()
    except PermissionError:
        return str(d)
    (d / "probe").unlink()
    return "/sys/fs"


def data_file(tmp, kind):
    """A data file with one defect: (path, what the error line must say besides the path)."""
    long = dict(GOOD, id="2", situation="word " * 600)
    cases = {
        "missing": ("gone.jsonl", None, "no such"),
        "empty": ("empty.jsonl", b"", "no "),
        "invalid JSON": ("bad.jsonl", b'{"id": "1", "situation": ', "line 1: not JSON"),
        "missing field": (
            "nofield.jsonl",
            json.dumps({k: v for k, v in GOOD.items() if k != "situation"}).encode(),
            "line 1: missing field 'situation'",
        ),
        "not UTF-8": (
            "latin1.jsonl",
            json.dumps(GOOD).encode()
            + b"\n"
            + json.dumps(GOOD).replace("Lies", "Caf\xe9").encode("latin-1"),
            "line 2: not UTF-8",
        ),
        "malformed CSV row": (
            "authors.csv",
            b'prompt,answer\nx,"In the perspective of A, a."\ny,just some words\n',
            "row 2: answer line",
        ),
        "a CSV file": (
            "authors.csv",
            b'prompt,answer\nx,"In the perspective of A, a."\n',
            "python tools/convert_data",
        ),
        "CSV with a BOM and a bad row": (
            "bom.csv",
            b"\xef\xbb\xbfprompt,answer\nx,just words\n",
            "row 1: answer line",
        ),
        "not UTF-8 CSV": (
            "latin1.csv",
            b'prompt,answer\nx,"In the perspective of A, caf\xe9."\n',
            "line 2: not UTF-8",
        ),
        "JSON top level 5": ("five.json", b"5", "expected a list of situation objects"),
        "JSON top level null": ("null.json", b"null", "expected a list of situation objects"),
        "non-text paraphrase": (
            "para.jsonl",
            json.dumps(
                dict(GOOD, perspectives=[dict(GOOD["perspectives"][0], paraphrase=["not", "text"])])
            ).encode(),
            "line 1: a perspective's 'kind' and",
        ),
        "over-long situation": (
            "long.jsonl",
            (json.dumps(GOOD) + "\n" + json.dumps(long)).encode(),
            "line 2: the prompt of situation '2' has",
        ),
        "a directory": ("folder.jsonl", None, "is a directory, not the"),
        "a device": ("/dev/null", None, "is a device or a socket, not a regular file"),
        "deeply nested JSON": (
            "deep.jsonl",
            b'{"id": "1", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "line 1: JSON nested too deeply",
        ),
        "a number of 5000 digits": (
            "digits.jsonl",
            b'{"id": "1", "x": ' + b"7" * 5000 + b"}",
            "line 1: a number of 5000 digits",
        ),
        "a key twice": (
            "twice.jsonl",
            json.dumps(GOOD).replace('"id": "1"', '"id": "1", "id": "2"').encode(),
            "line 1: key 'id' appears twice",
        ),
        "a lone surrogate": (
            "surrogate.jsonl",
            json.dumps(dict(GOOD, situation="Lying \ud800 to a friend")).encode(),
            "line 1: holds a lone surrogate",
        ),
    }
    fields = {  # one field of the good row replaced: (the JSON text of its value, what is said)
        "id null": ("id", "null", "'id' must be non-empty text, not null"),
        "id NaN": ("id", "NaN", "'id' must be non-empty text, not the number nan"),
        "id an object": ("id", '{"a": 1}', "'id' must be non-empty text, not an object"),
        "id empty": ("id", '""', "'id' must be non-empty text, not empty text"),
        "id a number": ("id", "7", "'id' must be non-empty text, not the number 7"),
        "id of 401 digits": ("id", "1" * 401, "'id' must be non-empty text, not a number of 401"),
        "domain a list": ("domain", '["law"]', "'domain' must be text (or left out), not a list"),
        "id with a space at its end": ("id", '"1 "', "'id' '1 ' has spaces at its ends"),
    }
    if kind in fields:
        key, value, says = fields[kind]
        text = json.dumps(dict(GOOD, **{key: "@"})).replace('"@"', value)
        cases[kind] = (kind.replace(" ", "-") + ".jsonl", text.encode(), "line 1: " + says)
    name, content, says = cases[kind]
    path = tmp / name
    if kind == "a directory":
        path.mkdir()
    if content is not None:
        path.write_bytes(content)
    return str(path), says


def answers_file(tmp, kind):
    """An answers file (id, model, prompt, answer) with one defect, or a good one."""
    ids = [json.loads(line)["id"] for line in open(TEST)]
    good = "".join(
        json.dumps(dict(id=i, model="m", prompt="implicit", answer="In the perspective of A, a."))
        + "\n"
        for i in ids
    )
    if kind == "good":
        path = tmp / "answers.jsonl"
        path.write_text(good)
        return str(path), None
    if kind in ANSWER_KINDS:
        key, value, says = ANSWER_KINDS[kind]
        first = json.dumps(json.loads(good.splitlines()[0]) | {key: "@"}).replace('"@"', value)
        path = tmp / "answers.jsonl"
        path.write_text(first + "\n" + "".join(good.splitlines(True)[1:]))
        return str(path), "line 1: " + says
    path, says = data_file(tmp, kind)
    if kind == "missing field":
        open(path, "w").write(json.dumps(dict(id=ids[0], model="m", prompt="implicit")) + "\n")
        says = "line 1:"
    return path, says


ANSWER_KINDS = {  # a field of an answers row replaced: (field, its JSON text, what is said)
    "id null": ("id", "null", "'id' must be non-empty text, not null"),
    "id a number": ("id", "7", "'id' must be non-empty text, not the number 7"),
    "model a list": ("model", '["m"]', "'model' must be non-empty text, not a list"),
    "answer a number": ("answer", "5", "'answer' must be text (or null for an empty answer)"),
    "answer with a lone surrogate": ("answer", '"a \\udc00 b"', "holds a lone surrogate"),
}


def judge_answers_file(tmp, kind="good"):
    """An answers file for eval_judge.py (id, model, prompt, answer, situation), good or with one defect."""
    good = dict(
        id="s1", model="m", prompt="implicit", answer="In my view, yes.", situation="May I?"
    )
    fields = dict(ANSWER_KINDS, **{"sample negative": ("sample", "-1", "'sample' must be a whole")})
    if kind == "missing field":
        path = tmp / "judge_answers.jsonl"
        path.write_text(json.dumps({k: v for k, v in good.items() if k != "situation"}) + "\n")
        return str(path), "line 1: missing field(s) situation"
    if kind not in fields and kind != "good":
        return data_file(tmp, kind)
    key, value, says = fields.get(kind, ("id", '"s1"', None))
    path = tmp / "judge_answers.jsonl"
    path.write_text(json.dumps(good | {key: "@"}).replace('"@"', value) + "\n")
    return str(path), says and "line 1: " + says


def model_dir(tmp, kind):
    """A folder given as a model that is none: empty, or holding other files."""
    path = tmp / kind.replace(" ", "-")
    path.mkdir()
    if kind == "junk folder":
        (path / "notes.txt").write_text("not a model")
    return str(path)


DATA_KINDS = [
    "missing",
    "empty",
    "invalid JSON",
    "missing field",
    "not UTF-8",
    "non-text paraphrase",
    "a CSV file",
]
FOREIGN_KINDS = [
    "missing",
    "malformed CSV row",
    "CSV with a BOM and a bad row",
    "not UTF-8 CSV",
    "JSON top level 5",
    "JSON top level null",
]
FIELD_KINDS = [  # issue 34: a field that is not what it claims to be, and files no test made before
    "id null",
    "id NaN",
    "id an object",
    "id empty",
    "id a number",
    "id of 401 digits",
    "domain a list",
    "id with a space at its end",
    "a lone surrogate",
    "a directory",
    "a device",
    "deeply nested JSON",
    "a number of 5000 digits",
    "a key twice",
]
NOT_FINITE = ["inf", "nan", "-inf"]
CASES = (  # (script, what is wrong); see build() for the command line of each
    [("opgrpo_min", f"--train-data {k}") for k in DATA_KINDS + ["over-long situation"]]
    + [("opgrpo_min", f"--train-data {k}") for k in FIELD_KINDS]
    + [
        ("opgrpo_min", c)
        for c in (
            "--steps 0",
            "--steps -3",
            "--lr nan",
            "--preset huge",
            "--model missing",
            "--out is a file",
            "--out read-only",
            "--top-p 0",
            "--top-p 1.5",
            "--beta -1",
            "--clip-eps 2",
            "--sft-steps -3",
            "--device cuda",
            "--device tpu",
            "--resume changes --lr",
            "--lr 1e300",
            "--seed -1",
            "--seed 4294967296",
            "--model empty folder",
            "--model junk folder",
            "--sim-model empty folder",
            "--preset ''",
            "--dtype ''",
            "--device ''",
            "--model ''",
            "--out ''",
        )
    ]
    + [
        ("opgrpo_min", f"{k} {v}")
        for k in (
            "--temperature",
            "--beta",
            "--adv-eps",
            "--lr",
            "--sft-lr",
            "--weight-decay",
            "--grad-clip",
            "--coverage-threshold",
        )
        for v in NOT_FINITE
    ]
    + [("sim_train", f"--data {k}") for k in DATA_KINDS]
    + [
        ("sim_train", c)
        for c in (
            "--epochs 0",
            "--epochs -1",
            "--lr nan",
            "--lr inf",
            "--scale inf",
            "--scale 0",
            "--warmup inf",
            "--seed -1",
            "--base missing",
            "--base empty folder",
            "--judge missing",
            "--judge-url http://127.0.0.1:9/v1",
            "--out is a file",
            "--out read-only",
            "--out ''",
        )
    ]
    + [("eval_nli", f"--data {k}") for k in DATA_KINDS]
    + [("eval_nli", f"--answers {k}") for k in DATA_KINDS[:5]]
    + [("eval_nli", f"--answers {k}") for k in ANSWER_KINDS]
    + [
        ("eval_nli", c)
        for c in (
            "--max-new-tokens 0",
            "--max-new-tokens -1",
            "--temperature nan",
            "--temperature inf",
            "--top-p inf",
            "--seed -1",
            "--model missing",
            "--model junk folder",
            "--sim-model missing",
            "--nli missing",
            "--device tpu",
            "--device ''",
            "--prompt neither",
            "--out is a file",
            "--out read-only",
        )
    ]
    + [("eval_nli", "--device cuda")] * (not torch.cuda.is_available())
    + [("tools/score_answers", f"--data {k}") for k in DATA_KINDS]
    + [("tools/score_answers", f"--answers {k}") for k in DATA_KINDS[:5]]
    + [
        ("tools/score_answers", c)
        for c in ("--sim-model missing", "--out is a file", "--out read-only")
    ]
    + [("tools/convert_data", f"DATA {k}") for k in FOREIGN_KINDS]
    + [("tools/convert_data", "--out exists")]
    + [
        ("eval_judge", f"--answers {k}")
        for k in DATA_KINDS[:5]
        + ["a directory", "a device"]
        + list(ANSWER_KINDS)
        + ["sample negative"]
    ]
    + [
        ("eval_judge", c)
        for c in (
            "--timeout inf",
            "--timeout nan",
            "--timeout 0",
            "--timeout 1e10",
            "--model ''",
            "--model ' '",
            "--api-key-env ''",
            "--base-url ftp://judge",
            "--concurrency 0",
            "--temperature -1",
            "--out ''",
            "--out is a file",
            "--out read-only",
        )
    ]
    + [
        ("study", c)
        for c in (
            "--seeds 0",
            "--situations -1",
            "--situations 0",
            "--answers 1",
            "--lr inf",
            "--coverage-threshold nan",
            "--steps 0",
            "--styles implicit",
            "--styles loud",
            "--rows seed7",
            "--model missing",
            "--train-data missing",
            "--batch-size 0",
            "--seed -1",
        )
    ]
)


def build(script, case, tmp, run_dir, tiny_model_dir):
    """(argv, the output dir, what the one error line must contain) of one case: good arguments with one bad one."""
    flag, _, what = case.partition(" ")
    what = {"''": "", "' '": " "}.get(what, what)
    good_answers = answers_file(tmp, "good")[0]
    args = {
        "opgrpo_min": {"--train-data": TRAIN, "--device": "cpu", "--model": tiny_model_dir},
        "sim_train": {"--data": TRAIN},
        "eval_nli": {"--data": TEST, "--answers": good_answers},
        "tools/score_answers": {"--data": TEST, "--answers": good_answers},
        "study": {"--model": tiny_model_dir, "--smoke": None},
        "tools/convert_data": {"DATA": None},
        "eval_judge": {  # a port where nothing listens: every case must end before any request
            "--answers": judge_answers_file(tmp)[0],
            "--base-url": "http://127.0.0.1:9/v1",
            "--api-key-env": "none",
        },
    }[script]
    args["--out"], says = str(tmp / "out"), [flag]
    if (
        flag in ("--train-data", "--data", "DATA")
        and what in DATA_KINDS + FOREIGN_KINDS + ["over-long situation"] + FIELD_KINDS
    ):
        args[flag], why = data_file(tmp, what)
        says = [args[flag], why]
    elif flag == "--answers" and script == "eval_judge":
        args[flag], why = judge_answers_file(tmp, what)
        says = [args[flag], why]
    elif script == "tools/convert_data":  # --out exists
        (tmp / "out").mkdir()
        args["DATA"] = data_file(tmp, "a CSV file")[0]
        says = ["--out", "exists"]
    elif flag == "--answers" and script != "study":
        args[flag], why = answers_file(tmp, what)
        says = [args[flag], why]
    elif what == "missing":
        args[flag], says = str(tmp / "no" / "such" / "model"), [flag, "no such file or directory"]
        if flag == "--model" and script == "eval_nli":
            del args["--answers"]  # --model generates; --answers re-scores
    elif what.endswith("folder"):
        args[flag], says = model_dir(tmp, what), [flag, "not a model folder"]
        if flag == "--model" and script == "eval_nli":
            del args["--answers"]
    elif flag == "--out" and what in ("is a file", "read-only"):
        if what == "is a file":
            (tmp / "afile").write_text("x")
            args[flag], says = str(tmp / "afile"), ["--out", "is a file"]
        else:
            args[flag], says = read_only_dir(tmp), ["--out", "cannot write"]
    elif flag == "--resume":
        return (
            ["--resume", run_dir, "--lr", "0.5"],
            str(tmp / "out"),
            ["--lr 0.5", "a resume keeps it"],
        )
    else:
        args[flag] = what
    if flag == "--judge-url":  # a URL without --judge MODEL
        says = ["--judge-url", "--judge MODEL"]
    argv = [
        x for kv in args.items() for x in kv if x is not None and x != "DATA"
    ]  # DATA: a positional argument
    return argv, args["--out"], says


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A finished 2-step run of the tiny model, to resume from."""
    out = tmp_path_factory.mktemp("run")
    om.main(tiny_argv(tiny_model_dir, out, 2))
    return str(out)


def tiny_argv(model, out, steps, *extra):
    return [
        "--model",
        str(model),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--sft-steps",
        "1",
        "--sft-batch",
        "2",
        "--steps",
        str(steps),
        "--prompts-per-step",
        "2",
        "--group-size",
        "2",
        "--max-new-tokens",
        "6",
        "--lr",
        "1e-3",
        "--micro-batch",
        "4",
        "--updates-per-step",
        "2",
        "--sample-every",
        "0",
        "--save-every",
        "2",
        *extra,
    ]


@pytest.mark.parametrize("script, case", CASES, ids=[f"{s}: {c}" for s, c in CASES])
def test_a_bad_input_is_one_line_and_a_non_zero_exit(
    script, case, tmp_path, run_dir, tiny_model_dir, capsys
):
    argv, out, says = build(script, case, tmp_path, run_dir, tiny_model_dir)
    with pytest.raises(SystemExit) as e:  # any other exception would be a traceback
        harness.cli.run_cli(SCRIPTS[script], argv)
    message = (
        str(e.value.code) if not isinstance(e.value.code, int) else capsys.readouterr().err.strip()
    )
    assert e.value.code != 0 and message.startswith("error:") and "\n" not in message, message
    for s in says:
        assert s in message, f"{s!r} not in {message!r}"
    if os.path.isdir(out) and not out.startswith("/sys"):
        assert os.listdir(out) == [], "an input error must come before any output"


# ================================================================ existing folders: refused, left byte for byte
def tree(path):
    """{relative path: bytes} of every file under path: what must not change."""
    return {
        os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
        for d, _, fs in os.walk(path)
        for f in fs
    }


def edit_json(path, change):
    data = json.load(open(path))
    change(data)
    json.dump(data, open(path, "w"))


def other_run_checkpoint(run, tmp):
    """The checkpoint of another run (seed 1) beside this run's metrics."""
    import shutil

    other = tmp / "other"
    om.main(tiny_argv(json.load(open(run / "config.json"))["model"], other, 2, "--seed", "1"))
    shutil.rmtree(run / "checkpoint")
    shutil.copytree(other / "checkpoint", run / "checkpoint")


RESUME_CASES = {  # what is done to a copy of a finished 2-step run, and what the refusal must say
    "sft/ deleted": (lambda run, tmp: __import__("shutil").rmtree(run / "sft"), "the KL reference"),
    "metrics.jsonl deleted": (
        lambda run, tmp: (run / "metrics.jsonl").unlink(),
        "metrics.jsonl is missing",
    ),
    "metrics.jsonl garbage": (
        lambda run, tmp: (run / "metrics.jsonl").write_text("garbage\n"),
        "metrics.jsonl is not the history of the checkpoint",
    ),
    "metrics.jsonl short": (
        lambda run, tmp: (run / "metrics.jsonl").write_text(
            (run / "metrics.jsonl").read_text().splitlines(True)[0]
        ),
        "holds 1 rows up to step 2",
    ),
    "another run's checkpoint": (other_run_checkpoint, "not the history of the checkpoint"),
    "chat template replaced": (  # the tokenizer a resume loads is the run's: sft/'s
        lambda run, tmp: (run / "sft" / "chat_template.jinja").write_text(
            "{{ messages[0]['content'] }}"
        ),
        "the chat template",
    ),
    "truncated weights": (
        lambda run, tmp: (run / "checkpoint" / "model.safetensors").write_bytes(
            (run / "checkpoint" / "model.safetensors").read_bytes()[:1000]
        ),
        "model.safetensors",
    ),
    "trainer state without rng": (
        lambda run, tmp: edit_json(
            run / "checkpoint" / "trainer_state.json", lambda d: d.pop("rng")
        ),
        "trainer_state.json: not a",
    ),
    "trainer state without step": (
        lambda run, tmp: edit_json(
            run / "checkpoint" / "trainer_state.json", lambda d: d.pop("step")
        ),
        "trainer_state.json: not a",
    ),
    "truncated optimizer state": (
        lambda run, tmp: (run / "checkpoint" / "trainer_state.pt").write_bytes(b"PK\x03"),
        "trainer_state.pt: damaged",
    ),
    "--steps below the checkpoint": (lambda run, tmp: None, "--steps 1: the checkpoint"),
    "metrics.jsonl with a step as text": (
        lambda run, tmp: (run / "metrics.jsonl").write_text(
            (run / "metrics.jsonl").read_text().replace('"step": 1,', '"step": "1",', 1)
        ),
        "metrics.jsonl is not the history of the checkpoint",
    ),
    "metrics.jsonl not UTF-8": (
        lambda run, tmp: (run / "metrics.jsonl").write_bytes(
            b"\xff" + (run / "metrics.jsonl").read_bytes()
        ),
        "metrics.jsonl is not the history of the checkpoint",
    ),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_a_resume_that_would_not_continue_its_run_is_refused_and_changes_nothing(
    case, run_dir, tmp_path, capsys
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    change, says = RESUME_CASES[case]
    change(run, tmp_path)
    before = tree(run)
    extra = ["--steps", "1"] if case.startswith("--steps") else []
    with pytest.raises(SystemExit) as e:
        harness.cli.run_cli(om.main, ["--resume", str(run), *extra])
    message = str(e.value.code)
    assert message.startswith("error:") and "\n" not in message and says in message, message
    assert tree(run) == before


def test_a_resume_of_data_that_changed_since_is_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(open(TRAIN).read())
    om.main(tiny_argv(tiny_model_dir, tmp_path / "run", 2, "--train-data", str(data)))
    data.write_text(open(TRAIN).read().replace("a", "b", 1))
    before = tree(tmp_path / "run")
    with pytest.raises(ValueError, match="the training data file is not what the run started with"):
        om.main(["--resume", str(tmp_path / "run")])
    assert tree(tmp_path / "run") == before


def test_the_same_data_and_model_under_another_path_resume(run_dir, tmp_path, tiny_model_dir):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    os.symlink(TRAIN, tmp_path / "same.jsonl")
    os.symlink(tiny_model_dir, tmp_path / "same-model")
    rows = om.main(
        [
            "--resume",
            str(run),
            "--train-data",
            str(tmp_path / "same.jsonl"),
            "--model",
            str(tmp_path / "same-model") + "/",
            "--steps",
            "3",
        ]
    )
    assert [r["step"] for r in rows] == [1, 2, 3]


EXISTING = {  # script: (a folder holding earlier work, argv into it, what the refusal must say)
    "opgrpo_min": lambda tmp, run_dir, model: (run_dir, tiny_argv(model, "{out}", 2), "--resume"),
    "sim_train": lambda tmp, run_dir, model: (
        fake_output(tmp, "sim_eval.json"),
        ["--data", TRAIN],
        "sim_eval.json",
    ),
    "eval_nli": lambda tmp, run_dir, model: (
        fake_output(tmp, "answers.jsonl"),
        ["--model", model, "--data", TEST],
        "holds the work of an earlier run without its settings",
    ),
    "study": lambda tmp, run_dir, model: (
        fake_output(tmp, "settings.json", json.dumps(dict(steps=99))),
        ["--smoke", "--model", model],
        "--steps 2: the study in",
    ),
}


def fake_output(tmp, name, text="{}"):
    (tmp / "earlier").mkdir()
    (tmp / "earlier" / name).write_text(text)
    return str(tmp / "earlier")


@pytest.mark.parametrize("script", EXISTING)
def test_a_folder_that_holds_earlier_work_is_refused_byte_for_byte(
    script, run_dir, tmp_path, tiny_model_dir
):
    import shutil

    folder, argv, says = EXISTING[script](tmp_path, run_dir, tiny_model_dir)
    if folder == run_dir:
        shutil.copytree(run_dir, tmp_path / "run")
        folder = str(tmp_path / "run")
    argv = [a.format(out=folder) for a in argv] + (
        [] if "{out}" in " ".join(argv) else ["--out", folder]
    )
    before = tree(folder)
    with pytest.raises(SystemExit) as e:
        harness.cli.run_cli(SCRIPTS[script], argv)
    message = str(e.value.code)
    assert message.startswith("error:") and "\n" not in message and says in message, message
    if script != "study":
        assert "--overwrite" in message
    assert tree(folder) == before


def test_overwrite_moves_the_earlier_run_aside_and_keeps_it_whole(
    run_dir, tmp_path, tiny_model_dir
):
    import shutil

    shutil.copytree(run_dir, tmp_path / "run")
    before = tree(tmp_path / "run")
    om.main(tiny_argv(tiny_model_dir, tmp_path / "run", 1, "--overwrite"))
    assert tree(tmp_path / "run.replaced-1") == before  # the earlier run, byte for byte
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1]


# ================================================================ one process per run folder
def lock_holder(folder):
    """A real process that holds the run-folder lock of `folder` (harness.runs.lock_run_folder) until killed."""
    code = "import sys, time; from harness.runs import lock_run_folder as l; l(sys.argv[1]); print('held', flush=True); time.sleep(120)"
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline() == "held\n"
    return p


def test_a_locked_run_folder_refuses_a_second_process_by_pid_and_a_sigkill_frees_it(tmp_path):
    folder = tmp_path / "run"
    holder = lock_holder(folder)
    (folder / "metrics.jsonl").write_text("{}\n")
    before = tree(folder)
    with pytest.raises(harness.runs.FolderBusy) as e:
        harness.runs.lock_run_folder(str(folder))
    assert str(e.value).startswith(f"--out {folder}: another process (PID {holder.pid}) is writing")
    assert tree(folder) == before
    holder.send_signal(signal.SIGKILL)  # the OS lets go of the lock; its file stays, unheld
    holder.wait()
    assert (folder / ".lock").exists()
    with harness.runs.lock_run_folder(str(folder)) as lock:
        assert (folder / ".lock").read_text() == f"{os.getpid()}\n"
        harness.runs.claim_out_dir(str(folder), holds=("metrics.jsonl",), overwrite=True)
        p = subprocess.run(  # the lock moved along with --overwrite: the fresh folder is still held
            [
                sys.executable,
                "-c",
                "import sys; from harness.runs import lock_run_folder as l; l(sys.argv[1])",
                str(folder),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert f"another process (PID {os.getpid()})" in p.stderr and lock.fd is not None
    assert tree(folder) == {} and tree(tmp_path / "run.replaced-1") == {
        "metrics.jsonl": b"{}\n"
    }  # the run moved aside whole, without the lock file
    fresh = tmp_path / "new" / "deeper"
    harness.runs.lock_run_folder(str(fresh)).release()  # a folder made for nothing is removed again
    assert not (tmp_path / "new").exists()


def test_sim_train_into_a_folder_another_process_holds_is_one_line_and_changes_nothing(tmp_path):
    folder = tmp_path / "sim"
    holder = lock_holder(folder)
    try:
        before = tree(folder)
        with pytest.raises(SystemExit) as e:
            harness.cli.run_cli(sim_train.main, ["--data", TRAIN, "--out", str(folder)])
        assert str(e.value.code) == (
            f"error: --out {folder}: another process (PID {holder.pid}) is writing there; wait for "
            f"it to end or stop it, or use another --out"
        )
        assert tree(folder) == before
    finally:
        holder.kill()
        holder.wait()


def test_the_table_covers_every_script_and_the_docs_state_its_size():
    from collections import Counter

    assert {s for s, _ in CASES} == set(SCRIPTS)
    text = " ".join(open(os.path.join(REPO, "docs", "testing.md")).read().split())
    assert f"{len(CASES)} bad inputs" in text
    assert all(f"`{script}` {n}" in text for script, n in Counter(s for s, _ in CASES).items())


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_bad_input_from_a_real_process_has_no_traceback(script, tmp_path):
    path, _ = data_file(
        tmp_path, "not UTF-8 CSV" if script == "tools/convert_data" else "not UTF-8"
    )
    flag = {
        "opgrpo_min": ["--train-data"],
        "study": ["--train-data"],
        "tools/convert_data": [],
        "eval_judge": ["--answers"],
    }.get(script, ["--data"])
    extra = (
        ["--answers", answers_file(tmp_path, "good")[0]]
        if script in ("eval_nli", "tools/score_answers")
        else []
    )
    p = subprocess.run(
        [
            sys.executable,
            {"study": "study/run.py"}.get(script, f"{script}.py"),
            *flag,
            path,
            *extra,
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert (
        p.stderr.strip().splitlines()[-1]
        == f"error: {path}, line 2: not UTF-8 text (byte 0xe9); save the file "
        f"as UTF-8"
    )


def test_the_table_of_tried_inputs_states_how_many_it_holds():
    text = open(os.path.join(REPO, "docs", "testing.md")).read()
    table = text[text.index("## Tried inputs") :]
    rows = [
        line for line in table.splitlines() if line.startswith("| ") and "| input |" not in line
    ]
    inputs = sum(
        row.split(" | ")[0].count(" / ") + 1 for row in rows
    )  # "a / b" in a row: two inputs
    assert f"**{inputs} tried**. Now: {inputs} clear" in " ".join(table.split())


# ================================================================ resume
def test_resume_from_the_command_line_continues_the_run_exactly(tiny_model_dir, tmp_path, run_dir):
    clean = lambda rows: [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rows]
    straight = om.main(tiny_argv(tiny_model_dir, tmp_path / "a", 4))
    b = tmp_path / "b"
    om.main(tiny_argv(tiny_model_dir, b, 2))
    resumed = om.main(
        ["--resume", str(b), "--steps", "4", "--save-every", "3", "--sample-every", "0"]
    )
    assert [r["step"] for r in resumed] == [1, 2, 3, 4] and clean(resumed) == clean(straight)
    assert json.load(open(b / "config.json"))["steps"] == 4


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--model", "other"),
        ("--train-data", TEST),
        ("--group-size", "4"),
        ("--prompts-per-step", "3"),
        ("--max-new-tokens", "9"),
        ("--lr", "0.5"),
        ("--mask-keywords", "none"),
        ("--seed", "7"),
        ("--out", "/tmp/elsewhere"),
    ],
)
def test_a_resume_refuses_a_knob_that_would_mix_two_runs(run_dir, flag, value):
    with pytest.raises(
        ValueError,
        match=f"{flag} {value}: the run in .* has .*only --steps, --save-every and "
        f"--sample-every may change",
    ):
        om.main(["--resume", run_dir, flag, value])


def test_a_resume_accepts_a_knob_given_again_with_its_saved_value(run_dir):
    saved = json.load(open(os.path.join(run_dir, "checkpoint", "trainer_state.json")))["config"]
    cfg = resume.resumed_config(
        om.parse_args(["--resume", run_dir, "--lr", str(saved["lr"]), "--steps", "9"]),
        om.Config(**saved),
        om.RESUMABLE,
    )
    assert (cfg.lr, cfg.steps, cfg.out) == (saved["lr"], 9, run_dir)


class Exploit:
    """Unpickling this creates a file: what a shared run directory could do with weights_only=False."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_trainer_state_that_would_run_code_is_refused_and_nothing_runs(run_dir, tmp_path):
    evil = tmp_path / "evil"
    import shutil

    shutil.copytree(run_dir, evil)
    marker = tmp_path / "code-ran"
    torch.save(
        {"optimizer": Exploit(str(marker))}, evil / "checkpoint" / "trainer_state.pt"
    )  # torch.save's format
    with pytest.raises(
        harness.data.DataError,
        match="trainer_state.pt: refused: it holds Python objects besides tensors",
    ):
        om.main(["--resume", str(evil)])
    assert not marker.exists()
    with pytest.raises(SystemExit, match="error: .*refused"):
        harness.cli.run_cli(om.main, ["--resume", str(evil)])
    assert not marker.exists()
    torch.load(
        evil / "checkpoint" / "trainer_state.pt", weights_only=False
    )  # the file really does run code
    assert marker.exists()


def test_the_trainer_state_loads_without_pickle_and_restores_every_rng(run_dir):
    import random

    import numpy as np

    data, tensors = resume.load_trainer_state(os.path.join(run_dir, "checkpoint"), om.Config)
    assert data["step"] == 2 and isinstance(data["config"], om.Config)
    draw = lambda: (random.random(), float(np.random.rand()), torch.rand(1).item())
    resume.set_rng_state(data["rng"], tensors)
    rng, first = harness.runs.rng_state(), draw()
    resume.set_rng_state(data["rng"], tensors)
    assert draw() == first
    as_saved = dict(
        python=json.loads(json.dumps(rng["python"])), numpy=json.loads(json.dumps(rng["numpy"]))
    )
    resume.set_rng_state(
        as_saved, dict(torch_rng=rng["torch"], cuda_rng=rng["cuda"])
    )  # through JSON, as it is saved
    assert draw() == first


def test_a_rewrite_that_fails_half_way_loses_no_row(run_dir, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = (run / "metrics.jsonl").read_text()
    assert len(before.splitlines()) == 2

    real = os.fsync

    def disk_full(fd):  # metrics.jsonl's new copy is written, then fails before the rename
        if "metrics.jsonl" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        om.main(["--resume", str(run), "--steps", "3"])
    assert (run / "metrics.jsonl").read_text() == before
    assert not [f for f in os.listdir(run) if ".tmp" in f]


def test_write_text_replaces_a_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    harness.runs.write_text(str(path), "old\n")
    real = os.replace
    monkeypatch.setattr(
        os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed before the rename"))
    )
    with pytest.raises(OSError):
        harness.runs.write_text(str(path), "new\n" * 1000)
    monkeypatch.setattr(os, "replace", real)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["f.txt"]


# ================================================================ crash safety, end to end through the CLI
KILLER = textwrap.dedent('''
    """Run opgrpo_min's command line, and SIGKILL this process at the point named by $KILL_AT."""
    import os, shutil, signal, sys
    sys.path.insert(0, {repo!r})
    import torch
    import opgrpo_min as om

    def kill_when(obj, name, test):
        real = getattr(obj, name)
        def wrapper(*a, **kw):
            if test(*a, **kw):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)
        setattr(obj, name, wrapper)

    at = os.environ.get("KILL_AT", "")
    calls = []
    counting = lambda n: lambda *a, **kw: calls.append(1) or len(calls) == n
    if at.startswith("update:"):            # in the middle of a step: rollout and reward done, no update yet
        kill_when(om, "grpo_update", counting(int(at[7:])))
    elif at == "checkpoint-write":          # the policy is written to checkpoint.tmp, its trainer state not yet
        kill_when(torch, "save", counting(1))
    elif at == "checkpoint-rename":         # between atomic_save's renames: only checkpoint.old and .tmp exist
        kill_when(os, "replace", lambda src, dst: src.endswith("checkpoint.tmp"))
    elif at == "metrics-rewrite":           # a resume has written metrics.jsonl's new copy, not yet renamed it
        kill_when(os, "replace", lambda src, dst: dst.endswith("metrics.jsonl"))
    elif at == "sft":                       # in the SFT warm start: nothing of it saved yet
        kill_when(torch.nn.utils, "clip_grad_norm_", counting(1))
    elif at == "before-checkpoint":         # a step's row is in metrics.jsonl, its checkpoint is not written
        kill_when(om, "save_checkpoint", counting(1))
    elif at == "after-second-rename":       # both renames done: checkpoint and checkpoint.old are whole
        kill_when(shutil, "rmtree", lambda path, *a, **kw: str(path).endswith("checkpoint.old")
                  and os.path.exists(os.path.join(path, "model.safetensors")))
    elif at == "checkpoint-rmtree":         # checkpoint.old half deleted
        real_rmtree = shutil.rmtree
        def half(path, *a, **kw):
            if str(path).endswith("checkpoint.old") and os.path.exists(os.path.join(path, "model.safetensors")):
                os.remove(os.path.join(path, "model.safetensors"))
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rmtree(path, *a, **kw)
        shutil.rmtree = half
    om.run_cli(om.main, sys.argv[1:])
''')


def test_sigkill_at_any_point_then_resume_from_the_cli_gives_the_straight_run(
    tiny_model_dir, tmp_path
):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=REPO))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def run(argv, kill_at=""):
        p = subprocess.run(
            [sys.executable, str(killer), *argv],
            env=dict(env, KILL_AT=kill_at),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == (-signal.SIGKILL if kill_at else 0), p.stderr[-2000:]
        return p

    run(tiny_argv(tiny_model_dir, tmp_path / "straight", 6))
    crash = tmp_path / "crash"
    run(tiny_argv(tiny_model_dir, crash, 6), "update:4")  # killed in step 4; checkpoint of step 2
    run(["--resume", str(crash)], "checkpoint-write")  # killed writing the step-4 checkpoint
    assert (crash / "checkpoint.tmp").is_dir() and not (
        crash / "checkpoint.tmp" / "trainer_state.json"
    ).exists()
    run(["--resume", str(crash)], "checkpoint-rename")  # killed between the two renames
    assert (crash / "checkpoint.old").is_dir() and not (crash / "checkpoint").exists()
    run(["--resume", str(crash)], "metrics-rewrite")  # killed rewriting metrics.jsonl
    run(["--resume", str(crash)], "before-checkpoint")  # step-4 row written, no checkpoint
    assert [json.loads(line)["step"] for line in open(crash / "metrics.jsonl")] == [1, 2, 3, 4]
    run(["--resume", str(crash)], "checkpoint-rmtree")  # step-4 save: its .old half deleted
    assert (crash / "checkpoint.old").is_dir() and not (
        crash / "checkpoint.old" / "model.safetensors"
    ).exists()
    run(["--resume", str(crash)], "after-second-rename")  # that save works; step 6: both whole
    assert (crash / "checkpoint.old" / "model.safetensors").exists() and (
        crash / "checkpoint"
    ).is_dir()
    run(["--resume", str(crash)])
    rows = lambda d: [json.loads(line) for line in open(d / "metrics.jsonl")]
    clean = lambda rs: [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rs]
    assert [r["step"] for r in rows(crash)] == [1, 2, 3, 4, 5, 6]  # every step exactly once
    assert clean(rows(crash)) == clean(rows(tmp_path / "straight"))


@pytest.mark.parametrize(
    "kill_at, goes_on_from",
    [
        ("sft", "its start: it stopped during SFT, which was not saved and runs again"),
        ("update:1", "GRPO step 0, from its saved SFT model"),
    ],
)
def test_a_run_killed_before_its_first_checkpoint_resumes_and_gives_the_straight_run(
    kill_at, goes_on_from, tiny_model_dir, tmp_path
):
    """A SIGKILL during SFT, or in GRPO step 1 (the first checkpoint comes at step 2): --resume goes on from what
    is saved (nothing, or out/sft without training SFT again) and ends with the metrics of a straight run."""
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=REPO))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    run = lambda argv, at="": subprocess.run(
        [sys.executable, str(killer), *argv],
        env=dict(env, KILL_AT=at),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    crash, straight = tmp_path / "crash", tmp_path / "straight"
    assert (
        run(tiny_argv(tiny_model_dir, straight, 2)).returncode == 0
    )  # the same threads as the resume
    assert run(tiny_argv(tiny_model_dir, crash, 2), kill_at).returncode == -signal.SIGKILL
    assert not (crash / "checkpoint").exists() and (crash / "sft").is_dir() == (kill_at != "sft")
    p = run(["--resume", str(crash)])
    assert p.returncode == 0 and f"resuming {crash} at {goes_on_from}" in p.stdout, p.stderr[-2000:]
    assert ("SFT:" in p.stderr) == (kill_at == "sft")  # SFT runs again only when it was not saved
    rows = lambda d: [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    clean = lambda rs: [{k: v for k, v in r.items() if not k.startswith("t_")} for r in rs]
    assert clean(rows(crash)) == clean(rows(straight))


def test_an_out_inside_another_run_is_refused(run_dir, tiny_model_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = tree(run)
    with pytest.raises(SystemExit) as e:
        harness.cli.run_cli(om.main, tiny_argv(tiny_model_dir, run / "sft", 1, "--overwrite"))
    assert f"--out {run / 'sft'}: inside the run in {run}" in str(e.value.code)
    assert tree(run) == before


@pytest.mark.parametrize(
    "script", ["opgrpo_min", "opgrpo_min --resume", "eval_nli", "study", "curve"]
)
def test_every_script_that_writes_a_run_folder_locks_it(script, run_dir, tiny_model_dir, tmp_path):
    """While another process holds a run folder (here this one, through the same lock), each script refuses it
    with one line naming the folder and the PID, before it reads or writes anything there."""
    from study import curve

    folder = run_dir if script.endswith("--resume") else str(tmp_path / "out")
    mains = dict(opgrpo_min=om.main, eval_nli=eval_nli.main, study=study.main, curve=curve.main)
    argv = {
        "opgrpo_min": tiny_argv(tiny_model_dir, folder, 1),
        "opgrpo_min --resume": ["--resume", folder],
        "eval_nli": ["--model", tiny_model_dir, "--data", TEST, "--out", folder],
        "study": ["--smoke", "--model", tiny_model_dir, "--out", folder],
        "curve": ["--smoke", "--model", tiny_model_dir, "--out", folder],
    }[script]
    with harness.runs.lock_run_folder(folder):
        before = tree(folder)
        with pytest.raises(SystemExit) as e:
            harness.cli.run_cli(mains[script.split()[0]], argv)
        assert tree(folder) == before
    message = str(e.value.code)
    assert f"{folder}: another process (PID {os.getpid()})" in message and "\n" not in message
