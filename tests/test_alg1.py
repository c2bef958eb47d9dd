"""Tests for infer.py's Alg. 1 (issue 14) and its command line's input checks (issue 13): the
streaming Segmenter's allocation and history replayed through the parallel AUSM.forward, each rule
of Alg. 1 / App. A / Sec. 3.4 that the Segmenter follows, test-time scaling of images, and the
CLI's handling of hostile or unusual input. Untrained tiny models; each test takes seconds."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ausm
import data
import infer
from test_infer import save_ckpt, tiny_model  # the same untrained tiny model and checkpoint writer

torch.set_num_threads(1)  # the shared 2-core box


def record(model):
    """Wrap model.step: per call the frame, A_{t-1} (alloc), M_{t-1}, rows of B; the outputs."""
    calls, step = [], model.step

    def recording_step(x, state, dataset):
        given = (x.clone(), state.alloc.clone(), state.M.clone(), state.ids.clone())
        out, new = step(x, state, dataset)
        calls.append((*given, out))
        return out, new
    model.step = recording_step
    return calls


def frames_with_late_detections(model, T=8):
    """Frames and a threshold at which nothing is detected on frame 0 and something later (a dry run
    with no allocation sees the detection queries' fg probs; the threshold is above frame 0's)."""
    frames = torch.rand(T, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calls = record(model)
    dry = infer.Segmenter(model, "unprompted", threshold=1.01)
    for f in frames:
        dry.step(f)
    del model.step
    best = [out["fg"][-1, 0, model.cfg.N_id:].sigmoid().max().item() for *_, out in calls]
    threshold = best[0] + 0.01
    assert max(best[1:]) > threshold, best  # the dry run shows a detection after frame 0
    return frames, threshold


def replay(model, calls, dataset="synthetic"):
    """The recorded run through AUSM.forward: the same frames, rows of B, history and A_{t-1}."""
    frames = torch.stack([c[0][0] for c in calls])[None]  # (1, T, 3, S, S)
    tracked = torch.stack([c[1][0] for c in calls])[None]  # (1, T, N)
    history = torch.stack([c[2][0] for c in calls])[None]  # (1, T, N, S, S)
    with torch.no_grad():
        return model(frames, calls[-1][3], history, tracked, dataset)


def up(logits, S):  # (n, S/4, S/4) mask logits -> (n, S, S) bool, as the Segmenter thresholds them
    return F.interpolate(logits[None], (S, S), mode="bilinear")[0] > 0


def check_alg1(calls, mode, threshold, late_prompt=None):
    """Alg. 1 l.15-19 on the Segmenter's own outputs, step by step: a tracked object's M_t is its
    query's mask; unprompted, each detection >= threshold (surest first) takes the next free slot
    with its mask; a late prompt (frame 4) joins with its mask. -> the frames new slots joined."""
    joined_at, S, N = [], 32, 16
    for t, (now, after) in enumerate(zip(calls, calls[1:])):
        _, alloc, _, _, out = now
        _, alloc_next, M_next, _, _ = after
        fg = out["fg"][-1, 0].sigmoid()  # (Q,)
        masks = up(out["masks"][-1, 0], S)  # (Q, S, S)
        new = torch.nonzero(alloc_next[0] & ~alloc[0])[:, 0].tolist()  # slots joining A_t at t
        for i in torch.nonzero(alloc[0])[:, 0].tolist():  # l.19: M_t^i = query i's mask
            if not (t == 0 and mode == "prompted"):  # (frame 0: M_0 is the prompt, y_0)
                assert torch.equal(M_next[0, i] > 0, masks[i]), (t, i)
        if mode == "unprompted":  # l.15-18, while B has free rows
            D = [q for q in fg[N:].argsort(descending=True).tolist() if fg[N + q] >= threshold]
            assert len(new) == min(len(D), N - int(alloc.sum())), (t, new, D)
            for i, q in zip(new, D):  # l.19: the detection's mask joins M_t
                assert torch.equal(M_next[0, i] > 0, masks[N + q]), (t, i, q)
        elif t == 4:  # the late prompt joins A_t and M_t at its frame
            assert len(new) == 1 and torch.equal(M_next[0, new[0]] > 0, late_prompt)
        joined_at += [t] * len(new)
    return joined_at


@pytest.mark.parametrize("mode", ["unprompted", "prompted"])
def test_streaming_segmenter_equals_parallel_forward(mode):
    """Issue 14 6(b): the allocation and M_t the Segmenter made frame by frame follow Alg. 1, and
    replayed through AUSM.forward as tracked / history they give the streamed outputs."""
    model, N = tiny_model(), 16
    a, b = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    a[4:12, 4:14], b[18:30, 16:28] = True, True
    prompts = {0: {7: a}, 4: {9: b}}  # prompted: object 7 on frame 0, object 9 joins on frame 4
    if mode == "unprompted":
        frames, threshold = frames_with_late_detections(model)
        prompts = {}
    else:
        frames = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        threshold = 0.5
    calls = record(model)
    seg = infer.Segmenter(model, mode, threshold=threshold)
    for t, f in enumerate(frames):
        seg.step(f, prompts.get(t))
    joined_at = check_alg1(calls, mode, threshold, torch.from_numpy(b))
    rows = calls[-1][3][0, calls[-1][1][0]]  # the rows of B of A_{T-1}
    assert len(set(rows.tolist())) == len(rows) and (rows >= 0).all()  # distinct rows of B
    if mode == "unprompted":
        assert joined_at and min(joined_at) > 0  # detections appear mid-video, none on frame 0
    else:
        assert bool(calls[0][1][0, 0]) and joined_at == [4]  # y_0 on X_0; object 9 at frame 4
    par = replay(model, calls)
    for t, (_, alloc, _, _, out) in enumerate(calls):  # tracking queries of A_{t-1}, detections
        q = torch.nonzero(alloc[0])[:, 0].tolist() + list(range(N, N + model.cfg.N_det))
        for k in ("fg", "masks", "cls"):
            err = (par[k][:, 0, t, q] - out[k][:, 0, q]).abs().max() / out[k].abs().max()
            assert err <= 1e-4, (t, k, err)


class ScriptedDetections(infer.Segmenter):
    """An unprompted Segmenter whose frame t detects the counts[t] detection queries with the
    highest fg prob (surest first), whatever the threshold; `D` keeps each frame's queries."""
    def __init__(self, model, counts):
        super().__init__(model, "unprompted")
        self.counts = counts
        self.D = []

    def _detections(self, fg):
        N = self.model.cfg.N_id
        D = fg[N:].argsort(descending=True, stable=True)[:self.counts[self.t]] + N  # (k,)
        self.D.append(D)
        return D


