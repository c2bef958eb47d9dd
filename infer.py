"""infer.py -- run AUSM over videos frame by frame and score the outputs the way the benchmarks do.

Inference (PAPER.md Sec. 6): `Segmenter` is Alg. 1 around model.step with a constant-size State,
prompted (VOS; mask prompts on any frame) or unprompted (VIS). Unprompted, every detection with
fg prob >= --threshold (0.5) gets a fresh ID, a row of B \\ A_{t-1} drawn by the Sampler (seeded
per video from --seed), and joins A_t; M_t = the masks of the tracked objects and of the new
detections, unfiltered (Alg. 1 l.15-19). App. A's top-k cuts only what is output. Sec. 3.4:
`segment` runs x1 / x2 / x3 passes back and forth and keeps the last T steps, results from those
only; `image_views` makes an image a pseudo-video (Table 3). The CLI writes palette PNGs, a
YouTube-VIS results.json and an overlay GIF, each whole or not at all.
Differs: frames keep their aspect ratio at the model's size (data.frame_size: short side
image_size; masks and outputs back at the frame's size); a later prompt joins like a
detection and is its frame's output and M_t; unprompted, a tracked object is output while its fg
prob >= threshold; results.json lists a video's top-k (track, category) pairs (Mask2Former-VIS);
a full ID buffer drops new objects with one warning (`--reuse-after N`, off by default, gives them
the slots of objects whose masks were empty N frames); the image's views (four 90% corner crops
between its visits) are our reading of App. A.
Metrics (Sec. 3, numpy, checked against the reference tools' golden files): DAVIS J&F as
davis2017-evaluation's semi-supervised protocol (first and last frame not scored, objects = 1..max
id of the first ground-truth frame, object-weighted; the sequences are the ground truth's, or
ImageSets/2017/val.txt's); video AP/AR as the YouTube-VIS cocoapi fork. Input they cannot score is
refused, naming the sequence or result (unlike the fork, a result of an unknown category_id too).
`--eval davis` prints the copy-the-first-mask J&F beside the model's (our baseline for real video).
Ours, for long videos: `matched_ids` / `identity_counts` (the id that covers each true object per
frame at IoU >= 0.5; ID switches; re-identification of objects that leave the frame and return);
`--eval long` runs the held-out synthetic videos at 16, 64 and 256 frames (HELDOUT_VIDEOS each).
Left out: OVIS occlusion buckets, YouTube-VOS G (needs the server's seen/unseen lists), DAVIS void
pixels (255 = background), the unsupervised DAVIS protocol, box/point prompts, video files (.mp4:
extract frames); results.json is held in memory.
"""
import argparse
import json
import os
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import ausm
import train  # train.load_checkpoint: the one checkpoint reader
import data
from data import (VOC_PALETTE, _read_image, frame_size, heldout, natural_key, polygons_to_mask,
                  read_palette_png, rle_area, rle_counts, rle_decode, rle_encode, write_palette_png)

# ----------------------------------------------------------------------------- Metrics: DAVIS J&F
def davis_j(pred, gt):
    """Region similarity J of one frame: |P and G| / |P or G|, 1 when both masks are empty."""
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)

def _seg2bmap(m):
    """Boundary map of a bool (h, w) mask: pixels that differ from their east, south or south-east
    neighbour (davis2017 _seg2bmap). A mask that fills the frame has none (the border is none)."""
    east = np.zeros_like(m)                     # (h, w): each pixel's east neighbour, 0 past it
    south = np.zeros_like(m)                    # (h, w)
    south_east = np.zeros_like(m)               # (h, w)
    east[:, :-1] = m[:, 1:]
    south[:-1, :] = m[1:, :]
    south_east[:-1, :-1] = m[1:, 1:]
    b = (m ^ east) | (m ^ south) | (m ^ south_east)
    b[-1, :] = m[-1, :] ^ east[-1, :]           # last row: only the east neighbour exists
    b[:, -1] = m[:, -1] ^ south[:, -1]          # last column: only the south neighbour exists
    b[-1, -1] = False
    return b

def _dilate(b, r):
    """Binary dilation by the disk x^2 + y^2 <= r^2 (skimage disk + cv2.dilate; outside is 0)."""
    h, w = b.shape
    padded = np.pad(b, r)                       # (h + 2r, w + 2r)
    out = np.zeros_like(b)                      # (h, w)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= r * r:
                out |= padded[r + dy:r + dy + h, r + dx:r + dx + w]
    return out

def davis_f(pred, gt, bound_th=0.008):  # EXERCISE 7: done when pytest --exercise 7 passes
    """Boundary measure F of one frame: F1 of the boundary pixels matched within a radius of
    ceil(bound_th * image diagonal) pixels (bound_th >= 1: that many pixels)."""
    pred = np.asarray(pred, bool)               # (h, w)
    gt = np.asarray(gt, bool)                   # (h, w)
    if bound_th >= 1:
        r = int(bound_th)
    else:
        r = int(np.ceil(bound_th * np.linalg.norm(gt.shape)))
    pred_boundary = _seg2bmap(pred)
    gt_boundary = _seg2bmap(gt)
    n_pred = int(pred_boundary.sum())
    n_gt = int(gt_boundary.sum())
    if n_pred == 0 or n_gt == 0:                # both empty: P = R = 1; one empty: P or R = 0
        return 1.0 if n_pred == n_gt else 0.0
    precision = (pred_boundary & _dilate(gt_boundary, r)).sum() / float(n_pred)
    recall = (gt_boundary & _dilate(pred_boundary, r)).sum() / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))

def davis_statistics(values):
    """Mean, Recall (share > 0.5) and Decay (first quarter - last quarter) of one object's scores;
    davis2017's four bins share their end frames."""
    v = np.asarray(values, float)               # (T - 2,) J or F per scored frame
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)   # (5,) bin edges
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    mean = float(np.mean(v))
    recall = float(np.mean(v > 0.5))
    decay = float(np.mean(bins[0]) - np.mean(bins[3]))
    return mean, recall, decay

def davis_sequence(gt, pred, bound_th=0.008, name="sequence"):
    """Per-object, per-frame J and F (N, T - 2) of (T, H, W) id maps: frames 1..T-2, objects 1..N,
    N = max id of the first ground-truth frame (255 = void, read as background)."""
    gt = np.asarray(gt)                         # (T, H, W)
    pred = np.asarray(pred)                     # (T, H, W)
    if gt.ndim != 3 or gt.shape != pred.shape or len(gt) < 3:
        raise ValueError(f"{name}: ground truth {gt.shape} and prediction {pred.shape} must both "
                         "be (T, H, W), T >= 3 (the first and last frame are not scored), "
                         "with the same frame size")
    n = int(np.where(gt[0] == 255, 0, gt[0]).max())
    gt = np.where(gt[1:-1] == 255, 0, gt[1:-1])  # (T - 2, H, W)
    pred = pred[1:-1]                           # (T - 2, H, W)
    if pred.size and pred.max() > n:
        raise ValueError(f"{name}: the prediction has object id {pred.max()} but the first "
                         f"ground-truth frame has only ids up to {n}; predict only the prompted "
                         "objects")
    J = np.zeros((n, len(gt)))                  # (N, T - 2)
    F = np.zeros((n, len(gt)))                  # (N, T - 2)
    for i in range(1, n + 1):
        for t in range(len(gt)):
            J[i - 1, t] = davis_j(pred[t] == i, gt[t] == i)
            F[i - 1, t] = davis_f(pred[t] == i, gt[t] == i, bound_th)
    return J, F

def davis_scores(sequences, bound_th=0.008):
    """J&F of (name, gt, pred) sequences of (T, H, W) id maps, one in memory at a time ->
    {"objects": [(f"{name}_{i}", J (Mean, Recall, Decay), F (Mean, Recall, Decay))],
    "J-Mean", "J-Recall", ..., "F-Decay", "J&F-Mean"}: means over all objects of all sequences."""
    objects = []
    for name, gt, pred in sequences:
        J, F = davis_sequence(gt, pred, bound_th, name)     # (N, T - 2) each
        for i in range(len(J)):
            objects.append((f"{name}_{i + 1}", davis_statistics(J[i]), davis_statistics(F[i])))
    if not objects:
        raise ValueError("no objects to score: the first ground-truth frame of every sequence "
                         "is empty")
    j_stats = np.mean([o[1] for o in objects], axis=0)      # (3,) Mean, Recall, Decay
    f_stats = np.mean([o[2] for o in objects], axis=0)      # (3,)
    out = {"objects": objects}
    for k, stat in enumerate(("Mean", "Recall", "Decay")):
        out[f"J-{stat}"] = float(j_stats[k])
    for k, stat in enumerate(("Mean", "Recall", "Decay")):
        out[f"F-{stat}"] = float(f_stats[k])
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2
    return out

