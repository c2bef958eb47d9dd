"""Selective scan (Mamba S6) for AUSM's History Compressor: Triton kernels beside their PyTorch twins.

Paper: Mamba (Gu & Dao 2023) Sec. 3.2 / Alg. 2, the selective SSM "S6"; AUSM (Heo et al. 2025) Sec. 2.2,
the History Compressor, which runs one such scan over time at every pixel of the stride-8 feature map
(batch = clips x pixels, L = frames). Same contract as mamba_ssm's selective_scan_fn and
selective_state_update, so code and tests written for one run on the other:

    delta <- softplus(delta + delta_bias)                      (bias / softplus optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t   (zero-order hold of A, Euler step for B)
    y_t    = <C_t, h_t> + D * u_t;      out_t = y_t * silu(z_t)  (D, z optional)

Glossary of dimension letters (as in mamba-minimal):
    b: batch (sequences: clips x pixels)   d: dim (channels, "D" in Mamba)   l: L (time steps = frames)
    n: dstate (state size, "N")            g: groups (B_t, C_t shared by dim // groups channels each)

Paths: selective_scan_ref (plain loop, the specification); selective_scan_triton (own forward kernel: one
program per (batch, group, block of dim) holding all of dstate in registers and looping over L; own backward
kernel: a reverse-time scan that recomputes h_{t-1} from a checkpoint every CHECKPOINT_EVERY steps instead of
storing every state); _ScanTorch (CPU: vectorised per step over batch chunks that fit in cache, hand-written
backward). selective_scan dispatches; selective_state_update advances the state one frame (inference).
Differs from mamba_ssm: real A only; B, C depend on time (no time-invariant variant); no fused in-projection.
Left out: complex A, the fused causal conv, variable-length sequences.

Cost (for a GPU reader), per scan, with s bytes per input element, fp32 state, E = b*d*l, S = b*d*n:
    bytes moved   forward  ~ E*(2 + [z])*s + E*s (out) + 2*b*g*n*l*s (B, C) + 4*S*(1 + l/CHECKPOINT_EVERY)
                  backward ~ 2x forward + the gradients (same sizes as the inputs, fp32 partials for B, C, A)
    FLOPs         forward  ~ E*n*(1 exp + 6);  backward ~ E*n*(c/2 + 1)*(1 exp + 4) + E*n*12, c = CHECKPOINT_EVERY
Arithmetic intensity is ~n*7 FLOPs per s*3 bytes: at dstate 16 in fp32 that is ~9 FLOP/byte, at the ridge
of an H100 for fp32 FMA (~60 TFLOP/s over 3.3 TB/s ~ 18) but the exp runs on the slower SFU (1/4 the rate),
so dstate >= 16 is compute (exp) bound and dstate <= 4 or bf16 inputs at dstate 1 are bandwidth bound.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton kernels run in the interpreter on a CPU
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

SCAN_PATH = "auto"       # "auto" (Triton on CUDA, torch on CPU) | "triton" | "torch" | "ref"
CHECKPOINT_EVERY = 8     # Triton backward: recompute h from a state saved every this many steps
BLOCK_D_MAX = 128        # channels per Triton program (tests lower it to exercise several blocks)
_announced = set()


# ----------------------------------------------------------------------------- input validation
def _check(name, x, shape, device, ndim=None):
    """Raise ValueError unless x is a real floating tensor on `device` with `shape` (None = any)."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex() or not x.is_floating_point():
        raise ValueError(f"{name} must be a real floating tensor (float16/bfloat16/float32/float64), "
                         f"got dtype {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but u/x is on {device}: put every input on one device")
    if ndim is not None and x.dim() not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dims, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _validate(u, delta, A, B, C, D, z, bias, h0, step=False):
    """Check the whole argument list; return (batch, dim, dstate, groups). step=True: no L axis."""
    _check("x" if step else "u", u, None, u.device if torch.is_tensor(u) else None, (2,) if step else (3,))
    batch, dim = u.shape[:2]
    tail = () if step else (u.shape[2],)
    _check("dt" if step else "delta", delta, u.shape, u.device)
    _check("A", A, None, u.device, (2,))
    if A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim={dim}, dstate), got {tuple(A.shape)}")
    dstate = A.shape[1]
    _check("B", B, None, u.device, (2 + len(tail), 3 + len(tail)))
    groups = B.shape[1] if B.dim() == 3 + len(tail) else 1
    if dim % groups != 0:
        raise ValueError(f"dim={dim} must be divisible by groups={groups} (B has shape {tuple(B.shape)})")
    want = (batch, groups, dstate) + tail if B.dim() == 3 + len(tail) else (batch, dstate) + tail
    _check("B", B, want, u.device)
    _check("C", C, want, u.device)
    for name, x, shp in (("D", D, (dim,)), ("z", z, u.shape), ("dt_bias" if step else "delta_bias", bias, (dim,)),
                         ("state" if step else "initial_state", h0, (batch, dim, dstate))):
        if x is not None:
            _check(name, x, shp, u.device)
    return batch, dim, dstate, groups


