"""Tests for infer.py: metrics against golden files (davis2017-evaluation, the YouTube-VIS cocoapi
fork), then the streaming Segmenter and the inference CLI (mechanics with an untrained tiny model,
constant memory, bad input)."""
import dataclasses
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import ausm
import data
import infer

torch.set_num_threads(1)  # the shared 2-core box: a 2nd thread spin-waits (10x slower)

GOLDEN = Path(__file__).resolve().parent / "golden"  # see tests/golden/README.md


def load_golden(name):
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; it is part of the repository (tests/golden/)")
    return json.loads(path.read_text())


def davis_labels(seq, who):
    """(T, H, W) id maps of a golden sequence, from digit rows or from rectangles."""
    if f"{who}_label_rows" in seq:
        rows = seq[f"{who}_label_rows"]
        return np.array([[[int(c) for c in row] for row in frame] for frame in rows])
    out = np.zeros((seq["T"], seq["h"], seq["w"]), np.uint8)
    for t, rects in enumerate(seq[f"{who}_rects_id_y0y1x0x1"]):
        for obj, y0, y1, x0, x1 in rects:                       # later rectangles overwrite
            out[t, y0:y1, x0:x1] = obj
    return out


DAVIS = load_golden("davis_jf_golden.json")


@pytest.mark.parametrize("seq", DAVIS["sequences"], ids=lambda s: s["name"])
def test_davis_golden_sequence(seq):
    gt, pred = davis_labels(seq, "gt"), davis_labels(seq, "pred")
    J, F = infer.davis_sequence(gt, pred)
    np.testing.assert_allclose(J, seq["J_per_object_per_frame"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(F, seq["F_per_object_per_frame"], rtol=0, atol=1e-6)
    stats = seq["per_object_stats_M_R_D"]
    np.testing.assert_allclose([infer.davis_statistics(j) for j in J], stats["J"], atol=1e-6)
    np.testing.assert_allclose([infer.davis_statistics(f) for f in F], stats["F"], atol=1e-6)


def test_davis_golden_global():
    golden = load_golden("davis_jf_golden.json")
    s = infer.davis_scores((q["name"], davis_labels(q, "gt"), davis_labels(q, "pred"))
                           for q in golden["sequences"])
    for k, v in golden["global"].items():
        assert s[k] == pytest.approx(v, abs=1e-6), k


def test_davis_empty_cases():
    empty, box = np.zeros((6, 8), bool), np.zeros((6, 8), bool)
    box[2:4, 3:6] = True
    assert infer.davis_j(empty, empty) == 1 and infer.davis_f(empty, empty) == 1
    assert infer.davis_j(box, empty) == 0
    assert infer.davis_f(box, empty) == 0 and infer.davis_f(empty, box) == 0
    # a mask filling the frame has no boundary (the image border is not one), as in davis2017's
    # _seg2bmap
    assert infer.davis_f(np.ones((6, 8), bool), empty) == 1


YTVIS = load_golden("ytvis_ap_golden.json")


@pytest.mark.parametrize("case", YTVIS["cases"], ids=lambda c: f"seed{c['seed']}")
def test_ytvis_golden(case):
    s = infer.ytvis_ap(case["gt"], case["results"])
    assert set(s) == set(case["stats"])
    for k, v in case["stats"].items():
        assert s[k] == pytest.approx(v, abs=1e-6), k


@pytest.mark.parametrize("case", YTVIS["cases"], ids=lambda c: f"seed{c['seed']}")
def test_ytvis_golden_ious(case):
    for key, rows in case["ious_dt_by_gt_keyed_video_cat"].items():
        vid, cat = map(int, key.split(","))
        d = [r for r in case["results"] if (r["video_id"], r["category_id"]) == (vid, cat)]
        d = [d[i] for i in np.argsort([-r["score"] for r in d], kind="mergesort")][:100]
        g = [a for a in case["gt"]["annotations"]
             if (a["video_id"], a["category_id"]) == (vid, cat)]
        v = next(v for v in case["gt"]["videos"] if v["id"] == vid)
        ious = infer._video_ious([x["segmentations"] for x in d], [y["segmentations"] for y in g],
                                 v["height"], v["width"])
        if rows:
            np.testing.assert_allclose(ious, rows, atol=1e-6, err_msg=key)


def test_ytvis_results_against_themselves_score_one():
    case = YTVIS["cases"][0]
    results = case["results"]
    gt = {"videos": case["gt"]["videos"], "categories": case["gt"]["categories"],
          "annotations": [dict(r, id=n + 1, iscrowd=0) for n, r in enumerate(results)]}
    s = infer.ytvis_ap(gt, results)
    assert s["AP"] == pytest.approx(1.0) and s["AP50"] == pytest.approx(1.0)
    assert s["AR100"] == pytest.approx(1.0)


def write_palette(path, ids):
    img = Image.fromarray(ids.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in (i * 40 % 256, i * 90 % 256, i * 150 % 256)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def test_cli_davis_on_palette_folders_matches_golden(tmp_path, capsys):
    golden = load_golden("davis_jf_golden.json")
    for q in golden["sequences"]:
        for t, (g, p) in enumerate(zip(davis_labels(q, "gt"), davis_labels(q, "pred"))):
            write_palette(tmp_path / "gt" / q["name"] / f"{t:05d}.png", g)
            if 0 < t < q["T"] - 1:  # first and last frame are not needed
                write_palette(tmp_path / "pred" / q["name"] / f"{t:05d}.png", p)
    s = infer.main(["--eval", "davis",
                    "--pred", str(tmp_path / "pred"),
                    "--gt", str(tmp_path / "gt")])
    out = capsys.readouterr().out
    assert "Global" in out and "small_a_2" in out and "big_480x854_rects_1" in out
    for k, v in golden["global"].items():
        assert s[k] == pytest.approx(v, abs=1e-6), k
    assert f"{golden['global']['J&F-Mean']:.4f}" in out.splitlines()[-1]


def test_cli_ytvis_matches_golden(tmp_path, capsys):
    case = YTVIS["cases"][1]
    (tmp_path / "gt.json").write_text(json.dumps(case["gt"]))
    (tmp_path / "results.json").write_text(json.dumps(case["results"]))
    s = infer.main(["--eval", "ytvis",
                    "--pred", str(tmp_path / "results.json"),
                    "--gt", str(tmp_path / "gt.json")])
    out = capsys.readouterr().out
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10"):
        assert s[k] == pytest.approx(case["stats"][k], abs=1e-6) and f"{k} " in out


def test_rle_examples_from_evaluation_md():
    box = np.zeros((4, 5), bool)
    box[1:3, 1:4] = True
    np.testing.assert_array_equal(infer._decode({"size": [4, 5], "counts": "5220003"}, 4, 5), box)
    uncompressed = {"size": [4, 5], "counts": [5, 2, 2, 2, 2, 2, 5]}
    np.testing.assert_array_equal(infer._decode(uncompressed, 4, 5), box)
    assert not infer._decode({"size": [3, 4], "counts": "<"}, 3, 4).any()
    assert infer._decode({"size": [3, 4], "counts": "0<"}, 3, 4).all()
    assert not infer._decode(None, 3, 4).any()


def test_ytvis_polygon_ground_truth_scores_one():
    # PAPER.md Sec. 8: the polygon [0,0, 4,0, 4,4, 0,4] fills pixels 0..3 on both axes; the same
    # square as RLE
    square = {"size": [8, 8], "counts": [0, 4, 4, 4, 4, 4, 4, 4, 36]}
    gt = {"videos": [{"id": 1, "height": 8, "width": 8, "length": 2}], "categories": [{"id": 1}],
          "annotations": [{"id": 1, "video_id": 1, "category_id": 1, "iscrowd": 0,
                           "segmentations": [[[0, 0, 4, 0, 4, 4, 0, 4]], None]}]}
    result = {"video_id": 1, "category_id": 1, "score": 0.9, "segmentations": [square, None]}
    s = infer.ytvis_ap(gt, [result])
    assert s["AP"] == pytest.approx(1.0) and s["APs"] == pytest.approx(1.0) and s["APl"] == -1
    short = {"video_id": 1, "category_id": 1, "score": 0.9, "segmentations": [square]}
    with pytest.raises(ValueError, match="1 segmentations; the ground truth has 2 frames"):
        infer.ytvis_ap(gt, [short])


def test_bad_input_is_explained(tmp_path):
    gt = np.zeros((4, 8, 8), np.uint8)
    gt[:, 2:5, 2:5] = 1
    with pytest.raises(ValueError, match="object id 2"):
        infer.davis_sequence(gt, gt * 2, name="seq")
    with pytest.raises(ValueError, match="T >= 3"):
        infer.davis_sequence(gt[:2], gt[:2])
    (tmp_path / "pred" / "seq").mkdir(parents=True)
    for t in range(4):
        write_palette(tmp_path / "gt" / "seq" / f"{t:05d}.png", gt[t])
    rgb = Image.fromarray(np.zeros((8, 8, 3), np.uint8))  # RGB, not a palette image
    rgb.save(tmp_path / "pred" / "seq" / "00001.png")
    args = ["--eval", "davis", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]
    with pytest.raises(SystemExit, match="palette"):
        infer.main(args)
    with pytest.raises(SystemExit, match="00002.png"):
        write_palette(tmp_path / "pred" / "seq" / "00001.png", gt[1])
        infer.main(args)


# ------------------------------------------------------------- streaming inference (Segmenter, CLI)


def tiny_model(fg_bias=None, **cfg):
    """An untrained tiny AUSM at 32x32; fg_bias sets every query's foreground logit bias (+: all
    fire)."""
    torch.manual_seed(0)
    model = ausm.AUSM(ausm.Config.tiny(**{"image_size": 32, **cfg})).eval()
    if fg_bias is not None:
        with torch.no_grad():
            model.pixel_decoder.fg.bias.fill_(fg_bias)
    return model


def save_ckpt(path, model):
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)}, path)
    return str(path)


