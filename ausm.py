"""AUSM: Autoregressive Universal Video Segmentation Model (Heo et al., arXiv 2508.19242).

Read beside the paper and PAPER.md (the project's notes: what the paper states, what we decided).
Implements:
  Sec. 2.1, Eq. 2   video segmentation as next-frame prediction: the outputs at frame t depend
                    on frames <= t and on the history y_0..y_{t-1} only.
  Sec. 2.2, Alg. 1  the recurrent form: `AUSM.init_state` (the state before frame 1),
                    `AUSM.step` (l.11-14, one frame), `State`; l.15-19: infer.Segmenter.
  Sec. 2.3, Alg. 2  the parallel, teacher-forced form: `AUSM.forward` (l.4-7): the History
                    Compressor as one selective scan over T at every pixel, the rest batched
                    over the b*T frames.
  Modules           Backbone, HistoryMarker (S_t), the start token X_0, the ID buffer B, the
                    detection queries V, Mamba (selective SSM), HistoryCompressor (F_t),
                    HistoryDecoder (G_t), PixelDecoder (Mask2Former's masked-attention decoder).

Dimension letters of the shape comments:
  b       batch: clips or videos side by side (B is only ever the paper's ID buffer)
  T       frames of a clip
  n       a flattened batch: of frames (b*T or b) or of pixels (b*P, Mamba's sequences)
  N       slots of a video (its capacity for tracked objects); slot i holds one row of B
  N_id    rows of B;  N_det  detection queries V;  Q = N + N_det  the Pixel Decoder's queries
  D       width of X_t, E_t, F_t, G_t and the queries;  e = D / heads  per attention head
  H, W    frame size;  h, w = H/8, W/8  the feature grid;  P = h*w;  H4, W4 = H/4, W/4
  Hm, Wm  size of the history masks M (the frame size; multiples of h, w)
  L_p+1   the Pixel Decoder's predictions (before its first layer and after each);  K  classes
  di, ds  Mamba's inner width expand*D and state size d_state;  r  dt_rank;  k  conv width
  L       length of a Mamba sequence (T in training, 1 in a step)
Paper symbols: X_t the features of frame t, X_0 the start token, B the ID buffer, V the detection
queries, A_{t-1} the ID vectors allocated before frame t, M_{t-1} their latest masks, S_t the
History Marker's output, E_t = X_{t-1} + S_t, F_t the History Compressor's output, G_t the History
Decoder's. Mamba's own input-dependent B and C matrices are `Bm` and `Cm` here.

Differs from the paper (each a [D] decision in PAPER.md, except the first, ours and measured):
  - G_t = F_t + HistoryDecoder(X_t, F_t): a residual around the History Decoder, so each pixel
    of the current frame starts with its own history. Without it a small model trained from
    scratch must first learn local attention from sine positions: tracking Dice stayed at chance
    for 2,000+ iterations; with it, it falls within ~200 (README).
  - The History Marker runs on the feature grid: masks are area-pooled to h x w before S_t's
    division, so a cell one object touches at all gets ~its full ID vector (`HistoryMarker`).
  - Backbone: a small conv net trained from scratch (strides 4 and 8) instead of Swin-T/B from
    COCO Mask2Former; it sits behind a narrow interface frames -> (X, stride-4 features).
  - Mask logits are computed on stride-4 backbone features fused with G_t upsampled 2x.
  - Every query has one foreground logit (shared by all datasets) plus an optional K+1-way
    class head chosen by dataset name.
  - Pre-norm residual blocks in the compressor and history decoder; Mask2Former's post-norm in
    the pixel decoder; its multi-scale round robin is replaced by the single stride-8 map G_t.
  - A video has N fixed slots, each with its row of B and a flag for "in A_t" (`State`), so
    the state has one shape from the first frame on.
  - Mamba.step with autograd on runs the differentiable scan at L = 1 from the state (so the
    iterative trainer can backpropagate); without autograd, the in-place selective_state_update.
Left out: Swin weights; Alg. 1 l.15-19 and the prompted A_0 / M_0, which the caller writes into
the State (infer.Segmenter; train.preprocess for teacher forcing); losses (train.py); test-time
scaling (infer.py); box and point prompts.
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
    d_state: int = 16          # ds: Mamba's SSM state size per channel
    expand: int = 2            # Mamba's expansion: di = expand * D
    d_conv: int = 4            # k: width of Mamba's causal depthwise conv
    width: int = 32            # Backbone channels at stride 4 (ours; the paper uses Swin)
    eps: float = 1e-6          # eps of the History Marker's S_t equation
    class_heads: tuple = (("synthetic", 6),)  # (dataset, K) pairs: K-way class head (+1 no-object)

    def __post_init__(self):
        # a checkpoint's JSON turns the pairs into lists: make them tuples again
        self.class_heads = tuple((str(name), int(K)) for name, K in self.class_heads)
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
        base = dict(image_size=384, D=256, N_det=100, N_id=100, L_c=6, L_h=6, L_p=9, heads=8,
                    ffn=2048, d_state=16, expand=2, d_conv=4, width=64,
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
    py = ys[:, None] / dim_t  # (h, npf)
    px = xs[:, None] / dim_t  # (w, npf)
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], 2).flatten(1)  # (h, npf)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], 2).flatten(1)  # (w, npf)
    pos = torch.cat([py[:, None].expand(h, w, npf), px[None].expand(h, w, npf)], -1)  # (h, w, D)
    return pos.flatten(0, 1)  # (h*w, D)


class Attention(nn.Module):
    """Multi-head attention on F.scaled_dot_product_attention. mask: bool, True = may attend."""

    def __init__(self, D, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, D)
        self.v = nn.Linear(D, D)
        self.o = nn.Linear(D, D)

    def forward(self, q, k, v, mask=None):  # q (n, Lq, D); k, v (n, Lk, D); mask (n, Lq or 1, Lk)
        q = rearrange(self.q(q), "n l (h e) -> n h l e", h=self.heads)  # (n, heads, Lq, e)
        k = rearrange(self.k(k), "n l (h e) -> n h l e", h=self.heads)  # (n, heads, Lk, e)
        v = rearrange(self.v(v), "n l (h e) -> n h l e", h=self.heads)  # (n, heads, Lk, e)
        if mask is not None:
            mask = mask[:, None]  # (n, 1, Lq or 1, Lk): the same for every head
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (n, heads, Lq, e)
        return self.o(rearrange(y, "n h l e -> n l (h e)"))  # (n, Lq, D)


def FFN(D, hidden):
    return nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, D))


class Backbone(nn.Module):
    """frames (n, 3, H, W) in [0, 1] -> X (n, D, h, w) at stride 8, f4 (n, width, H4, W4) at 4.

    # EXERCISE: plug a Swin-T or ResNet here (same two outputs); done when test_shapes passes.
    """

    def __init__(self, cfg):
        super().__init__()
        w = cfg.width

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.GELU()]
        self.stem = nn.Sequential(*block(3, w, 2), *block(w, w, 2), *block(w, w, 1))  # stride 4
        self.down = nn.Sequential(*block(w, 2 * w, 2), nn.Conv2d(2 * w, cfg.D, 1))  # stride 8
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)  # ImageNet statistics
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, frames):
        f4 = self.stem((frames - self.mean) / self.std)  # (n, width, H4, W4)
        X = self.down(f4)  # (n, D, h, w)
        return X, f4


class HistoryMarker(nn.Module):
    """S_t[h,w] = sum_i M^i[h,w] A^i / (eps + sum_i M^i[h,w])  (Sec. 2.2, Token Mark). No weights.

    A (n, N, D): the ID vectors A^i; M (n, N, Hm, Wm) in [0, 1]: their masks M^i at frame size. The
    sum runs over the rows given; a row whose mask is all zero paints nothing, so AUSM.forward and
    AUSM.step pass every slot, with the masks of the slots outside A_{t-1} zeroed.
    On the feature grid: each mask is first area-pooled to h x w (m^i: the share of a cell object i
    covers), then the equation runs per cell on m. The division cancels the shares: a cell one
    object touches gets m A^i / (eps + m) ~= A^i however little is covered (the mask is dilated to
    the grid; PAPER.md Sec. 4 has the measured alternative); cells several objects touch average
    their ID vectors weighted by their shares; untouched cells get 0.
    """

    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    # EXERCISE 1: write forward (the S_t equation above); done when
    # `python -m pytest --exercise 1` passes.
    def forward(self, A, M, size):  # A (n, N, D); M (n, N, Hm, Wm) in [0, 1]; size = (h, w)
        h, w = size
        Hm, Wm = M.shape[-2:]
        if Hm % h or Wm % w:
            raise ValueError(f"history masks are {Hm}x{Wm}, not a multiple of the {h}x{w} feature "
                             "grid; give masks at frame resolution (H, W multiples of 8)")
        m = M.float()  # (n, N, Hm, Wm)
        if (Hm, Wm) != (h, w):
            m = F.avg_pool2d(m, (Hm // h, Wm // w))  # (n, N, h, w): the share of each cell covered
        num = torch.einsum("nihw,nid->ndhw", m, A)  # (n, D, h, w): sum_i m^i A^i
        return num / (self.eps + m.sum(1, keepdim=True))  # (n, D, h, w): S_t


class Mamba(nn.Module):
    """Mamba-1 block (Gu & Dao 2023): in_proj -> causal depthwise conv1d -> SiLU -> x_proj (dt, Bm,
    Cm) -> dt_proj -> selective scan -> gate SiLU(z) -> out_proj. `forward` scans whole sequences;
    `step` advances them by one element from (conv_state, ssm_state)."""

    def __init__(self, D, d_state=16, expand=2, d_conv=4, dt_min=1e-3, dt_max=1e-1):
        super().__init__()
        di = expand * D
        self.d_state = d_state
        self.dt_rank = math.ceil(D / 16)
        self.d_inner = di
        self.d_conv = d_conv
        self.in_proj = nn.Linear(D, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di)
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        # dt_proj's bias: softplus(bias) = dt, log-uniform in [dt_min, dt_max]
        log_dt = torch.rand(di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # (di,)
        dt = torch.exp(log_dt).clamp(min=1e-4)  # (di,)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
        A_log = torch.log(torch.arange(1, d_state + 1.0)).repeat(di, 1)  # (di, ds): S4D-real
        self.A_log = nn.Parameter(A_log)  # A = -exp(A_log) = -(1, 2, .., ds) in every channel
        self.D = nn.Parameter(torch.ones(di))  # the skip connection
        self.out_proj = nn.Linear(di, D, bias=False)

    def forward(self, u):  # u (n, L, D)
        L = u.shape[1]
        x, z = self.in_proj(u).chunk(2, -1)  # (n, L, di) each
        # the causal depthwise conv as k shifted multiply-adds, the sum `step` does (conv1d holds
        # the weights; 4x faster than Conv1d's backward on a CPU)
        xp = F.pad(x, (0, 0, self.d_conv - 1, 0))  # (n, k - 1 + L, di)
        w = self.conv1d.weight[:, 0]  # (di, k)
        conv = 0
        for j in range(self.d_conv):
            conv = conv + xp[:, j:j + L] * w[:, j]  # (n, L, di)
        x = F.silu(self.conv1d.bias + conv)  # (n, L, di)
        sizes = [self.dt_rank, self.d_state, self.d_state]
        dt, Bm, Cm = self.x_proj(x).split(sizes, -1)  # (n, L, r), (n, L, ds), (n, L, ds)
        dt = F.linear(dt, self.dt_proj.weight)  # (n, L, di); its bias is added inside the scan
        y = selective_scan(
            x.transpose(1, 2).contiguous(),  # u (n, di, L)
            dt.transpose(1, 2).contiguous(),  # delta (n, di, L)
            -torch.exp(self.A_log.float()),  # A (di, ds)
            Bm.transpose(1, 2).contiguous(),  # (n, ds, L)
            Cm.transpose(1, 2).contiguous(),  # (n, ds, L)
            self.D.float(),  # (di,)
            z.transpose(1, 2).contiguous(),  # (n, di, L)
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True)  # (n, di, L)
        return self.out_proj(y.transpose(1, 2))  # (n, L, D)

    # EXERCISE 2: write step (one time step of forward, state not updated in place); done when
    # `python -m pytest --exercise 2` passes.
    def step(self, u, conv_state, ssm_state):  # u (n, D); conv_state (n, di, k); ssm_state fp32
        # ssm_state (n, di, ds)
        x, z = self.in_proj(u).chunk(2, -1)  # (n, di) each
        conv_state = torch.cat([conv_state[..., 1:], x[..., None]], -1)  # (n, di, k): x shifted in
        x = F.silu((conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # (n, di)
        sizes = [self.dt_rank, self.d_state, self.d_state]
        dt, Bm, Cm = self.x_proj(x).split(sizes, -1)  # (n, r), (n, ds), (n, ds)
        dt = F.linear(dt, self.dt_proj.weight)  # (n, di)
        A = -torch.exp(self.A_log.float())  # (di, ds)
        D_skip = self.D.float()  # (di,)
        dt_bias = self.dt_proj.bias.float()  # (di,)
        if torch.is_grad_enabled():
            # training the iterative form: autograd cannot see an in-place update, so run the
            # (differentiable) scan at L = 1 from ssm_state
            # forward's scan on sequences of length L = 1: x, dt, z (n, di, 1); Bm, Cm (n, ds, 1)
            y, ssm_state = selective_scan(
                x[..., None].contiguous(), dt[..., None].contiguous(), A,
                Bm[..., None].contiguous(), Cm[..., None].contiguous(), D_skip,
                z[..., None].contiguous(), delta_bias=dt_bias,
                delta_softplus=True, return_last_state=True, initial_state=ssm_state)
            # y (n, di, 1); ssm_state (n, di, ds) float32
            return self.out_proj(y[..., 0]), conv_state, ssm_state  # (n, D)
        ssm_state = ssm_state.clone()  # step is functional: the caller's old state stays valid
        y = selective_state_update(ssm_state, x, dt, A, Bm, Cm, D_skip, z, dt_bias=dt_bias,
                                   dt_softplus=True)  # (n, di); ssm_state updated in place
        return self.out_proj(y), conv_state, ssm_state  # (n, D)


class SpatialBlock(nn.Module):
    """Pre-norm x + MHSA(LN x) over the pixels of one frame (sine pos on q, k); x + FFN(LN x)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.D)
        self.ln2 = nn.LayerNorm(cfg.D)
        self.attn = Attention(cfg.D, cfg.heads)
        self.ffn = FFN(cfg.D, cfg.ffn)

    def forward(self, x, pos):  # x (n, P, D); pos (P, D)
        y = self.ln1(x)
        x = x + self.attn(y + pos, y + pos, y)
        return x + self.ffn(self.ln2(x))  # (n, P, D)


