"""Training AUSM: teacher-forced parallel training over time (paper Sec. 2.3, Alg. 2; Sec. 3).

One iteration: `preprocess` gives every ground-truth instance i one ID vector (a distinct random row
of B) and a switch time t_i: a detection target at frames t <= t_i, a tracking target after, its
ground-truth mask in the history from t_i on. The model runs all T frames at once (one selective
scan over time). `criterion`: L = L_trk (fixed ID <-> instance mapping) + L_det (Hungarian matching
per frame), Mask2Former losses with deep supervision. Stages (Sec. 3): 1) 3-frame pseudo-videos of
stills, 2) 5-frame videos, 3) 16 frames, backbone frozen. `--iterative` trains frame by frame
through model.step (the SAM2-style baseline); `--benchmark` times both forms (Fig. 4).
What differs ([D] = our decision in PAPER.md):
  - [D] t_i uniform over the frames where i is visible; prompted clips (VOS datasets and synthetic,
    p 0.5) give t_i = 0 with prob. 0.5 to objects visible in frame 1 (y_1 painted on X_0).
  - Losses on the full stride-4 mask (no point sampling), targets area-downsampled to H/4 (soft);
    one foreground logit for every dataset plus the dataset's class head where it has classes.
  - An absent tracked object is "no object" with its mask supervised empty (PAPER.md Sec. 5):
    prompted output is unfiltered, and emptying absent objects' masks alone lifts a model's held-out
    J&F 0.754 -> 0.849 (measured).
  - The paper sums L over t; we average every term over its targets (queries, masks) in the batch as
    Mask2Former averages over images, so the scale does not grow with T. The normalisers are summed
    over DDP ranks: N ranks give exactly one process's gradients on the combined batch. Gradient
    norm clip 1.
  - Tiny preset: small model from scratch, higher lr, short schedule, 8-frame clips in stage 2,
    24-frame clips in stage 3 with more objects that leave and come back (see PRESETS).
  - Data and switch times restart from step-derived seeds at each checkpoint, so --resume is exact.
  - Ours, off by default: --history-gaps K leaves a tracked object out of the history for up to K
    frames after it returns and after a random frame (`unpainted`), the frames recurrent inference
    runs unpainted once it misses a mask: it taught the tiny model to track from memory (README
    "Long videos"; the paper's teacher forcing paints every visible tracked object).
  - Ours: --average writes the mean of several runs' weights (`average_weights`, a model soup);
    the average of five long-clip stage-3 runs kept AP at 256 frames best (README "Long videos").
Left out: the VITA-style augmentation (data.py makes the clips), mixed-dataset batches (one dataset
per batch), Mask2Former's point sampling and backbone lr multiplier, --iterative under torchrun.
Shapes: b = clips in the batch (B is the paper's ID buffer), P = deep-supervision predictions,
Q = N + Nd queries (N tracking slots, Nd detection queries), h, w = H/4, W/4.
"""
import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import ausm
import kernels

W_CLS = 2.0  # Mask2Former's loss weights: class / foreground cross-entropy,
W_BCE = 5.0  # mask sigmoid BCE,
W_DICE = 5.0  # mask Dice,
NO_OBJECT_WEIGHT = 0.1  # and the weight of a "no object" query in the cross-entropy
P_LOST = 1.0  # --history-gaps: the chance per tracked object of a lost-mask gap (`unpainted`)


# ----------------------------------------------------------------------------- Hungarian matching
def hungarian(cost):  # EXERCISE 6: done when `python -m pytest --exercise 6` passes
    """Minimum-cost assignment like scipy's linear_sum_assignment (shortest augmenting paths,
    O(n^2 m)). cost (n, m) -> (rows, cols): min(n, m) pairs, rows ascending, each row and each
    column used once."""
    C = np.asarray(cost, dtype=np.float64)
    if C.ndim != 2:
        raise ValueError(f"hungarian: cost must be a 2-D matrix, got shape {C.shape}")
    if not np.isfinite(C).all():
        raise ValueError("hungarian: cost contains nan or inf; check the predictions that built it")
    transposed = C.shape[0] > C.shape[1]
    if transposed:
        C = C.T  # (n, m) with n <= m: every row gets a column
    n, m = C.shape
    u = np.zeros(n + 1)  # dual potentials of the rows (index 0 = virtual)
    v = np.zeros(m + 1)  # and of the columns
    p = np.zeros(m + 1, dtype=np.int64)  # p[j] = row (1-based) matched to column j, 0 = free
    way = np.zeros(m + 1, dtype=np.int64)  # previous column on the shortest path
    for i in range(1, n + 1):  # add row i, find a shortest augmenting path from it
        p[0] = i
        j0 = 0
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
            j0 = j1
            u[p[used]] += delta  # keep the reduced costs of the tree's edges at zero
            v[used] -= delta
            minv[~used] -= delta
            if p[j0] == 0:  # reached a free column: augment
                break
        while j0:  # flip the path's edges
            prev = way[j0]
            p[j0] = p[prev]
            j0 = prev
    matched = np.flatnonzero(p[1:])  # matched columns (0-based)
    rows = p[1:][matched] - 1
    cols = matched
    if transposed:
        rows, cols = cols, rows
    order = np.argsort(rows)
    return rows[order], cols[order]


# ------------------------------------------------------------------------ Alg. 2: teacher forcing
PROMPTED_DATASETS = ("synthetic", "davis", "mose", "ytvos")  # [D] the class-agnostic VOS sets


def _check_clips(clips, cfg):
    """One batch = clips of one dataset with the same T, H, W, each with at most N_id objects."""
    if not clips:
        raise ValueError("preprocess: got an empty list of clips")
    T, _, H, W = clips[0].frames.shape
    for c in clips:
        if c.frames.shape != clips[0].frames.shape or c.masks.shape[1:] != (T, H, W):
            raise ValueError(f"preprocess: clip {c.name!r} has frames {tuple(c.frames.shape)} and "
                             f"masks {tuple(c.masks.shape)}; every clip of a batch needs frames "
                             f"{(T, 3, H, W)}")
        if c.dataset != clips[0].dataset:
            raise ValueError(f"preprocess: one dataset per batch, got {c.dataset!r} and "
                             f"{clips[0].dataset!r}")
        if c.masks.shape[0] > cfg.N_id:
            raise ValueError(f"preprocess: a clip has {c.masks.shape[0]} objects but the ID buffer "
                             f"holds N_id = {cfg.N_id}")