def self_ap(results, T, h, w):
    """results.json against itself as ground truth (the test above, on our own output)."""
    gt = {"videos": [{"id": 1, "height": h, "width": w, "length": T}],
          "categories": [{"id": k} for k in range(1, 8)],
          "annotations": [dict(r, id=n + 1, iscrowd=0) for n, r in enumerate(results)]}
    return infer.ytvis_ap(gt, results)


def test_palette_round_trip(tmp_path):
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    data.write_palette_png(tmp_path / "a.png", ids)
    assert Image.open(tmp_path / "a.png").mode == "P"
    np.testing.assert_array_equal(data.read_palette_png(tmp_path / "a.png"), ids)


def test_prompted_objects_join_on_frames_0_and_5():
    model, T = tiny_model(), 8
    frames = torch.rand(T, 3, 32, 32)
    a, b = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    a[4:12, 4:14], b[18:30, 16:28] = True, True
    seg, seen, step = infer.Segmenter(model, "prompted"), [], model.step

    def recording_step(x, state, dataset):  # records what model.step sees as A_{t-1}
        seen.append(state.alloc[0, :2].tolist())
        return step(x, state, dataset)
    model.step = recording_step
    for t in range(T):
        ids, scores = seg.step(frames[t], {7: a} if t == 0 else {9: b} if t == 5 else None)
        assert set(np.unique(ids)) <= {0, 7, 9}  # original ids, nothing else
        assert seg.slot == ({7: 0} if t < 5 else {7: 0, 9: 1})  # the later object joins at frame 5
        n = len(seg.slot)
        assert seg.state.alloc[0].tolist() == [True] * n + [False] * (16 - n)
        if t in (0, 5):  # a prompt is that frame's output and history
            m = a if t == 0 else b
            k = 7 if t == 0 else 9
            assert (ids[m] == k).all() and k not in scores  # given
            np.testing.assert_array_equal(seg.state.M[0, seg.slot[k]].numpy(), m)
        else:  # tracked: M = each object's mask (logits > 0), in the id map where any is
            # (n, 32, 32): H = W = image_size here
            M = seg.state.M[0, :len(seg.slot)].numpy() > 0
            np.testing.assert_array_equal(M.any(0), ids > 0)
            assert all((M[i] | (ids != k)).all() for k, i in seg.slot.items())
    assert len(set(seg.state.ids[0, :2].tolist())) == 2  # two distinct rows of the ID buffer B
    # what model.step saw as A_{t-1}: y_0 painted on X_0 at step 0; object 9 is in the history from
    # step 6 on
    assert seen == [[True, False]] * 6 + [[True, True]] * 2


