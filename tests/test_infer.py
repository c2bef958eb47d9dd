"""Tests for infer.py's metrics: golden files from davis2017-evaluation and the YouTube-VIS cocoapi fork."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import infer

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"


def load_golden(name):
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"golden file {path} is missing: the metrics tests need ../shared/golden/ beside the repo")
    return json.loads(path.read_text())


def davis_labels(seq, who):
    """(T, H, W) id maps of a golden sequence, from digit rows or from rectangles."""
    if f"{who}_label_rows" in seq:
        return np.array([[[int(c) for c in row] for row in frame] for frame in seq[f"{who}_label_rows"]])
    out = np.zeros((seq["T"], seq["h"], seq["w"]), np.uint8)
    for t, rects in enumerate(seq[f"{who}_rects_id_y0y1x0x1"]):
        for obj, y0, y1, x0, x1 in rects:                       # later rectangles overwrite
            out[t, y0:y1, x0:x1] = obj
    return out


DAVIS = load_golden("davis_jf_golden.json") if (GOLDEN / "davis_jf_golden.json").exists() else {"sequences": []}


@pytest.mark.parametrize("seq", DAVIS["sequences"], ids=lambda s: s["name"])
def test_davis_golden_sequence(seq):
    gt, pred = davis_labels(seq, "gt"), davis_labels(seq, "pred")
    J, F = infer.davis_sequence(gt, pred)
    np.testing.assert_allclose(J, seq["J_per_object_per_frame"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(F, seq["F_per_object_per_frame"], rtol=0, atol=1e-6)
    np.testing.assert_allclose([infer.davis_statistics(j) for j in J], seq["per_object_stats_M_R_D"]["J"], atol=1e-6)
    np.testing.assert_allclose([infer.davis_statistics(f) for f in F], seq["per_object_stats_M_R_D"]["F"], atol=1e-6)


def test_davis_golden_global():
    golden = load_golden("davis_jf_golden.json")
    s = infer.davis_scores((q["name"], davis_labels(q, "gt"), davis_labels(q, "pred")) for q in golden["sequences"])
    for k, v in golden["global"].items():
        assert s[k] == pytest.approx(v, abs=1e-6), k


def test_davis_empty_cases():
    empty, box = np.zeros((6, 8), bool), np.zeros((6, 8), bool)
    box[2:4, 3:6] = True
    assert infer.davis_j(empty, empty) == 1 and infer.davis_f(empty, empty) == 1
    assert infer.davis_j(box, empty) == 0 and infer.davis_f(box, empty) == 0 and infer.davis_f(empty, box) == 0
    # a mask filling the frame has no boundary (the image border is not one), as in davis2017's _seg2bmap
    assert infer.davis_f(np.ones((6, 8), bool), empty) == 1


YTVIS = load_golden("ytvis_ap_golden.json") if (GOLDEN / "ytvis_ap_golden.json").exists() else {"cases": []}


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
        g = [a for a in case["gt"]["annotations"] if (a["video_id"], a["category_id"]) == (vid, cat)]
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
    assert s["AP"] == pytest.approx(1.0) and s["AP50"] == pytest.approx(1.0) and s["AR100"] == pytest.approx(1.0)


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
            if 0 < t < q["T"] - 1:                              # first and last frame are not needed
                write_palette(tmp_path / "pred" / q["name"] / f"{t:05d}.png", p)
    s = infer.main(["--eval", "davis", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")])
    out = capsys.readouterr().out
    assert "Global" in out and "small_a_2" in out and "big_480x854_rects_1" in out
    for k, v in golden["global"].items():
        assert s[k] == pytest.approx(v, abs=1e-6), k
    assert f"{golden['global']['J&F-Mean']:.4f}" in out.splitlines()[-1]


def test_cli_ytvis_matches_golden(tmp_path, capsys):
    case = YTVIS["cases"][1]
    (tmp_path / "gt.json").write_text(json.dumps(case["gt"]))
    (tmp_path / "results.json").write_text(json.dumps(case["results"]))
    s = infer.main(["--eval", "ytvis", "--pred", str(tmp_path / "results.json"), "--gt", str(tmp_path / "gt.json")])
    out = capsys.readouterr().out
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10"):
        assert s[k] == pytest.approx(case["stats"][k], abs=1e-6) and f"{k} " in out


def test_rle_examples_from_evaluation_md():
    box = np.zeros((4, 5), bool)
    box[1:3, 1:4] = True
    np.testing.assert_array_equal(infer._decode({"size": [4, 5], "counts": "5220003"}, 4, 5), box)
    np.testing.assert_array_equal(infer._decode({"size": [4, 5], "counts": [5, 2, 2, 2, 2, 2, 5]}, 4, 5), box)
    assert not infer._decode({"size": [3, 4], "counts": "<"}, 3, 4).any()
    assert infer._decode({"size": [3, 4], "counts": "0<"}, 3, 4).all()
    assert not infer._decode(None, 3, 4).any()


def test_ytvis_polygon_ground_truth_scores_one():
    # EVALUATION.md: the polygon [0,0, 4,0, 4,4, 0,4] fills pixels 0..3 on both axes; the same square as RLE
    square = {"size": [8, 8], "counts": [0, 4, 4, 4, 4, 4, 4, 4, 36]}
    gt = {"videos": [{"id": 1, "height": 8, "width": 8, "length": 2}], "categories": [{"id": 1}],
          "annotations": [{"id": 1, "video_id": 1, "category_id": 1, "iscrowd": 0,
                           "segmentations": [[[0, 0, 4, 0, 4, 4, 0, 4]], None]}]}
    s = infer.ytvis_ap(gt, [{"video_id": 1, "category_id": 1, "score": 0.9, "segmentations": [square, None]}])
    assert s["AP"] == pytest.approx(1.0) and s["APs"] == pytest.approx(1.0) and s["APl"] == -1
    with pytest.raises(ValueError, match="1 segmentations; the ground truth has 2 frames"):
        infer.ytvis_ap(gt, [{"video_id": 1, "category_id": 1, "score": 0.9, "segmentations": [square]}])


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
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "pred" / "seq" / "00001.png")   # RGB
    with pytest.raises(SystemExit, match="palette"):
        infer.main(["--eval", "davis", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")])
    with pytest.raises(SystemExit, match="00002.png"):
        write_palette(tmp_path / "pred" / "seq" / "00001.png", gt[1])
        infer.main(["--eval", "davis", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")])