def unpainted(visible, tracked, generator, gap, p_lost):
    """History gaps (ours, issue 17): the steps at which a tracked object is left unpainted although
    the ground truth shows it, as happens in recurrent inference after the model misses its mask.
    visible, tracked (b, T, N) bool -> (b, T, N) bool, True at step index s: y_{s-1} is not painted.
    - After a return (visible at frame f, absent at f - 1): the first k frames f..f+k-1 stay
      unpainted, k uniform in 1..gap (k = 1 is plain teacher forcing: frame f - 1 shows nothing), so
      the tracking query must find the object again from memory for k frames, not one.
    - With probability p_lost per tracked object: from a random visible frame f on, frames f..f+k-1
      are unpainted (a lost mask), k uniform in 1..gap.
    Teacher forcing paints every visible tracked object, so a model trained on it alone follows the
    paint of the frame before and forgets an object within a frame of losing it (measured by
    tests/memory_probe.py; README "Long videos")."""
    b, T, N = visible.shape
    gaps = torch.zeros(b, T, N, dtype=torch.bool)  # (b, T, N)
    for j in range(b):
        for i in range(N):
            seen = visible[j, :, i]  # (T,)
            back = seen[1:] & ~seen[:-1] & (seen.cumsum(0)[:-1] > 0)  # (T-1,): returns at f = 1..
            starts = (back.nonzero()[:, 0] + 1).tolist()  # frames where the object comes back
            if bool(torch.rand(1, generator=generator) < p_lost):
                frames = (seen & tracked[j, :, i]).nonzero()[:, 0]  # visible and tracked frames
                if len(frames):
                    pick = torch.randint(len(frames), (1,), generator=generator)
                    starts.append(int(frames[pick]))
            for f in starts:
                k = int(torch.randint(1, gap + 1, (1,), generator=generator))
                gaps[j, f + 1:f + k, i] = True  # step f + 1 would paint y_f: not before f + k
    return gaps