class CompressorLayer(nn.Module):
    """x + Mamba(LN x) along time at every pixel, then a SpatialBlock in every frame."""

    def __init__(self, cfg):
        super().__init__()
        self.ln = nn.LayerNorm(cfg.D)
        self.mamba = Mamba(cfg.D, cfg.d_state, cfg.expand, cfg.d_conv)
        self.spatial = SpatialBlock(cfg)

    def forward(self, x, pos):  # x (b, T, P, D); pos (P, D)
        b, T = x.shape[:2]
        u = rearrange(self.ln(x), "b t p d -> (b p) t d")  # (b*P, T, D): one sequence per pixel
        y = self.mamba(u)  # (b*P, T, D)
        x = x + rearrange(y, "(b p) t d -> b t p d", b=b)  # (b, T, P, D)
        x = self.spatial(x.flatten(0, 1), pos)  # (b*T, P, D)
        return x.unflatten(0, (b, T))  # (b, T, P, D)

    def step(self, x, conv, ssm, pos):  # x (b, P, D); conv (b*P, di, k); ssm (b*P, di, ds)
        u = rearrange(self.ln(x), "b p d -> (b p) d")  # (b*P, D)
        y, conv, ssm = self.mamba.step(u, conv, ssm)  # (b*P, D)
        x = x + y.view_as(x)  # (b, P, D)
        return self.spatial(x, pos), conv, ssm  # (b, P, D)


