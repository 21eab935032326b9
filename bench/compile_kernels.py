"""Compile every Triton kernel config for a GPU architecture, on any machine, without a GPU.

    python -m bench.compile_kernels               # sm_90 (H100 / H200), every autotune config
    python -m bench.compile_kernels --arch 80     # A100
    python -m bench.compile_kernels --quick       # the first config that fits, per kernel and flag set
    python -m bench.compile_kernels --quick --head-dims 16 32 128 --dtype fp32

Triton's front end, LLVM and the bundled ptxas run on the CPU, so this catches what the
interpreter cannot: syntax the compiler rejects, type errors in tl.dot, and configs whose shared
memory exceeds the GPU's (autotuning would skip those at run time, silently). Prints one row per
(kernel, flags, config) with its shared memory, registers per thread and register spills (from
ptxas -v; spilling configs are slow, and autotuning will rarely pick them); exits 1 if any
compile fails or no config of a kernel fits the shared memory. The linear kernels are compiled
only for the head dims `auto` gives them (model/backends/triton.py, LINEAR_MAX_TILE).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
import tempfile
import time

LINEAR_KERNELS = ("_scan", "_chunk_fwd", "_chunk_bwd")
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block (opt-in max)


def kernel_cases(head_dim: int = 64, io_dtype: str = "bf16"):
    """(name, autotuned kernel, arg types, constexpr flags) for every kernel and flag set."""
    from model.backends import triton_linear as kernels_linear, triton_sigmoid as kernels_triton
    from model.backends.triton import LINEAR_MAX_TILE

    ptr, f32 = f"*{io_dtype}", "*fp32"
    ints = {"T": "i32", "N": "i32", "scale": "fp32", "bias": "fp32"}
    attn = {**ints, "Q": ptr, "K": ptr, "V": ptr, "O": ptr, "DO": ptr, "DQ": ptr, "DK": ptr, "DV": ptr,
            "L": f32, "DELTA": f32}
    for kind, causal, normalize in itertools.product((0, 1), (True, False), (False, True)):
        flags = {"D": head_dim, "KIND": kind, "CAUSAL": causal, "NORMALIZE": normalize}
        for kernel in (kernels_triton._fwd, kernels_triton._bwd_dkdv, kernels_triton._bwd_dq):
            yield kernel.fn.__name__, kernel, attn, flags
    if head_dim > LINEAR_MAX_TILE:
        return
    # linear: features, states and the numerator are fp32; the values and dV keep the input dtype
    lin = {**ints, "Q": f32, "K": f32, "S": f32, "DS": f32, "O": f32, "DO": f32, "GRAD_Q": f32, "GRAD_K": f32,
           "V": ptr, "GRAD_V": ptr}
    for reverse in (False, True):  # forward: (phi_k, v); backward: (phi_q, dO in fp32)
        yield "_scan", kernels_linear._scan, {**lin, "V": f32 if reverse else ptr}, \
            {"D": head_dim, "DV": head_dim, "C": 64, "REVERSE": reverse}
    for kernel in (kernels_linear._chunk_fwd, kernels_linear._chunk_bwd):
        yield kernel.fn.__name__, kernel, lin, {"D": head_dim, "DV": head_dim, "C": 64}


def compile_one(kernel, types: dict, flags: dict, config, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn
    constexprs = {**flags, **config.kwargs}
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v here
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    registers = re.findall(r"Used (\d+) registers", log.getvalue())
    spills = re.findall(r"(\d+) bytes spill stores", log.getvalue())
    return compiled, int(registers[-1]) if registers else None, int(spills[-1]) if spills else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT), help="compute capability x10")
    p.add_argument("--quick", action="store_true", help="only the first config of each kernel")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64], choices=[16, 32, 64, 128])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of q, k, v")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter replaces the GPU configs with one CPU config")
    # A fresh cache, so that ptxas runs (and reports registers) for every kernel.
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sinklab-compile-")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        p.error("needs the triton package (pip install triton)")

    from model.backends.triton import LINEAR_SHARED_KIB

    limit, failed = SHARED_LIMIT[args.arch], 0
    print("| kernel | flags | config | shared KiB | registers | spill bytes | seconds | result |\n" + "|---" * 8 + "|")
    for head_dim in args.head_dims:
        for name, kernel, types, flags in kernel_cases(head_dim, args.dtype):
            shown = ", ".join(f"{k}={v}" for k, v in flags.items() if k not in ("DV", "C"))
            fits = 0
            for config in kernel.configs:
                t0 = time.perf_counter()
                shared = registers = spills = None
                try:
                    compiled, registers, spills = compile_one(kernel, types, flags, config, args.arch)
                    shared = compiled.metadata.shared
                    fits += shared <= limit
                    result = "ok" if shared <= limit else f"over the {limit // 1024} KiB limit: skipped at run time"
                except Exception as e:  # the compiler's own message names the line
                    result, failed = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", failed + 1
                tuned = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
                tuned += f", warps={config.num_warps}, stages={config.num_stages}"
                kib = "" if shared is None else f"{shared / 1024:.0f}"
                print(f"| {name} | {shown} | {tuned} | {kib} | {registers or ''} | {'' if spills is None else spills} "
                      f"| {time.perf_counter() - t0:.1f} | {result} |", flush=True)
                if args.quick and (fits or result.startswith("FAILED")):
                    break
            if not fits and name in LINEAR_KERNELS and limit < LINEAR_SHARED_KIB * 1024:
                print(f"| {name} | {shown} | every config | | | | | too big for this GPU: auto uses chunked here |")
            elif not fits:
                failed += 1
                print(f"| {name} | {shown} | every config | | | | | FAILED: none fits {limit // 1024} KiB |")
    print(f"\n{failed} failed" if failed else "\nall compiled")
    return int(failed > 0)


if __name__ == "__main__":
    sys.exit(main())
