"""Training AUSM: teacher-forced parallel training over time (paper Sec. 2.3, Alg. 2; Sec. 3 details).

One iteration: `preprocess` gives every ground-truth instance i one ID vector (a distinct random row of B)
and a switch time t_i: a detection target at frames t <= t_i, a tracking target after, its ground-truth
mask in the history from t_i on. The model runs all T frames at once (one selective scan over time).
`criterion`: L = L_trk (fixed ID <-> instance mapping) + L_det (Hungarian matching per frame), Mask2Former
losses with deep supervision. Stages (Sec. 3): 1) 3-frame pseudo-videos of stills, 2) 5-frame videos,
3) 16 frames, backbone frozen. `--iterative` trains frame by frame through model.step (the SAM2-style
baseline); `--benchmark` times both forms (Fig. 4).
What differs ([D] = our decision in PAPER.md):
  - [D] t_i uniform over the frames where i is visible; prompted clips (VOS datasets and synthetic, p 0.5)
    give t_i = 0 with prob. 0.5 to objects visible in frame 1 (y_1 painted on X_0).
  - Losses on the full stride-4 mask (no point sampling), targets area-downsampled to H/4 (soft); one
    foreground logit for every dataset plus the dataset's class head where it has classes.
  - An absent tracked object is "no object" with its mask supervised empty (PAPER.md Sec. 5): prompted output
    is unfiltered, and emptying absent objects' masks alone lifts a model's held-out J&F 0.754 -> 0.849 (measured).
  - The paper sums L over t; we average every term over its targets (queries, masks) in the batch as
    Mask2Former averages over images, so the scale does not grow with T. The normalisers are summed over
    DDP ranks: N ranks give exactly one process's gradients on the combined batch. Gradient norm clip 1.
  - Tiny preset: small model from scratch, higher lr, short schedule, 8-frame clips in stage 2 (see PRESETS).
  - Data and switch times restart from step-derived seeds at each checkpoint, so --resume is exact.
Left out: the VITA-style augmentation (data.py makes the clips), mixed-dataset batches (one dataset
per batch), Mask2Former's point sampling and backbone lr multiplier, --iterative under torchrun.
"""
import argparse
import dataclasses
import itertools
import json
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