def test_prompted_bad_input_is_explained():
    seg, m = infer.Segmenter(tiny_model()), np.ones((32, 32), bool)
    with pytest.raises(ValueError, match="differ from frame 0's size"):
        seg.step(torch.rand(3, 32, 32), {1: np.ones((16, 32), bool)})
    seg.step(torch.rand(3, 32, 32), {1: m})
    with pytest.raises(ValueError, match="differ from frame 0's size"):
        seg.step(torch.rand(3, 40, 32))
    with pytest.raises(ValueError, match="N_id=16"):
        seg.step(torch.rand(3, 32, 32), {k: m for k in range(2, 20)})
    with pytest.raises(ValueError, match="mode='prompted'"):
        infer.Segmenter(tiny_model(), "unprompted").step(torch.rand(3, 32, 32), {1: m})


def test_unprompted_top_k_and_buffer_exhaustion():
    frames = torch.rand(6, 3, 32, 32)
    seg = infer.Segmenter(tiny_model(fg_bias=4.0), "unprompted", top_k=3)  # every detection fires
    for t, f in enumerate(frames):
        ids, scores = seg.step(f)
        # top_k cuts the output only
        assert 0 < len(set(np.unique(ids)) - {0}) <= 3 and len(scores) <= 3
        assert len(seg.slot) == 16  # Alg. 1: all 16 detections got an ID
    seg = infer.Segmenter(tiny_model(fg_bias=4.0), "unprompted", top_k=100)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for f in frames:
            ids, _ = seg.step(f)
            assert ids.max() <= 16
    assert len([x for x in w if "ID buffer (N_id=16) is full" in str(x.message)]) == 1
    assert sorted(seg.slot) == list(range(1, 17)) and bool(seg.state.alloc.all())
    # class probabilities
    assert all(len(p) == 6 and 0 <= p.min() and p.sum() <= 1 for p in scores.values())


