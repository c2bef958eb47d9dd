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
import itertools
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import ausm
import kernels

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


# ----------------------------------------------------------------------------- Alg. 2: teacher forcing
PROMPTED_DATASETS = ("synthetic", "davis", "mose", "ytvos")  # [D] class-agnostic VOS sets (+ synthetic)


def preprocess(clips, cfg, generator, p_prompt=0.5):
    """B Clips (same T, H, W and dataset) -> the teacher-forced batch of Alg. 2 (paper steps t = 1..T).

    Instance i of sample b gets ids[b, i] (a distinct random row of the ID buffer B) and a switch time
    t_i in 0..T: a detection target at steps t <= t_i where visible, tracked (a tracking target, painted
    in the history) at steps t > t_i. Slots are padded to the batch's largest N with id -1."""
    if not clips:
        raise ValueError("preprocess: got an empty list of clips")
    T, _, H, W = clips[0].frames.shape
    for c in clips:
        if c.frames.shape != clips[0].frames.shape or c.masks.shape[1:] != (T, H, W):
            raise ValueError(f"preprocess: clip {c.name!r} has frames {tuple(c.frames.shape)} and masks "
                             f"{tuple(c.masks.shape)}; every clip of a batch needs frames {(T, 3, H, W)}")
        if c.dataset != clips[0].dataset:
            raise ValueError(f"preprocess: one dataset per batch, got {c.dataset!r} and {clips[0].dataset!r}")
    Bsz, N = len(clips), max(1, max(c.masks.shape[0] for c in clips))
    if N > cfg.N_id:
        raise ValueError(f"preprocess: a clip has {N} objects but the ID buffer holds N_id = {cfg.N_id}")
    ids = torch.full((Bsz, N), -1, dtype=torch.long)  # (B, N) rows of B; -1 = padding slot
    labels = torch.full((Bsz, N), -1, dtype=torch.long)  # (B, N)
    y = torch.zeros(Bsz, N, T, H, W, dtype=torch.bool)  # (B, N, T, H, W) ground truth y_t^i
    switch = torch.full((Bsz, N), T, dtype=torch.long)  # (B, N) t_i; T = never tracked
    prompted = torch.zeros(Bsz, dtype=torch.bool)
    for b, c in enumerate(clips):
        n = c.masks.shape[0]
        ids[b, :n] = torch.randperm(cfg.N_id, generator=generator)[:n]  # A = Sampler(B, N_gt)
        labels[b, :n], y[b, :n] = c.labels, c.masks.bool()
        prompted[b] = c.dataset in PROMPTED_DATASETS and bool(torch.rand(1, generator=generator) < p_prompt)
        for i in range(n):
            seen = c.masks[i].flatten(1).any(1).nonzero()[:, 0] + 1  # paper frames (1-based) where i is visible
            if len(seen) == 0:
                continue
            switch[b, i] = seen[torch.randint(len(seen), (1,), generator=generator)]  # t_i ~ U(visible frames)
            if prompted[b] and seen[0] == 1 and bool(torch.rand(1, generator=generator) < 0.5):
                switch[b, i] = 0  # a prompt: y_1 painted on X_0
    t = torch.arange(1, T + 1)  # paper step t
    visible = y.flatten(3).any(3).transpose(1, 2)  # (B, T, N)
    tracked = t[None, :, None] > switch[:, None, :]  # (B, T, N): i in A_{t-1} at step t
    y_prev = torch.cat([y[:, :, :1], y[:, :, :-1]], dim=2)  # (B, N, T, H, W): y_{t-1}; y_1 at t = 1 (prompt)
    history = (y_prev.transpose(1, 2) & tracked[..., None, None]).float()  # (B, T, N, H, W) = M_{t-1}
    targets = F.avg_pool2d(y.transpose(1, 2).flatten(0, 2)[:, None].float(), 4)  # (B*T*N, 1, H/4, W/4)
    return {"frames": torch.stack([c.frames for c in clips]),  # (B, T, 3, H, W)
            "ids": ids, "history": history, "tracked": tracked, "labels": labels, "switch": switch,
            "visible": visible, "det": visible & ~tracked,  # (B, T, N): detection targets
            "targets": targets.view(Bsz, T, N, H // 4, W // 4),  # (B, T, N, H/4, W/4) soft masks
            "prompted": prompted, "dataset": clips[0].dataset}


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------- losses (Sec. 2.3, Mask2Former)
def _mask_costs(logits, tgt):
    """logits (..., Q, hw), tgt (..., N, hw) -> pairwise sigmoid-BCE and Dice costs (..., Q, N)."""
    hw = logits.shape[-1]
    bce = (F.softplus(-logits) @ tgt.transpose(-1, -2) + F.softplus(logits) @ (1 - tgt).transpose(-1, -2)) / hw
    s = logits.sigmoid()
    dice = 1 - (2 * s @ tgt.transpose(-1, -2) + 1) / (s.sum(-1)[..., :, None] + tgt.sum(-1)[..., None, :] + 1)
    return bce, dice


def _set_loss(fg, cls, masks, tgt, w, fg_t, cls_t, pick, take, P):
    """Weighted foreground/class CE over queries (w = 0 ignored, 0.1 no object, 1 object) and sigmoid BCE +
    Dice over the (query, instance) pairs pick/take. Returns numerators and normalisers (per prediction)."""
    ce = F.binary_cross_entropy_with_logits(fg, fg_t, reduction="none")  # (P, B, T, Q')
    if cls is not None:  # the dataset's K+1-way head
        ce = ce + F.cross_entropy(cls.flatten(0, 3), cls_t.flatten(), ignore_index=-100,
                                  reduction="none").view_as(fg)
    pred, gt = masks[pick].flatten(1), tgt[take].flatten(1)  # (M, hw)
    bce = F.binary_cross_entropy_with_logits(pred, gt, reduction="none").mean(1)  # (M,)
    s = pred.sigmoid()
    dice = 1 - (2 * (s * gt).sum(1) + 1) / (s.sum(1) + gt.sum(1) + 1)  # (M,)
    num = torch.stack([(ce * w).sum(), bce.sum(), dice.sum()])
    den = torch.stack([w.sum() / P, torch.tensor(float(len(bce)) / P, device=w.device)])
    return num, den


def criterion(out, batch):
    """L = L_trk + L_det summed over the P deep-supervision predictions -> (loss, parts of floats).

    Under DDP the normalisers are summed over ranks (and the loss scaled by the world size) so that the
    averaged gradients equal one process's on the combined batch."""
    fg, masks = out["fg"].float(), out["masks"].float()  # (P, B, T, Q), (P, B, T, Q, h, w)
    cls = out["cls"].float() if out.get("cls") is not None else None  # (P, B, T, Q, K+1)
    P, Bsz, T, Q = fg.shape
    N, dev = batch["ids"].shape[1], fg.device
    tgt, vis, trk = batch["targets"].float(), batch["visible"], batch["tracked"]  # (B, T, N, h, w), (B, T, N)
    K = cls.shape[-1] - 1 if cls is not None else 0
    lab = batch["labels"][:, None, :].expand(Bsz, T, N)  # (B, T, N)
    lab = torch.where(lab >= 0, lab, torch.full_like(lab, -100))
    # L_trk: tracking query i <-> instance i (fixed); an absent tracked object is "no object", no mask loss
    w = (trk * torch.where(vis, 1.0, NO_OBJECT_WEIGHT)).expand(P, -1, -1, -1)  # (P, B, T, N)
    cls_t = torch.where(vis, lab, torch.full_like(lab, K)).expand(P, -1, -1, -1)  # (P, B, T, N)
    b, t, n = (trk & vis).nonzero(as_tuple=True)
    p = torch.arange(P, device=dev).repeat_interleave(len(b))
    b, t, n = b.repeat(P), t.repeat(P), n.repeat(P)
    num_trk, den_trk = _set_loss(fg[..., :N], cls[..., :N, :] if cls is not None else None, masks[:, :, :, :N],
                                 tgt, w, vis.float().expand(P, -1, -1, -1), cls_t, (p, b, t, n), (b, t, n), P)
    # L_det: Hungarian matching per (prediction, sample, frame) of detection queries to detection targets
    with torch.no_grad():
        bce_c, dice_c = _mask_costs(masks[:, :, :, N:].flatten(-2), tgt.flatten(-2)[None])  # (P, B, T, Nd, N)
        cost = -fg[..., N:, None].sigmoid() * W_CLS + W_BCE * bce_c + W_DICE * dice_c  # (P, B, T, Nd, N)
        if cls is not None:
            prob = cls[..., N:, :].softmax(-1)  # (P, B, T, Nd, K+1)
            idx = lab.clamp(min=0)[None, :, :, None, :].expand(P, -1, -1, Q - N, -1)  # (P, B, T, Nd, N)
            cost = cost - W_CLS * prob.gather(-1, idx) * (lab >= 0)[None, :, :, None, :]
        cost, det = cost.cpu().numpy(), batch["det"].cpu().numpy()
    picks = [[], [], [], [], []]  # p, b, t, q, n
    for pi, bi, ti in itertools.product(range(P), range(Bsz), range(T)):
        cand = np.flatnonzero(det[bi, ti])
        if len(cand):
            r, c = hungarian(cost[pi, bi, ti][:, cand])
            for lst, v in zip(picks, (pi, bi, ti, r, cand[c])):
                lst.extend(np.broadcast_to(v, r.shape).tolist())
    p, b, t, q, n = (torch.tensor(v, dtype=torch.long, device=dev) for v in picks)
    w = torch.full((P, Bsz, T, Q - N), NO_OBJECT_WEIGHT, device=dev)  # (P, B, T, Nd)
    fg_t, cls_t = torch.zeros_like(w), torch.full(w.shape, K, dtype=torch.long, device=dev)
    w[p, b, t, q], fg_t[p, b, t, q], cls_t[p, b, t, q] = 1.0, 1.0, lab[b, t, n]
    num_det, den_det = _set_loss(fg[..., N:], cls[..., N:, :] if cls is not None else None, masks[:, :, :, N:],
                                 tgt, w, fg_t, cls_t, (p, b, t, q), (b, t, n), P)
    den, scale = torch.cat([den_trk, den_det]), 1.0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(den)
        scale = float(torch.distributed.get_world_size())
    terms = scale * torch.cat([num_trk / den[[0, 1, 1]].clamp(min=1e-6), num_det / den[[2, 3, 3]].clamp(min=1e-6)])
    terms = terms * torch.tensor([W_CLS, W_BCE, W_DICE] * 2, device=dev)  # (6,)
    names = ("trk_cls", "trk_bce", "trk_dice", "det_cls", "det_bce", "det_dice")
    return terms.sum(), dict(zip(names, terms.detach().tolist()))



# ----------------------------------------------------------------------------- both forms of the model
def _state_update_with_grad(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """kernels.selective_state_update overwrites the state in place (inference), which autograd cannot
    differentiate; the iterative trainer runs the differentiable scan at L = 1 instead (same math)."""
    y, new = kernels.selective_scan(x[..., None], dt[..., None], A, B[..., None], C[..., None], D,
                                    None if z is None else z[..., None], dt_bias, dt_softplus,
                                    return_last_state=True, initial_state=state.clone())  # (b, d, 1), (b, d, n)
    state.copy_(new)  # (b, d, n): Mamba.step hands us a fresh clone; autograd records the copy
    return y[..., 0]  # (b, d)


def forward(model, batch, iterative=False):
    """Parallel form (Alg. 2: one scan over T) or the iterative baseline (Alg. 1's model.step frame by frame,
    SAM2-style) with the same teacher-forced history. Both -> out with the T axis: (P, B, T, Q, ...)."""
    frames, ids, history, tracked = batch["frames"], batch["ids"], batch["history"], batch["tracked"]
    if not iterative:
        return model(frames, ids, history, tracked, batch["dataset"])
    Bsz, T, _, H, W = frames.shape  # (B, T, 3, H, W)
    state = model.init_state(Bsz, ids.shape[1], H, W, ids=ids)
    state.X_prev = model.X_0.view(1, -1, 1, 1).expand_as(state.X_prev)  # (B, D, h, w); keep X_0 in the graph
    outs, inference_update = [], ausm.selective_state_update
    ausm.selective_state_update = _state_update_with_grad
    try:
        for t in range(T):  # teacher forcing: A_{t-1} = tracked slots, M_{t-1} = ground truth
            state.alloc, state.M = tracked[:, t], history[:, t]  # (B, N), (B, N, H, W)
            out, state = model.step(frames[:, t], state, batch["dataset"])  # (P, B, Q, ...)
            outs.append(out)
    finally:
        ausm.selective_state_update = inference_update
    return {k: None if outs[0][k] is None else torch.stack([o[k] for o in outs], 2) for k in outs[0]}


def train_step(model, opt, batch, iterative=False, clip=1.0):
    """One iteration: forward (bf16 autocast on CUDA), criterion in fp32, backward, AdamW step.
    Returns (loss averaged over ranks, parts), or (non-finite loss, parts) without stepping."""
    cuda = batch["frames"].is_cuda
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        out = forward(model, batch, iterative)
    loss, parts = criterion(out, batch)
    total = loss.detach().clone()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)  # every rank sees the same value (and stops together on nan)
        total /= torch.distributed.get_world_size()
    if not torch.isfinite(total):
        return total.item(), parts
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    opt.step()
    return total.item(), parts
