"""AUSM: Autoregressive Universal Video Segmentation Model (Heo et al., arXiv 2508.19242), the model.

Read beside the paper (and PAPER.md, which says which details are ours). Implements:
  Sec. 2.1 / Eq. 2   video segmentation as next-frame prediction: outputs at frame t depend on frames <= t
                     and on the history y_0..y_{t-1} only.
  Sec. 2.2, Alg. 1   recurrent form: `AUSM.init_state` + `AUSM.step`, a constant-size `State`.
  Sec. 2.3, Alg. 2   parallel (teacher-forced) form: `AUSM.forward`, the History Compressor as one
                     selective scan over T for every pixel, everything else batched over B*T frames.
  Modules            Backbone, HistoryMarker (S_t equation), start token X_0, ID buffer B, detection
                     queries V, Mamba (selective SSM), HistoryCompressor, HistoryDecoder, PixelDecoder
                     (Mask2Former masked-attention transformer decoder with per-layer heads).
Differs from the paper (each is a [D] decision in PAPER.md, except the first, which is measured and ours):
  - G_t = F_t + HistoryDecoder(X_t, F_t): a residual around the History Decoder, so each pixel of the current frame
    starts with its own history. Without it a small model trained from scratch must first learn local attention
    from sine positions: tracking Dice stayed at chance for 2,000+ iterations; with it, it falls within ~200 (README).
  - Backbone: a small conv net trained from scratch (strides 4 and 8) instead of Swin-T/B from COCO
    Mask2Former; it sits behind a narrow interface frames -> (X, stride-4 features).
  - Mask logits are computed on stride-4 backbone features fused with G_t upsampled 2x.
  - Every query has one foreground logit (shared by all datasets) plus an optional K+1-way class head
    chosen by dataset name.
  - Pre-norm residual blocks in the compressor and history decoder; Mask2Former's post-norm in the
    pixel decoder; Mask2Former's multi-scale round-robin is replaced by the single stride-8 map G_t.
  - Mamba.step with autograd on runs the differentiable scan at L = 1 from the state (so the iterative
    trainer can backpropagate); without autograd it uses the in-place selective_state_update.
Left out: Swin weights, the Sampler's use at inference (infer.py allocates), losses (train.py),
test-time scaling (infer.py), boxes/points prompts.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from kernels import selective_scan, selective_state_update


@dataclass
class Config:
    image_size: int = 128      # H = W of training frames (any multiple of 8 runs)
    D: int = 64                # D: feature width of X_t, E_t, F_t, G_t, queries
    N_det: int = 16            # N_det: number of detection queries V
    N_id: int = 16             # N_id: rows of the ID-vector buffer B
    L_c: int = 2               # History Compressor layers (6 in the paper)
    L_h: int = 2               # History Decoder layers (6 in the paper)
    L_p: int = 3               # Pixel Decoder layers (9 in the paper, as Mask2Former)
    heads: int = 4             # attention heads everywhere
    ffn: int = 256             # FFN hidden width
    d_state: int = 16          # Mamba N: SSM state size per channel
    expand: int = 2            # Mamba E: d_inner = E * D
    d_conv: int = 4            # Mamba causal depthwise conv width
    width: int = 32            # Backbone channels at stride 4 (ours; the paper uses Swin)
    eps: float = 1e-6          # eps of the History Marker's S_t equation
    class_heads: tuple = (("synthetic", 6),)  # (dataset, K) pairs: K-way class head (+1 no-object)

    def __post_init__(self):
        self.class_heads = tuple((str(n), int(k)) for n, k in self.class_heads)  # lists from a checkpoint
        if self.D % 4 or self.D % self.heads:
            raise ValueError(f"Config.D={self.D} must be divisible by 4 (2-D sine encoding) and by "
                             f"heads={self.heads}")

    @classmethod
    def tiny(cls, **kw):
        """Trains on 2 CPU cores in minutes."""
        return cls(**kw)

    @classmethod
    def paper(cls, **kw):
        """The paper's sizes: D=256, 6/6/9 layers, 100 queries and IDs, 8 heads, FFN 2048."""
        base = dict(image_size=384, D=256, N_det=100, N_id=100, L_c=6, L_h=6, L_p=9, heads=8, ffn=2048,
                    d_state=16, expand=2, d_conv=4, width=64,
                    class_heads=(("synthetic", 6), ("coco", 80), ("ytvis19", 40), ("ytvis21", 40),
                                 ("ovis", 25)))
        base.update(kw)
        return cls(**base)