def test_results_are_the_top_k_track_category_pairs():
    one, two = np.zeros((4, 4), int), np.zeros((4, 4), int)
    one[0, :2], two[0, :2], two[3, 3] = 1, 1, 2
    # object 1 on 2 frames: 0.6 / 0.3 / 0.1
    kept = [(0, one, {1: np.array([0.6, 0.2, 0.1])}),
            (1, two, {1: np.array([0.6, 0.4, 0.1]), 2: np.array([0.05, 0.15, 0.8])})]
    got = [(r["segmentations"][0] is not None, r["category_id"], round(r["score"], 6))
           for r in infer._results(kept, 2, 7, top_k=3)]
    # Mask2Former-VIS: one track, several classes
    assert got == [(False, 3, 0.8), (True, 1, 0.6), (True, 2, 0.3)]
    assert len(infer._results(kept, 2, 7)) == 6  # prompted: every object, every class kept


class RecordingSegmenter:
    """Stands in for Segmenter in segment(): records each step's frame and prompts; its id map
    is the number of the call."""

    def __init__(self):
        self.fed = []
        self.prompts = []

    def step(self, frame, prompts=None):
        self.fed.append(int(frame[0, 0, 0]))
        self.prompts.append(prompts)
        n = len(self.fed)
        return np.full((2, 2), n), {n: 1.0}


def numbered_frame(t):  # frame t is filled with the number t; its stem is f"f{t}"
    return torch.full((3, 2, 2), float(t)), f"f{t}"


def prompt_every_frame(t, stem):
    return {t + 1: stem}


def test_tts_feeds_1_to_T_back_and_forth():
    seg = RecordingSegmenter()
    list(infer.segment(seg, 5, numbered_frame, tts=True))
    assert seg.fed == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4]  # 1..T, T-1..1, 2..T, 0-based


def test_tts_yields_the_last_T_steps():
    seg = RecordingSegmenter()
    got = list(infer.segment(seg, 5, numbered_frame, tts=True))
    assert [g[0] for g in got] == [0, 1, 2, 3, 4]
    assert [g[1] for g in got] == ["f0", "f1", "f2", "f3", "f4"]
    assert [int(g[2][0, 0, 0]) for g in got] == [0, 1, 2, 3, 4]  # the frame
    assert [int(g[3][0, 0]) for g in got] == [9, 10, 11, 12, 13]  # the id maps of steps 9..13 of 13
    assert [list(g[4]) for g in got] == [[9], [10], [11], [12], [13]]  # and their scores


def test_tts_prompts_only_in_the_first_pass():
    seg = RecordingSegmenter()
    list(infer.segment(seg, 5, numbered_frame, prompt_every_frame, tts=True))
    assert seg.prompts[:5] == [{1: "f0"}, {2: "f1"}, {3: "f2"}, {4: "f3"}, {5: "f4"}]
    assert seg.prompts[5:] == [None] * 8  # the backward and second forward pass: no prompts


