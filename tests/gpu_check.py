"""One command for a machine with a CUDA GPU: the kernels' tests there, the scan's bandwidth against
the device's peak, train.py's Fig. 4 benchmark and a few iterations of the paper preset. Under 8
minutes on one H200; prints a Markdown table for the README.

    python tests/gpu_check.py [--iters 6]

Peak bandwidth is read from the device: 2 (double data rate) x memory clock x bus width / 8, from
torch.cuda.get_device_properties (memory_clock_rate in kHz, memory_bus_width in bits). The scan's
bytes are what the forward must move at least (kernels.py's header): its inputs, its output and
its fp32 checkpoints, each once; GB/s = those bytes / the median time of the forward kernel."""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PEAK_MEMORY = """
import runpy, sys, torch
sys.argv = ["train.py"] + sys.argv[1:]
try:
    runpy.run_path("train.py", run_name="__main__")
finally:
    print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", flush=True)
"""


def peak_bandwidth(device):
    """The device's peak DRAM bandwidth in GB/s, or None where torch does not report its memory."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def run(cmd, timeout, rows, label):
    """Run cmd from the repository root, print its output's last lines, add its status to rows."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        # the partial output comes as bytes, as POSIX gives it
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        status = f"TIMED OUT after {timeout} s"
    seconds = time.perf_counter() - t0
    print(f"\n$ {' '.join(cmd)}   [{status}, {seconds:.0f} s]", flush=True)
    print("\n".join(out.splitlines()[-25:]), flush=True)
    rows.append((label, f"{status}, {seconds:.0f} s"))
    return out


def scan_bandwidth(rows, reps=20):
    """Time the Triton forward (and forward + backward) at the paper's shapes under bf16 autocast's
    dtypes: batch 16 clips x 48 x 48 pixels, d_inner 512, T = 5 (stage 2), dstate 16."""
    import kernels
    dev = torch.device("cuda")
    batch, dim, L, dstate = 16 * 48 * 48, 512, 5, 16
    bf16 = torch.bfloat16
    u = torch.randn(batch, dim, L, device=dev)  # fp32, as in Mamba.forward
    delta = torch.randn(batch, dim, L, device=dev, dtype=bf16)
    A = -torch.rand(dim, dstate, device=dev)
    B = torch.randn(batch, dstate, L, device=dev, dtype=bf16)
    C = torch.randn(batch, dstate, L, device=dev, dtype=bf16)
    D = torch.randn(dim, device=dev)
    z = torch.randn(batch, dim, L, device=dev, dtype=bf16)
    bias = torch.randn(dim, device=dev)
    args = (u, delta, A, B, C, D, z, bias, True)
    inputs = sum(x.numel() * x.element_size() for x in args[:8])
    out = u.numel() * u.element_size()
    ckpt = batch * -(-L // kernels.CHECKPOINT_EVERY) * dim * dstate * 4
    fwd = median_ms(kernels.selective_scan_triton, args, False, reps)
    fwd_bwd = median_ms(kernels.selective_scan_triton, args, True, reps)
    gbs = (inputs + out + ckpt) / fwd / 1e6
    peak = peak_bandwidth(dev)
    share = "peak not reported by torch"
    if peak:
        share = f"{100 * gbs / peak:.0f}% of {peak:.0f} GB/s peak"
    megabytes = (inputs + out + ckpt) / 1e6
    print(f"\nscan forward {fwd:.2f} ms: {megabytes:.0f} MB -> {gbs:.0f} GB/s ({share}); "
          f"forward + backward {fwd_bwd:.2f} ms", flush=True)
    rows.append(("scan forward, b 36864 x d 512 x L 5 x n 16",
                 f"{fwd:.2f} ms, {gbs:.0f} GB/s = {share}"))
    rows.append(("scan forward + backward, same shapes", f"{fwd_bwd:.2f} ms"))


def median_ms(fn, args, backward, reps):
    """Median milliseconds of fn(*args) (+ backward of its sum) over reps runs after 3 warm-ups."""
    times = []
    for i in range(reps + 3):
        x = [a.detach().requires_grad_(backward) if torch.is_tensor(a) else a for a in args]
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        y = fn(*x)
        if backward:
            y.sum().backward()
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def paper_iterations(rows, iters):
    """A few iterations of the paper preset (stage 1): seconds per iteration after the first, peak
    memory."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", PEAK_MEMORY, "--preset", "paper", "--device", "cuda",
               "--max-iters", str(iters), "--no-eval", "--log-every", "1", "--out", out]
        log = run(cmd, 150, [], "paper preset")
    ms = [float(m) for m in re.findall(r"(\d+) ms/iter", log)][1:]  # the first compiles
    peak = re.search(r"peak memory ([\d.]+) GiB", log)
    per_iter = f"{statistics.median(ms) / 1e3:.2f} s/iter" if ms else "no iterations logged"
    memory = f"peak {peak.group(1)} GiB" if peak else "peak memory not printed"
    label = f"train.py --preset paper, {iters} iterations (batch 16, T 3, 384 px)"
    rows.append((label, f"{per_iter}, {memory}"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", type=int, default=6,
                   help="iterations of the paper preset (the first is not timed)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device: tests/gpu_check.py measures the kernels on a GPU; on this "
              "machine run python -m pytest tests/test_kernels.py tests/test_compile.py",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    rows = []
    tests = [sys.executable, "-m", "pytest", "-q", "tests/test_kernels.py"]
    run(tests, 180, rows, "tests/test_kernels.py on CUDA")
    scan_bandwidth(rows)
    bench = run([sys.executable, "train.py", "--benchmark", "--device", "cuda"], 150, rows,
                "train.py --benchmark --device cuda")
    for T, speedup in re.findall(r"^(\d+) \| [\d.]+ \| [\d.]+ \| ([\d.]+x)$", bench, re.M):
        rows.append((f"Fig. 4: parallel vs iterative training at T = {T}", speedup))
    paper_iterations(rows, args.iters)
    import triton
    versions = f"torch {torch.__version__}, triton {triton.__version__}"
    print(f"\n| {name}, {versions} | result |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")
    print(f"\n(gpu_check: {time.perf_counter() - t0:.0f} s)")
    return 0 if all("FAILED" not in v and "TIMED OUT" not in v for _, v in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
