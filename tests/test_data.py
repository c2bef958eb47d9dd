"""Tests for data.py: the RLE codec against pycocotools' golden outputs, brute-force run-length oracles,
every reader on a tiny fixture written here, the synthetic generator's determinism and alignment, the
held-out / training split, and each bad-input error."""
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "rle_golden.json"


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.is_file():
        pytest.fail(f"golden file {GOLDEN} is missing; it lives in ../shared/golden/ beside the repository")
    return json.loads(GOLDEN.read_text())


def _rows(rows):
    return np.array([[c == "1" for c in r] for r in rows], dtype=np.uint8)


def _case_mask(c):
    if "mask_rows" in c:
        return _rows(c["mask_rows"])
    m = np.zeros((c["h"], c["w"]), np.uint8)
    for r in c["mask_rects_y0y1x0x1"]:
        if r[0] == "minus":
            m[r[1]:r[2], r[3]:r[4]] = 0
        else:
            m[r[0]:r[1], r[2]:r[3]] = 1
    return m


def _brute_counts(mask):
    """Oracle: column-major runs, walked pixel by pixel, starting with a run of zeros."""
    counts, cur, run = [], 0, 0
    for v in np.asarray(mask).T.ravel():
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    return counts + [run]


# ----------------------------------------------------------------------------- RLE golden cases
def test_golden_encode_cases(golden):
    for c in golden["encode_cases"]:
        m = _case_mask(c)
        rle = data.rle_encode(m)
        assert rle == {"size": [c["h"], c["w"]], "counts": c["rle_string"]}, c["name"]
        assert data.rle_counts(rle) == c["counts"], c["name"]
        assert data.rle_area(rle) == c["area"], c["name"]
        assert data.mask_to_bbox(m) == c["bbox_xywh"], c["name"]
        for counts in (c["rle_string"], c["rle_string"].encode("ascii"), c["counts"]):
            np.testing.assert_array_equal(data.rle_decode({"size": [c["h"], c["w"]], "counts": counts}), m)


def test_golden_polygons_and_boxes(golden):
    for c in golden["polygon_cases"]:
        h, w = c["h"], c["w"]
        for poly, s in zip(c["polygons"], c["per_polygon_rle_strings"]):
            assert data.rle_encode(data.polygons_to_mask([poly], h, w))["counts"] == s, c["name"]
        m = data.polygons_to_mask(c["polygons"], h, w)
        rle = data.rle_encode(m)
        assert rle["counts"] == c["merged_rle_string"], c["name"]
        assert data.rle_counts(rle) == c["merged_counts"], c["name"]
        assert data.rle_area(rle) == c["area"] and data.mask_to_bbox(m) == c["bbox_xywh"], c["name"]
        if "mask_rows" in c:
            np.testing.assert_array_equal(m, _rows(c["mask_rows"]))
    for c in golden["box_cases"]:
        x, y, bw, bh = c["bbox_xywh_in"]                                   # pycocotools: a box is a 4-point polygon
        m = data.polygons_to_mask([[x, y, x, y + bh, x + bw, y + bh, x + bw, y]], c["h"], c["w"])
        assert data.rle_encode(m)["counts"] == c["rle_string"], c["name"]
        np.testing.assert_array_equal(m, _rows(c["mask_rows"]))


