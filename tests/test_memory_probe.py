"""tests/memory_probe.py (issue 17's measurement of the model's memory) on a small random model: the
gaps fall where the probe says they do."""
import numpy as np
import pytest
import torch

import ausm
import data
import memory_probe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ausm.Config.tiny(image_size=64, D=32, N_det=4, L_c=1, L_h=1, L_p=1, heads=2, ffn=64,
                           width=16)
    return ausm.AUSM(cfg).eval()


@pytest.fixture(scope="module")
def clips():
    return data.heldout("synthetic", 3, 16, 64)


def test_the_id_signal_is_whole_on_the_last_painted_frame_and_less_after(model, clips):
    """k = 0 is the last painted step: the gapped run equals the always-painted one there (ratio
    1); from k = 1 the paint is gone, so the ratio is below 1. A gap that started one frame early
    (the off-by-one the history's shift invites) would give a ratio below 1 at k = 0."""
    kept = memory_probe.memory_signal(model, clips, 3)  # (4,)
    assert kept[0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(kept[1:] < 0.999)


def test_the_painted_probe_is_teacher_forcing(model, clips):
    """Painted, the probe's masks are the teacher-forced forward on the ground-truth history."""
    clip = clips[0]
    T, N = len(clip.frames), clip.masks.shape[0]
    none = torch.zeros(T, N, dtype=torch.bool)
    unpainted = none.clone()
    unpainted[5:, 0] = True
    plain = memory_probe.teacher_forced_masks(model, clip, none)  # (T, N, H, W)
    gapped = memory_probe.teacher_forced_masks(model, clip, unpainted)  # (T, N, H, W)
    assert torch.equal(plain[:6], gapped[:6])  # steps 0..5 show frames up to 4: unchanged