class HistoryCompressor(nn.Module):
    """F_t = HistoryCompressor(E_t), its state carried across t (Sec. 2.2): L_c x [Mamba over time;
    MHSA over pixels; FFN], then a LayerNorm.

    # EXERCISE: replace Mamba-1 by Mamba-2 (SSD, scalar A per head); done when
    # test_parallel_equals_recurrent and test_causality pass.
    """

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CompressorLayer(cfg) for _ in range(cfg.L_c))
        self.norm = nn.LayerNorm(cfg.D)

    def forward(self, E, pos):  # E (b, T, P, D): E_1..E_T at once (Alg. 2: one scan over T)
        for layer in self.layers:
            E = layer(E, pos)
        return self.norm(E)  # (b, T, P, D): F_1..F_T

    def step(self, E, conv, ssm, pos):  # E (b, P, D): E_t of one frame (Alg. 1)
        conv = list(conv)  # per layer: (b*P, di, k)
        ssm = list(ssm)  # per layer: (b*P, di, ds)
        for i, layer in enumerate(self.layers):
            E, conv[i], ssm[i] = layer.step(E, conv[i], ssm[i], pos)
        return self.norm(E), conv, ssm  # F_t (b, P, D)


class HistoryDecoderLayer(nn.Module):
    """Pre-norm: self-attention among X_t's pixels, cross-attention to F_t, FFN (sine pos)."""

    def __init__(self, cfg):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.D)
        self.ln2 = nn.LayerNorm(cfg.D)
        self.ln3 = nn.LayerNorm(cfg.D)
        self.self_attn = Attention(cfg.D, cfg.heads)
        self.cross_attn = Attention(cfg.D, cfg.heads)
        self.ffn = FFN(cfg.D, cfg.ffn)

    def forward(self, g, F_t, pos):  # g (n, P, D) queries; F_t (n, P, D) keys/values; pos (P, D)
        y = self.ln1(g)
        g = g + self.self_attn(y + pos, y + pos, y)
        g = g + self.cross_attn(self.ln2(g) + pos, F_t + pos, F_t)
        return g + self.ffn(self.ln3(g))  # (n, P, D)


