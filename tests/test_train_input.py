"""train.py with bad input, as a hostile but ordinary user gives it (issue 13): checkpoints are
data, never code; no silent substitution of arguments; bad datasets, checkpoints and flags stop with
one line `error: ...` naming the file or flag (never a traceback). Each test writes its own bad
files."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import train

torch.set_num_threads(1)
SMALL = dict(D=32, N_det=6, L_c=1, L_h=1, L_p=2, heads=2, ffn=64, width=16)  # a tiny model
QUICK = ["--size", "32", "--batch-size", "1", "--no-eval", "--log-every", "1"]


def fails(argv, capsys, **overrides):
    """train.main(argv) must stop with exit status 1 and one line `error: ...`; -> that line."""
    with pytest.raises(SystemExit) as e:
        train.main(argv, **{**SMALL, **overrides})
    message = str(e.value.code)
    assert e.value.code not in (0, None) and message.startswith("error: "), message
    assert "\n" not in message and "Traceback" not in capsys.readouterr().err
    return message


def trained(tmp_path, name="a", extra=()):
    """A 1-iteration checkpoint of the tiny model -> its path."""
    out = tmp_path / name
    assert train.main(["--max-iters", "1", "--out", str(out), *QUICK, *extra], **SMALL) == 0
    return out / "ckpt.pt"


# ------------------------------------------------------------------------ checkpoints are data
class RunsCode:
    """Pickles as a call of open(marker, "w"): loading it with weights_only=False makes the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_malicious_checkpoint_runs_nothing(tmp_path, capsys):
    good = torch.load(trained(tmp_path), weights_only=True)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({**good, "model": RunsCode(marker)}, evil)
    argv = ["--stage", "2", "--init", str(evil), "--out", str(tmp_path / "b"), *QUICK]
    message = fails(argv, capsys)
    assert not marker.exists() and str(evil) in message and "it would call io.open" in message
    (tmp_path / "c").mkdir()
    torch.save({**good, "optimizer": RunsCode(marker)}, tmp_path / "c" / "ckpt.pt")
    message = fails(["--resume", "--out", str(tmp_path / "c"), *QUICK], capsys)
    assert not marker.exists() and str(tmp_path / "c" / "ckpt.pt") in message


def test_checkpoints_hold_plain_data_only(tmp_path):
    ck = torch.load(trained(tmp_path), weights_only=True)  # raises if anything is not plain data

    def plain(x):
        if isinstance(x, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, (torch.Tensor, bool, int, float, str))
    assert plain(ck) and type(ck["args"]) is dict and type(ck["config"]) is dict
    assert ck["args"]["max_iters"] == 1 and ck["config"]["D"] == 32


