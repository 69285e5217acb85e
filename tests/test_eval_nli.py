"""eval_nli.py as a specification: the NLI scoring math on a fake predictor with hand-computed numbers, the
entailment label read from id2label, the offline coverage on the real MiniLM, and a full run on the tiny policy
with a tiny NLI cross-encoder built here (random weights, so only the plumbing is checked, not the numbers)."""

import csv
import json
import os
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import eval_nli
import harness.answers
import harness.data
import harness.models
import reward
from eval_nli import (
    embedding_coverage,
    entailment_index,
    load_nli,
    nli_scores,
    resolve_model,
    situation_score,
    split_sentences,
    summarize,
)
from harness.answers import load_answers
from harness.data import Perspective, Situation, load_situations
from opgrpo_min import reference_answer

ROOT = os.path.dirname(eval_nli.__file__)
TEST_DATA = os.path.join(ROOT, "data", "test.jsonl")


def fake_entail(table):
    """An entail() that looks each (premise, hypothesis) up in `table` (unknown pairs: 0) and records its calls."""

    def entail(premises, hypotheses):
        entail.calls.append(list(zip(premises, hypotheses)))
        return [table.get(pair, 0.0) for pair in zip(premises, hypotheses)]

    entail.calls = []
    return entail


def situation(sid, *explanations):
    return Situation(
        sid, f"situation {sid}", [Perspective(f"P{i}", e) for i, e in enumerate(explanations)]
    )


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory):
    """A tiny random BERT cross-encoder with the MiniLM tokenizer, its labels in an unusual order."""
    return build_nli(
        tmp_path_factory.mktemp("nli"), {0: "contradiction", 1: "entailment", 2: "neutral"}
    )


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Six test situations, two with each of 3, 4 and 5 reference perspectives: three strata, quick to run."""
    lines, per = [], {}
    for line in open(TEST_DATA):
        k = len(json.loads(line)["perspectives"])
        if k in (3, 4, 5) and per.setdefault(k, 0) < 2:
            per[k] += 1
            lines.append(line)
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("".join(lines))
    return str(path)


def build_nli(path, id2label):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(harness.models.default_embedder_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ================================================================ sentences and the scored text
def test_sentences_end_at_end_marks_and_line_breaks_and_tags_are_not_sentences():
    text = "<core perspectives>\nIn the perspective of A, a. It is b!\n</core perspectives>\n<summary>Why? 1. ok</summary>"
    assert split_sentences(text) == ["In the perspective of A, a.", "It is b!", "Why?", "ok"]
    assert split_sentences("  \n- \n---") == []


def test_situation_score_is_the_mean_over_perspectives_of_the_max_over_sentences():
    entail = fake_entail(
        {
            ("ea", "s1."): 0.9,
            ("ea", "s2."): 0.2,
            ("eb", "s1."): 0.1,
            ("eb", "s2."): 0.5,
            ("ec", "s3."): 0.4,
        }
    )
    scores = nli_scores(
        ["s1. s2.", "s3."], [situation("x", "ea", "eb"), situation("y", "ec")], entail
    )
    assert scores == pytest.approx([(0.9 + 0.5) / 2, 0.4]), (
        "situation_score: mean over reference perspectives of the max over answer sentences"
    )
    assert len(entail.calls) == 1 and len(entail.calls[0]) == 4 + 1, (
        "nli_scores: every pair of the batch in one call"
    )


def test_an_empty_answer_scores_zero_and_sends_no_pair_to_the_nli_model():
    entail = fake_entail({("ea", "s1."): 0.8})
    assert nli_scores(["", " \n- ", "s1."], [situation("x", "ea")] * 3, entail) == pytest.approx(
        [0, 0, 0.8]
    ), "an answer without a sentence scores 0"
    assert entail.calls == [[("ea", "s1.")]], (
        "an answer without a sentence sends no pair to the NLI model"
    )
    assert situation_score(np.zeros((3, 0))) == 0.0, (
        "situation_score: no sentence (an empty P) -> 0.0"
    )


def test_summary_uses_the_sample_std_and_accuracy_counts_scores_strictly_above_0_33():
    s = summarize([0.33, 0.34, 0.2, 1.0])
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.4675), "summarize: n and the mean"
    assert s["std"] == pytest.approx(np.sqrt(0.390275 / 3)) and s["se"] == pytest.approx(
        s["std"] / 2
    ), "summarize: the sample std (ddof 1) and se = std / sqrt(n)"
    assert s["accuracy"] == 0.5, (
        "summarize: accuracy is the share of scores strictly above 0.33"
    )  # 0.34 and 1.0
    assert summarize([0.33])["accuracy"] == 0.0 and np.isnan(summarize([0.5])["std"]), (
        "summarize: 0.33 itself does not count; one score has std NaN"
    )


# ================================================================ the entailment label
@pytest.mark.parametrize(
    "id2label, index",
    [
        ({0: "contradiction", 1: "entailment", 2: "neutral"}, 1),
        ({0: "ENTAILMENT", 1: "NEUTRAL", 2: "CONTRADICTION"}, 0),
        ({"0": "not_entail", "1": " Entail "}, 1),
    ],
)
def test_entailment_index_is_read_from_id2label_in_any_order_and_case(id2label, index):
    assert entailment_index(SimpleNamespace(id2label=id2label)) == index, (
        "entailment_index: the index of the 'entailment' or 'entail' label, any case, spaces ignored"
    )


def test_nli_model_without_an_entailment_label_is_a_clear_error(tmp_path):
    path = build_nli(tmp_path, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(ValueError, match="no 'entailment' label.*id2label"):
        load_nli(path)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_nli_pipeline_gives_the_entailment_probability_of_a_plain_forward(nli_dir, batch_size):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    premises = [
        "Lying hurts trust.",
        "Rules matter.",
        "A much longer premise about duties " * 40,
    ]  # truncated at 512
    hypotheses = ["Trust suffers from lies.", "x", "Duties bind."]
    got = load_nli(nli_dir, batch_size=batch_size)(premises, hypotheses)
    tok, model = (
        AutoTokenizer.from_pretrained(nli_dir),
        AutoModelForSequenceClassification.from_pretrained(nli_dir),
    )
    with torch.no_grad():  # one pair at a time: no padding at all
        probs = torch.cat(
            [
                model(
                    **tok(p, h, truncation=True, max_length=512, return_tensors="pt")
                ).logits.softmax(-1)
                for p, h in zip(premises, hypotheses)
            ]
        )
    assert got == pytest.approx(
        probs[:, 1].numpy(), abs=1e-6
    )  # column 1: 'entailment' in this model
    assert not np.allclose(got, probs[:, 0].numpy())


# ================================================================ the offline metric
def test_embedding_coverage_counts_reference_perspectives_matched_by_sentences(minilm):
    items = load_situations(TEST_DATA)[:3]
    full = [reference_answer(s) for s in items]
    assert embedding_coverage(full, items, minilm) == [1.0, 1.0, 1.0]  # the reference covers itself
    first = [
        reward.perspective_line(s.perspectives[0].name, s.perspectives[0].explanation)
        for s in items
    ]  # one perspective of n
    assert embedding_coverage(first, items, minilm) == pytest.approx(
        [1 / len(s.perspectives) for s in items]
    )
    assert embedding_coverage(["", "", ""], items, minilm) == [0.0, 0.0, 0.0]


# ================================================================ answers and models
def test_answers_are_matched_to_the_test_set_by_id_not_by_row_order(tmp_path):
    items = [situation("a", "e"), situation("b", "e")]
    rows = [dict(id=i, model="m", prompt="implicit", answer=f"answer {i}") for i in ("b", "a")]
    path = write_jsonl(tmp_path / "answers.jsonl", rows)
    assert load_answers(path, items) == {("m", "implicit"): ["answer a", "answer b"]}


@pytest.mark.parametrize(
    "rows, match",
    [
        (
            [
                dict(id="a", model="m", prompt="implicit", answer=""),
                dict(id="zz", model="m", prompt="implicit", answer=""),
            ],
            r"line 2: id 'zz' is not in the test set",
        ),
        (
            [dict(id="a", model="m", prompt="implicit", answer="")],
            r"no answer for 1 test situation\(s\), e.g. 'b'",
        ),
        ([dict(id="a", model="m", prompt="p", answer="")] * 2, "line 2: a second answer"),
        (
            [dict(id="a", model="m", answer="")],
            "line 1: expected a JSON object with id, model, prompt, answer",
        ),
    ],
)
def test_an_answers_file_that_does_not_match_the_test_set_is_a_clear_error(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        load_answers(
            write_jsonl(tmp_path / "answers.jsonl", rows),
            [situation("a", "e"), situation("b", "e")],
        )


@pytest.mark.parametrize("value, says", [(5, "the number 5"), (None, "null")])
def test_a_saved_situation_that_is_not_text_is_refused_not_left_unchecked(tmp_path, value, says):
    rows = [dict(id=i, model="m", prompt="p", answer="", situation=value) for i in ("a", "b")]
    path = write_jsonl(tmp_path / "answers.jsonl", rows)
    with pytest.raises(ValueError, match=f"line 1: 'situation' must be text, not {says}"):
        load_answers(path, [situation("a", "e"), situation("b", "e")])


@pytest.mark.parametrize(
    "change, says",
    [
        (dict(model=None), "line 2: missing field 'model'"),  # None: the field left out
        (dict(model=["m"]), "line 2: 'model' must be non-empty text, not a list"),
        (dict(id=["a"]), "line 2: 'id' must be non-empty text, not a list"),
        (dict(id=7), "line 2: 'id' must be non-empty text, not the number 7"),  # the re-probe
        (dict(situation=5), "line 2: 'situation' must be text, not the number 5"),
        (dict(situation=None), "line 2: missing field 'situation'"),
        (dict(sample=-1), "line 2: 'sample' must be a whole number >= 0, not the number -1"),
        (dict(sample="0"), "line 2: 'sample' must be a whole number >= 0, not '0'"),
        (dict(sample=1.0), "line 2: 'sample' must be a whole number >= 0, not the number 1.0"),
    ],
)
def test_a_saved_row_an_evaluation_goes_on_from_is_checked_by_line(tmp_path, change, says):
    """saved_rows (eval_nli's and the study's resume) names a bad row's line instead of a KeyError or TypeError."""
    study = "sample" in change  # the study's rows: (row, prompt, id, sample)
    fields = ("row", "prompt", "id", "sample") if study else ("model", "prompt", "id")
    good = dict(id="b", prompt="p", answer="", situation="e")
    good = dict(good, row="sft", sample=0) if study else dict(good, model="m")
    bad = {k: v for k, v in (good | {"id": "a"} | change).items() if v is not None}
    path = write_jsonl(tmp_path / "answers.jsonl", [good, bad])
    with pytest.raises(harness.data.DataError, match=re.escape(says)):
        harness.answers.saved_rows(path, fields)
    ok = write_jsonl(tmp_path / "ok.jsonl", [good])
    assert list(harness.answers.saved_rows(ok, fields)) == [tuple(good[f] for f in fields)]


