"""data.py -- every clip AUSM trains or is evaluated on, in one format (Clip), plus an exact COCO
RLE codec.

Paper (Heo et al., arXiv 2508.19242): Sec. 3's recipe trains stage 1 on pseudo-videos made from
  still images (COCO), VITA-style: one image augmented independently per frame (random resize, crop,
  flip, small rotation) with instance ids kept; stages 2/3 on T-frame clips of real videos
  (YouTube-VOS, MOSE, YouTube-VIS, OVIS) sampled in order with a random stride, longer in stage 3
  (the caller's T). Sec. 2.3: each dataset has its own class head, NUM_CLASSES (0 = class-agnostic
  VOS data); Clip.dataset picks it.
What differs: nothing can be downloaded, so the default is a procedural world ("synthetic"): a
  textured background and 1-5 objects of 6 shape categories in distinct striped colours. Stage 1
  makes pseudo-videos of a still scene as above; stages 2/3 get videos where objects move, scale and
  rotate along smooth paths, occlude each other (depth order), leave the frame and come back, and
  appear mid-video, over a panning background (square frames of `size`); a steady drift turns back
  every DRIFT_TURN frames so that long videos keep their objects, and stage 3's clips draw more wide
  swings (STAGE3_WIDE_SHARE) to teach finding an object again. Real frames keep their
  aspect ratio as the paper's do (frame_size: short side `size`, long side a multiple of 8);
  training, like evaluation, takes whole frames (one frame size per batch: fit_batch crops a batch
  of mixed sizes to its smallest); a real training clip (stages 2/3) is seen by a moving random
  camera (clip_views: zoom, rotation, shift interpolated over the clip, mirrored, or played
  backwards), so that a few real videos give many different clips.
  Decoded real frames are cached at that size (CACHE_FRAMES). `batches` mixes two specs
  (synthetic,davis:DIR) batch by batch. Real formats (PAPER.md Sec. 8) are read with numpy + PIL
  (RLE, polygons as pycocotools, bit for bit); `python data.py --write davis:DIR` writes the
  synthetic set in them.
  Masks as people have them: a palette PNG's values are object ids (255 = void); a binary mask
  (grayscale 0/k such as DAVIS 2016's 0/255, or 1-bit) is object 1; frames numbered without zero
  padding are read in natural order (frame2 before frame10).
Left out: per-dataset mixture weights beyond two specs, SA-1B, large-scale jitter, colour
  augmentation.
"""
import argparse
import functools
import itertools
import json
import math
import re
import warnings
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

NUM_CLASSES = {"synthetic": 6, "coco": 80, "ytvis19": 40, "ytvis21": 40, "ovis": 25,
               "davis": 0, "mose": 0, "ytvos": 0}     # 0 = class-agnostic (foreground logit only)
SYNTHETIC_CATEGORIES = ("circle", "square", "triangle", "star", "ring", "cross")
_TRAIN = 1     # first word of every synthetic training seed,
_HELDOUT = 2   # and of every held-out one: the two sets of keys can never coincide
_MIX = 3       # first word of the seed that picks each mixed batch's dataset (see batches)
_CROP = 4      # and of the one that places fit_batch's crops
WIDE_SHARE = 0.3  # share of synthetic objects that swing out of the frame and back
STAGE3_WIDE_SHARE = 0.6  # the same share in stage 3's clips (long-video adaptation)
AUGMENT_CLIPS = True  # real training clips (stages 2/3) through clip_views: a moving random view
DRIFT_TURN = 24  # a synthetic object's drift turns back every this many frames (clips of <= 24
# frames, every one that training and the 16-frame held-out set use, are as before)

@dataclass
class Clip:
    frames: torch.Tensor   # (T, 3, H, W) float32 in [0, 1]
    # (N, T, H, W) bool; masks[i, t] = instance i in frame t (all False = absent)
    masks: torch.Tensor
    # (N,) long: category index in [0, K) of this dataset's head; -1 = no class
    labels: torch.Tensor
    ids: list              # N original object ids (palette index, annotation id, ...), for outputs
    dataset: str  # "synthetic", "coco", "davis", "mose", "ytvos", "ytvis19", "ytvis21", "ovis"
    name: str              # video / image name, for messages and output folders

# ----------------------------------------------------------------------------- COCO RLE, numpy only
def _counts_to_string(counts):
    """COCO's compressed counts: 5 bits a character, low bits first, deltas from the 4th count."""
    out = []
    for i, c in enumerate(counts):
        x = int(c)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5                                   # arithmetic shift, like C's on a signed long
            more = (x != -1) if ch & 0x10 else (x != 0)
            out.append(chr((ch | 0x20 if more else ch) + 48))
    return "".join(out)

def _string_to_counts(s):
    counts = []
    p = 0
    while p < len(s):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(s):
                raise ValueError("compressed RLE string ends in the middle of a count (truncated?)")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"character {s[p]!r} at {p} is not a COCO RLE character "
                                 f"(ASCII 48..111)")
            x |= (c & 0x1F) << (5 * k)
            more = c & 0x20
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)                    # sign-extend the last group
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts

def rle_counts(rle):
    """The run lengths of an RLE dict whose counts are a compressed str/bytes or a list of ints."""
    c = rle["counts"]
    if isinstance(c, bytes):
        c = c.decode("ascii")
    if isinstance(c, str):
        return _string_to_counts(c)
    return [int(x) for x in c]

def rle_encode(mask):
    """(h, w) mask -> {"size": [h, w], "counts": str}: column-major runs starting with zeros,
    compressed."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"rle_encode expects one (h, w) mask, got shape {m.shape}")
    flat = (m != 0).ravel(order="F")                                    # (h*w,) column-major
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    starts_with_one = flat.size > 0 and flat[0]
    counts = [0] * int(starts_with_one) + runs                          # the first run counts zeros
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": _counts_to_string(counts)}

def rle_decode(rle):
    """RLE dict (compressed str/bytes or uncompressed list) -> uint8 (h, w). Runs past h*w are an
    error."""
    try:
        h, w = (int(v) for v in rle["size"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"RLE needs 'size': [h, w] and 'counts'; got keys {list(rle)}") from None
    counts = np.asarray(rle_counts(rle), dtype=np.int64)
    if (counts < 0).any():
        raise ValueError(f"RLE has a negative run length ({counts.min()}); counts are corrupt")
    if counts.sum() > h * w:
        raise ValueError(f"RLE runs cover {counts.sum()} pixels but its size {h}x{w} has only "
                         f"{h * w}")
    flat = np.repeat((np.arange(len(counts)) % 2).astype(np.uint8), counts)
    flat = np.pad(flat, (0, h * w - flat.size))  # short RLE: rest is 0 (as pycocotools)
    return np.ascontiguousarray(flat.reshape(w, h).T)                   # (h, w)

def rle_area(rle):
    return int(sum(rle_counts(rle)[1::2]))

def mask_to_bbox(mask):
    """[x, y, w, h] floats of the set pixels ([0, 0, 0, 0] when empty), like pycocotools' toBbox."""
    ys, xs = np.nonzero(np.asarray(mask))
    if xs.size == 0:
        return [0.0] * 4
    return [float(v) for v in (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)]