# EXERCISE 5: done: pytest --exercise 5
def preprocess(clips, cfg, generator, p_prompt=0.5, gap=0, p_lost=0.0):
    """b Clips (same T, H, W and dataset) -> the teacher-forced batch of Alg. 2 (paper steps
    t = 1..T).

    Instance i of sample b gets ids[b, i] (a distinct random row of the ID buffer B) and a switch
    time t_i in 0..T: a detection target at steps t <= t_i where visible, tracked (a tracking
    target, painted in the history) at steps t > t_i. Slots are padded to the batch's largest N with
    id -1. gap > 0: history gaps after returns and lost masks (`unpainted`, --history-gaps)."""
    _check_clips(clips, cfg)
    T, _, H, W = clips[0].frames.shape
    n_b = len(clips)
    N = max(1, max(c.masks.shape[0] for c in clips))
    ids = torch.full((n_b, N), -1, dtype=torch.long)  # (b, N) rows of B; -1 = padding
    labels = torch.full((n_b, N), -1, dtype=torch.long)  # (b, N) classes; -1 = none
    y = torch.zeros(n_b, N, T, H, W, dtype=torch.bool)  # (b, N, T, H, W) ground truth y_t^i
    switch = torch.full((n_b, N), T, dtype=torch.long)  # (b, N) t_i; T = never tracked
    prompted = torch.zeros(n_b, dtype=torch.bool)  # (b,)
    for b, c in enumerate(clips):
        n = c.masks.shape[0]
        # Alg. 2 step 1: A = Sampler(B, N_gt), distinct rows of the ID buffer
        ids[b, :n] = torch.randperm(cfg.N_id, generator=generator)[:n]
        labels[b, :n] = c.labels
        y[b, :n] = c.masks.bool()
        if c.dataset in PROMPTED_DATASETS:  # (no draw for the other datasets)
            prompted[b] = bool(torch.rand(1, generator=generator) < p_prompt)
        for i in range(n):  # Alg. 2 step 2: a switch time t_i per instance
            seen = c.masks[i].flatten(1).any(1).nonzero()[:, 0] + 1  # (1-based) frames showing i
            if len(seen) == 0:
                continue
            pick = torch.randint(len(seen), (1,), generator=generator)
            switch[b, i] = seen[pick]  # t_i ~ U(visible frames)
            if prompted[b] and seen[0] == 1 and bool(torch.rand(1, generator=generator) < 0.5):
                switch[b, i] = 0  # a prompt: y_1 painted on X_0
    # Alg. 2 step 2: detection target at t <= t_i, tracking target (and history y_{t-1}) at t > t_i
    t = torch.arange(1, T + 1)  # (T,) paper step t
    visible = y.flatten(3).any(3).transpose(1, 2)  # (b, T, N)
    tracked = t[None, :, None] > switch[:, None, :]  # (b, T, N): i in A_{t-1} at step t
    y_prev = torch.cat([y[:, :, :1], y[:, :, :-1]], dim=2)  # (b, N, T, H, W): y_{t-1}; y_1 at t = 1
    history = y_prev.transpose(1, 2) & tracked[..., None, None]  # (b, T, N, H, W): M_{t-1}
    if gap > 0:
        gaps = unpainted(visible, tracked, generator, gap, p_lost)  # (b, T, N)
        history = history & ~gaps[..., None, None]
    history = history.float()
    y_frames = y.transpose(1, 2).flatten(0, 2)[:, None].float()  # (b*T*N, 1, H, W)
    targets = F.avg_pool2d(y_frames, 4)  # (b*T*N, 1, H/4, W/4) soft masks
    return {"frames": torch.stack([c.frames for c in clips]),  # (b, T, 3, H, W)
            "ids": ids, "history": history, "tracked": tracked, "labels": labels, "switch": switch,
            "visible": visible, "det": visible & ~tracked,  # (b, T, N): detection targets
            "targets": targets.view(n_b, T, N, H // 4, W // 4),  # (b, T, N, h, w)
            "prompted": prompted, "dataset": clips[0].dataset}


def to_device(batch, device):
    moved = {}
    for k, v in batch.items():
        moved[k] = v.to(device) if torch.is_tensor(v) else v
    return moved


# ------------------------------------------------------------------- losses (Sec. 2.3, Mask2Former)
def _query_ce(fg, cls, fg_t, cls_t):
    """Foreground BCE (+ the dataset's K+1-way class CE where it has one) per query."""
    ce = F.binary_cross_entropy_with_logits(fg, fg_t, reduction="none")  # (P, b, T, Q')
    if cls is not None:
        class_ce = F.cross_entropy(cls.flatten(0, 3), cls_t.flatten(), ignore_index=-100,
                                   reduction="none")  # (P*b*T*Q',)
        ce = ce + class_ce.view_as(fg)
    return ce


def _mask_loss(pred, gt):
    """Sigmoid BCE and Dice of mask logits pred (M, h, w) against soft targets gt -> (M,), (M,)."""
    # EXERCISE: Mask2Former's importance point sampling instead of the full mask; done = the
    # criterion tests pass
    pred = pred.flatten(1)  # (M, hw)
    gt = gt.flatten(1)  # (M, hw)
    bce = F.binary_cross_entropy_with_logits(pred, gt, reduction="none").mean(1)  # (M,)
    s = pred.sigmoid()
    dice = 1 - (2 * (s * gt).sum(1) + 1) / (s.sum(1) + gt.sum(1) + 1)  # (M,)
    return bce, dice


def _set_loss(ce, w, bce, dice, P):
    """Numerators (weighted CE over queries, BCE and Dice over masks) and their normalisers (per
    prediction): w = 0 ignored, 0.1 no object, 1 object."""
    num = torch.stack([(ce * w).sum(), bce.sum(), dice.sum()])  # (3,)
    n_masks = torch.tensor(float(len(bce)) / P, device=w.device)
    den = torch.stack([w.sum() / P, n_masks])  # (2,)
    return num, den


def _class_targets(batch, T):
    """Each instance's class at every frame, -100 (ignored by the class CE) where it has none."""
    lab = batch["labels"]  # (b, N)
    lab = lab[:, None, :].expand(lab.shape[0], T, lab.shape[1])  # (b, T, N)
    return torch.where(lab >= 0, lab, torch.full_like(lab, -100))


# EXERCISE 11: write _tracking_loss (L_trk, fixed query <-> instance); done when
# `python -m pytest --exercise 11` passes
def _tracking_loss(fg, cls, masks, batch, lab, K):
    """L_trk: tracking query i <-> instance i (fixed); an absent tracked object is "no object" with
    an empty mask."""
    P = fg.shape[0]
    N = lab.shape[-1]
    tgt = batch["targets"].float()  # (b, T, N, h, w)
    vis = batch["visible"]  # (b, T, N)
    trk = batch["tracked"]  # (b, T, N)
    w = (trk * torch.where(vis, 1.0, NO_OBJECT_WEIGHT)).expand(P, -1, -1, -1)  # (P, b, T, N)
    fg_t = vis.float().expand(P, -1, -1, -1)  # (P, b, T, N)
    cls_t = torch.where(vis, lab, torch.full_like(lab, K)).expand(P, -1, -1, -1)  # (P, b, T, N)
    cls_trk = None if cls is None else cls[..., :N, :]  # (P, b, T, N, K+1)
    ce = _query_ce(fg[..., :N], cls_trk, fg_t, cls_t)  # (P, b, T, N)
    b, t, n = trk.nonzero(as_tuple=True)  # (M,) each: every tracked (b, t, i)
    p = torch.arange(P, device=fg.device).repeat_interleave(len(b))  # (P*M,): every prediction
    b = b.repeat(P)  # (P*M,)
    t = t.repeat(P)  # (P*M,)
    n = n.repeat(P)  # (P*M,)
    bce, dice = _mask_loss(masks[:, :, :, :N][p, b, t, n], tgt[b, t, n])  # (P*M,) each
    return _set_loss(ce, w, bce, dice, P)


def _matching_cost(fg, cls, masks, tgt, lab, N):
    """Mask2Former's matching cost of every detection query to every instance: (P, b, T, Nd, N)."""
    P, _, _, Q = fg.shape
    x = masks[:, :, :, N:].flatten(-2)  # (P, b, T, Nd, hw)
    g = tgt.flatten(-2)[None].transpose(-1, -2)  # (1, b, T, hw, N)
    bce = (F.softplus(-x) @ g + F.softplus(x) @ (1 - g)) / x.shape[-1]  # (P, b, T, Nd, N)
    overlap = 2 * x.sigmoid() @ g + 1  # (P, b, T, Nd, N)
    total = x.sigmoid().sum(-1)[..., None] + g.sum(-2)[..., None, :] + 1  # (P, b, T, Nd, N)
    dice = 1 - overlap / total  # (P, b, T, Nd, N)
    cost = -fg[..., N:, None].sigmoid() * W_CLS + W_BCE * bce + W_DICE * dice  # (P, b, T, Nd, N)
    if cls is not None:
        prob = cls[..., N:, :].softmax(-1)  # (P, b, T, Nd, K+1)
        idx = lab.clamp(min=0)[None, :, :, None, :].expand(P, -1, -1, Q - N, -1)  # (P, b, T, Nd, N)
        has_class = (lab >= 0)[None, :, :, None, :]  # (1, b, T, 1, N)
        cost = cost - W_CLS * prob.gather(-1, idx) * has_class
    return cost


def _match_detections(cost, det):
    """Hungarian matching per (prediction, sample, frame) of detection queries to that frame's
    detection targets. cost (P, b, T, Nd, N), det (b, T, N) -> (p, b, t, q, n): lists of the
    matched pairs' indices."""
    P, n_b, T = cost.shape[:3]
    picks = ([], [], [], [], [])  # p, b, t, q, n
    for pi, bi, ti in itertools.product(range(P), range(n_b), range(T)):
        cand = np.flatnonzero(det[bi, ti])  # this frame's detection targets
        if len(cand) == 0:
            continue
        r, c = hungarian(cost[pi, bi, ti][:, cand])
        for lst, v in zip(picks, (pi, bi, ti, r, cand[c])):
            lst.extend(np.broadcast_to(v, r.shape).tolist())
    return picks


# EXERCISE 12: write _detection_loss (L_det, Hungarian matching per frame); done when
# `python -m pytest --exercise 12` passes
def _detection_loss(fg, cls, masks, batch, lab, K):
    """L_det: detection queries matched to the frame's detection targets, the others "no object"."""
    P, n_b, T, Q = fg.shape
    N = lab.shape[-1]
    dev = fg.device
    tgt = batch["targets"].float()  # (b, T, N, h, w)
    with torch.no_grad():
        cost = _matching_cost(fg, cls, masks, tgt, lab, N).cpu().numpy()  # (P, b, T, Nd, N)
        cost = np.nan_to_num(cost, nan=1e9, posinf=1e9, neginf=-1e9)  # diverged: the loss says so
    picks = _match_detections(cost, batch["det"].cpu().numpy())
    p, b, t, q, n = (torch.tensor(v, dtype=torch.long, device=dev) for v in picks)  # (pairs,) each
    w = torch.full((P, n_b, T, Q - N), NO_OBJECT_WEIGHT, device=dev)  # (P, b, T, Nd)
    fg_t = torch.zeros_like(w)  # (P, b, T, Nd)
    cls_t = torch.full(w.shape, K, dtype=torch.long, device=dev)  # (P, b, T, Nd)
    w[p, b, t, q] = 1.0
    fg_t[p, b, t, q] = 1.0
    cls_t[p, b, t, q] = lab[b, t, n]
    cls_det = None if cls is None else cls[..., N:, :]  # (P, b, T, Nd, K+1)
    ce = _query_ce(fg[..., N:], cls_det, fg_t, cls_t)  # (P, b, T, Nd)
    bce, dice = _mask_loss(masks[:, :, :, N:][p, b, t, q], tgt[b, t, n])  # (pairs,) each
    return _set_loss(ce, w, bce, dice, P)


def criterion(out, batch):
    """Alg. 2 step 4: L = L_trk + L_det summed over the P deep-supervision predictions -> (loss,
    parts of floats).

    Under DDP the normalisers are summed over ranks (and the loss scaled by the world size) so that
    the averaged gradients equal one process's on the combined batch."""
    fg = out["fg"].float()  # (P, b, T, Q)
    masks = out["masks"].float()  # (P, b, T, Q, h, w)
    cls = None
    if out.get("cls") is not None:
        cls = out["cls"].float()  # (P, b, T, Q, K+1)
    K = 0 if cls is None else cls.shape[-1] - 1
    lab = _class_targets(batch, fg.shape[2])  # (b, T, N)
    num_trk, den_trk = _tracking_loss(fg, cls, masks, batch, lab, K)
    num_det, den_det = _detection_loss(fg, cls, masks, batch, lab, K)
    den = torch.cat([den_trk, den_det])  # (4,)
    scale = 1.0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(den)
        scale = float(torch.distributed.get_world_size())
    trk = num_trk / den[[0, 1, 1]].clamp(min=1e-6)  # (3,)
    det = num_det / den[[2, 3, 3]].clamp(min=1e-6)  # (3,)
    terms = scale * torch.cat([trk, det])  # (6,)
    terms = terms * torch.tensor([W_CLS, W_BCE, W_DICE] * 2, device=fg.device)  # (6,)
    names = ("trk_cls", "trk_bce", "trk_dice", "det_cls", "det_bce", "det_dice")
    return terms.sum(), dict(zip(names, terms.detach().tolist()))


# ------------------------------------------------------------------------ both forms of the model
def forward(model, batch, iterative=False):
    """Alg. 2 step 3: the parallel form (one scan over T) or the iterative baseline (Alg. 1's
    model.step frame by frame, SAM2-style) with the same teacher-forced history. Both -> out with
    the T axis: (P, b, T, Q, ...)."""
    frames = batch["frames"]  # (b, T, 3, H, W)
    ids = batch["ids"]  # (b, N)
    history = batch["history"]  # (b, T, N, H, W)
    tracked = batch["tracked"]  # (b, T, N)
    if not iterative:
        return model(frames, ids, history, tracked, batch["dataset"])
    n_b, T, _, H, W = frames.shape
    state = model.init_state(n_b, ids.shape[1], H, W, ids=ids)
    outs = []
    for t in range(T):  # teacher forcing: A_{t-1} = tracked slots, M_{t-1} = ground truth
        state.alloc = tracked[:, t]  # (b, N)
        state.M = history[:, t]  # (b, N, H, W)
        out, state = model.step(frames[:, t], state, batch["dataset"])  # (P, b, Q, ...); autograd
        outs.append(out)
    stacked = {}
    for k in outs[0]:
        stacked[k] = None
        if outs[0][k] is not None:
            stacked[k] = torch.stack([o[k] for o in outs], 2)  # (P, b, T, ...)
    return stacked


def train_step(model, opt, batch, iterative=False, clip=1.0):
    """One iteration: forward (bf16 autocast on CUDA), criterion in fp32, backward, AdamW step.
    Returns (loss averaged over ranks, parts), or (non-finite loss, parts) without stepping."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch["frames"].is_cuda):
        out = forward(model, batch, iterative)
    loss, parts = criterion(out, batch)
    total = torch.tensor([loss.item(), *parts.values()], device=loss.device)  # (1 + 6,)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)  # every rank sees the same values (and stops on nan)
        total /= torch.distributed.get_world_size()
    parts = dict(zip(parts, total[1:].tolist()))
    total = total[0].item()
    if not math.isfinite(total):
        return total, parts
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    opt.step()
    return total, parts


# ------------------------------------------------------------- checkpoints, schedule, evaluation
def save_checkpoint(path, model, opt, step, cfg, args):
    """Model, optimizer, step, config, RNG states; written to a temp file, then renamed (atomic).
    Plain data only (tensors, numbers, strings, lists, dicts): the Config and the arguments as
    dicts, so that load_checkpoint can read it with weights_only=True."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng = {"torch": torch.get_rng_state(), "cuda": cuda_rng}
    ck = {"model": model.state_dict(), "config": dataclasses.asdict(cfg),
          "optimizer": opt.state_dict(), "step": step, "stage": args.stage,
          "args": dict(vars(args)), "rng": rng}  # (argparse leaves str, int, float, bool, None)
    torch.save(ck, path + ".tmp")
    os.replace(path + ".tmp", path)


def average_weights(checkpoints, paths):
    """--average (ours, not the paper's): the uniform mean of the weights of checkpoints of one
    model, e.g. runs fine-tuned from one --init (a "model soup", Wortsman et al. 2022). Integer
    buffers are the first checkpoint's. Refused, with the file named, unless every checkpoint has
    the first one's Config and the same weight names and shapes. -> the averaged state dict."""
    first = checkpoints[0]
    for path, ck in zip(paths[1:], checkpoints[1:]):
        if ck["config"] != first["config"]:
            changed = [k for k in first["config"] if ck["config"].get(k) != first["config"][k]]
            raise ValueError(f"--average {path}: its Config differs from {paths[0]}'s (in "
                             f"{sorted(changed)[:3]}); average checkpoints of one model")
        if set(ck["model"]) != set(first["model"]):
            raise ValueError(f"--average {path}: its weights are not {paths[0]}'s weights; "
                             f"average checkpoints of one model")
    mean = {}
    for name, value in first["model"].items():
        if not value.is_floating_point():
            mean[name] = value
            continue
        shapes = {tuple(ck["model"][name].shape) for ck in checkpoints}
        if len(shapes) > 1:
            raise ValueError(f"--average: weight {name} has shapes {sorted(shapes)} in "
                             f"{paths}; average checkpoints of one model")
        stacked = torch.stack([ck["model"][name].float() for ck in checkpoints])  # (n, ...)
        mean[name] = stacked.mean(0).to(value.dtype)  # (...)
    return mean


def average_checkpoints(args):
    """--average CKPT CKPT ...: their averaged weights as <out>/ckpt.pt (model, config, the
    averaged paths; no optimizer, so it is --init'ed, not resumed), evaluated as a run is."""
    paths = args.average
    ckpt = os.path.join(args.out, "ckpt.pt")
    if len(paths) < 2:
        raise ValueError(f"--average {paths[0]}: give two or more checkpoints to average")
    inputs = [os.path.abspath(p) for p in paths]
    if os.path.abspath(ckpt) in inputs:
        raise ValueError(f"--out {args.out}: its ckpt.pt is one of the checkpoints to average; "
                         f"give another --out")
    checkpoints = [load_checkpoint(p, "--average") for p in paths]
    configs = [_checkpoint_config(args, ck, p) for p, ck in zip(paths, checkpoints)]  # or refused
    cfg = configs[0]
    model = ausm.AUSM(cfg)
    _load_weights(model, {"model": average_weights(checkpoints, paths)}, paths[0], None)
    os.makedirs(args.out, exist_ok=True)
    ck = {"model": model.state_dict(), "config": dataclasses.asdict(cfg), "step": 0,
          "stage": checkpoints[0].get("stage", args.stage), "args": dict(vars(args)),
          "averaged": list(paths)}
    torch.save(ck, ckpt + ".tmp")
    os.replace(ckpt + ".tmp", ckpt)
    print(f"averaged the weights of {len(paths)} checkpoints into {ckpt}", flush=True)
    if not args.no_eval:
        evaluate(model.eval(), cfg, args.out)
    return 0


def _remove_stale_tmp(path):
    """A <ckpt>.tmp left by an interrupted save (the checkpoint itself is whole or absent)."""
    if os.path.exists(path + ".tmp"):
        os.remove(path + ".tmp")
        print(f"removed {path}.tmp, left by an interrupted save", flush=True)


def load_checkpoint(path, flag="--init"):
    """A train.py checkpoint read as data (weights_only=True): a pickle that would run code, or
    anything that is not a checkpoint, is refused with the file's name. flag: how the user named
    it (--init, --resume, --average; --checkpoint for infer.load_model, the one other reader)."""
    if not os.path.isfile(path):
        if flag == "--resume":
            raise FileNotFoundError(f"--resume: no checkpoint {path}; run without --resume to "
                                    f"start, or pass the --out of the run to continue")
        if flag == "--checkpoint":  # infer.py
            raise FileNotFoundError(f"checkpoint {path} not found; train one with this code: "
                                    "python train.py --stage 1")
        if flag == "--average":
            raise FileNotFoundError(f"--average: no checkpoint {path}; give the ckpt.pt of each "
                                    f"run to average")
        raise FileNotFoundError(f"checkpoint {path} not found: for --stage 2 / 3 train the "
                                f"previous stage first (python train.py --stage 1) or pass --init "
                                f"CKPT; --resume reads <--out>/ckpt.pt")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # code in the pickle, a truncated file, not a checkpoint at all
        code = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"not a file of torch.save ({str(e).strip().splitlines()[0][:80]})"
        if code:
            reason = f"it would call {code.group(1)}"
        raise ValueError(f"{flag} {path}: refused, not a checkpoint of plain data ({reason}); "
                         f"checkpoints are data, never code: use one written by train.py") from None
    need = ["model", "config"]
    if flag == "--resume":
        need += ["optimizer", "step", "rng"]
    missing = [k for k in need if not isinstance(ck, dict) or k not in ck]
    if flag == "--resume" and isinstance(ck, dict) and "averaged" in ck:
        raise ValueError(f"--resume {path}: an average of checkpoints (--average) has no "
                         f"optimizer to resume; start a run from it with --init {path}")
    if missing:
        raise ValueError(f"{flag} {path}: not a train.py checkpoint (no {missing}); use one "
                         f"written by train.py")
    return ck


def lr_at(step, args):
    """Linear warm-up over the first 5% of iterations, then cosine decay to 10% of --lr."""
    warm = max(1, args.max_iters // 20)
    cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, args.max_iters - warm)))
    return args.lr * (step / warm if step <= warm else cosine)


