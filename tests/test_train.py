"""Tests for train.py: matcher vs brute force, preprocess invariants, losses with known optima, the
parallel == iterative equivalence, overfitting, resume, NaN, frozen backbone, and a 2-process DDP
run."""
import itertools
import math

import numpy as np
import pytest
import torch

import train

torch.set_num_threads(1)  # the shared 2-core box: 2 threads spin-wait much slower than 1


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


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 5), (6, 6),
                                   (2, 5), (5, 2), (3, 6), (6, 4), (1, 4), (4, 1)])
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
    """n objects, each on its own 4x4-aligned block, visible in a random run of frames (some
    never)."""
    masks = torch.zeros(n, T, H, W, dtype=torch.bool)
    for i in range(n):
        a = int(torch.randint(T, (1,), generator=g))
        b = int(torch.randint(a, T + 1, (1,), generator=g))
        r = 4 * int(torch.randint(H // 4, (1,), generator=g))
        c = 4 * int(torch.randint(W // 4, (1,), generator=g))
        masks[i, a:b, r:r + 4, c:c + 4] = True
        if line:
            masks[i, a:b, r, :] = True  # and a thin line, so downsampled targets are soft somewhere
    return Clip(torch.rand(T, 3, H, W, generator=g),
                masks,
                torch.randint(0, 6, (n,), generator=g),
                list(range(1, n + 1)),
                dataset,
                f"clip{n}")


def test_preprocess_invariants():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        clips = [random_clip(g, n) for n in (3, 0, 5)]
        batch = train.preprocess(clips, Cfg, g)
        T, N = 5, 5
        ids = batch["ids"]
        trk = batch["tracked"]
        det = batch["det"]
        vis = batch["visible"]
        hist = batch["history"]
        assert ids.shape == (3, N) and trk.shape == det.shape == vis.shape == (3, T, N)
        assert hist.shape == (3, T, N, 16, 16) and batch["targets"].shape == (3, T, N, 4, 4)
        for b, c in enumerate(clips):
            n = c.masks.shape[0]
            # |A| = |M|: one distinct ID row per ground-truth instance, padding slots -1
            assert len(set(ids[b, :n].tolist())) == n
            assert (ids[b, :n] >= 0).all() and (ids[b, n:] == -1).all()
            assert not trk[b, :, n:].any() and not det[b, :, n:].any()
            for i in range(n):
                seen = [t for t in range(T) if c.masks[i, t].any()]
                for t in range(T):  # tensor index t = paper step t + 1
                    # a tracked instance is never a detection target
                    assert not (trk[b, t, i] and det[b, t, i])
                    assert vis[b, t, i] == bool(c.masks[i, t].any())
                    if vis[b, t, i]:
                        # together they cover every visible instance
                        assert trk[b, t, i] or det[b, t, i]
                    if t and trk[b, t - 1, i]:
                        assert trk[b, t, i]  # tracked objects are never removed
                    if trk[b, t, i]:
                        want = c.masks[i, max(t - 1, 0)].float()
                    else:
                        want = torch.zeros(16, 16)
                    # history = ground truth y_{t-1} (y_1 for the prompt)
                    assert torch.equal(hist[b, t, i], want)
                if trk[b, 0, i]:
                    assert seen and seen[0] == 0  # a prompt only for an object visible in frame 1
                elif seen:
                    assert not trk[b, seen[0], i]  # never tracked before it was first detected
                    assert det[b, seen[0], i]
                else:
                    assert not trk[b, :, i].any()
            blocks = c.masks.float().view(-1, T, 4, 4, 4, 4)  # (n, T, 4, 4, 4, 4)
            pooled = blocks.mean((3, 5)).transpose(0, 1)  # (T, n, 4, 4)
            assert torch.allclose(batch["targets"][b, :, :n], pooled)


def test_preprocess_switch_distribution():
    """t_i uniform over visible frames; prompts (t_i = 0) on 1/4 of the synthetic objects in
    frame 1, never on YTVIS."""
    g = torch.Generator().manual_seed(1)
    T = 4
    masks = torch.zeros(1, T, 8, 8, dtype=torch.bool)
    masks[0, :, :4, :4] = True  # visible everywhere
    counts = {"synthetic": torch.zeros(T + 1), "ytvis19": torch.zeros(T + 1)}
    for ds in counts:
        clip = Clip(torch.rand(T, 3, 8, 8), masks, torch.tensor([2]), [1], ds, "x")
        for _ in range(4):
            switch = train.preprocess([clip] * 500, Cfg, g)["switch"]
            counts[ds] += torch.bincount(switch[:, 0], minlength=T + 1)
    assert counts["ytvis19"][0] == 0
    assert torch.allclose(counts["ytvis19"][1:] / 2000, torch.full((T,), 0.25), atol=0.04)
    assert abs(counts["synthetic"][0] / 2000 - 0.25) < 0.04
    assert torch.allclose(counts["synthetic"][1:] / 2000, torch.full((T,), 0.75 / T), atol=0.04)


def test_unpainted_gaps_start_after_a_return_and_after_a_lost_mask():
    """A return at frame 5 (absent 3-4): the history steps 6..4+k go unpainted, k in 1..gap, so
    the query searches frames 5..4+k without paint; nothing before step 6 changes. With p_lost = 1
    one more gap starts after a random visible, tracked frame."""
    g = torch.Generator().manual_seed(0)
    T = 10
    visible = torch.ones(1, T, 1, dtype=torch.bool)
    visible[0, 3:5] = False  # leaves after frame 2, back at frame 5
    tracked = torch.ones(1, T, 1, dtype=torch.bool)
    lengths = set()
    for _ in range(200):
        gaps = train.unpainted(visible, tracked, g, gap=4, p_lost=0.0)[0, :, 0]  # (T,)
        assert not gaps[:6].any()
        steps = gaps.nonzero()[:, 0].tolist()
        assert steps == list(range(6, 6 + len(steps)))  # one gap, right after the return
        lengths.add(len(steps))
    assert lengths == {0, 1, 2, 3}  # k = 1..4: k - 1 unpainted steps
    assert not train.unpainted(visible, tracked, g, gap=1, p_lost=0.0).any()  # teacher forcing
    starts = set()
    for _ in range(200):
        gaps = train.unpainted(visible, tracked, g, gap=2, p_lost=1.0)[0, :, 0]  # (T,)
        lost = [s for s in gaps.nonzero()[:, 0].tolist() if s != 6]
        starts.update(lost)
    assert starts == {1, 2, 3, 7, 8, 9}  # after visible frames 0-2 and 6-8 (5 -> 6: the return)


def test_history_gaps_unpaint_the_history_only():
    """gap > 0 removes history (M_{t-1}) at the unpainted steps and changes no target."""
    clip = Clip(torch.rand(8, 3, 8, 8), torch.zeros(1, 8, 8, 8, dtype=torch.bool),
                torch.tensor([1]), [1], "synthetic", "x")
    clip.masks[0, :2, :4, :4] = True
    clip.masks[0, 4:, :4, :4] = True  # leaves at frame 2, back at frame 4
    g = torch.Generator().manual_seed(3)
    plain = train.preprocess([clip] * 64, Cfg, g)
    g = torch.Generator().manual_seed(3)
    gapped = train.preprocess([clip] * 64, Cfg, g, gap=4)
    assert torch.equal(plain["switch"], gapped["switch"])
    assert torch.equal(plain["targets"], gapped["targets"])
    painted = plain["history"].flatten(2).any(2)  # (b, T)
    kept = gapped["history"].flatten(2).any(2)  # (b, T)
    assert not (kept & ~painted).any()
    assert (painted & ~kept)[:, 5:].any()  # steps 5.. paint frames 4..: the return's
    assert not (painted & ~kept)[:, :5].any()


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
    tgt = batch["targets"]
    trk = batch["tracked"]
    vis = batch["visible"]
    det = batch["det"]
    lab = batch["labels"]
    B, T, N, h, w = tgt.shape
    Q = N + Nd
    fg = torch.randn(P, B, T, Q, generator=g)
    cls = torch.randn(P, B, T, Q, K + 1, generator=g)
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
                    put(b, t, i, i if vis[b, t, i] else None)
                    # absent: no object with an empty mask
                    masks[:, b, t, i] = L * (2 * tgt[b, t, i] - 1)
            targets = det[b, t].nonzero()[:, 0].tolist()[::-1]  # any order: matching finds it
            for j in range(Nd):
                put(b, t, N + j, targets[j] if j < len(targets) else None)
    return {"fg": fg, "cls": cls, "masks": masks}


def test_criterion_perfect_prediction_is_near_zero():
    batch = make_batch()
    loss, parts = train.criterion(make_out(batch), batch)
    names = {"trk_cls", "trk_bce", "trk_dice", "det_cls", "det_bce", "det_dice"}
    assert loss.item() < 1e-4 and set(parts) == names
    loss_rand, _ = train.criterion(make_out(batch, perfect=False), batch)
    assert loss_rand.item() > 10


def test_criterion_absent_tracked_object_needs_an_empty_mask():
    batch = make_batch(seed=2)
    gone = batch["tracked"] & ~batch["visible"]  # (B, T, N)
    for seed in range(20):
        if gone.any():
            break
        batch = make_batch(seed=seed + 10)
        gone = batch["tracked"] & ~batch["visible"]
    assert gone.any(), "no batch with an absent tracked object"
    out = make_out(batch)
    b, t, n = gone.nonzero()[0].tolist()
    out["masks"][:, b, t, n] = 20.0  # the absent object's query paints the whole frame
    loss, parts = train.criterion(out, batch)
    assert parts["trk_bce"] > 0.1 and parts["trk_dice"] > 0.1 and parts["det_bce"] < 1e-4


def test_criterion_zero_logits_hand_computed():
    """All logits 0: CE = log 2 (+ log(K+1) with classes), BCE = log 2,
    Dice = 1 - (|g| + 1) / (hw/2 + |g| + 1)."""
    batch = make_batch(seed=3, line=True)
    P, K = 3, 6
    tgt, trk, vis, det = batch["targets"], batch["tracked"], batch["visible"], batch["det"]
    B, T, N, h, w = tgt.shape

    def dice(sel):  # the mean Dice loss of all-zero logits over the selected (b, t, n)
        losses = []
        for b, t, n in sel.nonzero().tolist():
            g = tgt[b, t, n].sum().item()
            losses.append(1 - (g + 1) / (h * w / 2 + g + 1))
        return np.mean(losses)
    for cls in (True, False):
        out = {"fg": torch.zeros(P, B, T, N + 5),
               "cls": torch.zeros(P, B, T, N + 5, K + 1) if cls else None,
               "masks": torch.zeros(P, B, T, N + 5, h, w)}
        loss, parts = train.criterion(out, batch)
        ce = math.log(2) + (math.log(K + 1) if cls else 0)
        # trk_dice: an absent tracked object has an empty target
        want = {"trk_cls": 2 * ce, "trk_bce": 5 * math.log(2), "trk_dice": 5 * dice(trk),
                "det_cls": 2 * ce, "det_bce": 5 * math.log(2), "det_dice": 5 * dice(det)}
        for k in want:
            assert parts[k] == pytest.approx(P * want[k], rel=1e-5), k
        assert loss.item() == pytest.approx(P * sum(want.values()), rel=1e-5)


def test_criterion_no_object_weight_hand_computed():
    """One foreground logit x for every query, no classes, zero masks: the CE terms are weighted
    means of softplus(-x) (an object) and softplus(x) ("no object", weight 0.1, Mask2Former's):
    tracking query i is "no object" where its tracked instance i is absent; min(m, Nd) detection
    queries are matched in a frame with m detection targets (the matching is a tie), the others
    are "no object"."""
    batch = make_batch(seed=3, line=True)
    P, Nd, x = 2, 5, 2.0
    tgt, trk, vis, det = batch["targets"], batch["tracked"], batch["visible"], batch["det"]
    B, T, N, h, w = tgt.shape
    fg = torch.full((P, B, T, N + Nd), x)
    out = {"fg": fg, "cls": None, "masks": torch.zeros(P, B, T, N + Nd, h, w)}
    _, parts = train.criterion(out, batch)
    obj = math.log1p(math.exp(-x))  # the BCE of logit x against target 1
    empty = math.log1p(math.exp(x))  # and against target 0
    n_obj = (trk & vis).sum().item()
    n_empty = (trk & ~vis).sum().item()
    trk_cls = (n_obj * obj + 0.1 * n_empty * empty) / (n_obj + 0.1 * n_empty)
    m = det.sum(-1).clamp(max=Nd).flatten().tolist()  # matched detection queries per frame
    det_cls = sum(k * obj + 0.1 * (Nd - k) * empty for k in m) / sum(k + 0.1 * (Nd - k) for k in m)
    assert 0 < sum(m) < Nd * len(m)  # both matched and unmatched queries: the weight matters
    assert parts["trk_cls"] == pytest.approx(P * 2 * trk_cls, rel=1e-5)  # W_CLS = 2
    assert parts["det_cls"] == pytest.approx(P * 2 * det_cls, rel=1e-5)


def test_criterion_detection_order_does_not_matter_and_deep_supervision_sums():
    batch = make_batch(seed=1)
    N = batch["ids"].shape[1]
    out = make_out(batch, perfect=False, seed=2)
    det_perm = torch.randperm(5, generator=torch.Generator().manual_seed(0))
    perm = torch.cat([torch.arange(N), N + det_perm])
    swapped = {"fg": out["fg"][..., perm],
               "cls": out["cls"][..., perm, :],
               "masks": out["masks"][..., perm, :, :]}
    loss, _ = train.criterion(out, batch)
    loss_swapped, _ = train.criterion(swapped, batch)
    assert loss_swapped.item() == pytest.approx(loss.item(), rel=1e-6)
    per_p = []
    for p in range(2):
        out_p = {k: v[p:p + 1] for k, v in out.items()}
        per_p.append(train.criterion(out_p, batch)[0].item())
    assert loss.item() == pytest.approx(sum(per_p), rel=1e-6)
    # the tracking loss uses the fixed mapping: swapping two tracking queries changes the loss
    perm = torch.cat([torch.tensor([1, 0]), torch.arange(2, N + 5)])
    loss_trk_swapped, _ = train.criterion({k: v[:, :, :, perm] for k, v in out.items()}, batch)
    assert abs(loss_trk_swapped.item() - loss.item()) > 1e-3


# ---------------------------------------------------------------------------- the model, both forms
def small_cfg(**kw):
    import ausm
    base = dict(image_size=32, D=32, N_det=6, N_id=16, L_c=1, L_h=1, L_p=2,
                heads=2, ffn=64, width=16)
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


# ----------------------------------------------------------------------------- the training loop
SMALL = dict(D=32, N_det=6, L_c=1, L_h=1, L_p=2, heads=2, ffn=64, width=16)
REAL_STEP, REAL_FORWARD = train.train_step, train.forward


def run_main(argv, monkeypatch, fail_at=None, nan_at=None):
    """train.main on a tiny model at 32x32; records the loss of every step; can crash or give nan at
    a step."""
    losses = []

    def step(*a, **k):
        if fail_at is not None and len(losses) + 1 == fail_at:
            raise RuntimeError("killed")
        losses.append(REAL_STEP(*a, **k)[0])
        return losses[-1], {}

    def forward(*a, **k):  # a diverged model: nan logits
        out = REAL_FORWARD(*a, **k)
        diverged = nan_at == len(losses) + 1
        return {k: v * float("nan") if diverged and v is not None else v for k, v in out.items()}
    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "forward", forward)
    common = ["--size", "32", "--batch-size", "2", "--no-eval", "--log-every", "1"]
    rc = train.main(argv + common, **SMALL)
    return rc, losses


def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    args = ["--max-iters", "6", "--ckpt-every", "3"]
    rc, full = run_main(args + ["--out", str(tmp_path / "a")], monkeypatch)
    assert rc == 0 and len(full) == 6
    with pytest.raises(RuntimeError, match="killed"):
        # dies after the step-3 checkpoint
        run_main(args + ["--out", str(tmp_path / "b")], monkeypatch, fail_at=5)
    ck = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert ck["step"] == 3 and {"model", "optimizer", "config", "rng", "stage"} <= set(ck)
    assert not (tmp_path / "b" / "ckpt.pt.tmp").exists()
    rc, rest = run_main(args + ["--out", str(tmp_path / "b"), "--resume"], monkeypatch)
    assert rc == 0 and len(rest) == 3
    assert rest == pytest.approx(full[3:], rel=1e-6, abs=0)
    assert "step      6 | loss" in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    args = ["--max-iters", "8", "--ckpt-every", "2", "--out", str(tmp_path)]
    rc, losses = run_main(args, monkeypatch, nan_at=4)
    assert rc == 1 and len(losses) == 4 and not np.isfinite(losses[-1])
    out = capsys.readouterr().out
    assert "step 4: loss is nan" in out and "(step 2)" in out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2


def test_stage3_freezes_the_backbone(tmp_path, monkeypatch):
    run_main(["--max-iters", "1", "--out", str(tmp_path / "s1")], monkeypatch)
    rc, _ = run_main(["--stage", "3", "--frames", "3", "--max-iters", "2",
                      "--init", str(tmp_path / "s1" / "ckpt.pt"),
                      "--out", str(tmp_path / "s3")], monkeypatch)
    assert rc == 0
    before = torch.load(tmp_path / "s1" / "ckpt.pt", weights_only=False)["model"]
    after = torch.load(tmp_path / "s3" / "ckpt.pt", weights_only=False)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    rest = [k for k in before if not k.startswith("backbone.")]
    moved = [k for k in rest if not torch.equal(before[k], after[k])]
    assert any(k.startswith("compressor.") for k in moved)
    assert any(k.startswith("pixel_decoder.") for k in moved)


def test_overfitting_one_clip():
    import ausm
    import data
    torch.manual_seed(0)
    cfg = small_cfg(image_size=64)
    model = ausm.AUSM(cfg)
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    batch = train.preprocess([next(data.train_stream(stage=2, T=3, size=64))], cfg, g)
    losses = [train.train_step(model, opt, batch)[0] for _ in range(150)]
    assert min(losses[-10:]) < losses[0] / 5, (losses[0], losses[-10:])


# ----------------------------------------------------------------------------- DDP: 2 CPU processes
def _ddp_worker(rank, world, port, batches, init, out):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = _model_from(init)
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # (Adam's first steps hide a gradient scale)
    h = batches[0]["ids"].shape[0] // world
    for batch in batches:  # this rank's shard: samples rank*h .. (rank+1)*h - 1
        shard = {k: v[rank * h:(rank + 1) * h] if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        train.train_step(net, opt, shard)
    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _model_from(state):
    import ausm
    model = ausm.AUSM(small_cfg())
    model.load_state_dict(state)
    return model


def test_ddp_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    import socket
    import ausm
    torch.manual_seed(0)
    init = ausm.AUSM(small_cfg()).state_dict()
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(2):
        clips = [random_clip(g, n, T=3, H=32, W=32) for n in (2, 3, 1, 2)]
        batches.append(train.preprocess(clips, small_cfg(), g))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, batches, init, tmp_path),
                                nprocs=2, join=True)
    model = _model_from(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for batch in batches:
        train.train_step(model, opt, batch)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for k, v in model.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(init[k], v) for k, v in model.state_dict().items())


def test_torchrun_cli_two_processes(tmp_path):
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "train.py", "--max-iters", "2", "--size", "32", "--batch-size", "1", "--no-eval",
           "--log-every", "1", "--out", str(tmp_path)]
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # rank 0 alone logs
    assert "x 2 |" in res.stdout and res.stdout.count("step      2 | loss") == 1
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2


def test_stage2_without_a_stage1_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="error: checkpoint .*nope.pt not found.*stage 1"):
        train.main(["--stage", "2", "--init", str(tmp_path / "nope.pt"), "--out", str(tmp_path)])


