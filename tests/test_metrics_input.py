"""Metrics refuse input they cannot score (issue 13 item 2): each test writes its own bad file(s)
and checks the one-line message that `infer.py --eval` stops with, which names the video, sequence
or result and says what to fix. Good input around each bad case keeps the rest valid."""
import json
import math

import numpy as np
import pytest

import data
import infer

SQUARE = np.zeros((4, 4), bool)
SQUARE[1:3, 1:3] = True
RLE = data.rle_encode(SQUARE)                   # {"size": [4, 4], "counts": ...}


def cli_error(*argv):
    """Run infer.main(argv), expect it to stop with one line 'error: ...', return that line."""
    with pytest.raises(SystemExit) as e:
        infer.main(list(argv))
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------- --eval ytvis
def ground_truth():
    """One 4x4 video of 2 frames, categories 1 and 2, one annotated object of category 1."""
    return {"videos": [{"id": 1, "height": 4, "width": 4, "length": 2}],
            "categories": [{"id": 1}, {"id": 2}],
            "annotations": [{"id": 1, "video_id": 1, "category_id": 1, "iscrowd": 0,
                             "segmentations": [RLE, RLE]}]}


def result(**changes):
    good = {"video_id": 1, "category_id": 1, "score": 0.9, "segmentations": [RLE, RLE]}
    good.update(changes)
    return good


def ytvis_error(tmp_path, results, gt=None, results_text=None):
    """Write results (or raw text) and the ground truth, run --eval ytvis, return its error line."""
    (tmp_path / "gt.json").write_text(json.dumps(gt if gt is not None else ground_truth()))
    text = results_text if results_text is not None else json.dumps(results)
    (tmp_path / "results.json").write_text(text)
    return cli_error("--eval", "ytvis", "--pred", str(tmp_path / "results.json"),
                     "--gt", str(tmp_path / "gt.json"))


def test_good_results_still_score_one(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(ground_truth()))
    (tmp_path / "results.json").write_text(json.dumps([result()]))
    s = infer.main(["--eval", "ytvis", "--pred", str(tmp_path / "results.json"),
                    "--gt", str(tmp_path / "gt.json")])
    assert s["AP"] == pytest.approx(1.0)


def test_results_not_a_list(tmp_path):
    message = ytvis_error(tmp_path, {"video_id": 1})
    expected = "results: expected a JSON list of {video_id, category_id, score, segmentations}"
    assert expected in message
    assert "got a dict" in message


def test_result_not_an_object_or_missing_keys(tmp_path):
    message = ytvis_error(tmp_path, [result(), 3])
    assert "results[1]: needs 'video_id', 'category_id', 'score'" in message
    no_score = result()
    del no_score["score"]
    message = ytvis_error(tmp_path, [no_score])
    assert "results[0]: needs 'video_id', 'category_id', 'score'" in message


@pytest.mark.parametrize("score, shown", [(math.nan, "nan"), (math.inf, "inf"), (None, "None"),
                                          ("0.9", "'0.9'"), (True, "True")])
def test_score_must_be_a_finite_number(tmp_path, score, shown):
    message = ytvis_error(tmp_path, [result(), result(score=score)])
    assert f"results[1] (video 1): score {shown} is not a finite number" in message


def test_video_not_in_ground_truth(tmp_path):
    message = ytvis_error(tmp_path, [result(video_id=7)])
    assert "results[0]: video_id 7 is not a ground-truth video (ids 1)" in message


def test_unknown_category_is_refused_not_skipped(tmp_path):
    message = ytvis_error(tmp_path, [result(), result(category_id=0)])
    expected = "results[1] (video 1): category_id 0 is not a ground-truth category (ids 1, 2)"
    assert expected in message


def test_one_segmentation_per_frame(tmp_path):
    message = ytvis_error(tmp_path, [result(segmentations=[RLE, RLE, None])])
    assert "results[0] (video 1): 3 segmentations; the ground truth has 2 frames" in message
    message = ytvis_error(tmp_path, [result(segmentations=RLE)])
    assert "results[0] (video 1): dict segmentations; the ground truth has 2 frames" in message


def test_result_polygons_are_refused(tmp_path):
    message = ytvis_error(tmp_path, [result(segmentations=[[[1, 1, 3, 1, 3, 3]], None])])
    expected = "results[0] (video 1) frame 0: a segmentation must be an RLE or null; got list"
    assert expected in message


def test_rle_size_must_be_the_videos(tmp_path):
    # a [1, 4] RLE broadcasts against the 4x4 video: without the check its IoU exceeds 1
    thin = data.rle_encode(np.ones((1, 4), bool))
    message = ytvis_error(tmp_path, [result(segmentations=[RLE, thin])])
    assert "results[0] (video 1) frame 1: RLE size [1, 4] but the video is [4, 4]" in message


def test_rle_runs_past_the_image(tmp_path):
    corrupt = {"size": [4, 4], "counts": [3, 20]}
    message = ytvis_error(tmp_path, [result(segmentations=[corrupt, None])])
    expected = "results[0] (video 1) frame 0: RLE runs (sum 23, smallest 3) do not fit its 4x4"
    assert expected in message


def test_results_file_is_not_json(tmp_path):
    message = ytvis_error(tmp_path, None, results_text="[{'video_id': 1}]")
    assert "--pred" in message and "results.json is not JSON" in message


