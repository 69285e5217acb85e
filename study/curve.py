"""The learning curve: does more GRPO move held-out coverage at 135M?

    python study/curve.py --out runs/curve                 # steps 0 (SFT), 12, 50, 100, 150 of one run
    python study/curve.py --out runs/curve --at 0,12,50,100,150,200,300    # further (a rerun goes on)
    python study/curve.py --smoke --out runs/curve_smoke   # the same pipeline at tiny settings (CI runs it)
    python study/curve.py --out runs/curve --confirm 50    # seeds 1 and 2 to step 50 too, as the study does

The powered study's design (study/run.py): Stage 1, the SFT warm start (one epoch), GRPO from it with the reward
threshold 0.547, 2 prompts x G 4 per step, 160 new tokens; here one GRPO run (seed 0) is continued step range by
step range (--resume) and its policy kept at each step of --at. At each kept step: --answers answers to each
held-out situation (implicit prompt, temperature 0.7, top_p 0.9), scored as the study scores them and paired
against step 0 (SFT): bootstrap interval and sign-flip p per metric. Also the training reward and its terms per
step, and --train-answers answers to each training situation at step 0 and at the last step (does it learn the
prompts it trains on?). Everything is kept as it is made: a rerun goes on from what is saved, losing at most the
answers in flight and the steps since the run's last checkpoint (every 10 steps). Writes OUT/curve.json, curve.md
and curve.png.
"""

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the core lives one folder up
    sys.path.insert(0, ROOT)

import harness.cli
import harness.data
import harness.models
import harness.report
import harness.runs
import opgrpo_min as om
import sim_train
from harness.stats import paired
from study.run import METRICS, answer, calibrated_threshold, per_answer, read_answers

FULL = dict(
    sft_steps=31,
    prompts_per_step=2,
    group_size=4,
    max_new_tokens=160,
    lr=5e-6,
    coverage_threshold=0.547,
    answers=16,
    train_answers=4,
    eval_tokens=160,
    sim_epochs=2,
    situations=None,
)
SMOKE = dict(FULL, sft_steps=2, group_size=2, max_new_tokens=8, answers=2, train_answers=2)
SMOKE.update(eval_tokens=8, sim_epochs=1, situations=4)
AT = dict(full="0,12,50,100,150", smoke="0,1,2")
SAVE_EVERY = 10  # the run's checkpoints: a stop loses at most this many steps
SHOWN = ("coverage_stage1", "coverage_stage1_at_t", "coverage_minilm", "distinct", "repeats")


def keep_policy(run_dir, step, dest):
    """Copy the model of run_dir's checkpoint (at `step`) to dest: the policy of that point of the curve."""
    ckpt = os.path.join(run_dir, "checkpoint")
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
        assert json.load(f)["step"] == step, f"{ckpt} is not at step {step}"
    model = [f for f in os.listdir(ckpt) if not f.startswith("trainer_state")]
    copy = lambda tmp: [shutil.copy2(os.path.join(ckpt, f), tmp) for f in model]
    harness.runs.atomic_save(dest, copy)


def train_to(run_dir, step, fresh, log):
    """GRPO of run_dir continued to `step`: a fresh run (`fresh`: its flags) when nothing of it is saved, else
    --resume, which goes on from its last checkpoint (or its saved SFT model) exactly as a straight run would."""
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        log(f"GRPO {run_dir}: on to step {step}")
        om.main(["--resume", run_dir, "--steps", str(step)])
    else:
        log(f"GRPO {run_dir}: from the start to step {step}")
        om.main(fresh + ["--steps", str(step), "--out", run_dir])


def check_settings(out, S, args):
    """The knobs of a curve are recorded in OUT/settings.json when it starts; a rerun into the same OUT keeps them
    (only --at and --confirm may change: they add steps and seeds)."""
    fixed = dict(
        S, model=args.model, sim_base=args.sim_base, seed=args.seed, batch_size=args.batch_size
    )
    fixed.update(
        train_data=os.path.abspath(args.train_data), test_data=os.path.abspath(args.test_data)
    )
    path = os.path.join(out, "settings.json")
    saved = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else fixed
    changed = next((k for k, v in fixed.items() if k in saved and saved[k] != v), None)
    if changed:
        raise ValueError(
            f"--{changed.replace('_', '-')} {fixed[changed]}: the curve in {out} was made with "
            f"{saved[changed]}, and a rerun keeps it (only --at and --confirm may change); use another --out"
        )
    harness.runs.write_text(path, json.dumps(fixed, indent=1))