def _real_spec(spec):
    """The video-object-segmentation spec (davis|mose|ytvos:DIR) among --data's, or None."""
    for one in spec.split(","):
        if one.partition(":")[0] in ("davis", "mose", "ytvos"):
            return one
    return None


def evaluate(model, cfg, out_dir=None, real=None):
    """End-of-run evaluation (issue 7): infer.py's Segmenter on data.heldout("synthetic"), prompted
    J&F (DAVIS protocol) and unprompted video AP (YouTube-VIS protocol) -> a dict of scores.
    real (a davis|mose|ytvos:DIR spec): also its validation split's whole videos, prompted J&F at
    the frames' own size beside the copy-the-first-mask baseline's, per sequence: scores["real"].
    """
    import infer
    with torch.no_grad():
        scores = infer.evaluate_heldout(model, cfg)  # {"J&F", "J", "F", "AP", ..., "full"}
    line = " | ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float))
    counts = " | ".join(f"{k} {v}" for k, v in scores.items() if isinstance(v, int))
    n = infer.HELDOUT_VIDEOS
    print(f"heldout synthetic ({n} videos of 16 frames) | {line} | {counts}", flush=True)
    if real:
        with torch.no_grad():
            scores["real"] = infer.real_heldout_scores(model, real)  # {"model": .., "copy": ..}
    if out_dir:
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump(scores, f, indent=1)
    return scores