# ----------------------------------------------------------------------------- Hungarian matching
def hungarian(cost):  # EXERCISE 6: done when `python -m pytest --exercise 6` passes
    """Minimum-cost assignment like scipy's linear_sum_assignment (shortest augmenting paths, O(n^2 m)).
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
        minv, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=bool)
        while True:
            used[j0], i0 = True, p[j0]
            cur = C[i0 - 1] - u[i0] - v[1:]  # (m,) reduced costs from row i0
            better = ~used[1:] & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            free = np.flatnonzero(~used[1:]) + 1
            j1 = free[np.argmin(minv[free])]
            delta, j0 = minv[j1], j1
            u[p[used]] += delta  # keep the reduced costs of the tree's edges at zero
            v[used] -= delta
            minv[~used] -= delta
            if p[j0] == 0:  # reached a free column: augment
                break
        while j0:  # flip the path's edges
            p[j0], j0 = p[way[j0]], way[j0]
    cols = np.flatnonzero(p[1:])  # matched columns (0-based)
    rows, cols = (p[1:][cols] - 1, cols) if not transposed else (cols, p[1:][cols] - 1)
    order = np.argsort(rows)
    return rows[order], cols[order]


# ----------------------------------------------------------------------------- Alg. 2: teacher forcing
PROMPTED_DATASETS = ("synthetic", "davis", "mose", "ytvos")  # [D] class-agnostic VOS sets (+ synthetic)


def preprocess(clips, cfg, generator, p_prompt=0.5):  # EXERCISE 5: done when `python -m pytest --exercise 5` passes
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
    ids, labels = torch.full((2, Bsz, N), -1, dtype=torch.long)  # (B, N) each: rows of B (-1 = padding), classes
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
def _set_loss(fg, cls, masks, tgt, w, fg_t, cls_t, pick, take, P):
    """Weighted foreground/class CE over queries (w = 0 ignored, 0.1 no object, 1 object) and sigmoid BCE +
    Dice over the (query, instance) pairs pick/take. Returns numerators and normalisers (per prediction)."""
    ce = F.binary_cross_entropy_with_logits(fg, fg_t, reduction="none")  # (P, B, T, Q')
    if cls is not None:  # the dataset's K+1-way head
        ce = ce + F.cross_entropy(cls.flatten(0, 3), cls_t.flatten(), ignore_index=-100,
                                  reduction="none").view_as(fg)
    # EXERCISE: Mask2Former's importance point sampling instead of the full mask; done = the criterion tests pass
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
    lab = torch.where(lab >= 0, lab, torch.full_like(lab, -100))  # no class: ignored by the class CE
    # L_trk: tracking query i <-> instance i (fixed); an absent tracked object is "no object" with an empty mask
    w = (trk * torch.where(vis, 1.0, NO_OBJECT_WEIGHT)).expand(P, -1, -1, -1)  # (P, B, T, N)
    cls_t = torch.where(vis, lab, torch.full_like(lab, K)).expand(P, -1, -1, -1)  # (P, B, T, N)
    b, t, n = trk.nonzero(as_tuple=True)  # (M,) each: every tracked (b, t, i); an absent one's target is empty
    p = torch.arange(P, device=dev).repeat_interleave(len(b))  # (P*M,): every prediction
    b, t, n = b.repeat(P), t.repeat(P), n.repeat(P)  # (P*M,) each
    num_trk, den_trk = _set_loss(fg[..., :N], cls[..., :N, :] if cls is not None else None, masks[:, :, :, :N],
                                 tgt, w, vis.float().expand(P, -1, -1, -1), cls_t, (p, b, t, n), (b, t, n), P)
    # L_det: Hungarian matching per (prediction, sample, frame) of detection queries to detection targets
    with torch.no_grad():
        x, g = masks[:, :, :, N:].flatten(-2), tgt.flatten(-2)[None].transpose(-1, -2)  # (P,B,T,Nd,hw), (1,B,T,hw,N)
        bce = (F.softplus(-x) @ g + F.softplus(x) @ (1 - g)) / x.shape[-1]  # (P, B, T, Nd, N) pairwise
        dice = 1 - (2 * x.sigmoid() @ g + 1) / (x.sigmoid().sum(-1)[..., None] + g.sum(-2)[..., None, :] + 1)
        cost = -fg[..., N:, None].sigmoid() * W_CLS + W_BCE * bce + W_DICE * dice  # (P, B, T, Nd, N)
        if cls is not None:
            prob = cls[..., N:, :].softmax(-1)  # (P, B, T, Nd, K+1)
            idx = lab.clamp(min=0)[None, :, :, None, :].expand(P, -1, -1, Q - N, -1)  # (P, B, T, Nd, N)
            cost = cost - W_CLS * prob.gather(-1, idx) * (lab >= 0)[None, :, :, None, :]
        cost, det = cost.cpu().numpy(), batch["det"].cpu().numpy()
        cost = np.nan_to_num(cost, nan=1e9, posinf=1e9, neginf=-1e9)  # diverged: the loss, not the matcher, says so
    picks = [[], [], [], [], []]  # p, b, t, q, n
    for pi, bi, ti in itertools.product(range(P), range(Bsz), range(T)):
        cand = np.flatnonzero(det[bi, ti])
        if len(cand):
            r, c = hungarian(cost[pi, bi, ti][:, cand])
            for lst, v in zip(picks, (pi, bi, ti, r, cand[c])):
                lst.extend(np.broadcast_to(v, r.shape).tolist())
    p, b, t, q, n = (torch.tensor(v, dtype=torch.long, device=dev) for v in picks)  # (matched pairs,) each
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
def forward(model, batch, iterative=False):
    """Parallel form (Alg. 2: one scan over T) or the iterative baseline (Alg. 1's model.step frame by frame,
    SAM2-style) with the same teacher-forced history. Both -> out with the T axis: (P, B, T, Q, ...)."""
    frames, ids, history, tracked = batch["frames"], batch["ids"], batch["history"], batch["tracked"]
    if not iterative:
        return model(frames, ids, history, tracked, batch["dataset"])
    Bsz, T, _, H, W = frames.shape  # (B, T, 3, H, W)
    state = model.init_state(Bsz, ids.shape[1], H, W, ids=ids)
    outs = []
    for t in range(T):  # teacher forcing: A_{t-1} = tracked slots, M_{t-1} = ground truth
        state.alloc, state.M = tracked[:, t], history[:, t]  # (B, N), (B, N, H, W)
        out, state = model.step(frames[:, t], state, batch["dataset"])  # (P, B, Q, ...); autograd through state
        outs.append(out)
    return {k: None if outs[0][k] is None else torch.stack([o[k] for o in outs], 2) for k in outs[0]}  # (P, B, T, ..)


def train_step(model, opt, batch, iterative=False, clip=1.0):
    """One iteration: forward (bf16 autocast on CUDA), criterion in fp32, backward, AdamW step.
    Returns (loss averaged over ranks, parts), or (non-finite loss, parts) without stepping."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch["frames"].is_cuda):
        out = forward(model, batch, iterative)
    loss, parts = criterion(out, batch)
    total = torch.tensor([loss.item(), *parts.values()], device=loss.device)  # (1 + 6,)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)  # every rank sees the same values (and stops together on nan)
        total /= torch.distributed.get_world_size()
    total, parts = total[0].item(), dict(zip(parts, total[1:].tolist()))
    if not math.isfinite(total):
        return total, parts
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], clip)
    opt.step()
    return total, parts