def sine_pos(h, w, D, device=None):
    """DETR's 2-D sine positional encoding (normalised, temperature 1e4): -> (h*w, D)."""
    npf = D // 2
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 1) / h * 2 * math.pi  # (h,)
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 1) / w * 2 * math.pi  # (w,)
    dim_t = 10000 ** (2 * (torch.arange(npf, device=device) // 2) / npf)  # (npf,)
    py, px = ys[:, None] / dim_t, xs[:, None] / dim_t  # (h, npf), (w, npf)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], 2).flatten(1)  # (h, npf)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], 2).flatten(1)  # (w, npf)
    pos = torch.cat([py[:, None].expand(h, w, npf), px[None].expand(h, w, npf)], -1)  # (h, w, D)
    return pos.flatten(0, 1)  # (h*w, D)


class Attention(nn.Module):
    """Multi-head attention on F.scaled_dot_product_attention. mask: bool, True = may attend."""

    def __init__(self, D, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

    def forward(self, q, k, v, mask=None):  # q (n, Lq, D); k, v (n, Lk, D); mask (n, Lq|1, Lk)
        q = rearrange(self.q(q), "n l (h e) -> n h l e", h=self.heads)  # (n, heads, Lq, D/heads)
        k = rearrange(self.k(k), "n l (h e) -> n h l e", h=self.heads)  # (n, heads, Lk, D/heads)
        v = rearrange(self.v(v), "n l (h e) -> n h l e", h=self.heads)  # (n, heads, Lk, D/heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.o(rearrange(y, "n h l e -> n l (h e)"))  # (n, Lq, D)


def FFN(D, hidden):
    return nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, D))


class Backbone(nn.Module):
    """frames (n, 3, H, W) in [0, 1] -> X (n, D, H/8, W/8), stride-4 features (n, width, H/4, W/4).

    # EXERCISE: plug a Swin-T or ResNet here (same two outputs); done when test_shapes passes with it.
    """

    def __init__(self, cfg):
        super().__init__()
        w = cfg.width

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU()]
        self.stem = nn.Sequential(*block(3, w, 2), *block(w, w, 2), *block(w, w, 1))  # stride 4
        self.down = nn.Sequential(*block(w, 2 * w, 2), nn.Conv2d(2 * w, cfg.D, 1))  # stride 8
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, frames):
        f4 = self.stem((frames - self.mean) / self.std)  # (n, width, H/4, W/4)
        return self.down(f4), f4  # (n, D, H/8, W/8), (n, width, H/4, W/4)


