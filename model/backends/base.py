"""What a backend declares: the kinds, devices and dtypes it runs, and why it cannot run elsewhere."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ANY_DEVICE = None  # `devices` / `trains_on` value: every device type


@dataclass(frozen=True)
class Backend:
    """One way to compute attention. `attend(q, k, v, cfg, causal)` takes rotated q (B,H,Tq,D) and
    k, v (B,H,Tk,D) with the heads already repeated for GQA, and returns y (B,H,Tq,D); backends with
    `sinks` also take `sink=` the sink logits b_h (H,) (model.sink_logit) and `sink_value=` the slot's
    value (H,D) (model.sink_value), y * sigmoid(lse - b_h) + v_h * sigmoid(b_h - lse).

    kinds:      the attention kinds it computes.
    devices:    device types it runs on (None = any).
    trains_on:  device types where it has a backward (None = wherever it runs).
    dtypes:     tensor dtypes it takes (None = any).
    missing:    why its package is not importable here (None = it is).
    untileable: cfg -> why it cannot take these shapes (None = it can).
    decodes:    takes queries appended after cached keys (Tq != Tk); if not, `math` does those steps
                (the weights are only Tq x Tk there, and fixed shapes keep compiled kernels from recompiling).
    one_dtype:  cast q, k, v to one dtype first (fused kernels; see `same_dtype`).
    sinks:      computes model.sink_logit's extra softmax denominator term (and model.sink_value's value).
    auto_ok:    (cfg, device) -> whether `auto` may pick it where it runs (None = yes).
    fix:        the backend to suggest instead when it cannot run.
    device_note: said after the device when it runs elsewhere.
    """

    name: str
    kinds: tuple[str, ...]
    attend: Callable
    devices: tuple[str, ...] | None = ANY_DEVICE
    trains_on: tuple[str, ...] | None = ANY_DEVICE
    dtypes: tuple[torch.dtype, ...] | None = None
    missing: str | None = None
    untileable: Callable | None = None
    decodes: bool = True
    one_dtype: bool = False
    sinks: bool = False
    auto_ok: Callable | None = None
    fix: str = "auto"
    device_note: str = ""

    def why_not(self, cfg=None, device=None, dtype=None, training: bool = False, kind: str | None = None) -> str | None:
        """Why it cannot run this config on this device and dtype (None = it can). Leave out what is
        not known yet: at model construction only the kind, the package and the shapes are checked."""
        kind = kind or (cfg.attention if cfg is not None else None)
        name = f"model.backend={self.name}"
        if kind is not None and kind not in self.kinds:
            return f"{name} cannot run attention={kind!r}; it runs {list(self.kinds)}; use model.backend=auto"
        if cfg is not None and cfg.sink_logit != "none" and not self.sinks:
            return f"{name} has no sink logit (model.sink_logit={cfg.sink_logit}); use model.backend=auto, sdpa or math"
        if self.missing:
            return self.missing
        if cfg is not None and self.untileable is not None and (reason := self.untileable(cfg)):
            return reason
        if device is not None:
            device = torch.device(device)
            if self.devices is not None and device.type not in self.devices:
                return (f"{name} runs on {'/'.join(self.devices).upper()}, not {device.type}{self.device_note}; "
                        f"use model.backend={self.fix}")
            if training and self.trains_on is not None and device.type not in self.trains_on:
                return (f"{name} has no backward on {device.type} (it runs forward only there); "
                        "train with model.backend=auto or math off the GPU")
        if dtype is not None and self.dtypes is not None and dtype not in self.dtypes:
            wanted = "/".join(str(d).removeprefix("torch.") for d in self.dtypes)
            return (f"{name} takes {wanted} tensors, got {str(dtype).removeprefix('torch.')}; train with "
                    f"train.mixed_precision=bf16 on a GPU, or use model.backend={self.fix}")
        return None

    def inputs(self, q, k, v):
        """q, k, v as the kernel takes them (one dtype for the fused ones)."""
        return same_dtype(q, k, v) if self.one_dtype else (q, k, v)

    def run(self, q, k, v, cfg, causal: bool, sink=None, sink_value=None):
        """The kernel on `inputs` already checked with why_not (the attention block checks once per device,
        dtype and mode, not per call)."""
        if sink is None:
            return self.attend(q, k, v, cfg, causal)
        if sink_value is None:
            return self.attend(q, k, v, cfg, causal, sink=sink)
        return self.attend(q, k, v, cfg, causal, sink=sink, sink_value=sink_value)

    def __call__(self, q, k, v, cfg, causal: bool, sink=None, sink_value=None):
        """Check, then run: refuses with its reason what it cannot run (a GPU backend on CPU tensors...)."""
        q, k, v = self.inputs(q, k, v)
        if reason := self.why_not(cfg, q.device, q.dtype, needs_backward(q, k, v)):
            raise ValueError(reason)
        return self.run(q, k, v, cfg, causal, sink, sink_value)


def needs_backward(q, k, v) -> bool:
    """Whether autograd will differentiate through this attention call."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def same_dtype(q, k, v):
    """One dtype for the fused kernels. Under autocast, qk_norm's RMSNorm returns fp32 q and k
    while v stays bf16: take autocast's dtype then (as SDPA does), else the widest of the three."""
    if q.dtype == k.dtype == v.dtype:
        return q, k, v
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return q.to(dtype), k.to(dtype), v.to(dtype)
