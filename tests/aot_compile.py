"""Compile every Triton kernel launch of kernels.py ahead of time, for GPUs this machine lacks.

    python tests/aot_compile.py            # the quick subset (the default test suite runs this)
    python tests/aot_compile.py --full     # every launch x every target (tests marked slow)

The launches are not listed by hand: kernels.py's own launch code runs with each @triton.jit
kernel replaced by a recorder, driven by (1) ausm.Mamba at the model's shapes (Config.tiny /
Config.paper, the frames of train.PRESETS), in float32 and under the bfloat16 autocast training
uses, and (2) the public functions with every subset of the optional inputs in float32, float16
and bfloat16 (quick: all inputs, float16 and bfloat16). Quick: the tiny model at stage 1's
frames; sm_90, and sm_80 / gfx90a for autocast. Each recorded launch (its arguments, constexprs
and num_warps) is compiled by triton.compile for sm_90, sm_80 and gfx90a, specialised exactly as
Triton specialises a real launch. The table gives the registers per thread and the spills: bytes
of spill stores + loads from ptxas -v on CUDA, the VGPR + SGPR spill counts of the AMDGCN listing
on HIP.

Exit status 1 when a launch does not compile, or when one of the model's launches spills. Must run
without TRITON_INTERPRET (the interpreter replaces the kernels): tests/test_compile.py runs it in a
subprocess. The launches the model makes on a GPU are the ones recorded here on a CPU: CPU autocast
gives the same dtypes as CUDA autocast (Linear -> bfloat16, the rest float32 by type promotion).
"""
import argparse
import contextlib
import functools
import io
import itertools
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("error: unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import ausm  # noqa: E402
import kernels  # noqa: E402
import train  # noqa: E402

TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32),
           "gfx90a": GPUTarget("hip", "gfx90a", 64)}
OPTIONAL = ("D", "z", "delta_bias", "softplus", "initial_state")


# ----------------------------------------------------------------------------- recording launches
class Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch, runs
    nothing."""

    def __init__(self, kernel, launches, scenario):
        self.kernel = kernel
        self.launches = launches
        self.scenario = scenario

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **kwargs):
        launch = dict(kernel=self.kernel, args=args, kwargs=kwargs, scenario=self.scenario)
        self.launches.append(launch)


@contextlib.contextmanager
def recording(launches, scenario):
    """Replace every kernel of kernels.py by a Recorder (and put them back: the compiler reads
    them)."""
    found = {}
    for name, value in vars(kernels).items():
        if isinstance(value, JITFunction) and name.endswith("_kernel"):
            found[name] = value
    old_path = kernels.SCAN_PATH
    kernels.SCAN_PATH = "triton"  # the model on a CPU
    try:
        for name, kernel in found.items():
            setattr(kernels, name, Recorder(kernel, launches, scenario))
        yield
    finally:
        kernels.SCAN_PATH = old_path
        for name, kernel in found.items():
            setattr(kernels, name, kernel)


def model_scenarios(full):
    """(name, config, frames T): the model's shapes; quick = the tiny model at stage 1's frames."""
    configs = [("tiny", ausm.Config.tiny())]
    frames = [train.PRESETS["tiny"]["frames"][1]]
    if full:  # and larger states
        configs.append(("paper", ausm.Config.paper()))
        configs.append(("tiny N=32", ausm.Config.tiny(d_state=32)))
        configs.append(("tiny N=64", ausm.Config.tiny(d_state=64)))
        frames = sorted({T for preset in train.PRESETS.values() for T in preset["frames"].values()})
    for (name, cfg), T in itertools.product(configs, frames):
        yield f"{name} T={T}", cfg, T


def record_model(launches, full):
    """ausm.Mamba's forward + backward (Alg. 2 training), step with grad (--iterative) and step
    without (Alg. 1 inference), each in float32 and under the bfloat16 autocast of train.py."""
    torch.manual_seed(0)
    for (name, cfg, T), autocast in itertools.product(model_scenarios(full), (False, True)):
        mamba = ausm.Mamba(cfg.D, cfg.d_state, cfg.expand, cfg.d_conv)
        di = cfg.expand * cfg.D
        tag = "bf16 autocast" if autocast else "fp32"
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with recording(launches, f"model {name} {tag} forward+backward"):
                mamba(torch.randn(2, T, cfg.D)).sum().backward()
            conv_state = torch.zeros(2, di, cfg.d_conv)                            # (b, di, d_conv)
            ssm_state = torch.zeros(2, di, cfg.d_state)                            # (b, di, N) fp32
            with recording(launches, f"model {name} {tag} step+backward"):
                mamba.step(torch.randn(2, cfg.D), conv_state, ssm_state)[0].sum().backward()
            with recording(launches, f"model {name} {tag} step"), torch.no_grad():
                mamba.step(torch.randn(2, cfg.D), conv_state, ssm_state)


def record_api(launches, full):
    """selective_scan_triton (forward + backward) and selective_state_update_triton with every
    subset of the optional inputs (quick: all of them), every input in one dtype (quick: float16,
    bfloat16), at the tiny model's channels and state size."""
    cfg = ausm.Config.tiny()
    batch, dim, L, dstate = 2, cfg.expand * cfg.D, 3, cfg.d_state
    dtypes = (torch.float16, torch.bfloat16)
    subsets = [(True,) * len(OPTIONAL)]
    if full:
        dtypes = (torch.float32,) + dtypes
        subsets = list(itertools.product((False, True), repeat=len(OPTIONAL)))
    for dtype, present in itertools.product(dtypes, subsets):
        x = scan_inputs(batch, dim, L, dstate, dtype, dict(zip(OPTIONAL, present)))
        letters = "".join(k[0] for k, p in zip(OPTIONAL, present) if p)
        tag = str(dtype).replace("torch.", "") + " " + letters
        with recording(launches, f"api {tag} scan+backward"):
            kernels.selective_scan_triton(**x).sum().backward()
        state = torch.zeros(batch, dim, dstate, dtype=dtype)                      # (b, d, n)
        with recording(launches, f"api {tag} state update"), torch.no_grad():
            kernels.selective_state_update_triton(
                state, x["u"][..., 0], x["delta"][..., 0], x["A"], x["B"][..., 0], x["C"][..., 0],
                x["D"], first_step(x["z"]), x["delta_bias"], x["delta_softplus"])


