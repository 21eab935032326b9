"""The attention backends in one registry, and the one policy that picks one for `auto`.

Each module here declares one backend (base.Backend): the kinds, devices and dtypes it runs, and
a reason string when it cannot (missing package, wrong device, untileable shape...). Everything
else asks this registry:

    allowed(kind)                      the values model.backend may take for this kind (config)
    get(name)                          the Backend, callable as backend(q, k, v, cfg, causal)
    resolve(cfg, device, dtype)        `auto` -> a name; done once when the model is built or moved; a
                                       backend is first checked against math on the device (selfcheck.py)
    describe(cfg, device, dtype)       "sdpa (softmax, fp32, cpu)": what a run prints and saves
    check(cfg, device, mixed_precision)  ValueError before training with a backend that cannot run
    fast(kind, device)                 the fused backends to check against math here (bench/kernels.py)
"""
from __future__ import annotations

import sys

import torch

from util import DTYPE_NAMES, DTYPES

from . import selfcheck
from .base import Backend
from .chunked import BACKEND as _chunked
from .flash import BACKEND as _flash
from .flex import BACKEND as _flex
from .math import BACKEND as _math
from .sdpa import BACKEND as _sdpa
from .triton import BACKEND as _triton

# Fastest first: `auto` takes the first one that runs the kind, trains on the device, takes the
# dtype and agrees (auto_ok). softmax: flash-attn when installed (fp16/bf16 CUDA), else SDPA. On
# CUDA, sigmoid / elu1 / linear: the Triton kernels when triton is installed and the sizes tile
# (for linear, also when the GPU has the shared memory), else FlexAttention / chunked PyTorch
# (measured at about 5x flash softmax: docs/design.md). Elsewhere: materialised weights (flex has
# no CPU backward) and chunked linear attention.
REGISTRY: dict[str, Backend] = {b.name: b for b in (_flash, _triton, _sdpa, _chunked, _flex, _math)}
MIXED_PRECISION_DTYPES = {name: DTYPES[name] for name in ("bf16", "fp16")}


def allowed(kind: str) -> tuple[str, ...]:
    """The values model.backend may take for this attention kind: auto, math, then the others."""
    return ("auto", "math") + tuple(n for n, b in REGISTRY.items() if n != "math" and kind in b.kinds)


def get(name: str) -> Backend:
    if name not in REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; known: {list(REGISTRY)}")
    return REGISTRY[name]


def resolve(cfg, device, dtype: torch.dtype | None = None) -> str:
    """cfg.backend, or for `auto` the fastest backend that runs this kind on this device and dtype
    (one that can also train there). A backend other than math is used only once it has agreed with
    math on the device (selfcheck.py, once per process); one that does not is replaced by the next
    of the policy, with one line saying so."""
    device = torch.device(device)
    failures: list[str] = []
    chosen = cfg.backend
    if cfg.backend != "auto":
        named = get(cfg.backend)
        # One that cannot run here at all is left to check() / the call to refuse with its reason.
        if named.why_not(cfg, device, dtype) is None and not selfcheck.trusted(named, cfg, device, dtype, failures):
            chosen = _first_trusted(cfg, device, dtype, failures, skip=cfg.backend)
    else:
        chosen = _first_trusted(cfg, device, dtype, failures)
    for line in failures:
        print(f"{line}; using {chosen}", file=sys.stderr, flush=True)
    return chosen


def _first_trusted(cfg, device, dtype, failures: list[str], skip: str | None = None) -> str:
    for name, b in REGISTRY.items():
        if name == skip or b.why_not(cfg, device, dtype, training=True) is not None:
            continue
        if (b.auto_ok is None or b.auto_ok(cfg, device)) and selfcheck.trusted(b, cfg, device, dtype, failures):
            return name
    raise AssertionError("math runs everything")


def describe(cfg, device, dtype: torch.dtype | None = None) -> str:
    """The resolved choice in words, e.g. 'sdpa (softmax, fp32, cpu)'."""
    dtype = dtype or torch.get_default_dtype()
    how = f"{cfg.attention}, {DTYPE_NAMES.get(dtype, str(dtype).removeprefix('torch.'))}, {torch.device(device).type}"
    return f"{resolve(cfg, device, dtype)} ({how})"


def compute_dtype(mixed_precision: str | None) -> torch.dtype:
    """The dtype attention sees under Accelerate's mixed precision ('no' / None: the default)."""
    return MIXED_PRECISION_DTYPES.get(mixed_precision or "no", torch.get_default_dtype())


def check(cfg, device, mixed_precision: str | None = None) -> None:
    """Raise ValueError (saying what to change) when cfg.backend cannot train on this device and
    precision; said before any work starts rather than at the first step."""
    reason = get(resolve(cfg, device, compute_dtype(mixed_precision))).why_not(
        cfg, device, compute_dtype(mixed_precision), training=True)
    if reason:
        raise ValueError(reason)


def fast(kind: str, device) -> list[str]:
    """The backends other than math that run `kind` on this device (forward at least)."""
    return [n for n, b in REGISTRY.items() if n != "math" and b.why_not(kind=kind, device=device) is None]


def check_name(cfg) -> None:
    """model.backend is a backend that runs model.attention (or auto / math); the config loader asks
    this, and every model asks it when it is built."""
    names = allowed(cfg.attention)  # the kernels that run this kind, plus auto and math
    if cfg.backend not in names:
        raise ValueError(f"model.backend={cfg.backend!r} cannot run attention={cfg.attention!r}; allowed: {list(names)}")


def check_construction(cfg) -> None:
    """At model construction: a named backend that cannot run the kind, whose package is missing or that
    cannot take the shapes fails here, not at the first step (the device is not known yet)."""
    check_name(cfg)
    if cfg.backend != "auto" and (reason := get(cfg.backend).why_not(cfg)):
        raise ValueError(reason)