def test_ground_truth_needs_its_keys(tmp_path):
    gt = ground_truth()
    del gt["categories"]
    assert "ground truth: expected a JSON object with lists 'videos', 'categories' " \
        in ytvis_error(tmp_path, [result()], gt=gt)
    gt = ground_truth()
    del gt["videos"][0]["height"]
    assert "ground truth videos[0]: needs integers 'id', 'height', 'width'" \
        in ytvis_error(tmp_path, [result()], gt=gt)
    gt = ground_truth()
    del gt["videos"][0]["length"]
    assert "ground truth videos[0]: needs 'length' or 'file_names'" \
        in ytvis_error(tmp_path, [result()], gt=gt)


def test_ground_truth_annotations_are_checked(tmp_path):
    gt = ground_truth()
    gt["annotations"][0]["category_id"] = 3
    assert "ground truth annotations[0] (video 1): category_id 3 is not a ground-truth category" \
        in ytvis_error(tmp_path, [result()], gt=gt)
    gt = ground_truth()
    gt["annotations"][0]["segmentations"][1] = {"size": [8, 8], "counts": [64]}
    message = ytvis_error(tmp_path, [result()], gt=gt)
    expected = "ground truth annotations[0] (video 1) frame 1: RLE size [8, 8] but the video is"
    assert f"{expected} [4, 4]" in message


# ---------------------------------------------------------------------------- --eval davis
def write_sequence(folder, frames, first=0, last=None):
    """Palette PNGs folder/00000.png ... of (T, H, W) ids frames[first:last]."""
    for t, ids in enumerate(frames):
        if first <= t < (len(frames) if last is None else last):
            data.write_palette_png(folder / f"{t:05d}.png", ids)


def davis_tree(tmp_path, names=("a", "b")):
    """Ground truth and a perfect prediction (scored frames only) of 4-frame 8x8 sequences."""
    ids = np.zeros((4, 8, 8), np.uint8)
    ids[:, 2:5, 2:5] = 1
    for name in names:
        write_sequence(tmp_path / "gt" / name, ids)
        write_sequence(tmp_path / "pred" / name, ids, first=1, last=3)
    return ids


def davis(tmp_path, gt="gt"):
    return ["--eval", "davis", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / gt)]


def test_davis_sequence_missing_from_pred(tmp_path):
    davis_tree(tmp_path)
    for f in (tmp_path / "pred" / "b").iterdir():
        f.unlink()
    (tmp_path / "pred" / "b").rmdir()
    message = cli_error(*davis(tmp_path))
    assert "sequence b:" in message
    assert "is missing; --pred needs a folder for each of the 2 ground-truth sequences" in message


def test_davis_scored_frame_missing(tmp_path):
    davis_tree(tmp_path)
    (tmp_path / "pred" / "b" / "00002.png").unlink()
    message = cli_error(*davis(tmp_path))
    assert "sequence b:" in message
    assert "00002.png is missing; --pred needs a PNG for every ground-truth frame" in message


def test_davis_prediction_of_another_size(tmp_path):
    davis_tree(tmp_path)
    data.write_palette_png(tmp_path / "pred" / "a" / "00001.png", np.zeros((8, 6), np.uint8))
    message = cli_error(*davis(tmp_path))
    assert "sequence a:" in message and "00001.png is 8x6 (height x width) but" in message
    assert "00001.png is 8x8; masks must have the ground truth's size" in message


def test_davis_extra_prediction_folder_is_a_warning(tmp_path, capsys):
    ids = davis_tree(tmp_path)
    write_sequence(tmp_path / "pred" / "zebra", ids)
    s = infer.main(davis(tmp_path))
    assert s["J&F-Mean"] == pytest.approx(1.0) and len(s["objects"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("warning: --pred has 1 folder(s) that are not ground-truth sequences, "
                   "not scored: zebra")


def test_davis_root_scores_the_val_list(tmp_path, capsys):
    ids = np.zeros((4, 8, 8), np.uint8)
    ids[:, 2:5, 2:5] = 1
    for name in ("a", "b"):                     # b is a training sequence: not in val.txt
        write_sequence(tmp_path / "DAVIS" / "Annotations" / "480p" / name, ids)
    (tmp_path / "DAVIS" / "ImageSets" / "2017").mkdir(parents=True)
    (tmp_path / "DAVIS" / "ImageSets" / "2017" / "val.txt").write_text("a\n")
    write_sequence(tmp_path / "pred" / "a", ids, first=1, last=3)
    for gt in ("DAVIS", "DAVIS/Annotations/480p"):
        s = infer.main(davis(tmp_path, gt))
        assert [o[0] for o in s["objects"]] == ["a_1"]
    (tmp_path / "DAVIS" / "ImageSets" / "2017" / "val.txt").write_text("a\nc\n")
    assert "sequence c:" in cli_error(*davis(tmp_path, "DAVIS"))


def test_davis_missing_folders(tmp_path):
    davis_tree(tmp_path)
    message = cli_error(*davis(tmp_path, "nope"))
    assert "--gt" in message and "nope is not a folder" in message
    message = cli_error("--eval", "davis", "--pred", str(tmp_path / "nope"),
                        "--gt", str(tmp_path / "gt"))
    assert "--pred" in message and "is not a folder" in message


def test_davis_relative_gt_reads_no_val_list_from_the_working_directory(tmp_path, monkeypatch):
    davis_tree(tmp_path)                        # gt/a, gt/b: a plain folder, both sequences scored
    (tmp_path / "ImageSets" / "2017").mkdir(parents=True)
    (tmp_path / "ImageSets" / "2017" / "val.txt").write_text("a\n")   # beside gt, not above it
    monkeypatch.chdir(tmp_path)
    s = infer.main(["--eval", "davis", "--pred", "pred", "--gt", "gt"])
    assert [o[0] for o in s["objects"]] == ["a_1", "b_1"]