# ----------------------------------------------------------------- Metrics: YouTube-VIS video AP/AR
IOU_THRS = np.linspace(0.5, 0.95, 10)           # (10,) IoU thresholds 0.5, 0.55, ..., 0.95
REC_THRS = np.linspace(0.0, 1.0, 101)           # (101,) recall levels of interpolated precision
MAX_DETS = (1, 10, 100)                         # detections per video for AR1, AR10, AR100 (AP)
AREA_RNGS = ((0, 1e10), (0, 128 ** 2), (128 ** 2, 256 ** 2), (256 ** 2, 1e10))   # all, s, m, l

def _listed(ids):
    """Ids for a message: '1, 2, 3', or the first 8 then '...'."""
    ids = sorted(ids)
    text = ", ".join(str(i) for i in ids[:8])
    if len(ids) > 8:
        text += ", ..."
    return text

def _is_int(x):
    """A JSON integer (not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool)

def _check_segmentation(seg, size, where, polygons_ok):
    """One frame's segmentation: null, an RLE {size, counts} of the video's [height, width] whose
    runs fit it, or (ground truth only) COCO polygons. `where` names it in the message."""
    if seg is None:
        return
    if polygons_ok and isinstance(seg, list):
        return                                  # data.polygons_to_mask checks them as it draws
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        kinds = "an RLE {size, counts}, polygons or null" if polygons_ok else "an RLE or null"
        raise ValueError(f"{where}: a segmentation must be {kinds}; got {type(seg).__name__} "
                         f"{str(seg)[:40]}")
    h, w = size
    if not isinstance(seg["size"], list) or seg["size"] != [h, w]:
        raise ValueError(f"{where}: RLE size {seg['size']} but the video is [{h}, {w}] "
                         "(height, width); encode the masks at the video's resolution")
    try:
        counts = rle_counts(seg)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{where}: RLE counts are unreadable ({e}); expected a COCO compressed "
                         "string or a list of run lengths") from None
    if min(counts, default=0) < 0 or sum(counts) > h * w:
        raise ValueError(f"{where}: RLE runs (sum {sum(counts)}, smallest {min(counts)}) do not "
                         f"fit its {h}x{w} pixels; the counts are corrupt")

def _check_instance(x, where, sizes, lengths, cats, polygons_ok):
    """One annotation or result: a known video and category, a segmentation per frame of it."""
    video = x["video_id"]
    if isinstance(video, (list, dict)) or video not in sizes:
        raise ValueError(f"{where}: video_id {video} is not a ground-truth video "
                         f"(ids {_listed(sizes)})")
    where = f"{where} (video {video})"
    category = x["category_id"]
    if isinstance(category, (list, dict)) or category not in cats:
        raise ValueError(f"{where}: category_id {category} is not a ground-truth category "
                         f"(ids {_listed(cats)}); use the ground truth's ids (the cocoapi fork "
                         "would skip it without a word)")
    segs = x["segmentations"]
    if not isinstance(segs, list) or len(segs) != lengths[video]:
        n = len(segs) if isinstance(segs, list) else type(segs).__name__
        raise ValueError(f"{where}: {n} segmentations; the ground truth has {lengths[video]} "
                         "frames (one RLE or null per frame)")
    for t, seg in enumerate(segs):
        _check_segmentation(seg, sizes[video], f"{where} frame {t}", polygons_ok)

def _check_ground_truth(gt_dataset):
    """The annotations JSON, checked for what the AP reads -> ({video id: (height, width)},
    {video id: frames}, sorted category ids)."""
    needs = ("videos", "categories", "annotations")
    is_dict = isinstance(gt_dataset, dict)
    if not is_dict or not all(isinstance(gt_dataset.get(k), list) for k in needs):
        raise ValueError("ground truth: expected a JSON object with lists 'videos', 'categories' "
                         "and 'annotations' (a YouTube-VIS or OVIS annotations file)")
    sizes = {}
    lengths = {}
    for i, v in enumerate(gt_dataset["videos"]):
        if not isinstance(v, dict) or not all(_is_int(v.get(k)) for k in ("id", "height", "width")):
            raise ValueError(f"ground truth videos[{i}]: needs integers 'id', 'height', 'width'")
        if _is_int(v.get("length")):
            lengths[v["id"]] = v["length"]
        elif isinstance(v.get("file_names"), list):
            lengths[v["id"]] = len(v["file_names"])
        else:
            raise ValueError(f"ground truth videos[{i}]: needs 'length' or 'file_names'")
        sizes[v["id"]] = (v["height"], v["width"])
    cats = []
    for i, c in enumerate(gt_dataset["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise ValueError(f"ground truth categories[{i}]: needs an integer 'id'")
        cats.append(c["id"])
    needs = {"id", "video_id", "category_id", "segmentations"}
    for i, a in enumerate(gt_dataset["annotations"]):
        where = f"ground truth annotations[{i}]"
        if not isinstance(a, dict) or not needs <= set(a):
            raise ValueError(f"{where}: needs 'id', 'video_id', 'category_id', 'segmentations'")
        _check_instance(a, where, sizes, lengths, cats, polygons_ok=True)
    return sizes, lengths, sorted(cats)

def _check_results(results, sizes, lengths, cats):
    """The results JSON: a list of {video_id, category_id, score, segmentations}, finite numeric
    scores, one RLE (or null) per frame of a ground-truth video, at that video's size."""
    if not isinstance(results, list):
        raise ValueError("results: expected a JSON list of {video_id, category_id, score, "
                         f"segmentations}} objects; got a {type(results).__name__}")
    needs = {"video_id", "category_id", "score", "segmentations"}
    for n, r in enumerate(results):
        where = f"results[{n}]"
        if not isinstance(r, dict) or not needs <= set(r):
            raise ValueError(f"{where}: needs 'video_id', 'category_id', 'score', 'segmentations'")
        score = r["score"]
        is_number = isinstance(score, (int, float, np.number)) and not isinstance(score, bool)
        if not is_number or not np.isfinite(score):
            raise ValueError(f"{where} (video {r['video_id']}): score {score!r} is not a finite "
                             "number; write the detection's confidence, e.g. 0.87")
        _check_instance(r, where, sizes, lengths, cats, polygons_ok=False)

def _decode(seg, h, w):
    """One frame's segmentation (RLE, compressed or not, or polygons) -> bool (h, w); None: 0s."""
    if seg is None:
        return np.zeros((h, w), bool)
    if isinstance(seg, dict):
        return rle_decode(seg) > 0
    return polygons_to_mask(seg, h, w) > 0

def _area(seg, h, w):
    """Pixels of one frame's segmentation; None when absent."""
    if seg is None:
        return None
    if isinstance(seg, dict):
        return rle_area(seg)
    return _decode(seg, h, w).sum()

def _video_ious(d, g, h, w):
    """Video IoU (D, G) of detections d and ground truths g (lists of per-frame segmentations):
    the sum over frames of intersections / the sum of unions (one absent: the other's area).
    One frame decoded at a time (constant memory)."""
    inter = np.zeros((len(d), len(g)))          # (D, G) intersections summed over frames
    union = np.zeros((len(d), len(g)))          # (D, G) unions summed over frames
    if not d or not g:
        return inter
    for t in range(len(g[0])):
        d_masks = [_decode(x[t], h, w) for x in d]                                      # D x (h, w)
        g_masks = [_decode(y[t], h, w) for y in g]                                      # G x (h, w)
        i = np.array([[np.count_nonzero(a & b) for b in g_masks] for a in d_masks])     # (D, G)
        area_d = np.array([a.sum() for a in d_masks])                                   # (D,)
        area_g = np.array([b.sum() for b in g_masks])                                   # (G,)
        inter = inter + i
        union = union + area_d[:, None] + area_g[None, :] - i
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

def _instances(anns, is_gt, sizes):
    """Group annotations (or results) by (video, category) -> {(video, category): [instance]};
    an instance: id (results: 1-based position), segmentations, mean area, crowd flag, score."""
    out = {}
    for n, a in enumerate(anns):
        segs = a["segmentations"]
        if is_gt and a.get("areas"):
            areas = a["areas"]                  # the annotation's own areas, as the fork reads them
        else:
            areas = [_area(s, *sizes[a["video_id"]]) for s in segs]
        areas = [x for x in areas if x]         # the mean is over frames where it is non-empty
        instance = {"id": a["id"] if is_gt else n + 1,
                    "segs": segs,
                    "area": float(np.mean(areas)) if areas else 0.0,
                    "crowd": is_gt and bool(a.get("iscrowd")),
                    "score": a.get("score")}
        out.setdefault((a["video_id"], a["category_id"]), []).append(instance)
    return out

def _best_ground_truth(ious, thr, g, g_ignored, gt_taken):
    """The ground truth one detection matches at IoU threshold thr, -1 for none (COCO's
    evaluateImg): the best IoU >= thr among those not taken; a real match beats any ignored one.
    ious (G,) of this detection; g_ignored (G,); gt_taken (G,) at this threshold."""
    best = min(thr, 1 - 1e-10)
    m = -1
    for gi in range(len(g)):
        if gt_taken[gi] > 0 and not g[gi]["crowd"]:
            continue                            # taken (a crowd region can take many)
        if m > -1 and not g_ignored[m] and g_ignored[gi]:
            break                               # g is sorted: only ignored ones are left
        if ious[gi] >= best:
            best = ious[gi]
            m = gi
    return m

