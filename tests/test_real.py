"""Tests for real video (issue 16): aspect-preserving input sizes (data.frame_size) for training and
inference, outputs at the frame's own size, mixing synthetic and real batches (--data A,B --mix),
the decoded-frame cache, and the copy-the-first-mask baseline beside the model's J&F. Each test
writes its own tiny DAVIS-2016-style folder (40x72 frames, grayscale 0/255 masks) into tmp_path."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

import ausm
import data
import infer
import train

torch.set_num_threads(1)  # the shared 2-core box: a 2nd thread spin-waits

H, W = 40, 72                                   # fixture frames: not square, 9:5
SMALL = dict(D=32, N_det=6, L_c=1, L_h=1, L_p=2, heads=2, ffn=64, width=16)


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def _write_video(root, name, boxes):
    """One sequence: frame t is grey with boxes[t] painted red; its mask a grayscale 0/255 PNG."""
    jdir = root / "JPEGImages/480p" / name
    adir = root / "Annotations/480p" / name
    jdir.mkdir(parents=True)
    adir.mkdir(parents=True)
    for t, box in enumerate(boxes):
        img = np.full((H, W, 3), 90, np.uint8)
        m = _box(*box)
        img[m] = (240, 30, 30)
        Image.fromarray(img).save(jdir / f"{t:05d}.jpg", quality=95)
        Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(adir / f"{t:05d}.png")


A = (10, 26, 6, 22)                             # two disjoint boxes (y0, y1, x0, x1)
B = (10, 26, 44, 60)


@pytest.fixture
def davis16(tmp_path):
    """train: sequence "tr" (6 frames, the box moving right); val: "va" (A, A, B, B)."""
    root = tmp_path / "DAVIS16"
    _write_video(root, "tr", [(10, 26, 4 + 6 * t, 20 + 6 * t) for t in range(6)])
    _write_video(root, "va", [A, A, B, B])
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/train.txt").write_text("tr\n")
    (root / "ImageSets/2017/val.txt").write_text("va\n")
    return root


def test_frame_size_keeps_the_aspect_ratio():
    assert data.frame_size(480, 854, 128) == (128, 224)     # DAVIS 480p: short side 128
    assert data.frame_size(854, 480, 128) == (224, 128)
    assert data.frame_size(H, W, 16) == (16, 32)            # 72 * 16 / 40 = 28.8 -> 32
    assert data.frame_size(128, 128, 128) == (128, 128)     # synthetic frames: as before


def test_real_clips_keep_the_aspect_ratio_and_train_on_whole_frames(davis16):
    spec = f"davis:{davis16}"
    (val,) = data.heldout(spec, n=1, T=None, size=16)
    assert val.frames.shape == (4, 3, 16, 32) and val.ids == [1]    # 0/255 mask -> object 1
    rows = np.floor((np.arange(16) + 0.5) * H / 16).astype(int)      # nearest-exact source pixels
    cols = np.floor((np.arange(32) + 0.5) * W / 32).astype(int)
    np.testing.assert_array_equal(val.masks[0, 0].numpy(), _box(*A)[rows][:, cols])
    clip = next(data.train_stream(spec, stage=2, T=3, size=16))
    assert clip.frames.shape == (3, 3, 16, 32) and clip.masks.shape == (1, 3, 16, 32)
    still = next(data.train_stream(spec, stage=1, T=3, size=16))
    assert still.frames.shape == (3, 3, 16, 32) and still.masks.shape[1] == 3
    (batch,) = [next(data.batches(spec, 2, stage=2, T=3, size=16))]
    assert [c.frames.shape for c in batch] == [(3, 3, 16, 32)] * 2   # one size: whole frames


def test_real_training_clips_go_through_clip_views(davis16, monkeypatch):
    spec = f"davis:{davis16}"
    plain = []
    for augment in (False, True):
        monkeypatch.setattr(data, "AUGMENT_CLIPS", augment)
        stream = data.train_stream(spec, stage=2, T=3, size=16)
        plain.append([next(stream).frames for _ in range(4)])
    assert all(f.shape == (3, 3, 16, 32) for f in plain[1])
    assert not any(torch.equal(a, b) for a, b in zip(*plain))        # each clip a new view

    def off_grid(frames):  # share of values that are not k / 255: resampled, not decoded, pixels
        return float(((frames * 255 - (frames * 255).round()).abs() > 1e-3).float().mean())
    assert max(off_grid(f) for f in plain[0]) == 0 and min(off_grid(f) for f in plain[1]) > 0.1


def test_a_batch_of_mixed_frame_sizes_is_cropped_to_its_smallest_around_an_object():
    rng = np.random.default_rng(0)
    wide = data.Clip(torch.rand(2, 3, 16, 40), torch.zeros(1, 2, 16, 40, dtype=torch.bool),
                     torch.tensor([-1]), [1], "davis", "wide")
    wide.masks[0, :, 4:8, 30:36] = True                 # the object far right
    tall = data.Clip(torch.rand(2, 3, 24, 16), torch.ones(1, 2, 24, 16, dtype=torch.bool),
                     torch.tensor([-1]), [1], "davis", "tall")
    same = [wide, wide]
    assert data.fit_batch(same, rng) is same                         # one size: left whole
    for seed in range(5):
        fitted = data.fit_batch([wide, tall], np.random.default_rng(seed))
        assert [c.frames.shape for c in fitted] == [(2, 3, 16, 16)] * 2
        assert fitted[0].masks[0, 0].any()                           # the crop holds the object
        x0 = [x for x in range(25) if torch.equal(wide.frames[..., x:x + 16], fitted[0].frames)]
        assert len(x0) == 1 and torch.equal(wide.masks[..., x0[0]:x0[0] + 16], fitted[0].masks)


def test_segmenter_keeps_the_aspect_ratio_and_answers_at_the_frame_size():
    torch.manual_seed(0)
    model = ausm.AUSM(ausm.Config.tiny(image_size=16, **SMALL)).eval()
    seg = infer.Segmenter(model)
    ids, _ = seg.step(torch.rand(3, H, W), {1: _box(*A)})
    assert ids.shape == (H, W) and (ids[_box(*A)] == 1).all()       # frame 0: the prompt
    assert tuple(seg.state.M.shape[-2:]) == (16, 32)                 # the model sees 16x32
    ids, _ = seg.step(torch.rand(3, H, W))
    assert ids.shape == (H, W)
    square = infer.Segmenter(model)
    square.step(torch.rand(3, 48, 48), {1: np.ones((48, 48), bool)})
    assert tuple(square.state.M.shape[-2:]) == (16, 16)              # a square frame: as before


def test_the_mix_ratio_and_its_seed(davis16):
    spec = f"synthetic,davis:{davis16}"

    def kinds(mix, seed, n=60):
        stream = data.batches(spec, 1, mix, stage=2, T=2, size=16, seed=seed)
        return [next(stream)[0].dataset for _ in range(n)]
    half = kinds(0.5, 7)
    assert 0.35 < half.count("davis") / len(half) < 0.65
    assert kinds(0.5, 7) == half                    # the seed fixes every batch's dataset
    assert kinds(0.5, 8) != half
    assert set(kinds(0.0, 7, 10)) == {"synthetic"} and set(kinds(1.0, 7, 10)) == {"davis"}
    with pytest.raises(ValueError, match="at most two dataset specs"):
        next(data.batches(f"{spec},synthetic"))


def _train(tmp_path, monkeypatch, argv, kill_at=None):
    """train.main at 32 px on the fixture; -> [(dataset, loss)] of each iteration (kill_at: the
    process dies in that iteration, as a killed run would)."""
    seen = []

    def step(model, opt, batch, *a, **k):
        if len(seen) + 1 == kill_at:
            raise RuntimeError("killed")
        loss, parts = REAL_STEP(model, opt, batch, *a, **k)
        seen.append((batch["dataset"], loss))
        return loss, parts
    monkeypatch.setattr(train, "train_step", step)
    argv = argv + ["--size", "32", "--batch-size", "1", "--frames", "2", "--no-eval", "--threads",
                   "1", "--out", str(tmp_path / "run"), "--max-iters", "6", "--ckpt-every", "3"]
    if kill_at is None:
        assert train.main(argv, **SMALL) == 0
    else:
        with pytest.raises(RuntimeError, match="killed"):
            train.main(argv, **SMALL)
    return seen


REAL_STEP = train.train_step


def test_a_mixed_run_resumes_exactly(tmp_path, monkeypatch, davis16):
    base = ["--stage", "2", "--data", f"synthetic,davis:{davis16}", "--mix", "0.5", "--init", ""]
    whole = _train(tmp_path / "a", monkeypatch, base)
    assert {d for d, _ in whole} == {"synthetic", "davis"}       # both datasets in 6 batches
    first = _train(tmp_path / "b", monkeypatch, base, kill_at=5)  # checkpoint at 3, dies in 5
    rest = _train(tmp_path / "b", monkeypatch, base + ["--resume"])
    assert first[:3] + rest == whole


def test_the_run_header_names_the_short_side_of_real_frames(tmp_path, monkeypatch, davis16, capsys):
    _train(tmp_path, monkeypatch, ["--stage", "2", "--data", f"davis:{davis16}", "--init", ""])
    assert "T=2, short side 32, batch 1x1" in capsys.readouterr().out   # frames are 32 x 64


def test_each_real_file_is_decoded_once(davis16, monkeypatch):
    calls = {}
    real_image = data._read_image
    real_png = data.read_palette_png

    def count(fn):
        def wrapped(path, *a, **k):
            calls[str(path)] = calls.get(str(path), 0) + 1
            return fn(path, *a, **k)
        return wrapped
    monkeypatch.setattr(data, "_read_image", count(real_image))
    monkeypatch.setattr(data, "read_palette_png", count(real_png))
    monkeypatch.setattr(data, "_CACHE", {})
    stream = data.train_stream(f"davis:{davis16}", stage=2, T=3, size=16)
    for _ in range(20):
        next(stream)                               # 60 frame reads from 6 frames
    assert len(calls) == 12 and max(calls.values()) == 1      # 6 JPEGs, 6 PNGs, once each
    monkeypatch.setattr(data, "_CACHE", {})
    monkeypatch.setattr(data, "CACHE_FRAMES", 2)
    for _ in range(5):
        next(stream)
    assert len(data._CACHE) == 2                   # bounded


def test_copy_baseline_by_hand():
    gt = np.stack([_box(*A), _box(*A), _box(*B), _box(*B)]).astype(np.uint8)   # (4, H, W)
    copy = infer.copy_first_mask(gt)
    assert (copy == gt[0]).all() and copy.shape == gt.shape
    # scored frames 1, 2: J = F = 1 on frame 1 (same box), 0 on frame 2 (disjoint) -> 0.5
    _, side = infer.davis_side_by_side([("va", gt, gt)])
    assert side["sequences"] == {"va": (1.0, 0.5)}
    assert side["J&F"] == 1.0 and side["copy"] == 0.5


def test_eval_davis_prints_the_copy_baseline(tmp_path, davis16, capsys):
    pred = tmp_path / "pred/va"
    pred.mkdir(parents=True)
    for t, box in enumerate([A, A, A, A]):         # the copy itself: 0.5 both
        data.write_palette_png(pred / f"{t:05d}.png", _box(*box).astype(np.uint8))
    infer.main(["--eval", "davis", "--pred", str(tmp_path / "pred"), "--gt", str(davis16)])
    out = capsys.readouterr().out
    assert "copy J&F" in out
    assert [line.split() for line in out.splitlines()[-2:]] == [["va", "0.5000", "0.5000"],
                                                                 ["Global", "0.5000", "0.5000"]]


def test_eval_davis_runs_a_checkpoint_on_the_val_split(tmp_path, davis16, capsys):
    torch.manual_seed(0)
    model = ausm.AUSM(ausm.Config.tiny(image_size=16, **SMALL)).eval()
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)}, ckpt)
    side = infer.main(["--eval", "davis", "--checkpoint", str(ckpt), "--gt", str(davis16)])
    assert side["copy"] == 0.5 and list(side["sequences"]) == ["va"]
    assert "copy J&F" in capsys.readouterr().out


def test_end_of_training_scores_the_real_val_split(tmp_path, davis16, monkeypatch, capsys):
    monkeypatch.setattr(infer, "evaluate_heldout", lambda model, cfg: {"J&F": 0.0})
    torch.manual_seed(0)
    model = ausm.AUSM(ausm.Config.tiny(image_size=16, **SMALL)).eval()
    scores = train.evaluate(model, model.cfg, str(tmp_path), train._real_spec(
        f"synthetic,davis:{davis16}"))
    assert scores["real"]["copy"] == 0.5 and list(scores["real"]["sequences"]) == ["va"]
    assert "copy J&F" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["real"]["copy"] == 0.5


def test_synthetic_batches_are_unchanged():
    stream = data.train_stream("synthetic", stage=1, T=3, size=32, seed=5)
    old = [[next(stream) for _ in range(2)] for _ in range(2)]   # as train.py drew them before
    new = data.batches("synthetic", 2, 0.5, stage=1, T=3, size=32, seed=5)
    for o, n in zip(old, [next(new), next(new)]):
        assert all(torch.equal(a.frames, b.frames) and torch.equal(a.masks, b.masks)
                   for a, b in zip(o, n))
