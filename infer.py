"""infer.py -- run AUSM over videos frame by frame and score the outputs the way the benchmarks do.

Inference (Alg. 1, Sec. 3.4 test-time scaling, PAPER.md Sec. 6): `Segmenter` streams frames through
model.step with a constant-size State, prompted (VOS; masks on any frame) or unprompted (VIS); the CLI writes palette
PNGs, a YouTube-VIS results.json and an overlay GIF. Differs: frames are resized to the square image_size (masks
back); unprompted, only a frame's top-k detections join, and results.json keeps a video's top-k (track, category)
pairs, so a track may score several categories, as Mask2Former-VIS writes them. Metrics (Sec. 3, numpy, checked
against the reference tools' golden files): DAVIS J&F as davis2017-evaluation's semi-supervised protocol (first and
last frame not scored, objects = 1..max id of the first ground-truth frame, object-weighted); video AP/AR as the
YouTube-VIS cocoapi fork. Left out: OVIS occlusion buckets, YouTube-VOS G (needs the server's seen/unseen lists), DAVIS
void pixels (255 = background), the unsupervised DAVIS protocol, box/point prompts; results.json is held in memory.
"""
import argparse
import itertools
import json
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import ausm
from data import (VOC_PALETTE, _read_image, heldout, polygons_to_mask, read_palette_png, rle_area, rle_decode,
                  rle_encode, write_palette_png)

# -------------------------------------------------------------------------------------------------------------- Metrics
def davis_j(pred, gt):
    """Region similarity J of one frame: |P and G| / |P or G|, 1 when both masks are empty."""
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)

def _seg2bmap(m):
    """Boundary map: a pixel differs from its east, south or south-east neighbour (davis2017 _seg2bmap)."""
    e, s, se = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = m[:, 1:], m[1:, :], m[1:, 1:]
    b = (m ^ e) | (m ^ s) | (m ^ se)
    b[-1, :] = m[-1, :] ^ e[-1, :]                  # last row: only the east neighbour exists
    b[:, -1] = m[:, -1] ^ s[:, -1]                  # last column: only the south neighbour exists
    b[-1, -1] = False
    return b

def _dilate(b, r):
    """Binary dilation by the disk x^2 + y^2 <= r^2 (skimage disk + cv2.dilate; outside the image is 0)."""
    h, w = b.shape
    padded, out = np.pad(b, r), np.zeros_like(b)    # (h + 2r, w + 2r), (h, w)
    for dy, dx in itertools.product(range(-r, r + 1), repeat=2):
        if dx * dx + dy * dy <= r * r:
            out |= padded[r + dy:r + dy + h, r + dx:r + dx + w]
    return out

def davis_f(pred, gt, bound_th=0.008):  # EXERCISE 7: done when `python -m pytest --exercise 7` passes
    """Boundary measure F of one frame: F1 of boundary pixels matched within ceil(bound_th * diagonal)."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    r = int(bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(gt.shape)))
    pb, gb = _seg2bmap(pred), _seg2bmap(gt)
    n_pred, n_gt = int(pb.sum()), int(gb.sum())
    if n_pred == 0 or n_gt == 0:                    # both empty: P = R = 1; one empty: P or R = 0
        return 1.0 if n_pred == n_gt else 0.0
    precision = (pb & _dilate(gb, r)).sum() / float(n_pred)
    recall = (gb & _dilate(pb, r)).sum() / float(n_gt)
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))

def davis_statistics(values):
    """Mean, Recall (share > 0.5), Decay (first quarter - last; davis2017's bins share end frames) of scores."""
    v = np.asarray(values, float)
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)   # davis2017: uint8, wraps past 256
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    return float(np.mean(v)), float(np.mean(v > 0.5)), float(np.mean(bins[0]) - np.mean(bins[3]))