@pytest.mark.parametrize(
    "tail, kept",
    [
        (
            '{"id": "b", "id": "c"}',
            False,
        ),  # a key twice: the readers refuse it, so it is cut, not ended
        ("[" * 100_000 + "]" * 100_000, False),  # too deep for Python
        ('{"id": "b", "ans', False),  # torn
        ('{"id": "b"}', True),  # whole, only its newline missing
    ],
)
def test_a_last_line_without_its_newline_is_kept_only_when_the_readers_accept_it(
    tmp_path, tail, kept
):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": "a"}\n' + tail)
    harness.answers.drop_torn_tail(str(path))
    assert path.read_text() == '{"id": "a"}\n' + (tail + "\n" if kept else "")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_checkpoint_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model .*checkpoint: no such file or directory"):
        eval_nli.main(
            [
                "--model",
                str(tmp_path / "runs" / "default" / "checkpoint"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert not (tmp_path / "o" / "answers.jsonl").exists()
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="not a model folder: it holds no weights"):
        resolve_model(str(run))
    (run / "checkpoint").mkdir()
    for name in (
        "model.safetensors",
        "tokenizer.json",
    ):  # an opgrpo_min.py run dir -> its checkpoint
        (run / "checkpoint" / name).touch()
    assert resolve_model(str(run)) == str(run / "checkpoint")
    assert (
        resolve_model("default") is None and resolve_model("owner/hub-model") == "owner/hub-model"
    )


# ================================================================ end to end
def test_full_run_generates_scores_and_rescores_the_same_numbers(
    tiny_model_dir, nli_dir, small_data, tmp_path
):
    out = tmp_path / "run"
    eval_nli.main(
        [
            "--model",
            tiny_model_dir,
            "--prompt",
            "both",
            "--nli",
            nli_dir,
            "--max-new-tokens",
            "8",
            "--data",
            small_data,
            "--out",
            str(out),
        ]
    )
    answers = [json.loads(line) for line in open(out / "answers.jsonl")]
    assert len(answers) == 2 * 6 and {a["prompt"] for a in answers} == {"implicit", "explicit"}
    assert set(answers[0]) == {"id", "model", "prompt", "answer", "situation"}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 2 * (1 + 3)  # prompts x metrics x (all + 3 strata)
    assert {r["metric"] for r in rows} == {
        "coverage all-MiniLM-L6-v2",
        f"NLI {os.path.basename(nli_dir)}",
    }
    assert [r["stratum"] for r in rows[:4]] == ["all", "3", "4", "5"] and rows[1]["n"] == "2"
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert "Accuracy: share of situations with score > 0.33" in (out / "results.md").read_text()
    assert (out / "accuracy.png").exists() and (out / "config.json").exists()

    random.Random(0).shuffle(answers)  # re-score without generating
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", answers)
    eval_nli.main(
        [
            "--answers",
            shuffled,
            "--data",
            small_data,
            "--nli",
            nli_dir,
            "--out",
            str(tmp_path / "again"),
        ]
    )
    again = list(csv.DictReader(open(tmp_path / "again" / "results.csv")))
    assert [(r["metric"], r["stratum"]) for r in again] == [
        (r["metric"], r["stratum"]) for r in rows
    ]
    assert [float(r["mean"]) for r in again] == pytest.approx([float(r["mean"]) for r in rows])


def test_an_unavailable_nli_model_is_reported_and_coverage_is_still_computed(
    small_data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [
        dict(id=s.id, model="m", prompt="implicit", answer=reference_answer(s))
        for s in load_situations(small_data)
    ]
    answers = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(FileNotFoundError, match="--nli .*no-such-nli: no such file or directory"):
        eval_nli.main(
            [
                "--answers",
                answers,
                "--data",
                small_data,
                "--nli",
                str(tmp_path / "no-such-nli"),
                "--out",
                str(tmp_path / "out"),
            ]
        )  # a path that is not there: refused
    assert not (tmp_path / "out").exists()
    eval_nli.main(
        [
            "--answers",
            answers,
            "--data",
            small_data,
            "--nli",
            "no-owner/no-such-nli-model",
            "--out",
            str(tmp_path / "out"),
        ]
    )  # a hub id the hub cannot give here
    assert "is not available here" in capsys.readouterr().err
    table = (tmp_path / "out" / "results.md").read_text()
    assert "not available here (offline), no NLI rows" in table
    assert "| m | implicit | coverage all-MiniLM-L6-v2 | 6 | 1.000 |" in table


# ================================================================ a laptop's run: preset, progress, answers kept
EVAL_KILLED = """
import sys, time
sys.path.insert(0, {root!r})
import eval_nli, opgrpo_min
slow = opgrpo_min.sample_groups
def sample_groups(*a, **k):  # a batch takes a second, so the kill lands between or within batches
    time.sleep(1)
    return slow(*a, **k)
eval_nli.sample_groups = sample_groups
eval_nli.main({argv!r})
"""


def eval_argv(model, data, out, *extra):
    argv = ["--model", model, "--data", data, "--nli", "none", "--max-new-tokens", "4"]
    return argv + ["--batch-size", "2", "--out", str(out), *extra]


def test_a_killed_evaluation_goes_on_and_writes_what_a_straight_run_writes(
    tiny_model_dir, small_data, tmp_path
):
    """SIGKILL after the first saved batch, then the same command again: the answers file is byte for byte the one
    a straight run writes (each batch has a seed of its own), and the rerun makes only the batches that are missing.
    A rerun with another sampling setting is refused by name, and nothing changes."""
    import signal
    import subprocess
    import sys
    import time

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    eval_nli.main(eval_argv(tiny_model_dir, small_data, straight))
    script = EVAL_KILLED.format(root=ROOT, argv=eval_argv(tiny_model_dir, small_data, killed))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    path, deadline = killed / "answers.jsonl", time.time() + 300
    lines = lambda: sum(1 for _ in open(path)) if path.exists() else 0
    while lines() < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = lines()
    assert 2 <= kept < 12, "the kill fell after the first batch (2 answers) and before the last"
    calls, real = [], eval_nli.sample_groups
    eval_nli.sample_groups = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        eval_nli.main(eval_argv(tiny_model_dir, small_data, killed))
    finally:
        eval_nli.sample_groups = real
    assert (killed / "answers.jsonl").read_bytes() == (straight / "answers.jsonl").read_bytes()
    assert len(calls) == 6 - kept // 2, "only the missing batches (6 of 2 answers in all) are made"
    before = (killed / "answers.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"--temperature 0.8: the run in .* was made with 0.7"):
        eval_nli.main(eval_argv(tiny_model_dir, small_data, killed, "--temperature", "0.8"))
    assert (killed / "answers.jsonl").read_bytes() == before


def test_on_the_cpu_the_answer_length_is_the_training_presets_and_progress_shows(
    tiny_model_dir, small_data, tmp_path, capsys
):
    argv = [
        "--model",
        tiny_model_dir,
        "--data",
        small_data,
        "--nli",
        "none",
        "--prompt",
        "implicit",
    ]
    eval_nli.main(argv + ["--out", str(tmp_path / "a"), "--batch-size", "3"])
    err = capsys.readouterr().err
    assert f"{eval_nli.CPU_TOKENS} new tokens per answer, not the paper's 1200" in err
    assert json.load(open(tmp_path / "a" / "config.json"))["max_new_tokens"] == eval_nli.CPU_TOKENS
    assert "tokens_per_s=" in err and "6/6" in err  # tqdm: answers done, speed, time left
    eval_nli.main(argv + ["--out", str(tmp_path / "b"), "--max-new-tokens", "3"])
    assert "not the paper's" not in capsys.readouterr().err
    assert json.load(open(tmp_path / "b" / "config.json"))["max_new_tokens"] == 3


def test_saved_answers_to_a_situation_whose_text_changed_are_refused_by_name(
    tiny_model_dir, small_data, tmp_path
):
    out = tmp_path / "run"
    eval_nli.main(eval_argv(tiny_model_dir, small_data, out))
    changed = tmp_path / "changed.jsonl"
    rows = [json.loads(line) for line in open(small_data)]
    rows[0]["situation"] += " (reworded)"
    changed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(out / "config.json") as f:
        config = json.load(f)
    config["data"] = str(changed)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=f"the saved answer to {rows[0]['id']!r} was made for another text"
    ):
        eval_nli.main(eval_argv(tiny_model_dir, str(changed), out))
    with pytest.raises(
        ValueError, match=f"the answer to {rows[0]['id']!r} was made for another text"
    ):
        eval_nli.main(
            [
                "--answers",
                str(out / "answers.jsonl"),
                "--data",
                str(changed),
                "--nli",
                "none",
                "--out",
                str(tmp_path / "rescore"),
            ]
        )
