"""Tests for train.py: matcher vs brute force, preprocess invariants, losses with known optima, the
parallel == iterative equivalence, overfitting, resume, NaN, frozen backbone, and a 2-process DDP run."""
import itertools

import numpy as np
import pytest
import torch

import train


def brute_force(C):
    n, m = C.shape
    best = np.inf
    if n <= m:
        for cols in itertools.permutations(range(m), n):
            best = min(best, C[np.arange(n), list(cols)].sum())
    else:
        for rows in itertools.permutations(range(n), m):
            best = min(best, C[list(rows), np.arange(m)].sum())
    return best


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 5), (6, 6), (2, 5), (5, 2), (3, 6), (6, 4), (1, 4), (4, 1)])
def test_hungarian_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for trial in range(20):
        C = rng.normal(size=shape)
        if trial % 2:  # ties: few distinct values
            C = rng.integers(0, 3, size=shape).astype(float)
        rows, cols = train.hungarian(C)
        k = min(shape)
        assert len(rows) == len(cols) == k
        assert len(set(rows.tolist())) == k and len(set(cols.tolist())) == k
        assert np.all(np.diff(rows) > 0)
        assert C[rows, cols].sum() == pytest.approx(brute_force(C), abs=1e-9)


def test_hungarian_rejects_bad_input():
    with pytest.raises(ValueError):
        train.hungarian(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError):
        train.hungarian(np.zeros(3))
    r, c = train.hungarian(np.zeros((0, 3)))
    assert len(r) == len(c) == 0


# ----------------------------------------------------------------------------- preprocess
try:
    from data import Clip
except ImportError:  # data.py not there yet: the contract's dataclass
    from dataclasses import dataclass

    @dataclass
    class Clip:
        frames: torch.Tensor
        masks: torch.Tensor
        labels: torch.Tensor
        ids: list
        dataset: str
        name: str


class Cfg:
    N_id = 16


