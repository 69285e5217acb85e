"""study/run.py: its statistics by hand, and the whole pipeline at smoke settings (the full study is not a test)."""

import json
import os

import numpy as np
import pytest

import harness.data
import opgrpo_min as om
from study import run as study


def test_paired_differences_by_hand():
    r = study.paired([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0])
    assert (r["mean"], r["lo"], r["hi"]) == (1.0, 1.0, 1.0)
    assert r["p"] == 2 / 16  # of the 16 sign patterns only all-plus and all-minus reach |mean| 1
    r = study.paired([1.0, -1.0, 2.0, -2.0], [0.0] * 4)
    assert r["mean"] == 0.0 and r["p"] == 1.0 and r["lo"] < 0 < r["hi"]


def test_noise_budget_splits_the_variance_of_the_difference_by_hand():
    # d = [0.5, 1.0]: var 0.125, se sqrt(0.125 / 2) = 0.25; a's within-situation variance (0.5 + 0) / 2 = 0.25 over
    # its 2 answers is 0.125: all of var(d) is answer sampling, and 8 answers give sqrt(0.25 / 8 / 2) = 0.125
    r = study.noise_budget([[1, 0], [1, 1]], [[0, 0], [0, 0]])
    assert r["se"] == pytest.approx(0.25) and r["sampling_share"] == pytest.approx(1.0)
    assert r["by_answers"][8] == pytest.approx(dict(se=0.125, detectable=0.35))
    # no within-situation variance: all between situations, and more answers do not shrink it
    r = study.noise_budget([[1, 1], [0, 0]], [[0, 0], [0, 0]])
    assert r["sampling_share"] == 0.0 and r["by_answers"][32]["se"] == pytest.approx(
        r["se"]
    ) == pytest.approx(0.5)
    # 2 seeds pooled (4 answers of a per situation): within 1/6, sampling 1/24, between 0.125 - 1/24 = 1/12;
    # 4 answers from SFT and from each seed: sqrt((1/12 + (1/6) / 8) / 2)
    r = study.noise_budget([[1, 0, 1, 0], [1, 1, 1, 1]], [[0, 0], [0, 0]], n_seeds=2)
    assert r["sampling_share"] == pytest.approx(1 / 3)
    assert r["by_answers"][4]["se"] == pytest.approx(np.sqrt((1 / 12 + 1 / 48) / 2))
    assert study.noise_budget([[1], [0]], [[0], [0]]) is None  # one answer: no within-variance


def test_answer_stats_count_distinct_perspectives_format_and_repeats(minilm):
    good = (
        "<core perspectives>\nIn the perspective of Safety, the bridge must be inspected before it opens.\n"
        "In the perspective of Cost, the town cannot pay for a second crossing this decade.\n"
        "</core perspectives>\n<summary>Safety and Cost pull apart.</summary>"
    )
    s = study.answer_stats(good, minilm)
    assert s == dict(distinct=2, in_format=1.0, words=len(good.split()), repeats=0.0)
    twice = good.replace(
        "Cost, the town cannot pay for a second crossing this decade",
        "Safety, the bridge must be inspected before it opens",
    )
    s = study.answer_stats(twice, minilm)
    assert s["distinct"] == 1 and s["repeats"] == 1.0
    s = study.answer_stats("Bridges are nice. Bridges are nice.", minilm)
    assert s == dict(distinct=0, in_format=0.0, words=6, repeats=1.0)


def test_the_threshold_is_calibrated_on_training_pairs(minilm):
    items = harness.data.load_situations(om.Config.train_data)[:10]
    t, bal, n_pos, n_neg = study.calibrated_threshold(minilm, items)
    assert (
        0 < t < 1
        and bal > 0.5
        and n_pos == sum(1 for s in items for p in s.perspectives if p.paraphrase)
    )