class HistoryDecoder(nn.Module):
    """HistoryDecoder(query = X_t, key/value = F_t) (Sec. 2.2); AUSM._frame adds F_t: G_t."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(HistoryDecoderLayer(cfg) for _ in range(cfg.L_h))
        self.norm = nn.LayerNorm(cfg.D)

    def forward(self, X, F_t, pos):  # X, F_t (n, P, D); pos (P, D)
        for layer in self.layers:
            X = layer(X, F_t, pos)
        return self.norm(X)  # (n, P, D)


class PixelDecoderLayer(nn.Module):
    """Mask2Former decoder layer (post-norm): masked cross-attn, self-attn among queries, FFN."""

    def __init__(self, cfg):
        super().__init__()
        self.cross_attn = Attention(cfg.D, cfg.heads)
        self.self_attn = Attention(cfg.D, cfg.heads)
        self.ffn = FFN(cfg.D, cfg.ffn)
        self.n1 = nn.LayerNorm(cfg.D)
        self.n2 = nn.LayerNorm(cfg.D)
        self.n3 = nn.LayerNorm(cfg.D)

    def forward(self, q, qpos, G, pos, attn_mask, keep):
        # q, qpos (n, Q, D); G (n, P, D); pos (P, D); attn_mask (n, Q, P) bool; keep (n, Q) bool
        q = self.n1(q + self.cross_attn(q + qpos, G + pos, G, attn_mask))
        keys = keep[:, None, :]  # (n, 1, Q): an unallocated slot's query is no key
        q = self.n2(q + self.self_attn(q + qpos, q + qpos, q, keys))
        return self.n3(q + self.ffn(q))  # (n, Q, D)


class PixelDecoder(nn.Module):
    """Mask2Former's masked-attention decoder on the queries [A_{t-1}; V] over G_t (Sec. 2.2), with
    heads before the first layer and after each one (deep supervision): L_p + 1 predictions."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.D
        self.V = nn.Parameter(torch.randn(cfg.N_det, D) * 0.02)  # V: detection queries (content)
        self.V_pos = nn.Parameter(torch.randn(cfg.N_det, D) * 0.02)  # their learned positions
        self.trk_pos = nn.Parameter(torch.randn(D) * 0.02)  # the learned "tracking" position
        self.layers = nn.ModuleList(PixelDecoderLayer(cfg) for _ in range(cfg.L_p))
        self.norm = nn.LayerNorm(D)
        self.fg = nn.Linear(D, 1)  # foreground logit, shared by all datasets (the 0.5 filter)
        self.cls = nn.ModuleDict({name: nn.Linear(D, K + 1) for name, K in cfg.class_heads
                                  if K > 0})
        self.mask_embed = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(),
                                        nn.Linear(D, D))
        self.lateral = nn.Conv2d(cfg.width, D, 1)  # stride-4 backbone features -> D
        self.mask_conv = nn.Conv2d(D, D, 3, padding=1)  # fuse with G_t upsampled

    def heads(self, q, mask_features, dataset):  # q (n, Q, D); mask_features (n, D, H4, W4)
        q = self.norm(q)
        cls = None  # a dataset without a class head is class-agnostic
        if dataset in self.cls:
            cls = self.cls[dataset](q)  # (n, Q, K+1)
        masks = torch.einsum("nqd,ndhw->nqhw", self.mask_embed(q), mask_features)  # (n, Q, H4, W4)
        return self.fg(q)[..., 0], cls, masks  # fg (n, Q)

    def _mask_features(self, G, f4, h):  # G (n, P, D); f4 (n, width, 2h, 2w)
        G_map = rearrange(G, "n (h w) d -> n d h w", h=h)  # (n, D, h, w)
        G_up = F.interpolate(G_map, scale_factor=2, mode="bilinear", align_corners=False)
        return self.mask_conv(self.lateral(f4) + G_up)  # (n, D, 2h, 2w)

    def forward(self, G, f4, id_vecs, live, size, dataset):
        # G (n, P, D): G_t; f4 (n, width, 2h, 2w); id_vecs (n, N, D): every slot's ID vector;
        # live (n, N) bool: the slot is in A_{t-1} (other slots: no key, their outputs unused)
        h, w = size
        n = G.shape[0]
        N = id_vecs.shape[1]
        mask_features = self._mask_features(G, f4, h)  # (n, D, H4, W4)
        q = torch.cat([id_vecs, self.V.expand(n, -1, -1)], 1)  # (n, Q, D): [A_{t-1}; V]
        trk_pos = self.trk_pos.expand(n, N, -1)  # (n, N, D)
        qpos = torch.cat([trk_pos, self.V_pos.expand(n, -1, -1)], 1)  # (n, Q, D)
        keep = torch.cat([live, live.new_ones(n, self.V.shape[0])], 1)  # (n, Q)
        pos = sine_pos(h, w, G.shape[-1], G.device)  # (P, D)
        fg, cls, masks = self.heads(q, mask_features, dataset)
        all_fg = [fg]
        all_cls = [cls]
        all_masks = [masks]
        for layer in self.layers:
            # Mask2Former: attend where the previous prediction's mask is > 0.5 (logit > 0)
            attn = F.avg_pool2d(masks.detach(), 2).flatten(2) > 0  # (n, Q, P)
            attn = attn | ~attn.any(-1, keepdim=True)  # an empty mask attends everywhere (no NaN)
            q = layer(q, qpos, G, pos, attn, keep)  # (n, Q, D)
            fg, cls, masks = self.heads(q, mask_features, dataset)
            all_fg.append(fg)
            all_cls.append(cls)
            all_masks.append(masks)
        out = {"fg": torch.stack(all_fg)}  # (L_p+1, n, Q)
        out["cls"] = None if cls is None else torch.stack(all_cls)  # (L_p+1, n, Q, K+1)
        out["masks"] = torch.stack(all_masks)  # (L_p+1, n, Q, H4, W4)
        return out