def test_allocation_draws_free_rows_until_the_buffer_is_full():
    """Alg. 1 l.17-19 with N_id = 6 rows and 0, 2, 3, 2, 1, 2 new detections on frames 0-5: each
    frame's new objects take the next slots, distinct rows of B \\ A_{t-1} and their detections'
    masks as M_t; frame 3 fills B (its surer detection joins, one warning), later ones are
    dropped."""
    model, N, counts = tiny_model(N_id=6), 6, [0, 2, 3, 2, 1, 2]
    calls = record(model)
    seg = ScriptedDetections(model, counts)
    frames = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    painted = 0  # new objects whose mask is not empty: an empty M_t would be noticed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t, f in enumerate(frames):
            before = []  # the rows of A_{t-1}
            if t > 0:
                before = seg.state.ids[0, seg.state.alloc[0]].tolist()
            n = len(before)
            seg.step(f)
            fit = min(counts[t], N - n)  # who fits in B: the surest first
            rows = seg.state.ids[0, seg.state.alloc[0]].tolist()
            assert seg.state.alloc[0].tolist() == [True] * (n + fit) + [False] * (N - n - fit), t
            assert rows[:n] == before and len(rows) == n + fit, (t, rows, before)  # l.18: A_{t-1}
            assert len(set(rows)) == len(rows), (t, rows, before)  # and new rows, from B \ A_{t-1}
            assert seg.slot == {k: k - 1 for k in range(1, n + fit + 1)}, (t, seg.slot)
            masks = up(calls[-1][-1]["masks"][-1, 0], 32)  # (Q, S, S): this frame's query masks
            for j, q in enumerate(seg.D[t][:fit].tolist()):  # l.19: M_t of D_new = their masks
                assert torch.equal(seg.state.M[0, n + j] > 0, masks[q]), (t, j)
                painted += int(masks[q].any())
    assert sorted(seg.state.ids[0].tolist()) == list(range(N)) and painted >= 3  # all of B, once
    full = [str(w.message) for w in caught if "ID buffer" in str(w.message)]
    assert len(full) == 1 and full[0].startswith("frame 3: the ID buffer (N_id=6) is full"), full