def davis_sequence(gt, pred, bound_th=0.008, name="sequence"):
    """Per-object, per-frame J and F (N, T - 2) of (T, H, W) id maps: frames 1..T-2, objects 1..N, N = max id of
    the first ground-truth frame (255 = void, read as background)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.ndim != 3 or gt.shape != pred.shape or len(gt) < 3:
        raise ValueError(f"{name}: ground truth {gt.shape} and prediction {pred.shape} must both be (T, H, W), "
                         "T >= 3 (the first and last frame are not scored), with the same frame size")
    n = int(np.where(gt[0] == 255, 0, gt[0]).max())
    gt, pred = np.where(gt[1:-1] == 255, 0, gt[1:-1]), pred[1:-1]  # (T - 2, H, W) each
    if pred.size and pred.max() > n:
        raise ValueError(f"{name}: the prediction has object id {pred.max()} but the first ground-truth frame "
                         f"has only ids up to {n}; predict only the prompted objects")
    J = [[davis_j(p == i, g == i) for p, g in zip(pred, gt)] for i in range(1, n + 1)]
    F = [[davis_f(p == i, g == i, bound_th) for p, g in zip(pred, gt)] for i in range(1, n + 1)]
    return np.reshape(J, (n, len(gt))), np.reshape(F, (n, len(gt)))  # (N, T - 2) each

def davis_scores(sequences, bound_th=0.008):
    """J&F of (name, gt, pred) sequences of (T, H, W) id maps, one in memory at a time -> {"objects": [(f"{name}_{i}",
    J_MRD, F_MRD)], "J&F-Mean", "J-Mean", "J-Recall", ..., "F-Decay"}: means over all objects of all sequences."""
    out = {"objects": []}
    for name, gt, pred in sequences:
        J, F = davis_sequence(gt, pred, bound_th, name)
        out["objects"] += [(f"{name}_{i}", davis_statistics(j), davis_statistics(f))
                           for i, (j, f) in enumerate(zip(J, F), 1)]
    if not out["objects"]:
        raise ValueError("no objects to score: the first ground-truth frame of every sequence is empty")
    for m in (1, 2):                                 # 1: J, 2: F; each (objects, 3) = Mean, Recall, Decay
        s = np.mean([o[m] for o in out["objects"]], axis=0)
        out.update({f"{'JF'[m - 1]}-{k}": float(v) for k, v in zip(("Mean", "Recall", "Decay"), s)})
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
    return out

def _decode(seg, h, w):
    """A per-frame segmentation (RLE, compressed or not, or polygons) -> bool (h, w); absent (None) = empty."""
    return np.zeros((h, w), bool) if seg is None else (
        rle_decode(seg) if isinstance(seg, dict) else polygons_to_mask(seg, h, w)) > 0

def _video_ious(d, g, h, w):
    """Video IoU (D, G) of detections d and ground truths g (lists of per-frame segmentations): sum over frames of
    intersections / sum of unions (one absent: the other's area). One frame decoded at a time (constant memory)."""
    inter, union = np.zeros((len(d), len(g))), np.zeros((len(d), len(g)))     # (D, G) each
    for t in range(len(g[0]) if g and d else 0):
        dm, gm = [_decode(x[t], h, w) for x in d], [_decode(y[t], h, w) for y in g]    # D and G x (h, w)
        i = np.array([[np.count_nonzero(a & b) for b in gm] for a in dm])             # (D, G)
        area_d, area_g = np.array([a.sum() for a in dm]), np.array([b.sum() for b in gm])   # (D,), (G,)
        inter, union = inter + i, union + area_d[:, None] + area_g[None] - i
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

IOU_THRS, REC_THRS, MAX_DETS = np.linspace(0.5, 0.95, 10), np.linspace(0.0, 1.0, 101), (1, 10, 100)
AREA_RNGS = ((0, 1e10), (0, 128 ** 2), (128 ** 2, 256 ** 2), (256 ** 2, 1e10))   # all, small, medium, large

def _instances(anns, is_gt, sizes):
    """Group annotations (or results) by (video, category), masks decoded, mean non-zero area over frames."""
    out = {}
    for n, a in enumerate(anns):
        segs = a["segmentations"]
        areas = (is_gt and a.get("areas")) or [s if s is None else rle_area(s) if isinstance(s, dict)
                                                else _decode(s, *sizes[a["video_id"]]).sum() for s in segs]
        areas = [x for x in areas if x]             # the mean is over frames where it is present and non-empty
        out.setdefault((a["video_id"], a["category_id"]), []).append(dict(
            id=a["id"] if is_gt else n + 1, segs=segs, area=float(np.mean(areas)) if areas else 0.0,
            crowd=is_gt and bool(a.get("iscrowd")), score=a.get("score")))
    return out

def _match(d, g, ious, lo, hi):
    """Greedy matching of one (video, category) in one area range, as COCO's evaluateImg.
    d: detections by score; g: ground truth; ious (D, G). -> (scores, dt_matched (T, D), dt_ignored, gt_ignored)."""
    g_ig = np.array([y["crowd"] or not lo <= y["area"] <= hi for y in g], bool)
    order = np.argsort(g_ig, kind="mergesort")      # ground truth not ignored first
    g, g_ig, ious = [g[j] for j in order], g_ig[order], ious[:, order]
    gtm, dtm = np.zeros((len(IOU_THRS), len(g))), np.zeros((len(IOU_THRS), len(d)))   # matched ids, 0 = none
    dt_ig = np.zeros((len(IOU_THRS), len(d)), bool)
    for (t, thr), di in itertools.product(enumerate(IOU_THRS), range(len(d))):
        best, m = min(thr, 1 - 1e-10), -1
        for gi in range(len(g)):
            if gtm[t, gi] > 0 and not g[gi]["crowd"]:
                continue                            # taken (a crowd region can take many)
            if m > -1 and not g_ig[m] and g_ig[gi]:
                break                               # a real match beats any ignored one
            if ious[di, gi] >= best:
                best, m = ious[di, gi], gi
        if m > -1:
            dt_ig[t, di], dtm[t, di], gtm[t, m] = g_ig[m], g[m]["id"], d[di]["id"]
    out_of_rng = np.array([not lo <= x["area"] <= hi for x in d], bool)
    return np.array([x["score"] for x in d]), dtm, dt_ig | ((dtm == 0) & out_of_rng), g_ig

def _precision_recall(E, md):
    """101-point interpolated precision (T, R) and recall (T,) of one category, md detections per video."""
    npig = sum(int(np.count_nonzero(~e[3])) for e in E)
    if npig == 0:
        return None                                 # nothing to find: stays -1
    inds = np.argsort(-np.concatenate([e[0][:md] for e in E]), kind="mergesort")
    dtm = np.concatenate([e[1][:, :md] for e in E], axis=1)[:, inds]    # (T, detections)
    dt_ig = np.concatenate([e[2][:, :md] for e in E], axis=1)[:, inds]  # (T, detections)
    tps = np.cumsum((dtm != 0) & ~dt_ig, axis=1).astype(float)          # (T, detections)
    fps = np.cumsum((dtm == 0) & ~dt_ig, axis=1).astype(float)          # (T, detections)
    precision, recall = np.zeros((len(IOU_THRS), len(REC_THRS))), np.zeros(len(IOU_THRS))
    for t, (tp, fp) in enumerate(zip(tps, fps)):
        rc, pr = tp / npig, np.maximum.accumulate((tp / (fp + tp + np.spacing(1)))[::-1])[::-1]   # envelope
        recall[t] = rc[-1] if len(tp) else 0
        inds = np.searchsorted(rc, REC_THRS, side="left")
        inds = inds[inds < len(pr)]                 # recall levels never reached keep precision 0
        precision[t, :len(inds)] = pr[inds]
    return precision, recall

def ytvis_ap(gt_dataset, results):
    """Video AP/AR as the YouTube-VIS cocoapi fork computes it (ytvoseval.py, segm, per category).
    gt_dataset: the parsed annotations JSON; results: the parsed predictions list.
    -> {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}; -1 where there was nothing to score."""
    sizes = {v["id"]: (v["height"], v["width"]) for v in gt_dataset["videos"]}
    lengths = {v["id"]: v.get("length") or len(v["file_names"]) for v in gt_dataset["videos"]}
    vids, cats = sorted(sizes), sorted(c["id"] for c in gt_dataset["categories"])
    for n, r in enumerate(list(gt_dataset["annotations"]) + list(results)):
        if len(r["segmentations"]) != lengths.get(r["video_id"]):
            raise ValueError(f"{'annotation' if 'id' in r else 'result'} {r.get('id', n)} has video_id {r['video_id']}"
                             f" and {len(r['segmentations'])} segmentations; the ground truth has "
                             f"{lengths.get(r['video_id'], 'no such video')} frames (one RLE or null per frame)")
    gts, dts = _instances(gt_dataset["annotations"], True, sizes), _instances(results, False, sizes)
    precision = -np.ones((len(IOU_THRS), len(REC_THRS), len(cats), len(AREA_RNGS), len(MAX_DETS)))  # -1: none
    recall = -np.ones((len(IOU_THRS), len(cats), len(AREA_RNGS), len(MAX_DETS)))
    for k, cat in enumerate(cats):
        E = [[] for _ in AREA_RNGS]                 # per area range, one entry per video with anything in it
        for v in vids:
            g, d = gts.get((v, cat), []), dts.get((v, cat), [])
            d = [d[i] for i in np.argsort([-x["score"] for x in d], kind="mergesort")][:MAX_DETS[-1]]
            ious = _video_ious([x["segs"] for x in d], [y["segs"] for y in g], *sizes[v])   # (D, G)
            for a, (lo, hi) in enumerate(AREA_RNGS if g or d else ()):
                E[a].append(_match(d, g, ious, lo, hi))
        for (a, e), (m, md) in itertools.product(enumerate(E), enumerate(MAX_DETS)):
            if (pr := _precision_recall(e, md)) is not None:
                precision[:, :, k, a, m], recall[:, k, a, m] = pr

    def mean(s):
        return float(np.mean(s[s > -1])) if (s > -1).any() else -1.0
    out = {"AP": mean(precision[..., 0, 2]), "AP50": mean(precision[0, ..., 0, 2]),  # IOU_THRS[0] = 0.5
           "AP75": mean(precision[5, ..., 0, 2])}                                          # IOU_THRS[5] = 0.75
    out.update({f"AP{s}": mean(precision[..., a, 2]) for a, s in enumerate("sml", 1)})
    out.update({f"AR{md}": mean(recall[..., 0, m]) for m, md in enumerate(MAX_DETS)})
    out.update({f"AR{s}": mean(recall[..., a, 2]) for a, s in enumerate("sml", 1)})
    return out

# ----------------------------------------------------------------------------------------- Streaming inference (Alg. 1)
def _up(x, size):  # (n, h, w) -> (n, *size), bilinear; n may be 0
    return F.interpolate(x[None], size, mode="bilinear")[0] if len(x) else x.new_zeros(0, *size)

# EXERCISE 9 (open): box_to_mask(frame, box) -> a mask prompt for Segmenter; done when pytest --exercise 9 passes
class Segmenter:
    """Alg. 1 around model.step: step(frame (3, H, W) in [0, 1], prompts) -> (id map (H, W), {id: fg prob}).
    prompted: a prompt {new id: bool (H, W)} on any frame gives the object the next slot (a row of B drawn by the
      Sampler in init_state) and is its output and history M that frame, like a detection (frame 0: also y_0, on X_0);
      tracked ids are not re-prompted. Output: tracked queries' final mask logits > 0, argmax where they overlap.
    unprompted: the top_k by fg prob of tracked objects and detections with fg prob >= threshold are painted; new
      ones get fresh ids (slot + 1); a full ID buffer warns once, then adds no one. History: binary masks."""
    def __init__(self, model, mode="prompted", dataset="synthetic", top_k=10, threshold=0.5):
        if mode not in ("prompted", "unprompted"):
            raise ValueError(f"mode {mode!r}: expected 'prompted' or 'unprompted'")
        self.model, self.mode, self.dataset, self.top_k, self.thr = model, mode, dataset, top_k, threshold
        self.state, self.slot, self.stats, self.t, self.full = None, {}, {}, 0, False  # slot: object id -> row

    def _join(self, masks):  # {id k: mask (S, S)}: k joins A_t in the next free slot (a known k: new mask), M_t^i
        for k, m in masks.items():
            i = self.slot.setdefault(k, len(self.slot))
            self.state.alloc[0, i], self.state.M[0, i] = True, m

    @torch.no_grad()
    def step(self, frame, prompts=None):
        cfg, dev, (H, W), thr = self.model.cfg, self.model.X_0.device, frame.shape[-2:], self.thr
        S, N = cfg.image_size, cfg.N_id
        if self.t == 0:  # Sampler: the slots' rows of B are drawn once per video
            self.hw, self.state = (H, W), self.model.init_state(1, N, S, S, generator=torch.Generator().manual_seed(0))
        prompts = {int(k): torch.as_tensor(np.asarray(m), device=dev).bool() for k, m in (prompts or {}).items()
                   if int(k) not in self.slot}
        if (H, W) != self.hw or any(m.shape != (H, W) for m in prompts.values()):
            raise ValueError(f"frame {self.t} {(H, W)} or its prompts differ from frame 0's size {self.hw}; resize")
        if len(set(self.slot) | set(prompts)) > N or prompts and self.mode != "prompted":
            raise ValueError(f"frame {self.t}: prompts {sorted(prompts)} need mode='prompted' and at most N_id={N} "
                             "objects in all; prompt fewer objects or train with a larger Config.N_id")
        small = {k: _up(m[None].float(), (S, S))[0] > 0.5 for k, m in prompts.items()}  # (S, S) each
        self._join(small if self.t == 0 else {})  # y_0 is painted on X_0 (Alg. 1)
        old = list(self.slot.items())  # A_{t-1}: (object id, slot = its tracking query)
        x = F.interpolate(frame[None].float().to(dev), (S, S), mode="bilinear", antialias=True).clamp(0, 1)
        out, self.state = self.model.step(x, self.state, self.dataset)  # x (1, 3, S, S)
        fg, logits = out["fg"][-1, 0].sigmoid(), out["masks"][-1, 0]  # (Q,), (Q, S/4, S/4): the final layer
        cls = fg[:, None] if out["cls"] is None else out["cls"][-1, 0].softmax(-1)[:, :-1]  # (Q, K)
        p, paint = fg.tolist(), [(k, i) for k, i in old if k not in prompts] if self.mode == "prompted" else []
        self._join({k: m & (self.mode == "prompted" or p[i] >= thr)  # M_t of the tracked, (S, S) each
                    for (k, i), m in zip(old, _up(logits[[i for _, i in old]], (S, S)) > 0)})
        cand = [(k, i) for k, i in old if p[i] >= thr] + [(0, q) for q in range(N, len(p)) if p[q] >= thr]
        for k, q in sorted(cand, key=lambda c: -p[c[1]])[:self.top_k] if self.mode == "unprompted" else ():
            if not k and len(self.slot) == N:  # the ID buffer is exhausted: no new objects, one warning
                self.full = self.full or not warnings.warn(f"frame {self.t}: the ID buffer (N_id={N}) is full; "
                                                           "no new objects from here on")
                continue
            k = k or len(self.slot) + 1  # a detection (q >= N) gets a fresh id and joins A_t with its mask
            self._join({k: _up(logits[q:q + 1], (S, S))[0] > 0} if q >= N else {})
            paint.append((k, q))
        self._join(small)
        for k, q in paint:  # class probabilities summed over the frames where the model paints k, and their count
            self.stats[k] = self.stats.get(k, 0) + F.pad(cls[q], (0, 1), value=1.0)  # (K + 1,)
        maps = torch.cat([torch.zeros(1, H, W, device=dev), _up(logits[[q for _, q in paint]], (H, W)),
                          *(m[None] * 2e4 - 1e4 for m in prompts.values())])  # (1 + n, H, W); 0: background
        ids = torch.tensor([0] + [k for k, _ in paint] + list(prompts), device=dev)[maps.argmax(0)]  # (H, W)
        self.t += 1
        return ids.cpu().numpy(), {**{k: p[q] for k, q in paint}, **dict.fromkeys(prompts, 1.0)}

    def tracks(self):  # [(id, category, score)]: class probs averaged where id was painted; unprompted: the top_k
        pairs = [(k, c, p) for k, s in self.stats.items() for c, p in enumerate((s[:-1] / s[-1]).tolist())]  # pairs,
        return sorted(pairs, key=lambda x: -x[2])[:self.top_k if self.mode == "unprompted" else None]  # Mask2Former-VIS

def _id_maps(masks, ids):  # (N, T, H, W) disjoint bool masks, N ids -> (T, H, W) int64 id maps
    return (masks.long() * torch.tensor(list(ids), dtype=torch.long).view(-1, 1, 1, 1)).sum(0).numpy()

def open_video(video, num_frames=None, size=128):
    """A folder of JPEG/PNG frames, an animated GIF or "synthetic" (held-out video 0; past 48 frames back and forth)
    -> name, T, (H, W), frame(t) -> (float (3, H, W) in [0, 1], stem), ground truth(t) or None. Reads lazily."""
    if video == "synthetic":
        c = heldout("synthetic", 1, min(num_frames or 16, 48), size)[0]
        L, gt = len(c.frames), _id_maps(c.masks, c.ids)  # (L, H, W)
        j = lambda t: L - 1 - abs(L - 1 - t % max(2 * L - 2, 1))  # 0..L-1, L-2..1, 0..  # noqa: E731
        return c.name, num_frames or L, (size, size), lambda t: (c.frames[j(t)], f"{t:05d}"), lambda t: gt[j(t)]
    p = Path(video)
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png")) if p.is_dir() else []
    if p.is_dir() and not files:
        raise FileNotFoundError(f"{p}: no .jpg/.jpeg/.png frames; give a folder of frames, a GIF or synthetic")
    hw, gif = _read_image(files[0] if files else p).shape[:2], None if files else Image.open(p)  # bad file: named
    def frame(t):  # a folder: read file t; a GIF: seek to frame t
        img = _read_image(files[t]) if files else np.array(gif.seek(t) or gif.convert("RGB"))
        if img.shape[:2] != hw:
            raise ValueError(f"{files[t]}: {img.shape[:2]} (h, w) but {files[0].name} is {hw}; resize to one size")
        return torch.from_numpy(img).permute(2, 0, 1).float() / 255, files[t].stem if files else f"{t:05d}"
    return p.stem, min(len(files) if files else getattr(gif, "n_frames", 1), num_frames or 1 << 62), hw, frame, None

def segment(seg, T, frame, prompts=lambda t, stem: None, tts=False):  # EXERCISE 8: done: pytest --exercise 8
    """Yield (t, stem, frame, id map, scores), t < T, one frame at a time; tts (Sec. 3.4): 1..T, T-1..1, 2..T."""
    order = [*range(T), *(range(T - 2, -1, -1) if tts else ()), *(range(1, T) if tts else ())]
    for n, t in enumerate(order):
        img, stem = frame(t)
        ids, scores = seg.step(img, prompts(t, stem) if n < T else None)
        if n >= len(order) - T:
            yield t, stem, img, ids, scores

def _results(tracks, id_maps, video_id):  # YouTube-VIS results: RLE per frame (None = absent), then tracks()
    rles = {}
    for j, ids in enumerate(id_maps):
        for k in set(np.unique(ids).tolist()) - {0} | set(rles):
            rles.setdefault(k, [None] * j).append(rle_encode(ids == k) if (ids == k).any() else None)
    return [{"video_id": video_id, "category_id": c + 1, "score": s, "segmentations": rles[k]}
            for k, c, s in tracks() if k in rles]

def heldout_scores(model, clips, dataset="synthetic", top_k=10):
    """Prompted J&F (frame 0's objects given, DAVIS protocol), unprompted video AP (YouTube-VIS) of data.Clip's."""
    def run(c, mode, prompts=lambda t, stem: None):  # -> its tracks, id maps (T, H, W) of clip c
        seg = Segmenter(model, mode, dataset, top_k)
        return seg.tracks, np.stack([r[3] for r in segment(seg, len(c.frames), lambda t: (c.frames[t], ""), prompts)])
    seqs, videos, anns, results = [], [], [], []
    for v, c in enumerate(clips, 1):  # DAVIS: the objects of frame 0 get ids 1..n and are prompted there
        gt = _id_maps(m := c.masks[c.masks[:, 0].flatten(1).any(1)], range(1, len(m) + 1))  # (T, H, W)
        seqs.append((c.name, gt, run(c, "prompted", lambda t, _: {k: gt[0] == k for k in range(1, len(m) + 1)}
                                     if t == 0 else None)[1]))
        results += _results(*run(c, "unprompted"), v)
        videos.append({"id": v, "height": c.frames.shape[2], "width": c.frames.shape[3], "length": len(c.frames)})
        anns += _results(lambda: [(n, int(lab.clamp(min=0)), 1.0) for n, lab in enumerate(c.labels, 1)],
                         _id_maps(c.masks, range(1, len(c.ids) + 1)), v)  # the ground truth written as results
    cats = [{"id": k} for k in sorted({a["category_id"] for a in anns + results})]
    anns = [dict(a, id=n) for n, a in enumerate(anns, 1)]
    ap, jf = ytvis_ap({"videos": videos, "annotations": anns, "categories": cats}, results), davis_scores(seqs)
    return {"J&F": jf["J&F-Mean"], "J": jf["J-Mean"], "F": jf["F-Mean"], **{k: ap[k] for k in ("AP", "AP50", "AR10")}}

def evaluate_heldout(model, cfg):  # train.py's end-of-run hook
    return heldout_scores(model.eval(), heldout("synthetic", size=cfg.image_size))

def load_model(path, device="cpu"):  # a train.py checkpoint -> AUSM in eval mode, built from the Config stored in it
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        (model := ausm.AUSM(ausm.Config(**ck["config"]))).load_state_dict(ck["model"])
    except Exception as e:  # missing, not a checkpoint, or weights from another config
        raise (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(
            f"checkpoint {path}: {type(e).__name__} {' '.join(str(e).split())[:160]}; train one with this code: "
            "python train.py --stage 1"
            " (its weights must fit the Config saved with them)") from None
    return model.to(device).eval()

def run(args):  # the inference command line: <out>/<video>/<frame>.png, <out>/results.json, <out>/<video>.gif
    dev, ckpt = "cuda" if torch.cuda.is_available() else "cpu", Path("runs/stage2/ckpt.pt")
    model = load_model(args.checkpoint or (ckpt if ckpt.is_file() else "runs/stage1/ckpt.pt"), dev)
    name, T, hw, frame, gt = open_video(args.video, args.num_frames, model.cfg.image_size)
    src, out, pal = Path(args.prompt or "."), Path(args.out), np.reshape(VOC_PALETTE, (256, 3))
    gt, args.prompt = (gt, args.prompt) if args.mode == "prompted" else (lambda t: None, None)  # unprompted: none
    if args.mode == "prompted" and not (src.exists() if args.prompt else gt):
        raise FileNotFoundError(f"--prompt {args.prompt}: --mode prompted needs an existing palette PNG of frame 0 or "
                                "a folder of <frame>.png masks (or run --mode unprompted)")
    def prompts(t, stem):  # {id: mask} of frame t's prompt PNG (the Segmenter takes only ids it does not track)
        f = src / f"{stem}.png" if src.is_dir() else src
        ids = gt(t) if not args.prompt else read_palette_png(f) if f.is_file() and (t == 0 or f != src) else None
        if ids is not None and ids.shape != hw:
            raise ValueError(f"{f}: prompt is {ids.shape} (h, w), the frames of {args.video} {hw}: resize the masks")
        return {k: ids == k for k in np.unique(ids).tolist() if k not in (0, 255)} if ids is not None else None
    def outputs():  # write each frame's palette PNG and the first --gif-frames overlays as it goes
        for j, (t, stem, img, ids, _) in enumerate(segment(seg, T, frame, prompts, args.tts)):
            write_palette_png(out / name / f"{stem}.png", ids)
            if j < args.gif_frames:  # overlay: half frame, half palette colour on objects
                rgb = img.permute(1, 2, 0).numpy() * 255  # (H, W, 3)
                gif.append(Image.fromarray(np.where(ids[..., None], (rgb + pal[ids % 256]) / 2, rgb).astype("uint8")))
            yield ids
    seg, gif, t0 = Segmenter(model, args.mode, args.dataset, args.top_k), [], time.time()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.json", "w") as f:  # streamed out; its RLEs are held until the video ends (the format)
        json.dump(_results(seg.tracks, outputs(), 1), f)
    gif[0].save(out / f"{name}.gif", save_all=True, append_images=gif[1:], duration=100, loop=0)
    dt, rss = time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(f"{name}: {T} frames in {dt:.1f} s = {T / dt:.1f} frames/s ({args.mode}{', tts' if args.tts else ''}) | peak "
          f"RSS {rss:.0f} MB, CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MB | wrote {out}/{name}/*.png, "
          f"results.json, {name}.gif")

# --------------------------------------------------------------------------------------------------------- Command line
def _davis_folders(pred_dir, gt_dir):
    """Yield (name, gt, pred) per <sequence> folder; as in davis2017-evaluation only scored frames need a PNG."""
    seqs = sorted(p.name for p in Path(pred_dir).glob("*") if p.is_dir())
    if not seqs or not Path(gt_dir).is_dir():
        raise FileNotFoundError(f"expected folders {pred_dir}/<sequence>/00000.png and {gt_dir}/<sequence>/00000.png")
    for seq in seqs:
        files = sorted((Path(gt_dir) / seq).glob("*.png"))
        if not files:
            raise FileNotFoundError(f"no ground truth for sequence {seq}: {Path(gt_dir) / seq} has no PNGs")
        gt = np.stack([read_palette_png(f) for f in files])    # (T, H, W)
        pred = np.zeros_like(gt)                        # (T, H, W); first and last frame stay unscored zeros
        for t, f in enumerate(files[1:-1], 1):
            pred[t] = read_palette_png(Path(pred_dir) / seq / f.name)
        yield seq, gt, pred

def evaluate(kind, pred, gt):
    """--eval: score predictions on disk, print the benchmark's numbers, return them."""
    if kind == "davis":
        s = davis_scores(_davis_folders(pred, gt))
        cols = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
        print(f"{'Sequence_object':<24}" + "".join(f"{c:>10}" for c in cols))
        for name, (jm, jr, jd), (fm, fr, fd) in s["objects"]:
            print(f"{name:<24}" + "".join(f"{v:>10.4f}" for v in ((jm + fm) / 2, jm, jr, jd, fm, fr, fd)))
        print(f"{'Global':<24}" + "".join(f"{s[c]:>10.4f}" for c in cols))
        return s
    if not (Path(pred).is_file() and Path(gt).is_file()):
        raise FileNotFoundError(f"--pred {pred} must be results.json and --gt {gt} the annotations JSON")
    s = ytvis_ap(json.loads(Path(gt).read_text()), json.loads(Path(pred).read_text()))
    print("\n".join(f"{k:<6} {v:.4f}" for k, v in s.items()))
    return s

def main(argv=None):
    ap = argparse.ArgumentParser(description="AUSM inference and benchmark scoring (paper Sec. 3).")
    ap.add_argument("--eval", choices=("davis", "ytvis"), help="score predictions instead of running the model: "
                    "davis = J&F per <sequence>_<object> and overall; ytvis = video AP/AR (YouTube-VIS, OVIS)")
    ap.add_argument("--pred", help="--eval davis: folder of <sequence>/<frame>.png palette PNGs; "
                                   "--eval ytvis: results.json (list of per-video predictions)")
    ap.add_argument("--gt", help="--eval davis: folder of ground-truth <sequence>/<frame>.png "
                                 "(e.g. DAVIS/Annotations/480p); --eval ytvis: the annotations JSON")
    ap.add_argument("--checkpoint", help="train.py checkpoint (default runs/stage2/ckpt.pt, else runs/stage1/ckpt.pt)")
    ap.add_argument("--video", default="synthetic", help="a folder of JPEG/PNG frames, an animated GIF, or synthetic")
    ap.add_argument("--out", default="runs/infer", help="writes <out>/<video>/*.png, results.json, <video>.gif")
    ap.add_argument("--prompt", help="frame 0's palette PNG, or a folder of <frame>.png (objects join where seen)")
    ap.add_argument("--mode", default="prompted", choices=("prompted", "unprompted"), help="track prompts or detect")
    ap.add_argument("--dataset", default="synthetic", help="class head to use (a name in the checkpoint's class_heads)")
    ap.add_argument("--num-frames", type=int, help="stop after N frames (synthetic: its length, default 16)")
    ap.add_argument("--top-k", type=int, default=10, help="unprompted: instances per frame (10 YouTube-VIS, 20 OVIS)")
    ap.add_argument("--tts", action="store_true", help="test-time scaling (Sec. 3.4): run frames 1..T, T-1..1, 2..T "
                    "and keep the last T; reads every frame 3 times (3x the time)")
    ap.add_argument("--gif-frames", type=int, default=64, help="frames in the overlay GIF (they are held in memory)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # measured: on this shared 2-core box a 2nd thread spin-waits (10x slower)
    try:
        if args.eval and not (args.pred and args.gt):
            ap.error(f"--eval {args.eval} needs both --pred and --gt")
        return evaluate(args.eval, args.pred, args.gt) if args.eval else run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

if __name__ == "__main__":
    main()
