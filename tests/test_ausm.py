"""Tests for ausm.py: shapes, the History Marker against hand-computed values, causality,
parallel == recurrent (Alg. 2 vs Alg. 1), constant state size, the empty-mask rule, padding
invariance, gradients."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from ausm import AUSM, Attention, Config, HistoryMarker, Mamba, PixelDecoder, sine_pos

torch.set_num_threads(1)  # the CI box has 2 shared cores: extra threads only spin-wait


def small_cfg(**kw):  # tiny architecture with fewer, narrower parts: fast enough for 200 steps
    base = dict(D=32, N_det=4, N_id=8, L_c=1, L_h=1, L_p=1, heads=2, ffn=64, width=16)
    base.update(kw)
    return Config.tiny(**base)


def make_inputs(b, T, N, H, seed=0):
    """Frames, ids with a padded slot, history with objects entering at different frames (slot 0 is
    a prompt painted on X_0 in sample 0), tracked flags consistent with the history."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(b, T, 3, H, H, generator=g)
    ids = torch.tensor([[5, 2, 7], [1, 0, -1]])[:b, :N]
    history = (torch.rand(b, T, N, H, H, generator=g) > 0.6).float()
    # step at which slot i joins A (0 = prompt)
    enter = torch.tensor([[0, 1, 2], [2, 1, 99]])[:b, :N]
    tracked = torch.arange(T)[None, :, None] >= enter[:, None, :]  # (b, T, N)
    return frames, ids, history * tracked[..., None, None], tracked