def test_every_detection_gets_an_id_and_top_k_cuts_only_the_output():
    seg = infer.Segmenter(tiny_model(fg_bias=4.0), "unprompted", top_k=2)  # all 16 detections fire
    ids, scores = seg.step(torch.rand(3, 32, 32))
    assert len(seg.slot) == 16 and bool(seg.state.alloc.all())  # Alg. 1 l.15-19: all of them
    assert len(set(np.unique(ids)) - {0}) <= 2 and len(scores) == 2  # App. A: the top-2 are output


def test_a_tracked_object_keeps_its_mask_in_the_history_below_the_threshold():
    model = tiny_model(fg_bias=4.0)
    seg = infer.Segmenter(model, "unprompted")
    seg.step(torch.rand(3, 32, 32))
    with torch.no_grad():
        model.pixel_decoder.fg.bias.fill_(-8.0)  # every fg prob now far below 0.5
    ids, scores = seg.step(torch.rand(3, 32, 32))
    assert not scores and not ids.any()  # nothing output ...
    assert seg.state.M[0].flatten(1).any(1).sum() > 0  # ... but M_t = their masks (Alg. 1 l.19)


def test_sampler_is_seeded_per_video():
    def rows(seed):
        seg = infer.Segmenter(tiny_model(fg_bias=4.0), "unprompted", seed=seed)
        seg.step(torch.zeros(3, 32, 32))
        return seg.state.ids[0].tolist()
    assert rows(1) == rows(1) and sorted(rows(1)) == list(range(16))  # reproducible, 16 rows
    assert rows(1) != rows(2)  # another seed, another draw
    assert infer.sampler_seed(0, 1) != infer.sampler_seed(0, 2)  # video 1 and 2 of one run differ
    assert infer.sampler_seed(3, 1) == infer.sampler_seed(3, 1)


