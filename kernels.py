"""Selective scan (Mamba S6) for AUSM's History Compressor: Triton kernels beside PyTorch twins.

Paper: Mamba (Gu & Dao 2023) Sec. 3.2 / Alg. 2, the selective SSM "S6"; AUSM (Heo et al. 2025)
Sec. 2.2, the History Compressor, which runs one such scan over time at every pixel of the stride-8
features (batch = clips x pixels, L = frames). Same contract as mamba_ssm's selective_scan_fn /
selective_state_update:

    delta <- softplus(delta + delta_bias)                      (bias / softplus optional)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t   (zero-order hold of A, Euler for B)
    y_t    = <C_t, h_t> + D * u_t;      out_t = y_t * silu(z_t)  (D, z optional)

Glossary of dimension letters (as in mamba-minimal):
    b: batch (sequences: clips x pixels)   d: dim (channels, "D" in Mamba)   l: L (time steps)
    n: dstate (state size, "N")            g: groups (B_t, C_t shared by dim // groups channels)
    BD, BN: a Triton program's block of channels (BLOCK_D) and of dstate (BLOCK_N >= dstate)

Paths: selective_scan_ref (plain loop: the specification); selective_scan_triton (forward kernel: a
program per (batch, group, block of dim) keeps all of dstate in registers and loops over L;
backward kernel: a reverse-time scan recomputing h_{t-1} from a checkpoint saved every
CHECKPOINT_EVERY steps); selective_scan_torch (the CPU path, hand-written backward). selective_scan
dispatches; selective_state_update does one frame. _launch alone picks block sizes and warps; the
tiles are capped (FWD_TILE, BWD_TILE) so that the compiled kernels do not spill registers
(tests/aot_compile.py compiles every launch for sm_90, sm_80 and gfx90a and reports them).
Differs from mamba_ssm: real A only; B, C depend on time (no time-invariant variant); no fused
in-projection. Left out: complex A, the fused causal conv, variable-length sequences.

Cost (for a GPU reader): E = b*d*l, n = dstate, s = bytes per input element, c = CHECKPOINT_EVERY.
  forward  bytes ~ E*s*(3 + [z]) + 2*b*g*n*l*s (B, C) + 4*b*d*n*ceil(l/c) (fp32 checkpoints)
           FLOPs ~ 6*E*n + E*n exp
  backward bytes ~ E*(s*(4+[z]) + 4*(3+[z])) + 8*b*g*n*l*blocks + 4*b*d*n*(ceil(l/c)+2)
           FLOPs ~ E*n*(12+2c) + E*n*(c+1)/2 exp (h recomputed from the checkpoints: ~c/2 per step)
At dstate 16 the forward does ~220 FLOP-equivalents (an exp2 on the SFU costs ~8 FMAs) per ~25
(fp32) or ~17 (bf16) bytes per (b, d, t): 9-13 FLOP/byte, under an H100's ridge (~67 TFLOP/s /
3.35 TB/s = 20), so it is bandwidth bound (GB/s vs the device's peak is its yardstick:
tests/gpu_check.py); the backward and the forward from dstate ~32 up are exp bound.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    # the Triton kernels run in the interpreter on a CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

SCAN_PATH = "auto"       # "auto" (Triton on CUDA, torch on CPU) | "triton" | "torch" | "ref"
CHECKPOINT_EVERY = 8     # Triton backward: recompute h from a state saved every this many steps
BLOCK_D_MAX = 128        # channels per Triton program (tests lower it to exercise several blocks)
FWD_TILE = 4096          # forward: BLOCK_D * BLOCK_N at most this (see tests/aot_compile.py)
BWD_TILE = 1024          # backward (~12 live tiles): spill-free at dstate <= 64 on sm_80/90
_announced = set()


# ----------------------------------------------------------------------------- input validation
def _check(name, x, shape, device, ndim=None):
    """Raise ValueError unless x is a real floating tensor on `device` with `shape` (None = any)."""
    if not torch.is_tensor(x) or x.is_complex() or not x.is_floating_point():
        got = getattr(x, "dtype", type(x))
        raise ValueError(f"{name} must be a real floating-point tensor, got {got}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but u/x is on {device}: "
                         "put every input on one device")
    if ndim is not None and x.dim() not in ndim:
        allowed = " or ".join(map(str, ndim))
        raise ValueError(f"{name} must have {allowed} dims, got shape {tuple(x.shape)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def _validate(u, delta, A, B, C, D, z, bias, h0, step=False):
    """Check the whole argument list; return (batch, dim, dstate, groups). step=True: no L axis."""
    _check("x" if step else "u", u, None, getattr(u, "device", None), (2,) if step else (3,))
    batch, dim = u.shape[:2]
    tail = tuple(u.shape[2:])                                                      # (l,) or ()
    _check("dt" if step else "delta", delta, u.shape, u.device)
    _check("A", A, None, u.device, (2,))
    _check("A", A, (dim, A.shape[1]), u.device)                                    # (dim, dstate)
    _check("B", B, None, u.device, (2 + len(tail), 3 + len(tail)))
    grouped = B.dim() == 3 + len(tail)                                             # B (b, g, n, l)
    groups = B.shape[1] if grouped else 1
    dstate = A.shape[1]
    if dim % groups != 0:
        raise ValueError(f"dim={dim} must be divisible by groups={groups} "
                         f"(B has shape {tuple(B.shape)})")
    want = ((batch, groups) if grouped else (batch,)) + (dstate,) + tail
    for name, x, shp in (("B", B, want), ("C", C, want), ("D", D, (dim,)), ("z", z, u.shape),
                         ("dt_bias" if step else "delta_bias", bias, (dim,)),
                         ("state" if step else "initial_state", h0, (batch, dim, dstate))):
        if x is not None:
            _check(name, x, shp, u.device)
    return batch, dim, dstate, groups


# ----------------------------------------------------------------------------- PyTorch references
# EXERCISE 3: done: pytest --exercise 3
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """The specification: materialise exp(delta*A) for all steps, loop over L, let autograd
    differentiate. Accumulates in float32 (float64 if any input is float64). y in u's dtype,
    last_state float32/64."""
    batch, dim, dstate, groups = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    wt, delta = _delta(u, delta, A, B, delta_bias, delta_softplus)                # (b, d, l)
    B, C = (X.to(wt).reshape(batch, groups, dstate, -1).repeat_interleave(dim // groups, 1)
            for X in (B, C))                                                       # (b, d, n, l)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A.to(wt)))              # (b, d, l, n)
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u.to(wt))             # (b, d, l, n)
    h = _initial(initial_state, u, batch, dim, dstate, wt)                         # (b, d, n)
    ys = []
    for t in range(u.shape[2]):
        h = deltaA[:, :, t] * h + deltaB_u[:, :, t]                                # (b, d, n)
        ys.append(torch.einsum("bdn,bdn->bd", h, C[..., t]))                       # (b, d)
    y = _gate(torch.stack(ys, dim=-1), u, D, z)                                    # (b, d, l)
    return (y, h) if return_last_state else y


def _delta(u, delta, A, B, bias, softplus):
    """The working dtype (float32, float64 if any input is) and delta + bias, softplus'ed if
    asked."""
    dtypes = (u.dtype, delta.dtype, A.dtype, B.dtype)
    wt = torch.float64 if torch.float64 in dtypes else torch.float32
    delta = delta.to(wt)                                                           # (b, d, l)
    if bias is not None:
        delta = delta + bias.to(wt)[:, None]
    if softplus:
        delta = F.softplus(delta)
    return wt, delta


def _initial(h0, u, batch, dim, dstate, wt):
    """The state before the first step: h0 in the working dtype, zeros if absent. (b, d, n)"""
    if h0 is None:
        return u.new_zeros(batch, dim, dstate, dtype=wt)
    return h0.to(wt)


def _gate(y, u, D, z):
    """(y + D u) * silu(z), each term optional, returned in u's dtype."""
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(u.dtype)