def test_golden_uncompressed_and_merge_iou(golden):
    for c in golden["uncompressed_cases"]:
        m = data.rle_decode({"size": [c["h"], c["w"]], "counts": c["counts"]})
        assert data.rle_encode(m)["counts"] == c["rle_string"] and int(m.sum()) == c["area"]
        assert data.rle_area({"size": [c["h"], c["w"]], "counts": c["rle_string"]}) == c["area"]
    for c in golden["merge_iou_cases"]:
        a, b = _rows(c["a_rows"]), _rows(c["b_rows"])
        ra, rb = data.rle_encode(a), data.rle_encode(b)
        da, db = data.rle_decode(ra), data.rle_decode(rb)
        assert data.rle_encode(da | db)["counts"] == c["union_rle"]
        assert data.rle_encode(da & db)["counts"] == c["intersection_rle"]
        assert abs(data.mask_iou(a, b) - c["iou_a_vs_b"]) < 1e-12
        assert abs(data.mask_iou(a, b, crowd=True) - c["iou_a_vs_b_crowd"]) < 1e-12
    assert data.mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 0.0           # empty vs empty is 0 here


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for k in range(60):
        h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        m = (rng.random((h, w)) < rng.choice([0.0, 0.02, 0.3, 0.7, 0.98, 1.0])).astype(np.uint8)
        rle = data.rle_encode(m)
        assert data.rle_counts(rle) == _brute_counts(m), k                  # compressed string decodes to the oracle
        np.testing.assert_array_equal(data.rle_decode(rle), m)
        np.testing.assert_array_equal(data.rle_decode({"size": [h, w], "counts": _brute_counts(m)}), m)
    big = np.zeros((480, 854), np.uint8)
    big[::7, 3::11] = 1                                                    # large counts (deltas > 5 bits)
    np.testing.assert_array_equal(data.rle_decode(data.rle_encode(big)), big)


def test_rle_bad_input():
    with pytest.raises(ValueError, match="cover 13 pixels.*3x4"):
        data.rle_decode({"size": [3, 4], "counts": [5, 8]})               # runs overflow the image
    with pytest.raises(ValueError, match="middle of a count"):
        data.rle_decode({"size": [3, 4], "counts": "0l"})                 # 'l' says "more follows", then nothing
    with pytest.raises(ValueError, match="size"):
        data.rle_decode({"counts": "<"})
    with pytest.warns(UserWarning, match="4 numbers"):
        m = data.polygons_to_mask([[0, 0, 3, 3], [0, 0, 4, 0, 4, 4, 0, 4]], 5, 5)
    assert int(m.sum()) == 16                                              # the short one skipped, the square kept


def test_palette_png(tmp_path):
    ids = np.array([[0, 1, 2], [3, 4, 255]], np.uint8)
    data.write_palette_png(tmp_path / "m.png", ids)
    with Image.open(tmp_path / "m.png") as im:
        assert im.mode == "P"
        pal = im.getpalette()[:15]
    assert pal == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128]  # the PASCAL VOC colour map
    assert data.VOC_PALETTE[255 * 3:] == [224, 224, 192]
    np.testing.assert_array_equal(data.read_palette_png(tmp_path / "m.png"), ids)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png.*mode 'RGB'.*palette"):
        data.read_palette_png(tmp_path / "rgb.png")


# ----------------------------------------------------------------------------- synthetic world
def _digest(t):
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def test_synthetic_clip_contract_and_determinism():
    for stage in (1, 2):
        a, b = (next(data.train_stream("synthetic", stage, T=4, size=64, seed=3)) for _ in range(2))
        assert torch.equal(a.frames, b.frames) and torch.equal(a.masks, b.masks) and a.ids == b.ids
        assert a.frames.shape == (4, 3, 64, 64) and a.frames.dtype == torch.float32
        assert 0 <= a.frames.min() and a.frames.max() <= 1
        N = len(a.ids)
        assert a.masks.shape == (N, 4, 64, 64) and a.masks.dtype == torch.bool and N >= 1
        assert a.labels.shape == (N,) and a.labels.dtype == torch.long
        assert ((a.labels >= 0) & (a.labels < data.NUM_CLASSES["synthetic"])).all()
        assert a.masks.sum(0).max() <= 1                                  # visible masks never overlap
        assert a.masks.flatten(1).any(1).all() and a.dataset == "synthetic"
    other = next(data.train_stream("synthetic", 2, T=4, size=64, seed=4))
    assert not torch.equal(a.frames, other.frames)
    assert len(data.SYNTHETIC_CATEGORIES) == data.NUM_CLASSES["synthetic"] == 6