def first_step(v):
    """v[..., 0] (the inputs of one step), None stays None."""
    if v is None:
        return None
    return v[..., 0]


def scan_inputs(batch, dim, L, dstate, dtype, present):
    """Keyword arguments of selective_scan_triton; the optional ones where present[name]."""
    x = dict(u=torch.randn(batch, dim, L), delta=torch.rand(batch, dim, L),
             A=-torch.rand(dim, dstate), B=torch.randn(batch, dstate, L),
             C=torch.randn(batch, dstate, L))
    x["D"] = torch.randn(dim) if present["D"] else None
    x["z"] = torch.randn(batch, dim, L) if present["z"] else None
    x["delta_bias"] = torch.randn(dim) if present["delta_bias"] else None
    x["initial_state"] = torch.randn(batch, dim, dstate) if present["initial_state"] else None
    x = {k: None if v is None else v.to(dtype).requires_grad_() for k, v in x.items()}
    x["delta_softplus"] = present["softplus"]
    return x


# ----------------------------------------------------------------------------- compiling
def compile_launch(launch, target):
    """Compile one recorded launch for `target` as Triton would at the launch; return (kernel, ptxas
    log).

    Private Triton details live here only (Triton 3.9): the launch binder and `_pack_args` turn
    the arguments into the signature, constexprs (ints equal to 1 included), alignment attributes
    and options a real launch gets; TRITON_DUMP_PTXAS_LOG makes the CUDA backend print its ptxas
    -v, and TRITON_ALWAYS_COMPILE makes it run ptxas even when the kernel is in Triton's cache."""
    kernel = launch["kernel"]
    backend = triton.compiler.make_backend(target)
    binder = triton.runtime.jit.create_function_from_signature(kernel.signature, kernel.params,
                                                                backend)
    bound, specialization, options = binder(*launch["args"], **launch["kwargs"])
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch["kwargs"], bound,
                                                              specialization, options)
    source = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
    log = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit has no log
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=target, options=options.__dict__)
    return compiled, log.getvalue()


def registers_and_spills(compiled, log):
    """Registers per thread and bytes spilled (CUDA: stores + loads; HIP: VGPR + SGPR spills)."""
    if "amdgcn" in compiled.asm:
        text = compiled.asm["amdgcn"]
        regs = int(re.search(r"\.vgpr_count:\s+(\d+)", text).group(1))
        spills = sum(int(n) for n in re.findall(r"\.[sv]gpr_spill_count:\s+(\d+)", text))
        return regs, spills
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups()
    return regs, int(stores) + int(loads)