def mask_iou(a, b, crowd=False):
    """IoU of two masks; crowd=True: |a & b| / |a| (b is a crowd region). 0 when the denominator is
    0."""
    a = np.asarray(a) != 0
    b = np.asarray(b) != 0
    inter = int((a & b).sum())
    den = int(a.sum() if crowd else (a | b).sum())
    return inter / den if inter else 0.0

def _poly_mask(xy, h, w, scale=5.0):
    """pycocotools' rleFrPoly: trace the edges at 5x, keep where they cross pixel columns, fill
    between."""
    x = np.trunc(scale * xy[0::2] + 0.5).astype(np.int64)              # C's (int) cast truncates
    y = np.trunc(scale * xy[1::2] + 0.5).astype(np.int64)
    x = np.append(x, x[0])                                              # close the polygon
    y = np.append(y, y[0])
    us = []
    vs = []
    for j in range(len(x) - 1):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])   # the edge's two ends
        dx = abs(xe - xs)
        dy = abs(ye - ys)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        t = np.arange(max(dx, dy) + 1)
        if flip:
            t = max(dx, dy) - t
        if dx >= dy:                          # step along x, round y (and the other way round)
            slope = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append(np.trunc(ys + slope * t + 0.5).astype(np.int64))
        else:
            us.append(np.trunc(xs + (xe - xs) / dy * t + 0.5).astype(np.int64))
            vs.append(t + ys)
    u = np.concatenate(us)
    v = np.concatenate(vs)
    j = np.flatnonzero(u[1:] != u[:-1]) + 1                            # where the traced x changes
    xd = (np.where(u[j] < u[j - 1], u[j], u[j] - 1) + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = np.ceil(np.clip((np.minimum(v[j], v[j - 1]) + 0.5) / scale - 0.5, 0, h))
    # column-major pixels where a run flips
    idx = xd[keep].astype(np.int64) * h + yd[keep].astype(np.int64)
    # crossings hit twice cancel, as in C
    flat = np.bincount(idx, minlength=h * w + 1)[:h * w].cumsum() % 2
    return flat.astype(np.uint8).reshape(w, h).T                       # (h, w)

def polygons_to_mask(polygons, h, w, where="polygon"):
    """COCO polygons [[x0, y0, x1, y1, ...], ...] -> uint8 (h, w) union, as pycocotools; one with
    < 6 numbers is skipped."""
    mask = np.zeros((h, w), np.uint8)
    for i, poly in enumerate(polygons):
        xy = np.asarray(poly, dtype=np.float64).ravel()
        if xy.size < 6 or xy.size % 2:
            warnings.warn(f"{where} {i}: {xy.size} numbers; a polygon needs >= 3 (x, y) pairs -- "
                          f"skipped")
            continue
        mask |= _poly_mask(xy, h, w)
    return mask

# ------------------------------------------------------------------------ images and palette PNGs
def _voc_palette():
    i = np.arange(256)[:, None]                # (256, 1) palette index
    pal = np.zeros((256, 3), np.int64)         # (256, 3) r, g, b
    for j in range(8):                         # bits 0, 1, 2 of i >> 3j go to bit 7 - j of r, g, b
        pal |= ((i >> (3 * j + np.arange(3))) & 1) << (7 - j)
    return pal.ravel().tolist()

VOC_PALETTE = _voc_palette()

def _load_image(path, palette):
    """-> (uint8 (h, w, 3) RGB frame or uint8 (h, w) mask values, the file's PIL mode)."""
    what = "mask PNG" if palette else "frame image"
    expected = "palette PNG" if palette else "JPEG/PNG frame"
    try:
        with Image.open(path) as im:
            im.load()
            if palette and im.mode not in ("P", "L", "1"):
                raise ValueError(f"{path}: mask is mode {im.mode!r}; expected an 8-bit palette "
                                 f"('P') PNG whose pixel values are object ids, or a binary mask "
                                 f"(re-save it with data.write_palette_png)")
            if palette:
                return np.array(im, dtype=np.uint8), im.mode
            return np.array(im.convert("RGB"), dtype=np.uint8), im.mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot decode {what} ({e}); expected a complete {expected} "
                         f"(re-extract or re-download it)") from None

def _read_image(path, palette=False):
    """-> uint8 (h, w, 3) RGB frame, or uint8 (h, w) values of a mask PNG. Bad files are named."""
    return _load_image(path, palette)[0]

def read_palette_png(path):
    """A mask PNG -> uint8 (h, w) object ids. A palette ("P") PNG's values are the ids (255 = void,
    dropped by the readers). A binary mask -- mode "1", or a grayscale ("L") PNG with one value
    besides 0, as DAVIS 2016 and most tools save them (0/255) -- is object 1; a grayscale PNG with
    more values is read as ids, like a palette one. RGB masks are refused (a classic bug)."""
    ids, mode = _load_image(path, palette=True)
    if mode in ("L", "1"):
        values = np.unique(ids)
        if np.count_nonzero(values) == 1:
            return (ids != 0).astype(np.uint8)
    return ids

def natural_key(path):
    """Sort key of a file name that compares its numbers as numbers: frame2 before frame10."""
    parts = re.split(r"(\d+)", Path(path).name)
    return [int(p) if i % 2 else p for i, p in enumerate(parts)]

def write_palette_png(path, ids):
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.min(initial=0) < 0 or ids.max(initial=0) > 255:
        raise ValueError(f"{path}: ids must be one (h, w) array of values 0..255, got shape "
                         f"{ids.shape}")
    pixels = np.ascontiguousarray(ids, np.uint8).tobytes()
    im = Image.frombytes("P", (ids.shape[1], ids.shape[0]), pixels)
    im.putpalette(VOC_PALETTE)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)