def test_ranks_and_heldout_never_share_a_video():
    heldout = data.heldout("synthetic", n=8, T=6, size=48)
    assert [_digest(c.frames) for c in heldout] == [_digest(c.frames) for c in data.heldout("synthetic", 8, 6, 48)]
    seen = {_digest(c.frames[0]) for c in heldout}
    assert len(seen) == 8
    streams = [data.train_stream("synthetic", 2, T=6, size=48, seed=0, rank=r, world=2) for r in range(2)]
    train = [next(s) for _ in range(30) for s in streams]
    names = [c.name for c in train]
    assert len(set(names)) == len(names)                                   # the two ranks never repeat a clip
    assert not seen & {_digest(c.frames[0]) for c in train}                # no held-out video in training


def test_synthetic_videos_have_motion_occlusion_exits_and_entries():
    clips = data.heldout("synthetic", n=16, T=16, size=64)
    present = [c.masks.flatten(2).any(2) for c in clips]                  # (N, T) per clip
    enters = any((~p[:, 0] & p.any(1)).any() for p in present)           # absent at t=0, visible later
    returns = any(((p[:, :-2] & ~p[:, 1:-1]).any(1)[:, None] & p).any() and
                  any(p[i, t] and not p[i, t + 1] and p[i, t + 2:].any() for i in range(len(p)) for t in range(14))
                  for p in present)                                       # leaves and comes back
    assert enters and returns
    moved = [(c.masks[:, 0] ^ c.masks[:, -1]).any() for c in clips]
    assert all(moved)
    area = torch.cat([c.masks.flatten(2).sum(2).float().max(1).values for c in clips])   # best view per object
    assert area.min() >= 4 and area.median() >= 40                        # objects, not specks (at 64 x 64)


def _erode(m):
    """Pixels whose 3x3 neighbourhood lies inside the mask (outside the frame counts as outside)."""
    return -F.max_pool2d(-F.pad(m.float()[None], (1, 1, 1, 1)), 3, 1)[0] > 0.5


def test_pseudo_video_keeps_masks_on_their_pixels():
    rng = np.random.default_rng(0)
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    img = torch.full((3, 64, 64), 0.5)
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    for i, (y, x, hh, ww) in enumerate([(5, 8, 20, 12), (30, 35, 10, 25), (40, 4, 18, 18)]):   # asymmetric layout
        masks[i, y:y + hh, x:x + ww] = True
        img[:, masks[i]] = colours[i][:, None]
    frames, m = data.pseudo_video(img, masks, 6, 48, rng)
    assert frames.shape == (6, 3, 48, 48) and m.shape == (3, 6, 48, 48)
    assert not torch.equal(frames[0], frames[1])                           # views differ
    for i in range(3):
        for t in range(6):
            inner = _erode(m[i, t])
            if inner.any():                                                # interior pixels carry the colour
                assert (frames[t][:, inner] - colours[i][:, None]).abs().max() < 1e-4, (i, t)
            pure = ((frames[t] - colours[i][:, None, None]).abs().max(0).values < 1e-4)
            assert not (pure & ~m[i, t]).any(), (i, t)                     # and the colour lies inside its mask
    clip = next(data.train_stream("synthetic", 1, T=5, size=64, seed=1))
    for i in range(len(clip.ids)):                                         # synthetic stills: same object colour
        cols = [clip.frames[t][:, _erode(clip.masks[i, t])].mean(1) for t in range(5)
                if _erode(clip.masks[i, t]).sum() > 5]
        assert all((c - cols[0]).abs().max() < 0.12 for c in cols)


def test_synthetic_generation_speed():
    import time
    torch.set_num_threads(1)
    data.synthetic_clip((9, 0), 2, 4, 128)                                 # warm-up
    t0 = time.perf_counter()
    for i in range(6):
        data.synthetic_clip((9, i), 2, 8, 128)
    ms = (time.perf_counter() - t0) * 1e3 / 48
    assert ms < 25, f"{ms:.1f} ms per 128x128 frame (target < 5 on an idle core)"
