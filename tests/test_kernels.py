"""kernels.py: every fast path against the PyTorch reference evaluated in float64 (issue 2).

Where the Triton kernels run: on a machine with a CUDA GPU, compiled, on CUDA tensors (DEVICE);
on a CPU, in the Triton interpreter (tests/conftest.py switches it on), ~2 ms per program per time
step, so the cases are tiny: few programs (batch x groups x dim-blocks) and short L. Block sizes
are lowered to exercise masks, several dim-blocks per group and several checkpoint segments. The
float64 reference always runs on the CPU; the torch path is the CPU path and is tested there.
tests/test_compile.py compiles the kernels for GPUs ahead of time.
"""
import pytest
import torch

import kernels

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the Triton cases run
TRITON_FNS = (kernels.selective_scan_triton, kernels.selective_state_update_triton)


def tolerance(dtype):
    """rtol = atol of a Triton result in `dtype` against float64. Compiled on a GPU, exp is
    ex2.approx (relative error ~2^-22): float32 gets 1e-4 there, 1e-5 in the interpreter (numpy's
    exp)."""
    if dtype == torch.float16:
        return 1e-2
    if dtype == torch.bfloat16:
        return 6e-2
    if DEVICE.type == "cuda":
        return 1e-4
    return 1e-5


def device_for(fn):
    """Triton cases run on DEVICE; the torch path and the reference on the CPU."""
    if fn in TRITON_FNS:
        return DEVICE
    return torch.device("cpu")