# ----------------------------------------------------------------------------- synthetic world
def _hsv(h, s, v):
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)            # (3,) rgb in [0, 1]

def _shape(cat, u, v):
    """Inside-test of category `cat` in the object's own frame (radius ~1). u, v: (T, H, W)."""
    r2 = u * u + v * v
    au = u.abs()
    av = v.abs()
    if cat == 0:                                                        # circle
        return r2 <= 1
    if cat == 1:                                                        # square
        return torch.maximum(au, av) <= 0.8
    if cat == 2:                                                        # triangle
        return (v <= 0.5) & (0.866 * u - 0.5 * v <= 0.5) & (-0.866 * u - 0.5 * v <= 0.5)
    if cat == 3:                                                        # five-pointed star
        return r2 <= (0.7 + 0.3 * torch.cos(5 * torch.atan2(v, u))) ** 2
    if cat == 4:                                                        # ring with a hole
        return (r2 <= 1) & (r2 >= 0.3)
    return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))  # cross

def _path(rng, k, T, size, pos, r, ang, wide_share=WIDE_SHARE):
    """A moving object's path over T frames: (x, y) (T, 2), scale (T,), angle (T,), alive (T,).
    The steady drift turns back every DRIFT_TURN frames, so that a long video keeps its objects
    near the frame (they still swing out and back) instead of drifting away for good."""
    t = np.arange(T)
    wide = rng.random() < wide_share  # a wide swing: leaves and comes back
    amp = rng.uniform(*((0.5, 0.7) if wide else (0.02, 0.15)), 2) * size
    w = rng.uniform(0.15, 0.45)
    ph = rng.uniform(0, 2 * math.pi, 2)
    drift = rng.normal(0, 0.01, 2) * size
    travel = np.abs((t + DRIFT_TURN) % (2 * DRIFT_TURN) - DRIFT_TURN)  # t, then back and forth
    xy = pos + drift * travel[:, None] + amp * (np.sin(w * t[:, None] + ph) - np.sin(ph))  # (T, 2)
    freq = rng.uniform(0.1, 0.3)
    phase = rng.uniform(0, 2 * math.pi)
    scale = r * (1 + 0.25 * np.sin(freq * t + phase))                                   # (T,)
    angle = ang + rng.uniform(-0.12, 0.12) * t                                         # (T,)
    alive = np.ones(T, bool)
    if k > 0 and T > 2 and rng.random() < 0.3:
        alive = t >= rng.integers(1, T // 2 + 1)               # appears mid-video
    return xy, scale, angle, alive

def _sample_objects(rng, n, T, size, moving, wide_share=WIDE_SHARE):
    """Per object: category, colour, texture and its path over T frames (x, y, scale, angle,
    visible)."""
    # well-separated hues
    hues = (rng.random() + np.arange(n) / n + rng.uniform(-0.04, 0.04, n)) % 1
    objs = []
    for k in range(n):
        cat = int(rng.integers(6))
        colour = _hsv(hues[k], rng.uniform(0.75, 1), rng.uniform(0.8, 1))
        # freq, dir, amp
        stripe = (rng.uniform(1.5, 4), rng.uniform(0, math.pi), rng.uniform(0.06, 0.15))
        pos = rng.uniform(0.15, 0.85, 2) * size
        r = rng.uniform(0.07, 0.16) * size
        ang = rng.uniform(0, 2 * math.pi)
        if moving:
            xy, scale, angle, alive = _path(rng, k, T, size, pos, r, ang, wide_share)
        else:
            xy = np.tile(pos, (T, 1))
            scale = np.full(T, r)
            angle = np.full(T, ang)
            alive = np.ones(T, bool)
        objs.append(dict(cat=cat, colour=colour, stripe=stripe, xy=xy, scale=scale, angle=angle,
                         alive=alive))
    return objs

def _background(rng, T, size, moving):
    """A muted textured background (T, 3, size, size): smooth blotches + fine grain, panning if
    moving."""
    pad = size // 8 if moving else 0
    S = size + 2 * pad
    base = _hsv(rng.random(), rng.uniform(0, 0.25), rng.uniform(0.3, 0.6))
    base = torch.tensor(base, dtype=torch.float32)                                            # (3,)
    low = torch.from_numpy(rng.normal(0, 1, (1, 4, 6, 6))).float()
    low = F.interpolate(low, size=(S, S), mode="bilinear", align_corners=False)[0]  # (4, S, S)
    fine = torch.from_numpy(rng.normal(0, 0.03, (1, 1, S // 2, S // 2))).float()
    fine = F.interpolate(fine, size=(S, S), mode="nearest")[0]  # (1, S, S)
    bg = base[:, None, None] + 0.08 * low[:1] + 0.03 * low[1:] + fine  # (3, S, S)
    if not moving:
        return bg[None].expand(T, 3, S, S)  # (T, 3, S, S)
    t = np.arange(T)
    offsets = []
    for _ in range(2):                                                   # x, then y
        swing = 0.9 * pad * np.sin(rng.uniform(0.05, 0.2) * t + rng.uniform(0, 6.3))
        offsets.append(pad + np.round(swing).astype(int))               # (T,)
    ox, oy = offsets
    # (T, 3, size, size)
    return torch.stack([bg[:, y:y + size, x:x + size] for x, y in zip(ox, oy)])

def _render(objs, bg):
    """Paint objects back to front. -> frames (T, 3, S, S) in [0, 1], idmap (T, S, S) long (0 =
    background)."""
    T, _, S, _ = bg.shape
    c = torch.arange(S, dtype=torch.float32) + 0.5
    ys = c[:, None]                                                     # (S, 1)
    xs = c[None, :]                                                     # (1, S)
    img = bg.clone()
    idmap = torch.zeros(T, S, S, dtype=torch.long)
    for k, o in enumerate(objs):
        p = torch.from_numpy(o["xy"]).float()                           # (T, 2)
        cs = torch.from_numpy(np.cos(o["angle"])).float()[:, None, None]   # (T, 1, 1)
        sn = torch.from_numpy(np.sin(o["angle"])).float()[:, None, None]   # (T, 1, 1)
        sc = torch.from_numpy(o["scale"]).float()[:, None, None]           # (T, 1, 1)
        dx = xs - p[:, :1, None]                                        # (T, 1, S)
        dy = ys - p[:, 1:, None]                                        # (T, S, 1)
        u = (cs * dx + sn * dy) / sc  # (T, S, S) object coordinates
        v = (cs * dy - sn * dx) / sc                                    # (T, S, S)
        inside = _shape(o["cat"], u, v) & torch.from_numpy(o["alive"])[:, None, None]  # (T, S, S)
        f, a, amp = o["stripe"]
        # stripes ride along
        tex = 1 + amp * torch.sin(math.pi * f * (u * math.cos(a) + v * math.sin(a)))
        # (T, 3, S, S)
        col = torch.tensor(o["colour"], dtype=torch.float32)[None, :, None, None] * tex[:, None]
        img = torch.where(inside[:, None], col, img)
        idmap[inside] = k + 1
    return img.clamp(0, 1), idmap

def _views(frames, masks, z, rot, flip, tx, ty, hw):
    """Frame t of frames (T, 3, H, W) and masks (N, T, H, W) seen through one affine view: zoom z[t]
    (< 1 shows a black border), rotation rot[t] (radians), flip[t] (-1 mirrors), shift (tx[t],
    ty[t]) in half-frames -> (T, 3, h, w), bool (N, T, h, w) for hw = (h, w). One grid per view
    samples frame and masks, so masks stay on their pixels."""
    T = len(z)
    c = np.cos(rot) / z
    s = np.sin(rot) / z
    # (T, 2, 3)
    theta = np.stack([np.stack([c * flip, -s, tx], -1), np.stack([s * flip, c, ty], -1)], 1)
    theta = torch.tensor(theta, dtype=torch.float32)
    grid = F.affine_grid(theta, [T, 3, hw[0], hw[1]], align_corners=False)           # (T, h, w, 2)
    out = F.grid_sample(frames, grid, mode="bilinear", align_corners=False)    # (T, 3, h, w)
    mask_views = masks.float().transpose(0, 1)  # (T, N, H, W)
    m = F.grid_sample(mask_views, grid, mode="nearest", align_corners=False)  # (T, N, h, w)
    return out.clamp(0, 1), m.transpose(0, 1) > 0.5                     # (T, 3, h, w), (N, T, h, w)

def pseudo_video(image, masks, T, hw, rng):
    """Stage 1 (VITA-style): T random zoom / crop / flip / rotation views of image (3, H, W) and
    masks (N, H, W) at hw = (h, w) -> (T, 3, h, w), (N, T, h, w)."""
    z = rng.uniform(0.8, 1.5, T)  # zoom (< 1 shows a black border)
    rot = np.deg2rad(rng.uniform(-12, 12, T))
    flip = np.where(rng.random(T) < 0.5, -1.0, 1.0)
    # crop offset, stays in the image
    tx, ty = rng.uniform(-1, 1, (2, T)) * np.maximum(1 - 1 / z, 0)
    frames = image[None].expand(T, -1, -1, -1)                                    # (T, 3, H, W)
    return _views(frames, masks[:, None].expand(-1, T, -1, -1), z, rot, flip, tx, ty, hw)

def clip_views(frames, masks, rng):
    """Stages 2/3 on real video: a (T, 3, h, w) clip and its masks (N, T, h, w) seen by a camera
    that moves from one random view at frame 0 to another at frame T-1 (zoom, rotation and shift
    interpolated), mirrored or not as a whole, and played backwards half the time. A few real
    videos then give many different clips (measured in README "Real video")."""
    T = len(frames)
    w = np.linspace(0, 1, T)                                                      # (T,)
    z = np.interp(w, [0, 1], rng.uniform(0.9, 1.4, 2))  # zoom at the two ends
    rot = np.deg2rad(np.interp(w, [0, 1], rng.uniform(-8, 8, 2)))
    flip = np.where(rng.random() < 0.5, -1.0, 1.0) * np.ones(T)  # the whole clip or none of it
    room = np.maximum(1 - 1 / z, 0)                                               # (T,)
    tx = np.interp(w, [0, 1], rng.uniform(-1, 1, 2)) * room
    ty = np.interp(w, [0, 1], rng.uniform(-1, 1, 2)) * room
    if rng.random() < 0.5:
        frames = frames.flip(0)
        masks = masks.flip(1)
    return _views(frames, masks, z, rot, flip, tx, ty, frames.shape[-2:])

def synthetic_clip(key, stage=2, T=16, size=128, name="synthetic"):
    """One synthetic clip, a pure function of `key` (a tuple of ints). stage 1: pseudo-video of a
    still scene; stages 2/3: a moving video. Objects never visible (or < 8 pixels in the still) are
    dropped."""
    rng = np.random.default_rng(list(key))
    n = int(rng.integers(1, 6))
    still = stage == 1
    T_scene = 1 if still else T
    wide_share = STAGE3_WIDE_SHARE if stage == 3 else WIDE_SHARE
    objs = _sample_objects(rng, n, T_scene, size, not still, wide_share)
    frames, idmap = _render(objs, _background(rng, T_scene, size, moving=not still))
    ids = torch.arange(1, n + 1)
    masks = idmap[None] == ids[:, None, None, None]                     # (n, T', S, S)
    if still:
        big = masks[:, 0].flatten(1).sum(1) >= 8                        # (n,)
        masks = masks[:, 0] & big[:, None, None]                        # (n, S, S)
        frames, masks = pseudo_video(frames[0], masks, T, (size, size), rng)
    keep = masks.flatten(1).any(1)
    labels = torch.tensor([o["cat"] for o in objs], dtype=torch.long)
    return Clip(frames.contiguous(), masks[keep].contiguous(), labels[keep], ids[keep].tolist(),
                "synthetic", name)

# ------------------------------------------------------------------------ real datasets from disk
# A video on disk: name, dataset, frames (image paths in order), load(t, h, w) -> {object id: bool
# (h, w) mask} of frame t (h, w = the frame's size), labels {object id: category index in [0, K)},
# missing = -1.
_Video = namedtuple("_Video", "name dataset frames load labels")

def _load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: annotation JSON not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None

def _png_ann(pngs, t, h, w, known=None, meta=None):
    """Ids of mask PNG `pngs[t]` (255 = void -> background; a binary mask is object 1, see
    read_palette_png). No PNG -> no annotation ({})."""
    p = pngs[t]
    if not p.is_file():
        return {}
    ids = read_palette_png(p)
    if ids.shape != (h, w):
        raise ValueError(f"{p}: mask is {ids.shape[1]}x{ids.shape[0]} (w x h) but its frame is "
                         f"{w}x{h}; a mask must have its frame's size")
    ids = np.where(ids == 255, 0, ids)
    ks = [int(k) for k in np.unique(ids) if k]
    if known is not None:
        for k in ks:
            if k not in known:
                raise ValueError(f"{p}: object id {k} in frame {t} is not listed in {meta} for "
                                 f"this video (objects: {sorted(known)}); add it to meta.json or "
                                 f"fix the mask")
    return {k: ids == k for k in ks}

def _png_layout(root, dataset, train):
    """-> (root, meta.json path, its "videos") of a DAVIS / MOSE (no meta) or YouTube-VOS folder."""
    if dataset != "ytvos":
        return root, None, None
    sub = root / ("train" if train else "valid")
    if sub.is_dir():
        root = sub
    meta_p = root / "meta.json"
    return root, meta_p, _load_json(meta_p).get("videos", {})

def _png_video_names(root, jroot, meta, train):
    """YouTube-VOS: meta.json's videos; DAVIS / MOSE: ImageSets/2017/<split>.txt, else all
    folders."""
    if meta is not None:
        return sorted(meta)
    split = root / "ImageSets" / "2017" / ("train.txt" if train else "val.txt")
    if split.is_file():
        return split.read_text().split()
    return sorted(p.name for p in jroot.iterdir() if p.is_dir())

def _check_png_masks(name, frames, pngs, listed, train, meta_p):
    """The masks a split must have: DAVIS/MOSE every frame's (eval: the first), YouTube-VOS train:
    the frames meta.json lists."""
    for f, p in zip(frames, pngs):
        if listed is not None:
            need = f.stem in listed and train
        else:
            need = train or p == pngs[0]
        if need and not p.is_file():
            which = f"this frame (listed in {meta_p})" if listed is not None else "every frame"
            raise FileNotFoundError(f"{name}: frame {f.name} has no mask {p}; expected a palette "
                                    f"PNG for {which}")

def _png_videos(root, dataset, train):
    """DAVIS 2017 / MOSE: JPEGImages[/480p]/<seq>/*.jpg, Annotations[/480p]/<seq>/*.png,
    ImageSets/2017/*.txt. YouTube-VOS: [train|valid/]{JPEGImages,Annotations}/<vid>/, meta.json;
    validation is sparse: a PNG holds the objects that first appear there, 0 = unknown (absent
    here)."""
    root, meta_p, meta = _png_layout(root, dataset, train)
    # DAVIS keeps a resolution level
    res = "480p" if (root / "JPEGImages" / "480p").is_dir() else ""
    jroot = root / "JPEGImages" / res
    aroot = root / "Annotations" / res
    if not jroot.is_dir():
        raise FileNotFoundError(f"{jroot}: not found; expected the {dataset} layout "
                                f"JPEGImages[/480p]/<video>/*.jpg")
    if not aroot.is_dir():
        raise FileNotFoundError(f"{aroot}: not found; expected the {dataset} layout "
                                f"Annotations[/480p]/<video>/*.png beside {jroot}")
    videos = []
    for name in _png_video_names(root, jroot, meta, train):
        frames = sorted((jroot / name).glob("*.jpg"), key=natural_key)
        if not frames:
            raise FileNotFoundError(f"{jroot / name}: no .jpg frames for video {name!r}")
        pngs = [aroot / name / (f.stem + ".png") for f in frames]
        known = None
        listed = None
        if meta is not None:
            objs = meta[name].get("objects", {})
            known = {int(k) for k in objs}
            listed = {fr for o in objs.values() for fr in o.get("frames", [])}
        _check_png_masks(name, frames, pngs, listed, train, meta_p)
        load = functools.partial(_png_ann, pngs, known=known, meta=meta_p)   # load(t, h, w)
        videos.append(_Video(name, dataset, frames, load, {}))
    return videos

def _check_polygons(polygons):
    """Polygons of which none has 3 points are an error (one bad among good ones: a warning)."""
    sizes = [np.asarray(poly, dtype=np.float64).size for poly in polygons]
    good = [n for n in sizes if n >= 6 and n % 2 == 0]
    if sizes and not good:
        raise ValueError(f"no polygon has >= 3 (x, y) pairs (numbers per polygon: {sizes}); fix "
                         f"or drop this annotation")

def _seg_mask(seg, h, w, where):
    """A COCO / YouTube-VIS segmentation (polygons, uncompressed or compressed RLE) -> bool
    (h, w)."""
    try:
        if isinstance(seg, list):
            _check_polygons(seg)
            return polygons_to_mask(seg, h, w, where=f"{where}: polygon") > 0
        if isinstance(seg, dict) and "counts" in seg:
            if [int(v) for v in seg.get("size", (h, w))] != [h, w]:
                raise ValueError(f"RLE size {seg['size']} differs from the image size [{h}, {w}]")
            return rle_decode(seg) > 0
        raise ValueError(f"unsupported segmentation {type(seg).__name__}; expected polygons or an "
                         f"RLE dict")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None

_JSON_KEYS = {"coco": {"images": "id file_name height width",
                       "annotations": "id image_id category_id segmentation"},
              "video": {"videos": "id file_names height width",
                        "annotations": "id video_id category_id segmentations"},
              "both": {"categories": "id"}}

def _check_json_keys(d, path, coco):
    """Every entry of the JSON's lists is a dict with the keys the reader uses."""
    need = {**_JSON_KEYS["coco" if coco else "video"], **_JSON_KEYS["both"]}
    for part, keys in need.items():
        for i, x in enumerate(d.get(part, [])):
            miss = [k for k in keys.split() if not isinstance(x, dict) or k not in x]
            if miss:
                raise ValueError(f"{path}: {part}[{i}] has no {miss}; each entry of {part!r} needs "
                                 f"{keys.split()}")

def _json_ann(path, v, anns, coco, t, h, w):
    """{annotation id: bool (h, w) mask} of frame t of video (or image) v, absent objects left
    out."""
    kind = "image" if coco else "video"
    where = f"{path}: {kind} {v['id']} frame {t} ({v['file_names'][t]})"
    if (v["height"], v["width"]) != (h, w):
        raise ValueError(f"{where}: the JSON says {v['width']}x{v['height']} (w x h), the image is "
                         f"{w}x{h}")
    out = {}
    for a in anns:
        seg = a["segmentations"][t]
        if seg is None:
            continue
        mask = _seg_mask(seg, h, w, f"{where} annotation {a['id']}")
        if mask.any():
            out[a["id"]] = mask
    return out

def _json_videos(path, imgdir, dataset):
    """YouTube-VIS 2019/2021, OVIS (per-frame segmentations, null = absent), COCO (an image = a
    one-frame video, made a pseudo-video by _read_clip). Crowd annotations are dropped."""
    d = _load_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object with 'videos' (or 'images'), "
                         f"'annotations' and 'categories', got a {type(d).__name__}")
    coco = dataset == "coco"
    _check_json_keys(d, path, coco)
    # id -> [0, K)
    cats = {c: i for i, c in enumerate(sorted(c["id"] for c in d.get("categories", [])))}
    if coco:   # the same shape as YouTube-VIS: images -> videos of one frame
        d["videos"] = [dict(im, file_names=[im["file_name"]]) for im in d.get("images", [])]
        d["annotations"] = [dict(a, video_id=a["image_id"], segmentations=[a["segmentation"]])
                            for a in d.get("annotations", [])]
    by_video = {}
    for a in d.get("annotations", []):
        if a.get("category_id") not in cats:
            raise ValueError(f"{path}: annotation {a.get('id')} has category "
                             f"{a.get('category_id')}, which is not in 'categories' "
                             f"({sorted(cats)})")
        if not a.get("iscrowd", 0):
            by_video.setdefault(a["video_id"], []).append(a)
    videos = []
    for v in d.get("videos", []):
        anns = by_video.get(v["id"], [])
        L = len(v["file_names"])
        for a in anns:
            if not isinstance(a["segmentations"], list):
                raise ValueError(f"{path}: annotation {a['id']} of video {v['id']} has "
                                 f"'segmentations': {json.dumps(a['segmentations'])}; expected a "
                                 f"list with one segmentation (or null) per frame")
            if len(a["segmentations"]) != L:
                raise ValueError(f"{path}: annotation {a['id']} of video {v['id']} has "
                                 f"{len(a['segmentations'])} segmentations but the video has {L} "
                                 f"frames; expected one (or null) per frame")
        if coco and not anns:
            continue
        load = functools.partial(_json_ann, path, v, anns, coco)       # load(t, h, w)
        name = Path(v["file_name"]).stem if coco else str(v["id"])
        labels = {a["id"]: cats[a["category_id"]] for a in anns}
        videos.append(_Video(name, dataset, [imgdir / f for f in v["file_names"]], load, labels))
    return videos

def _open(spec, train):
    kind, _, rest = spec.partition(":")
    if kind in ("davis", "mose", "ytvos"):
        if not rest or not Path(rest).is_dir():
            raise FileNotFoundError(f"spec {spec!r}: {kind}:DIR needs an existing dataset folder")
        return _png_videos(Path(rest), kind, train)
    if kind in ("coco", "ytvis19", "ytvis21", "ovis"):
        js, _, img = rest.partition(":")
        if not js or not img:
            raise ValueError(f"spec {spec!r}: expected {kind}:JSON:IMGDIR (annotation file, image "
                             f"folder)")
        return _json_videos(Path(js), Path(img), kind)
    raise ValueError(f"unknown dataset spec {spec!r}; expected synthetic, davis|mose|ytvos:DIR or "
                     f"coco|ytvis19|ytvis21|ovis:JSON:IMGDIR")

def frame_size(h, w, size):
    """The model's input size (h', w') of an (h, w) frame, aspect ratio kept as the paper does: the
    short side = size, the long side scaled alike and rounded to a multiple of 8 (480x854 at 128 ->
    128x224). A square frame -> (size, size), so synthetic frames are read as before."""
    if h == w:
        return size, size
    long_side = max(8, round(max(h, w) * size / min(h, w) / 8) * 8)
    return (size, long_side) if h < w else (long_side, size)

# Decoded frames at their training size, so a real frame is decoded once per run: key (dataset,
# video, frame path, its mtime and size in bytes, size) -> (the frame's own (h, w), uint8
# (h', w', 3) frame, {id: bool (h', w') mask}). Bounded: once CACHE_FRAMES frames are in, the rest
# are decoded each time (2048 frames at 128x224 with one object: about 235 MB).
CACHE_FRAMES = 2048
_CACHE = {}

def _resize_frame(img, hw):
    """uint8 (h, w, 3) -> uint8 (h', w', 3), bilinear with antialiasing."""
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255              # (1, 3, h, w)
    x = F.interpolate(x, size=hw, mode="bilinear", antialias=True).clamp(0, 1)  # (1, 3, h', w')
    return (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()       # (h', w', 3)

def _resize_masks(ann, hw):
    """{id: bool (h, w)} -> {id: bool (h', w')}, nearest-exact (each pixel: one source pixel)."""
    out = {}
    for k, m in ann.items():
        x = torch.from_numpy(m)[None, None].float()                              # (1, 1, h, w)
        out[k] = (F.interpolate(x, size=hw, mode="nearest-exact")[0, 0] > 0.5).numpy()  # (h', w')
    return out

def _decoded(video, t, size):
    """Frame t of video at frame_size: ((h, w) on disk, uint8 (h', w', 3), {id: bool (h', w')})."""
    path = video.frames[t]
    stat = path.stat() if path.is_file() else None
    key = (video.dataset, video.name, str(path), stat and stat.st_mtime_ns, stat and stat.st_size,
           size)
    if key in _CACHE:
        return _CACHE[key]
    img = _read_image(path)
    ann = video.load(t, img.shape[0], img.shape[1])
    hw = frame_size(img.shape[0], img.shape[1], size)
    entry = (img.shape[:2], _resize_frame(img, hw), _resize_masks(ann, hw))
    if len(_CACHE) < CACHE_FRAMES:
        _CACHE[key] = entry
    return entry

def _read_frames(video, ts, size):
    """Frames ts of video at frame_size(h, w, size), uint8 (h', w', 3), and their annotations {id:
    bool (h', w')}. All frames of a video must have one size."""
    imgs = []
    anns = []
    first = None
    for t in ts:
        hw, img, ann = _decoded(video, t, size)
        if first is not None and hw != first:
            raise ValueError(f"{video.frames[t]}: frame is {hw} (h, w), frame 0 is {first}")
        first = hw
        imgs.append(img)
        anns.append(ann)
    return imgs, anns

def _crop_offset(masks, length, size, rng):
    """Where a size-long crop of a `length`-long axis starts: around a random foreground position
    of the first frame (masks (N, T', length) projected on the axis), or anywhere without one."""
    fg = masks[:, 0].any(0).nonzero()[:, 0] if len(masks) else torch.zeros(0, dtype=torch.long)
    if len(fg) == 0:
        return int(rng.integers(0, length - size + 1))
    center = int(fg[int(rng.integers(len(fg)))])
    return min(max(center - size // 2, 0), length - size)

def _crop(frames, masks, h, w, rng):
    """The (h, w) window of a clip's frames (T', 3, H, W) and masks (N, T', H, W), around a random
    first-frame object along each axis that is longer than the window."""
    H, W = frames.shape[-2:]
    y0 = _crop_offset(masks.any(3), H, h, rng)                                   # masks (N, T', H)
    x0 = _crop_offset(masks.any(2), W, w, rng)                                   # masks (N, T', W)
    return frames[..., y0:y0 + h, x0:x0 + w], masks[..., y0:y0 + h, x0:x0 + w]

def _visible(frames, masks, labels, ids, dataset, name):
    """A Clip of the objects that show in at least one of its frames."""
    keep = masks.flatten(1).any(1)                                                 # (N,)
    kept_ids = [k for k, m in zip(ids, keep) if m]
    return Clip(frames.contiguous(), masks[keep].contiguous(), labels[keep], kept_ids, dataset,
                name)

def fit_batch(clips, rng):
    """Training: one frame size per batch. Clips of one size (DAVIS's frames are all 128 x 224 at
    size 128) are left whole, so training sees the frames as inference does; clips of different
    sizes (aspect ratios) are cropped to the batch's smallest height and width, each around a
    random first-frame object."""
    h = min(c.frames.shape[-2] for c in clips)
    w = min(c.frames.shape[-1] for c in clips)
    if all(c.frames.shape[-2:] == (h, w) for c in clips):
        return clips
    fitted = []
    for c in clips:
        frames, masks = _crop(c.frames, c.masks, h, w, rng)          # (T', 3, h, w), (N, T', h, w)
        fitted.append(_visible(frames, masks, c.labels, c.ids, c.dataset, c.name))
    return fitted

def _read_clip(video, ts, size, T=None, rng=None):
    """Frames `ts` of `video` as a Clip at frame_size (short side `size`, aspect kept); with rng, T
    and one frame: a T-frame pseudo-video of it (stage 1, stills)."""
    imgs, anns = _read_frames(video, ts, size)
    ids = sorted(set().union(*anns))
    frames = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255    # (T', 3, h, w)
    none = np.zeros(imgs[0].shape[:2], bool)
    masks = np.array([[a.get(k, none) for a in anns] for k in ids], bool)          # (N, T', h, w)
    masks = torch.from_numpy(masks).reshape(len(ids), len(ts), *none.shape)       # (N, T', h, w)
    if rng is not None and T is not None and len(ts) == 1:
        # (T, 3, h, w), (N, T, h, w)
        frames, masks = pseudo_video(frames[0], masks[:, 0], T, none.shape, rng)
    labels = torch.tensor([video.labels.get(k, -1) for k in ids], dtype=torch.long)
    return _visible(frames, masks, labels, ids, video.dataset, video.name)

def _sample_clip(video, T, size, rng, stage, max_stride=3):
    """T frames in order with a random stride in [1, max_stride], seen by clip_views
    (AUGMENT_CLIPS); stage 1 or a still: one frame, T views."""
    L = len(video.frames)
    if stage == 1 or L == 1:
        return _read_clip(video, [int(rng.integers(L))], size, T, rng)
    if L < T:
        # short video: repeat frames in order
        ts = np.linspace(0, L - 1, T).round().astype(int).tolist()
    else:
        longest = min(max_stride, (L - 1) // max(T - 1, 1))
        stride = int(rng.integers(1, max(1, longest) + 1))
        start = int(rng.integers(0, L - (T - 1) * stride))
        ts = list(range(start, start + (T - 1) * stride + 1, stride))
    clip = _read_clip(video, ts, size)
    if not AUGMENT_CLIPS:
        return clip
    frames, masks = clip_views(clip.frames, clip.masks, rng)    # (T, 3, h, w), (N, T, h, w)
    return _visible(frames, masks, clip.labels, clip.ids, clip.dataset, clip.name)

# ----------------------------------------------------------------------------- the two entry points
def train_stream(spec="synthetic", stage=1, T=3, size=128, seed=0, rank=0, world=1):
    """Endless Iterator[Clip]. stage 1: pseudo-videos from stills; stages 2/3: video clips.
    Rank r of `world` sees a disjoint shard (synthetic: clip numbers r, r + world, ...; real: videos
    r::world)."""
    if spec == "synthetic":
        for i in itertools.count():
            j = i * world + rank
            name = f"synthetic-train-s{seed}-{stage}-{j:07d}"
            yield synthetic_clip((_TRAIN, seed, stage, j), stage, T, size, name)
    videos = _open(spec, train=True)[rank::world]
    if not videos:
        raise ValueError(f"{spec}: no annotated videos for rank {rank} of {world}; check the path "
                         f"and split")
    rng = np.random.default_rng([_TRAIN, seed, rank])
    misses = 0
    while misses < 100:
        clip = _sample_clip(videos[int(rng.integers(len(videos)))], T, size, rng, stage)
        if clip.masks.shape[0] == 0:
            misses += 1
            continue
        misses = 0
        yield clip
    raise ValueError(f"{spec}: 100 clips in a row without any object; are the masks empty?")

def batches(spec="synthetic", batch_size=4, mix=0.5, stage=1, T=3, size=128, seed=0, rank=0,
            world=1):
    """Endless Iterator[list of batch_size Clips], one dataset per batch. spec: one dataset spec,
    or two joined by a comma ("synthetic,davis:DIR"): a batch is the second's with probability
    `mix` (a generator seeded by `seed`: a run restarted from a step's seed draws the same)."""
    specs = spec.split(",")
    if len(specs) > 2:
        raise ValueError(f"--data {spec}: at most two dataset specs joined by a comma, e.g. "
                         f"synthetic,davis:DIR (with --mix, the second's share of batches)")
    streams = [train_stream(sp, stage, T, size, seed, rank, world) for sp in specs]
    crops = np.random.default_rng([_CROP, seed, rank])
    if len(streams) == 1:
        while True:
            yield fit_batch([next(streams[0]) for _ in range(batch_size)], crops)
    coin = np.random.default_rng([_MIX, seed])
    while True:
        second = bool(coin.random() < mix)
        yield fit_batch([next(streams[int(second)]) for _ in range(batch_size)], crops)

def heldout(spec="synthetic", n=8, T=16, size=128):
    """The fixed evaluation set: n clips of T frames (T=None: whole videos). Synthetic: moving
    videos whose seeds start with a word training never uses; real data: the validation split's
    first n videos from frame 0."""
    if spec == "synthetic":
        names = [f"synthetic-val-{i:03d}" for i in range(n)]
        return [synthetic_clip((_HELDOUT, i), 2, T or 16, size, names[i]) for i in range(n)]
    clips = []
    for i, v in enumerate(_open(spec, train=False)[:n]):
        L = len(v.frames)
        ts = list(range(min(T or L, L)))
        rng = np.random.default_rng([_HELDOUT, i]) if L == 1 else None     # a still: fixed views
        clips.append(_read_clip(v, ts, size, T or 1, rng))
    return clips

# ------------------------------------------------------------------------ writing the synthetic set
def _write_frames(fmt, root, imgdir, c, names, size):
    """A clip's frames as JPEGs and (DAVIS) its masks as palette PNGs."""
    T = len(names)
    ids = np.zeros((T, size, size), np.uint8)                                           # (T, H, W)
    for i, k in enumerate(c.ids):
        ids[c.masks[i].numpy()] = k
    for t, f in enumerate(names):
        (imgdir / f).parent.mkdir(parents=True, exist_ok=True)
        rgb = (c.frames[t].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)     # (H, W, 3)
        Image.fromarray(rgb).save(imgdir / f, quality=95)
        if fmt == "davis":
            write_palette_png(root / "Annotations/480p" / c.name / f"{t:05d}.png", ids[t])

def _json_annotation(fmt, ann_id, video_id, c, i):
    """Instance i of clip c as a COCO (first frame) or YouTube-VIS annotation, compressed RLEs."""
    seg = []
    area = []
    box = []
    for x in c.masks[i].numpy():  # (H, W) a frame
        seg.append(rle_encode(x) if x.any() else None)
        area.append(int(x.sum()) if x.any() else None)
        box.append(mask_to_bbox(x) if x.any() else None)
    a = {"id": ann_id, "category_id": int(c.labels[i]) + 1, "iscrowd": 0}
    if fmt == "coco":
        return dict(a, image_id=video_id, segmentation=seg[0], area=area[0], bbox=box[0])
    return dict(a, video_id=video_id, segmentations=seg, areas=area, bboxes=box)

def write_synthetic(fmt, root, num_videos=8, T=16, size=128, split="val", seed=0):
    """Write synthetic clips as DAVIS ("davis"), YouTube-VIS ("ytvis") or COCO ("coco") files under
    root."""
    root = Path(root)
    if fmt == "coco":
        T = 1
    if split == "val":
        clips = heldout("synthetic", num_videos, T, size)
    else:
        clips = list(itertools.islice(train_stream("synthetic", 2, T, size, seed), num_videos))
    imgdir = root / {"coco": "images", "davis": "JPEGImages/480p", "ytvis": "JPEGImages"}[fmt]
    videos = []
    anns = []
    for v, c in enumerate(clips, 1):
        if fmt == "coco":
            names = [f"{c.name}.jpg"]
            more = {"file_name": names[0]}
        else:
            names = [f"{c.name}/{t:05d}.jpg" for t in range(T)]
            more = {"length": T, "file_names": names}
        _write_frames(fmt, root, imgdir, c, names, size)
        videos.append({"id": v, "width": size, "height": size, **more})
        for i in range(len(c.ids)):
            anns.append(_json_annotation(fmt, len(anns) + 1, v, c, i))
    if fmt == "davis":
        (root / "ImageSets/2017").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets/2017" / f"{split}.txt").write_text("".join(c.name + "\n" for c in clips))
    else:
        cats = [{"id": k + 1, "name": n} for k, n in enumerate(SYNTHETIC_CATEGORIES)]
        listing = "images" if fmt == "coco" else "videos"
        content = {listing: videos, "annotations": anns, "categories": cats}
        (root / "instances.json").write_text(json.dumps(content))
    return clips

def _cli():
    ap = argparse.ArgumentParser(description="Write the synthetic AUSM data in a real benchmark "
                                 "format. Read it back as davis:DIR, "
                                 "ytvis19:DIR/instances.json:DIR/JPEGImages or "
                                 "coco:DIR/instances.json:DIR/images")
    ap.add_argument("--write", required=True, metavar="FORMAT:DIR",
                    help="davis:DIR (JPEGs, palette PNGs, ImageSets), ytvis:DIR or coco:DIR "
                    "(JPEGs, instances.json with compressed RLE; coco: single images)")
    ap.add_argument("--num-videos", type=int, default=8,
                    help="how many videos (coco: images) to write")
    ap.add_argument("--frames", type=int, default=16,
                    help="frames per video (coco writes single images)")
    ap.add_argument("--size", type=int, default=128, help="square frame side in pixels")
    ap.add_argument("--split", choices=["val", "train"], default="val",
                    help="val: the fixed held-out set (= heldout()); train: clips of the training "
                    "stream")
    ap.add_argument("--seed", type=int, default=0, help="training-stream seed (with --split train)")
    args = ap.parse_args()
    fmt, _, out = args.write.partition(":")
    if fmt not in ("davis", "ytvis", "coco") or not out:
        ap.error(f"--write {args.write!r}: expected davis:DIR, ytvis:DIR or coco:DIR")
    clips = write_synthetic(fmt, out, args.num_videos, args.frames, args.size, args.split,
                            args.seed)
    what = "images" if fmt == "coco" else "videos"
    print(f"wrote {len(clips)} {fmt} {what} to {out}")

if __name__ == "__main__":
    _cli()
