"""The teacher's side of docs/assignments.md (teach/run.py leaves this file out of student copies):

    python teach/measure.py mistakes                  # exercise 1: what grade gives typical mistakes
    python teach/measure.py exercise-answers --study runs/study_powered   # exercises 3 and 4: their data

The students' measurements are in teach/probe.py (toy, sampler, threshold, uniqueness); exercise 2's hidden mutants
come from teach/mutants.py; the in-class demo's planted bugs are in teach/planted_bugs.json (make --plant SEED).
"""

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import harness.data
import harness.runs
from teach import run as teach

MISTAKES = {  # exercise 1: what a student might write, and what grade gives it: (script, text, its replacement)
    "sample std (torch's default)": ("opgrpo_min.py", "unbiased=False, ", ""),
    "no dual clip": ("opgrpo_min.py", "if dual_clip:", "if False:"),
    "KL of (new - ref) instead of (ref - new)": (
        "opgrpo_min.py",
        "(ref_logp - logp)",
        "(logp - ref_logp)",
    ),
    "eq. 3's per-answer mean (the recipe takes the token-mean)": (
        "opgrpo_min.py",
        ".sum() / num_tokens",
        ".sum(1).div(mask.sum(1).clamp(min=1)).mean()",
    ),
    "clip_frac counts every clipped ratio": (
        "opgrpo_min.py",
        "((ratio > 1 + clip_eps) & (A > 0)) | ((ratio < 1 - clip_eps) & (A < 0))",
        "(ratio > 1 + clip_eps) | (ratio < 1 - clip_eps)",
    ),
}


def mistakes(args):
    """Copies with group_advantages and grpo_loss blanked, written back as the reference with one mistake each."""
    t0 = time.time()
    reference = open(os.path.join(HERE, "opgrpo_min.py")).read()
    for label, (script, old, new) in {
        "the reference (no mistake)": ("opgrpo_min.py", "", ""),
        **MISTAKES,
    }.items():
        if old and reference.count(old) != 1:
            sys.exit(
                f"{script} holds {reference.count(old)} copies of {old!r}, not 1: update the mistake"
            )
        with tempfile.TemporaryDirectory() as tmp:
            copy = os.path.join(tmp, "copy")
            teach.make(["group_advantages", "grpo_loss"], copy)
            with open(os.path.join(copy, script), "w") as f:
                f.write(reference.replace(old, new) if old else reference)
            rows, _ = teach.grade(copy, ["group_advantages", "grpo_loss"])
        failing = [
            f"{case.split('::')[1]} ({why.split(': ', 1)[-1][:60]})"
            for r in rows
            for case, why in r["failed"]
        ]
        print(
            f"{label:<42} "
            + "; ".join(
                f"{r['function']} {r['passed']}/{r['cases']} = {r['points']:.1f}/{r['of']}"
                for r in rows
            )
            + f" | failing: {'; '.join(failing) or '-'}",
            flush=True,
        )
    print(f"({time.time() - t0:.0f} s)")


def exercise_answers(args):
    """data/exercise_answers.jsonl: the study's answers of SFT and OP-GRPO seed 0 to the held-out situations, the
    first 4 of each in the implicit prompt, the file the students' teach/probe.py threshold and uniqueness read."""
    rows = [
        r
        for _, r in harness.data.read_jsonl(os.path.join(args.study, "answers.jsonl"), "answers")
        if r["row"] in ("sft", "seed0") and r["prompt"] == "implicit" and r["sample"] < 4
    ]
    keep = ("row", "id", "sample", "answer")
    harness.runs.write_text(
        args.out, "".join(json.dumps({k: r[k] for k in keep}) + "\n" for r in rows)
    )
    print(f"wrote {len(rows)} answers to {args.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("mistakes", help="grade typical mistakes in group_advantages and grpo_loss")
    e = sub.add_parser("exercise-answers", help="the answers file exercises 3 and 4 measure")
    e.add_argument("--study", required=True, help="a study/run.py output folder")
    e.add_argument("--out", default=os.path.join(HERE, "data", "exercise_answers.jsonl"))
    args = p.parse_args(argv)
    {"mistakes": mistakes, "exercise-answers": exercise_answers}[args.what](args)


if __name__ == "__main__":
    main()
