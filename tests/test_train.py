"""Tests for train.py: matcher vs brute force, preprocess invariants, losses with known optima, the
parallel == iterative equivalence, overfitting, resume, NaN, frozen backbone, and a 2-process DDP run."""
import itertools

import numpy as np
import pytest
import torch

import train


def brute_force(C):
    n, m = C.shape
    best = np.inf
    if n <= m:
        for cols in itertools.permutations(range(m), n):
            best = min(best, C[np.arange(n), list(cols)].sum())
    else:
        for rows in itertools.permutations(range(n), m):
            best = min(best, C[list(rows), np.arange(m)].sum())
    return best


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 5), (6, 6), (2, 5), (5, 2), (3, 6), (6, 4), (1, 4), (4, 1)])
def test_hungarian_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for trial in range(20):
        C = rng.normal(size=shape)
        if trial % 2:  # ties: few distinct values
            C = rng.integers(0, 3, size=shape).astype(float)
        rows, cols = train.hungarian(C)
        k = min(shape)
        assert len(rows) == len(cols) == k
        assert len(set(rows.tolist())) == k and len(set(cols.tolist())) == k
        assert np.all(np.diff(rows) > 0)
        assert C[rows, cols].sum() == pytest.approx(brute_force(C), abs=1e-9)


def test_hungarian_rejects_bad_input():
    with pytest.raises(ValueError):
        train.hungarian(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError):
        train.hungarian(np.zeros(3))
    r, c = train.hungarian(np.zeros((0, 3)))
    assert len(r) == len(c) == 0