def run(args):
    S = dict(SMOKE if args.smoke else FULL)
    S.update({k: v for k, v in vars(args).items() if k in FULL and v is not None})
    at = sorted({int(x) for x in (args.at or AT["smoke" if args.smoke else "full"]).split(",")})
    if at[0] != 0 or len(at) < 2:
        raise ValueError(
            f"--at {args.at}: the steps to keep start at 0 (SFT) and hold one more at least"
        )
    if args.confirm is not None and args.confirm not in at[1:]:
        raise ValueError(
            f"--confirm {args.confirm}: confirm a step the curve keeps (--at {','.join(map(str, at))})"
        )
    train_items = harness.data.load_situations(args.train_data)  # every input first
    test_items = harness.data.load_situations(args.test_data)[: S["situations"]]
    train_probe = train_items[: S["situations"]]
    out, t0 = args.out, time.time()
    harness.runs.claim_out_dir(out)
    check_settings(out, S, args)
    timings_path = os.path.join(out, "timings.json")
    timings = json.load(open(timings_path)) if os.path.isfile(timings_path) else {}
    log = lambda msg: print(f"[curve {time.time() - t0:6.0f} s] {msg}", flush=True)

    def timed(stage, fn, *a):
        t = time.time()
        result = fn(*a)
        if time.time() - t > 1:  # a stage that was already done costs nothing and keeps its time
            timings[stage] = timings.get(stage, 0) + round(time.time() - t)
            harness.runs.write_text(timings_path, json.dumps(timings, indent=1))
        return result

    # ---- Stage 1, as the study does it
    sim_dir = os.path.join(out, "sim")
    if not os.path.isfile(os.path.join(sim_dir, "sim_eval.json")):
        again = ["--overwrite"] if os.path.isdir(sim_dir) else []
        sim_argv = ["--data", args.train_data, "--out", sim_dir, "--epochs", str(S["sim_epochs"])]
        timed("stage 1 (sim_train)", sim_train.main, sim_argv + again)
    stage1 = harness.models.load_embedder(sim_dir)
    minilm = harness.models.load_embedder(args.sim_base)
    threshold = calibrated_threshold(minilm, train_items)[0]

    # ---- GRPO seed 0, step range by step range, each kept step answered before the next range trains
    common = ["--train-data", args.train_data, "--sim-model", sim_dir, "--device", "cpu"]
    common += [
        "--prompts-per-step",
        str(S["prompts_per_step"]),
        "--group-size",
        str(S["group_size"]),
    ]
    common += ["--max-new-tokens", str(S["max_new_tokens"]), "--lr", str(S["lr"])]
    common += ["--coverage-threshold", str(S["coverage_threshold"]), "--sample-every", "0"]
    common += ["--save-every", str(SAVE_EVERY)]
    sft = os.path.join(out, "grpo_seed0", "sft")  # seed 0 makes it; seeds 1 and 2 start from it
    answers_path = os.path.join(out, "answers.jsonl")
    gen = argparse.Namespace(
        seed=args.seed, batch_size=args.batch_size, max_new_tokens=S["eval_tokens"]
    )
    source, loaded = {}, {}

    def answered(row, path, items, n):
        made = timed(
            f"answers: {row}", answer, answers_path, row, path, "implicit", items, n, gen, loaded
        )
        log(f"answers of {row}: {made} new")

    for k in [0] + ([1, 2] if args.confirm else []):
        if k == 0:
            start = (["--model", args.model] if args.model else []) + [
                "--sft-steps",
                str(S["sft_steps"]),
            ]
        else:
            start = ["--model", sft, "--sft-steps", "0"]
        for step in at[1:] if k == 0 else [args.confirm]:
            kept = os.path.join(out, f"policy_seed{k}_step{step}")
            if not os.path.isfile(os.path.join(kept, "config.json")):
                run_dir, fresh = (
                    os.path.join(out, f"grpo_seed{k}"),
                    common + start + ["--seed", str(k)],
                )
                timed(f"GRPO seed {k} to step {step}", train_to, run_dir, step, fresh, log)
                keep_policy(run_dir, step, kept)
            if "sft" not in source:  # step 0: the SFT model seed 0 trained first
                source["sft"] = sft
                answered("sft", sft, test_items, S["answers"])
            source[row_name(k, step)] = kept
            answered(row_name(k, step), kept, test_items, S["answers"])
    for step in (0, at[-1]):  # the training situations: does it learn the prompts it trains on?
        answered(
            f"train@{row_name(0, step)}", source[row_name(0, step)], train_probe, S["train_answers"]
        )
    loaded.clear()

    # ---- scores, paired differences against SFT, the report
    t_score, have = time.time(), read_answers(answers_path)

    def values(row, items, n):
        rows = [have[(row, "implicit", s.id, j)] for s in items for j in range(n)]
        v = per_answer(rows, items, stage1, minilm, threshold, S["coverage_threshold"])
        return {m: [float(np.mean(x)) for x in per] for m, per in v.items()}  # per situation

    held = {row: values(row, test_items, S["answers"]) for row in source}
    at_sft = held["sft"]
    points = {
        row: {m: paired(v[m], at_sft[m]) for m in METRICS}
        for row, v in held.items()
        if row != "sft"
    }
    means = {row: {m: float(np.mean(x)) for m, x in v.items()} for row, v in held.items()}
    trained = {
        s: values(f"train@{row_name(0, s)}", train_probe, S["train_answers"]) for s in (0, at[-1])
    }
    train_gain = {m: paired(trained[at[-1]][m], trained[0][m]) for m in METRICS}
    metrics = os.path.join(out, "grpo_seed0", "metrics.jsonl")
    training = [json.loads(line) for line in open(metrics, encoding="utf-8")]
    confirm = None
    if args.confirm:
        rows = [row_name(k, args.confirm) for k in (0, 1, 2)]
        mean = {m: list(np.mean([held[r][m] for r in rows], 0)) for m in METRICS}
        confirm = dict(step=args.confirm, paired={m: paired(mean[m], at_sft[m]) for m in METRICS})
    timings["scoring and report"] = round(time.time() - t_score)
    result = dict(settings=S, at=at, threshold_minilm=threshold, means=means, paired=points)
    result.update(
        training_set=dict(
            means={s: {m: float(np.mean(x)) for m, x in v.items()} for s, v in trained.items()},
            paired=train_gain,
        )
    )
    result.update(confirm=confirm, training=training, timings=timings, per_situation=held)
    harness.runs.write_text(os.path.join(out, "curve.json"), json.dumps(result, indent=1))
    text = report(result)
    harness.runs.write_text(os.path.join(out, "curve.md"), text)
    plot(os.path.join(out, "curve.png"), result)
    log(f"done: {out}/curve.md, curve.png")
    print(text)
    return result


