"""Speed of negkd compare's statistics: the vectorised hierarchical bootstrap and sign-flip test
against a plain per-replicate loop (numpy, one replicate at a time), side by side in one run.

    python bench/compare.py [--problems 5000] [--seeds 3] [--metrics 8] [--n-boot 2000]

Measured (2-core shared CPU, OMP_NUM_THREADS=1): bootstrap 0.64 s vectorised vs 6.62 s loop
(10.3x); sign-flip test 0.92 s vectorised vs 0.65 s loop (0.7x: the per-flip matrix-vector loop
is already BLAS-bound; the batched version pays for generating and converting the sign matrix).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from negkd.stats import hierarchical_bootstrap, sign_flip_test


def loop_bootstrap(x, y, n_boot, seed=0):
    """The textbook loop: per replicate draw seeds, then problems, and take the mean difference."""
    rng = np.random.default_rng(seed)
    s, p, _ = x.shape
    out = np.empty((n_boot, x.shape[2]))
    for b in range(n_boot):
        si = rng.integers(0, s, s)
        pi = rng.integers(0, p, p)
        out[b] = x[si][:, pi].mean(axis=(0, 1)) - y[si][:, pi].mean(axis=(0, 1))
    return out


def loop_signflip(d, n_perm, seed=0):
    rng = np.random.default_rng(seed)
    t = np.abs(d.sum(axis=0))
    hits = np.zeros(d.shape[1])
    for _ in range(n_perm):
        sg = rng.choice((-1.0, 1.0), size=d.shape[0])
        hits += np.abs(sg @ d) >= t
    return (1 + hits) / (1 + n_perm)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=5000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--metrics", type=int, default=8)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--loop-reps", type=int, default=200, help="replicates timed for the loop (extrapolated)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = (rng.random((a.seeds, a.problems, a.metrics)) < 0.55).astype(float)
    y = (rng.random((a.seeds, a.problems, a.metrics)) < 0.50).astype(float)
    t = time.perf_counter()
    hierarchical_bootstrap(x, y, n_boot=a.n_boot)
    vec = time.perf_counter() - t
    t = time.perf_counter()
    loop_bootstrap(x, y, a.loop_reps)
    loop = (time.perf_counter() - t) * a.n_boot / a.loop_reps
    print(f"bootstrap, {a.seeds} seeds x {a.problems} problems x {a.metrics} metrics, {a.n_boot} replicates: "
          f"vectorised {vec:.2f} s, loop {loop:.2f} s (extrapolated from {a.loop_reps}): {loop / vec:.1f}x")
    d = x.mean(axis=0) - y.mean(axis=0)
    t = time.perf_counter()
    sign_flip_test(d, n_perm=10_000)
    vec = time.perf_counter() - t
    t = time.perf_counter()
    loop_signflip(d, a.loop_reps * 5)
    loop = (time.perf_counter() - t) * 10_000 / (a.loop_reps * 5)
    print(f"sign-flip test, 10000 flips: vectorised {vec:.2f} s, loop {loop:.2f} s (extrapolated): {loop / vec:.1f}x")


if __name__ == "__main__":
    main()
