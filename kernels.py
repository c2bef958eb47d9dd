"""Selective scan (Mamba S6) for AUSM's History Compressor -- PLACEHOLDER: reference only.

The Triton kernels land in issue 2; until then every path is the PyTorch reference.
"""
import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    dtype_in = u.dtype
    u, delta = u.float(), delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    B, C = B.float(), C.float()
    if B.dim() == 3:
        B = B[:, None]
    if C.dim() == 3:
        C = C[:, None]
    B = B.repeat_interleave(dim // B.shape[1], dim=1)  # (batch, dim, N, L)
    C = C.repeat_interleave(dim // C.shape[1], dim=1)  # (batch, dim, N, L)
    A = A.float()
    h = (initial_state.float() if initial_state is not None
         else u.new_zeros(batch, dim, A.shape[1]))
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[..., t] * u[:, :, t, None]
        ys.append((h * C[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    dim = x.shape[1]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if B.dim() == 2:
        B = B[:, None]
    if C.dim() == 2:
        C = C[:, None]
    B = B.float().repeat_interleave(dim // B.shape[1], dim=1)  # (batch, dim, N)
    C = C.float().repeat_interleave(dim // C.shape[1], dim=1)
    new = torch.exp(dt[..., None] * A.float()) * state.float() + dt[..., None] * B * x.float()[..., None]
    state.copy_(new)
    y = (new * C).sum(-1)
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


selective_scan = selective_scan_ref
selective_state_update = selective_state_update_ref
