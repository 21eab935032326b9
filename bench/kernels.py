"""The attention kernels alone: every fast backend against the `math` reference (forward and
gradients), and their fwd / fwd+bwd times and memory as ratios to PyTorch SDPA softmax.

Rows are (B, H, T, D) = (16384 / T, 12, T, 64), causal, timed as the median of N runs after
warm-up (CUDA events on the GPU). `extra_mem_mb` is the peak memory one fwd+bwd allocates
beyond its inputs: at B = 16384 / T a kernel with memory linear in T keeps it flat across T.
Used by `python -m bench`.
"""
from __future__ import annotations

import statistics
import time

import torch

from model.attention import Attention
from model import backends
from model.config import AttentionConfig

HEADS, HEAD_DIM, TOKENS = 12, 64, 16384  # kernel and GPU training shapes: B = TOKENS // T


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of fn() in ms: CUDA events on the GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)



def variants(kinds) -> list[tuple[str, dict]]:
    """(label, config fields) for every kind (and its normalised ablation) in `kinds`."""
    out = []
    for kind in kinds:
        out.append((kind, {"attention": kind}))
        if kind in ("sigmoid", "elu1"):
            out.append((f"{kind}+norm", {"attention": kind, "attn_normalize": True}))
    return out


def fast_backends(kind: str, device: torch.device) -> list[str]:
    """The fused backends that can run `kind` here (math is the reference, not listed)."""
    return backends.fast(kind, device)


def make_attention(fields: dict, backend: str, t: int, device) -> Attention:
    cfg = AttentionConfig(n_embd=HEADS * HEAD_DIM, n_head=HEADS, block_size=t, backend=backend, **fields)
    return Attention(cfg).to(device)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(kinds, device: torch.device, dtype: torch.dtype, tol: float, t: int = 256, batch: int = 2,
          backends=None) -> tuple[list, bool]:
    """Every fast backend (or those in `backends`) vs math on fresh random inputs: forward and d(q, k, v)."""
    rows, ok = [], True
    grads_here = device.type == "cuda"  # flex has no CPU backward; chunked and sdpa do
    for label, fields in variants(kinds):
        for backend in fast_backends(fields["attention"], device):
            if backends is not None and backend not in backends:
                continue
            torch.manual_seed(len(rows))
            q, k, v = (torch.randn(batch, HEADS, t, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
            g = torch.randn_like(q)
            with_grads = grads_here or backend != "flex"
            ref_attn = make_attention(fields, "math", t, device)
            fast_attn = make_attention(fields, backend, t, device)

            def run(attn, inputs):
                inputs = [x.detach().requires_grad_(with_grads) for x in inputs]
                with torch.set_grad_enabled(with_grads):
                    y = attn.attend(*inputs)[0]
                    grads = torch.autograd.grad(y, inputs, g.to(y.dtype)) if with_grads else ()
                return [y, *grads]

            fast = run(fast_attn, (q, k, v))
            ref = run(ref_attn, (q.float(), k.float(), v.float()))
            errs = dict(zip(("out", "dq", "dk", "dv"), (rel_err(a, b) for a, b in zip(fast, ref))))
            finite = all(torch.isfinite(x).all().item() for x in fast)
            passed = finite and max(errs.values()) < tol
            ok &= passed
            rows.append({"variant": label, "backend": backend, **errs, "grads": with_grads, "pass": passed})
    return rows, ok


def kernel_table(kinds, lengths, device, dtype, warmup: int, reps: int, backends=None) -> list[dict]:
    """fwd and fwd+bwd ms of every backend (or those in `backends`) per kind and T, as ratios to
    SDPA softmax."""
    rows = []
    for t in lengths:
        b = max(1, TOKENS // t)
        q, k, v = (torch.randn(b, HEADS, t, HEAD_DIM, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)
        base = None
        cases = [("softmax", {"attention": "softmax"}, "sdpa")]
        for label, fields in variants(kinds):
            for backend in ["math"] + fast_backends(fields["attention"], device):
                if backend == "flex" and device.type != "cuda":
                    continue  # no CPU backward
                if (label, backend) != ("softmax", "sdpa") and (backends is None or backend in backends):
                    cases.append((label, fields, backend))
        for label, fields, backend in cases:
            attn = make_attention(fields, backend, t, device)
            row = {"T": t, "B": b, "variant": label, "backend": backend}
            try:
                def fwd():
                    with torch.no_grad():
                        attn.attend(q, k, v)

                def fwd_bwd():
                    attn.attend(q, k, v)[0].backward(g)

                row["fwd_ms"] = time_ms(fwd, device, warmup, reps)
                for _ in range(warmup):  # compiling and autotuning allocate scratch memory: before the peak
                    fwd_bwd()
                if device.type == "cuda":
                    sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    held = torch.cuda.memory_allocated(device)
                row["fwd_bwd_ms"] = time_ms(fwd_bwd, device, 0, reps)
                if device.type == "cuda":  # peak beyond what is held (q, k, v, their grads): saved tensors, scratch
                    row["extra_mem_mb"] = (torch.cuda.max_memory_allocated(device) - held) / 2**20
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            q.grad = k.grad = v.grad = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if base is None:
                base = row
            for key in ("fwd_ms", "fwd_bwd_ms"):
                if key in row and key in base:
                    row[key.replace("_ms", "_x")] = row[key] / base[key]
            rows.append(row)
    return rows