def test_end_of_run_evaluation_hook_writes_eval_json(tmp_path, monkeypatch, capsys):
    import sys
    from types import SimpleNamespace
    seen = []

    def evaluate_heldout(model, cfg):
        seen.append(cfg.image_size)
        return {"J&F": 0.5, "AP": 0.25, "full": 1}
    fake = SimpleNamespace(evaluate_heldout=evaluate_heldout, HELDOUT_VIDEOS=32)
    monkeypatch.setitem(sys.modules, "infer", fake)
    metrics = train.evaluate(None, small_cfg(), str(tmp_path))
    assert metrics == {"J&F": 0.5, "AP": 0.25, "full": 1} and seen == [32]
    written = __import__("json").loads((tmp_path / "eval.json").read_text())
    assert written == {"J&F": 0.5, "AP": 0.25, "full": 1}
    assert "(32 videos of 16 frames) | J&F 0.500 | AP 0.250 | full 1" in capsys.readouterr().out


def test_tiny_stage3_defaults_long_clips_and_its_own_time_limit():
    """Issue 17: tiny stage 3 is 300 iterations of 24-frame clips within 15 minutes; stages 1 and 2
    keep 13; --time-limit still overrides; the paper preset has none."""
    s1 = train.parse_args(["--stage", "1"])
    s3 = train.parse_args(["--stage", "3"])
    assert (s1.time_limit, s1.frames) == (13.0, 3)
    assert (s3.time_limit, s3.frames, s3.max_iters) == (15.0, 24, 300)
    assert train.parse_args(["--stage", "3", "--time-limit", "2"]).time_limit == 2.0
    assert train.parse_args(["--stage", "3", "--preset", "paper"]).time_limit == 0.0