# ----------------------------------------------------------------------------- the command line
# frames per clip: the paper's 3 / 5 / 16; tiny stage 2 uses 8 (measured: held-out J&F 0.729 ->
# 0.772, AP 0.352 -> 0.438 at equal frames seen): held-out objects leave the frame for up to 11
# frames, which 5-frame clips rarely show. Tiny stage 3 uses 24 frames, 300 iterations (issue 17,
# measured on 32 held-out videos of 64 / 256 frames, README "Long videos")
PRESETS = {
    "tiny": dict(batch_size=4, lr=1e-3, iters={1: 2000, 2: 750, 3: 300}, frames={1: 3, 2: 8, 3: 24},
                 time_limit={1: 13.0, 2: 13.0, 3: 15.0}),
    "paper": dict(batch_size=16, lr=1e-4, iters={1: 147_500, 2: 32_000, 3: 40_000},
                  frames={1: 3, 2: 5, 3: 16}, time_limit={1: 0.0, 2: 0.0, 3: 0.0}),
}


def _parser():
    ap = argparse.ArgumentParser(description="Train AUSM (Alg. 2, teacher-forced parallel "
                                 "training).")
    ap.add_argument("--stage", type=int, default=1, choices=(1, 2, 3),
                    help="1: 3-frame pseudo-videos of stills; 2: 5-frame videos (tiny: 8) from "
                    "stage 1's checkpoint; 3: 16 frames (tiny: 24), backbone frozen, from 2's")
    ap.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                    help="model size and schedule: tiny (CPU, minutes) or paper (Sec. 3.1 sizes, "
                    "lr 1e-4, batch 16)")
    ap.add_argument("--data", default="synthetic",
                    help="dataset spec for data.train_stream: synthetic, davis:DIR, mose:DIR, "
                    "ytvos:DIR, coco:JSON:IMGDIR, ytvis19:JSON:IMGDIR, ytvis21:..., ovis:...; or "
                    "two joined by a comma, e.g. synthetic,davis:DIR (see --mix)")
    ap.add_argument("--mix", type=float, default=0.5,
                    help="with two --data specs: the share of batches from the second (0..1)")
    ap.add_argument("--frames", type=int,
                    help="frames per clip T (stages 1/2/3: paper 3/5/16, tiny 3/8/24)")
    ap.add_argument("--size", type=int,
                    help="frame size H = W, a multiple of 8 (default: the preset's image_size)")
    ap.add_argument("--batch-size", type=int,
                    help="clips per iteration per process (default: the preset's)")
    ap.add_argument("--max-iters", type=int,
                    help="training iterations (default: the preset's, per stage)")
    ap.add_argument("--lr", type=float,
                    help="AdamW peak learning rate (default: the preset's); warm-up then cosine")
    ap.add_argument("--out", help="folder for ckpt.pt and eval.json (default runs/stage<N>)")
    ap.add_argument("--init",
                    help="weights to start from (default for stages 2/3: runs/stage<N-1>/ckpt.pt)")
    ap.add_argument("--resume", action="store_true",
                    help="continue from <out>/ckpt.pt: model, optimizer, step, RNG")
    ap.add_argument("--device", default="auto",
                    help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--iterative", action="store_true",
                    help="train frame by frame through model.step (SAM2-style)")
    ap.add_argument("--benchmark", action="store_true",
                    help="time both forms at T = 1..16 (paper Fig. 4) and exit")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch (0 = torch's default, one per core: 1.6x faster "
                    "than 1 on an idle 2-core machine); on a busy shared one try --threads 1")
    ap.add_argument("--log-every", type=int, default=10, help="iterations per log line")
    ap.add_argument("--ckpt-every", type=int, default=100, help="iterations between checkpoints")
    ap.add_argument("--history-gaps", type=int, default=0, metavar="K",
                    help="leave a tracked object unpainted in the history for up to K frames after "
                    "it comes back into view and after one random frame per clip (as inference "
                    "does once a mask is missed; train.unpainted, README 'Long videos': 16 taught "
                    "the tiny model to track from memory); 0: plain teacher forcing (default)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the model init, the data and the switch times")
    ap.add_argument("--time-limit", type=float,
                    help="stop and save after this many minutes (0 = never; default: 13 for tiny, "
                    "15 for its stage 3; 0 for paper)")
    ap.add_argument("--no-eval", action="store_true",
                    help="skip the held-out evaluation at the end")
    ap.add_argument("--bench-iters", type=int, default=3,
                    help="--benchmark: timed iterations per form and T")
    ap.add_argument("--average", nargs="+", metavar="CKPT",
                    help="train nothing: write the mean of these checkpoints' weights (runs of one "
                    "model, e.g. fine-tuned from one --init) to <out>/ckpt.pt (default "
                    "runs/average) and evaluate it (README 'Long videos')")
    return ap