def rel_err(a, b):
    return ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_shapes(preset):
    torch.manual_seed(0)
    cfg = getattr(Config, preset)()
    D, H, T, N, b = cfg.D, 64, 2, 3, 2  # the paper preset on a tiny input
    h, P, Q, di = H // 8, (H // 8) ** 2, N + cfg.N_det, cfg.expand * cfg.D
    # round trip via a checkpoint
    assert Config(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    model = AUSM(cfg).eval()
    frames, ids, history, tracked = make_inputs(b, T, N, H)
    with torch.no_grad():
        X, f4 = model.backbone(frames[:, 0])
        assert X.shape == (b, D, h, h) and f4.shape == (b, cfg.width, 2 * h, 2 * h)
        S = model.marker(model.B[:N].expand(b, N, D), history[:, 1], (h, h))
        assert S.shape == (b, D, h, h)
        m = model.compressor.layers[0].mamba
        assert m(torch.randn(5, T, D)).shape == (5, T, D)
        y, c, s = m.step(torch.randn(5, D),
                         torch.zeros(5, di, cfg.d_conv),
                         torch.zeros(5, di, cfg.d_state))
        assert y.shape == (5, D)
        assert c.shape == (5, di, cfg.d_conv)
        assert s.shape == (5, di, cfg.d_state)
        pos = sine_pos(h, h, D)
        assert pos.shape == (P, D)
        Ft = model.compressor(torch.randn(b, T, P, D), pos)
        assert Ft.shape == (b, T, P, D)
        G = model.decoder(torch.randn(b, P, D), torch.randn(b, P, D), pos)
        assert G.shape == (b, P, D)
        A = model.B[:N].expand(b, N, D)
        pd = model.pixel_decoder(G, f4, A, tracked[:, 1], (h, h), "synthetic")
        assert pd["fg"].shape == (cfg.L_p + 1, b, Q)
        assert pd["masks"].shape == (cfg.L_p + 1, b, Q, 2 * h, 2 * h)
        out = model(frames, ids, history, tracked, dataset=cfg.class_heads[-1][0])
        assert out["fg"].shape == (cfg.L_p + 1, b, T, Q)
        assert out["cls"].shape == (cfg.L_p + 1, b, T, Q, cfg.class_heads[-1][1] + 1)
        assert out["masks"].shape == (cfg.L_p + 1, b, T, Q, H // 4, H // 4)
        q, mask_features = torch.randn(b, Q, D), torch.randn(b, D, 2 * h, 2 * h)
        for name, K in cfg.class_heads:  # one K+1-way head per dataset
            assert model.pixel_decoder.heads(q, mask_features, name)[1].shape == (b, Q, K + 1)
        # a class-agnostic dataset has no class head
        assert model.pixel_decoder.heads(q, mask_features, "davis")[1] is None
        state = model.init_state(b, N, H, H)
        assert state.ids.shape == (b, N) and len(set(state.ids[0].tolist())) == N  # distinct rows
        assert len(state.conv) == len(state.ssm) == cfg.L_c and state.ssm[0].dtype == torch.float32
        assert state.conv[0].shape == (b * P, di, cfg.d_conv)
        assert state.ssm[0].shape == (b * P, di, cfg.d_state)
        out, state = model.step(frames[:, 0], state)
        assert out["fg"].shape == (cfg.L_p + 1, b, Q)
        assert out["cls"].shape == (cfg.L_p + 1, b, Q, 7)
        assert out["masks"].shape == (cfg.L_p + 1, b, Q, H // 4, H // 4)
        assert state.X_prev.shape == (b, D, h, h)


def test_bad_inputs_raise_clear_errors():
    model = AUSM(small_cfg()).eval()
    frames, ids, history, tracked = make_inputs(2, 2, 3, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        model(frames[..., :12, :12], ids, history, tracked)
    with pytest.raises(ValueError, match="tracked"):
        model(frames, ids, history, tracked[:, :1])
    with pytest.raises(ValueError, match="N_id"):
        model(frames, ids + 8, history, tracked)
    with pytest.raises(ValueError, match="N_id"):
        model.init_state(1, 9, 16, 16)


# ------------------------------------------------------------------------------- History Marker
def marker_inputs():
    """Two objects on a 2x2 grid (no downsampling): pixel (0,0) object 0 only, (0,1) object 1 only,
    (1,0) both, (1,1) background."""
    A = torch.tensor([[[1.0, 2, 3, 4], [-4.0, 0, 8, 2]]])  # (1, 2, D)
    M = torch.zeros(1, 2, 2, 2)  # (1, 2, 2, 2)
    M[0, 0, 0, 0] = 1
    M[0, 1, 0, 1] = 1
    M[0, :, 1, 0] = 1
    return A, M


def test_history_marker_one_object_paints_its_vector():
    A, M = marker_inputs()
    S = HistoryMarker(1e-6)(A, M, (2, 2))[0]  # (D, 2, 2)
    assert S.shape == (4, 2, 2)
    torch.testing.assert_close(S[:, 0, 0], A[0, 0], rtol=2e-6, atol=0)
    torch.testing.assert_close(S[:, 0, 1], A[0, 1], rtol=2e-6, atol=0)


def test_history_marker_overlap_is_the_average_background_zero():
    A, M = marker_inputs()
    S = HistoryMarker(1e-6)(A, M, (2, 2))[0]  # (D, 2, 2)
    torch.testing.assert_close(S[:, 1, 0], (A[0, 0] + A[0, 1]) / 2, rtol=2e-6, atol=0)
    assert (S[:, 1, 1] == 0).all()


def test_history_marker_object_order_does_not_matter():
    A, M = marker_inputs()
    marker = HistoryMarker(1e-6)
    torch.testing.assert_close(marker(A.flip(1), M.flip(1), (2, 2)), marker(A, M, (2, 2)))


def test_history_marker_area_downsampling_square():
    """4x4 masks to a 2x2 grid: cell (0,0) holds 1/4 of object 0 and 2/4 of object 1 ->
    (0.25 A0 + 0.5 A1) / (1e-6 + 0.75); cell (1,1) holds 1/4 of object 1 alone ->
    0.25 A1 / (1e-6 + 0.25)."""
    A, _ = marker_inputs()
    M4 = torch.zeros(1, 2, 4, 4)
    M4[0, 0, 0, 0] = 1
    M4[0, 1, 0, 1] = 1
    M4[0, 1, 1, 1] = 1
    M4[0, 1, 3, 3] = 1
    S4 = HistoryMarker(1e-6)(A, M4, (2, 2))[0]  # (D, 2, 2)
    assert S4.shape == (4, 2, 2)
    torch.testing.assert_close(S4[:, 0, 0], (0.25 * A[0, 0] + 0.5 * A[0, 1]) / (1e-6 + 0.75))
    torch.testing.assert_close(S4[:, 1, 1], 0.25 * A[0, 1] / (1e-6 + 0.25))
    assert (S4[:, 0, 1] == 0).all() and (S4[:, 1, 0] == 0).all()


def test_history_marker_area_downsampling_non_square():
    """6x8 masks to a 2x4 grid: each cell is 3 rows x 2 columns. Cell (0,0) holds 1/6 of object 0
    (its top-left pixel) and 2/6 of object 1 (pixels (1,1), (2,1)) -> (A0 / 6 + 2 A1 / 6) /
    (1e-6 + 3/6); cell (1,3) is all object 1 -> A1 / (1 + 1e-6); cell (0,2) holds 1/6 of object 0
    (pixel (0,5)) alone -> A0 / (1 + 6e-6)."""
    A, _ = marker_inputs()
    M = torch.zeros(1, 2, 6, 8)
    M[0, 0, 0, 0] = 1
    M[0, 1, 1, 1] = 1
    M[0, 1, 2, 1] = 1
    M[0, 1, 3:6, 6:8] = 1
    M[0, 0, 0, 5] = 1
    S = HistoryMarker(1e-6)(A, M, (2, 4))[0]  # (D, 2, 4)
    assert S.shape == (4, 2, 4)
    torch.testing.assert_close(S[:, 0, 0], (A[0, 0] / 6 + 2 * A[0, 1] / 6) / (1e-6 + 3 / 6))
    torch.testing.assert_close(S[:, 1, 3], A[0, 1] / (1 + 1e-6))
    torch.testing.assert_close(S[:, 0, 2], (A[0, 0] / 6) / (1e-6 + 1 / 6))
    for cell in [(0, 1), (0, 3), (1, 0), (1, 1), (1, 2)]:
        assert (S[:, cell[0], cell[1]] == 0).all(), cell


def test_history_marker_rejects_sizes_that_do_not_divide():
    A, _ = marker_inputs()
    marker = HistoryMarker(1e-6)
    for Hm, Wm in [(5, 5), (6, 7), (5, 8)]:  # to a 2x4 grid: both sides, then each side alone
        with pytest.raises(ValueError, match="multiple"):
            marker(A, torch.zeros(1, 2, Hm, Wm), (2, 4))


# -------------------------------------------------------------------------------------- Mamba
def test_mamba_init():
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, expand=2, d_conv=4)
    torch.testing.assert_close(-torch.exp(m.A_log[3]), -torch.arange(1, 9.0))  # S4D-real: A_n = -n
    assert torch.equal(m.D.data, torch.ones(64))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)


def mamba_steps(grad):
    """A Mamba block's parallel output on u (3, 6, 32), and its 6 steps from zero states."""
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, expand=2, d_conv=4)
    u = torch.randn(3, 6, 32)
    y = m(u)  # (3, 6, 32)
    conv = torch.zeros(3, 64, 4)
    ssm = torch.zeros(3, 64, 8)
    ys = []
    with torch.set_grad_enabled(grad):
        for t in range(6):
            yt, conv, ssm = m.step(u[:, t], conv, ssm)  # (3, 32)
            ys.append(yt)
    return y, torch.stack(ys, 1)  # (3, 6, 32) each


def test_mamba_step_equals_forward_without_grad():  # inference: selective_state_update
    y, ys = mamba_steps(grad=False)
    assert rel_err(y, ys) <= 1e-5


def test_mamba_step_equals_forward_with_grad():  # the iterative trainer: the scan at L = 1
    y, ys = mamba_steps(grad=True)
    assert rel_err(y, ys) <= 1e-5


def test_mamba_step_leaves_the_callers_state_alone():
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, expand=2, d_conv=4)
    u = torch.randn(3, 32)
    for grad in (False, True):
        conv = torch.randn(3, 64, 4)
        ssm = torch.randn(3, 64, 8)
        conv0 = conv.clone()
        ssm0 = ssm.clone()
        with torch.set_grad_enabled(grad):
            m.step(u, conv, ssm)
        assert torch.equal(conv, conv0), f"conv_state changed in place (grad={grad})"
        assert torch.equal(ssm, ssm0), f"ssm_state changed in place (grad={grad})"


