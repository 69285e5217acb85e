"""Plots and tables the scripts write into their run folders (matplotlib is optional: without it, a note). A reader
of the method may skip this file: it holds no rule of the paper."""

import os
import sys

import numpy as np

from harness.runs import replaced, write_text


def pyplot(png):
    """matplotlib.pyplot drawing to files, or None with a note that `png` is skipped (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print(
            f"[plot] matplotlib is not installed: no {png} (pip install matplotlib)",
            file=sys.stderr,
        )


def save_figure(plt, fig, path, dpi=120):
    """fig as a PNG at `path`, replaced whole (see replaced), then closed."""
    with replaced(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_rewards(out, rows):
    """out/reward_curve.png: the mean reward and each term per step; below, the learning signal: the share of groups
    whose G rewards are all equal (no advantage, no gradient) and the mean entropy of the sampled tokens."""
    plt = pyplot("reward_curve.png")
    if plt is None:
        return
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(6, 5.5), sharex=True)
    steps = [r["step"] for r in rows]
    labels = dict(
        zero_spread="share of zero-spread groups", entropy="entropy of sampled tokens (nats)"
    )
    for axis, keys in (
        (ax, ("reward", "coverage", "uniqueness", "format", "tag")),
        (bx, ("zero_spread", "entropy")),
    ):
        for key in (k for k in keys if k in rows[0]):
            axis.plot(steps, [r[key] for r in rows], label=labels.get(key, key))
        axis.legend(fontsize=7, ncol=3 if axis is ax else 1)
    ax.set_ylabel("mean over answers"), bx.set_xlabel("GRPO step"), fig.tight_layout()
    save_figure(plt, fig, os.path.join(out, "reward_curve.png"))


def report_rows(results, items, summarize):
    """One row per (model, prompt, metric) x stratum ('all', then each number of reference perspectives): the
    summary (`summarize`, eval_nli's) of the scores of that stratum's situations."""
    strata = ["all"] + sorted({len(s.perspectives) for s in items})
    return [
        dict(
            model=model,
            prompt=prompt,
            metric=metric,
            stratum=k,
            **summarize([x for x, s in zip(scores, items) if k in ("all", len(s.perspectives))]),
        )
        for (model, prompt, metric), scores in results.items()
        for k in strata
    ]


def write_report(rows, notes, out, threshold):
    """out/results.csv (every statistic of every stratum), out/results.md (printed too) and out/accuracy.png."""
    import pandas as pd

    write_text(os.path.join(out, "results.csv"), pd.DataFrame(rows).to_csv(index=False))
    table = markdown_table(rows, notes)
    print(table)
    write_text(os.path.join(out, "results.md"), table + "\n")
    plot_accuracy(rows, os.path.join(out, "accuracy.png"), threshold)


def markdown_table(rows, notes):
    """The notes, the overall table, and Accuracy per stratum (the CSV has every statistic of every stratum)."""
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"
    system = lambda r: [r["model"], r["prompt"], r["metric"]]
    main = [r for r in rows if r["stratum"] == "all"]
    strata = {r["stratum"]: r["n"] for r in rows if r["stratum"] != "all"}
    acc = {(*system(r), r["stratum"]): r["accuracy"] for r in rows}
    md = notes + [
        "",
        line(["model", "prompt", "metric", "n", "mean", "std", "se", "accuracy"]),
        "|" + "---|" * 8,
    ]
    md += [
        line(system(r) + [r["n"]] + [f"{r[k]:.3f}" for k in ("mean", "std", "se", "accuracy")])
        for r in main
    ]
    md += [
        "",
        f"Accuracy by number of reference perspectives (situations: "
        f"{', '.join(f'{k}: {n}' for k, n in strata.items())})",
        "",
    ]
    md += [line(["model", "prompt", "metric", *strata]), "|" + "---|" * (3 + len(strata))]
    md += [line(system(r) + [f"{acc[(*system(r), k)]:.2f}" for k in strata]) for r in main]
    return "\n".join(md)


def plot_accuracy(rows, path, threshold):
    """Accuracy per (model, prompt), a bar per metric, error bar sqrt(p (1 - p) / n); without matplotlib, a note."""
    plt = pyplot(os.path.basename(path))
    if plt is None:
        return
    main = {(r["model"], r["prompt"], r["metric"]): r for r in rows if r["stratum"] == "all"}
    metrics, systems = (
        list(dict.fromkeys(k[2] for k in main)),
        list(dict.fromkeys(k[:2] for k in main)),
    )
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(main), 3.8))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        p, n = np.array(
            [[main[(*s, metric)][x] for x in ("accuracy", "n")] for s in systems]
        ).T  # [n_systems] each
        ax.bar(
            np.arange(len(systems)) + k * width,
            p,
            width,
            yerr=np.sqrt(p * (1 - p) / n),
            label=metric,
            capsize=3,
        )
    ax.set_xticks(
        np.arange(len(systems)) + 0.4 - width / 2, [f"{m}\n{p}" for m, p in systems], fontsize=7
    )
    ax.set_ylabel(f"Accuracy (score > {threshold})"), ax.set_ylim(0, 1), ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(plt, fig, path)
