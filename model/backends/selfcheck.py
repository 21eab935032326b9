"""Trust once, then go fast: a fused backend is compared with `math` on the device before it is used.

The first time a process resolves a backend other than `math` for a (backend, kind, dtype, device)
(and the few settings that change the kernel: row normalisation, sink logit, head size), it runs a
small forward, and a backward where the backend trains, on random inputs, causal and bidirectional,
and compares them with the `math` reference computed in fp32 (fp64 for fp64) on the same device. A backend that
disagrees beyond TOLERANCE[dtype], or raises, is not used: `backends.resolve` takes the next one of
its policy and says so in one line.

Verdicts are cached per process, not on disk: a new driver, torch or Triton build, or another GPU of
the same name can change the answer, and the check costs milliseconds (its time is printed once).
Inputs come from a private generator, so the check never moves the run's random state.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from util import DTYPE_NAMES

from .base import Backend
from .math import BACKEND as MATH

# Relative error allowed against math in fp32, by the dtype the backend computes in: a few ulps of
# accumulated rounding for fp32 / fp64; bf16 (8 mantissa bits) and fp16 (11) keep ~2-3 digits.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
BATCH, HEADS, LENGTH = 1, 2, 64


@dataclass(frozen=True)
class Verdict:
    trusted: bool
    line: str  # what was found, in one line (printed once)


_verdicts: dict[tuple, Verdict] = {}


def can_run_on(device: torch.device) -> bool:
    """Whether tensors can be made on `device` in this process (not meta, not an absent GPU): the
    policy may be asked about a device that is not here, and nothing will run there."""
    if device.type == "meta":
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" or hasattr(torch, device.type)


def key(backend: Backend, cfg, device: torch.device, dtype: torch.dtype) -> tuple:
    return (backend.name, cfg.attention, cfg.attn_normalize, float(cfg.resolved_sigmoid_bias), cfg.sink_logit != "none",
            cfg.sink_value, cfg.head_dim, cfg.linear_chunk_size if cfg.attention == "linear" else None, dtype, str(device))


def verdict(backend: Backend, cfg, device: torch.device, dtype: torch.dtype) -> tuple[Verdict, bool]:
    """(the verdict for this backend here, whether it was computed just now)."""
    k = key(backend, cfg, device, dtype)
    if k in _verdicts:
        return _verdicts[k], False
    _verdicts[k] = compare_with_math(backend, cfg, device, dtype)
    return _verdicts[k], True


def compare_with_math(backend: Backend, cfg, device: torch.device, dtype: torch.dtype) -> Verdict:
    where = f"{backend.name} ({cfg.attention}, {DTYPE_NAMES.get(dtype, str(dtype))}, {device})"
    tol = TOLERANCE.get(dtype, 3e-2)
    train = backend.trains_on is None or device.type in backend.trains_on
    started = time.perf_counter()
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            err = max(_error(MATH, backend, cfg, device, dtype, causal, train) for causal in (True, False))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # any failure of the kernel means it is not used; say which
        return Verdict(False, f"attention backend {where} failed its check against math: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    ms = (time.perf_counter() - started) * 1e3
    what = "forward and backward" if train else "forward"
    if not err <= tol:  # also catches NaN
        return Verdict(False, f"attention backend {where} disagrees with math ({what}): "
                              f"max relative error {err:.2g} > {tol:g}")
    return Verdict(True, f"attention backend {where} checked against math ({what}): "
                         f"max relative error {err:.1g} <= {tol:g}, {ms:.0f} ms")


def _error(reference: Backend, backend: Backend, cfg, device, dtype, causal: bool, train: bool) -> float:
    """The largest relative difference of output and gradients between `backend` in `dtype` and the
    reference in fp32 (fp64 for fp64), on one fixed random problem."""
    g = torch.Generator().manual_seed(0)
    length = 2 * cfg.linear_chunk_size if cfg.attention == "linear" else LENGTH
    shape = (BATCH, HEADS, length, cfg.head_dim)
    inputs = [torch.randn(shape, generator=g) for _ in range(3)]
    if cfg.sink_logit != "none":
        inputs.append(torch.randn(HEADS, generator=g))
    if cfg.sink_value:
        inputs.append(torch.randn(HEADS, cfg.head_dim, generator=g))
    grad_out = torch.randn(shape, generator=g).to(device)

    def run(b: Backend, dt: torch.dtype):
        xs = [x.to(device, dt).detach().requires_grad_(train) for x in inputs]
        q, k, v, *sink = xs
        y = b(q, k, v, cfg, causal, *sink)
        if not train:
            return [y.double()]
        y.backward(grad_out.to(y.dtype))
        return [y.double()] + [x.grad.double() for x in xs]

    ref = run(reference, torch.float64 if dtype == torch.float64 else torch.float32)
    got = run(backend, dtype)
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1.0)).item() for a, b in zip(got, ref))


def trusted(backend: Backend, cfg, device: torch.device, dtype: torch.dtype | None, failures: list[str]) -> bool:
    """Whether `backend` may run here: math always; others once they agree with math on the device
    (checked the first time, then cached). A fresh failure's line is appended to `failures` for the
    caller to print with the backend it falls back to."""
    if backend.name == "math" or not can_run_on(device):
        return True
    found, fresh = verdict(backend, cfg, device, dtype or torch.get_default_dtype())
    if fresh and found.trusted:
        print(found.line, file=sys.stderr, flush=True)
    elif fresh:
        failures.append(found.line)
    return found.trusted