def make(batch, dim, L, dstate, groups, opts="", dtype=torch.float32, seed=0, device="cpu"):
    """Random inputs as a kwargs dict; opts picks the optional ones: D z b(ias) s(oftplus) h(0)
    3(d B, C). Drawn on the CPU in float64 (the same numbers on every device), then cast and moved
    to `device`."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    bc = (batch, dstate, L) if "3" in opts else (batch, groups, dstate, L)
    x = dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L),
             A=-0.5 - torch.rand(dim, dstate, generator=g, dtype=torch.float64), B=r(*bc), C=r(*bc),
             D=r(dim) if "D" in opts else None, z=r(batch, dim, L) if "z" in opts else None,
             delta_bias=0.3 * r(dim) if "b" in opts else None,
             initial_state=r(batch, dim, dstate) if "h" in opts else None)
    if "s" not in opts:
        # positive step sizes
        x["delta"] = x["delta"].abs()
    x = {k: None if v is None else v.to(device, dtype).requires_grad_() for k, v in x.items()}
    return x, "s" in opts


def run(fn, x, softplus, seed=1):
    """Outputs (y, last_state) and the gradient of a random linear loss w.r.t. every input given."""
    y, last = fn(**x, delta_softplus=softplus, return_last_state=True)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
    gl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(y.device)
    loss = (y.double() * gy).sum() + (last.double() * gl).sum()
    names = [k for k in NAMES if x[k] is not None]
    grads = torch.autograd.grad(loss, [x[k] for k in names])
    return y, last, dict(zip(names, grads))


def as64(x):
    """The inputs promoted to float64 on the CPU (where the reference runs)."""
    out = {}
    for k, v in x.items():
        out[k] = None if v is None else v.detach().cpu().double().requires_grad_()
    return out


def check(fn, x, softplus, rtol, atol):
    """fn on x against the reference on x promoted to float64: outputs, last state, every
    gradient."""
    y, last, grads = run(fn, x, softplus)
    y0, last0, grads0 = run(kernels.selective_scan_ref, as64(x), softplus)
    assert y.dtype == x["u"].dtype and last.shape == last0.shape
    assert y.device == x["u"].device and last.device == x["u"].device
    torch.testing.assert_close(y.cpu().double(), y0, rtol=rtol, atol=atol)
    torch.testing.assert_close(last.cpu().double(), last0, rtol=rtol, atol=atol)
    for k, g0 in grads0.items():
        assert grads[k].dtype == x[k].dtype and grads[k].shape == x[k].shape, k
        scale = g0.abs().max().item()
        torch.testing.assert_close(grads[k].cpu().double(), g0, rtol=rtol, atol=atol * scale,
                                   msg=lambda m: f"gradient of {k}: {m}")


# (batch, dim, L, dstate, groups, opts, BLOCK_D_MAX, CHECKPOINT_EVERY);
# programs = batch * groups * dim-blocks
CASES = [
    (1, 3, 1, 1, 1, "Dzbsh", 128, 8),     # L = 1, dstate 1, every option
    # odd L, groups 2, no options, dim per group 3 (masked block of 4)
    (2, 6, 5, 4, 2, "", 128, 8),
    # dim 5 = two blocks of 4, L 7 > 3 steps per checkpoint segment
    (1, 5, 7, 16, 1, "Dzsh3", 4, 3),
    (1, 8, 6, 4, 2, "bsh", 2, 4),         # groups 2 with two blocks each, L = 6 over segments of 4
    # default blocks: 128 + 2 masked channels, L 20 = 3 segments of 8
    (1, 130, 20, 16, 1, "Dzbs", 128, 8),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}L{}n{}g{}-{}".format(*c[:6]))
def test_triton_matches_float64_reference(case, monkeypatch):
    batch, dim, L, dstate, groups, opts, block, every = case
    monkeypatch.setattr(kernels, "BLOCK_D_MAX", block)
    monkeypatch.setattr(kernels, "CHECKPOINT_EVERY", every)
    x, sp = make(batch, dim, L, dstate, groups, opts, device=DEVICE)
    tol = tolerance(torch.float32)
    check(kernels.selective_scan_triton, x, sp, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_half_precision(dtype):
    x, sp = make(1, 6, 4, 4, 2, "Dzbsh", dtype=dtype, device=DEVICE)
    check(kernels.selective_scan_triton, x, sp, rtol=tolerance(dtype), atol=tolerance(dtype))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}L{}n{}g{}-{}".format(*c[:6]))
@pytest.mark.parametrize("chunk", [1, 1 << 18], ids=["chunk1", "chunk-default"])
def test_torch_path_matches_float64_reference(case, chunk, monkeypatch):
    batch, dim, L, dstate, groups, opts = case[:6]
    # 1: one sequence per chunk
    monkeypatch.setattr(kernels, "TORCH_CHUNK", chunk)
    x, sp = make(batch + 2, dim, L, dstate, groups, opts)
    check(kernels.selective_scan_torch, x, sp, rtol=1e-5, atol=1e-5)


def test_torch_path_half_precision():
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 6e-2)):
        x, sp = make(3, 6, 5, 4, 2, "Dzbsh", dtype=dtype)
        check(kernels.selective_scan_torch, x, sp, rtol=tol, atol=tol)


@pytest.mark.parametrize("fn", [kernels.selective_scan_triton, kernels.selective_scan_torch,
                                kernels.selective_scan_ref], ids=["triton", "torch", "ref"])
def test_continuation_equals_one_scan(fn, monkeypatch):
    """Scanning L = 2 + 3 steps in two calls, the second from the first's last state, is one scan
    over 5."""
    monkeypatch.setattr(kernels, "CHECKPOINT_EVERY", 2)
    x, sp = make(1, 4, 5, 4, 1, "Dzbsh", device=device_for(fn))
    tol = tolerance(torch.float32)
    y, last, grads = run(fn, x, sp)
    x2 = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in x.items()}

    def part(v, steps):
        """v's time steps `steps` if v has the L axis (of 5), else None."""
        if v is None or v.shape[-1] != 5:
            return None
        return v[..., steps]

    common = {k: x2[k] for k in ("A", "D", "delta_bias")}
    first = {k: part(x2[k], slice(0, 2)) for k in ("u", "delta", "B", "C", "z")}
    y1, h1 = fn(**first, **common, delta_softplus=sp, return_last_state=True,
                initial_state=x2["initial_state"])
    rest = {k: part(x2[k], slice(2, 5)) for k in ("u", "delta", "B", "C", "z")}
    y2, h2 = fn(**rest, **common, delta_softplus=sp, return_last_state=True, initial_state=h1)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y, rtol=tol, atol=tol)
    torch.testing.assert_close(h2, last, rtol=tol, atol=tol)
    # the same cotangents as run()
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
    gl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(y.device)
    loss = (torch.cat([y1, y2], -1).double() * gy).sum() + (h2.double() * gl).sum()
    split = torch.autograd.grad(loss, [x2[k] for k in grads])
    for (k, g1), g2 in zip(grads.items(), split):
        torch.testing.assert_close(g2, g1, rtol=tol, atol=tol * g1.abs().max().item(), msg=k)


