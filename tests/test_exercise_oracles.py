"""Checking tests of classroom exercises that no other test file covers against an independent oracle
(EXERCISES.md): exercise 3, the reference selective scan against its closed (convolution) form; exercise 9,
the open-ended box prompt, against ground-truth masks with a measured bar."""
import numpy as np
import pytest
import torch

import data
import infer
import kernels

torch.set_num_threads(1)  # the shared 2-core box


# ----------------------------------------------------------------------------- exercise 3
def scan_closed_form(u, delta, A, B, C, D, z, bias, softplus, h0):
    """The scan unrolled (Mamba's convolution view), float64 numpy, no recurrence:
        h_t = exp(A sum_{r<=t} dt_r) h_0 + sum_{s<=t} exp(A sum_{s<r<=t} dt_r) dt_s B_s u_s
        y_t = (<C_t, h_t> + D u_t) * silu(z_t)."""
    u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
    batch, dim, L = u.shape
    g = B.shape[1] if B.ndim == 4 else 1
    B, C = (X.reshape(batch, g, A.shape[1], L).repeat(dim // g, axis=1) for X in (B, C))  # (b, d, n, l)
    dt = delta + (np.asarray(bias, np.float64)[:, None] if bias is not None else 0)
    dt = np.log1p(np.exp(dt)) if softplus else dt  # (b, d, l)
    cum = np.concatenate([np.zeros((batch, dim, 1)), np.cumsum(dt, -1)], -1)  # (b, d, l + 1): cum[t+1] = sum_{r<=t}
    y, h = np.zeros((batch, dim, L)), None
    for t in range(L):
        h = np.zeros((batch, dim, A.shape[1])) if h0 is None else np.exp(A * cum[..., t + 1, None]) * np.asarray(h0)
        for s in range(t + 1):
            decay = np.exp(A * (cum[..., t + 1] - cum[..., s + 1])[..., None])  # (b, d, n)
            h = h + decay * (dt[..., s] * u[..., s])[..., None] * B[..., s]
        y[..., t] = (h * C[..., t]).sum(-1)
    if D is not None:
        y = y + np.asarray(D, np.float64)[:, None] * u
    if z is not None:
        z = np.asarray(z, np.float64)
        y = y * z / (1 + np.exp(-z))
    return y, h


@pytest.mark.parametrize("opts", ["", "D", "Dzbsh", "Dz3"])
def test_scan_closed_form(opts):
    g, (batch, dim, L, n, groups) = torch.Generator().manual_seed(0), (2, 4, 6, 3, 2)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bc = (batch, n, L) if "3" in opts else (batch, groups, n, L)
    x = dict(u=r(batch, dim, L), delta=r(batch, dim, L).abs() * 0.5, A=-0.5 - torch.rand(dim, n, generator=g,
             dtype=torch.float64), B=r(*bc), C=r(*bc), D=r(dim) if "D" in opts else None,
             z=r(batch, dim, L) if "z" in opts else None, delta_bias=0.3 * r(dim) if "b" in opts else None,
             initial_state=r(batch, dim, n) if "h" in opts else None)
    y, last = kernels.selective_scan_ref(**x, delta_softplus="s" in opts, return_last_state=True)
    y0, last0 = scan_closed_form(*(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                                 "s" in opts, x["initial_state"])
    np.testing.assert_allclose(y.numpy(), y0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(last.numpy(), last0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scan_closed_form_half_precision(dtype):
    """Half-precision inputs: the scan accumulates in float32, so the last state (float32) matches the float64
    closed form of the same (rounded) inputs to 1e-5, and y (in u's dtype) is off by one rounding at most.
    Accumulating in bfloat16 / float16 instead is off by ~1e-2 / ~1e-3 in the state."""
    g = torch.Generator().manual_seed(0)
    batch, dim, L, n, groups = 2, 4, 12, 3, 2

    def r(*shape):
        return torch.randn(*shape, generator=g)
    x = dict(u=r(batch, dim, L), delta=r(batch, dim, L).abs() * 0.5, A=-0.5 - torch.rand(dim, n, generator=g),
             B=r(batch, groups, n, L), C=r(batch, groups, n, L), D=r(dim), z=r(batch, dim, L),
             delta_bias=0.3 * r(dim), initial_state=r(batch, dim, n))
    x = {k: v.to(dtype) for k, v in x.items()}
    y, last = kernels.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    y0, last0 = scan_closed_form(*(x[k].double() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                                 True, x["initial_state"].double())
    assert y.dtype == dtype and last.dtype == torch.float32, (y.dtype, last.dtype)
    np.testing.assert_allclose(last.double().numpy(), last0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y.double().numpy(), y0, rtol=torch.finfo(dtype).eps, atol=1e-3)


# ----------------------------------------------------------------------------- exercise 9 (open-ended)
def test_box_prompt_to_mask(request):
    """infer.box_to_mask(frame (3, H, W) in [0, 1], box (x0, y0, x1, y1) pixels, end exclusive) -> bool (H, W):
    on the held-out synthetic videos' first frames, the mask made from each object's tight box must reach a mean
    IoU with the object's mask of >= 0.8 and beat the filled box by >= 0.25 (the box alone gets ~0.51)."""
    fn = getattr(infer, "box_to_mask", None)
    if fn is None:  # open-ended: skipped in the normal suite, a failure when a student checks it
        if request.config.getoption("--exercise") == 9:
            pytest.fail("EXERCISE 9: infer.box_to_mask does not exist yet; see EXERCISES.md")
        pytest.skip("EXERCISE 9 (open-ended, EXERCISES.md): infer.box_to_mask not written")
    J, J_box = [], []
    for clip in data.heldout("synthetic", n=8, T=1, size=128):
        for m in clip.masks[:, 0].numpy():
            if m.sum() < 30:  # a sliver left by occlusion: no meaningful box
                continue
            x, y, w, h = (int(v) for v in data.mask_to_bbox(m))
            box = np.zeros_like(m)
            box[y:y + h, x:x + w] = True
            pred = np.asarray(fn(clip.frames[0], (x, y, x + w, y + h)), bool)
            assert pred.shape == m.shape, f"box_to_mask returned {pred.shape}, the frame is {m.shape}"
            assert not (pred & ~box).any(), "box_to_mask painted pixels outside the box"
            J.append((pred & m).sum() / (pred | m).sum())
            J_box.append(m.sum() / box.sum())
    assert len(J) >= 20
    assert np.mean(J) >= 0.8 and np.mean(J) >= np.mean(J_box) + 0.25, (np.mean(J), np.mean(J_box))