def test_average_writes_the_mean_of_the_weights(tmp_path, monkeypatch):
    """--average: each floating weight of the written checkpoint is the mean of the inputs' (two
    runs from one --init that differ), integer buffers are the first's, infer.py loads it."""
    import infer
    run_main(["--max-iters", "1", "--out", str(tmp_path / "a")], monkeypatch)
    a_path = str(tmp_path / "a" / "ckpt.pt")
    run_main(["--max-iters", "2", "--init", a_path, "--out", str(tmp_path / "b")], monkeypatch)
    b_path = str(tmp_path / "b" / "ckpt.pt")
    argv = ["--average", a_path, b_path, "--out", str(tmp_path / "soup"), "--no-eval"]
    assert train.main(argv) == 0
    soup = torch.load(tmp_path / "soup" / "ckpt.pt", weights_only=True)
    first = torch.load(a_path, weights_only=True)
    a = first["model"]
    b = torch.load(b_path, weights_only=True)["model"]
    floats = [k for k in a if a[k].is_floating_point()]
    assert any(not torch.equal(a[k], b[k]) for k in floats)  # the two runs differ
    for k in floats:
        torch.testing.assert_close(soup["model"][k], (a[k] + b[k]) / 2, rtol=1e-6, atol=1e-7)
    assert all(torch.equal(soup["model"][k], a[k]) for k in a if k not in floats)
    assert soup["averaged"] == [a_path, b_path] and soup["config"] == first["config"]
    model = infer.load_model(str(tmp_path / "soup" / "ckpt.pt"))
    torch.testing.assert_close(model.state_dict()["X_0"], (a["X_0"] + b["X_0"]) / 2)
