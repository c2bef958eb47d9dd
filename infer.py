"""infer.py -- run AUSM over videos and score the outputs the way the benchmarks do.

Paper Sec. 3 (benchmarks): prompted video segmentation (DAVIS 2017, YouTube-VOS, MOSE) is scored with
J&F, unprompted video instance segmentation (YouTube-VIS 2019/2021, OVIS) with video AP/AR.
The "Metrics" section below reimplements both in numpy, following ../shared/EVALUATION.md:
  * DAVIS J&F as davis2017-evaluation computes it in the semi-supervised protocol (first and last frame
    not scored, objects = 1..max id of the first ground-truth frame, object-weighted global means);
  * video AP/AR as the YouTube-VIS cocoapi fork (ytvoseval.py) computes it.
Both are checked against golden files produced by those reference tools (tests/test_infer.py).

Left out: OVIS occlusion buckets (its plain AP equals the YouTube-VIS AP computed here); YouTube-VOS
G (the seen/unseen split needs the benchmark server's category lists); DAVIS void pixels (the
semi-supervised evaluator passes none, so 255 in a ground-truth PNG is background); the unsupervised
DAVIS protocol.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from data import polygons_to_mask, read_palette_png, rle_area, rle_decode


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------

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


def davis_f(pred, gt, bound_th=0.008):
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
    """Mean, Recall (share of frames > 0.5) and Decay (first quarter minus last) of per-frame scores.
    The quarters are davis2017's db_statistics bins (they share their end frames)."""
    v = np.asarray(values, float)
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(int)   # davis2017: uint8, wraps past 256
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    return float(np.mean(v)), float(np.mean(v > 0.5)), float(np.mean(bins[0]) - np.mean(bins[3]))


def davis_sequence(gt, pred, bound_th=0.008, name="sequence"):
    """Per-object, per-frame J and F of one sequence. gt, pred: (T, H, W) integer id maps.
    Scores frames 1..T-2 for objects 1..N, N = max id of the first ground-truth frame (255 = void,
    read as background). -> J, F: (N, T - 2) arrays."""
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
    """J&F over sequences, an iterable of (name, gt, pred) with (T, H, W) id maps (one in memory at a time).
    -> {"objects": [(f"{name}_{i}", J_MRD, F_MRD), ...], "J&F-Mean", "J-Mean", "J-Recall", "J-Decay",
        "F-Mean", "F-Recall", "F-Decay"}; the global numbers are means over all objects of all sequences."""
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
    """Video IoU (D, G) of detections d and ground truths g, each a list of per-frame segmentations:
    sum over frames of intersections / sum of unions (a frame where one is absent adds the other's area).
    Decodes one frame at a time, so memory does not grow with the video."""
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


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def _davis_folders(pred_dir, gt_dir):
    """Yield (name, gt, pred) for each <sequence> folder of pred_dir, gt from gt_dir/<sequence>/*.png.
    As in davis2017-evaluation only the scored frames (all but the first and last) need a prediction."""
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
    # (inference flags --checkpoint, --video, --out, --prompt, --mode, --num-frames go here)
    args = ap.parse_args(argv)
    try:
        if args.eval:
            if not (args.pred and args.gt):
                ap.error(f"--eval {args.eval} needs both --pred and --gt")
            return evaluate(args.eval, args.pred, args.gt)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    ap.print_help()


if __name__ == "__main__":
    main()
