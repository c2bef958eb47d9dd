"""infer.py -- run AUSM over videos frame by frame and score the outputs the way the benchmarks do.

Inference (Alg. 1, Sec. 3.4 test-time scaling, PAPER.md Sec. 6): `Segmenter` streams frames through
model.step with a constant-size State, prompted (VOS; masks on any frame) or unprompted (VIS); the CLI writes palette
PNGs, a YouTube-VIS results.json and an overlay GIF. Differs: frames are resized to the square image_size (masks
back); unprompted, only a frame's top-k detections join, and results.json keeps a video's top-k (track, category)
pairs, so a track may score several categories, as Mask2Former-VIS writes them. Metrics (Sec. 3, numpy, checked
against the reference tools' golden files): DAVIS J&F as davis2017-evaluation's semi-supervised protocol (first and
last frame not scored, objects = 1..max id of the first ground-truth frame, object-weighted; the sequences are the
ground truth's, or ImageSets/2017/val.txt's); video AP/AR as the YouTube-VIS cocoapi fork; input they cannot score
is refused, naming the sequence or result (unlike the fork, a result of an unknown category_id too).
Left out: OVIS occlusion buckets, YouTube-VOS G (needs the server's seen/unseen lists), DAVIS
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
from data import (VOC_PALETTE, _read_image, heldout, polygons_to_mask, read_palette_png, rle_area,
                  rle_counts, rle_decode, rle_encode, write_palette_png)

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
    if not isinstance(gt_dataset, dict) or not all(isinstance(gt_dataset.get(k), list) for k in needs):
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
    files = sorted((gt_dir / seq).glob("*.png"))
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
        s = davis_scores(_davis_folders(pred, gt))
        _print_davis(s)
        return s
    results = _read_json(pred, "--pred", "results.json, a list of per-video results")
    gt_dataset = _read_json(gt, "--gt", "the YouTube-VIS or OVIS annotations JSON")
    s = ytvis_ap(gt_dataset, results)
    for k, v in s.items():
        print(f"{k:<6} {v:.4f}")
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