# ----------------------------------------------------------------------------- PyTorch references
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """The specification: materialise exp(delta*A) for all steps, loop over L, let autograd differentiate.
    Accumulates in float32 (float64 if any input is float64). y in u's dtype, last_state float32/64."""
    batch, dim, dstate, groups = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    wt = torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype, B.dtype) else torch.float32
    delta = delta.to(wt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(wt)[:, None]                                 # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)
    B = B.to(wt).reshape(batch, groups, 1, dstate, -1)                             # (b, g, 1, n, l)
    B = B.expand(-1, -1, dim // groups, -1, -1).reshape(batch, dim, dstate, -1)     # (b, d, n, l)
    C = C.to(wt).reshape(batch, groups, 1, dstate, -1)
    C = C.expand(-1, -1, dim // groups, -1, -1).reshape(batch, dim, dstate, -1)     # (b, d, n, l)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.to(wt)))              # (b, d, l, n)
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u.to(wt))             # (b, d, l, n)
    h = initial_state.to(wt) if initial_state is not None else u.new_zeros(batch, dim, dstate, dtype=wt)
    ys = []
    for t in range(u.shape[2]):
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]                                # (b, d, n)
        ys.append(torch.einsum("bdn,bdn->bd", h, C[..., t]))                       # (b, d)
    y = torch.stack(ys, dim=-1)                                                    # (b, d, l)
    if D is not None:
        y = y + u.to(wt) * D.to(wt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(wt))
    return (y.to(u.dtype), h) if return_last_state else y.to(u.dtype)


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step of the recurrence (the scan at L=1 from `state`); updates state in place, returns y (b, d)."""
    y, new = selective_scan_ref(x[..., None], dt[..., None], A, B[..., None], C[..., None], D,
                                None if z is None else z[..., None], dt_bias, dt_softplus, True,
                                state)                                             # (b, d, 1), (b, d, n)
    state.copy_(new)
    return y[..., 0]                                                               # (b, d)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _softplus(x):  # torch's threshold 20; no log1p in the interpreter; clamped so exp never overflows
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _sigmoid(x):   # exp(-|x|) never overflows
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _load_delta(dt_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta_t as the scan uses it, and the raw value softplus saw (for its derivative)."""
    raw = tl.load(dt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias
    return (_softplus(raw) if SOFTPLUS else raw), raw


@triton.jit
def _scan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr, ckpt_ptr,
                     dim, L, dstate, dim_g, n_ckpt, every,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (b, g, block): channels of group g in this block, all of dstate; loops over t = 0..L-1."""
    b, g, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    groups = tl.num_programs(1)
    local = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = local < dim_g
    d = g * dim_g + local                                                          # (BLOCK_D,) channel
    n = tl.arange(0, BLOCK_N)
    mask_n = n < dstate
    mask = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + d[:, None] * dstate + n[None, :], mask=mask, other=0.0).to(tl.float32)  # (BD, BN)
    Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    row = (b * dim + d) * L                                                        # u, delta, z, out rows
    bc = ((b * groups + g) * dstate + n) * L                                       # B, C rows
    state_off = (b * dim + d[:, None]) * dstate + n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + state_off, mask=mask, other=0.0).to(tl.float32)
    for t in range(L):
        u = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)       # (BD,)
        delta, _ = _load_delta(dt_ptr, bias, row + t, mask_d, HAS_BIAS, SOFTPLUS)
        Bt = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)      # (BN,)
        Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp(delta[:, None] * A) * h + (delta * u)[:, None] * Bt[None, :]   # (BD, BN)
        y = tl.sum(h * Ct[None, :], axis=1) + Dv * u                              # (BD,)
        if HAS_Z:
            zt = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            y = y * zt * _sigmoid(zt)
        tl.store(out_ptr + row + t, y, mask=mask_d)
        tt = t + tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.int32)                      # t as a tile (mask dtype)
        keep = ((tt + 1) % every == 0) | (tt == L - 1)                             # checkpoint t // every
        tl.store(ckpt_ptr + ((b * n_ckpt + t // every) * dim + d[:, None]) * dstate + n[None, :], h,
                 mask=mask & keep)


@triton.jit
def _scan_bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, ckpt_ptr, dout_ptr, dlast_ptr,
                     du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dh0_ptr,
                     dim, L, dstate, dim_g, n_ckpt, every,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                     HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Reverse-time scan t = L-1..0 carrying the adjoint dh_t = dL/dh_t; h_{t-1} is recomputed from the
    checkpoint before t's segment. dA, dD, dB, dC are written as per-program partials (summed in PyTorch)."""
    b, g, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    groups, n_blk = tl.num_programs(1), tl.num_programs(2)
    local = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = local < dim_g
    d = g * dim_g + local
    n = tl.arange(0, BLOCK_N)
    mask_n = n < dstate
    mask = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + d[:, None] * dstate + n[None, :], mask=mask, other=0.0).to(tl.float32)  # (BD, BN)
    Dv = tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32) if HAS_D else 0.0
    bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    row = (b * dim + d) * L
    bc = ((b * groups + g) * dstate + n) * L
    part = ((b * groups + g) * n_blk + blk) * dstate * L + n * L                   # dB, dC partial rows
    state_off = (b * dim + d[:, None]) * dstate + n[None, :]
    dh = tl.load(dlast_ptr + state_off, mask=mask, other=0.0)                     # adjoint of h_t, t = L-1
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(L):
        t = L - 1 - i
        seg = t // every                                                           # h_{seg*every-1} saved
        segs = seg + tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.int32)                  # as a tile (mask dtype)
        h = tl.load(ckpt_ptr + ((b * n_ckpt + tl.maximum(seg - 1, 0)) * dim + d[:, None]) * dstate + n[None, :],
                    mask=mask & (segs > 0), other=0.0)
        if HAS_H0:
            h += tl.load(h0_ptr + state_off, mask=mask & (segs == 0), other=0.0).to(tl.float32)
        for s in range(seg * every, t):                                            # recompute h_{t-1}
            us = tl.load(u_ptr + row + s, mask=mask_d, other=0.0).to(tl.float32)
            ds, _ = _load_delta(dt_ptr, bias, row + s, mask_d, HAS_BIAS, SOFTPLUS)
            Bs = tl.load(B_ptr + bc + s, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(ds[:, None] * A) * h + (ds * us)[:, None] * Bs[None, :]
        u = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)       # (BD,)
        delta, raw = _load_delta(dt_ptr, bias, row + t, mask_d, HAS_BIAS, SOFTPLUS)
        Bt = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)      # (BN,)
        Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
        dy = tl.load(dout_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
        a = tl.exp(delta[:, None] * A)                                             # (BD, BN)
        ah = a * h                                                                 # a_t * h_{t-1}
        h = ah + (delta * u)[:, None] * Bt[None, :]                                # h_t
        if HAS_Z:                                                                  # out = y * silu(z)
            zt = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            sig = _sigmoid(zt)
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
            tl.store(dz_ptr + row + t, dy * y * sig * (1.0 + zt * (1.0 - sig)), mask=mask_d)
            dy = dy * zt * sig
        dD += dy * u
        dh += dy[:, None] * Ct[None, :]                                            # y_t = <C_t, h_t> + ...
        tl.store(dC_ptr + part + t, tl.sum(dy[:, None] * h, axis=0), mask=mask_n)
        tl.store(dB_ptr + part + t, tl.sum(dh * (delta * u)[:, None], axis=0), mask=mask_n)
        dhB = tl.sum(dh * Bt[None, :], axis=1)                                     # (BD,)
        tl.store(du_ptr + row + t, dhB * delta + Dv * dy, mask=mask_d)
        ddelta = dhB * u + tl.sum(dh * A * ah, axis=1)
        if SOFTPLUS:
            ddelta = ddelta * _sigmoid(raw)
        tl.store(ddt_ptr + row + t, ddelta, mask=mask_d)
        dA += dh * delta[:, None] * ah
        dh = dh * a                                                                # -> adjoint of h_{t-1}
    tl.store(dh0_ptr + state_off, dh, mask=mask)
    tl.store(dA_ptr + state_off, dA, mask=mask)
    tl.store(dD_ptr + b * dim + d, dD, mask=mask_d)


@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
                         dim, dstate, dim_g, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One step of the forward kernel's loop body, reading and writing the state in memory (in place)."""
    b, g, blk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    groups = tl.num_programs(1)
    local = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = local < dim_g
    d = g * dim_g + local
    n = tl.arange(0, BLOCK_N)
    mask_n = n < dstate
    mask = mask_d[:, None] & mask_n[None, :]
    state_off = (b * dim + d[:, None]) * dstate + n[None, :]
    h = tl.load(state_ptr + state_off, mask=mask, other=0.0).to(tl.float32)      # (BD, BN)
    A = tl.load(A_ptr + d[:, None] * dstate + n[None, :], mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=mask_d, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    x = tl.load(x_ptr + b * dim + d, mask=mask_d, other=0.0).to(tl.float32)      # (BD,)
    delta, _ = _load_delta(dt_ptr, bias, b * dim + d, mask_d, HAS_BIAS, SOFTPLUS)
    Bt = tl.load(B_ptr + (b * groups + g) * dstate + n, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
    Ct = tl.load(C_ptr + (b * groups + g) * dstate + n, mask=mask_n, other=0.0).to(tl.float32)
    h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bt[None, :]
    tl.store(state_ptr + state_off, h, mask=mask)
    y = tl.sum(h * Ct[None, :], axis=1)
    if HAS_D:
        y += tl.load(D_ptr + d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        zt = tl.load(z_ptr + b * dim + d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * zt * _sigmoid(zt)
    tl.store(out_ptr + b * dim + d, y, mask=mask_d)


def _launch(dim, dstate, groups):
    """Block sizes (powers of two) and the number of dim-blocks per group."""
    dim_g = dim // groups
    block_d = min(triton.next_power_of_2(dim_g), BLOCK_D_MAX)
    return dim_g, block_d, triton.next_power_of_2(dstate), triton.cdiv(dim_g, block_d)


class _ScanTriton(torch.autograd.Function):
    """Triton forward + Triton backward. Inputs contiguous, B and C as (b, g, n, l)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, h0, softplus):
        (batch, dim, L), dstate, groups = u.shape, A.shape[1], B.shape[1]
        dim_g, block_d, block_n, n_blk = _launch(dim, dstate, groups)
        every = CHECKPOINT_EVERY
        n_ckpt = triton.cdiv(L, every)
        out = torch.empty_like(u)                                                  # (b, d, l)
        ckpt = u.new_empty(batch, n_ckpt, dim, dstate, dtype=torch.float32)        # h after steps every-1, ...
        opt = [x if x is not None else u for x in (D, z, bias, h0)]                # dummies for absent inputs
        flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
                     HAS_H0=h0 is not None, BLOCK_D=block_d, BLOCK_N=block_n)
        _scan_fwd_kernel[(batch, groups, n_blk)](u, delta, A, B, C, *opt, out, ckpt,
                                                 dim, L, dstate, dim_g, n_ckpt, every, **flags)
        ctx.save_for_backward(u, delta, A, B, C, *opt, ckpt)
        ctx.flags, ctx.every = flags, every
        return out, ckpt[:, -1]

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, bias, h0, ckpt = ctx.saved_tensors
        f = ctx.flags
        (batch, dim, L), dstate, groups = u.shape, A.shape[1], B.shape[1]
        dim_g, block_d, block_n, n_blk = _launch(dim, dstate, groups)
        new = lambda *shape: u.new_empty(*shape, dtype=torch.float32)                # noqa: E731
        du, ddelta, dz = new(batch, dim, L), new(batch, dim, L), new(batch, dim, L)
        dA, dD, dh0 = new(batch, dim, dstate), new(batch, dim), new(batch, dim, dstate)  # per-batch partials
        dB, dC = new(batch, groups, n_blk, dstate, L), new(batch, groups, n_blk, dstate, L)
        _scan_bwd_kernel[(batch, groups, n_blk)](
            u, delta, A, B, C, D, z, bias, h0, ckpt, dout.contiguous(), dlast.float().contiguous(),
            du, ddelta, dA, dB, dC, dD, dz, dh0, dim, L, dstate, dim_g, ckpt.shape[1], ctx.every, **f)
        grads = (du, ddelta, dA.sum(0), dB.sum(2), dC.sum(2), dD.sum(0) if f["HAS_D"] else None,
                 dz if f["HAS_Z"] else None, ddelta.sum((0, 2)) if f["HAS_BIAS"] else None,
                 dh0 if f["HAS_H0"] else None)
        ins = (u, delta, A, B, C, D, z, bias, h0)
        return tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, ins)) + (None,)


def _as_4d(B):
    return B[:, None] if B.dim() == 3 else B                                      # (b, g, n, l)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None):
    """Same contract as selective_scan_ref, computed by the Triton kernels (interpreter on a CPU)."""
    _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    c = [None if x is None else x.contiguous() for x in (u, delta, A, _as_4d(B), _as_4d(C), D, z, delta_bias,
                                                         initial_state)]
    y, last = _ScanTriton.apply(*c, bool(delta_softplus))
    return (y, last) if return_last_state else y


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step with the Triton kernel; state (b, d, n) is updated in place. Returns y (b, d)."""
    batch, dim, dstate, groups = _validate(x, dt, A, B, C, D, z, dt_bias, state, step=True)
    dim_g, block_d, block_n, n_blk = _launch(dim, dstate, groups)
    s = state if state.is_contiguous() else state.contiguous()
    B = B[:, None] if B.dim() == 2 else B                                         # (b, g, n)
    C = C[:, None] if C.dim() == 2 else C
    c = [None if v is None else v.contiguous() for v in (x, dt, A, B, C, D, z, dt_bias)]
    out = torch.empty_like(c[0])                                                  # (b, d)
    _state_update_kernel[(batch, groups, n_blk)](
        s, *c[:5], *[v if v is not None else c[0] for v in c[5:]], out, dim, dstate, dim_g,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        BLOCK_D=block_d, BLOCK_N=block_n)
    if s is not state:
        state.copy_(s)
    return out


# ----------------------------------------------------------------------------- CPU fast path
TORCH_CHUNK = 1 << 18    # state elements (batch_chunk * dim * dstate) per step of the CPU path: ~1 MB, in cache


class _ScanTorch(torch.autograd.Function):
    """The recurrence step by step over batch chunks that fit in the cache, state laid out dstate-major
    (n, b, g, dg) so every product is a broadcast and every sum over n adds whole slabs; exp(x) as
    exp2(x * log2 e) (~4x faster on CPUs); a hand-written backward that recomputes the chunk's states.
    Inputs float32/64, time-major: u, delta (l, b, d), delta biased and softplus'ed; B, C (l, n, b, g)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        L, batch, dim = u.shape
        y, last = torch.empty_like(u), torch.empty_like(h0)                        # (l, b, d), (n, b, d)
        for sl, dl, dlu, Bt, a, h in _chunks(u, delta, A, B, h0, y):
            h.mul_(a).addcmul_(dlu, Bt)                                            # h_t = a_t h_{t-1} + dl u B
            y[sl[0], sl[1]] = (h * C[sl[0], :, sl[1], :, None]).sum(0).view(-1, dim)   # <C_t, h_t>
            if sl[0] == L - 1:
                last[:, sl[1]] = h.view(-1, h.shape[1], dim)
        ctx.save_for_backward(u, delta, A, B, C, h0)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, h0 = ctx.saved_tensors
        L, batch, dim = u.shape
        du, ddelta, dB, dC = torch.empty_like(u), torch.empty_like(u), torch.empty_like(B), torch.empty_like(C)
        dA, dh0 = torch.zeros_like(A), torch.empty_like(h0)
        An = A.t().reshape(A.shape[1], 1, B.shape[3], -1)                        # (n, 1, g, dg)
        hs, As = [], []
        for sl, dl, dlu, Bt, a, h in _chunks(u, delta, A, B, h0, None):           # recompute the chunk
            if sl[0] == 0:
                hs, As, dh, dA_c = [h.clone()], [], dlast[:, sl[1]].reshape(h.shape).clone(), torch.zeros_like(h)
            hs.append(torch.mul(a, hs[-1]).addcmul_(dlu, Bt))
            As.append(a)
            if sl[0] < L - 1:
                continue
            for t in range(L - 1, -1, -1):                                         # reverse-time scan
                b_sl, shp = sl[1], (1,) + h.shape[1:]
                dyt, dlt, ut = dy[t, b_sl].view(shp), delta[t, b_sl].view(shp), u[t, b_sl].view(shp)
                Bt, Ct = B[t, :, b_sl, :, None], C[t, :, b_sl, :, None]           # (n, bc, g, 1)
                dh.addcmul_(dyt, Ct)                                               # dh_t += dy_t C_t
                dC[t, :, b_sl] = (hs[t + 1] * dyt).sum(-1)                         # sum_d dy_t h_t
                dB[t, :, b_sl] = (dh * (dlt * ut)).sum(-1)                         # sum_d dh_t dl_t u_t
                dhB = (dh * Bt).sum(0, keepdim=True)                               # (1, bc, g, dg)
                ah = torch.mul(As[t], hs[t]).mul_(dh)                              # dh_t a_t h_{t-1}
                dA_c.addcmul_(ah, dlt)
                du[t, b_sl] = (dhB * dlt).view(-1, dim)
                ddelta[t, b_sl] = (ah.mul_(An).sum(0, keepdim=True) + dhB * ut).view(-1, dim)
                dh.mul_(As[t])                                                     # -> adjoint of h_{t-1}
            dA += dA_c.sum(1).reshape(A.shape[1], dim).t()
            dh0[:, b_sl] = dh.view(-1, dh.shape[1], dim)
        return du, ddelta, dA, dB, dC, dh0


def _chunks(u, delta, A, B, h0, out):
    """For each batch chunk and each t: yield (t, rows), dl_t, dl_t u_t, B_t, a_t = exp(dl_t A) and the state
    (n, bc, g, dg) that starts as the chunk's h0 (the caller advances it)."""
    L, batch, dim = u.shape
    n, groups = B.shape[1], B.shape[3]
    A2 = (A * 1.4426950408889634).t().reshape(n, 1, groups, -1)                  # (n, 1, g, dg), A log2 e
    step = max(1, TORCH_CHUNK // (dim * n))
    for b0 in range(0, batch, step):
        rows = slice(b0, b0 + step)
        h = h0[:, rows].reshape(n, -1, groups, dim // groups).clone()             # (n, bc, g, dg)
        for t in range(L):
            dl = delta[t, rows].view(1, -1, groups, dim // groups)               # (1, bc, g, dg)
            yield (t, rows), dl, dl * u[t, rows].view_as(dl), B[t, :, rows, :, None], torch.exp2(dl * A2), h


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, initial_state=None):
    """Same contract as selective_scan_ref; the CPU fast path. Bias, softplus, D and z stay in autograd."""
    batch, dim, dstate, groups = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    wt = torch.float64 if torch.float64 in (u.dtype, delta.dtype, A.dtype, B.dtype) else torch.float32
    dl = delta.to(wt) + (delta_bias.to(wt)[:, None] if delta_bias is not None else 0)   # (b, d, l)
    dl = F.softplus(dl) if delta_softplus else dl
    h0 = initial_state.to(wt) if initial_state is not None else u.new_zeros(batch, dim, dstate, dtype=wt)
    tm = lambda x: x.to(wt).movedim(-1, 0).contiguous()                          # noqa: E731  (l, b, ...)
    BC = [_as_4d(x).to(wt).permute(3, 2, 0, 1).contiguous() for x in (B, C)]       # (l, n, b, g)
    y, last = _ScanTorch.apply(tm(u), tm(dl), A.to(wt).contiguous(), *BC, h0.permute(2, 0, 1).contiguous())
    y, last = y.permute(1, 2, 0), last.permute(1, 2, 0)                            # (b, d, l), (b, d, n)
    if D is not None:
        y = y + u.to(wt) * D.to(wt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(wt))
    return (y.to(u.dtype), last) if return_last_state else y.to(u.dtype)


# ----------------------------------------------------------------------------- dispatch (what the model calls)
def _path(x):
    path = SCAN_PATH if SCAN_PATH != "auto" else ("triton" if x.is_cuda else "torch")
    if path not in ("triton", "torch", "ref"):
        raise ValueError(f'kernels.SCAN_PATH must be "auto", "triton", "torch" or "ref", got {SCAN_PATH!r}')
    if path not in _announced:
        _announced.add(path)
        print(f"kernels: selective scan runs the {path} path on {x.device} (set kernels.SCAN_PATH to change)",
              file=sys.stderr)
    return path


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None):
    """y = S6 scan of u over its last axis (see the module docstring); Triton on CUDA, else the torch path."""
    fn = {"triton": selective_scan_triton, "torch": selective_scan_torch, "ref": selective_scan_ref}
    return fn[_path(u)](u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One recurrent step (inference): updates state (b, d, n) in place, returns y (b, d)."""
    fn = selective_state_update_triton if _path(x) == "triton" else selective_state_update_ref
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
