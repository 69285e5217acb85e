"""tools/ as a specification: the measurements students run in the teaching kit (teach/probe.py) run and report
what docs/assignments.md quotes; the converters are in test_cli.py's table and test_opgrpo_min.py."""

import json
import os

import pytest

import harness.cli
import harness.data
from teach import probe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_toy_run_reports_each_metric_per_step(capsys):
    probe.main(["toy", "--steps", "2"])
    out = capsys.readouterr().out
    for label in (
        "reward per step:",
        "KL to the start per step:",
        "sampling entropy (nats) per step:",
        "ratio per step:",
        "clipped share per step:",
    ):
        line = next(x for x in out.splitlines() if x.startswith(label))
        assert len(line[len(label) :].split()) == 2, line


def test_the_threshold_sweep_counts_groups_without_spread_by_hand(
    tmp_path, minilm, monkeypatch, capsys
):
    """Group A: 4 copies of the reference answer (equal rewards at any threshold); group B: the reference and 3
    answers of prose. Zero-spread groups 50 % at both thresholds; coverage differs in B at 0.5 (the reference matches
    itself, keywords masked) and nowhere at 1.01, where no perspective matches."""
    from opgrpo_min import reference_answer

    a, b = harness.data.load_situations(os.path.join(ROOT, "data", "test.jsonl"))[:2]
    rows = [dict(row="sft", id=a.id, sample=k, answer=reference_answer(a)) for k in range(4)]
    rows += [
        dict(
            row="sft",
            id=b.id,
            sample=k,
            answer=reference_answer(b) if k == 0 else "Just some prose.",
        )
        for k in range(4)
    ]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(harness.models, "load_embedder", lambda name=None, device=None: minilm)
    probe.main(["threshold", "--answers", str(path), "--thresholds", "0.5", "1.01"])
    out = capsys.readouterr().out
    assert "2 groups of answers (1 models x 2 situations)" in out
    rows = {
        line.split()[0]: line.split()[1:]
        for line in out.splitlines()
        if line.strip().startswith(("0.50", "1.01"))
    }
    assert rows["0.50"][:2] == ["50%", "50%"] and float(rows["0.50"][2]) > 0.2, out
    assert rows["1.01"] == ["50%", "0%", "0.000"], out


@pytest.mark.parametrize("argv", [["toy", "--steps", "x"], ["nothing"]])
def test_bad_input_is_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        harness.cli.run_cli(probe.main, argv)
    assert e.value.code != 0 and "\n" not in capsys.readouterr().err.strip()