def _add_last_axis(v):
    """v[..., None] (one step as a scan of length 1); None stays None."""
    if v is None:
        return None
    return v[..., None]


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                               dt_softplus=False):
    """One step of the recurrence (the scan at L=1 from `state`); updates state in place,
    returns y (b, d)."""
    # messages name x, dt, state
    _validate(x, dt, A, B, C, D, z, dt_bias, state, step=True)
    col = _add_last_axis                                                           # (..., 1)
    y, new = selective_scan_ref(col(x), col(dt), A, col(B), col(C), D, col(z), dt_bias, dt_softplus,
                                True, state)                                       # (b, d, 1)
    state.copy_(new)
    return y[..., 0]                                                               # (b, d)


# ----------------------------------------------------------------------------- Triton kernels
@triton.jit
def _sigmoid(x):   # exp(-|x|) never overflows
    return tl.where(x >= 0, 1.0, tl.exp(-tl.abs(x))) / (1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _setup(A_ptr, D_ptr, bias_ptr,
           dim, L, dstate, dim_g,
           HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
           BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (b, g, block) owns channels d (BD,) of group g, all of n (BN,): masks, A (BD, BN),
    D, delta_bias (BD,; zeros if absent, by all-false masks), offsets of rows of (b, d, l),
    (b, g, n, l), a (b, d, n) tile."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    local = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)                     # (BD,) in g
    n = tl.arange(0, BLOCK_N)                                                      # (BN,)
    mask_d = local < dim_g
    mask_n = n < dstate
    d = g * dim_g + local                                                          # (BD,) channel
    mask = mask_d[:, None] & mask_n[None, :]                                       # (BD, BN)
    A = tl.load(A_ptr + d[:, None] * dstate + n[None, :], mask=mask, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + d, mask=mask_d & HAS_D, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + d, mask=mask_d & HAS_BIAS, other=0.0).to(tl.float32)
    row = (b * dim + d) * L                                                        # (BD,) rows
    bc = ((b * tl.num_programs(1) + g) * dstate + n) * L                           # (BN,) rows
    state = (b * dim + d[:, None]) * dstate + n[None, :]                           # (BD, BN)
    return b, d, n, mask_d, mask_n, mask, A, Dv, bias, row, bc, state


@triton.jit
def _load_step(u_ptr, dt_ptr, B_ptr, row, bc, bias, mask_d, mask_n, SOFTPLUS: tl.constexpr):
    """u_t (BD,), delta_t as the scan uses it (BD,), the raw value softplus saw, and B_t (BN,),
    all fp32."""
    u = tl.load(u_ptr + row, mask=mask_d, other=0.0).to(tl.float32)
    raw = tl.load(dt_ptr + row, mask=mask_d, other=0.0).to(tl.float32) + bias
    Bt = tl.load(B_ptr + bc, mask=mask_n, other=0.0).to(tl.float32)
    delta = raw
    if SOFTPLUS:  # torch's threshold 20; no log1p in the interpreter; clamped: exp never overflows
        delta = tl.where(raw <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(raw, 20.0))), raw)
    return u, delta, raw, Bt