def test_tts_off_is_the_plain_loop():
    seg = RecordingSegmenter()
    got = list(infer.segment(seg, 4, numbered_frame, prompt_every_frame))
    assert seg.fed == [0, 1, 2, 3] and seg.prompts == [{1: "f0"}, {2: "f1"}, {3: "f2"}, {4: "f3"}]
    assert [g[0] for g in got] == [0, 1, 2, 3] and [int(g[3][0, 0]) for g in got] == [1, 2, 3, 4]


def test_tts_on_a_model_equals_a_plain_loop():
    model = tiny_model(fg_bias=4.0)
    frames = torch.rand(5, 3, 32, 32)

    def frame(t):
        return frames[t], str(t)
    got = list(infer.segment(infer.Segmenter(model, "unprompted"), 5, frame, tts=True))
    ref = infer.Segmenter(model, "unprompted")
    order = [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    want = [ref.step(frames[t])[0] for t in order][-5:]  # a plain loop over the paper's order
    assert [g[0] for g in got] == list(range(5))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g[3], w)


def test_constant_memory_over_1000_frames():
    def rss():  # MB resident now
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2 ** 20

    def prompts(t, stem):  # every object of frame t's ground truth
        return {k: gt(t) == k for k in np.unique(gt(t)) if k}
    name, T, hw, frame, gt = infer.open_video("synthetic", 1000, 32)
    seg, sizes = infer.Segmenter(tiny_model()), set()
    for n, (t, *_) in enumerate(infer.segment(seg, T, frame, prompts)):
        sizes.add(seg.state.nbytes())
        if n == 99:
            at_100 = rss()
    assert n == 999 and len(sizes) == 1 and seg.slot
    assert rss() - at_100 < 4, f"memory grew from {at_100:.1f} MB to {rss():.1f} MB over 900 frames"