# ---------------------------------------------------------------------------------- causality
def test_causality():
    torch.manual_seed(0)
    model = AUSM(small_cfg()).eval()
    frames, ids, history, tracked = make_inputs(2, 4, 3, 32)
    with torch.no_grad():
        ref = model(frames, ids, history, tracked)
        f2, h2, t2 = frames.clone(), history.clone(), tracked.clone()
        f2[:, 2] = torch.rand_like(f2[:, 2])  # frame t+1 = 2 (0-based)
        h2[:, 2] = 1 - h2[:, 2]  # its history
        t2[:, 2] = True
        for args in [(f2, ids, history, tracked), (frames, ids, h2, t2)]:
            out = model(*args)
            for k in ref:
                torch.testing.assert_close(out[k][:, :, :2], ref[k][:, :, :2], rtol=0, atol=1e-6)
                # the change is seen later
                assert not torch.allclose(out[k][:, :, 2:], ref[k][:, :, 2:])


# ------------------------------------------------------------------------- parallel == recurrent
@pytest.mark.parametrize("T", [1, 3, 8])
def test_parallel_equals_recurrent(T):
    torch.manual_seed(1)
    model = AUSM(Config.tiny()).eval()
    frames, ids, history, tracked = make_inputs(2, T, 3, 64, seed=T)
    with torch.no_grad():
        par = model(frames, ids, history, tracked)
        state = model.init_state(2, 3, 64, 64, ids=ids)
        for t in range(T):
            state.alloc.copy_(tracked[:, t])  # the caller writes A_{t-1}, M_{t-1} (teacher forcing)
            state.M.copy_(history[:, t])
            out, state = model.step(frames[:, t], state)
            for k in par:
                assert rel_err(par[k][:, :, t], out[k]) <= 1e-4, (T, t, k)


