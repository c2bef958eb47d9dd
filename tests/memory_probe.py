"""Memory probe (issue 17): can a tracking query find its object when the history does not show it?

Teacher forcing paints every visible tracked object in the history (M_{t-1} = y_{t-1}), so a query
only ever has to follow its own paint from the frame before; recurrent inference paints the model's
own masks, and once a mask is missed (an object that left the frame, or one too small to see) the
object is unpainted until its query finds it again. This script measures both sides of that gap on
held-out synthetic videos (data.heldout), prompted: every frame-0 object tracked from the prompt.

  1. Teacher-forced, a visible object's paint removed for K frames (from frame 8 on): the mean IoU
     of its tracking mask k = 0..K-1 frames into the gap (painted: the same frames with the paint).
  2. Teacher-forced, after each return to the frame, the first K frames unpainted (as in inference
     until the query finds it): IoU k frames after the return.
  3. Recurrent (infer.Segmenter) on longer videos, prompted J&F with the model's own masks as M_t
     (Alg. 1) and with the ground-truth masks written into M_t instead (an oracle history).
  4. How much of an object's ID the History Compressor's output F_t still carries on the object's
     cells k frames after its paint stops (`memory_signal`).

    python tests/memory_probe.py --checkpoint runs/stage3/ckpt.pt [--videos 32] [--frames 24]
        [--gap 6] [--long 128] [--long-videos 8]

One thread; about 4 minutes for the defaults. The numbers are in README "Long videos".
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
import infer  # noqa: E402

GAP_START = 8  # probe 1: the first frame whose paint is removed


def teacher_forced_masks(model, clip, unpainted):
    """Frame-0 objects tracked from the prompt with ground-truth history, except where unpainted
    (T, N) is True (frame t's mask not painted) -> bool (T, N, H, W) tracking masks, final layer."""
    T = len(clip.frames)
    N = clip.masks.shape[0]
    first = clip.masks[:, 0].flatten(1).any(1)  # (N,)
    ids = torch.randperm(model.cfg.N_id, generator=torch.Generator().manual_seed(0))[:N]  # (N,)
    ids = torch.where(first, ids, torch.full_like(ids, -1))  # objects not in frame 0: no slot
    tracked = first[None].expand(T, N)  # (T, N): the prompt makes them tracked from step 1
    y = clip.masks.transpose(0, 1) & ~unpainted[..., None, None]  # (T, N, H, W): painted masks
    history = torch.cat([y[:1], y[:-1]])  # (T, N, H, W): step t shows y_{t-1} (y_0 on X_0)
    with torch.no_grad():
        out = model(clip.frames[None], ids[None], history[None].float(), tracked[None])
    logits = out["masks"][-1, 0, :, :N]  # (T, N, H/4, W/4)
    return F.interpolate(logits, size=clip.masks.shape[-2:], mode="bilinear") > 0  # (T, N, H, W)


def iou(a, b):
    return ((a & b).sum() / (a | b).sum().clamp(min=1)).item()


def gap_in_view(model, clips, K, painted):
    """Probe 1 -> mean IoU k = 0..K-1 frames into a K-frame gap of objects in view throughout."""
    sums = np.zeros((K, 2))  # (K, [IoU sum, count])
    t0 = GAP_START
    for clip in clips:
        T, N = len(clip.frames), clip.masks.shape[0]
        visible = clip.masks.flatten(2).any(2).T  # (T, N)
        probed = clip.masks[:, 0].flatten(1).any(1) & visible[t0:t0 + K + 1].all(0)  # (N,)
        unpainted = torch.zeros(T, N, dtype=torch.bool)  # (T, N)
        if not painted:
            unpainted[t0:t0 + K] = probed
        masks = teacher_forced_masks(model, clip, unpainted)  # (T, N, H, W)
        for i in probed.nonzero()[:, 0].tolist():
            for k in range(K):
                sums[k] += (iou(masks[t0 + k + 1, i], clip.masks[i, t0 + k + 1]), 1)
    return sums[:, 0] / np.maximum(sums[:, 1], 1), int(sums[0, 1])


def compressor_outputs(model, clip, unpainted):
    """F_1..F_T of teacher_forced_masks' run -> (T, P, D), read by a hook on the compressor."""
    kept = []

    def keep(module, inputs, output):
        kept.append(output[0])  # (T, P, D) of the one clip
    handle = model.compressor.register_forward_hook(keep)
    teacher_forced_masks(model, clip, unpainted)
    handle.remove()
    return kept[0]


def memory_signal(model, clips, K):
    """Probe 4 -> for k = 0..K: how much of an object's ID the compressor output F_t still carries
    on the object's cells k frames after its paint stops (k = 0: the last painted frame), as
    |F(painted until frame 7) - F(never painted)| / |F(always painted) - F(never painted)|."""
    sums = np.zeros((K + 1, 2))  # (K + 1, [ratio sum, count])
    t0 = GAP_START
    for clip in clips:
        T, N = len(clip.frames), clip.masks.shape[0]
        visible = clip.masks.flatten(2).any(2).T  # (T, N)
        probed = clip.masks[:, 0].flatten(1).any(1) & visible[t0:t0 + K + 1].all(0)  # (N,)
        if not probed.any():
            continue
        always = compressor_outputs(model, clip, torch.zeros(T, N, dtype=torch.bool))  # (T, P, D)
        for i in probed.nonzero()[:, 0].tolist():
            runs = []
            for first_unpainted in (t0, 0):  # the gap, never painted
                unpainted = torch.zeros(T, N, dtype=torch.bool)  # (T, N)
                unpainted[first_unpainted:, i] = True
                runs.append(compressor_outputs(model, clip, unpainted))  # (T, P, D)
            gap, never = runs
            for k in range(K + 1):
                mask = clip.masks[i, t0 + k][None, None].float()  # (1, 1, H, W)
                cells = F.avg_pool2d(mask, 8).flatten() > 0.5  # (P,): the object's cells
                if not cells.any():
                    continue
                kept = (gap[t0 + k] - never[t0 + k])[cells].norm(dim=-1).mean()
                full = (always[t0 + k] - never[t0 + k])[cells].norm(dim=-1).mean()
                sums[k] += ((kept / full.clamp(min=1e-9)).item(), 1)
    return sums[:, 0] / np.maximum(sums[:, 1], 1)


def after_returns(model, clips, K):
    """Probe 2 -> mean IoU k = 0..K-1 frames after a return, its first K frames unpainted."""
    sums = np.zeros((K, 2))  # (K, [IoU sum, count])
    for clip in clips:
        T, N = len(clip.frames), clip.masks.shape[0]
        visible = clip.masks.flatten(2).any(2).T  # (T, N)
        first = clip.masks[:, 0].flatten(1).any(1)  # (N,)
        unpainted = torch.zeros(T, N, dtype=torch.bool)  # (T, N)
        returns = []
        for i in first.nonzero()[:, 0].tolist():
            for f in range(1, T):
                if visible[f, i] and not visible[f - 1, i]:
                    unpainted[f:f + K, i] = True
                    returns.append((i, f))
        masks = teacher_forced_masks(model, clip, unpainted)  # (T, N, H, W)
        for i, f in returns:
            for k in range(min(K, T - f)):
                if visible[f + k, i]:
                    sums[k] += (iou(masks[f + k, i], clip.masks[i, f + k]), 1)
    return sums[:, 0] / np.maximum(sums[:, 1], 1), int(sums[0, 1])


class TruthSegmenter(infer.Segmenter):
    """Alg. 1 with the ground-truth masks of frame t written into M_t (an oracle history)."""

    def __init__(self, model, truth, **kw):
        super().__init__(model, "prompted", **kw)
        self.truth = truth  # (N, T, H, W) bool: object k - 1 is prompted id k

    def step(self, frame, prompts=None):
        ids, scores = super().step(frame, prompts)
        for k, i in self.slot.items():
            self.state.M[0, i] = self.truth[k - 1, self.t - 1]  # (H, W): the step just taken
        return ids, scores


def recurrent_jf(model, clips, oracle):
    """Probe 3 -> prompted J&F (DAVIS protocol) of Alg. 1, with the model's or the true masks."""
    sequences = []
    for v, clip in enumerate(clips, 1):
        T = len(clip.frames)
        first = clip.masks[clip.masks[:, 0].flatten(1).any(1)]  # (n, T, H, W)
        gt = infer._id_maps(first, range(1, len(first) + 1))  # (T, H, W)
        seed = infer.sampler_seed(0, v)
        seg = infer.Segmenter(model, "prompted", seed=seed)
        if oracle:
            seg = TruthSegmenter(model, first, seed=seed)
        pred = []
        for t in range(T):
            prompts = None
            if t == 0:
                prompts = {k: gt[0] == k for k in range(1, len(first) + 1)}
            pred.append(seg.step(clip.frames[t], prompts)[0])
        sequences.append((clip.name, gt, np.stack(pred)))
    return infer.davis_scores(sequences)["J&F-Mean"]


def numbers(values):
    return [f"{x:.3f}" for x in values]


def row(label, cells):  # one line of the printed table
    return f"{label:<44} | " + " ".join(cells)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/stage3/ckpt.pt", help="the model to probe")
    ap.add_argument("--videos", type=int, default=32, help="held-out videos for probes 1-2")
    ap.add_argument("--frames", type=int, default=24, help="frames per video for probes 1-2")
    ap.add_argument("--gap", type=int, default=6, help="K: unpainted frames per gap")
    ap.add_argument("--long", type=int, default=128, help="frames per video for probe 3")
    ap.add_argument("--long-videos", type=int, default=8, help="videos for probe 3")
    args = ap.parse_args()
    if args.frames < GAP_START + args.gap + 1:
        need = GAP_START + args.gap + 1
        ap.error(f"--frames {args.frames}: at least {need} for --gap {args.gap}")
    torch.set_num_threads(1)
    model = infer.load_model(args.checkpoint).eval()
    size = model.cfg.image_size
    clips = data.heldout("synthetic", args.videos, args.frames, size)
    K = args.gap
    painted, n = gap_in_view(model, clips, K, painted=True)
    gapped, _ = gap_in_view(model, clips, K, painted=False)
    returned, m = after_returns(model, clips, K)
    kept = memory_signal(model, clips, K)
    print(f"{args.checkpoint}: {args.videos} held-out videos of {args.frames} frames")
    print(row("k (frames into the gap)", [f"{k:5d}" for k in range(K)]))
    print(row(f"1. in view, painted ({n} objects)", numbers(painted)))
    print(row(f"1. in view, unpainted from frame {GAP_START}", numbers(gapped)))
    print(row(f"2. after a return, unpainted ({m} returns)", numbers(returned)))
    print(row("4. ID signal kept in F_t (k = 0: painted)", numbers(kept)))
    long_clips = data.heldout("synthetic", args.long_videos, args.long, size)
    own = recurrent_jf(model, long_clips, oracle=False)
    truth = recurrent_jf(model, long_clips, oracle=True)
    print(f"3. recurrent, {args.long_videos} videos of {args.long} frames: prompted J&F {own:.3f} "
          f"with its own masks as M_t, {truth:.3f} with the true masks")


if __name__ == "__main__":
    main()