def random_clip(g, n, T=5, H=16, W=16, dataset="synthetic", line=True):
    """n objects, each on its own 4x4-aligned block, visible in a random run of frames (some never)."""
    masks = torch.zeros(n, T, H, W, dtype=torch.bool)
    for i in range(n):
        a = int(torch.randint(T, (1,), generator=g))
        b = int(torch.randint(a, T + 1, (1,), generator=g))
        r, c = 4 * int(torch.randint(H // 4, (1,), generator=g)), 4 * int(torch.randint(W // 4, (1,), generator=g))
        masks[i, a:b, r:r + 4, c:c + 4] = True
        if line:
            masks[i, a:b, r, :] = True  # and a thin line, so downsampled targets are soft somewhere
    return Clip(torch.rand(T, 3, H, W, generator=g), masks, torch.randint(0, 6, (n,), generator=g),
                list(range(1, n + 1)), dataset, f"clip{n}")


def test_preprocess_invariants():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        clips = [random_clip(g, n) for n in (3, 0, 5)]
        batch = train.preprocess(clips, Cfg, g)
        T, N = 5, 5
        ids, trk, det, vis, hist = batch["ids"], batch["tracked"], batch["det"], batch["visible"], batch["history"]
        assert ids.shape == (3, N) and trk.shape == det.shape == vis.shape == (3, T, N)
        assert hist.shape == (3, T, N, 16, 16) and batch["targets"].shape == (3, T, N, 4, 4)
        for b, c in enumerate(clips):
            n = c.masks.shape[0]
            # |A| = |M|: one distinct ID row per ground-truth instance, padding slots -1
            assert len(set(ids[b, :n].tolist())) == n and (ids[b, :n] >= 0).all() and (ids[b, n:] == -1).all()
            assert not trk[b, :, n:].any() and not det[b, :, n:].any()
            for i in range(n):
                seen = [t for t in range(T) if c.masks[i, t].any()]
                for t in range(T):  # tensor index t = paper step t + 1
                    assert not (trk[b, t, i] and det[b, t, i])  # a tracked instance is never a detection target
                    assert vis[b, t, i] == bool(c.masks[i, t].any())
                    if vis[b, t, i]:
                        assert trk[b, t, i] or det[b, t, i]  # together they cover every visible instance
                    if t and trk[b, t - 1, i]:
                        assert trk[b, t, i]  # tracked objects are never removed
                    want = c.masks[i, max(t - 1, 0)].float() if trk[b, t, i] else torch.zeros(16, 16)
                    assert torch.equal(hist[b, t, i], want)  # history = ground truth y_{t-1} (y_1 for the prompt)
                if trk[b, 0, i]:
                    assert seen and seen[0] == 0  # a prompt only for an object visible in frame 1
                elif seen:
                    assert not trk[b, seen[0], i]  # never tracked before it was first detected
                    assert det[b, seen[0], i]
                else:
                    assert not trk[b, :, i].any()
            pooled = c.masks.float().view(-1, T, 4, 4, 4, 4).mean((3, 5)).transpose(0, 1)  # (T, n, 4, 4)
            assert torch.allclose(batch["targets"][b, :, :n], pooled)


def test_preprocess_switch_distribution():
    """t_i uniform over visible frames; prompts (t_i = 0) on 1/4 of the synthetic objects in frame 1, never on YTVIS."""
    g = torch.Generator().manual_seed(1)
    T = 4
    masks = torch.zeros(1, T, 8, 8, dtype=torch.bool)
    masks[0, :, :4, :4] = True  # visible everywhere
    counts = {"synthetic": torch.zeros(T + 1), "ytvis19": torch.zeros(T + 1)}
    for ds in counts:
        clip = Clip(torch.rand(T, 3, 8, 8), masks, torch.tensor([2]), [1], ds, "x")
        for _ in range(4):
            counts[ds] += torch.bincount(train.preprocess([clip] * 500, Cfg, g)["switch"][:, 0], minlength=T + 1)
    assert counts["ytvis19"][0] == 0
    assert torch.allclose(counts["ytvis19"][1:] / 2000, torch.full((T,), 0.25), atol=0.04)
    assert abs(counts["synthetic"][0] / 2000 - 0.25) < 0.04
    assert torch.allclose(counts["synthetic"][1:] / 2000, torch.full((T,), 0.75 / T), atol=0.04)


def test_preprocess_rejects_mismatched_clips():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="frames"):
        train.preprocess([random_clip(g, 2, T=3), random_clip(g, 2, T=4)], Cfg, g)
    with pytest.raises(ValueError, match="ID buffer"):
        train.preprocess([random_clip(g, 17)], Cfg, g)


# ----------------------------------------------------------------------------- criterion
def make_batch(seed=0, dataset="synthetic", line=False):
    g = torch.Generator().manual_seed(seed)
    clips = [random_clip(g, n, T=4, dataset=dataset, line=line) for n in (3, 4)]
    for _ in range(100):  # until there are both tracking and detection targets
        batch = train.preprocess(clips, Cfg, g)
        if (batch["tracked"] & batch["visible"]).any() and batch["det"].any():
            return batch
    raise AssertionError("no usable batch")


def make_out(batch, P=2, Nd=5, K=6, perfect=True, L=20.0, seed=0):
    """Random logits; perfect=True overwrites every supervised query with the right answer."""
    g = torch.Generator().manual_seed(seed)
    tgt, trk, vis, det, lab = batch["targets"], batch["tracked"], batch["visible"], batch["det"], batch["labels"]
    B, T, N, h, w = tgt.shape
    Q = N + Nd
    fg, cls = torch.randn(P, B, T, Q, generator=g), torch.randn(P, B, T, Q, K + 1, generator=g)
    masks = 3 * torch.randn(P, B, T, Q, h, w, generator=g)
    if not perfect:
        return {"fg": fg, "cls": cls, "masks": masks}

    def put(b, t, q, n):  # query q predicts instance n (n = None: no object)
        fg[:, b, t, q] = L if n is not None else -L
        cls[:, b, t, q] = 0
        cls[:, b, t, q, K if n is None else lab[b, n]] = L
        if n is not None:
            masks[:, b, t, q] = L * (2 * tgt[b, t, n] - 1)
    for b in range(B):
        for t in range(T):
            for i in range(N):
                if trk[b, t, i]:
                    put(b, t, i, i if vis[b, t, i] else None)  # absent: no object, garbage mask
            targets = det[b, t].nonzero()[:, 0].tolist()[::-1]  # any order: matching finds it
            for j in range(Nd):
                put(b, t, N + j, targets[j] if j < len(targets) else None)
    return {"fg": fg, "cls": cls, "masks": masks}


def test_criterion_perfect_prediction_is_near_zero():
    batch = make_batch()
    loss, parts = train.criterion(make_out(batch), batch)
    assert loss.item() < 1e-4 and set(parts) == {"trk_cls", "trk_bce", "trk_dice", "det_cls", "det_bce", "det_dice"}
    loss_rand, _ = train.criterion(make_out(batch, perfect=False), batch)
    assert loss_rand.item() > 10


def test_criterion_zero_logits_hand_computed():
    """All logits 0: CE = log 2 (+ log(K+1) with classes), BCE = log 2, Dice = 1 - (|g| + 1) / (hw/2 + |g| + 1)."""
    batch = make_batch(seed=3, line=True)
    P, K = 3, 6
    tgt, trk, vis, det = batch["targets"], batch["tracked"], batch["visible"], batch["det"]
    B, T, N, h, w = tgt.shape
    for cls in (True, False):
        out = {"fg": torch.zeros(P, B, T, N + 5), "cls": torch.zeros(P, B, T, N + 5, K + 1) if cls else None,
               "masks": torch.zeros(P, B, T, N + 5, h, w)}
        loss, parts = train.criterion(out, batch)
        ce = math_log(2) + (math_log(K + 1) if cls else 0)
        dice = lambda sel: np.mean([1 - (tgt[b, t, n].sum().item() + 1) / (h * w / 2 + tgt[b, t, n].sum().item() + 1)
                                    for b, t, n in sel.nonzero().tolist()])
        want = {"trk_cls": 2 * ce, "trk_bce": 5 * math_log(2), "trk_dice": 5 * dice(trk & vis),
                "det_cls": 2 * ce, "det_bce": 5 * math_log(2), "det_dice": 5 * dice(det)}
        for k in want:
            assert parts[k] == pytest.approx(P * want[k], rel=1e-5), k
        assert loss.item() == pytest.approx(P * sum(want.values()), rel=1e-5)


def math_log(x):
    return float(np.log(x))


def test_criterion_detection_order_does_not_matter_and_deep_supervision_sums():
    batch = make_batch(seed=1)
    N = batch["ids"].shape[1]
    out = make_out(batch, perfect=False, seed=2)
    perm = torch.cat([torch.arange(N), N + torch.randperm(5, generator=torch.Generator().manual_seed(0))])
    swapped = {"fg": out["fg"][..., perm], "cls": out["cls"][..., perm, :], "masks": out["masks"][..., perm, :, :]}
    loss, _ = train.criterion(out, batch)
    loss_swapped, _ = train.criterion(swapped, batch)
    assert loss_swapped.item() == pytest.approx(loss.item(), rel=1e-6)
    per_p = [train.criterion({k: v[p:p + 1] for k, v in out.items()}, batch)[0].item() for p in range(2)]
    assert loss.item() == pytest.approx(sum(per_p), rel=1e-6)
    # the tracking loss uses the fixed mapping: swapping two tracking queries changes the loss
    perm = torch.cat([torch.tensor([1, 0]), torch.arange(2, N + 5)])
    loss_trk_swapped, _ = train.criterion({k: v[:, :, :, perm] for k, v in out.items()}, batch)
    assert abs(loss_trk_swapped.item() - loss.item()) > 1e-3


# ----------------------------------------------------------------------------- the model, both forms
def small_cfg(**kw):
    import ausm
    base = dict(image_size=32, D=32, N_det=6, N_id=16, L_c=1, L_h=1, L_p=2, heads=2, ffn=64, width=16)
    base.update(kw)
    return ausm.Config.tiny(**base)


def test_parallel_and_iterative_give_the_same_loss_and_gradients():
    import ausm
    torch.manual_seed(0)
    cfg = small_cfg()
    model = ausm.AUSM(cfg)
    g = torch.Generator().manual_seed(4)
    batch = train.preprocess([random_clip(g, n, T=4, H=32, W=32) for n in (2, 3)], cfg, g)
    assert batch["tracked"].any() and batch["det"].any()
    grads, losses = [], []
    for iterative in (False, True):
        model.zero_grad()
        loss, _ = train.criterion(train.forward(model, batch, iterative), batch)
        loss.backward()
        losses.append(loss.item())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and "X_0" in grads[1] and "B" in grads[1]
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)