COUNTS = ("frames", "batch_size", "max_iters", "log_every", "ckpt_every", "bench_iters")


def _check_args(args):
    """Refuse what cannot be meant (COUNTS must be >= 1); an option not given stays None (the
    preset's value, see parse_args)."""
    for name in COUNTS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be a positive number")
    if args.size is not None and (args.size < 8 or args.size % 8):
        raise ValueError(f"--size {args.size}: the frame size must be a positive multiple of 8 "
                         f"(e.g. 64 or 128)")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr {args.lr}: the learning rate must be a positive number")
    if args.time_limit is not None and not args.time_limit >= 0:
        raise ValueError(f"--time-limit {args.time_limit}: minutes must be >= 0 (0 = no limit)")
    if args.history_gaps < 0:
        raise ValueError(f"--history-gaps {args.history_gaps}: must be >= 0 (0 = none)")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: must be >= 0 (0 = torch's default)")
    if args.average and (args.init or args.resume or args.benchmark or args.iterative):
        raise ValueError("--average trains nothing: drop --init, --resume, --benchmark and "
                         "--iterative (the checkpoints to average are its arguments)")
    if not 0 <= args.mix <= 1:
        raise ValueError(f"--mix {args.mix}: the share of the second --data spec's batches must "
                         f"be in 0..1")


def _preset_default(value, default):
    return default if value is None else value


def parse_args(argv=None):
    args = _parser().parse_args(argv)
    _check_args(args)
    pre = PRESETS[args.preset]
    batch_size = 2 if args.benchmark else pre["batch_size"]
    args.frames = _preset_default(args.frames, pre["frames"][args.stage])
    args.batch_size = _preset_default(args.batch_size, batch_size)
    args.max_iters = _preset_default(args.max_iters, pre["iters"][args.stage])
    args.lr = _preset_default(args.lr, pre["lr"])
    args.time_limit = _preset_default(args.time_limit, pre["time_limit"][args.stage])
    if args.average:
        args.out = args.out or "runs/average"
    args.out = args.out or f"runs/stage{args.stage}"
    trains = not (args.resume or args.benchmark or args.average)
    if args.init is None and args.stage > 1 and trains:
        args.init = f"runs/stage{args.stage - 1}/ckpt.pt"
    return args


def data_from(args, step, rank, world):
    """The batch stream (data.batches: --data, --mix) and the switch-time generator restart from
    seeds derived from the step at every checkpoint, so a resumed run sees exactly what an
    uninterrupted one does (without replaying the stream)."""
    import data
    seed = args.seed * 1_000_003 + step
    stream = data.batches(args.data, args.batch_size, args.mix, stage=args.stage, T=args.frames,
                          size=args.size, seed=seed, rank=rank, world=world)
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    return stream, generator


def _setup_device(args, world):
    """The device of this process; under torchrun (world > 1) also the process group."""
    dev = args.device.replace("auto", "cpu")
    if args.device == "auto" and torch.cuda.is_available():
        dev = "cuda"
    if dev == "cuda" and world > 1:
        dev = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"  # this rank's GPU
    device = torch.device(dev)
    if world > 1:
        if args.iterative or args.benchmark:
            raise ValueError("--iterative and --benchmark run in one process; launch without "
                             "torchrun")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _checkpoint_config(args, ck, path):
    """The Config saved in a checkpoint, refused if it was trained under another --preset."""
    saved_args = ck.get("args")
    trained = None
    if isinstance(saved_args, dict):
        trained = saved_args.get("preset")
    if trained is not None and trained != args.preset:
        raise ValueError(f"{path} holds a {trained} model (trained with --preset {trained}), not a "
                         f"{args.preset} one: pass --preset {trained} to go on with it (--lr, "
                         f"--batch-size, --max-iters set its schedule), or train a {args.preset} "
                         f"model from --stage 1")
    try:
        return ausm.Config(**ck["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: its config does not describe a model ({e}); use "
                         f"one written by train.py") from None


def _class_head_for(cfg, args, path):
    """--data with categories and no class head for them in cfg: add a K+1-way head (fresh weights),
    recorded in the checkpoint's Config. -> (cfg, the name of the added head or None)."""
    import data
    dataset = args.data.split(",")[-1].partition(":")[0]  # (synthetic has its head: the last spec)
    K = data.NUM_CLASSES.get(dataset, 0)
    if K == 0 or dataset in dict(cfg.class_heads):
        return cfg, None
    if args.resume:
        raise ValueError(f"--resume {path}: the model has no class head for --data {dataset}; "
                         f"resume with the --data the run started with")
    return dataclasses.replace(cfg, class_heads=cfg.class_heads + ((dataset, K),)), dataset


def _load_weights(model, ck, path, added):
    """The checkpoint's weights into model; only the added class head (if any) keeps fresh ones."""
    try:
        result = model.load_state_dict(ck["model"], strict=False)
    except (RuntimeError, TypeError, AttributeError) as e:
        reason = str(e).strip().splitlines()[0][:120]
        raise ValueError(f"checkpoint {path}: its weights do not fit its config ({reason}); "
                         f"use one written by train.py") from None
    new_head = f".cls.{added}."
    missing = [k for k in result.missing_keys if added is None or new_head not in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {path}: its weights do not fit its config (missing "
                         f"{missing[:2]}, unexpected {result.unexpected_keys[:2]}); use one "
                         f"written by train.py")


def _build_model(args, ck, path, overrides, device):
    """The Config (the checkpoint's, or the preset's with the test overrides) with what the
    arguments change (--size, a class head for --data) recorded in it, and the model."""
    preset = ausm.Config.tiny if args.preset == "tiny" else ausm.Config.paper
    if ck:
        cfg = _checkpoint_config(args, ck, path)
    else:
        cfg = preset(**overrides)
    if args.size is None:
        args.size = cfg.image_size
    elif args.size != cfg.image_size:  # trained (and evaluated) at --size: say so in the checkpoint
        cfg = dataclasses.replace(cfg, image_size=args.size)
    cfg, added = _class_head_for(cfg, args, path)
    if added:
        print(f"--data {added}: the model had no class head for it; added one "
              f"({dict(cfg.class_heads)[added]} classes + no object, fresh weights)", flush=True)
    model = ausm.AUSM(cfg).to(device)
    if ck:
        _load_weights(model, ck, path, added)
    if args.stage == 3:  # only temporal modules and heads train (Sec. 3)
        model.backbone.requires_grad_(False)
    return cfg, model


def _resume(ck, opt, path):
    """Optimizer state and RNG of a --resume checkpoint -> its step."""
    try:
        opt.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"--resume {path}: its optimizer or RNG state does not fit this model "
                         f"({type(e).__name__}: {e}); resume with the settings the run started "
                         f"with") from None
    return int(ck["step"])


def _print_banner(args, model, params, device, world, step, resumed):
    path = kernels.SCAN_PATH
    if path == "auto":
        path = "triton" if device.type == "cuda" else "torch"
    precision = "bf16 autocast" if device.type == "cuda" else "float32"
    n_all = sum(p.numel() for p in model.parameters()) / 1e6
    n_trained = sum(p.numel() for p in params) / 1e6
    start = args.init or "scratch"
    if resumed:
        start = f"step {step} of {args.out}"
    frames = f"{args.size}x{args.size}"
    if args.data != "synthetic":  # real frames keep their aspect ratio (data.frame_size)
        frames = f"short side {args.size}"
    print(f"device {device} ({precision}) x {world} | AUSM {args.preset}: {n_all:.2f}M parameters "
          f"({n_trained:.2f}M trained) | scan path: {path} | stage {args.stage}, T={args.frames}, "
          f"{frames}, batch {args.batch_size}x{world}, from {start}", flush=True)


def _log_line(step, sums, n, args, world, seconds):
    losses = " ".join(f"{k} {v / n:7.4f}" for k, v in sums.items())
    frames = n * args.batch_size * world * args.frames
    return (f"step {step:6d} | {losses} | lr {lr_at(step, args):.2e} | "
            f"{1000 * seconds / n:6.0f} ms/iter | {frames / seconds:6.1f} frames/s")


def _out_of_time(args, t_start, device, world):
    """Whether --time-limit is reached; under DDP every rank stops at the same step."""
    late = args.time_limit > 0 and time.time() - t_start > 60 * args.time_limit
    out_of_time = torch.tensor(float(late), device=device)  # (nccl reduces CUDA tensors only)
    if world > 1:
        torch.distributed.all_reduce(out_of_time, torch.distributed.ReduceOp.MAX)
    return bool(out_of_time)


def _train_loop(model, net, opt, cfg, args, step, device, rank, world):
    """Alg. 2, a batch an iteration, until --max-iters or --time-limit -> exit code, 1: diverged."""
    ckpt = os.path.join(args.out, "ckpt.pt")
    stream, gen = data_from(args, step, rank, world)
    sums = {}
    n = 0
    t_start = time.time()
    t_log = time.time()
    while step < args.max_iters:
        clips = next(stream)  # one dataset per batch (data.batches)
        batch = preprocess(clips, cfg, gen, gap=args.history_gaps, p_lost=P_LOST)
        batch = to_device(batch, device)
        step += 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss, parts = train_step(model if args.iterative else net, opt, batch, args.iterative)
        if not math.isfinite(loss):
            good = "none written yet"
            if os.path.exists(ckpt):
                good = f"{ckpt} (step {load_checkpoint(ckpt)['step']})"
            print(f"step {step}: loss is {loss}; stopping. Last good checkpoint: {good}. "
                  f"Try a lower --lr.", flush=True)
            return 1
        for k, v in {"loss": loss, **parts}.items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
        out_of_time = _out_of_time(args, t_start, device, world)
        if step % args.log_every == 0 or step == args.max_iters or out_of_time:
            if rank == 0:
                print(_log_line(step, sums, n, args, world, time.time() - t_log), flush=True)
            sums = {}
            n = 0
            t_log = time.time()
        if step % args.ckpt_every == 0 or step == args.max_iters or out_of_time:
            if rank == 0:
                save_checkpoint(ckpt, model, opt, step, cfg, args)
            stream, gen = data_from(args, step, rank, world)
        if out_of_time:
            if rank == 0:
                print(f"time limit of {args.time_limit} min reached at step {step}; checkpoint "
                      f"saved", flush=True)
            break
    return 0


def main(argv=None, **overrides):
    """Train (or --benchmark). overrides: Config fields of a fresh model (tests use tiny shapes).
    A bad argument, checkpoint or dataset stops with one line `error: ...` (exit status 1)."""
    try:
        return run(parse_args(argv), overrides)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run(args, overrides):
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = _setup_device(args, world)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.average:
        return average_checkpoints(args)
    ckpt = os.path.join(args.out, "ckpt.pt")
    ck = None
    ck_path = None
    if args.resume:
        ck_path = ckpt
        ck = load_checkpoint(ckpt, "--resume")
    elif args.init:
        ck_path = args.init
        ck = load_checkpoint(args.init)
    cfg, model = _build_model(args, ck, ck_path, overrides, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    step = 0
    if args.resume:  # (the data and the switch times restart from `step`, see data_from)
        step = _resume(ck, opt, ckpt)
    if rank == 0:
        _remove_stale_tmp(ckpt)
        _print_banner(args, model, params, device, world, step, args.resume)
    if args.benchmark:
        return benchmark(model, opt, cfg, args, device)
    datasets = [spec.partition(":")[0] for spec in args.data.split(",")]
    unused = any(name not in datasets for name, _ in cfg.class_heads)  # other datasets' heads
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused)
    code = _train_loop(model, net, opt, cfg, args, step, device, rank, world)
    if code != 0:
        return code
    if rank == 0 and not args.no_eval:
        evaluate(model.eval(), cfg, args.out, _real_spec(args.data))
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def benchmark(model, opt, cfg, args, device):
    """Paper Fig. 4: seconds per full training iteration (forward, backward, AdamW step) of the
    iterative (frame-by-frame) and the parallel form at T = 1, 2, 4, 8, 16 on the same batch, after
    one warm-up."""
    import data
    print(f"batch {args.batch_size}, {args.size}x{args.size}, {args.bench_iters} timed iterations "
          "each\nT | iterative s/iter | parallel s/iter | speedup", flush=True)
    for T in (1, 2, 4, 8, 16):
        stream = data.train_stream(args.data.split(",")[0], 2, T, args.size, args.seed)
        gen = torch.Generator().manual_seed(T)
        clips = [next(stream) for _ in range(args.batch_size)]
        clips = data.fit_batch(clips, np.random.default_rng(T))  # one frame size
        batch = to_device(preprocess(clips, cfg, gen), device)
        sec = []
        for iterative in (True, False):
            train_step(model, opt, batch, iterative)  # warm-up
            _sync()
            t0 = time.time()
            for _ in range(args.bench_iters):
                train_step(model, opt, batch, iterative)
            _sync()
            sec.append((time.time() - t0) / args.bench_iters)
        print(f"{T} | {sec[0]:.3f} | {sec[1]:.3f} | {sec[0] / sec[1]:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