# EXERCISE 4: done when pytest --exercise 4 passes
@triton.jit
def _scan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
                     out_ptr, ckpt_ptr,
                     dim, L, dstate, dim_g, n_ckpt, every,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (b, g, block): channels of group g in this block, all of dstate; loops over
    t = 0..L-1."""
    b, d, n, mask_d, mask_n, mask, A, Dv, bias, row, bc, state = _setup(
        A_ptr, D_ptr, bias_ptr, dim, L, dstate, dim_g, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    # (BD, BN), zeros if absent
    h = tl.load(h0_ptr + state, mask=mask & HAS_H0, other=0.0).to(tl.float32)
    for t in range(L):
        u, delta, _, Bt = _load_step(u_ptr, dt_ptr, B_ptr, row + t, bc + t, bias,
                                     mask_d, mask_n, SOFTPLUS)
        Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)      # (BN,)
        h = tl.exp(delta[:, None] * A) * h + (delta * u)[:, None] * Bt[None, :]   # (BD, BN)
        y = tl.sum(h * Ct[None, :], axis=1) + Dv * u                              # (BD,)
        if HAS_Z:
            zt = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            y = y * zt * _sigmoid(zt)
        tl.store(out_ptr + row + t, y, mask=mask_d)
        # h_t is checkpoint t // every if t ends a segment or the scan; tt: t as a tile (mask dtype)
        tt = t + tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.int32)                      # (BD, BN)
        keep = ((tt + 1) % every == 0) | (tt == L - 1)
        tl.store(ckpt_ptr + ((b * n_ckpt + t // every) * dim + d[:, None]) * dstate + n[None, :], h,
                 mask=mask & keep)


@triton.jit
def _scan_bwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
                     ckpt_ptr, dout_ptr, dlast_ptr,
                     du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dh0_ptr,
                     dim, L, dstate, dim_g, n_ckpt, every,
                     HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Reverse-time scan t = L-1..0 carrying the adjoint dh_t = dLoss/dh_t; h_{t-1} is recomputed
    from the checkpoint before t's segment. dA, dD, dB, dC are written as per-program partials
    (summed in PyTorch)."""
    b, d, n, mask_d, mask_n, mask, A, Dv, bias, row, bc, state = _setup(
        A_ptr, D_ptr, bias_ptr, dim, L, dstate, dim_g, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
    program = (b * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    part = (program * dstate + n) * L                                              # (BN,) dB, dC
    # adjoint of h_t, t = L-1
    dh = tl.load(dlast_ptr + state, mask=mask, other=0.0)
    dA = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)                            # (BD, BN)
    dD = tl.zeros((BLOCK_D,), dtype=tl.float32)                                    # (BD,)
    for i in range(L):
        t = L - 1 - i
        # t's segment seg starts from h_{seg*every-1}: checkpoint seg - 1, or h0 at seg 0;
        # segs: seg as a tile (mask dtype)
        seg = t // every
        segs = seg + tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.int32)                  # (BD, BN)
        prev = b * n_ckpt + tl.maximum(seg - 1, 0)                                 # its checkpoint
        h = tl.load(ckpt_ptr + (prev * dim + d[:, None]) * dstate + n[None, :],
                    mask=mask & (segs > 0), other=0.0)
        h += tl.load(h0_ptr + state, mask=mask & (segs == 0) & HAS_H0, other=0.0).to(tl.float32)
        # EXERCISE: keep the segment's states in registers (O(1) per step, not O(c));
        # done = tests pass
        # recompute h_{t-1}
        for s in range(seg * every, t):
            us, ds, _, Bs = _load_step(u_ptr, dt_ptr, B_ptr, row + s, bc + s, bias,
                                       mask_d, mask_n, SOFTPLUS)
            h = tl.exp(ds[:, None] * A) * h + (ds * us)[:, None] * Bs[None, :]
        u, delta, raw, Bt = _load_step(u_ptr, dt_ptr, B_ptr, row + t, bc + t, bias,
                                       mask_d, mask_n, SOFTPLUS)
        Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)      # (BN,)
        dy = tl.load(dout_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)   # (BD,)
        a = tl.exp(delta[:, None] * A)                                             # (BD, BN)
        ah = a * h                                                                 # a_t * h_{t-1}
        h = ah + (delta * u)[:, None] * Bt[None, :]                                # h_t
        # out = y * silu(z)
        if HAS_Z:
            zt = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            sig = _sigmoid(zt)
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
            tl.store(dz_ptr + row + t, dy * y * sig * (1.0 + zt * (1.0 - sig)), mask=mask_d)
            dy = dy * zt * sig
        dD += dy * u
        # y_t = <C_t, h_t> + ...
        dh += dy[:, None] * Ct[None, :]
        tl.store(dC_ptr + part + t, tl.sum(dy[:, None] * h, axis=0), mask=mask_n)
        tl.store(dB_ptr + part + t, tl.sum(dh * (delta * u)[:, None], axis=0), mask=mask_n)
        dhB = tl.sum(dh * Bt[None, :], axis=1)                                     # (BD,)
        tl.store(du_ptr + row + t, dhB * delta + Dv * dy, mask=mask_d)
        # times softplus'(raw) = sigmoid(raw)
        ddelta = (dhB * u + tl.sum(dh * A * ah, axis=1)) * (_sigmoid(raw) if SOFTPLUS else 1.0)
        tl.store(ddt_ptr + row + t, ddelta, mask=mask_d)
        dA += dh * delta[:, None] * ah
        # -> adjoint of h_{t-1}
        dh = dh * a
    tl.store(dh0_ptr + state, dh, mask=mask)
    tl.store(dA_ptr + state, dA, mask=mask)
    tl.store(dD_ptr + b * dim + d, dD, mask=mask_d)