class HistoryMarker(nn.Module):
    """S_t[h,w] = sum_i M^i[h,w] A^i / (eps + sum_i M^i[h,w])  (Sec. 2.2, Token Mark). No parameters.

    Masks are area-downsampled to the feature grid (fractional occupancy). Rows whose mask is all zero
    (untracked or padded slots, zeroed by the caller) paint nothing.
    """

    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    # EXERCISE 1: write forward (the S_t equation above); done when `python -m pytest --exercise 1` passes.
    def forward(self, A, M, size):  # A (n, N, D); M (n, N, Hm, Wm) in [0, 1]; size = (h, w)
        (h, w), (Hm, Wm) = size, M.shape[-2:]
        if Hm % h or Wm % w:
            raise ValueError(f"history masks are {Hm}x{Wm}, not a multiple of the {h}x{w} feature grid; "
                             "give masks at frame resolution (H, W multiples of 8)")
        m = F.avg_pool2d(M.float(), (Hm // h, Wm // w)) if (Hm, Wm) != (h, w) else M.float()  # (n, N, h, w)
        num = torch.einsum("nihw,nid->ndhw", m, A)  # (n, D, h, w)
        return num / (self.eps + m.sum(1, keepdim=True))  # (n, D, h, w)


class Mamba(nn.Module):
    """Mamba-1 block (Gu & Dao 2023): in_proj -> causal depthwise conv1d -> SiLU -> x_proj (dt, B, C)
    -> dt_proj -> selective scan -> gate SiLU(z) -> out_proj. `forward` scans a whole sequence;
    `step` advances one element with (conv_state, ssm_state)."""

    def __init__(self, D, d_state=16, expand=2, d_conv=4, dt_min=1e-3, dt_max=1e-1):
        super().__init__()
        di, self.d_state, self.dt_rank = expand * D, d_state, math.ceil(D / 16)
        self.d_inner, self.d_conv = di, d_conv
        self.in_proj = nn.Linear(D, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))  # (di,)
        dt = dt.clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(di, 1))  # (di, N) S4D-real
        self.D = nn.Parameter(torch.ones(di))  # skip connection
        self.out_proj = nn.Linear(di, D, bias=False)

    def forward(self, u):  # u (b, L, D)
        L = u.shape[1]
        x, z = self.in_proj(u).chunk(2, -1)  # (b, L, di) each
        # causal depthwise conv1d as d_conv shifted multiply-adds (the sum `step` does; conv1d holds the weights):
        xp = F.pad(x, (0, 0, self.d_conv - 1, 0))  # (b, d_conv - 1 + L, di); 4x faster than Conv1d's CPU backward
        w = self.conv1d.weight[:, 0]  # (di, d_conv)
        x = F.silu(self.conv1d.bias + sum(xp[:, k:k + L] * w[:, k] for k in range(self.d_conv)))  # (b, L, di)
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], -1)  # (b, L, r|N|N)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2).contiguous()  # (b, di, L)
        y = selective_scan(x.transpose(1, 2).contiguous(), dt, -torch.exp(self.A_log.float()),  # (b, di, L)
                           Bm.transpose(1, 2).contiguous(), Cm.transpose(1, 2).contiguous(),  # (b, N, L)
                           self.D.float(), z.transpose(1, 2).contiguous(),
                           delta_bias=self.dt_proj.bias.float(), delta_softplus=True)  # (b, di, L)
        return self.out_proj(y.transpose(1, 2))  # (b, L, D)

    # EXERCISE 2: write step (one time step of forward, state not updated in place); done when
    # `python -m pytest --exercise 2` passes.
    def step(self, u, conv_state, ssm_state):  # u (b, D); conv (b, di, d_conv); ssm (b, di, N) fp32
        x, z = self.in_proj(u).chunk(2, -1)  # (b, di) each
        conv_state = torch.cat([conv_state[..., 1:], x[..., None]], -1)  # (b, di, d_conv)
        x = F.silu((conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # (b, di)
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], -1)  # (b, r), (b, N)
        dt = F.linear(dt, self.dt_proj.weight)  # (b, di)
        A, Dskip, bias = -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()
        if torch.is_grad_enabled():  # training the iterative form: autograd cannot see an in-place update,
            y, ssm_state = selective_scan(  # so run the (differentiable) scan at L = 1 from ssm_state
                x[..., None].contiguous(), dt[..., None].contiguous(), A, Bm[..., None].contiguous(),
                Cm[..., None].contiguous(), Dskip, z[..., None].contiguous(), delta_bias=bias,
                delta_softplus=True, return_last_state=True, initial_state=ssm_state)  # (b, di, 1), (b, di, N)
            return self.out_proj(y[..., 0]), conv_state, ssm_state  # (b, D)
        ssm_state = ssm_state.clone()  # step is functional: the caller's old state stays valid
        y = selective_state_update(ssm_state, x, dt, A, Bm, Cm, Dskip, z, dt_bias=bias, dt_softplus=True)
        return self.out_proj(y), conv_state, ssm_state  # (b, D)


