"""Classroom exercises (EXERCISES.md): the table, the teacher's `blank` command, and the swaps the meta-test uses.

    python tests/exercises.py list        the table: number, target, paper section, checking command
    python tests/exercises.py blank N     replace exercise N's body in its source file by
                                          raise NotImplementedError("EXERCISE N: ...") (signature and docstring
                                          kept); `git checkout -- FILE` restores the reference implementation
    python -m pytest --exercise N         run exercise N's checking tests (what a student runs when done)

Each exercise names a target "module:qualname", the tests that check it ("file -k expr") and a subtly wrong
implementation. tests/test_exercises.py proves every check can fail: with the target swapped for a stub
(`--exercise-swap N:stub`, see conftest.py) or for the wrong version (`N:wrong`), the check fails.
"""
import ast
import importlib
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Exercise:
    title: str
    target: str            # "module:qualname" of the function the student writes
    section: str           # where the paper (or Mamba, or DAVIS) defines it
    check: str             # "tests/test_x.py -k expr": the tests that must pass
    wrong: object = None   # a subtly wrong implementation (same signature)
    solution: object = None  # open-ended exercises: one way to pass (proves the bar can be met)


# ----------------------------------------------------------------------------- subtly wrong implementations
def marker_sum(self, A, M, size):
    """History Marker without the eps-normalised average: overlapping objects add up instead of averaging."""
    (h, w), (Hm, Wm) = size, M.shape[-2:]
    m = F.avg_pool2d(M.float(), (Hm // h, Wm // w)) if (Hm, Wm) != (h, w) else M.float()  # (n, N, h, w)
    return torch.einsum("nihw,nid->ndhw", m, A)  # (n, D, h, w)


def mamba_step_unshifted(self, u, conv_state, ssm_state):
    """Mamba step whose conv window is not shifted: the newest input overwrites the last column, so the
    causal conv sees the current input next to stale ones in the wrong places."""
    import kernels
    x, z = self.in_proj(u).chunk(2, -1)  # (b, di) each
    conv_state = torch.cat([conv_state[..., :-1], x[..., None]], -1)  # BUG: no shift
    x = F.silu((conv_state * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # (b, di)
    dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], -1)
    ssm_state = ssm_state.clone()
    A, dt = -torch.exp(self.A_log.float()), F.linear(dt, self.dt_proj.weight)  # (di, N), (b, di)
    y = kernels.selective_state_update_ref(ssm_state, x, dt, A, Bm, Cm, self.D.float(), z, self.dt_proj.bias.float(),
                                           dt_softplus=True)  # (b, di)
    return self.out_proj(y), conv_state, ssm_state  # (b, D)


def scan_ref_no_skip(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                     return_last_state=False, initial_state=None):
    """The reference scan without the D skip (y_t = <C_t, h_t>, D ignored)."""
    return ORIGINALS[3](u, delta, A, B, C, None, z, delta_bias, delta_softplus, return_last_state, initial_state)


def _scan_fwd_no_euler_delta():
    """The Triton forward kernel with h_t = exp(delta A) h_{t-1} + B_t u_t: the input term misses delta_t."""
    import triton
    import triton.language as tl
    import kernels
    globals().update(tl=tl, **{k: getattr(kernels, k) for k in ("_load_step", "_setup", "_sigmoid")})  # read by Triton

    @triton.jit
    def kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr, ckpt_ptr,
               dim, L, dstate, dim_g, n_ckpt, every,
               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        b, d, n, mask_d, mask_n, mask, A, Dv, bias, row, bc, state = _setup(
            A_ptr, D_ptr, bias_ptr, dim, L, dstate, dim_g, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
        h = tl.load(h0_ptr + state, mask=mask & HAS_H0, other=0.0).to(tl.float32)
        for t in range(L):
            u, delta, _, Bt = _load_step(u_ptr, dt_ptr, B_ptr, row + t, bc + t, bias, mask_d, mask_n, SOFTPLUS)
            Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(delta[:, None] * A) * h + u[:, None] * Bt[None, :]  # BUG: no delta_t on the input
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * u
            if HAS_Z:
                zt = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                y = y * zt * _sigmoid(zt)
            tl.store(out_ptr + row + t, y, mask=mask_d)
            tt = t + tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.int32)
            keep = ((tt + 1) % every == 0) | (tt == L - 1)
            tl.store(ckpt_ptr + ((b * n_ckpt + t // every) * dim + d[:, None]) * dstate + n[None, :], h,
                     mask=mask & keep)
    return kernel


def preprocess_tracked_also_detected(clips, cfg, generator, p_prompt=0.5):
    """Teacher forcing where tracked instances stay detection targets (det = visible): the detection queries
    would be trained to re-detect what the tracking queries already hold."""
    batch = ORIGINALS[5](clips, cfg, generator, p_prompt)
    batch["det"] = batch["visible"].clone()  # BUG: should be visible & ~tracked
    return batch


def hungarian_greedy(cost):
    """Greedy matching: repeatedly take the cheapest remaining pair. Often right, not always optimal."""
    C = np.array(cost, dtype=np.float64)
    rows, cols = [], []
    for _ in range(min(C.shape) if C.ndim == 2 else 0):
        r, c = np.unravel_index(np.argmin(C), C.shape)
        rows.append(r), cols.append(c)
        C[r, :], C[:, c] = np.inf, np.inf
    order = np.argsort(rows)
    return np.array(rows, dtype=np.int64)[order], np.array(cols, dtype=np.int64)[order]


def davis_f_floor(pred, gt, bound_th=0.008):
    """Boundary F whose tolerance radius is rounded down (floor) instead of up (davis2017 uses ceil)."""
    import infer
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    r = int(bound_th if bound_th >= 1 else np.floor(bound_th * np.linalg.norm(gt.shape)))  # BUG: floor
    pb, gb = infer._seg2bmap(pred), infer._seg2bmap(gt)
    if pb.sum() == 0 or gb.sum() == 0:
        return 1.0 if pb.sum() == gb.sum() else 0.0
    p, rc = (pb & infer._dilate(gb, r)).sum() / pb.sum(), (gb & infer._dilate(pb, r)).sum() / gb.sum()
    return 0.0 if p + rc == 0 else float(2 * p * rc / (p + rc))


def segment_repeating_ends(seg, T, frame, prompts=lambda t, stem: None, tts=False):
    """Test-time repetition as 1..T, T..1, 1..T: the turning frames T and 1 are fed twice in a row."""
    order = [*range(T), *(range(T - 1, -1, -1) if tts else ()), *(range(T) if tts else ())]  # BUG
    for n, t in enumerate(order):
        img, stem = frame(t)
        ids, scores = seg.step(img, prompts(t, stem) if n < T else None)
        if n >= len(order) - T:
            yield t, stem, img, ids, scores


def box_as_rectangle(frame, box):
    """The trivial box prompt: the filled rectangle (what the exercise must beat)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    m = np.zeros(frame.shape[-2:], bool)
    m[y0:y1, x0:x1] = True
    return m


def box_by_colour(frame, box, tol=0.15, tol2=0.35):
    """One solution of exercise 9: inside the box, the pixels whose colour is far from the median colour of the
    box's border (mostly background: a tight box touches its object at a few points) and near the median colour
    of those far pixels (the object; drops other objects that occlude part of the box)."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    crop = np.asarray(frame, np.float32)[:, y0:y1, x0:x1]  # (3, h, w)
    border = np.concatenate([crop[:, 0], crop[:, -1], crop[:, :, 0], crop[:, :, -1]], 1)  # (3, 2h + 2w)
    far = np.linalg.norm(crop - np.median(border, 1)[:, None, None], axis=0) > tol  # (h, w)
    if far.any():
        far &= np.linalg.norm(crop - np.median(crop[:, far], 1)[:, None, None], axis=0) < tol2
    m = np.zeros(frame.shape[-2:], bool)
    m[y0:y1, x0:x1] = far
    return m


# ----------------------------------------------------------------------------- the table
EXERCISES = {
    1: Exercise("History Marker: paint ID vectors on the feature map", "ausm:HistoryMarker.forward",
                "AUSM Sec. 2.2 (History Marker / Token Mark)", "tests/test_ausm.py -k history_marker",
                marker_sum),
    2: Exercise("Mamba block, one recurrent step (conv state + SSM state)", "ausm:Mamba.step",
                "AUSM Sec. 2.2 (History Compressor), Mamba Sec. 3.4", "tests/test_ausm.py -k mamba_init",
                mamba_step_unshifted),
    3: Exercise("Selective scan, the reference loop", "kernels:selective_scan_ref", "Mamba Sec. 3.2, Alg. 2",
                "tests/test_exercise_oracles.py -k scan_closed_form", scan_ref_no_skip),
    4: Exercise("Selective scan, the Triton forward kernel", "kernels:_scan_fwd_kernel",
                "Mamba Sec. 3.3 (hardware-aware scan)", "tests/test_kernels.py -k triton_matches",
                _scan_fwd_no_euler_delta),
    5: Exercise("Teacher forcing: switch times, detection vs tracking targets", "train:preprocess",
                "AUSM Sec. 2.3, Alg. 2", "tests/test_train.py -k preprocess", preprocess_tracked_also_detected),
    6: Exercise("Hungarian matching of detection queries", "train:hungarian", "AUSM Sec. 2.3 (L_det), DETR",
                "tests/test_train.py -k hungarian", hungarian_greedy),
    7: Exercise("DAVIS boundary measure F", "infer:davis_f", "AUSM Sec. 3 (DAVIS 2017 J&F)",
                "tests/test_infer.py -k 'davis_golden or davis_empty'", davis_f_floor),
    8: Exercise("Test-time repetition order", "infer:segment", "AUSM Sec. 3.4", "tests/test_infer.py -k tts",
                segment_repeating_ends),
    9: Exercise("Open-ended: box prompts become mask prompts", "infer:box_to_mask",
                "AUSM future work (boxes, points); PAPER.md Sec. 6",
                "tests/test_exercise_oracles.py -k box_prompt", box_as_rectangle, box_by_colour),
}
ORIGINALS = {}  # exercise number -> the reference implementation a swap replaced (wrong versions may wrap it)
WRONG_FACTORIES = (_scan_fwd_no_euler_delta,)  # built on first use (they define Triton kernels)


def _resolve(target):
    """'module:Class.method' -> (the object holding the last name, that name)."""
    mod, _, qual = target.partition(":")
    owner, *path = [importlib.import_module(mod)] + qual.split(".")[:-1]
    for name in path:
        owner = getattr(owner, name)
    return owner, qual.split(".")[-1]


class Stub:
    """Raises NotImplementedError when called, or launched as a Triton kernel (stub[grid](...))."""

    def __init__(self, n):
        self.n = n

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"EXERCISE {self.n}: {EXERCISES[self.n].target} is yours to write; see EXERCISES.md")


def swap(n, how):
    """Replace exercise n's target by a stub, its wrong version or its solution (conftest's --exercise-swap)."""
    if n not in EXERCISES or how not in ("stub", "wrong", "solution"):
        raise ValueError(f"--exercise-swap {n}:{how}: expected N:stub, N:wrong or N:solution, N in {sorted(EXERCISES)}")
    ex = EXERCISES[n]
    owner, name = _resolve(ex.target)
    ORIGINALS[n] = getattr(owner, name, None)
    new = Stub(n) if how == "stub" else ex.wrong if how == "wrong" else ex.solution
    if new is None:
        raise ValueError(f"exercise {n} has no {how} version")
    setattr(owner, name, new() if new in WRONG_FACTORIES else new)


# ----------------------------------------------------------------------------- `python tests/exercises.py blank N`
def blank_source(src, n):
    """The source text with exercise n's function body replaced by a NotImplementedError (docstring kept).
    Returns None when the target does not exist in the file (an open-ended exercise)."""
    ex = EXERCISES[n]
    node, names = ast.parse(src), ex.target.partition(":")[2].split(".")
    for name in names:
        node = next((c for c in node.body if isinstance(c, (ast.ClassDef, ast.FunctionDef)) and c.name == name),
                    None)
        if node is None:
            return None
    body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
    lines = src.splitlines(keepends=True)
    first, last = body[0].lineno - 1, node.end_lineno  # 0-based first line of the code, end (exclusive)
    indent = lines[first][:len(lines[first]) - len(lines[first].lstrip())]
    stub = f'{indent}raise NotImplementedError("EXERCISE {n}: {ex.title}; see EXERCISES.md")\n'
    return "".join(lines[:first]) + stub + "".join(lines[last:])


def main(argv):
    if argv[:1] == ["list"]:
        for n, ex in EXERCISES.items():
            print(f"{n}. {ex.title}\n   {ex.target}  ({ex.section})\n   python -m pytest --exercise {n}   "
                  f"(= python -m pytest {ex.check})")
        return 0
    if len(argv) == 2 and argv[0] == "blank" and argv[1].isdigit() and int(argv[1]) in EXERCISES:
        n = int(argv[1])
        path = os.path.join(ROOT, EXERCISES[n].target.partition(":")[0] + ".py")
        with open(path) as f:
            new = blank_source(f.read(), n)
        if new is None:
            print(f"exercise {n} is open-ended: {EXERCISES[n].target} does not exist yet, nothing to blank")
            return 0
        with open(path, "w") as f:
            f.write(new)
        print(f"blanked {EXERCISES[n].target} in {path}; check with: python -m pytest --exercise {n}; "
              f"restore with: git checkout -- {os.path.basename(path)}")
        return 0
    print(f"usage: python tests/exercises.py list | blank N   (N in {sorted(EXERCISES)}; see EXERCISES.md)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