@dataclass
class State:
    """Alg. 1's recurrent state between two frames; its size never depends on the frames seen.

    Each video has N slots; slot i holds row ids[i] of B (drawn by the Sampler in init_state).
    The paper's A_{t-1} is the rows of the slots with alloc True (and ids >= 0), in slot order,
    which is allocation order: A_{t-1} = AUSM.B[ids[alloc]], and M_{t-1} = M[alloc]. Slots with
    alloc False are spare capacity, not part of A_{t-1}: AUSM.step zeroes their masks before the
    History Marker and hides their queries from the Pixel Decoder's self-attention. The caller
    writes alloc and M between steps: infer.Segmenter does Alg. 1 l.15-19 (and writes a prompted
    A_0 / M_0 before the first step); train.py's iterative trainer writes the teacher-forced ones.
    """
    conv: list             # per compressor layer: (b*P, di, k) Mamba conv state
    ssm: list              # per compressor layer: (b*P, di, ds) float32 SSM state
    X_prev: torch.Tensor   # (b, D, h, w): X_{t-1}, the start token X_0 before the first frame
    ids: torch.Tensor      # (b, N) long: the row of B that slot i holds
    alloc: torch.Tensor    # (b, N) bool: slot i is in A_{t-1} (in A_t once the caller updated it)
    M: torch.Tensor        # (b, N, H, W) float: M_{t-1}, the latest mask of each slot

    def nbytes(self):
        tensors = [*self.conv, *self.ssm, self.X_prev, self.ids, self.alloc, self.M]
        return sum(t.numel() * t.element_size() for t in tensors)


