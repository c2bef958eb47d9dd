"""Checking tests of classroom exercises (EXERCISES.md) that no other test file covers against an
independent oracle: exercise 3, the reference selective scan against its closed (convolution) form,
in float64 and from half-precision inputs; exercise 9, the open-ended box prompt, against
ground-truth masks with a measured bar."""
import numpy as np
import pytest
import torch

import data
import infer
import kernels

torch.set_num_threads(1)  # the shared 2-core box

SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


# ----------------------------------------------------------------------------- exercise 3
def scan_closed_form(u, delta, A, B, C, D, z, bias, softplus, h0):
    """The scan unrolled (Mamba's convolution view), float64 numpy, no recurrence:
        h_t = exp(A sum_{r<=t} dt_r) h_0 + sum_{s<=t} exp(A sum_{s<r<=t} dt_r) dt_s B_s u_s
        y_t = (<C_t, h_t> + D u_t) * silu(z_t)."""
    u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
    batch, dim, L = u.shape
    n = A.shape[1]
    g = B.shape[1] if B.ndim == 4 else 1
    B = B.reshape(batch, g, n, L).repeat(dim // g, axis=1)  # (b, d, n, l)
    C = C.reshape(batch, g, n, L).repeat(dim // g, axis=1)  # (b, d, n, l)
    dt = delta
    if bias is not None:
        dt = dt + np.asarray(bias, np.float64)[:, None]  # (b, d, l)
    if softplus:
        dt = np.log1p(np.exp(dt))
    cum = np.concatenate([np.zeros((batch, dim, 1)), np.cumsum(dt, -1)], -1)  # (b, d, l + 1)
    y = np.zeros((batch, dim, L))  # cum[..., t + 1] = sum_{r<=t} dt_r
    h = None
    for t in range(L):
        h = np.zeros((batch, dim, n))  # (b, d, n)
        if h0 is not None:
            h = np.exp(A * cum[..., t + 1, None]) * np.asarray(h0)
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


def scan_inputs(opts, batch, dim, L, n, groups, dtype):
    """Random scan inputs; opts picks the optional ones: D z b(ias) h(0) 3(-d B and C)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    bc = (batch, n, L) if "3" in opts else (batch, groups, n, L)
    x = dict(u=r(batch, dim, L), delta=r(batch, dim, L).abs() * 0.5,
             A=-0.5 - torch.rand(dim, n, generator=g, dtype=torch.float64), B=r(*bc), C=r(*bc),
             D=r(dim) if "D" in opts else None, z=r(batch, dim, L) if "z" in opts else None,
             delta_bias=0.3 * r(dim) if "b" in opts else None,
             initial_state=r(batch, dim, n) if "h" in opts else None)
    return {k: None if v is None else v.to(dtype) for k, v in x.items()}


def closed_form_of(x, softplus):
    args = [None if x[k] is None else x[k].double() for k in SCAN_ARGS]
    h0 = None if x["initial_state"] is None else x["initial_state"].double()
    return scan_closed_form(*args, softplus, h0)


@pytest.mark.parametrize("opts", ["", "D", "Dzbsh", "Dz3"])
def test_scan_closed_form(opts):
    x = scan_inputs(opts, 2, 4, 6, 3, 2, torch.float64)
    y, last = kernels.selective_scan_ref(**x, delta_softplus="s" in opts, return_last_state=True)
    y0, last0 = closed_form_of(x, "s" in opts)
    np.testing.assert_allclose(y.numpy(), y0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(last.numpy(), last0, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scan_closed_form_half_precision(dtype):
    """Half-precision inputs: the scan computes in float32, so the last state (float32) matches
    the float64 closed form of the same (rounded) inputs to 1e-5, and y (in u's dtype) is off by
    one rounding at most. Computing in bfloat16 / float16 is off by ~1e-2 / ~1e-3 in the state."""
    x = scan_inputs("Dzbh", 2, 4, 12, 3, 2, dtype)
    y, last = kernels.selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    y0, last0 = closed_form_of(x, True)
    assert y.dtype == dtype and last.dtype == torch.float32, (y.dtype, last.dtype)
    np.testing.assert_allclose(last.double().numpy(), last0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y.double().numpy(), y0, rtol=torch.finfo(dtype).eps, atol=1e-3)


# ----------------------------------------------------------------------------- exercise 9 (open)
def test_box_prompt_to_mask(request):
    """infer.box_to_mask(frame (3, H, W) in [0, 1], box (x0, y0, x1, y1) pixels, end exclusive)
    -> bool (H, W): on the held-out synthetic videos' first frames, the mask made from each
    object's tight box must reach a mean IoU with the object's mask of >= 0.8 and beat the
    filled box by >= 0.25 (the box alone gets ~0.51)."""
    fn = getattr(infer, "box_to_mask", None)
    if fn is None:  # open-ended: skipped in the normal suite, a failure when a student checks it
        if request.config.getoption("--exercise") == 9:
            pytest.fail("EXERCISE 9: infer.box_to_mask does not exist yet; see EXERCISES.md")
        pytest.skip("EXERCISE 9 (open-ended, EXERCISES.md): infer.box_to_mask not written")
    J = []
    J_box = []
    for clip in data.heldout("synthetic", n=8, T=1, size=128):
        for m in clip.masks[:, 0].numpy():
            if m.sum() < 30:  # a sliver left by occlusion: no meaningful box
                continue
            x, y, w, h = (int(v) for v in data.mask_to_bbox(m))
            box = np.zeros_like(m)
            box[y:y + h, x:x + w] = True
            pred = np.asarray(fn(clip.frames[0], (x, y, x + w, y + h)), bool)
            assert pred.shape == m.shape, f"box_to_mask gave {pred.shape}, the frame is {m.shape}"
            assert not (pred & ~box).any(), "box_to_mask painted pixels outside the box"
            J.append((pred & m).sum() / (pred | m).sum())
            J_box.append(m.sum() / box.sum())
    assert len(J) >= 20
    assert np.mean(J) >= 0.8 and np.mean(J) >= np.mean(J_box) + 0.25, (np.mean(J), np.mean(J_box))