def _match(d, g, ious, lo, hi):
    """Greedy matching of one (video, category) in one area range [lo, hi], as COCO's evaluateImg.
    d: detections by score; g: ground truth; ious (D, G). -> scores (D,), dt_matched (10, D)
    ground-truth ids (0 = none), dt_ignored (10, D), gt_ignored (G,)."""
    g_ignored = np.array([y["crowd"] or not lo <= y["area"] <= hi for y in g], bool)   # (G,)
    order = np.argsort(g_ignored, kind="mergesort")     # ground truth not ignored first
    g = [g[j] for j in order]
    g_ignored = g_ignored[order]                # (G,)
    ious = ious[:, order]                       # (D, G)
    gt_taken = np.zeros((len(IOU_THRS), len(g)))            # (10, G) detection ids, 0 = none
    dt_matched = np.zeros((len(IOU_THRS), len(d)))          # (10, D) ground-truth ids, 0 = none
    dt_ignored = np.zeros((len(IOU_THRS), len(d)), bool)    # (10, D)
    for t, thr in enumerate(IOU_THRS):
        for di in range(len(d)):
            m = _best_ground_truth(ious[di], thr, g, g_ignored, gt_taken[t])
            if m > -1:
                dt_ignored[t, di] = g_ignored[m]
                dt_matched[t, di] = g[m]["id"]
                gt_taken[t, m] = d[di]["id"]
    out_of_range = np.array([not lo <= x["area"] <= hi for x in d], bool)     # (D,)
    dt_ignored = dt_ignored | ((dt_matched == 0) & out_of_range)             # (10, D)
    scores = np.array([x["score"] for x in d])  # (D,)
    return scores, dt_matched, dt_ignored, g_ignored

def _match_category(gts, dts, cat, sizes):
    """Match one category in every video and area range -> per area range, _match's output for
    each video with a ground truth or detection of it; at most MAX_DETS[-1] detections a video."""
    per_area = [[] for _ in AREA_RNGS]
    for v in sorted(sizes):
        g = gts.get((v, cat), [])
        d = dts.get((v, cat), [])
        if not g and not d:
            continue
        order = np.argsort([-x["score"] for x in d], kind="mergesort")   # ties: results order
        d = [d[i] for i in order][:MAX_DETS[-1]]
        ious = _video_ious([x["segs"] for x in d], [y["segs"] for y in g], *sizes[v])   # (D, G)
        for a, (lo, hi) in enumerate(AREA_RNGS):
            per_area[a].append(_match(d, g, ious, lo, hi))
    return per_area

def _precision_recall(E, md):
    """101-point interpolated precision (10, 101) and recall (10,) of one category in one area
    range from its per-video matches E, md detections per video; None: no ground truth to find."""
    n_gt = sum(int(np.count_nonzero(~e[3])) for e in E)     # ground truths not ignored
    if n_gt == 0:
        return None                             # nothing to find: stays -1
    scores = np.concatenate([e[0][:md] for e in E])                             # (n,)
    order = np.argsort(-scores, kind="mergesort")
    dt_matched = np.concatenate([e[1][:, :md] for e in E], axis=1)[:, order]    # (10, n)
    dt_ignored = np.concatenate([e[2][:, :md] for e in E], axis=1)[:, order]    # (10, n)
    tps = np.cumsum((dt_matched != 0) & ~dt_ignored, axis=1).astype(float)      # (10, n)
    fps = np.cumsum((dt_matched == 0) & ~dt_ignored, axis=1).astype(float)      # (10, n)
    precision = np.zeros((len(IOU_THRS), len(REC_THRS)))    # (10, 101)
    recall = np.zeros(len(IOU_THRS))                        # (10,)
    for t in range(len(IOU_THRS)):
        rc = tps[t] / n_gt                                  # (n,)
        pr = tps[t] / (fps[t] + tps[t] + np.spacing(1))     # (n,)
        pr = np.maximum.accumulate(pr[::-1])[::-1]          # (n,) envelope from the right
        if len(rc):
            recall[t] = rc[-1]
        inds = np.searchsorted(rc, REC_THRS, side="left")   # (101,)
        inds = inds[inds < len(pr)]             # recall levels never reached keep precision 0
        precision[t, :len(inds)] = pr[inds]
    return precision, recall

def _accumulate(per_area):
    """One category's precision (10, 101, A, M) and recall (10, A, M) over the area ranges and
    max detections; -1 where there was no ground truth to find."""
    precision = -np.ones((len(IOU_THRS), len(REC_THRS), len(AREA_RNGS), len(MAX_DETS)))
    recall = -np.ones((len(IOU_THRS), len(AREA_RNGS), len(MAX_DETS)))
    for a, matches in enumerate(per_area):
        for m, md in enumerate(MAX_DETS):
            pr = _precision_recall(matches, md)
            if pr is not None:
                precision[:, :, a, m] = pr[0]
                recall[:, a, m] = pr[1]
    return precision, recall

def _mean_scored(s):
    """Mean over the entries that were scored (not -1); -1 when none was."""
    scored = s[s > -1]
    if scored.size == 0:
        return -1.0
    return float(np.mean(scored))

def _summarize(precision, recall):
    """The fork's summarize(): precision (10, 101, K, A, M), recall (10, K, A, M) -> AP/AR."""
    out = {}
    out["AP"] = _mean_scored(precision[..., 0, 2])          # all areas, 100 detections
    out["AP50"] = _mean_scored(precision[0, ..., 0, 2])     # IOU_THRS[0] = 0.5
    out["AP75"] = _mean_scored(precision[5, ..., 0, 2])     # IOU_THRS[5] = 0.75
    for a, size in enumerate("sml", 1):
        out[f"AP{size}"] = _mean_scored(precision[..., a, 2])
    for m, md in enumerate(MAX_DETS):
        out[f"AR{md}"] = _mean_scored(recall[..., 0, m])
    for a, size in enumerate("sml", 1):
        out[f"AR{size}"] = _mean_scored(recall[..., a, 2])
    return out

def ytvis_ap(gt_dataset, results):
    """Video AP/AR as the YouTube-VIS cocoapi fork computes it (ytvoseval.py, segm, per category).
    gt_dataset: the parsed annotations JSON; results: the parsed predictions list. Input it cannot
    score is refused with the result named (the fork skips unknown categories; we refuse them).
    -> {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl}; -1: nothing to score."""
    sizes, lengths, cats = _check_ground_truth(gt_dataset)          # 1. validation
    _check_results(results, sizes, lengths, cats)
    gts = _instances(gt_dataset["annotations"], True, sizes)       # 2. grouping
    dts = _instances(results, False, sizes)
    shape = (len(IOU_THRS), len(REC_THRS), len(cats), len(AREA_RNGS), len(MAX_DETS))
    precision = -np.ones(shape)                                     # (10, 101, K, A, M), -1: none
    recall = -np.ones(shape[:1] + shape[2:])                        # (10, K, A, M)
    for k, cat in enumerate(cats):
        per_area = _match_category(gts, dts, cat, sizes)            # 3. per-category matching
        category_precision, category_recall = _accumulate(per_area)  # 4. accumulation
        precision[:, :, k] = category_precision
        recall[:, k] = category_recall
    return _summarize(precision, recall)                            # 5. summary

# --------------------------------------------------------------------- Streaming inference (Alg. 1)
def _up(x, size):  # (n, h, w) -> (n, *size), bilinear; n may be 0
    return F.interpolate(x[None], size, mode="bilinear")[0] if len(x) else x.new_zeros(0, *size)

def sampler_seed(seed, video):  # the Sampler's seed for one video: from (--seed, video index)
    return int(np.random.SeedSequence([seed, video]).generate_state(1)[0])

# ours (PAPER.md Sec. 6), off by default: once B is full, a new object takes the slot of an object
# whose mask was empty for this many frames in a row; 0: never (Alg. 1: objects are never removed,
# so new ones are dropped). Measured: no buffer fills, but AP falls (README "Long videos")
REUSE_AFTER = 0