def test_repetition_keeps_class_statistics_of_the_last_T_steps_only():
    model, frames = tiny_model(fg_bias=4.0), torch.rand(4, 3, 32, 32)

    def frame(t):
        return frames[t], str(t)
    outputs = infer.segment(infer.Segmenter(model, "unprompted"), 4, frame, tts=True)
    kept = [(t, ids, scores) for t, _, _, ids, scores in outputs]
    ref, order = infer.Segmenter(model, "unprompted"), [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    last = [(t, *ref.step(frames[t])) for t in order][-4:]  # a plain loop's last T steps
    assert json.dumps(infer._results(kept, 4, 1, 10)) == json.dumps(infer._results(last, 4, 1, 10))
    outputs = infer.segment(infer.Segmenter(model, "unprompted"), 4, frame, tts=2)
    assert [t for t, *_ in outputs] == [3, 2, 1, 0]  # x2: 1..T, T-1..1; its last T steps


def test_results_drop_objects_never_output_before_the_top_k_cut():
    ids = np.zeros((4, 4), int)
    ids[0, 0] = 2
    kept = [(0, ids, {1: np.array([0.9, 0.05]), 2: np.array([0.6, 0.1])})]  # 1: not in the id map
    got = infer._results(kept, 1, 1, top_k=1)
    assert [(r["category_id"], r["score"]) for r in got] == [(1, 0.6)]


def test_image_views_visit_the_image_with_its_90_percent_corner_crops():
    image = torch.rand(3, 40, 50)
    assert len(infer.image_views(image, 1)) == 1 and len(infer.image_views(image, 3)) == 11
    views = infer.image_views(image, 2)
    assert views[0] is image and views[-1] is image and all(v.shape == image.shape for v in views)
    top_left = F.interpolate(image[None, :, :36, :45], (40, 50), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(views[1], top_left.clamp(0, 1))
    assert not torch.allclose(views[1], views[2])


def test_cli_tts_on_one_image_runs_its_pseudo_video(tmp_path):
    model = tiny_model(fg_bias=4.0)
    ck = save_ckpt(tmp_path / "ck.pt", model)
    rgb = (np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "im.png")
    steps = []
    step = ausm.AUSM.step

    def counting_step(self, *args):
        steps.append(1)
        return step(self, *args)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ausm.AUSM, "step", counting_step)
        for n in (1, 3):
            infer.main(["--checkpoint", ck, "--video", str(tmp_path / "im.png"), "--mode",
                        "unprompted", "--out", str(tmp_path / f"x{n}"), "--tts", str(n)])
    assert len(steps) == 1 + 11  # x1: the image; x3: 3 visits, the 4 crops before the 2nd and 3rd
    assert data.read_palette_png(tmp_path / "x3" / "im" / "00000.png").shape == (32, 40)


def test_cli_threshold_decides_who_is_detected(tmp_path):
    ck = save_ckpt(tmp_path / "ck.pt", tiny_model(fg_bias=0.0))  # fg probs near 0.5
    for thr, found in ((0.01, True), (0.99, False)):
        infer.main(["--checkpoint", ck, "--num-frames", "3", "--mode", "unprompted", "--threshold",
                    str(thr), "--seed", "3", "--out", str(tmp_path / str(thr))])
        assert bool(json.loads((tmp_path / str(thr) / "results.json").read_text())) == found


# ------------------------------------------------------------- issue 13: hostile or unusual input
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling calls open(marker, "w"): code run by merely loading the file
        return (open, (self.marker, "w"))


def test_a_malicious_checkpoint_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ck = save_ckpt(tmp_path / "ck.pt", tiny_model())
    evil = torch.load(ck, weights_only=True)
    evil["config"]["payload"] = Payload(str(marker))
    torch.save(evil, tmp_path / "evil.pt")
    refused = r"^error: --checkpoint .*evil.pt: refused, .*it would call io.open"
    with pytest.raises(SystemExit, match=refused) as e:
        infer.main(["--checkpoint", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o")])
    assert not marker.exists() and "\n" not in str(e.value)


def test_unknown_dataset_is_refused_with_the_known_names(tmp_path):
    ck = save_ckpt(tmp_path / "ck.pt", tiny_model())
    with pytest.raises(SystemExit, match="--dataset ytvis19: the checkpoint has class heads for "
                                         "synthetic"):
        infer.main(["--checkpoint", ck, "--dataset", "ytvis19", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_frames_run_in_natural_order(tmp_path):
    for t in range(12):
        Image.fromarray(np.full((8, 8, 3), t * 20, np.uint8)).save(tmp_path / f"frame{t}.png")
    name, T, hw, frame, _ = infer.open_video(str(tmp_path))
    assert T == 12 and [frame(t)[1] for t in range(T)] == [f"frame{t}" for t in range(12)]
    assert frame(10)[0].mean().item() == pytest.approx(200 / 255)


def test_a_video_file_says_how_to_extract_frames(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    with pytest.raises(SystemExit, match="clip.mp4: video files are not read.*ffmpeg -i"):
        infer.main(["--checkpoint", save_ckpt(tmp_path / "ck.pt", tiny_model()), "--video",
                    str(tmp_path / "clip.mp4")])


def test_a_prompt_without_objects_warns(tmp_path, capsys):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "00000.png")
    data.write_palette_png(tmp_path / "p.png", np.zeros((32, 32), np.uint8))
    ck = save_ckpt(tmp_path / "ck.pt", tiny_model())
    infer.main(["--checkpoint", ck, "--video", str(tmp_path), "--prompt", str(tmp_path / "p.png"),
                "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if "p.png" in line]
    assert len(err) == 1 and "has no object" in err[0]


@pytest.mark.parametrize("flag", [["--gif-frames", "-1"], ["--num-frames", "-1"],
                                  ["--num-frames", "0"], ["--top-k", "0"], ["--tts", "0"],
                                  ["--threshold", "1.5"], ["--reuse-after", "-1"]])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, flag):
    with pytest.raises(SystemExit, match=f"^error: {flag[0]} "):
        ck = save_ckpt(tmp_path / "ck.pt", tiny_model())
        infer.main(["--checkpoint", ck, "--out", str(tmp_path / "o"), *flag])
    assert not (tmp_path / "o").exists()


def test_gif_frames_0_writes_no_gif(tmp_path):
    ck = save_ckpt(tmp_path / "ck.pt", tiny_model())
    infer.main(["--checkpoint", ck, "--num-frames", "3", "--gif-frames", "0", "--out",
                str(tmp_path / "o")])
    assert sorted(os.listdir(tmp_path / "o")) == ["results.json", "synthetic-val-000"]


def test_a_corrupt_frame_leaves_the_earlier_outputs_untouched(tmp_path):
    ck = save_ckpt(tmp_path / "ck.pt", tiny_model(fg_bias=4.0))
    (tmp_path / "v").mkdir()
    for t in range(5):
        grey = np.full((32, 32, 3), 40 * t, np.uint8)
        Image.fromarray(grey).save(tmp_path / "v" / f"{t:05d}.png")
    args = ["--checkpoint", ck, "--video", str(tmp_path / "v"), "--mode", "unprompted", "--out",
            str(tmp_path / "o")]
    infer.main(args)
    before = {p.name: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    (tmp_path / "v" / "00003.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="00003.png: cannot decode"):
        infer.main(args)
    after = {p.name: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    assert after == before and len(before) == 7  # results.json, v.gif, 5 PNGs; no temporary file
