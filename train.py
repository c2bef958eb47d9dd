"""Training AUSM: teacher-forced parallel training over time (paper Sec. 2.3, Alg. 2; Sec. 3 details).

Read beside the paper. One iteration:
  preprocess  every ground-truth instance i gets one ID vector (a distinct random row of B) and a switch
              time t_i: a detection target at frames t <= t_i, a tracking target after; its ground-truth
              mask enters the history from t_i on (the History Marker paints it at step t_i + 1).
  model       all T frames at once: one selective scan over time in the History Compressor (parallel form).
  criterion   L = L_trk + L_det, Mask2Former losses with deep supervision over every decoder layer:
              L_trk with the fixed ID <-> instance mapping, L_det with Hungarian matching per frame.
Stages (Sec. 3): 1) 3-frame pseudo-videos of still scenes, 2) 5-frame videos from the stage-1 weights,
3) 16-frame videos with the image backbone frozen. `--iterative` trains the same model frame by frame
through model.step (the SAM2-style baseline of Fig. 4); `--benchmark` times both forms (Fig. 4).

What differs from the paper (see ../shared/AUSM.md, [D] = our decision):
  - t_i is uniform over the frames where i is visible; prompted samples (class-agnostic VOS datasets and
    synthetic, a clip is prompted with prob. 0.5) give t_i = 0 with prob. 0.5 to objects visible in frame 1:
    their frame-1 mask is painted on X_0 (history[:, 0]).
  - Losses on the full stride-4 mask (no point sampling); targets area-downsampled to H/4 (soft values);
    one foreground logit for every dataset plus the dataset's class head where it has classes.
  - Loss normalisers (weighted query counts, number of masks) are summed over DDP ranks, so N ranks give
    exactly the gradients of one process on the combined batch.
  - Tiny preset: small model from scratch, higher lr, short schedule; the paper preset keeps lr 1e-4,
    batch 16, 147.5k / 32k / 40k iterations (we cannot load COCO Mask2Former weights).
  - --resume replays the data stream up to the saved step (exact, simple; slow for huge step counts).
Left out: the VITA-style augmentation (data.py makes the clips), mixed-dataset batches (one dataset
per batch), Mask2Former's point sampling and backbone lr multiplier.
"""
import argparse
import dataclasses
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

W_CLS, W_BCE, W_DICE, NO_OBJECT_WEIGHT = 2.0, 5.0, 5.0, 0.1  # Mask2Former's loss weights
STAGE_FRAMES = {1: 3, 2: 5, 3: 16}


# ----------------------------------------------------------------------------- Hungarian matching
def hungarian(cost):
    """Minimum-cost assignment (what scipy's linear_sum_assignment does), shortest augmenting paths, O(n^2 m).

    cost (n, m) -> (rows, cols): min(n, m) pairs, rows ascending, each row and each column used once."""
    C = np.asarray(cost, dtype=np.float64)
    if C.ndim != 2:
        raise ValueError(f"hungarian: cost must be a 2-D matrix, got shape {C.shape}")
    if not np.isfinite(C).all():
        raise ValueError("hungarian: cost contains nan or inf; check the predictions that built it")
    transposed = C.shape[0] > C.shape[1]
    if transposed:
        C = C.T  # (n, m) with n <= m: every row gets a column
    n, m = C.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)  # dual potentials of rows / columns (index 0 = virtual)
    p = np.zeros(m + 1, dtype=np.int64)  # p[j] = row (1-based) matched to column j, 0 = free
    way = np.zeros(m + 1, dtype=np.int64)  # previous column on the shortest path
    for i in range(1, n + 1):  # add row i, find a shortest augmenting path from it
        p[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = C[i0 - 1] - u[i0] - v[1:]  # (m,) reduced costs from row i0
            better = ~used[1:] & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            free = np.flatnonzero(~used[1:]) + 1
            j1 = free[np.argmin(minv[free])]
            delta = minv[j1]
            u[p[used]] += delta  # keep the reduced costs of the tree's edges at zero
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:  # reached a free column: augment
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.flatnonzero(p[1:]) # matched columns (0-based)
    rows = p[1:][cols] - 1
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]
