"""data.py with frames and masks as people really have them (issue 13.4): frames numbered without
zero padding, binary masks saved as grayscale PNGs (DAVIS 2016 style 0/255) or 1-bit PNGs, masks of
another size than their frame. Each test writes its own files."""
import numpy as np
import pytest
import torch
from PIL import Image

import data

S = 32


def write_frame(path, t):
    """A flat frame whose red level says which frame it is (10 + 20 t)."""
    img = np.full((S, S, 3), 60, np.uint8)
    img[..., 0] = 10 + 20 * t
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=98)


def frame_index(frame):
    return int(round((frame[0, 0, 0].item() * 255 - 10) / 20))


def box():
    m = np.zeros((S, S), bool)
    m[8:20, 4:16] = True
    return m


def write_davis(root, names, mask_of):
    """A DAVIS-layout sequence "v" with frames <name>.jpg and masks <name>.png = mask_of(t)."""
    for t, name in enumerate(names):
        write_frame(root / "JPEGImages/480p/v" / f"{name}.jpg", t)
        mask_of(t).save(root / "Annotations/480p/v" / f"{name}.png")
    return f"davis:{root}"


def grey(values):
    """An "L" PNG: the box has values[1], the rest values[0]."""
    m = np.where(box(), values[1], values[0]).astype(np.uint8)
    return Image.fromarray(m, mode="L")


@pytest.fixture
def annotations(tmp_path):
    (tmp_path / "Annotations/480p/v").mkdir(parents=True)
    return tmp_path


def test_unpadded_frame_numbers_are_read_in_natural_order(annotations):
    names = [f"frame{t}" for t in range(12)]  # frame0 .. frame11: text order puts frame10 first
    spec = write_davis(annotations, names, lambda t: grey((0, 255)))
    (clip,) = data.heldout(spec, n=1, T=None, size=S)
    assert [frame_index(f) for f in clip.frames] == list(range(12))
    shuffled = [annotations / "x10.jpg", annotations / "x2.jpg", annotations / "x1.jpg"]
    in_order = sorted(shuffled, key=data.natural_key)
    assert [p.name for p in in_order] == ["x1.jpg", "x2.jpg", "x10.jpg"]


@pytest.mark.parametrize("values", [(0, 255), (0, 1), (0, 38)])
def test_a_grayscale_binary_mask_is_object_1(annotations, values):
    spec = write_davis(annotations, ["00000", "00001"], lambda t: grey(values))
    ids = data.read_palette_png(annotations / "Annotations/480p/v/00000.png")
    np.testing.assert_array_equal(ids, box().astype(np.uint8))
    (clip,) = data.heldout(spec, n=1, T=None, size=S)
    assert clip.ids == [1] and torch.equal(clip.masks[0, 0], torch.from_numpy(box()))
    clip = next(data.train_stream(spec, stage=2, T=2, size=S))  # --data davis: trains on it
    assert clip.ids == [1] and clip.masks.any()


def test_a_1bit_mask_is_object_1(annotations):
    def one_bit(t):
        return Image.fromarray(box()).convert("1")
    spec = write_davis(annotations, ["00000", "00001"], one_bit)
    (clip,) = data.heldout(spec, n=1, T=None, size=S)
    assert clip.ids == [1] and torch.equal(clip.masks[0, 0], torch.from_numpy(box()))


def test_palette_and_multi_valued_masks_keep_their_ids(tmp_path):
    ids = np.where(box(), 255, 0).astype(np.uint8)
    ids[0, :] = 3
    data.write_palette_png(tmp_path / "p.png", ids)  # palette: 255 stays void, 3 stays 3
    np.testing.assert_array_equal(data.read_palette_png(tmp_path / "p.png"), ids)
    data.write_palette_png(tmp_path / "one.png", np.where(box(), 255, 0))
    assert set(np.unique(data.read_palette_png(tmp_path / "one.png"))) == {0, 255}
    Image.fromarray(ids, mode="L").save(tmp_path / "g.png")  # grayscale with several ids
    np.testing.assert_array_equal(data.read_palette_png(tmp_path / "g.png"), ids)


def test_a_mask_of_another_size_is_named_with_both_sizes(annotations):
    def narrow(t):
        return Image.fromarray(np.zeros((S, S - 1), np.uint8), mode="L")
    spec = write_davis(annotations, ["00000"], narrow)
    with pytest.raises(ValueError, match=r"v/00000\.png: mask is 31x32 \(w x h\) but its frame is "
                                         r"32x32"):
        data.heldout(spec, n=1, T=None, size=S)
