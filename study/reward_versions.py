"""How much a change to reward.py moves the reward of real answers: a study's answers scored by reward.py at an
earlier git revision and by reward.py as it is now, with the study's Stage-1 estimator (docs/study.md):

    python study/reward_versions.py --study runs/study_powered --row sft --old 662f616
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the core modules live one folder up
    sys.path.insert(0, ROOT)
import numpy as np

import harness.cli
import harness.data
import harness.models
import opgrpo_min as om
import reward


def reward_at(revision):
    """reward.py as it was at a git revision, imported as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:reward.py"], cwd=ROOT, capture_output=True, text=True
    )
    if source.returncode:
        raise ValueError(
            f"--old {revision}: git cannot show reward.py there ({source.stderr.strip()})"
        )
    with tempfile.TemporaryDirectory() as folder:  # the module is read once, at exec_module
        path = os.path.join(folder, "reward_then.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source.stdout)
        spec = importlib.util.spec_from_file_location("reward_then", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def main(argv=None):
    p = harness.cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--study", required=True, help="a study/run.py output folder (answers.jsonl and sim/)"
    )
    p.add_argument(
        "--row", default="sft", help="whose answers: base, sft, seed0, ... (default sft)"
    )
    p.add_argument("--old", required=True, help="the git revision to compare with")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.70, 0.547])
    args = p.parse_args(argv)
    old = reward_at(args.old)
    items = {
        s.id: s for s in harness.data.load_situations(os.path.join(ROOT, "data", "test.jsonl"))
    }
    rows = [
        r
        for _, r in harness.data.read_jsonl(os.path.join(args.study, "answers.jsonl"), "answers")
        if r["row"] == args.row and r["prompt"] == "implicit"
    ]
    embedder = harness.models.load_embedder(os.path.join(args.study, "sim"))
    answers, refs = [r["answer"] for r in rows], [om.reference_answer(items[r["id"]]) for r in rows]
    situations = [items[r["id"]].situation for r in rows]
    for t in args.thresholds:
        then = old.score_answers(
            answers, refs, embedder, situations=situations, coverage_threshold=t
        )
        now = reward.score_answers(
            answers, refs, embedder, situations=situations, coverage_threshold=t
        )
        d = np.array([b.total - a.total for a, b in zip(then, now)])
        moved = np.abs(d) > 1e-9
        why = {}
        for text, m in zip(answers, moved):
            if m:
                layout = (
                    re.search(r"</core\s+perspectives>", text, re.I)
                    and reward.tag_reward(text) != 0
                )
                key = (
                    "a closed core block outside the strict layout"
                    if layout
                    else "stopwords or another layout"
                )
                why[key] = why.get(key, 0) + 1
        those = d[moved] if moved.any() else np.zeros(1)
        print(
            f"threshold {t}: {len(rows)} {args.row} answers, {moved.sum()} ({moved.mean():.0%}) changed reward, in "
            f"{len({r['id'] for r, m in zip(rows, moved) if m})} of {len(items)} situations; mean change of those "
            f"{those.mean():+.3f} (mean |change| {np.abs(those).mean():.3f}), of all {d.mean():+.3f}; {why}"
        )


if __name__ == "__main__":
    harness.cli.run_cli(main)