def sampler(N_id, n, batch, generator=None):
    """Sampler(B, n) of Alg. 1 for `batch` videos: n distinct rows of B each, uniformly at random.
    -> (batch, n) long. Taking a video's rows in order hands out, at each allocation, a uniform
    draw from the rows not in use yet (B \\ A_{t-1}), as the paper's Sampler(B \\ A_{t-1}, .)."""
    rows = []
    for _ in range(batch):
        rows.append(torch.randperm(N_id, generator=generator)[:n])  # (n,)
    return torch.stack(rows)  # (batch, n)


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
            raise ValueError(f"{where}: frames have shape {tuple(frames.shape)}; need 3 channels "
                             "and H, W multiples of 8 (resize or pad the video)")

    def _check_ids(self, ids):
        if ids.numel() and int(ids.max()) >= self.cfg.N_id:
            raise ValueError(f"ids contain {int(ids.max())} but the ID buffer B has only N_id="
                             f"{self.cfg.N_id} rows (raise Config.N_id or track fewer objects)")

    def _check_forward_inputs(self, frames, ids, history, tracked):
        if frames.dim() != 5:
            raise ValueError(f"forward: frames must be (b, T, 3, H, W), got {tuple(frames.shape)}")
        self._check_frames(frames, "forward")
        b, T = frames.shape[:2]
        N = ids.shape[1]
        if ids.shape != (b, N) or history.shape[:3] != (b, T, N) or tracked.shape != (b, T, N):
            raise ValueError(f"forward: with frames {tuple(frames.shape)} and ids "
                             f"{tuple(ids.shape)} expected history (b={b}, T={T}, N={N}, H, W) "
                             f"and tracked ({b}, {T}, {N}); got {tuple(history.shape)} and "
                             f"{tuple(tracked.shape)}")
        self._check_ids(ids)

    def _check_step_inputs(self, frame, state):
        self._check_frames(frame, "step")
        b = state.ids.shape[0]
        if frame.dim() != 4 or frame.shape[0] != b or frame.shape[-2:] != state.M.shape[-2:]:
            raise ValueError(f"step: frame {tuple(frame.shape)} does not match the state (batch "
                             f"{b}, size {tuple(state.M.shape[-2:])}); call init_state")

    def _frame(self, X, f4, F_t, id_vecs, live, dataset):  # Alg. 1 l.13-14 = Alg. 2 l.6-7
        # X (n, D, h, w): X_t; f4 (n, width, H4, W4); F_t (n, P, D); id_vecs (n, N, D); live (n, N)
        h, w = X.shape[-2:]
        pos = sine_pos(h, w, self.cfg.D, X.device)  # (P, D)
        X_seq = rearrange(X, "n d h w -> n (h w) d")  # (n, P, D)
        G = F_t + self.decoder(X_seq, F_t, pos)  # (n, P, D): G_t (F_t + is ours, see the header)
        return self.pixel_decoder(G, f4, id_vecs, live, (h, w), dataset)  # y_trk and y_det

    # EXERCISE 10: write embed (E_t for every t); done when `python -m pytest --exercise 10` passes
    def embed(self, X_1T, id_vecs, M_prev):  # X_1T (b, T, D, h, w); id_vecs (b*T, N, D)
        """E_t = X_{t-1} + S_t for t = 1..T, X_0 (the start token) before frame 1; S_t the History
        Marker of the ID vectors and M_prev (b*T, N, Hm, Wm). -> E (b, T, D, h, w)."""
        b, T, D, h, w = X_1T.shape
        X_0 = self.X_0.view(1, 1, D, 1, 1).expand(b, 1, D, h, w)  # (b, 1, D, h, w): start token
        X_prev = torch.cat([X_0, X_1T[:, :-1]], 1)  # (b, T, D, h, w): X_{t-1}, shifted by one frame
        S = self.marker(id_vecs, M_prev, (h, w)).unflatten(0, (b, T))  # (b, T, D, h, w): S_t
        return X_prev + S  # (b, T, D, h, w)  Alg. 2: E_t = X_{t-1} + S_t for every t at once

    def forward(self, frames, ids, history, tracked, dataset="synthetic"):
        """The parallel, teacher-forced form (Alg. 2 l.4-7): every frame of b clips at once.

        frames (b, T, 3, H, W) in [0, 1]; ids (b, N) long: the row of B of each slot (-1: padding);
        history (b, T, N, Hm, Wm): at index t the masks M_{t-1} marked before frame t (ground
        truth: teacher forcing); tracked (b, T, N) bool: at index t, slot i is in A_{t-1}.
        -> {"fg": (L_p+1, b, T, Q), "cls": (L_p+1, b, T, Q, K+1) or None,
            "masks": (L_p+1, b, T, Q, H4, W4)}: queries 0..N-1 are the slots', N..Q-1 are V's.
        """
        self._check_forward_inputs(frames, ids, history, tracked)
        b, T = frames.shape[:2]
        N = ids.shape[1]
        D = self.cfg.D
        X, f4 = self.backbone(frames.flatten(0, 1))  # (b*T, D, h, w): X_1..X_T; f4 (b*T, width, ..)
        h, w = X.shape[-2:]
        live = tracked.bool() & (ids >= 0)[:, None]  # (b, T, N): slot i is in A_{t-1}
        id_vecs = self.B[ids.clamp(min=0)]  # (b, N, D): every slot's ID vector
        id_vecs = id_vecs[:, None].expand(b, T, N, D).flatten(0, 1)  # (b*T, N, D)
        M_prev = (history * live[..., None, None]).flatten(0, 1)  # (b*T, N, Hm, Wm): M_{t-1}
        E = self.embed(X.unflatten(0, (b, T)), id_vecs, M_prev)  # (b, T, D, h, w): E_1..E_T
        pos = sine_pos(h, w, D, X.device)  # (P, D)
        E_seq = rearrange(E, "b t d h w -> b t (h w) d")  # (b, T, P, D)
        F_1T = self.compressor(E_seq, pos)  # (b, T, P, D)  Alg. 2: F_1..F_T, one scan over T
        F_1T = F_1T.flatten(0, 1)  # (b*T, P, D)
        out = self._frame(X, f4, F_1T, id_vecs, live.flatten(0, 1), dataset)  # G_t, y_trk, y_det
        for key in ("fg", "cls", "masks"):
            if out[key] is not None:
                out[key] = out[key].unflatten(1, (b, T))  # (L_p+1, b, T, ...)
        return out

    def init_state(self, batch, N, H, W, ids=None, generator=None):
        """The State before frame 1 (Alg. 1, before the loop): `batch` videos, N slots, H x W.

        Zero Mamba states, X_prev = X_0 tiled, no slot allocated (alloc all False, M zero: A_0 and
        M_0 empty). ids=None: the Sampler draws each video's N rows of B now (`sampler`, from
        `generator`), one per slot; else ids (batch, N) gives them (train.py: the rows that
        train.preprocess drew). Allocation is the caller's: infer.Segmenter passes ids = -1 (no
        row drawn yet) and, when an object joins (a prompt, or a detection: Alg. 1 l.17-19), draws
        its row from B \\ A_{t-1} and writes State.ids, State.alloc and State.M.
        """
        cfg = self.cfg
        dev = self.X_0.device
        if H % 8 or W % 8:
            raise ValueError(f"init_state: frame size {H}x{W} must be a multiple of 8")
        if ids is None:
            if N > cfg.N_id:
                raise ValueError(f"init_state: {N} slots but the ID buffer has N_id={cfg.N_id} "
                                 "rows")
            ids = sampler(cfg.N_id, N, batch, generator)  # (batch, N)
        elif tuple(ids.shape) != (batch, N):
            raise ValueError(f"init_state: ids must be ({batch}, {N}), got {tuple(ids.shape)}")
        self._check_ids(ids)
        h = H // 8
        w = W // 8
        di = cfg.expand * cfg.D
        conv = []
        ssm = []
        for _ in range(cfg.L_c):
            conv.append(torch.zeros(batch * h * w, di, cfg.d_conv, device=dev,
                                    dtype=self.X_0.dtype))
            ssm.append(torch.zeros(batch * h * w, di, cfg.d_state, device=dev))  # float32
        X_prev = self.X_0.view(1, -1, 1, 1).expand(batch, -1, h, w).clone()  # (batch, D, h, w)
        alloc = torch.zeros(batch, N, dtype=torch.bool, device=dev)  # (batch, N): A_0 empty
        M = torch.zeros(batch, N, H, W, device=dev)  # (batch, N, H, W): M_0 empty
        return State(conv=conv, ssm=ssm, X_prev=X_prev, ids=ids.to(dev).long(), alloc=alloc, M=M)

    def step(self, frame, state, dataset="synthetic"):
        """One iteration of Alg. 1's loop, l.11-14, on one frame (b, 3, H, W) in [0, 1] of b videos.

        Reads A_{t-1} and M_{t-1} from `state` (see State) and returns out = {"fg": (L_p+1, b, Q),
        "cls": (L_p+1, b, Q, K+1) or None, "masks": (L_p+1, b, Q, H4, W4)} (queries 0..N-1: the
        slots' tracking queries, y_trk; N..Q-1: V's, y_det) and the next State: new Mamba states
        and X_prev = X_t; ids, alloc and M are the same tensors, for the caller to write A_t and
        M_t into (Alg. 1 l.15-19).
        """
        self._check_step_inputs(frame, state)
        X, f4 = self.backbone(frame)  # (b, D, h, w): X_t; f4 (b, width, H4, W4)
        h, w = X.shape[-2:]
        live = state.alloc & (state.ids >= 0)  # (b, N): slot i is in A_{t-1}
        id_vecs = self.B[state.ids.clamp(min=0)]  # (b, N, D): every slot's ID vector
        M_prev = state.M * live[..., None, None]  # (b, N, H, W): M_{t-1}, zero outside A_{t-1}
        S = self.marker(id_vecs, M_prev, (h, w))  # (b, D, h, w): HistoryMarker(A_{t-1}, M_{t-1})
        E = state.X_prev + S  # (b, D, h, w)  Alg. 1 l.11: E_t = X_{t-1} + S_t
        pos = sine_pos(h, w, self.cfg.D, X.device)  # (P, D)
        E_seq = rearrange(E, "b d h w -> b (h w) d")  # (b, P, D)
        F_t, conv, ssm = self.compressor.step(E_seq, state.conv, state.ssm, pos)  # Alg. 1 l.12
        out = self._frame(X, f4, F_t, id_vecs, live, dataset)  # Alg. 1 l.13-14: G_t, y_trk, y_det
        return out, State(conv, ssm, X, state.ids, state.alloc, state.M)