def _launch(u, A, B, backward):
    """Grid (batch, groups, dim-blocks per group), channels per group, and the meta-parameters of a
    launch (block sizes, warps). The one place that decides them: tests/aot_compile.py compiles what
    this returns for every launch the code makes, and reports registers and spills."""
    batch, dim = u.shape[:2]
    groups = B.shape[1]
    dim_g = dim // groups                                                          # per group
    block_n = triton.next_power_of_2(A.shape[1])                                   # all of dstate
    block_d = min(triton.next_power_of_2(dim_g), BLOCK_D_MAX)
    tile = BWD_TILE if backward else FWD_TILE                                      # BD * BN at most
    block_d = max(1, min(block_d, tile // block_n))
    grid = (batch, groups, triton.cdiv(dim_g, block_d))
    return grid, dim_g, dict(BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4)


def _flags(D, z, bias, h0, softplus):
    """The kernels' constexpr switches: which optional inputs are present."""
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None,
                SOFTPLUS=bool(softplus), HAS_H0=h0 is not None)


def _or_u(u, *xs):
    """Absent optional inputs become u: a valid pointer the kernels never read (HAS_ flag off)."""
    return [u if x is None else x for x in xs]


def _forward(u, delta, A, B, C, D, z, bias, h0, softplus, ckpt):
    """Run the forward kernel; ckpt (b, cdiv(L, CHECKPOINT_EVERY), d, n) receives the
    checkpoints."""
    grid, dim_g, meta = _launch(u, A, B, backward=False)
    batch, dim, L = u.shape
    out = torch.empty_like(u)                                                      # (b, d, l)
    _scan_fwd_kernel[grid](u, delta, A, B, C, *_or_u(u, D, z, bias, h0), out, ckpt,
                           dim, L, A.shape[1], dim_g, ckpt.shape[1], CHECKPOINT_EVERY,
                           **_flags(D, z, bias, h0, softplus), **meta)
    return out


class _ScanTriton(torch.autograd.Function):
    """Triton forward + Triton backward. Inputs contiguous, B and C as (b, g, n, l)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, h0, softplus):
        batch, dim, L = u.shape
        n_ckpt = triton.cdiv(L, CHECKPOINT_EVERY)
        ckpt = u.new_empty(batch, n_ckpt, dim, A.shape[1], dtype=torch.float32)   # (b, c, d, n)
        out = _forward(u, delta, A, B, C, D, z, bias, h0, softplus, ckpt)
        ctx.flags = _flags(D, z, bias, h0, softplus)
        ctx.every = CHECKPOINT_EVERY
        ctx.save_for_backward(u, delta, A, B, C, *_or_u(u, D, z, bias, h0), ckpt)
        # y, last state (b, d, n)
        return out, ckpt[:, -1]

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, bias, h0, ckpt = ctx.saved_tensors
        batch, dim, L = u.shape
        dstate = A.shape[1]
        grid, dim_g, meta = _launch(u, A, B, backward=True)
        du, ddelta, dz = u.new_empty(3, batch, dim, L, dtype=torch.float32)        # (b, d, l) each
        dA, dh0 = u.new_empty(2, batch, dim, dstate, dtype=torch.float32)          # (b, d, n) each
        dD = du.new_empty(batch, dim)                                              # (b, d)
        dB, dC = u.new_empty(2, *grid, dstate, L, dtype=torch.float32)            # per program
        _scan_bwd_kernel[grid](u, delta, A, B, C, D, z, bias, h0, ckpt, dout.contiguous(),
                               dlast.float().contiguous(), du, ddelta, dA, dB, dC, dD, dz, dh0,
                               dim, L, dstate, dim_g, ckpt.shape[1], ctx.every, **ctx.flags, **meta)
        ddelta_bias = ddelta.sum((0, 2))                                           # (d,)
        grads = (du, ddelta, dA.sum(0), dB.sum(2), dC.sum(2), dD.sum(0), dz, ddelta_bias, dh0)
        # grads: same dtypes
        ins = (u, delta, A, B, C, D, z, bias, h0)
        wanted = zip(grads, ins, ctx.needs_input_grad)
        return tuple(g.to(x.dtype) if needed else None for g, x, needed in wanted) + (None,)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, initial_state=None):
    """Same contract as selective_scan_ref, computed by the Triton kernels (interpreter on a
    CPU)."""
    _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    B, C = (X if X.dim() == 4 else X[:, None] for X in (B, C))                    # (b, g, n, l)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    c = [None if x is None else x.contiguous() for x in inputs]
    y, last = _ScanTriton.apply(*c, delta_softplus)
    return (y, last) if return_last_state else y


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None,
                                  dt_softplus=False):
    """One step: the forward kernel at L = 1 reads its initial state from `state` and writes its
    last state (its only checkpoint) back into it -- in place, as each program reads its own tile
    before writing it."""
    _validate(x, dt, A, B, C, D, z, dt_bias, state, step=True)
    s = state.contiguous()                                                         # (b, d, n)
    B, C = (v[:, None] if v.dim() == 2 else v for v in (B, C))                    # (b, g, n)
    inputs = (x, dt, A, B, C, D, z, dt_bias)
    x, dt, A, B, C, D, z, dt_bias = (None if v is None else v.contiguous() for v in inputs)
    col = _add_last_axis                                                           # (..., 1): L = 1
    y = _forward(col(x), col(dt), A, col(B), col(C), D, col(z), dt_bias, s, dt_softplus, s[:, None])
    if s is not state:
        state.copy_(s)
    return y[..., 0]                                                               # (b, d)


# ----------------------------------------------------------------------------- CPU fast path
# state elements (batch_chunk * dim * dstate) per step of the CPU path: 512 KB fp32
TORCH_CHUNK = 1 << 17


class _ScanTorch(torch.autograd.Function):
    """The recurrence step by step over batch chunks that fit in the cache; state dstate-major
    (n, b, g, dg) so products broadcast and sums over n add whole slabs; exp(x) as exp2(x log2 e)
    (~4x faster on CPUs); big temporaries preallocated (fresh pages are slow); a hand-written
    backward recomputing the chunk's states. Inputs float32/64, time-major: u, delta (l, b, d),
    delta biased and softplus'ed; B, C (l, n, b, g)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, h0):
        # (l, b, d), (n, b, d)
        y, last = torch.empty_like(u), torch.empty_like(h0)
        for rows, Hs, As, (tmp, _, _) in _chunk_states(u, delta, A, B, h0):
            # y_t = <C_t, h_t>
            for t in range(u.shape[0]):
                yt = y[t, rows].view(tmp.shape[1:])                                # (bc, g, dg)
                torch.sum(torch.mul(Hs[t + 1], C[t, :, rows, :, None], out=tmp), 0, out=yt)
            last[:, rows] = Hs[-1].reshape(last[:, rows].shape)
        ctx.save_for_backward(u, delta, A, B, C, h0)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, h0 = ctx.saved_tensors
        (L, batch, dim), n, g = u.shape, A.shape[1], B.shape[3]
        du = torch.empty_like(u)                                                   # (l, b, d)
        ddelta = torch.empty_like(u)                                               # (l, b, d)
        dB = torch.empty_like(B)                                                   # (l, n, b, g)
        dC = torch.empty_like(C)                                                   # (l, n, b, g)
        dA = u.new_zeros(n, 1, g, dim // g)                                        # (n, 1, g, dg)
        dh0 = torch.empty_like(h0)                                                 # (n, b, d)
        An = A.t().reshape(n, 1, g, -1)                                            # (n, 1, g, dg)
        for rows, Hs, As, (dh, dA_c, tmp) in _chunk_states(u, delta, A, B, h0):
            shp = (1,) + dh.shape[1:]                                              # (1, bc, g, dg)
            dh.copy_(dlast[:, rows].view(dh.shape))                                # dh_{L-1}
            dA_c.zero_()
            # reverse-time scan
            for t in range(L - 1, -1, -1):
                dyt, dlt, ut = dy[t, rows].view(shp), delta[t, rows].view(shp), u[t, rows].view(shp)
                Bt, Ct = B[t, :, rows, :, None], C[t, :, rows, :, None]            # (n, bc, g, 1)
                # dh_t += dy_t C_t
                dh.addcmul_(dyt, Ct)
                # sum_d dy_t h_t
                torch.sum(torch.mul(Hs[t + 1], dyt, out=tmp), -1, out=dC[t, :, rows])
                # sum_d dh_t dl_t u_t
                torch.sum(torch.mul(dh, dlt * ut, out=tmp), -1, out=dB[t, :, rows])
                dhB = torch.mul(dh, Bt, out=tmp).sum(0, keepdim=True)              # (1, bc, g, dg)
                # dh_t a_t h_{t-1}
                torch.mul(As[t], Hs[t], out=tmp).mul_(dh)
                dA_c.addcmul_(tmp, dlt)
                du[t, rows] = (dhB * dlt).view(-1, dim)
                ddelta[t, rows] = (tmp.mul_(An).sum(0, keepdim=True) + dhB * ut).view(-1, dim)
                # -> adjoint of h_{t-1}
                dh.mul_(As[t])
            dA += dA_c.sum(1, keepdim=True)
            dh0[:, rows] = dh.reshape(n, -1, dim)
        return du, ddelta, dA.view(n, dim).t(), dB, dC, dh0


def _chunk_states(u, delta, A, B, h0):
    """For each batch chunk: its rows, its states Hs = h_{-1..L-1} (L+1, n, bc, g, dg),
    As = a_t (L, n, bc, g, dg) with a_t = exp(delta_t A) = exp2(delta_t A log2 e), and 3 scratch
    states. Buffers are reused."""
    (L, batch, dim), n, g = u.shape, A.shape[1], B.shape[3]
    A2 = (A * 1.4426950408889634).t().reshape(n, 1, g, -1)                         # (n, 1, g, dg)
    step = max(1, TORCH_CHUNK // (dim * n))                                        # per chunk
    Hs, As, work = (u.new_empty(k, n, min(step, batch), g, dim // g) for k in (L + 1, L, 3))
    for b0 in range(0, batch, step):
        rows = slice(b0, b0 + step)
        bc = min(step, batch - b0)                                                 # in this one
        # this chunk's part
        H, At = Hs[:, :, :bc], As[:, :, :bc]
        H[0] = h0[:, rows].view(n, bc, g, -1)
        for t in range(L):
            dl = delta[t, rows].view(1, bc, g, -1)                                 # (1, bc, g, dg)
            torch.exp2(torch.mul(dl, A2, out=At[t]), out=At[t])                    # a_t
            dl_u = dl * u[t, rows].view_as(dl)                                     # (1, bc, g, dg)
            torch.mul(At[t], H[t], out=H[t + 1]).addcmul_(dl_u, B[t, :, rows, :, None])
        yield rows, H, At, work[:, :, :bc]


def _time_major(x, wt):
    """(b, d, l) -> (l, b, d), contiguous, in the working dtype."""
    return x.to(wt).movedim(-1, 0).contiguous()


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, initial_state=None):
    """Same contract as selective_scan_ref; the CPU fast path. Bias, softplus, D and z stay in
    autograd."""
    batch, dim, dstate, groups = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    wt, dl = _delta(u, delta, A, B, delta_bias, delta_softplus)                   # (b, d, l)
    h0 = _initial(initial_state, u, batch, dim, dstate, wt)                        # (b, d, n)
    BC = [(x if x.dim() == 4 else x[:, None]).to(wt) for x in (B, C)]              # (b, g, n, l)
    BC = [x.permute(3, 2, 0, 1).contiguous() for x in BC]                          # (l, n, b, g)
    h0 = h0.permute(2, 0, 1).contiguous()                                          # (n, b, d)
    A = A.to(wt).contiguous()                                                      # (d, n)
    y, last = _ScanTorch.apply(_time_major(u, wt), _time_major(dl, wt), A, *BC, h0)
    y = _gate(y.permute(1, 2, 0), u, D, z)                                         # (b, d, l)
    last = last.permute(1, 2, 0)                                                   # (b, d, n)
    return (y, last) if return_last_state else y


# ---------------------------------------------------------------- dispatch (what the model calls)
def _path(x):
    path = SCAN_PATH if SCAN_PATH != "auto" else ("triton" if x.is_cuda else "torch")
    if path not in ("triton", "torch", "ref"):
        raise ValueError('kernels.SCAN_PATH must be "auto", "triton", "torch" or "ref", '
                         f"got {SCAN_PATH!r}")
    # say it once per path
    if path not in _announced:
        _announced.add(path)
        print(f"kernels: selective scan on {x.device} runs the {path} path", file=sys.stderr)
    return path


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, initial_state=None):
    """y = S6 scan of u over its last axis (see the module docstring); Triton on CUDA, else the
    torch path."""
    fn = {"triton": selective_scan_triton, "torch": selective_scan_torch, "ref": selective_scan_ref}
    return fn[_path(u)](u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                        return_last_state, initial_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One recurrent step (inference): updates state (b, d, n) in place, returns y (b, d)."""
    fn = selective_state_update_triton if _path(x) == "triton" else selective_state_update_ref
    return fn(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


# ----------------------------------------------------------------------------- `python kernels.py`
def _inputs(batch, dim, L, dstate=16, device="cpu"):
    """Inputs like the History Compressor's: S4D-real A = -(1..n), softplus'ed delta with a bias,
    D, z."""
    torch.manual_seed(0)
    u = torch.randn(batch, dim, L, device=device)
    delta = torch.randn(batch, dim, L, device=device) - 3
    A = -torch.arange(1, dstate + 1, device=device).float().repeat(dim, 1)        # (d, n)
    B = torch.randn(batch, dstate, L, device=device)
    C = torch.randn(batch, dstate, L, device=device)
    D = torch.randn(dim, device=device)
    z = torch.randn(batch, dim, L, device=device)
    bias = torch.randn(dim, device=device) * 0.1
    return [u, delta, A, B, C, D, z, bias, True]                                   # ..., softplus


def _time_ms(fn, args, backward, reps):
    # fastest of reps, in ms
    best = float("inf")
    for _ in range(reps):
        x = [a.detach().requires_grad_(backward) if torch.is_tensor(a) else a for a in args]
        t0 = time.perf_counter()
        y = fn(*x)
        if backward:
            y.backward(torch.ones_like(y))
        if y.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    import argparse
    p = argparse.ArgumentParser(description="Check the selective-scan paths against the reference, "
                                "then time forward and forward+backward at AUSM's shapes "
                                "(dstate 16, softplus, D, z).")
    p.add_argument("--quick", action="store_true",
                   help="only batch 512 (2 clips x 16 x 16 pixels)")
    p.add_argument("--reps", type=int, default=2,
                   help="timed runs per cell; the table shows the fastest")
    p.add_argument("--ref-max", type=float, default=1.1e6,
                   help="time the reference loop only up to this batch*dim*L")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    triton_name = "triton" if dev == "cuda" else "triton (interpreter)"
    paths = {"ref (autograd loop)": selective_scan_ref, "torch (fast path)": selective_scan_torch,
             triton_name: selective_scan_triton}
    for name, fn in list(paths.items())[1:]:                                       # 1) correctness
        y = fn(*_inputs(3, 8, 5, 4, dev))
        y_ref = selective_scan_ref(*_inputs(3, 8, 5, 4, dev))
        err = (y - y_ref).abs().max().item()
        print(f"{name:24s} max |y - y_ref| = {err:.1e}  {'ok' if err < 1e-4 else 'WRONG'}")
    # the interpreter's timings are meaningless: not timed
    paths = {k: v for k, v in paths.items() if dev == "cuda" or "interpreter" not in k}
    header = "".join(f"{n + ' fwd / fwd+bwd ms':>42s}" for n in paths)
    print(f"\n{'batch':>6s} {'dim':>4s} {'L':>3s}" + header)
    batches = (512,) if args.quick else (512, 2048)
    shapes = [(b, d, L) for b in batches for d in (128, 512) for L in (3, 5, 16)]
    for batch, dim, L in shapes:                                                   # 2) benchmark
        x, cells = _inputs(batch, dim, L, 16, dev), ""
        for fn in paths.values():
            skip = fn is selective_scan_ref and batch * dim * L > args.ref_max
            cells += f"{'-':>42s}" if skip else "{:>31.1f} / {:8.1f}".format(
                *(_time_ms(fn, x, bwd, args.reps) for bwd in (False, True)))
        n_ckpt = -(-L // CHECKPOINT_EVERY)
        nbytes = 4 * (4 * batch * dim * L + 2 * batch * 16 * L + batch * dim * 16 * n_ckpt)
        # bandwidth: compare with the device's peak (tests/gpu_check.py)
        gbs = ""
        if dev == "cuda":
            gbs = f"  triton fwd {nbytes / _time_ms(paths['triton'], x, False, 3) / 1e6:.0f} GB/s"
        print(f"{batch:6d} {dim:4d} {L:3d}" + cells + gbs, flush=True)
    # 3) the 10x target
    if not args.quick:
        x = _inputs(2048, 128, 16, 16, dev)
        ref = _time_ms(selective_scan_ref, x, True, args.reps)
        fast = _time_ms(selective_scan_torch, x, True, args.reps)
        print(f"\nfwd+bwd at 2048 x 128 x L 16 x dstate 16: ref {ref:.0f} ms, torch {fast:.0f} ms: "
              f"{ref / fast:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