@pytest.mark.parametrize("fn", [kernels.selective_state_update_triton,
                                kernels.selective_state_update_ref], ids=["triton", "ref"])
@pytest.mark.parametrize("opts", ["Dzbs", "3"])
def test_state_update_steps_equal_one_scan(fn, opts):
    x, sp = make(2, 6, 4, 4, 2, opts + "h", device=device_for(fn))
    x = {k: None if v is None else v.detach() for k, v in x.items()}
    tol = tolerance(torch.float32)
    y, last = kernels.selective_scan_ref(**as64(x), delta_softplus=sp, return_last_state=True)
    state = x["initial_state"].clone()
    ys = []
    for t in range(4):
        zt = None if x["z"] is None else x["z"][..., t]
        ys.append(fn(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t],
                     x["C"][..., t], x["D"], zt, x["delta_bias"], sp))
    torch.testing.assert_close(torch.stack(ys, -1).cpu().double(), y.detach(), rtol=tol, atol=tol)
    # updated in place
    torch.testing.assert_close(state.cpu().double(), last.detach(), rtol=tol, atol=tol)


def test_reference_gradcheck_float64():
    x, sp = make(2, 4, 3, 2, 2, "Dzbsh", dtype=torch.float64)
    names = [k for k in NAMES if x[k] is not None]

    def f(*args):
        return kernels.selective_scan_ref(**dict(zip(names, args)), delta_softplus=sp,
                                          return_last_state=True)
    assert torch.autograd.gradcheck(f, [x[k] for k in names])


def test_noncontiguous_inputs():
    x, sp = make(2, 4, 3, 4, 2, "Dzbh")
    xt = {}
    for k, v in x.items():
        # same shape, strides of the transposed layout
        xt[k] = None if v is None else v.detach().transpose(0, -1).contiguous().transpose(0, -1)
    assert not xt["u"].is_contiguous()
    y0 = kernels.selective_scan_ref(**as64(x), delta_softplus=sp).detach()
    tol = tolerance(torch.float32)
    for fn in (kernels.selective_scan_triton, kernels.selective_scan_torch):
        # .to keeps the strides
        xd = {k: None if v is None else v.to(device_for(fn)) for k, v in xt.items()}
        assert not xd["u"].is_contiguous()
        y = fn(**xd, delta_softplus=sp)
        torch.testing.assert_close(y.cpu().double(), y0, rtol=tol, atol=tol)