# EXERCISE 9 (open): box_to_mask(frame, box) -> a mask prompt for Segmenter;
# done when pytest --exercise 9 passes
class Segmenter:
    """Alg. 1 around model.step: step(frame (3, H, W) in [0, 1], prompts) -> (id map, scores).

    Slot i of the State is tracking query i; allocated (state.alloc), it holds a row
    state.ids[0, i] of the ID buffer B and a mask state.M[0, i]. Slots fill in allocation order:
    A_{t-1} = the allocated slots' rows; `slot` maps an object id to its slot. The output: an id
    map (H, W), 0 = background, and scores {id: class probabilities (K,)} of the objects the
    model predicted ("paint" is only the History Marker's).
    prompted: a prompt {new id: bool (H, W)} on any frame is the object's output and M_t there
      (frame 0: y_0, on X_0); then it is tracked. Output: every tracked object, no threshold.
    unprompted: every detection with fg prob >= threshold gets a fresh id while B has free rows
      (Alg. 1 l.15-19). Output: the top_k by fg prob of them and of the tracked objects with fg
      prob >= threshold. The Sampler's draws are seeded by `seed`. Ours, off by default: with
      reuse_after > 0 a full B gives a new object the slot of an object lost that long (_reuse)."""
    def __init__(self, model, mode="prompted", dataset="synthetic", top_k=10, threshold=0.5,
                 seed=0, reuse_after=None):
        if mode not in ("prompted", "unprompted"):
            raise ValueError(f"mode {mode!r}: expected 'prompted' or 'unprompted'")
        self.model = model
        self.mode = mode
        self.dataset = dataset
        self.top_k = top_k
        self.threshold = threshold
        self.sampler = torch.Generator().manual_seed(seed)
        self.state = None  # the model's State, made on the first frame
        self.slot = {}  # object id -> slot, in allocation order
        self.t = 0
        self.warned_full = False
        self.reuse_after = REUSE_AFTER if reuse_after is None else reuse_after  # 0: never (Alg. 1)
        self.lost = {}  # slot -> frames in a row its object's mask M_t was empty
        self.retired = {}  # object id -> the frame its slot went to a new object (_reuse)

    @torch.no_grad()
    def step(self, frame, prompts=None):
        prompts = self._new_prompts(frame, prompts)  # {id: bool (H, W)}: objects not tracked yet;
        # their output and M_t this frame are the prompt, so `tracked` below leaves them out
        Sh, Sw = self.size  # the model's input: short side image_size, aspect kept (frame_size)
        prompt_masks = [_up(m[None].float(), (Sh, Sw))[0] > 0.5 for m in prompts.values()]
        if self.t == 0:  # Alg. 1 before the loop: A_0 = Sampler(B, |y_0|), M_0 = m_0
            N = self.model.cfg.N_id  # no row of B drawn yet (ids -1), no slot allocated
            self.state = self.model.init_state(1, N, Sh, Sw, ids=torch.full((1, N), -1))
            self._allocate(list(prompts), prompt_masks)
        tracked = [(k, i) for k, i in self.slot.items() if k not in prompts]  # A_{t-1} (id, slot)
        fg, cls, logits = self._predict(frame)  # Alg. 1 l.11-14: E_t, F_t, G_t, y_trk, y_det
        D = self._detections(fg)  # Alg. 1 l.15-16: D_t, the detections with fg >= threshold
        masks = _up(logits, (Sh, Sw)) > 0  # (Q, Sh, Sw): every query's mask at the model's size
        for k, i in tracked:  # Alg. 1 l.19: M_t = [masks of y_trk; ...], no filter
            self.state.M[0, i] = masks[i]
            self.lost[i] = 0 if bool(masks[i].any()) else self.lost.get(i, 0) + 1
        first = len(self.slot) + len(self.retired) + 1  # an object id is never given twice
        new_ids = list(range(first, first + len(D)))
        query = dict(zip(new_ids, D.tolist()))  # new object id -> its detection query
        free = self.model.cfg.N_id - len(self.slot)  # rows of B not in A_{t-1}
        reused = self._reuse(new_ids[free:], masks[D[free:]])  # ours: those B has no row for
        waiting = [k for k in new_ids if k not in reused]
        joined = self._allocate(waiting, masks[[query[k] for k in waiting]])  # Alg. 1 l.17-19
        if self.t > 0:  # ours: a later prompt joins A_t and M_t as a detection does
            self._allocate(list(prompts), prompt_masks)
        tracked = [(k, i) for k, i in tracked if k in self.slot]  # less those whose slot is reused
        detected = [(k, query[k]) for k in joined + reused]
        output = self._output(tracked, detected, fg)  # App. A: top-k
        ids = self._id_map(output, logits, prompts, frame.shape[-2:])  # (H, W)
        self.t += 1
        return ids, {k: cls[q].cpu().numpy() for k, q in output}

    def _new_prompts(self, frame, prompts):  # {id: mask} of ids not tracked yet, checked
        N = self.model.cfg.N_id
        hw = tuple(frame.shape[-2:])
        prompts = prompts or {}
        prompts = {int(k): torch.as_tensor(np.asarray(m)).bool() for k, m in prompts.items()}
        prompts = {k: m.to(self.model.X_0.device) for k, m in prompts.items() if k not in self.slot}
        if self.t == 0:
            self.hw = hw
            self.size = frame_size(hw[0], hw[1], self.model.cfg.image_size)  # (Sh, Sw)
        if hw != self.hw or any(tuple(m.shape) != hw for m in prompts.values()):
            raise ValueError(f"frame {self.t} {hw} or its prompts differ from frame 0's size "
                             f"{self.hw}; resize")
        if (prompts and self.mode != "prompted") or len(self.slot) + len(prompts) > N:
            raise ValueError(f"frame {self.t}: prompts {sorted(prompts)} need mode='prompted' and "
                             f"at most N_id={N} objects in all; prompt fewer objects or train with "
                             "a larger Config.N_id")
        return prompts

    def _predict(self, frame):  # Alg. 1 l.11-14 -> fg prob (Q,), class probs (Q, K), mask logits
        x = frame[None].float().to(self.model.X_0.device)  # (1, 3, H, W)
        x = F.interpolate(x, self.size, mode="bilinear", antialias=True)  # (1, 3, Sh, Sw)
        x = x.clamp(0, 1)
        out, self.state = self.model.step(x, self.state, self.dataset)
        fg = out["fg"][-1, 0].sigmoid()  # (Q,): the final layer's heads
        logits = out["masks"][-1, 0]  # (Q, Sh/4, Sw/4)
        if out["cls"] is None:  # a class-agnostic head: the fg prob is the one class
            return fg, fg[:, None], logits  # (Q, 1)
        return fg, out["cls"][-1, 0].softmax(-1)[:, :-1], logits  # (Q, K): no "no-object"

    def _detections(self, fg):  # Alg. 1 l.15-16: detection queries, fg >= threshold, surest first
        N = self.model.cfg.N_id
        if self.mode != "unprompted":
            return torch.zeros(0, dtype=torch.long, device=fg.device)
        D = torch.nonzero(fg[N:] >= self.threshold)[:, 0] + N  # (|D_t|,) query indices
        return D[fg[D].argsort(descending=True, stable=True)]

    # EXERCISE 13: done when pytest --exercise 13 passes
    def _allocate(self, ids, masks):  # new object ids with their masks (Sh, Sw) join A_t and M_t
        N = self.model.cfg.N_id
        n = len(self.slot)
        fit = min(len(ids), N - n)  # B has N_id rows: once all are in A_t nobody new joins
        if fit < len(ids) and not self.warned_full:
            warnings.warn(f"frame {self.t}: the ID buffer (N_id={N}) is full; new objects are "
                          f"dropped (reuse_after={self.reuse_after}; see --reuse-after)")
            self.warned_full = True
        free = torch.ones(N, dtype=torch.bool)
        free[self.state.ids[0, :n].cpu()] = False
        rows = torch.nonzero(free)[:, 0]  # B \ A_{t-1}
        rows = rows[torch.randperm(len(rows), generator=self.sampler)[:fit]]  # Alg. 1 l.17: Sampler
        for j in range(fit):
            self.slot[ids[j]] = n + j
            self.state.ids[0, n + j] = rows[j]
            self.state.alloc[0, n + j] = True  # Alg. 1 l.18: A_t = [A_{t-1}; Sampler(...)]
            self.state.M[0, n + j] = masks[j]  # Alg. 1 l.19: M_t = [masks of y_trk; of D_t]
        return ids[:fit]

    def _reuse(self, ids, masks):  # ours: B is full; new objects ids take lost objects' slots
        """The objects whose mask M_t was empty for reuse_after frames in a row or more give up
        their slots, the longest lost first: each slot keeps its row of B and gets one of ids
        (surest first) and its mask (Sh, Sw) as M_t; the old object is no longer tracked (its fg
        prob does not say: a lost query's hovers around 0.5). Returns the ids that got one."""
        if self.reuse_after <= 0:
            return []
        lost = sorted((-n, i) for i, n in self.lost.items() if n >= self.reuse_after)
        owner = {i: k for k, i in self.slot.items()}  # slot -> object id
        taken = []
        for (_, i), k, m in zip(lost, ids, masks):
            del self.slot[owner[i]]
            self.retired[owner[i]] = self.t
            self.slot[k] = i
            self.lost[i] = 0
            self.state.M[0, i] = m
            taken.append(k)
        return taken

    def _output(self, tracked, joined, fg):  # [(id, query)] (this frame's prompts come after)
        if self.mode == "prompted":
            return tracked
        candidates = [(k, i) for k, i in tracked if fg[i] >= self.threshold] + joined
        return sorted(candidates, key=lambda c: -fg[c[1]].item())[:self.top_k]  # App. A: top-k

    def _id_map(self, output, logits, prompts, hw):  # argmax: background (logit 0), output, prompts
        dev = logits.device
        given = [m[None].float() * 2e4 - 1e4 for m in prompts.values()]  # a prompt wins where given
        maps = [torch.zeros(1, *hw, device=dev), _up(logits[[q for _, q in output]], hw), *given]
        labels = torch.tensor([0] + [k for k, _ in output] + list(prompts), device=dev)  # (1 + n,)
        return labels[torch.cat(maps).argmax(0)].cpu().numpy()  # (H, W) from (1 + n, H, W)