def test_not_a_checkpoint_is_named(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    message = fails(["--init", str(junk), "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert str(junk) in message and "train.py" in message
    torch.save({"weights": torch.zeros(2)}, junk)  # plain data, but not a train.py checkpoint
    message = fails(["--init", str(junk), "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert str(junk) in message and "'model'" in message
    ck = torch.load(trained(tmp_path), weights_only=True)
    ck["model"] = {k: v[..., :1] for k, v in ck["model"].items()}  # weights of another shape
    torch.save(ck, junk)
    message = fails(["--init", str(junk), "--out", str(tmp_path / "o"), *QUICK], capsys)
    assert str(junk) in message and "do not fit" in message


def test_resume_without_a_checkpoint(tmp_path, capsys):
    message = fails(["--resume", "--out", str(tmp_path / "none"), *QUICK], capsys)
    assert "--resume" in message and str(tmp_path / "none" / "ckpt.pt") in message


def test_a_stale_tmp_of_an_interrupted_save_is_removed(tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")

    def killed(*a, **k):
        raise RuntimeError("killed")  # the run dies before it saves anything
    monkeypatch.setattr(train, "train_step", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train.main(["--max-iters", "2", "--out", str(out), *QUICK], **SMALL)
    assert not (out / "ckpt.pt.tmp").exists() and not (out / "ckpt.pt").exists()


# ------------------------------------------------------------------------ no silent substitution
def refuse_training(monkeypatch):
    """Any training step is a failure from here on: the arguments must be refused before (old code
    trained with the preset's values instead)."""
    def step(*a, **k):
        raise AssertionError("trained although the arguments should have been refused")
    monkeypatch.setattr(train, "train_step", step)


@pytest.fixture
def no_training(monkeypatch):
    refuse_training(monkeypatch)


@pytest.mark.parametrize("flag", ["--batch-size", "--frames", "--max-iters", "--log-every",
                                  "--ckpt-every", "--bench-iters"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_non_positive_counts_are_refused(tmp_path, capsys, no_training, flag, value):
    argv = ["--out", str(tmp_path), *QUICK]
    argv += [flag, value]  # (the last of a repeated flag counts)
    message = fails(argv, capsys)
    assert message == f"error: {flag} {value}: must be a positive number"


@pytest.mark.parametrize("argv, says", [(["--size", "30"], "--size 30: the frame size must be a "
                                         "positive multiple of 8"),
                                        (["--size", "0"], "--size 0: the frame size"),
                                        (["--lr", "0"], "--lr 0.0: the learning rate"),
                                        (["--lr", "nan"], "--lr nan: the learning rate"),
                                        (["--time-limit", "-1"], "--time-limit -1.0: minutes"),
                                        (["--threads", "-1"], "--threads -1: must be >= 0"),
                                        (["--history-gaps", "-2"],
                                         "--history-gaps -2: must be >= 0")])
def test_bad_values_are_refused(tmp_path, capsys, no_training, argv, says):
    message = fails(["--out", str(tmp_path), *QUICK, *argv], capsys)
    assert message.startswith(f"error: {says}")


def test_history_gaps_reach_the_training_batches(tmp_path, monkeypatch):
    """--history-gaps K trains on preprocess(..., gap=K): the flag is not dropped on the way."""
    seen = []
    plain = train.preprocess

    def spy(clips, cfg, generator, **kw):
        seen.append(kw.get("gap", 0))
        return plain(clips, cfg, generator, **kw)
    monkeypatch.setattr(train, "preprocess", spy)
    trained(tmp_path, "gaps", ["--history-gaps", "3"])
    trained(tmp_path, "plain")
    assert seen == [3, 0]


def test_size_is_recorded_in_the_checkpoint(tmp_path):
    ck = torch.load(trained(tmp_path), weights_only=True)  # QUICK trains at --size 32
    assert ck["config"]["image_size"] == 32 and ck["args"]["size"] == 32


def test_a_checkpoint_of_another_preset_is_refused(tmp_path, capsys, monkeypatch):
    tiny = trained(tmp_path)
    refuse_training(monkeypatch)
    message = fails(["--preset", "paper", "--stage", "2", "--init", str(tiny), "--out",
                     str(tmp_path / "p"), *QUICK], capsys)
    assert str(tiny) in message and "--preset tiny" in message


def test_data_with_classes_gets_its_class_head_recorded(tmp_path, capsys):
    stage1 = trained(tmp_path)
    heads = torch.load(stage1, weights_only=True)["config"]["class_heads"]
    assert [name for name, _ in heads] == ["synthetic"]
    data.write_synthetic("ytvis", tmp_path / "vis", num_videos=2, T=3, size=32)
    spec = f"ytvis19:{tmp_path / 'vis' / 'instances.json'}:{tmp_path / 'vis' / 'JPEGImages'}"
    out = tmp_path / "s2"
    assert train.main(["--stage", "2", "--init", str(stage1), "--data", spec, "--frames", "2",
                       "--max-iters", "1", "--out", str(out), *QUICK]) == 0
    assert "added one (40 classes + no object" in capsys.readouterr().out
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ("ytvis19", 40) in [tuple(h) for h in ck["config"]["class_heads"]]
    assert ck["model"]["pixel_decoder.cls.ytvis19.weight"].shape[0] == 41
    old = torch.load(stage1, weights_only=True)["model"]
    assert torch.equal(ck["model"]["pixel_decoder.cls.synthetic.weight"],
                       old["pixel_decoder.cls.synthetic.weight"])  # (not trained on ytvis19 clips)


# ------------------------------------------------------------------------ bad datasets: one line
def davis_set(tmp_path):
    data.write_synthetic("davis", tmp_path / "davis", num_videos=1, T=3, size=32, split="train")
    return tmp_path / "davis"


def vis_set(tmp_path, segmentations=None):
    """A YouTube-VIS set; segmentations: what every annotation gets instead of its own."""
    root = tmp_path / "vis"
    data.write_synthetic("ytvis", root, num_videos=1, T=3, size=32)
    js = root / "instances.json"
    d = json.loads(js.read_text())
    for a in d["annotations"]:
        a["segmentations"] = segmentations
    js.write_text(json.dumps(d))
    return f"ytvis19:{js}:{root / 'JPEGImages'}", js


def train_on(spec, tmp_path, capsys):
    return fails(["--data", spec, "--max-iters", "1", "--out", str(tmp_path / "o"), *QUICK], capsys)


def test_davis_without_annotations(tmp_path, capsys):
    root = davis_set(tmp_path)
    shutil.rmtree(root / "Annotations")
    message = train_on(f"davis:{root}", tmp_path, capsys)
    assert str(root / "Annotations" / "480p") in message and "not found" in message


def test_davis_frame_without_its_png(tmp_path, capsys):
    root = davis_set(tmp_path)
    png = next((root / "Annotations/480p").rglob("00001.png"))
    png.unlink()
    message = train_on(f"davis:{root}", tmp_path, capsys)
    assert "frame 00001.jpg has no mask" in message and str(png) in message


def test_davis_mask_of_another_size(tmp_path, capsys):
    root = davis_set(tmp_path)
    for png in (root / "Annotations/480p").rglob("*.png"):
        data.write_palette_png(png, np.zeros((32, 31), np.uint8))
    message = train_on(f"davis:{root}", tmp_path, capsys)
    assert ".png: mask is 31x32 (w x h) but its frame is 32x32" in message


def test_vis_segmentations_null(tmp_path, capsys):
    spec, js = vis_set(tmp_path, None)
    message = train_on(spec, tmp_path, capsys)
    assert str(js) in message and "'segmentations': null" in message


def test_vis_rle_runs_past_the_image(tmp_path, capsys):
    spec, js = vis_set(tmp_path, [{"size": [32, 32], "counts": [0, 2000]}] * 3)
    message = train_on(spec, tmp_path, capsys)
    assert str(js) in message and "RLE runs cover 2000 pixels" in message


def test_vis_two_point_polygons(tmp_path, capsys):
    spec, js = vis_set(tmp_path, [[[4, 4, 20, 20]]] * 3)
    message = train_on(spec, tmp_path, capsys)
    assert str(js) in message and "no polygon has >= 3 (x, y) pairs" in message


def test_json_that_is_not_an_object_and_unknown_specs(tmp_path, capsys):
    spec, js = vis_set(tmp_path)
    js.write_text("[]")
    assert "expected a JSON object" in train_on(spec, tmp_path, capsys)
    assert "unknown dataset spec 'kitti:x'" in train_on("kitti:x", tmp_path, capsys)
    missing = tmp_path / "nowhere"
    assert f"davis:{missing}" in train_on(f"davis:{missing}", tmp_path, capsys)


def test_the_command_line_prints_one_line_and_no_traceback(tmp_path):
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "train.py", "--size", "30", "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stdout == ""
    want = "error: --size 30: the frame size must be a positive multiple of 8 (e.g. 64 or 128)"
    assert res.stderr.splitlines() == [want]


# ------------------------------------------------------------------------ --average
def test_average_refuses_what_it_cannot_average(tmp_path, capsys):
    a = trained(tmp_path, "a")
    b = trained(tmp_path, "b", ["--seed", "1"])
    wide = tmp_path / "wide" / "ckpt.pt"  # another model: D = 48
    argv = ["--max-iters", "1", "--out", str(wide.parent), *QUICK]
    assert train.main(argv, **{**SMALL, "D": 48}) == 0
    soup = ["--out", str(tmp_path / "soup")]
    message = fails(["--average", str(a), *soup], capsys)
    assert "two or more" in message
    message = fails(["--average", str(a), str(tmp_path / "none.pt"), *soup], capsys)
    assert "--average" in message and str(tmp_path / "none.pt") in message
    message = fails(["--average", str(a), str(b), "--out", str(tmp_path / "a")], capsys)
    assert "--out" in message and "another --out" in message
    message = fails(["--average", str(a), str(b), "--init", str(a), *soup], capsys)
    assert "--init" in message
    message = fails(["--average", str(a), str(wide), *soup], capsys)
    assert str(wide) in message and "Config differs" in message and "'D'" in message
    assert not (tmp_path / "soup" / "ckpt.pt").exists()
    assert train.main(["--average", str(a), str(b), *soup, "--no-eval"]) == 0
    message = fails(["--resume", *soup, *QUICK], capsys)
    assert "--init" in message and "no optimizer" in message