def test_dispatch_override(monkeypatch):
    """On DEVICE: "auto" is the Triton path on a GPU, the torch path on a CPU; every override
    works."""
    x, sp = make(2, 4, 3, 4, 1, "D", device=DEVICE)
    tol = tolerance(torch.float32)
    y0 = kernels.selective_scan_ref(**x)
    for path in ("auto", "torch", "ref", "triton"):
        monkeypatch.setattr(kernels, "SCAN_PATH", path)
        torch.testing.assert_close(kernels.selective_scan(**x), y0, rtol=tol, atol=tol)
    x = {k: None if v is None else v.detach() for k, v in x.items()}
    step = (x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0], x["D"])
    first = {k: v[..., :1] if k in ("u", "delta", "B", "C") else v for k, v in x.items()}   # L = 1
    y1, h1 = kernels.selective_scan_ref(**first, return_last_state=True)
    # torch -> the reference step
    for path in ("torch", "triton"):
        monkeypatch.setattr(kernels, "SCAN_PATH", path)
        state = torch.zeros(2, 4, 4, device=DEVICE)
        y = kernels.selective_state_update(state, *step)                           # (b, d)
        torch.testing.assert_close(y, y1[..., 0], rtol=tol, atol=tol)
        torch.testing.assert_close(state, h1, rtol=tol, atol=tol)
    monkeypatch.setattr(kernels, "SCAN_PATH", "cuda")
    with pytest.raises(ValueError, match="SCAN_PATH"):
        kernels.selective_scan(**x)


@pytest.mark.parametrize("dstate", [1, 16, 32, 64, 256])
@pytest.mark.parametrize("dim_g", [3, 128, 512])
def test_launch_tiles_are_capped_and_cover_every_channel(dim_g, dstate):
    """_launch: BLOCK_D x BLOCK_N within FWD_TILE / BWD_TILE (what keeps the compiled kernels free
    of spills, tests/test_compile.py), all of dstate in one block, every channel in some block."""
    # (b, d, l), 2 groups
    u = torch.empty(2, 2 * dim_g, 5)
    A = torch.empty(2 * dim_g, dstate)                                             # (d, n)
    B = torch.empty(2, 2, dstate, 5)                                               # (b, g, n, l)
    for backward, cap in ((False, kernels.FWD_TILE), (True, kernels.BWD_TILE)):
        grid, channels, meta = kernels._launch(u, A, B, backward)
        assert channels == dim_g and grid[:2] == (2, 2)
        assert meta["BLOCK_N"] >= dstate
        assert meta["BLOCK_D"] * meta["BLOCK_N"] <= max(cap, meta["BLOCK_N"])
        assert grid[2] * meta["BLOCK_D"] >= dim_g > (grid[2] - 1) * meta["BLOCK_D"]


def test_bad_inputs_raise_value_errors():
    x, _ = make(2, 4, 3, 4, 2, "Dz")
    x = {k: v.detach() for k, v in x.items() if v is not None}
    bad = [
        (dict(delta=x["delta"][..., :2]), r"delta must have shape \(2, 4, 3\), got \(2, 4, 2\)"),
        (dict(A=x["A"][:3]), r"A must have shape \(4, 4\), got \(3, 4\)"),
        (dict(B=torch.randn(2, 3, 4, 3), C=torch.randn(2, 3, 4, 3)),
         "dim=4 must be divisible by groups=3"),
        (dict(C=x["C"][:, :1]), r"C must have shape \(2, 2, 4, 3\), got \(2, 1, 4, 3\)"),
        (dict(D=torch.randn(5)), r"D must have shape \(4,\), got \(5,\)"),
        (dict(u=x["u"].long()), "u must be a real floating-point tensor.*torch.int64"),
        (dict(A=torch.complex(x["A"], x["A"])),
         "A must be a real floating-point tensor.*complex64"),
        (dict(z=x["z"].to("meta")), "z is on meta but u/x is on cpu"),
        (dict(u=x["u"][0]), r"u must have 3 dims, got shape \(4, 3\)"),
    ]
    for fn in (kernels.selective_scan_ref, kernels.selective_scan_triton,
               kernels.selective_scan_torch):
        for change, msg in bad:
            with pytest.raises(ValueError, match=msg):
                fn(**{**x, **change})
    # dstate 3, A says 4
    state = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"state must have shape \(2, 4, 4\), got \(2, 4, 3\)"):
        kernels.selective_state_update(state, x["u"][..., 0], x["delta"][..., 0], x["A"],
                                       x["B"][..., 0], x["C"][..., 0])
