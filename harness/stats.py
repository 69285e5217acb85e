"""Paired statistics over situations, shared by study/run.py and eval_judge.py (no core script imports this)."""

import numpy as np


def paired(a, b, n_boot=10000, seed=0):
    """Mean of the per-situation differences a - b, its 95 % bootstrap interval (situations resampled), and the
    two-sided p-value of a paired sign-flip permutation test (H0: the difference is symmetric around 0).

    >>> r = paired([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0]); r["mean"], r["p"]
    (1.0, 0.125)
    """
    d = np.asarray(a, float) - np.asarray(b, float)  # [n]
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)  # [n_boot]
    if len(d) <= 16:  # every sign pattern: the exact test
        signs = np.array(np.meshgrid(*[[1, -1]] * len(d))).reshape(len(d), -1).T  # [2^n, n]
    else:
        signs = rng.choice([1, -1], (n_boot, len(d)))  # [n_boot, n]
    null = np.abs((signs * d).mean(1))
    p = float((null >= abs(d.mean()) - 1e-12).mean())
    return dict(
        mean=float(d.mean()),
        lo=float(np.percentile(boot, 2.5)),
        hi=float(np.percentile(boot, 97.5)),
        p=p,
    )