class SpatialBlock(nn.Module):
    """Pre-norm x + MHSA(LN x) over the pixels of one frame (sine pos on q, k), then x + FFN(LN x)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.D), nn.LayerNorm(cfg.D)
        self.attn, self.ffn = Attention(cfg.D, cfg.heads), FFN(cfg.D, cfg.ffn)

    def forward(self, x, pos):  # x (n, P, D); pos (P, D)
        y = self.ln1(x)
        x = x + self.attn(y + pos, y + pos, y)
        return x + self.ffn(self.ln2(x))  # (n, P, D)


class CompressorLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.D)
        self.mamba = Mamba(cfg.D, cfg.d_state, cfg.expand, cfg.d_conv)
        self.spatial = SpatialBlock(cfg)

    def forward(self, x, pos):  # x (B, T, P, D): Mamba over T per pixel, then attention per frame
        Bsz, T = x.shape[:2]
        y = self.mamba(rearrange(self.ln(x), "b t p d -> (b p) t d"))  # (B*P, T, D)
        x = x + rearrange(y, "(b p) t d -> b t p d", b=Bsz)  # (B, T, P, D)
        return self.spatial(x.flatten(0, 1), pos).unflatten(0, (Bsz, T))  # (B, T, P, D)

    def step(self, x, conv, ssm, pos):  # x (B, P, D); conv (B*P, di, d_conv); ssm (B*P, di, N)
        y, conv, ssm = self.mamba.step(rearrange(self.ln(x), "b p d -> (b p) d"), conv, ssm)  # (B*P, D)
        return self.spatial(x + y.view_as(x), pos), conv, ssm  # (B, P, D)


class HistoryCompressor(nn.Module):
    """F_t = HistoryCompressor(E_1..E_t) (Sec. 2.2): L_c x [Mamba over time; MHSA over pixels; FFN].

    # EXERCISE: replace Mamba-1 by Mamba-2 (SSD, scalar A per head); done when
    # test_parallel_equals_recurrent and test_causality pass.
    """

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CompressorLayer(cfg) for _ in range(cfg.L_c))
        self.norm = nn.LayerNorm(cfg.D)

    def forward(self, E, pos):  # E (B, T, P, D), all frames at once (Alg. 2: one scan over T)
        for layer in self.layers:
            E = layer(E, pos)
        return self.norm(E)  # (B, T, P, D)

    def step(self, E, conv, ssm, pos):  # E (B, P, D), one frame (Alg. 1: F_t, state carried over)
        conv, ssm = list(conv), list(ssm)
        for i, layer in enumerate(self.layers):
            E, conv[i], ssm[i] = layer.step(E, conv[i], ssm[i], pos)
        return self.norm(E), conv, ssm  # (B, P, D)


class HistoryDecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = (nn.LayerNorm(cfg.D) for _ in range(3))
        self.self_attn, self.cross_attn = Attention(cfg.D, cfg.heads), Attention(cfg.D, cfg.heads)
        self.ffn = FFN(cfg.D, cfg.ffn)

    def forward(self, g, Ft, pos):  # g (n, P, D) queries; Ft (n, P, D) keys/values; pos (P, D)
        y = self.ln1(g)
        g = g + self.self_attn(y + pos, y + pos, y)
        g = g + self.cross_attn(self.ln2(g) + pos, Ft + pos, Ft)
        return g + self.ffn(self.ln3(g))  # (n, P, D)


class HistoryDecoder(nn.Module):
    """G_t = HistoryDecoder(query = X_t, key/value = F_t) (Sec. 2.2, Alg. 1); AUSM._frame adds F_t to it."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(HistoryDecoderLayer(cfg) for _ in range(cfg.L_h))
        self.norm = nn.LayerNorm(cfg.D)

    def forward(self, X, Ft, pos):  # X, Ft (n, P, D)
        for layer in self.layers:
            X = layer(X, Ft, pos)
        return self.norm(X)  # (n, P, D)


class PixelDecoderLayer(nn.Module):
    """Mask2Former decoder layer (post-norm): masked cross-attn -> self-attn among queries -> FFN."""

    def __init__(self, cfg):
        super().__init__()
        self.cross_attn, self.self_attn = Attention(cfg.D, cfg.heads), Attention(cfg.D, cfg.heads)
        self.ffn = FFN(cfg.D, cfg.ffn)
        self.n1, self.n2, self.n3 = (nn.LayerNorm(cfg.D) for _ in range(3))

    def forward(self, q, qpos, G, pos, attn_mask, keep):
        # q, qpos (n, Q, D); G (n, P, D); pos (P, D); attn_mask (n, Q, P) bool; keep (n, Q) bool
        q = self.n1(q + self.cross_attn(q + qpos, G + pos, G, attn_mask))
        q = self.n2(q + self.self_attn(q + qpos, q + qpos, q, keep[:, None, :]))  # untracked: not keys
        return self.n3(q + self.ffn(q))  # (n, Q, D)