# ----------------------------------------------------------------------------- checkpoints, schedule, evaluation
def save_checkpoint(path, model, opt, step, cfg, args):
    """Model, optimizer, step, config, RNG states; written to a temp file, then renamed (atomic)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(cfg), "optimizer": opt.state_dict(),
                "step": step, "stage": args.stage, "args": vars(args), "rng": rng}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found: for --stage 2 / 3 train the previous stage first "
                                f"(python train.py --stage 1) or pass --init CKPT; --resume reads <--out>/ckpt.pt")
    return torch.load(path, map_location="cpu", weights_only=False)


def lr_at(step, args):
    """Linear warm-up over the first 5% of iterations, then cosine decay to 10% of --lr."""
    warm = max(1, args.max_iters // 20)
    cosine = 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, args.max_iters - warm)))
    return args.lr * (step / warm if step <= warm else cosine)


def evaluate(model, cfg, out_dir=None):
    """End-of-run evaluation (issue 7): infer.py's Segmenter on data.heldout("synthetic"), prompted J&F
    (DAVIS protocol) and unprompted video AP (YouTube-VIS protocol). Returns a dict of scores."""
    import infer
    with torch.no_grad():
        scores = infer.evaluate_heldout(model, cfg)  # {"J&F", "J", "F", "AP", "AP50", "AR10"}
    print("heldout synthetic | " + " | ".join(f"{k} {v:.3f}" for k, v in scores.items()), flush=True)
    if out_dir:
        with open(os.path.join(out_dir, "eval.json"), "w") as f:
            json.dump(scores, f, indent=1)
    return scores


# ----------------------------------------------------------------------------- the command line
# frames per clip: the paper's 3 / 5 / 16; tiny stage 2 uses 8 (measured: held-out J&F 0.729 -> 0.772, AP 0.352 ->
# 0.438 at equal frames seen): held-out objects leave the frame for up to 11 frames, which 5-frame clips rarely show
PRESETS = {"tiny": dict(batch_size=4, lr=1e-3, iters={1: 2000, 2: 750, 3: 200}, frames={1: 3, 2: 8, 3: 16},
                        time_limit=13.0),
           "paper": dict(batch_size=16, lr=1e-4, iters={1: 147_500, 2: 32_000, 3: 40_000}, frames={1: 3, 2: 5, 3: 16},
                         time_limit=0.0)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train AUSM (Alg. 2, teacher-forced parallel training).")
    ap.add_argument("--stage", type=int, default=1, choices=(1, 2, 3), help="1: 3-frame pseudo-videos of stills; "
                    "2: 5-frame videos (tiny: 8) from stage 1's checkpoint; 3: 16 frames, backbone frozen, from 2's")
    ap.add_argument("--preset", default="tiny", choices=tuple(PRESETS),
                    help="model size and schedule: tiny (CPU, minutes) or paper (Sec. 3.1 sizes, lr 1e-4, batch 16)")
    ap.add_argument("--data", default="synthetic", help="dataset spec for data.train_stream: synthetic, davis:DIR, "
                    "mose:DIR, ytvos:DIR, coco:JSON:IMGDIR, ytvis19:JSON:IMGDIR, ytvis21:..., ovis:...")
    ap.add_argument("--frames", type=int, help="frames per clip T (stages 1/2/3: paper 3/5/16, tiny 3/8/16)")
    ap.add_argument("--size", type=int, help="frame size H = W, a multiple of 8 (default: the preset's image_size)")
    ap.add_argument("--batch-size", type=int, help="clips per iteration per process (default: preset's)")
    ap.add_argument("--max-iters", type=int, help="training iterations (default: preset's, per stage)")
    ap.add_argument("--lr", type=float, help="AdamW peak learning rate (default: preset's); warm-up then cosine")
    ap.add_argument("--out", help="folder for ckpt.pt and eval.json (default runs/stage<N>)")
    ap.add_argument("--init", help="weights to start from (default for stages 2/3: runs/stage<N-1>/ckpt.pt)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt: model, optimizer, step, RNG")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    ap.add_argument("--iterative", action="store_true", help="train frame by frame through model.step (SAM2-style)")
    ap.add_argument("--benchmark", action="store_true", help="time both forms at T = 1..16 (paper Fig. 4) and exit")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch's default, one per core: "
                    "1.6x faster than 1 on an idle 2-core machine); on a busy shared one try --threads 1")
    ap.add_argument("--log-every", type=int, default=10, help="iterations per log line")
    ap.add_argument("--ckpt-every", type=int, default=100, help="iterations between checkpoints")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model init, the data and the switch times")
    ap.add_argument("--time-limit", type=float, help="stop and save after this many minutes (0 = never; default: "
                    "13 for tiny, 0 for paper)")
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    ap.add_argument("--bench-iters", type=int, default=3, help="--benchmark: timed iterations per form and T")
    args = ap.parse_args(argv)
    pre = PRESETS[args.preset]
    args.frames = args.frames or pre["frames"][args.stage]
    args.batch_size = args.batch_size or (2 if args.benchmark else pre["batch_size"])
    args.max_iters = args.max_iters or pre["iters"][args.stage]
    args.lr = args.lr or pre["lr"]
    args.time_limit = pre["time_limit"] if args.time_limit is None else args.time_limit
    args.out = args.out or f"runs/stage{args.stage}"
    if args.init is None and args.stage > 1 and not args.resume and not args.benchmark:
        args.init = f"runs/stage{args.stage - 1}/ckpt.pt"
    return args


def data_from(args, step, rank, world):
    """The data stream and the switch-time generator restart from seeds derived from the step at every
    checkpoint, so a resumed run sees exactly what an uninterrupted one does (without replaying the stream)."""
    import data
    seed = args.seed * 1_000_003 + step
    return (data.train_stream(args.data, stage=args.stage, T=args.frames, size=args.size, seed=seed, rank=rank,
                              world=world), torch.Generator().manual_seed(seed * 1000 + rank))


def main(argv=None, **overrides):
    """Train (or --benchmark). overrides: Config fields for a fresh model (tests use tiny shapes)."""
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if dev == "cuda" and world > 1 else dev)
    if world > 1:
        if args.iterative or args.benchmark:
            raise ValueError("--iterative and --benchmark run in one process; launch without torchrun")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # this rank's GPU (LOCAL_RANK)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = os.path.join(args.out, "ckpt.pt")
    ck = load_checkpoint(ckpt if args.resume else args.init) if args.resume or args.init else None
    resume = ck if args.resume else None
    preset = ausm.Config.tiny if args.preset == "tiny" else ausm.Config.paper
    cfg = ausm.Config(**ck["config"]) if ck else preset(**overrides)
    args.size = args.size or cfg.image_size
    model = ausm.AUSM(cfg).to(device)
    if ck:
        model.load_state_dict(ck["model"])
    if args.stage == 3:  # only temporal modules and heads train (Sec. 3)
        model.backbone.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    step = resume["step"] if resume else 0
    if resume:  # (the data and the switch times restart from `step`, see data_from)
        opt.load_state_dict(resume["optimizer"]), torch.set_rng_state(resume["rng"]["torch"])
    if rank == 0:
        path = kernels.SCAN_PATH if kernels.SCAN_PATH != "auto" else ("triton" if device.type == "cuda" else "torch")
        print(f"device {device} ({'bf16 autocast' if device.type == 'cuda' else 'float32'}) x {world} | AUSM "
              f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
              f"({sum(p.numel() for p in params) / 1e6:.2f}M trained) | scan path: {path} | stage {args.stage}, "
              f"T={args.frames}, {args.size}x{args.size}, batch {args.batch_size}x{world}, from "
              f"{'step %d of %s' % (step, args.out) if resume else args.init or 'scratch'}", flush=True)
    if args.benchmark:
        return benchmark(model, opt, cfg, args, device)
    unused = any(name != args.data.partition(":")[0] for name, _ in cfg.class_heads)  # other datasets' heads
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused) if world > 1 else model
    (stream, gen), sums, n, t_start, t_log = data_from(args, step, rank, world), {}, 0, time.time(), time.time()
    while step < args.max_iters:
        batch = to_device(preprocess([next(stream) for _ in range(args.batch_size)], cfg, gen), device)
        step += 1
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss, parts = train_step(model if args.iterative else net, opt, batch, args.iterative)
        if not math.isfinite(loss):
            good = f"{ckpt} (step {load_checkpoint(ckpt)['step']})" if os.path.exists(ckpt) else "none written yet"
            print(f"step {step}: loss is {loss}; stopping. Last good checkpoint: {good}. Try a lower --lr.", flush=True)
            return 1
        sums, n = {k: sums.get(k, 0.0) + v for k, v in {"loss": loss, **parts}.items()}, n + 1
        out_of_time = torch.tensor(float(args.time_limit > 0 and time.time() - t_start > 60 * args.time_limit),
                                   device=device)  # (nccl reduces CUDA tensors only)
        if world > 1:  # every rank stops at the same step
            torch.distributed.all_reduce(out_of_time, torch.distributed.ReduceOp.MAX)
        if step % args.log_every == 0 or step == args.max_iters or out_of_time:
            dt = time.time() - t_log
            if rank == 0:
                print(f"step {step:6d} | " + " ".join(f"{k} {v / n:7.4f}" for k, v in sums.items()) +
                      f" | lr {lr_at(step, args):.2e} | {1000 * dt / n:6.0f} ms/iter | "
                      f"{n * args.batch_size * world * args.frames / dt:6.1f} frames/s", flush=True)
            sums, n, t_log = {}, 0, time.time()
        if step % args.ckpt_every == 0 or step == args.max_iters or out_of_time:
            if rank == 0:
                save_checkpoint(ckpt, model, opt, step, cfg, args)
            stream, gen = data_from(args, step, rank, world)
        if out_of_time and rank == 0:
            print(f"time limit of {args.time_limit} min reached at step {step}; checkpoint saved", flush=True)
        if out_of_time:
            break
    if rank == 0 and not args.no_eval:
        evaluate(model.eval(), cfg, args.out)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def benchmark(model, opt, cfg, args, device):
    """Paper Fig. 4: seconds per full training iteration (forward, backward, AdamW step) of the iterative
    (frame-by-frame) and the parallel form at T = 1, 2, 4, 8, 16 on the same batch, after one warm-up."""
    import data
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    print(f"batch {args.batch_size}, {args.size}x{args.size}, {args.bench_iters} timed iterations each\n"
          "T | iterative s/iter | parallel s/iter | speedup", flush=True)
    for T in (1, 2, 4, 8, 16):
        stream, gen = data.train_stream(args.data, 2, T, args.size, args.seed), torch.Generator().manual_seed(T)
        batch = to_device(preprocess([next(stream) for _ in range(args.batch_size)], cfg, gen), device)
        sec = []
        for iterative in (True, False):
            for i in range(args.bench_iters + 1):  # the first is the warm-up
                if i == 1:
                    sync(), (t0 := time.time())
                train_step(model, opt, batch, iterative)
            sync()
            sec.append((time.time() - t0) / args.bench_iters)
        print(f"{T} | {sec[0]:.3f} | {sec[1]:.3f} | {sec[0] / sec[1]:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
