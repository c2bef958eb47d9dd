"""The Triton kernels compile for real GPUs (sm_90, sm_80, gfx90a), checked on a machine without
one.

tests/aot_compile.py records every launch kernels.py makes and compiles it ahead of time; it must
run without the interpreter, so these tests run it in a subprocess with TRITON_INTERPRET unset
and an empty Triton cache (every kernel really compiles). `pytest -s` shows its register / spill
table."""
import os
import subprocess
import sys
import textwrap

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_compiler(tmp_path, script, *args, timeout=600):
    """Run a Python file with the real Triton compiler: no interpreter, a fresh cache."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, quietly
    return subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(TESTS))


def check_table(proc):
    print(proc.stdout)  # the register / spill table
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "0 failed" in proc.stdout


def test_model_launches_compile_for_gpus_without_spills(tmp_path):
    """The model's launches (tiny shapes, float32 and bf16 autocast), both kernels: sm_90; bf16 also
    sm_80 and gfx90a. Fails if a kernel does not compile or the model's launches spill on CUDA."""
    proc = run_compiler(tmp_path, os.path.join(TESTS, "aot_compile.py"))
    check_table(proc)
    for kernel in ("_scan_fwd_kernel", "_scan_bwd_kernel"):
        for target in ("sm_90", "sm_80", "gfx90a"):
            assert f"| {kernel} | {target} " in proc.stdout, (kernel, target)


@pytest.mark.slow
def test_every_launch_compiles_for_every_target(tmp_path):
    """Every subset of the optional inputs in float32 / float16 / bfloat16 and the model at the tiny
    and paper shapes (and dstate 32, 64), for sm_90, sm_80 and gfx90a: 819 compilations, ~21 min."""
    script = os.path.join(TESTS, "aot_compile.py")
    check_table(run_compiler(tmp_path, script, "--full", timeout=3600))


BROKEN = '''
import sys
sys.path.insert(0, {tests!r})
import torch
import triton
import triton.language as tl
import aot_compile


@triton.jit
def _broken_kernel(h0_ptr, out_ptr, L, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    h = tl.load(h0_ptr + offs)                    # float16, and no .to(tl.float32) ...
    for t in range(L):
        h = h * tl.exp(offs * 0.0)                # ... while the loop makes it float32 (as A * h)
    tl.store(out_ptr + offs, h)


args = (torch.zeros(16, dtype=torch.float16), torch.zeros(16), 3)
launch = dict(kernel=_broken_kernel, args=args, kwargs=dict(BLOCK=16), scenario="model broken")
failures = aot_compile.report([(launch, "sm_90")])
print(failures)
sys.exit(1 if failures else 0)
'''


def test_a_kernel_that_does_not_compile_fails(tmp_path):
    """The check can fail: a loop-carried state whose dtype changes in the loop runs in the
    interpreter but does not compile (kernels.py without .to(tl.float32) on h: the same bug)."""
    script = tmp_path / "broken.py"
    script.write_text(textwrap.dedent(BROKEN.format(tests=TESTS)))
    proc = run_compiler(tmp_path, str(script), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: _broken_kernel for sm_90" in proc.stdout, proc.stdout
    assert "does not compile" in proc.stdout, proc.stdout
    assert "Loop-carried variable h" in proc.stdout, proc.stdout


def test_gpu_check_says_in_one_line_that_it_needs_cuda():
    """tests/gpu_check.py on a machine without CUDA: exit 2, one line naming what to run instead."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # hides a GPU if there is one
    script = os.path.join(TESTS, "gpu_check.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: no CUDA device"), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