def test_state_size_constant():
    torch.manual_seed(0)
    model = AUSM(small_cfg()).eval()
    state = model.init_state(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sizes = {0: state.nbytes()}
    with torch.no_grad():
        for t in range(1, 201):
            out, state = model.step(torch.rand(1, 3, 16, 16), state)
            if t % 3 == 0 and t < 9:  # objects keep arriving; their latest masks replace older ones
                state.alloc[0, t // 3 - 1] = True
            low = out["masks"][-1, :, :3]  # (1, 3, 4, 4)
            up = low.repeat_interleave(4, -1).repeat_interleave(4, -2)  # (1, 3, 16, 16)
            state.M.copy_((up > 0).float())  # like infer.py: this frame's masks become M_t
            sizes[t] = state.nbytes()
    assert sizes[2] == sizes[200] == sizes[0]
    assert torch.isfinite(out["masks"]).all()


# ---------------------------------------------------------------------- masked attention rules
def test_attention_mask_is_exact():
    torch.manual_seed(0)
    att = Attention(8, 2)
    q, kv = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    mask = torch.tensor([[[1, 1, 0, 0, 0], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]], dtype=torch.bool)
    y = att(q, kv, kv, mask)
    for i in range(3):  # brute force: the query attends to the allowed keys only
        keep = mask[0, i]
        torch.testing.assert_close(y[:, i], att(q[:, i:i + 1], kv[:, keep], kv[:, keep])[:, 0])


def test_empty_mask_attends_everywhere():
    torch.manual_seed(0)
    cfg = small_cfg()
    pd = PixelDecoder(cfg).eval()
    with torch.no_grad():  # every mask logit = -D < 0: every query's mask is empty
        pd.lateral.weight.zero_()
        pd.mask_conv.weight.zero_()
        pd.mask_conv.bias.fill_(1.0)
        pd.mask_embed[-1].weight.zero_()
        pd.mask_embed[-1].bias.fill_(-1.0)
        G, f4 = torch.randn(2, 16, cfg.D), torch.randn(2, cfg.width, 8, 8)
        A, live = torch.randn(2, 2, cfg.D), torch.tensor([[True, False], [False, False]])
        out = pd(G, f4, A, live, (4, 4), "synthetic")
        assert (out["masks"] < 0).all()
        assert all(torch.isfinite(v).all() for v in out.values())
        # oracle: the same layers with no mask at all (attend everywhere)
        q = torch.cat([A, pd.V.expand(2, -1, -1)], 1)
        qpos = torch.cat([pd.trk_pos.expand(2, 2, -1), pd.V_pos.expand(2, -1, -1)], 1)
        keep = torch.cat([live, torch.ones(2, cfg.N_det, dtype=torch.bool)], 1)
        for layer in pd.layers:
            everywhere = torch.ones(2, q.shape[1], 16, dtype=torch.bool)
            q = layer(q, qpos, G, sine_pos(4, 4, cfg.D), everywhere, keep)
        torch.testing.assert_close(out["fg"][-1], pd.fg(pd.norm(q))[..., 0])


def test_batched_equals_per_sample():
    torch.manual_seed(0)
    model = AUSM(small_cfg(L_p=2)).eval()
    frames, ids, history, tracked = make_inputs(2, 3, 3, 32)
    N_det = model.cfg.N_det
    with torch.no_grad():
        both = model(frames, ids, history, tracked)  # sample 1 has a padded slot 2 (id -1)
        for b, n in [(0, 3), (1, 2)]:  # each sample alone, without its padded slot
            one = model(frames[b:b + 1],
                        ids[b:b + 1, :n],
                        history[b:b + 1, :, :n],
                        tracked[b:b + 1, :, :n])
            # its slots, then the detection queries
            real = list(range(n)) + list(range(3, 3 + N_det))
            for k in both:
                batched = both[k][:, b:b + 1, :, real]  # sample b, its real slots
                torch.testing.assert_close(batched, one[k], rtol=1e-5, atol=1e-5)
        # an untracked (not yet allocated) real slot is not a key either: dropping it changes
        # nothing
        t_now = tracked.clone()
        t_now[0, :, 2] = False
        with_slot = model(frames[:1], ids[:1], history[:1] * 0, t_now[:1])
        without = model(frames[:1], ids[:1, :2], history[:1, :, :2] * 0, t_now[:1, :, :2])
        for k in with_slot:
            torch.testing.assert_close(with_slot[k][:, :, :, [0, 1] + list(range(3, 3 + N_det))],
                                       without[k], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ training
def test_forward_backward_every_parameter_gets_gradient():
    torch.manual_seed(0)
    model = AUSM(Config.tiny()).train()
    frames, ids, history, tracked = make_inputs(1, 3, 3, 128)  # the tiny preset's frame size
    out = model(frames, ids, history, tracked, dataset="synthetic")
    g = torch.Generator().manual_seed(0)  # random weights: no head can cancel out by symmetry
    loss = sum((v * torch.randn(v.shape, generator=g)).mean() for v in out.values())
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad()  # the recurrent form keeps the start token X_0 in the graph too
    state = model.init_state(1, 3, 128, 128, ids=ids)
    out, state = model.step(frames[:, 0], state)
    out["fg"].sum().backward()
    assert model.X_0.grad is not None and model.X_0.grad.abs().sum() > 0


# --------------------------------------------------------------- the one-frame shift (Alg. 1 l.11)
def compressor_outputs(model, frames, ids, history, tracked, recurrent):
    """F_1..F_T (b, T, P, D), the History Compressor's outputs, caught by a forward hook on its
    final LayerNorm, which HistoryCompressor.forward (parallel form) and .step (recurrent form)
    both call."""
    caught = []

    def catch(module, inputs, output):
        caught.append(output)
    handle = model.compressor.norm.register_forward_hook(catch)
    try:
        if not recurrent:
            model(frames, ids, history, tracked)
            return caught[0]  # (b, T, P, D)
        b, T, N, H = history.shape[:4]
        state = model.init_state(b, N, H, H, ids=ids)
        for t in range(T):
            state.alloc.copy_(tracked[:, t])
            state.M.copy_(history[:, t])
            _, state = model.step(frames[:, t], state)
        return torch.stack(caught, 1)  # T x (b, P, D) -> (b, T, P, D)
    finally:
        handle.remove()


@pytest.mark.parametrize("recurrent", [False, True])
def test_compressor_sees_the_previous_frame_not_the_current(recurrent):
    """E_t = X_{t-1} + S_t: F_t, the History Compressor's output at step t, does not change when
    frame t changes, and does when frame t-1 changes. Causality alone cannot tell: E_t = X_t + S_t
    is causal too, and both forms would still agree with each other."""
    torch.manual_seed(0)
    model = AUSM(small_cfg()).eval()
    frames, ids, history, tracked = make_inputs(2, 4, 3, 32)
    t = 2  # 0-based: F[:, t] comes from frames 0..t-1 and the history before frame t
    frame_t_changed = frames.clone()
    frame_t_changed[:, t] = torch.rand_like(frames[:, t])
    frame_t_minus_1_changed = frames.clone()
    frame_t_minus_1_changed[:, t - 1] = torch.rand_like(frames[:, t - 1])
    with torch.no_grad():
        ref = compressor_outputs(model, frames, ids, history, tracked, recurrent)
        new_t = compressor_outputs(model, frame_t_changed, ids, history, tracked, recurrent)
        new_prev = compressor_outputs(model, frame_t_minus_1_changed, ids, history, tracked,
                                      recurrent)
    torch.testing.assert_close(new_t[:, :t + 1], ref[:, :t + 1], rtol=0, atol=1e-6)  # F_t unchanged
    assert not torch.allclose(new_t[:, t + 1], ref[:, t + 1])  # frame t reaches F_{t+1}
    torch.testing.assert_close(new_prev[:, :t], ref[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(new_prev[:, t], ref[:, t])  # frame t-1 reaches F_t