def describe(launch):
    """(dtypes, constexprs) of a launch, as the table shows them: dtypes of u, delta, B, A; the HAS_
    flags present (D Z B(ias) s(oftplus) H(0)); BLOCK_D x BLOCK_N; warps."""
    kernel = launch["kernel"]
    named = dict(zip(kernel.arg_names, launch["args"]))
    named.update(launch["kwargs"])
    shown = [k for k in ("u_ptr", "dt_ptr", "B_ptr", "A_ptr") if k in named]
    if not shown:  # another kernel: its tensors
        shown = [k for k in kernel.arg_names if torch.is_tensor(named.get(k))]
    names = [str(named[k].dtype).replace("torch.", "").replace("float", "f") for k in shown]
    dtypes = "/".join(names)
    switches = ("HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "HAS_H0")
    flags = "".join(k[4] if k.startswith("HAS_") else "s" for k in switches if named.get(k))
    blocks = f"{named.get('BLOCK_D', '-')}x{named.get('BLOCK_N', '-')} w{named.get('num_warps', 4)}"
    return dtypes, f"{flags or '-'} {blocks}"


def last_line(error):
    """The line of a compiler error that says what is wrong (Triton puts it after the source)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1]


def unique(launches):
    """One launch per kernel, dtypes, constexprs and integer specialisation (== 1, divisible by
    16, as Triton specialises them): the rest compile to the same code."""
    seen = {}
    for launch in launches:
        ints = tuple((v == 1, v % 16 == 0) for v in launch["args"] if isinstance(v, int))
        key = (launch["kernel"].__name__,) + describe(launch) + ints
        seen.setdefault(key, launch)
    return list(seen.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="every launch for every target (minutes)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma-separated subset of " + ", ".join(TARGETS))
    p.add_argument("--kernel", default="", help="only kernels whose name contains this (e.g. bwd)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    launches = []
    record_model(launches, args.full)
    record_api(launches, args.full)
    model = unique(x for x in launches if x["scenario"].startswith("model"))
    in_model = {id(x) for x in model}
    todo = [(x, t) for x in model for t in TARGETS]
    todo += [(x, t) for x in unique(launches) if id(x) not in in_model for t in TARGETS]
    if not args.full:  # bf16 autocast: every target
        todo = [(x, t) for x, t in todo if t == "sm_90" or "autocast" in x["scenario"]]
    targets = args.targets.split(",")
    todo = [(x, t) for x, t in todo if t in targets and args.kernel in x["kernel"].__name__]
    failures = report(todo)
    print(f"\n{len(todo)} compilations in {time.perf_counter() - t0:.1f} s; {len(failures)} failed")
    for line in failures:
        print(line)
    return 1 if failures else 0


def report(todo):
    """Compile each (launch, target), print a table row per compilation; return the failures."""
    header = f"| {'kernel':16s} | {'target':6s} | {'u/dt/B/A':19s} | {'constexprs':16s} |"
    print(header + " regs | spills | first scenario")
    print(f"|{'-' * 18}|{'-' * 8}|{'-' * 21}|{'-' * 18}|------|--------|---------------")
    failures = []
    for launch, target in todo:
        name = launch["kernel"].__name__
        dtypes, constexprs = describe(launch)
        row = f"| {name:16s} | {target:6s} | {dtypes:19s} | {constexprs:16s} |"
        try:
            regs, spills = registers_and_spills(*compile_launch(launch, TARGETS[target]))
        except Exception as e:  # the compiler's message
            first = last_line(e)
            failures.append(f"error: {name} for {target}, {dtypes}, {constexprs} does not compile: "
                            f"{first}")
            print(f"{row} FAILED ({launch['scenario']}): {first}", flush=True)
            continue
        print(f"{row} {regs:4d} | {spills:6d} | {launch['scenario']}", flush=True)
        if spills and launch["scenario"].startswith("model"):
            failures.append(f"error: {name} spills ({spills}) on {target} at the model's "
                            f"launch {launch['scenario']} ({dtypes}, {constexprs}): lower "
                            f"kernels.FWD_TILE / BWD_TILE")
    return failures


if __name__ == "__main__":
    sys.exit(main())