def row_name(seed, step):
    """The answers' row of a kept policy: 'sft' for step 0, else 'step50' (seed 0) or 'seed1 step50'."""
    if step == 0:
        return "sft"
    return f"step{step}" if seed == 0 else f"seed{seed} step{step}"


def report(r):
    """The curve as markdown: per kept step, each metric's mean and its paired difference against SFT."""
    cell = lambda d: f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] p {d['p']:.3f}"
    steps = [row_name(0, s) for s in r["at"]]
    head = "| step | " + " | ".join(SHOWN) + " |\n|---|" + "---|" * len(SHOWN) + "\n"
    text = f"Settings: {json.dumps(r['settings'])}; kept steps {r['at']}.\n\n"
    text += (
        f"Stage times (s): {json.dumps(r['timings'])}\n\nMeans over the held-out situations\n\n"
        + head
    )
    for row in steps:
        text += f"| {row} | " + " | ".join(f"{r['means'][row][m]:.3f}" for m in SHOWN) + " |\n"
    text += (
        "\nStep - SFT, paired over the held-out situations: mean [95 % interval], sign-flip p\n\n"
        + head
    )
    for row in steps[1:]:
        text += f"| {row} | " + " | ".join(cell(r["paired"][row][m]) for m in SHOWN) + " |\n"
    last = r["at"][-1]
    text += f"\nTraining situations, step {last} - SFT: " + "; ".join(
        f"{m} {cell(r['training_set']['paired'][m])}" for m in SHOWN[:3]
    )
    q = max(1, min(10, len(r["training"]) // 4))
    first, final = (
        np.mean([x["reward"] for x in part]) for part in (r["training"][:q], r["training"][-q:])
    )
    text += f"\n\nTraining reward: mean of the first {q} steps {first:.3f}, of the last {q} {final:.3f}\n"
    if r["confirm"]:
        c = r["confirm"]
        text += f"\nSeeds 0-2 at step {c['step']}, seed mean - SFT: " + "; ".join(
            f"{m} {cell(c['paired'][m])}" for m in SHOWN[:3]
        )
    return text + "\n"


def plot(png, r):
    """Top: held-out coverage (Stage-1 estimator, at 0.70 and at the reward's threshold) at each kept step, SFT's
    value plus the paired difference with its 95 % interval, SFT as a line. Bottom: the training reward and its
    terms per GRPO step (thin), with a 10-step running mean (thick)."""
    plt = harness.report.pyplot(os.path.basename(png))
    if plt is None:
        return
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    steps = r["at"][1:]
    for m, color in (("coverage_stage1", "C0"), ("coverage_stage1_at_t", "C1")):
        base = r["means"]["sft"][m]
        d = [r["paired"][row_name(0, s)][m] for s in steps]
        y = [base + x["mean"] for x in d]
        err = [[x["mean"] - x["lo"] for x in d], [x["hi"] - x["mean"] for x in d]]
        name = "Stage-1 coverage at 0.70" if m == "coverage_stage1" else "at the reward's threshold"
        ax.errorbar(steps, y, yerr=err, fmt="o-", color=color, capsize=3, label=name)
        ax.axhline(base, color=color, ls="--", lw=1, label=f"SFT ({name.split(' at ')[-1]})")
    ax.set_ylabel("held-out coverage (95 % paired interval)")
    ax.legend(fontsize=7)
    x = [t["step"] for t in r["training"]]
    for key in ("reward", "coverage", "uniqueness", "format", "tag"):
        if key in r["training"][0]:
            y = np.array([t[key] for t in r["training"]])
            line = bx.plot(x, y, lw=0.6, alpha=0.5)[0]
            run = np.convolve(y, np.ones(10) / 10, mode="valid") if len(y) >= 10 else y
            bx.plot(x[len(x) - len(run) :], run, color=line.get_color(), lw=1.8, label=key)
    bx.set_xlabel("GRPO step")
    bx.set_ylabel("training reward and terms")
    bx.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    harness.report.save_figure(plt, fig, png, dpi=110)


def parse_args(argv=None):
    p = harness.cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--smoke", action="store_true", help="tiny settings: the pipeline, not a result")
    p.add_argument(
        "--out", default="runs/curve", help="everything; what is there is not made again"
    )
    p.add_argument(
        "--at", help=f"GRPO steps to keep and answer (default {AT['full']}; smoke {AT['smoke']})"
    )
    p.add_argument(
        "--confirm", type=int, help="also train seeds 1 and 2 to this step of --at, and answer"
    )
    p.add_argument(
        "--model", help="policy: hub id or local dir (default: the embedded SmolLM2-135M)"
    )
    p.add_argument(
        "--sim-base", help="the untuned Sentence Transformer (default: the embedded MiniLM)"
    )
    p.add_argument("--train-data", default=os.path.join(om.HERE, "data", "train.jsonl"))
    p.add_argument("--test-data", default=os.path.join(om.HERE, "data", "test.jsonl"))
    for k, v in FULL.items():
        kind = float if isinstance(v, float) else int
        p.add_argument(
            "--" + k.replace("_", "-"), type=kind, help=f"default {v} ({SMOKE[k]} with --smoke)"
        )
    p.add_argument("--batch-size", type=int, default=16, help="situations per call when answering")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the answers")
    args = p.parse_args(argv)
    if args.batch_size < 1 or not 0 <= args.seed < 2**32:
        p.error("--batch-size must be >= 1 and --seed in [0, 2^32)")
    for k in ("model", "sim_base"):
        harness.models.check_model_path(getattr(args, k), "--" + k.replace("_", "-"))
    return args


def main(argv=None):
    args = parse_args(argv)
    with harness.runs.lock_run_folder(args.out):  # one process per --out, for the whole run
        return run(args)


if __name__ == "__main__":
    harness.cli.run_cli(main)