def test_the_smoke_study_runs_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "study"
    r = study.main(["--smoke", "--model", tiny_model_dir, "--out", str(out), "--styles", "bare"])
    rows = {
        f"{m} {st}"
        for m in ("base", "sft", "seed0", "seed1", "seed mean")
        for st in ("implicit", "bare")
    }
    assert set(r["means"]) == rows | {"base explicit"}
    assert all(len(v) == 4 for v in r["per_situation"]["sft implicit"].values())  # 4 situations
    answers = [json.loads(line) for line in open(out / "answers.jsonl")]
    # per situation: base 2 + 2 (implicit, explicit), SFT and 2 seeds 4 each, and 2 of each of the 4 in "bare"
    assert len(answers) == 4 * (2 + 2 + 3 * 4 + 4 * 2)
    assert len({(a["row"], a["prompt"], a["id"], a["sample"]) for a in answers}) == len(answers)
    for g in ("seed0", "seed1"):
        assert [row["step"] for row in r["training"][g]] == [1, 2]
        assert all(
            {"zero_spread", "entropy", "coverage", "format"} <= set(row) for row in r["training"][g]
        )
    budget = r["why"]["noise_budget"]["coverage_stage1"]  # 4 answers: it is measured
    assert budget["se"] >= 0 and set(budget["by_answers"]) == {4, 8, 16, 32, 64}
    assert (
        r["verdict"].startswith("OP-GRPO - SFT Stage-1 coverage")
        and "with 4 answers" in r["verdict"]
    )
    text = open(out / "report.md").read()
    assert "sign-flip" in text and "| bare | SFT | 2 |" in text and "Verdict" in text
    assert os.path.isfile(out / "training.png")
    again = study.main(
        ["--smoke", "--model", tiny_model_dir, "--out", str(out), "--styles", "bare"]
    )
    assert again["means"] == r["means"]  # every stage is reused
    with pytest.raises(ValueError, match="--steps 3: the study in .* was run with 2"):
        study.main(["--smoke", "--model", tiny_model_dir, "--out", str(out), "--steps", "3"])


KILLED = """
import sys, time
sys.path.insert(0, {root!r})
import opgrpo_min, harness.data
from study import run as study
slow = opgrpo_min.sample_groups
def sample_groups(*a, **k):           # a block takes a second, so the kill lands between or within blocks
    time.sleep(1)
    return slow(*a, **k)
opgrpo_min.sample_groups = sample_groups
items = harness.data.load_situations({data!r})[:4]
gen = study.argparse.Namespace(seed=0, batch_size=2, max_new_tokens=4)
study.answer({path!r}, "sft", {model!r}, "implicit", items, 8, gen, {{}})
"""


def test_answering_survives_sigkill_and_a_rerun_makes_only_what_is_missing(
    tiny_model_dir, tmp_path
):
    import signal
    import subprocess
    import sys
    import time

    data = os.path.join(om.HERE, "data", "test.jsonl")
    straight, killed = str(tmp_path / "straight.jsonl"), str(tmp_path / "killed.jsonl")
    script = lambda path: KILLED.format(root=om.HERE, data=data, path=path, model=tiny_model_dir)
    subprocess.run([sys.executable, "-c", script(straight)], check=True, timeout=600)
    proc = subprocess.Popen([sys.executable, "-c", script(killed)])
    lines = lambda path: sum(1 for _ in open(path)) if os.path.exists(path) else 0
    deadline = time.time() + 300
    while lines(killed) < 4 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(killed, "a") as f:
        f.write('{"row": "sft", "prompt": "implic')  # as if the kill fell mid-write
    n_before = len(study.read_answers(killed))
    assert 4 <= n_before < 4 * 8  # killed after the first block, before the last
    subprocess.run([sys.executable, "-c", script(killed)], check=True, timeout=600)
    a, b = study.read_answers(straight), study.read_answers(killed)
    assert len(a) == 4 * 8 and a == b  # every answer once, the same as a straight run
    assert sum(1 for _ in open(killed)) == 4 * 8  # the torn line is gone, nothing is doubled


def test_the_smoke_curve_runs_end_to_end_and_goes_on_from_what_is_saved(tiny_model_dir, tmp_path):
    """study/curve.py at tiny settings: GRPO kept at steps 0, 1 and 2, each answered and paired against SFT; the
    training situations answered at 0 and 2; a rerun with one more kept step trains only the new range (--resume)
    and answers only the new row."""
    from study import curve

    out = tmp_path / "curve"
    r = curve.main(["--smoke", "--model", tiny_model_dir, "--out", str(out)])
    assert r["at"] == [0, 1, 2] and set(r["paired"]) == {"step1", "step2"}
    assert all(set(d) == set(study.METRICS) for d in r["paired"].values())
    assert [t["step"] for t in r["training"]] == [1, 2]
    assert set(r["training_set"]["means"]) == {0, 2}
    answers = [json.loads(line) for line in open(out / "answers.jsonl")]
    # per held-out situation (4): 2 answers each of sft, step1, step2; per training situation (4): 2 at 0 and 2
    assert len(answers) == 4 * 3 * 2 + 4 * 2 * 2
    assert os.path.isfile(out / "curve.png") and "sign-flip" in open(out / "curve.md").read()
    again = curve.main(["--smoke", "--model", tiny_model_dir, "--out", str(out), "--at", "0,1,2,3"])
    assert [t["step"] for t in again["training"]] == [1, 2, 3]
    assert again["training"][:2] == r["training"]  # the run went on: the steps before are the same
    assert again["means"]["step2"] == r["means"]["step2"]  # kept answers are not made again
    with pytest.raises(ValueError, match="--lr 0.001: the curve in .* was made with 5e-06"):
        curve.main(["--smoke", "--model", tiny_model_dir, "--out", str(out), "--lr", "0.001"])