def _id_maps(masks, ids):  # (N, T, H, W) disjoint bool masks, N ids -> (T, H, W) int64 id maps
    ids = torch.tensor(list(ids), dtype=torch.long).view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return (masks.long() * ids).sum(0).numpy()

def _to_tensor(img):  # uint8 (H, W, 3) -> float (3, H, W) in [0, 1]
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255

def _synthetic_video(num_frames, size):  # held-out video 0, played back and forth past its length
    clip = heldout("synthetic", 1, min(num_frames or 16, 48), size)[0]
    L = len(clip.frames)
    gt = _id_maps(clip.masks, clip.ids)  # (L, H, W)
    def bounce(t):  # 0..L-1, L-2..1, 0..
        return L - 1 - abs(L - 1 - t % max(2 * L - 2, 1))
    def frame(t):
        return clip.frames[bounce(t)], f"{t:05d}"
    def ground_truth(t):
        return gt[bounce(t)]
    return clip.name, num_frames or L, (size, size), frame, ground_truth

def _folder_video(p, num_frames):  # a folder of frames in natural order (frame2 before frame10)
    files = [f for f in p.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png")]
    files = sorted(files, key=natural_key)
    if not files:
        raise FileNotFoundError(f"{p}: no .jpg/.jpeg/.png frames; give a folder of frames, a GIF "
                                "or synthetic")
    hw = _read_image(files[0]).shape[:2]
    def frame(t):
        img = _read_image(files[t])
        if img.shape[:2] != hw:
            raise ValueError(f"{files[t]}: {img.shape[:2]} (h, w) but {files[0].name} is {hw}; "
                             "resize to one size")
        return _to_tensor(img), files[t].stem
    return p.stem, min(len(files), num_frames or len(files)), hw, frame, None

def _file_video(p, num_frames):  # an animated GIF, or one image (a 1-frame video)
    hw = _read_image(p).shape[:2]  # a missing or bad file is named here
    gif = Image.open(p)
    n = getattr(gif, "n_frames", 1)
    def frame(t):
        gif.seek(t)
        return _to_tensor(np.array(gif.convert("RGB"))), f"{t:05d}"
    return p.stem, min(n, num_frames or n), hw, frame, None

def open_video(video, num_frames=None, size=128):
    """A folder of JPEG/PNG frames, an animated GIF, one image or "synthetic" (held-out video 0) ->
    name, T, (H, W), frame(t) -> (float (3, H, W) in [0, 1], stem), ground truth(t) or None."""
    if video == "synthetic":
        return _synthetic_video(num_frames, size)
    p = Path(video)
    if p.suffix.lower() in (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"):
        raise ValueError(f"{p}: video files are not read; extract its frames first, e.g. mkdir "
                         f"frames && ffmpeg -i {p} -q:v 2 frames/%05d.jpg, then --video frames")
    return _folder_video(p, num_frames) if p.is_dir() else _file_video(p, num_frames)

# EXERCISE 8: done: pytest --exercise 8
def segment(seg, T, frame, prompts=lambda t, stem: None, tts=False):
    """Yield (t, stem, frame, id map, scores) of the last T steps, one frame at a time. tts (Sec.
    3.4): passes back and forth, turning frames not repeated; True = 3: 1..T, T-1..1, 2..T."""
    passes = 3 if tts is True else max(1, int(tts))
    order = list(range(T))
    for p in range(1, passes):
        if p % 2:
            order += range(T - 2, -1, -1)
        else:
            order += range(1, T)
    for n, t in enumerate(order):
        img, stem = frame(t)
        ids, scores = seg.step(img, prompts(t, stem) if n < T else None)
        if n >= len(order) - T:
            yield t, stem, img, ids, scores

def image_views(image, repetitions=3):
    """Sec. 3.4 / App. A: an image (3, H, W) as a pseudo-video visiting it `repetitions` times, its
    four 90% corner crops (TL, TR, BR, BL; resized to (H, W)) before each visit after the first."""
    H, W = image.shape[-2:]
    h, w = round(0.9 * H), round(0.9 * W)
    corners = [(0, 0), (0, W - w), (H - h, W - w), (H - h, 0)]  # (top, left) of each crop
    crops = [image[None, :, y:y + h, x:x + w] for y, x in corners]  # (1, 3, h, w) each
    crops = [F.interpolate(c, (H, W), mode="bilinear", antialias=True)[0] for c in crops]
    return [image] + ([c.clamp(0, 1) for c in crops] + [image]) * (repetitions - 1)

def segment_image(seg, image, stem, prompts=None, tts=3):
    """Yield (0, stem, image, id map, scores) of image_views' last step; prompts on the first."""
    for n, view in enumerate(image_views(image, 3 if tts is True else max(1, int(tts)))):
        ids, scores = seg.step(view, prompts if n == 0 else None)
    yield 0, stem, image, ids, scores

def _results(outputs, T, video_id, top_k=None):
    """YouTube-VIS results of a video's kept frames (t, id map, scores): the top_k (object,
    category) pairs by class probability averaged over the frames the object was output
    (Mask2Former-VIS), each with its RLE per frame (None = absent). Objects never in an id map go
    before the cut."""
    rles, sums, counts = {}, {}, {}
    for t, ids, scores in outputs:
        for k in np.unique(ids).tolist():
            if k:
                rles.setdefault(k, [None] * T)[t] = rle_encode(ids == k)
        for k, p in scores.items():
            sums[k] = sums.get(k, 0) + p
            counts[k] = counts.get(k, 0) + 1
    pairs = [(k, c, float(p)) for k in rles if k in sums for c, p in enumerate(sums[k] / counts[k])]
    pairs = sorted(pairs, key=lambda pair: -pair[2])[:top_k]
    return [{"video_id": video_id, "category_id": c + 1, "score": s, "segmentations": rles[k]}
            for k, c, s in pairs]

def _ground_truth(clip, video_id):  # a data.Clip as YouTube-VIS annotations (label < 0: category 1)
    anns = []
    for mask, label in zip(clip.masks, clip.labels):  # mask (T, H, W)
        segs = [rle_encode(m.numpy()) if m.any() else None for m in mask]
        anns.append({"video_id": video_id, "category_id": int(label.clamp(min=0)) + 1,
                     "segmentations": segs})
    return anns

def matched_ids(gt, pred, iou=0.5):
    """Which predicted id covers each ground-truth object on each frame: gt (n, T, H, W) bool
    masks, pred (T, H, W) id maps -> (n, T) int64: the id whose mask has the highest IoU with the
    object's, if that IoU >= iou; 0: none does; -1: the object is not in the frame."""
    n, T = gt.shape[:2]
    out = np.full((n, T), -1, dtype=np.int64)                                          # (n, T)
    for t in range(T):
        ids = np.asarray(pred[t]).ravel()                                               # (H*W,)
        areas = np.bincount(ids, minlength=1)                                           # (K,)
        for i in range(n):
            inside = np.asarray(gt[i, t]).ravel()                                       # (H*W,)
            if not inside.any():
                continue
            inter = np.bincount(ids[inside], minlength=len(areas))                      # (K,)
            union = inside.sum() + areas - inter                                        # (K,)
            ious = inter / union
            ious[0] = 0  # background is no id
            best = int(ious.argmax())
            out[i, t] = best if ious[best] >= iou else 0
    return out

def identity_counts(matched):
    """Track identity of (n, T) matched_ids -> (objects, switched, returns, reidentified).
    switched: objects covered by more than one predicted id over the video (ID switches).
    returns: the times an object leaves the frame (absent >= 1 frame) and comes back, having had
    an id when it left; reidentified: those where the first id that covers it again is that id."""
    switched = 0
    returns = 0
    reidentified = 0
    for row in matched:                                                                 # (T,)
        switched += len(set(row[row > 0].tolist())) > 1
        visible = np.flatnonzero(row >= 0)
        if len(visible) == 0:
            continue
        starts = visible[np.flatnonzero(np.diff(visible) > 1) + 1]  # first frame of each return
        for start in starts:
            before = row[:start][row[:start] > 0]
            after = row[start:][row[start:] > 0]
            if len(before) == 0:
                continue
            returns += 1
            reidentified += bool(len(after)) and after[0] == before[-1]
    return len(matched), switched, returns, reidentified

def _share(part, whole):  # a fraction, NaN when there is nothing to count
    return part / whole if whole else float("nan")

def heldout_scores(model, clips, dataset="synthetic", top_k=10, threshold=0.5, tts=False, seed=0,
                   reuse_after=None):
    """Prompted J&F (frame 0's objects given, DAVIS protocol), unprompted video AP (YouTube-VIS) of
    data.Clip's, and track identity: "switches" (share of objects covered by > 1 id, unprompted),
    "reid" / "reid_prompted" (share of returns after leaving the frame that come back under their
    own id), "full" (videos where B had no slot for a new object, unprompted), "reused" (slots
    given to a new object, unprompted). Video v's Sampler is seeded by sampler_seed(seed, v)."""
    sequences, videos, annotations, results = [], [], [], []
    counts = np.zeros((2, 4), dtype=np.int64)  # prompted, unprompted: identity_counts summed
    full = 0
    reused = 0
    for v, clip in enumerate(clips, 1):
        T = len(clip.frames)
        first = clip.masks[clip.masks[:, 0].flatten(1).any(1)]  # (n, T, H, W): frame 0's objects
        gt = _id_maps(first, range(1, len(first) + 1))  # (T, H, W): ids 1..n, prompted on frame 0
        def frame(t):
            return clip.frames[t], f"{t:05d}"
        def prompts(t, stem):
            return {k: gt[0] == k for k in range(1, len(first) + 1)} if t == 0 else None
        options = dict(top_k=top_k, threshold=threshold, seed=sampler_seed(seed, v),
                       reuse_after=reuse_after)
        seg = Segmenter(model, "prompted", dataset, **options)
        pred = sorted(segment(seg, T, frame, prompts, tts), key=lambda out: out[0])
        pred = np.stack([out[3] for out in pred])  # (T, H, W)
        sequences.append((clip.name, gt, pred))
        counts[0] += identity_counts(matched_ids(first.numpy(), pred))
        seg = Segmenter(model, "unprompted", dataset, **options)
        with warnings.catch_warnings():  # a full ID buffer is counted in "full" instead
            warnings.simplefilter("ignore")
            kept = [(t, ids, scores) for t, _, _, ids, scores in segment(seg, T, frame, tts=tts)]
        results += _results(kept, T, v, top_k)
        ids = np.stack([ids for _, ids, _ in sorted(kept, key=lambda out: out[0])])  # (T, H, W)
        counts[1] += identity_counts(matched_ids(clip.masks.numpy(), ids))
        full += seg.warned_full
        reused += len(seg.retired)
        videos.append({"id": v, "height": clip.frames.shape[2], "width": clip.frames.shape[3],
                       "length": T})
        annotations += _ground_truth(clip, v)
    categories = [{"id": k} for k in sorted({a["category_id"] for a in annotations + results})]
    annotations = [dict(a, id=n) for n, a in enumerate(annotations, 1)]
    gt = {"videos": videos, "annotations": annotations, "categories": categories}
    ap = ytvis_ap(gt, results)
    jf = davis_scores(sequences)
    return {"J&F": jf["J&F-Mean"], "J": jf["J-Mean"], "F": jf["F-Mean"], "AP": ap["AP"],
            "AP50": ap["AP50"], "AR10": ap["AR10"], "switches": _share(counts[1, 1], counts[1, 0]),
            "reid": _share(counts[1, 3], counts[1, 2]),
            "reid_prompted": _share(counts[0, 3], counts[0, 2]), "returns": int(counts[1, 2]),
            "full": full, "reused": reused}

HELDOUT_VIDEOS = 32  # held-out synthetic videos per evaluation (issue 17: 8 moved 0.07 by threads)
LENGTHS = (16, 64, 256)  # --eval long: frames per held-out video

def evaluate_heldout(model, cfg, n=HELDOUT_VIDEOS):  # train.py's end-of-run hook
    return heldout_scores(model.eval(), heldout("synthetic", n, size=cfg.image_size))

def long_video_scores(model, lengths=LENGTHS, n=HELDOUT_VIDEOS, seed=0, reuse_after=None,
                      seeds=1):
    """--eval long: the same n held-out synthetic videos at each length -> {T: heldout_scores},
    a row printed as each length finishes. seeds > 1: each length at Sampler seeds seed ..
    seed + seeds - 1, a row each, and their mean (mean_row), which is what rows[T] holds; last,
    each length against the shortest (length_summary)."""
    last = seed + seeds - 1
    which = f"seed {seed}"
    if seeds > 1:
        which = f"Sampler seeds {seed} to {last}"
    print(f"{n} held-out synthetic videos per length ({which})")
    print(LENGTH_HEADER, flush=True)
    rows = {}
    for T in lengths:
        clips = heldout("synthetic", n, T, model.cfg.image_size)
        runs = []
        t_length = time.time()
        for s in range(seed, last + 1):
            t0 = time.time()
            runs.append(heldout_scores(model.eval(), clips, seed=s, reuse_after=reuse_after))
            label = f"{T} (seed {s})" if seeds > 1 else T
            print(length_row(label, runs[-1], time.time() - t0), flush=True)
        rows[T] = runs[0]
        if seeds > 1:
            rows[T] = mean_row(runs)
            print(length_row(f"{T} (mean)", rows[T], time.time() - t_length), flush=True)
    for line in length_summary(rows, n * seeds):
        print(line, flush=True)
    return rows

def mean_row(runs):
    """One length's rows at several Sampler seeds -> their mean: scores averaged, `returns` (the
    same videos at every seed) once, buffers full and slots reused summed over the seeds."""
    row = {k: float(np.mean([r[k] for r in runs])) for k, v in runs[0].items()
           if isinstance(v, float)}
    row["returns"] = runs[0]["returns"]
    row["full"] = sum(r["full"] for r in runs)
    row["reused"] = sum(r["reused"] for r in runs)
    return row

def length_summary(rows, videos):
    """Each longer length against the shortest, as issue 17's targets read (J&F within 0.03 of
    the shortest's, AP >= 90% of it, no full buffer in any of the videos runs) -> lines."""
    T0 = min(rows)
    first = rows[T0]
    lines = []
    for T in sorted(rows)[1:]:
        ratio = rows[T]["AP"] / first["AP"] if first["AP"] > 0 else float("nan")
        lines.append(f"{T} frames against {T0}: J&F {rows[T]['J&F'] - first['J&F']:+.3f}, AP "
                     f"{ratio:.1%} of its {T0}-frame value, buffer full in {rows[T]['full']} of "
                     f"{videos} videos")
    return lines

LENGTH_HEADER = ("frames | prompted J&F | unprompted AP | ID switches | re-id unprompted | "
                 "re-id prompted | returns | buffer full | slots reused | seconds")

def length_row(T, s, seconds):
    """One line of the length table (the README's format)."""
    return (f"{T} | {s['J&F']:.3f} | {s['AP']:.3f} | {s['switches']:.3f} | {s['reid']:.3f} | "
            f"{s['reid_prompted']:.3f} | {s['returns']} | {s['full']} | {s['reused']} | "
            f"{seconds:.0f}")

def copy_first_mask(gt):
    """The copy-the-first-mask baseline: frame 0's ground truth (void 255 -> background) as the
    prediction of every frame, (T, H, W) -> (T, H, W)."""
    first = np.where(gt[0] == 255, 0, gt[0])    # (H, W)
    return np.repeat(first[None], len(gt), axis=0)   # (T, H, W)

def _with_copy(sequences, copy_objects):
    """Pass (name, gt, pred) through; score copy_first_mask(gt) on the way into copy_objects."""
    for name, gt, pred in sequences:
        copy_objects += davis_scores([(name, gt, copy_first_mask(gt))])["objects"]
        yield name, gt, pred

def _per_sequence(objects):  # davis_scores' objects -> {sequence: J&F mean over its objects}
    jf = {}
    for name, j, f in objects:
        jf.setdefault(name.rsplit("_", 1)[0], []).append((j[0] + f[0]) / 2)
    return {k: float(np.mean(v)) for k, v in jf.items()}

def davis_side_by_side(sequences):
    """J&F of (name, gt, pred) sequences and of the copy-the-first-mask baseline on the same ground
    truth, one sequence in memory at a time -> (davis_scores of pred, {"sequences": {name: (J&F,
    copy J&F)}, "J&F": overall, "copy": overall}); overall = the mean over all objects."""
    copy_objects = []
    s = davis_scores(_with_copy(sequences, copy_objects))
    model = _per_sequence(s["objects"])
    copy = _per_sequence(copy_objects)
    copy_all = float(np.mean([(j[0] + f[0]) / 2 for _, j, f in copy_objects]))
    rows = {k: (model[k], copy[k]) for k in model}
    return s, {"sequences": rows, "J&F": s["J&F-Mean"], "copy": copy_all}

def print_side_by_side(side):
    print(f"{'Sequence':<24}{'J&F':>10}{'copy J&F':>10}   (copy: frame 0's ground truth on every "
          f"frame)")
    for name, (m, c) in side["sequences"].items():
        print(f"{name:<24}{m:>10.4f}{c:>10.4f}")
    print(f"{'Global':<24}{side['J&F']:>10.4f}{side['copy']:>10.4f}", flush=True)

def _real_sequences(model, videos, dataset):
    """Yield (name, gt, pred) of each real video: prompted with frame 0's objects, the frames at
    their own size (the Segmenter resizes them), pred and gt (T, H, W) id maps."""
    for v, video in enumerate(videos, 1):
        gt = []
        pred = []
        seg = Segmenter(model, "prompted", dataset, seed=sampler_seed(0, v))
        for t in range(len(video.frames)):
            img = _read_image(video.frames[t])                         # (H, W, 3)
            ann = video.load(t, img.shape[0], img.shape[1])            # {id: bool (H, W)}
            ids = np.zeros(img.shape[:2], np.uint8)                    # (H, W)
            for k, m in ann.items():
                ids[m] = k
            gt.append(ids)
            prompts = {k: gt[0] == k for k in np.unique(gt[0]) if k} if t == 0 else None
            pred.append(seg.step(_to_tensor(img), prompts)[0])
        yield video.name, np.stack(gt), np.stack(pred)

def real_heldout_scores(model, spec):
    """train.py's end-of-run hook for real data: spec's (davis|mose|ytvos:DIR) validation split,
    whole videos, prompted J&F at the frames' own size beside the copy baseline's, printed."""
    videos = data._open(spec, train=False)
    kind = spec.partition(":")[0]
    _, side = davis_side_by_side(_real_sequences(model.eval(), videos, kind))
    print(f"heldout {spec} (validation split, {len(videos)} videos, prompted):")
    print_side_by_side(side)
    return side

def load_model(path, device="cpu"):
    """A train.py checkpoint -> AUSM in eval mode, built from the Config stored in it. Read by
    train.load_checkpoint: weights_only=True refuses pickled code, so a hostile file runs
    nothing."""
    checkpoint = train.load_checkpoint(path, flag="--checkpoint")
    try:
        model = ausm.AUSM(ausm.Config(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
    except Exception as e:  # weights of another Config, or a config this code does not know
        why = " ".join(f"{type(e).__name__}: {e}".split())[:120]
        raise ValueError(f"checkpoint {path} does not fit this code's model ({why}); train one "
                         "with this code: python train.py --stage 1") from None
    return model.to(device).eval()

# ------------------------------------------------------------------- The inference command line
def _check_args(args):  # before anything is read or written
    counts = (("--num-frames", args.num_frames), ("--top-k", args.top_k), ("--tts", args.tts),
              ("--num-videos", args.num_videos), ("--seeds", args.seeds))
    for flag, n in counts:
        if n is not None and n < 1:
            raise ValueError(f"{flag} {n}: give a whole number >= 1")
    if args.gif_frames < 0:
        raise ValueError(f"--gif-frames {args.gif_frames}: give 0 (no GIF) or more")
    if args.reuse_after < 0:
        raise ValueError(f"--reuse-after {args.reuse_after}: give 0 (never reuse a slot) or more")
    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold {args.threshold}: a foreground probability, from 0 to 1")

def _lengths(text):  # --lengths "16,64,256" -> (16, 64, 256)
    parts = text.split(",")
    if not all(p.strip().isdigit() and int(p) >= 2 for p in parts):
        raise ValueError(f"--lengths {text}: give frame counts >= 2 separated by commas, e.g. "
                         "16,64,256")
    return tuple(int(p) for p in parts)

def _dataset(model, name):  # --dataset: one of the checkpoint's class heads (None: its first)
    known = [n for n, _ in model.cfg.class_heads]
    if name is None:
        return known[0] if known else "synthetic"
    if name not in known:
        raise ValueError(f"--dataset {name}: the checkpoint has class heads for "
                         f"{', '.join(known) or 'no dataset'}; give one of them")
    return name

def _no_prompts(t, stem):
    return None

def _prompt_reader(args, hw, gt):  # -> prompts(t, stem): {id: mask} of frame t's prompt, or None
    if args.mode == "unprompted":
        return _no_prompts
    src = Path(args.prompt or ".")
    if not (src.exists() if args.prompt else gt):
        raise FileNotFoundError(f"--prompt {args.prompt}: --mode prompted needs an existing "
                                "palette PNG of frame 0 or a folder of <frame>.png masks (or run "
                                "--mode unprompted)")
    def prompts(t, stem):
        f = src / f"{stem}.png" if src.is_dir() else src
        if not args.prompt:  # synthetic: its ground truth; objects join where first seen
            return {k: gt(t) == k for k in np.unique(gt(t)).tolist() if k}
        if not f.is_file() or (t > 0 and f == src):  # one PNG: frame 0's; a folder: <stem>.png
            return None
        ids = read_palette_png(f)
        if ids.shape != hw:
            raise ValueError(f"{f}: prompt is {ids.shape} (h, w), the frames of {args.video} "
                             f"{hw}: resize the masks")
        objects = [k for k in np.unique(ids).tolist() if k not in (0, 255)]
        if not objects:
            print(f"warning: {f}: the prompt of frame {stem} has no object (only 0 = background "
                  "and 255 = void)", file=sys.stderr)
        return {k: ids == k for k in objects}
    return prompts

def _overlay(img, ids):  # half frame, half palette colour on objects -> a PIL image
    rgb = img.permute(1, 2, 0).numpy() * 255  # (H, W, 3)
    colour = np.reshape(VOC_PALETTE, (256, 3))[ids % 256]  # (H, W, 3)
    return Image.fromarray(np.where(ids[..., None], (rgb + colour) / 2, rgb).astype("uint8"))

def _replace(tmp, path):  # move a finished file or folder into place; an old one goes only then
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.is_dir():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)

def _write_outputs(out, name, T, outputs, args):
    """PNGs, results.json and the GIF are written to temporary names and replace the old ones only
    once the whole video ran: a bad frame mid-video leaves an earlier run's outputs as they were."""
    pngs = out / f".{name}.tmp"
    shutil.rmtree(pngs, ignore_errors=True)
    gif = []
    def written():  # each kept frame's palette PNG as it comes; the first --gif-frames overlays
        for t, stem, img, ids, scores in outputs:
            write_palette_png(pngs / f"{stem}.png", ids)
            if len(gif) < args.gif_frames:
                gif.append((t, _overlay(img, ids)))
            yield t, ids, scores
    try:
        results = _results(written(), T, 1, args.top_k if args.mode == "unprompted" else None)
    except BaseException:
        shutil.rmtree(pngs, ignore_errors=True)
        raise
    (out / ".results.json.tmp").write_text(json.dumps(results))
    _replace(pngs, out / name)
    _replace(out / ".results.json.tmp", out / "results.json")
    if gif:
        frames = [image for _, image in sorted(gif, key=lambda g: g[0])]  # x2 yields T..1
        frames[0].save(out / f".{name}.tmp.gif", save_all=True, append_images=frames[1:],
                       duration=100, loop=0)
        _replace(out / f".{name}.tmp.gif", out / f"{name}.gif")

def _checkpoint_path(args):  # --checkpoint, else the last default run's: stage 3, 2, then 1
    if args.checkpoint:
        return args.checkpoint
    for stage in (3, 2):
        if Path(f"runs/stage{stage}/ckpt.pt").is_file():
            return f"runs/stage{stage}/ckpt.pt"
    return "runs/stage1/ckpt.pt"

def run(args):  # writes <out>/<video>/<frame>.png, <out>/results.json, <out>/<video>.gif
    _check_args(args)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(_checkpoint_path(args), dev)
    dataset = _dataset(model, args.dataset)
    name, T, hw, frame, gt = open_video(args.video, args.num_frames, model.cfg.image_size)
    prompts = _prompt_reader(args, hw, gt)
    seed = sampler_seed(args.seed, 0)
    seg = Segmenter(model, args.mode, dataset, args.top_k, args.threshold, seed, args.reuse_after)
    if T == 1 and args.tts > 1:  # one image: Sec. 3.4's pseudo-video of image_views
        image, stem = frame(0)
        outputs = segment_image(seg, image, stem, prompts(0, stem), args.tts)
    else:
        outputs = segment(seg, T, frame, prompts, args.tts)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_outputs(out, name, T, outputs, args)
    dt = time.time() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    cuda = torch.cuda.max_memory_allocated() / 2**20
    print(f"{name}: {T} frames in {dt:.1f} s = {T / dt:.1f} frames/s ({args.mode}, x{args.tts}) | "
          f"peak RSS {rss:.0f} MB, CUDA {cuda:.0f} MB | wrote {out}/{name}/*.png, results.json"
          f"{f', {name}.gif' if args.gif_frames else ''}")

# ------------------------------------------------------------------------------------ Command line
def _davis_sequences(gt_dir):
    """The sequences to score, from the ground truth (never from --pred) -> (the folder of their
    <sequence>/<frame>.png, names). --gt is a DAVIS root (ImageSets/2017/val.txt and
    Annotations/480p in it) or a folder with that val.txt two levels up (DAVIS/Annotations/480p):
    the sequences val.txt lists; any other folder: all its <sequence> subfolders."""
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"--gt {gt_dir} is not a folder; expected a DAVIS root or a folder "
                                "of <sequence>/<frame>.png ground truth")
    listing = gt_dir / "ImageSets" / "2017" / "val.txt"
    if listing.is_file():
        gt_dir = gt_dir / "Annotations" / "480p"
    else:
        listing = gt_dir.resolve().parent.parent / "ImageSets" / "2017" / "val.txt"
    if listing.is_file():
        return gt_dir, listing.read_text().split()
    names = sorted(p.name for p in gt_dir.iterdir() if p.is_dir())
    if not names:
        raise FileNotFoundError(f"--gt {gt_dir} has no <sequence> folders; expected "
                                f"{gt_dir}/<sequence>/00000.png")
    return gt_dir, names

def _read_mask_like(path, like, shape, seq):
    """A palette PNG of ids (H, W) that must have the size of the ground-truth file `like`."""
    ids = read_palette_png(path)                # (h, w)
    if ids.shape != shape:
        h, w = ids.shape
        raise ValueError(f"sequence {seq}: {path} is {h}x{w} (height x width) but {like} is "
                         f"{shape[0]}x{shape[1]}; masks must have the ground truth's size")
    return ids

def _davis_read_sequence(gt_dir, pred_dir, seq):
    """One sequence's ground truth and prediction, (T, H, W) id maps each. As in
    davis2017-evaluation, only the scored frames (not the first or last) need a predicted PNG."""
    files = sorted((gt_dir / seq).glob("*.png"), key=natural_key)
    if not files:
        raise FileNotFoundError(f"sequence {seq}: no ground-truth PNGs in {gt_dir / seq}")
    shape = read_palette_png(files[0]).shape    # (H, W)
    gt = np.stack([_read_mask_like(f, files[0], shape, seq) for f in files])   # (T, H, W)
    pred = np.zeros_like(gt)                    # (T, H, W); first and last frame stay unscored 0s
    for t in range(1, len(files) - 1):
        path = pred_dir / seq / files[t].name
        if not path.is_file():
            raise FileNotFoundError(f"sequence {seq}: {path} is missing; --pred needs a PNG for "
                                    "every ground-truth frame but the first and the last")
        pred[t] = _read_mask_like(path, files[t], shape, seq)
    return gt, pred

def _davis_folders(pred_dir, gt_dir):
    """Yield (name, gt, pred) per ground-truth sequence. A sequence missing from --pred is an
    error; --pred folders that are not ground-truth sequences are named in a warning, not scored."""
    gt_dir, names = _davis_sequences(gt_dir)
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"--pred {pred_dir} is not a folder; expected "
                                "<sequence>/<frame>.png palette PNGs")
    for seq in names:
        if not (pred_dir / seq).is_dir():
            raise FileNotFoundError(f"sequence {seq}: {pred_dir / seq} is missing; --pred needs a "
                                    f"folder for each of the {len(names)} ground-truth sequences")
    extra = sorted(p.name for p in pred_dir.iterdir() if p.is_dir() and p.name not in names)
    if extra:
        print(f"warning: --pred has {len(extra)} folder(s) that are not ground-truth sequences, "
              f"not scored: {_listed(extra)}", file=sys.stderr)
    for seq in names:
        gt, pred = _davis_read_sequence(gt_dir, pred_dir, seq)
        yield seq, gt, pred

def _print_davis(s):
    """davis2017-evaluation's table: a row per <sequence>_<object>, then Global."""
    cols = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
    print(f"{'Sequence_object':<24}" + "".join(f"{c:>10}" for c in cols))
    for name, (jm, jr, jd), (fm, fr, fd) in s["objects"]:
        values = ((jm + fm) / 2, jm, jr, jd, fm, fr, fd)
        print(f"{name:<24}" + "".join(f"{v:>10.4f}" for v in values))
    print(f"{'Global':<24}" + "".join(f"{s[c]:>10.4f}" for c in cols))

def _read_json(path, flag, what):
    """A JSON file named by a flag; a missing or broken file is named with what it should be."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path} is not a file; expected {what}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:                     # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{flag} {path} is not JSON ({e}); expected {what}") from None

def evaluate(kind, pred, gt):
    """--eval: score predictions on disk, print the benchmark's numbers, return them."""
    if kind == "davis":
        s, side = davis_side_by_side(_davis_folders(pred, gt))
        _print_davis(s)
        print()
        print_side_by_side(side)
        return s
    results = _read_json(pred, "--pred", "results.json, a list of per-video results")
    gt_dataset = _read_json(gt, "--gt", "the YouTube-VIS or OVIS annotations JSON")
    s = ytvis_ap(gt_dataset, results)
    for k, v in s.items():
        print(f"{k:<6} {v:.4f}")
    return s

def main(argv=None):
    ap = argparse.ArgumentParser(description="AUSM inference and benchmark scoring (paper Sec. 3).")
    ap.add_argument("--eval", choices=("davis", "ytvis", "long"), help="score predictions: J&F "
                    "or AP/AR; long: run the checkpoint on held-out synthetic videos of each "
                    "--lengths and print the length table (J&F, AP, ID switches, re-id)")
    ap.add_argument("--lengths", default="16,64,256", help="--eval long: frames per video, "
                    "comma-separated")
    ap.add_argument("--num-videos", type=int, default=HELDOUT_VIDEOS, help="--eval long: "
                    "held-out videos per length")
    ap.add_argument("--pred", help="davis: folder of <sequence>/<frame>.png; ytvis: results.json")
    ap.add_argument("--gt", help="davis: e.g. DAVIS/Annotations/480p; ytvis: the annotations JSON")
    ap.add_argument("--checkpoint", help="default runs/stage3/ckpt.pt, else stage2's, else "
                    "stage1's")
    ap.add_argument("--video", default="synthetic", help="folder of JPEG/PNG frames, GIF, image")
    ap.add_argument("--out", default="runs/infer", help="<out>/<video>/*.png, results.json, GIF")
    ap.add_argument("--prompt", help="frame 0's palette PNG, or a folder of <frame>.png")
    ap.add_argument("--mode", default="prompted", choices=("prompted", "unprompted"))
    ap.add_argument("--dataset", help="a class head of the checkpoint (default: its first)")
    ap.add_argument("--num-frames", type=int, help="stop after N frames (synthetic: default 16)")
    ap.add_argument("--top-k", type=int, default=10, help="unprompted: objects output per frame "
                    "and (track, category) pairs written (App. A: 10 YouTube-VIS, 20 OVIS)")
    ap.add_argument("--threshold", type=float, default=0.5, help="unprompted: fg probability for "
                    "an ID and for output (Alg. 1: 0.5; Table 2)")
    ap.add_argument("--tts", type=int, nargs="?", const=3, default=1, metavar="N", help="Sec. 3.4 "
                    "test-time scaling: N passes back and forth (alone: 3); an image: N visits")
    ap.add_argument("--seed", type=int, default=0, help="seeds the Sampler's draws of rows of B")
    ap.add_argument("--seeds", type=int, default=1, metavar="K", help="--eval long: score each "
                    "length at K Sampler seeds (--seed to --seed + K - 1) and print their mean: "
                    "at 256 frames one draw moves AP by up to 0.1 (README 'Long videos')")
    ap.add_argument("--reuse-after", type=int, default=REUSE_AFTER, metavar="N", help="unprompted, "
                    "ID buffer B full: a new object takes the slot of an object whose mask was "
                    "empty for N frames in a row (default 0: never, as Alg. 1; new objects are "
                    "dropped)")
    ap.add_argument("--gif-frames", type=int, default=64, help="overlay GIF frames (0: no GIF)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # measured: on this shared 2-core box a 2nd thread spin-waits
    try:
        if args.eval == "davis" and args.gt and args.checkpoint and not args.pred:
            # run the checkpoint on --gt's validation split (a DAVIS root), copy baseline beside
            return real_heldout_scores(load_model(args.checkpoint), f"davis:{args.gt}")
        if args.eval == "long":
            _check_args(args)
            lengths = _lengths(args.lengths)
            model = load_model(_checkpoint_path(args))
            return long_video_scores(model, lengths, args.num_videos, args.seed, args.reuse_after,
                                     args.seeds)
        if args.eval and not (args.pred and args.gt):
            ap.error(f"--eval {args.eval} needs both --pred and --gt (davis: or --checkpoint and "
                     f"--gt DAVIS_ROOT to run the model on its validation split)")
        return evaluate(args.eval, args.pred, args.gt) if args.eval else run(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

if __name__ == "__main__":
    main()