class PixelDecoder(nn.Module):
    """Mask2Former's masked-attention transformer decoder on [A_{t-1}; V] over G_t (Sec. 2.2), heads
    after every layer and before the first (deep supervision)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.D
        self.V = nn.Parameter(torch.randn(cfg.N_det, D) * 0.02)  # V: detection queries (content)
        self.V_pos = nn.Parameter(torch.randn(cfg.N_det, D) * 0.02)  # their learned positional embedding
        self.trk_pos = nn.Parameter(torch.randn(D) * 0.02)  # learned "tracking" positional embedding
        self.layers = nn.ModuleList(PixelDecoderLayer(cfg) for _ in range(cfg.L_p))
        self.norm = nn.LayerNorm(D)
        self.fg = nn.Linear(D, 1)  # foreground logit, shared by all datasets (the 0.5 filter)
        self.cls = nn.ModuleDict({n: nn.Linear(D, k + 1) for n, k in cfg.class_heads if k > 0})
        self.mask_embed = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(),
                                        nn.Linear(D, D))
        self.lateral = nn.Conv2d(cfg.width, D, 1)  # stride-4 backbone features -> D
        self.mask_conv = nn.Conv2d(D, D, 3, padding=1)  # fuse with G_t upsampled

    def heads(self, q, mask_features, dataset):  # q (n, Q, D); mask_features (n, D, H4, W4)
        q = self.norm(q)
        cls = self.cls[dataset](q) if dataset in self.cls else None  # (n, Q, K+1); None: class-agnostic
        masks = torch.einsum("nqd,ndhw->nqhw", self.mask_embed(q), mask_features)  # (n, Q, H4, W4)
        return self.fg(q)[..., 0], cls, masks  # (n, Q)

    def forward(self, G, f4, A, live, size, dataset):
        # G (n, P, D); f4 (n, width, 2h, 2w); A (n, N, D) ID vectors of the slots; live (n, N) bool
        (h, w), n, N = size, G.shape[0], A.shape[1]
        G2 = rearrange(G, "n (h w) d -> n d h w", h=h)  # (n, D, h, w)
        mask_features = self.mask_conv(self.lateral(f4) + F.interpolate(
            G2, scale_factor=2, mode="bilinear", align_corners=False))  # (n, D, 2h, 2w)
        q = torch.cat([A, self.V.expand(n, -1, -1)], 1)  # (n, Q, D)
        qpos = torch.cat([self.trk_pos.expand(n, N, -1), self.V_pos.expand(n, -1, -1)], 1)  # (n, Q, D)
        keep = torch.cat([live, live.new_ones(n, self.V.shape[0])], 1)  # (n, Q)
        pos = sine_pos(h, w, G.shape[-1], G.device)  # (P, D)
        preds = [self.heads(q, mask_features, dataset)]
        for layer in self.layers:  # Mask2Former: attend where the previous layer's mask is > 0.5
            attn = F.avg_pool2d(preds[-1][2].detach(), 2).flatten(2) > 0  # (n, Q, P): sigmoid > 0.5
            attn = attn | ~attn.any(-1, keepdim=True)  # empty mask: attend everywhere (no NaN)
            q = layer(q, qpos, G, pos, attn, keep)
            preds.append(self.heads(q, mask_features, dataset))
        fg, cls, masks = zip(*preds)
        return {"fg": torch.stack(fg),  # (P, n, Q)
                "cls": None if cls[0] is None else torch.stack(cls),  # (P, n, Q, K+1)
                "masks": torch.stack(masks)}  # (P, n, Q, H/4, W/4)


@dataclass
class State:
    """Recurrent state of Alg. 1; its size never depends on how many frames were seen."""
    conv: list             # per compressor layer: (B*h*w, d_inner, d_conv) Mamba conv state
    ssm: list              # per compressor layer: (B*h*w, d_inner, d_state) float32 SSM state
    X_prev: torch.Tensor   # (B, D, h, w): X_{t-1}, the start token X_0 before the first frame
    ids: torch.Tensor      # (B, N) long: row of B of slot i (A_t = B[ids[alloc]])
    alloc: torch.Tensor    # (B, N) bool: slot i is in A_t
    M: torch.Tensor        # (B, N, H, W) float: M_t, latest mask of each slot

    def nbytes(self):
        ts = [*self.conv, *self.ssm, self.X_prev, self.ids, self.alloc, self.M]
        return sum(t.numel() * t.element_size() for t in ts)


class AUSM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.marker = HistoryMarker(cfg.eps)
        self.X_0 = nn.Parameter(torch.randn(cfg.D) * 0.02)  # X_0: start token, tiled over space
        self.B = nn.Parameter(torch.randn(cfg.N_id, cfg.D))  # B: buffer of ID vectors (N_id, D)
        self.compressor = HistoryCompressor(cfg)
        self.decoder = HistoryDecoder(cfg)
        self.pixel_decoder = PixelDecoder(cfg)

    def _check_frames(self, frames, where):
        H, W = frames.shape[-2:]
        if frames.shape[-3] != 3 or H % 8 or W % 8:
            raise ValueError(f"{where}: frames have shape {tuple(frames.shape)}; need 3 channels and H, W "
                             "multiples of 8 (resize or pad the video)")

    def _check_ids(self, ids):
        if ids.numel() and int(ids.max()) >= self.cfg.N_id:
            raise ValueError(f"ids contain {int(ids.max())} but the ID buffer B has only N_id="
                             f"{self.cfg.N_id} rows (raise Config.N_id or track fewer objects)")

    def _frame(self, X, f4, Ft, A, live, dataset):  # shared by both forms: History + Pixel Decoder
        h, w = X.shape[-2:]  # X (n, D, h, w); Ft (n, P, D)
        pos = sine_pos(h, w, self.cfg.D, X.device)  # (P, D)
        G = Ft + self.decoder(rearrange(X, "n d h w -> n (h w) d"), Ft, pos)  # (n, P, D); F_t +: ours, see header
        return self.pixel_decoder(G, f4, A, live, (h, w), dataset)

    def forward(self, frames, ids, history, tracked, dataset="synthetic"):
        """Parallel teacher-forced form (Alg. 2 lines 4-7). frames (B, T, 3, H, W); ids (B, N) long (-1 =
        padding slot); history (B, T, N, Hm, Wm) = M_{t-1}; tracked (B, T, N) bool = slot in A_{t-1}.
        -> {"fg": (P, B, T, Q), "cls": (P, B, T, Q, K+1) | None, "masks": (P, B, T, Q, H/4, W/4)}."""
        if frames.dim() != 5:
            raise ValueError(f"forward: frames must be (B, T, 3, H, W), got {tuple(frames.shape)}")
        self._check_frames(frames, "forward")
        Bsz, T = frames.shape[:2]
        N = ids.shape[1]
        if ids.shape != (Bsz, N) or history.shape[:3] != (Bsz, T, N) or tracked.shape != (Bsz, T, N):
            raise ValueError(f"forward: with frames {tuple(frames.shape)} and ids {tuple(ids.shape)} "
                             "expected "
                             f"history (B={Bsz}, T={T}, N={N}, H, W) and tracked ({Bsz}, {T}, {N}); got "
                             f"{tuple(history.shape)} and {tuple(tracked.shape)}")
        self._check_ids(ids)
        X, f4 = self.backbone(frames.flatten(0, 1))  # (B*T, D, h, w), (B*T, width, H/4, W/4)
        (h, w), D = X.shape[-2:], self.cfg.D
        X5 = X.unflatten(0, (Bsz, T))  # (B, T, D, h, w)
        X_0 = self.X_0.view(1, 1, D, 1, 1).expand(Bsz, 1, D, h, w)  # (B, 1, D, h, w) start token
        X_prev = torch.cat([X_0, X5[:, :-1]], 1)  # (B, T, D, h, w): shifted by one, as in a language model
        live = tracked.bool() & (ids >= 0)[:, None]  # (B, T, N)
        A = self.B[ids.clamp(min=0)]  # (B, N, D)
        A_bt = A[:, None].expand(Bsz, T, N, D).flatten(0, 1)  # (B*T, N, D)
        M = (history * live[..., None, None]).flatten(0, 1)  # (B*T, N, Hm, Wm)
        E = X_prev + self.marker(A_bt, M, (h, w)).unflatten(0, (Bsz, T))  # (B, T, D, h, w)
        pos = sine_pos(h, w, D, X.device)  # (P, D)
        Ft = self.compressor(rearrange(E, "b t d h w -> b t (h w) d"), pos)  # (B, T, P, D): one scan over T
        out = self._frame(X, f4, Ft.flatten(0, 1), A_bt, live.flatten(0, 1), dataset)
        return {k: None if v is None else v.unflatten(1, (Bsz, T)) for k, v in out.items()}  # (P, B, T, ...)

    def init_state(self, batch, N, H, W, ids=None, generator=None):
        """State before frame 1 (Alg. 1, before the loop): zero Mamba states, X_prev = X_0, nothing allocated.
        ids=None: Sampler(B, N) draws N distinct rows of B per sample."""
        cfg, dev = self.cfg, self.X_0.device
        if H % 8 or W % 8:
            raise ValueError(f"init_state: frame size {H}x{W} must be a multiple of 8")
        if ids is None:
            if N > cfg.N_id:
                raise ValueError(f"init_state: {N} slots but the ID buffer has N_id={cfg.N_id} rows")
            ids = torch.stack([torch.randperm(cfg.N_id, generator=generator)[:N] for _ in range(batch)])
        elif tuple(ids.shape) != (batch, N):
            raise ValueError(f"init_state: ids must be ({batch}, {N}), got {tuple(ids.shape)}")
        self._check_ids(ids)
        h, w, di, dtype = H // 8, W // 8, cfg.expand * cfg.D, self.X_0.dtype
        return State(conv=[torch.zeros(batch * h * w, di, cfg.d_conv, device=dev, dtype=dtype)
                           for _ in range(cfg.L_c)],
                     ssm=[torch.zeros(batch * h * w, di, cfg.d_state, device=dev) for _ in range(cfg.L_c)],
                     X_prev=self.X_0.view(1, -1, 1, 1).expand(batch, -1, h, w).clone(),  # graph kept if grad
                     ids=ids.to(dev).long(), alloc=torch.zeros(batch, N, dtype=torch.bool, device=dev),
                     M=torch.zeros(batch, N, H, W, device=dev))

    def step(self, frame, state, dataset="synthetic"):
        """Recurrent form (Alg. 1 lines 11-14) for one frame (B, 3, H, W). Uses state.alloc / state.M as
        A_{t-1} / M_{t-1}. -> out {"fg": (P, B, Q), "cls": (P, B, Q, K+1) | None, "masks": (P, B, Q, H/4,
        W/4)}, new State (X_prev = X_t; ids, alloc, M are the same tensors: the caller updates them)."""
        self._check_frames(frame, "step")
        if frame.dim() != 4 or frame.shape[0] != state.ids.shape[0] or frame.shape[-2:] != state.M.shape[-2:]:
            raise ValueError(f"step: frame {tuple(frame.shape)} does not match the state (batch "
                             f"{state.ids.shape[0]}, size {tuple(state.M.shape[-2:])}); call init_state")
        X, f4 = self.backbone(frame)  # (B, D, h, w), (B, width, H/4, W/4)
        h, w = X.shape[-2:]
        live = state.alloc & (state.ids >= 0)  # (B, N)
        A = self.B[state.ids.clamp(min=0)]  # (B, N, D)
        E = state.X_prev + self.marker(A, state.M * live[..., None, None], (h, w))  # (B, D, h, w)
        pos = sine_pos(h, w, self.cfg.D, X.device)  # (P, D)
        Ft, conv, ssm = self.compressor.step(rearrange(E, "b d h w -> b (h w) d"), state.conv, state.ssm, pos)
        out = self._frame(X, f4, Ft, A, live, dataset)  # Ft (B, P, D)
        return out, State(conv, ssm, X, state.ids, state.alloc, state.M)
