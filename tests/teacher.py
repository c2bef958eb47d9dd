"""Teacher's material for the classroom exercises (EXERCISES.md, TEACHER.md): not in a handout.

`python tests/exercises.py handout N ... --out DIR` leaves this file out, with
tests/test_exercises.py (the meta-test that uses it) and TEACHER.md. It holds, per exercise, subtly
wrong implementations that its check must reject (WRONG) and, for the open-ended exercise 9, one
solution that must pass (SOLUTIONS). `python -m pytest CHECK --exercise-swap N:NAME` (conftest.py)
swaps one in before the tests are imported.
"""
import numpy as np
import torch
import torch.nn.functional as F

import exercises


# ------------------------------------------------------------------ exercise 1: HistoryMarker
def marker_sum(self, A, M, size):
    """The numerator alone: overlapping objects add up instead of averaging."""
    h, w = size
    Hm, Wm = M.shape[-2:]
    m = F.avg_pool2d(M.float(), (Hm // h, Wm // w))  # (n, N, h, w)
    return torch.einsum("nihw,nid->ndhw", m, A)  # (n, D, h, w)


def marker_pool_sides_swapped(self, A, M, size):
    """The pooling kernel's sides swapped, (Wm // w, Hm // h): right only on square factors."""
    h, w = size
    Hm, Wm = M.shape[-2:]
    if Hm % h or Wm % w:
        raise ValueError(f"history masks are {Hm}x{Wm}, not a multiple of the {h}x{w} grid")
    m = F.avg_pool2d(M.float(), (Wm // w, Hm // h))  # BUG: (kW, kH); (n, N, ?, ?)
    num = torch.einsum("nihw,nid->ndhw", m, A)  # (n, D, ?, ?)
    return num / (self.eps + m.sum(1, keepdim=True))


def marker_bilinear(self, A, M, size):
    """A bilinear resize, not the area average: samples the masks instead of measuring occupancy."""
    h, w = size
    Hm, Wm = M.shape[-2:]
    if Hm % h or Wm % w:
        raise ValueError(f"history masks are {Hm}x{Wm}, not a multiple of the {h}x{w} grid")
    m = F.interpolate(M.float(), (h, w), mode="bilinear")  # BUG: not an area mean; (n, N, h, w)
    num = torch.einsum("nihw,nid->ndhw", m, A)  # (n, D, h, w)
    return num / (self.eps + m.sum(1, keepdim=True))  # (n, D, h, w)


# ------------------------------------------------------------------ exercise 2: Mamba.step
def _mamba_step(self, u, conv_state, ssm_state, shift=True, clone=True):
    """Mamba.step written with the two mistakes as switches (both True: a correct step)."""
    import kernels
    x, z = self.in_proj(u).chunk(2, -1)  # (b, di) each
    if shift:
        conv_state = torch.cat([conv_state[..., 1:], x[..., None]], -1)  # (b, di, d_conv)
    else:
        conv_state = torch.cat([conv_state[..., :-1], x[..., None]], -1)  # BUG: no shift
    x = F.silu((conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # (b, di)
    sizes = [self.dt_rank, self.d_state, self.d_state]
    dt, Bm, Cm = self.x_proj(x).split(sizes, -1)  # (b, r), (b, N), (b, N)
    dt = F.linear(dt, self.dt_proj.weight)  # (b, di)
    A = -torch.exp(self.A_log.float())  # (di, N)
    if clone:
        ssm_state = ssm_state.clone()
    y = kernels.selective_state_update_ref(ssm_state, x, dt, A, Bm, Cm, self.D.float(), z,
                                           self.dt_proj.bias.float(), dt_softplus=True)  # (b, di)
    return self.out_proj(y), conv_state, ssm_state  # (b, D)


def mamba_step_unshifted(self, u, conv_state, ssm_state):
    """The conv window is not shifted: the newest input overwrites the last column."""
    return _mamba_step(self, u, conv_state, ssm_state, shift=False)


def mamba_step_in_place(self, u, conv_state, ssm_state):
    """The SSM state is updated in the caller's tensor: a caller keeping the old state loses it."""
    return _mamba_step(self, u, conv_state, ssm_state, clone=False)


# ------------------------------------------------------------------ exercise 3: selective_scan_ref
def scan_ref_no_skip(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     return_last_state=False, initial_state=None):
    """The reference scan without the D skip (y_t = <C_t, h_t>, D ignored)."""
    ref = exercises.ORIGINALS[3]
    return ref(u, delta, A, B, C, None, z, delta_bias, delta_softplus, return_last_state,
               initial_state)


def scan_ref_no_upcast(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    """The loop computed in the inputs' own dtype: bfloat16 / float16 states lose their digits."""
    wt = u.dtype  # BUG: not float32
    if torch.float64 in (u.dtype, delta.dtype, A.dtype, B.dtype):
        wt = torch.float64
    batch, dim, L = u.shape
    groups = B.shape[1] if B.dim() == 4 else 1
    dstate = A.shape[1]
    delta = delta.to(wt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(wt)[:, None]  # (b, d, l)
    if delta_softplus:
        delta = F.softplus(delta)
    B = B.to(wt).reshape(batch, groups, dstate, L).repeat_interleave(dim // groups, 1)  # b d n l
    C = C.to(wt).reshape(batch, groups, dstate, L).repeat_interleave(dim // groups, 1)  # b d n l
    h = torch.zeros(batch, dim, dstate, dtype=wt)  # (b, d, n)
    if initial_state is not None:
        h = initial_state.to(wt)
    ys = []
    for t in range(L):
        a = torch.exp(delta[:, :, t, None] * A.to(wt))  # (b, d, n)
        h = a * h + (delta[:, :, t] * u[:, :, t].to(wt))[..., None] * B[..., t]  # (b, d, n)
        ys.append((h * C[..., t]).sum(-1))  # (b, d)
    y = torch.stack(ys, -1)  # (b, d, l)
    if D is not None:
        y = y + u.to(wt) * D.to(wt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(wt))
    y = y.to(u.dtype)
    if return_last_state:
        return y, h
    return y


# ------------------------------------------------------------------ exercise 4: _scan_fwd_kernel
def scan_fwd_no_euler_delta():
    """The Triton forward kernel with h_t = exp(delta A) h_{t-1} + B_t u_t (no delta_t on the
    input). A factory: the kernel is built (and needs triton) only when it is swapped in."""
    import triton
    import triton.language as tl
    import kernels
    names = ("_load_step", "_setup", "_sigmoid")
    globals().update(tl=tl, **{k: getattr(kernels, k) for k in names})  # read by Triton

    @triton.jit
    def kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr,
               ckpt_ptr, dim, L, dstate, dim_g, n_ckpt, every,
               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
               SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        b, d, n, mask_d, mask_n, mask, A, Dv, bias, row, bc, state = _setup(  # noqa: F821
            A_ptr, D_ptr, bias_ptr, dim, L, dstate, dim_g, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
        h = tl.load(h0_ptr + state, mask=mask & HAS_H0, other=0.0).to(tl.float32)
        for t in range(L):
            u, delta, _, Bt = _load_step(u_ptr, dt_ptr, B_ptr, row + t, bc + t, bias,  # noqa: F821
                                         mask_d, mask_n, SOFTPLUS)
            Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(delta[:, None] * A) * h + u[:, None] * Bt[None, :]  # BUG: no delta_t
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
            if HAS_Z:
                zt = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                y = y * zt * _sigmoid(zt)  # noqa: F821
            tl.store(out_ptr + row + t, y, mask=mask_d)
            tt = t + tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.int32)
            keep = ((tt + 1) % every == 0) | (tt == L - 1)
            slot = (b * n_ckpt + t // every) * dim + d[:, None]
            tl.store(ckpt_ptr + slot * dstate + n[None, :], h, mask=mask & keep)
    return kernel


# ------------------------------------------------------------------ exercise 5: preprocess
def preprocess_tracked_also_detected(clips, cfg, generator, p_prompt=0.5):
    """Tracked instances stay detection targets (det = visible): the detection queries would be
    trained to re-detect what the tracking queries already hold."""
    batch = exercises.ORIGINALS[5](clips, cfg, generator, p_prompt)
    batch["det"] = batch["visible"].clone()  # BUG: should be visible & ~tracked
    return batch


# ------------------------------------------------------------------ exercise 6: hungarian
def hungarian_greedy(cost):
    """Greedy matching: take the cheapest remaining pair, repeat. Often right, not optimal."""
    C = np.array(cost, dtype=np.float64)
    rows = []
    cols = []
    for _ in range(min(C.shape) if C.ndim == 2 else 0):
        r, c = np.unravel_index(np.argmin(C), C.shape)
        rows.append(r)
        cols.append(c)
        C[r, :] = np.inf
        C[:, c] = np.inf
    order = np.argsort(rows)
    return np.array(rows, dtype=np.int64)[order], np.array(cols, dtype=np.int64)[order]


# ------------------------------------------------------------------ exercise 7: davis_f
def davis_f_floor(pred, gt, bound_th=0.008):
    """Boundary F whose tolerance radius is rounded down (davis2017 rounds it up)."""
    import infer
    pred = np.asarray(pred, bool)
    gt = np.asarray(gt, bool)
    r = int(bound_th if bound_th >= 1 else np.floor(bound_th * np.linalg.norm(gt.shape)))  # BUG
    pb = infer._seg2bmap(pred)
    gb = infer._seg2bmap(gt)
    if pb.sum() == 0 or gb.sum() == 0:
        return 1.0 if pb.sum() == gb.sum() else 0.0
    precision = (pb & infer._dilate(gb, r)).sum() / pb.sum()
    recall = (gb & infer._dilate(pb, r)).sum() / gb.sum()
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


# ------------------------------------------------------------------ exercise 8: segment
def _no_prompts(t, stem):
    return None


def segment_repeating_ends(seg, T, frame, prompts=_no_prompts, tts=False):
    """Test-time repetition as 1..T, T..1, 1..T: the turning frames T and 1 fed twice in a row."""
    order = list(range(T))
    if tts:
        order += list(range(T - 1, -1, -1)) + list(range(T))  # BUG: T and 1 repeated
    for n, t in enumerate(order):
        img, stem = frame(t)
        ids, scores = seg.step(img, prompts(t, stem) if n < T else None)
        if n >= len(order) - T:
            yield t, stem, img, ids, scores


def segment_prompts_every_pass(seg, T, frame, prompts=_no_prompts, tts=False):
    """The right order, but the prompts are given again in the backward and second forward pass."""
    order = list(range(T))
    if tts:
        order += list(range(T - 2, -1, -1)) + list(range(1, T))
    for n, t in enumerate(order):
        img, stem = frame(t)
        ids, scores = seg.step(img, prompts(t, stem))  # BUG: prompts after the first pass too
        if n >= len(order) - T:
            yield t, stem, img, ids, scores


# ------------------------------------------------------------------ exercise 9 (open): box_to_mask
def box_as_rectangle(frame, box):
    """The trivial box prompt: the filled rectangle (mean IoU 0.51; what the exercise must beat)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m = np.zeros(frame.shape[-2:], bool)
    m[y0:y1, x0:x1] = True
    return m


def box_by_colour(frame, box, tol=0.15, tol2=0.35):
    """One solution of exercise 9 (mean IoU 0.87). Inside the box, the pixels whose colour is far
    from the median colour of the box's border (mostly background: a tight box touches its object
    at a few points) and near the median colour of those far pixels (the object; this drops other
    objects that occlude part of the box)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    crop = np.asarray(frame, np.float32)[:, y0:y1, x0:x1]  # (3, h, w)
    edges = [crop[:, 0], crop[:, -1], crop[:, :, 0], crop[:, :, -1]]
    border = np.concatenate(edges, 1)  # (3, 2h + 2w)
    far = np.linalg.norm(crop - np.median(border, 1)[:, None, None], axis=0) > tol  # (h, w)
    if far.any():
        inside = np.median(crop[:, far], 1)[:, None, None]  # (3, 1, 1)
        far &= np.linalg.norm(crop - inside, axis=0) < tol2
    m = np.zeros(frame.shape[-2:], bool)
    m[y0:y1, x0:x1] = far
    return m


# ------------------------------------------------------------------ exercise 10: AUSM.embed
def embed_no_shift(self, X_1T, id_vecs, M_prev):
    """E_t = X_t + S_t: each frame's own features, not the previous frame's (still causal)."""
    b, T, D, h, w = X_1T.shape
    S = self.marker(id_vecs, M_prev, (h, w)).unflatten(0, (b, T))  # (b, T, D, h, w)
    return X_1T + S  # BUG: X_t, not X_{t-1}


def embed_zero_start_token(self, X_1T, id_vecs, M_prev):
    """The shift is right but frame 1 gets zeros instead of the learned start token X_0."""
    b, T, D, h, w = X_1T.shape
    X_0 = torch.zeros(b, 1, D, h, w)  # BUG: not self.X_0
    X_prev = torch.cat([X_0, X_1T[:, :-1]], 1)  # (b, T, D, h, w)
    S = self.marker(id_vecs, M_prev, (h, w)).unflatten(0, (b, T))  # (b, T, D, h, w)
    return X_prev + S


# ------------------------------------------------------------------ exercise 11: _tracking_loss
def tracking_loss_hungarian(fg, cls, masks, batch, lab, K):
    """The tracking queries matched to the tracked, visible instances by Hungarian matching, as
    the detection loss does: query i is no longer bound to instance i, absent ones drop out."""
    import train
    N = lab.shape[-1]
    both = [fg[..., :N], fg[..., :N]]  # the tracking queries twice: the second copy gets matched
    fg2 = torch.cat(both, -1)  # (P, b, T, 2N)
    cls2 = None if cls is None else torch.cat([cls[..., :N, :], cls[..., :N, :]], -2)
    masks2 = torch.cat([masks[:, :, :, :N], masks[:, :, :, :N]], 3)  # (P, b, T, 2N, h, w)
    batch2 = dict(batch, det=batch["tracked"] & batch["visible"])  # BUG: matched, not fixed
    return train._detection_loss(fg2, cls2, masks2, batch2, lab, K)


def tracking_loss_absent_ignored(fg, cls, masks, batch, lab, K):
    """A tracked object absent from the frame is skipped (weight 0, no mask loss) instead of being
    "no object" with an empty mask: nothing teaches the query to let go."""
    batch2 = dict(batch, tracked=batch["tracked"] & batch["visible"])  # BUG
    return exercises.ORIGINALS[11](fg, cls, masks, batch2, lab, K)


# ------------------------------------------------------------------ exercise 12: _detection_loss
def detection_loss_fixed_order(fg, cls, masks, batch, lab, K):
    """Detection query N+j is given the frame's j-th detection target (in instance order), no
    matching: the loss depends on the order of the queries."""
    import train
    real = train.hungarian

    def in_order(cost):
        k = min(cost.shape)
        return np.arange(k), np.arange(k)  # BUG: query j <-> target j
    train.hungarian = in_order
    try:
        return exercises.ORIGINALS[12](fg, cls, masks, batch, lab, K)
    finally:
        train.hungarian = real


def detection_loss_tracked_as_targets(fg, cls, masks, batch, lab, K):
    """Every visible object is a detection target, the tracked ones too (det = visible)."""
    batch2 = dict(batch, det=batch["visible"])  # BUG: should be visible and not tracked
    return exercises.ORIGINALS[12](fg, cls, masks, batch2, lab, K)


def detection_loss_no_empty_weight(fg, cls, masks, batch, lab, K):
    """The unmatched detection queries' "no object" CE weighted 1, not 0.1: with 5+ empty queries
    per object, the queries learn to say "no object"."""
    import train
    real = train.NO_OBJECT_WEIGHT
    train.NO_OBJECT_WEIGHT = 1.0  # BUG: Mask2Former's empty weight is 0.1
    try:
        return exercises.ORIGINALS[12](fg, cls, masks, batch, lab, K)
    finally:
        train.NO_OBJECT_WEIGHT = real
# ------------------------------------------------------------------ exercise 13: _allocate
def _allocate_with(seg, ids, masks, pool="free", keep="first", history=True, warn_once=True):
    """Segmenter._allocate written with the mistakes as switches (the defaults: a correct one)."""
    import warnings
    N = seg.model.cfg.N_id
    n = len(seg.slot)
    fit = min(len(ids), N - n)
    if fit < len(ids) and not seg.warned_full:
        warnings.warn(f"frame {seg.t}: the ID buffer (N_id={N}) is full; no new objects "
                      "from here on")
        seg.warned_full = warn_once
    free = torch.ones(N, dtype=torch.bool)
    if pool != "all":
        free[seg.state.ids[0, :n].cpu()] = False
    rows = torch.nonzero(free)[:, 0]  # B \ A_{t-1} (pool "all": B)
    if pool != "in order":
        rows = rows[torch.randperm(len(rows), generator=seg.sampler)]
    rows = rows[:fit]
    chosen = list(range(fit))
    if keep == "last":
        chosen = list(range(len(ids) - fit, len(ids)))
    for j, k in enumerate(chosen):
        seg.slot[ids[k]] = n + j
        seg.state.ids[0, n + j] = rows[j]
        seg.state.alloc[0, n + j] = True
        if history:
            seg.state.M[0, n + j] = masks[k]
    return [ids[k] for k in chosen]


def allocate_empty_history(self, ids, masks):
    """New objects join A_t with an empty M_t: their first History Marker paints nothing."""
    return _allocate_with(self, ids, masks, history=False)


def allocate_from_all_of_B(self, ids, masks):
    """Rows drawn from all of B, not B \\ A_{t-1}: a new object may get a tracked object's ID."""
    return _allocate_with(self, ids, masks, pool="all")


def allocate_in_order(self, ids, masks):
    """No Sampler: the lowest free rows in order, so every video uses rows 0, 1, 2, ..."""
    return _allocate_with(self, ids, masks, pool="in order")


def allocate_keeps_the_last(self, ids, masks):
    """When B is nearly full, the least sure detections (the last of ids) get its last rows."""
    return _allocate_with(self, ids, masks, keep="last")


def allocate_warns_every_frame(self, ids, masks):
    """The full-buffer warning repeated on every frame that has a new object B cannot take."""
    return _allocate_with(self, ids, masks, warn_once=False)


# ------------------------------------------------------------------ the tables the meta-test reads
WRONG = {  # exercise -> the wrong versions its check must reject
    1: (marker_sum, marker_pool_sides_swapped, marker_bilinear),
    2: (mamba_step_unshifted, mamba_step_in_place),
    3: (scan_ref_no_skip, scan_ref_no_upcast),
    4: (scan_fwd_no_euler_delta,),
    5: (preprocess_tracked_also_detected,),
    6: (hungarian_greedy,),
    7: (davis_f_floor,),
    8: (segment_repeating_ends, segment_prompts_every_pass),
    9: (box_as_rectangle,),
    10: (embed_no_shift, embed_zero_start_token),
    11: (tracking_loss_hungarian, tracking_loss_absent_ignored),
    12: (detection_loss_fixed_order, detection_loss_tracked_as_targets,
         detection_loss_no_empty_weight),
    13: (allocate_empty_history, allocate_from_all_of_B, allocate_in_order,
         allocate_keeps_the_last, allocate_warns_every_frame),
}
SOLUTIONS = {9: box_by_colour}  # open-ended exercises: one way to pass (the bar can be met)
FACTORIES = (scan_fwd_no_euler_delta,)  # built on first use (they define Triton kernels)