def test_cli_end_to_end(tmp_path, capsys):
    clip = data.heldout("synthetic", 1, 6, 48)[0]
    for t, f in enumerate(clip.frames):  # a 40x48 video (not the model's 32x32)
        rgb = (f[:, :40].permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # (40, 48, 3)
        Image.fromarray(rgb).save(tmp_path / f"{t:05d}.jpg")
    ck = save_ckpt(tmp_path / "ck.pt", tiny_model(fg_bias=4.0))
    infer.main(["--checkpoint", ck,
                "--video", str(tmp_path),
                "--out", str(tmp_path / "o"),
                "--mode", "unprompted",
                "--gif-frames", "4"])
    assert "frames/s" in capsys.readouterr().out
    pngs = sorted((tmp_path / "o" / tmp_path.name).glob("*.png"))
    assert [p.stem for p in pngs] == [f"{t:05d}" for t in range(6)]
    assert all(data.read_palette_png(p).shape == (40, 48) for p in pngs)
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results and all(len(r["segmentations"]) == 6 for r in results)
    # every result's mask is one object of the PNGs (a track may score 2+ classes)
    for t, p in enumerate(pngs):
        ids = data.read_palette_png(p)
        masks = (infer._decode(r["segmentations"][t], 40, 48) > 0
                 for r in results if r["segmentations"][t])
        for m in masks:
            k = np.unique(ids[m])
            assert len(k) == 1 and k[0] > 0 and (m == (ids == k[0])).all()
    # the top 10 (track, class) pairs
    assert len(results) <= 10 and len({r["category_id"] for r in results}) > 1
    assert self_ap(results, 6, 40, 48)["AP"] == pytest.approx(1.0)
    with Image.open(tmp_path / "o" / f"{tmp_path.name}.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (48, 40)
    prompt = np.zeros((40, 48), np.uint8)
    prompt[5:20, 5:20], prompt[25:35, 30:45] = 3, 8
    data.write_palette_png(tmp_path / "prompt.png", prompt)
    (tmp_path / "gif").mkdir()
    # an animated GIF as the video
    with Image.open(tmp_path / "o" / f"{tmp_path.name}.gif") as gif:
        gif.save(tmp_path / "gif" / "v.gif", save_all=True)
    infer.main(["--checkpoint", ck,
                "--video", str(tmp_path / "gif" / "v.gif"),
                "--out", str(tmp_path / "p"),
                "--prompt", str(tmp_path / "prompt.png"),
                "--tts"])
    first = data.read_palette_png(tmp_path / "p" / "v" / "00000.png")
    assert set(np.unique(first)) <= {0, 3, 8}
    assert len(list((tmp_path / "p" / "v").glob("*.png"))) == 4


def test_cli_without_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="runs/stage1/ckpt.pt.*python train.py --stage 1"):
        infer.main([])  # says which command to run first
    (tmp_path / "runs" / "stage1").mkdir(parents=True)
    save_ckpt(tmp_path / "runs" / "stage1" / "ckpt.pt", tiny_model())
    infer.main([])  # a synthetic held-out video, prompted
    assert "synthetic-val-000: 16 frames" in capsys.readouterr().out
    assert len(list((tmp_path / "runs" / "infer" / "synthetic-val-000").glob("*.png"))) == 16


def test_cli_bad_input_is_explained(tmp_path):
    ck = save_ckpt(tmp_path / "ck.pt", tiny_model())
    (tmp_path / "empty").mkdir()

    def run(*a):
        return infer.main(["--checkpoint", ck, "--out", str(tmp_path / "o"), *a])
    with pytest.raises(SystemExit, match="no .jpg/.jpeg/.png frames"):
        run("--video", str(tmp_path / "empty"))
    (tmp_path / "v").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "v" / "00000.png")
    (tmp_path / "v" / "00001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit, match="00001.jpg: cannot decode"):
        run("--video", str(tmp_path / "v"), "--mode", "unprompted")
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(tmp_path / "v" / "00001.jpg")
    with pytest.raises(SystemExit, match="00001.jpg.*resize"):
        run("--video", str(tmp_path / "v"), "--mode", "unprompted")
    data.write_palette_png(tmp_path / "p.png", np.ones((16, 16), np.uint8))
    with pytest.raises(SystemExit, match="p.png: prompt is .*resize the masks"):
        run("--video", str(tmp_path / "v"), "--prompt", str(tmp_path / "p.png"))
    with pytest.raises(SystemExit, match="--mode prompted needs"):
        run("--video", str(tmp_path / "v"))
    data.write_palette_png(tmp_path / "p.png", np.arange(32 * 32).reshape(32, 32) % 20)
    with pytest.raises(SystemExit, match="N_id=16"):
        run("--video", str(tmp_path / "v"),
            "--prompt", str(tmp_path / "p.png"),
            "--num-frames", "1")
    other = torch.load(ck, weights_only=False)
    other["config"]["D"] = 32  # weights of D=64, config says D=32
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="other.pt.*python train.py --stage 1"):
        infer.main(["--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="nope.pt.*python train.py --stage 1"):
        infer.main(["--checkpoint", str(tmp_path / "nope.pt")])


def test_heldout_scores_runs_both_protocols():
    s = infer.heldout_scores(tiny_model(), data.heldout("synthetic", 2, 4, 32))
    identity = {"switches", "reid", "reid_prompted", "returns", "full", "reused"}
    assert set(s) == {"J&F", "J", "F", "AP", "AP50", "AR10"} | identity
    assert 0 <= s["J&F"] <= 1 and -1 <= s["AP"] <= 1
    # an untrained model whose detection queries all fire fills its ID buffer (16) in 2 frames;
    # its tracked objects are all output, so none is lost and no slot is reused
    s = infer.heldout_scores(tiny_model(fg_bias=10.0), data.heldout("synthetic", 2, 3, 32))
    assert s["full"] == 2 and s["reused"] == 0


def scripted(seg, script):
    """Replace seg's model output: script[t] = (which of the 4 tracking queries have a mask,
    detection queries that fire). A mask (logits 8 x 8 at the model's 32 x 32) is a 2 x 2 block
    of the query's own that moves with t, so each frame's masks differ; every tracking query's fg
    prob is 0.9, mask or not (a lost query's fg says nothing)."""
    N = seg.model.cfg.N_id
    Q = N + seg.model.cfg.N_det

    def predict(frame):
        tracking, firing = script[seg.t]
        fg = torch.full((Q,), 0.01)
        fg[:N] = 0.9
        fg[[N + j for j in firing]] = 0.9
        logits = torch.full((Q, 8, 8), -10.0)
        for q in range(Q):
            if q < N and not tracking[q]:
                continue  # an empty mask
            y = (q + seg.t) % 4 * 2
            x = (q + seg.t) // 4 % 4 * 2
            logits[q, y:y + 2, x:x + 2] = 10.0
        seg.logits = logits
        return fg, fg[:, None], logits
    seg._predict = predict


def test_a_full_buffer_gives_the_longest_lost_slot_to_a_new_object():
    script = [([0, 0, 0, 0], [0, 1, 2, 3]),  # frame 0: four detections fill B (N_id = 4)
              ([1, 0, 1, 1], []),  # object 2 (slot 1) has an empty mask from frame 1 on
              ([0, 0, 1, 1], [0]),  # and object 1 (slot 0) from frame 2: slot 1 goes first
              ([0, 1, 1, 1], [0, 1])]  # slot 0 goes to the first, the second is dropped
    seg = infer.Segmenter(tiny_model(N_id=4), "unprompted", reuse_after=1)
    scripted(seg, script)
    frames = torch.rand(4, 3, 32, 32)
    seg.step(frames[0])
    rows = seg.state.ids[0].clone()
    seg.step(frames[1])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ids, _ = seg.step(frames[2])
        assert w == []
    assert seg.slot == {1: 0, 5: 1, 3: 2, 4: 3} and seg.retired == {2: 2}
    assert 5 in ids and 2 not in ids  # the new object is output under its own new id
    detection = infer._up(seg.logits[4:5], (32, 32))[0] > 0  # frame 2's mask of query N_id + 0
    assert torch.equal(seg.state.M[0, 1], detection.float())  # is its M_t; slot 0 keeps its own
    assert torch.equal(seg.state.M[0, 0], (infer._up(seg.logits[0:1], (32, 32))[0] > 0).float())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        seg.step(frames[3])
    assert seg.slot == {5: 1, 3: 2, 4: 3, 6: 0} and seg.retired == {2: 2, 1: 3}
    assert [str(x.message)[:39] for x in w] == ["frame 3: the ID buffer (N_id=4) is full"]
    assert torch.equal(seg.state.ids[0], rows) and bool(seg.state.alloc.all())  # rows of B kept
    never = infer.Segmenter(tiny_model(N_id=4), "unprompted", reuse_after=0)  # Alg. 1 as written
    scripted(never, script)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for f in frames:
            never.step(f)
    assert sorted(never.slot) == [1, 2, 3, 4] and never.retired == {}
    assert [str(x.message)[:39] for x in w] == ["frame 2: the ID buffer (N_id=4) is full"]


def _object(T, frames, box):
    """A (T, 8, 8) bool mask: box (y0, y1, x0, x1) on the listed frames, empty elsewhere."""
    m = np.zeros((T, 8, 8), bool)
    y0, y1, x0, x1 = box
    for t in frames:
        m[t, y0:y1, x0:x1] = True
    return m


def test_matched_ids_takes_the_best_id_above_the_iou_threshold():
    gt = np.stack([_object(3, [0, 1], (0, 4, 0, 4)), _object(3, [0, 1, 2], (4, 8, 4, 8))])
    pred = np.zeros((3, 8, 8), np.int64)
    pred[0, 0:4, 0:4] = 7   # object 0 exactly
    pred[0, 4:8, 4:8] = 3   # object 1 exactly
    pred[1, 0:4, 0:2] = 5   # half of object 0: IoU 0.5, matched
    pred[1, 0:4, 2:4] = 6   # the other half: IoU 0.5 too, the first best (5) wins
    pred[1, 4:5, 4:8] = 3   # a quarter of object 1: IoU 0.25, unmatched
    pred[2, 4:8, 4:8] = 3
    assert infer.matched_ids(gt, pred).tolist() == [[7, 5, -1], [3, 0, 3]]


def test_identity_counts_switches_returns_and_reidentification():
    rows = np.array([[1, 1, -1, -1, 1, 1],     # leaves, comes back as itself: re-identified
                     [2, 2, -1, 4, 4, 2],      # comes back as 4: a return missed, a switch
                     [0, -1, 3, 3, -1, 0],     # leaves unmatched (no own id: not counted), then
                     # leaves as 3 and is not matched again: a return missed
                     [-1, -1, 5, 5, 5, 5],     # appears mid-video: not a return
                     [6, -1, 0, 0, 6, -1]])    # back under 6 after two unmatched frames
    objects, switched, returns, reidentified = infer.identity_counts(rows)
    assert (objects, switched, returns, reidentified) == (5, 1, 4, 2)


def test_eval_long_prints_the_length_table(tmp_path, capsys):
    torch.manual_seed(0)
    ck = tmp_path / "ck.pt"
    cfg = ausm.Config.tiny(image_size=32)
    torch.save({"config": dataclasses.asdict(cfg), "model": ausm.AUSM(cfg).state_dict()}, ck)
    rows = infer.main(["--eval", "long", "--checkpoint", str(ck), "--lengths", "3,5",
                       "--num-videos", "2"])
    assert sorted(rows) == [3, 5]
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == infer.LENGTH_HEADER
    assert [line.split(" | ")[0] for line in lines[2:4]] == ["3", "5"]
    for bad, message in (("16,x", "--lengths 16,x"), ("1", "--lengths 1")):
        with pytest.raises(SystemExit, match=message):
            infer.main(["--eval", "long", "--checkpoint", str(ck), "--lengths", bad])
    with pytest.raises(SystemExit, match="--num-videos 0"):
        infer.main(["--eval", "long", "--checkpoint", str(ck), "--num-videos", "0"])


def test_eval_long_seeds_prints_each_sampler_seed_their_mean_and_the_summary(tmp_path, monkeypatch,
                                                                             capsys):
    ck = save_ckpt(tmp_path / "ck.pt", tiny_model())
    seen = []

    def scores(model, clips, seed=0, reuse_after=None):  # made-up scores of (length, seed)
        T = len(clips[0].frames)
        seen.append((T, seed))
        return {"J&F": 0.9 - 0.01 * T + 0.02 * seed, "AP": 0.1 * seed - 0.01 * T,
                "switches": 0.1, "reid": 0.5, "reid_prompted": 0.5, "returns": T,
                "full": seed - 4, "reused": 2}
    monkeypatch.setattr(infer, "heldout_scores", scores)
    rows = infer.main(["--eval", "long", "--checkpoint", ck, "--lengths", "3,5", "--num-videos",
                       "1", "--seed", "4", "--seeds", "2"])
    assert seen == [(3, 4), (3, 5), (5, 4), (5, 5)]
    assert rows[5]["J&F"] == pytest.approx(0.94) and rows[5]["AP"] == pytest.approx(0.40)
    assert (rows[5]["returns"], rows[5]["full"], rows[5]["reused"]) == (5, 1, 4)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "1 held-out synthetic videos per length (Sampler seeds 4 to 5)"
    labels = [line.split(" | ")[0] for line in lines[2:8]]
    assert labels == ["3 (seed 4)", "3 (seed 5)", "3 (mean)",
                      "5 (seed 4)", "5 (seed 5)", "5 (mean)"]
    assert lines[4].startswith("3 (mean) | 0.960 | 0.420 | 0.100 | 0.500 | 0.500 | 3 | 1 | 4 |")
    assert lines[8] == ("5 frames against 3: J&F -0.020, AP 95.2% of its 3-frame value, buffer "
                        "full in 1 of 2 videos")
    with pytest.raises(SystemExit, match="--seeds 0"):
        infer.main(["--eval", "long", "--checkpoint", ck, "--seeds", "0"])

def test_reuse_after_reaches_every_segmenter_of_eval_long(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ck = save_ckpt(tmp_path / "ck.pt", tiny_model())
    seen = []

    class Recorded(infer.Segmenter):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            seen.append((self.mode, self.reuse_after))
    monkeypatch.setattr(infer, "Segmenter", Recorded)
    infer.main(["--eval", "long", "--checkpoint", ck, "--lengths", "3", "--num-videos", "1",
                "--reuse-after", "7"])
    assert seen == [("prompted", 7), ("unprompted", 7)]
    seen.clear()
    infer.main(["--eval", "long", "--checkpoint", ck, "--lengths", "3", "--num-videos", "1"])
    assert seen == [("prompted", 0), ("unprompted", 0)]  # default: never, as Alg. 1


def test_default_checkpoint_is_the_last_stage_trained(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = SimpleNamespace(checkpoint=None)
    assert infer._checkpoint_path(args) == "runs/stage1/ckpt.pt"  # none yet: stage 1's, named
    for stage in (2, 3):
        (tmp_path / f"runs/stage{stage}").mkdir(parents=True)
        (tmp_path / f"runs/stage{stage}/ckpt.pt").write_bytes(b"")
        assert infer._checkpoint_path(args) == f"runs/stage{stage}/ckpt.pt"
    assert infer._checkpoint_path(SimpleNamespace(checkpoint="x.pt")) == "x.pt"
