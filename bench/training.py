"""Whole training steps (forward, backward, AdamW) of sinklab variants and of nanoGPT's model:
step time, tokens/s, MFU (model/flops.py) and peak memory. Used by `python -m bench`.

The CPU suite interleaves the models' repetitions round by round, so that load from other
processes falls on all of them alike.
"""
from __future__ import annotations

import statistics
import time

import torch

from model import GPT, GPTConfig
from model import backends
from model.flops import peak_tflops, training_flops_per_token

from . import nanogpt_baseline
from .kernels import sync, time_ms


def training_step(model, opt, x, y, device):
    """One optimizer step; bf16 autocast on the GPU as train.py does."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(x, targets=y)
        loss = out[1] if isinstance(out, tuple) else out.loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def make_model(name: str, shape: dict, device, compile_: bool, kernel_backend: str = "auto", sink_logit: str = "none"):
    """'nanogpt' or '<kind>/<gate>' (sinklab; `kernel_backend` for the kinds other than softmax that
    allow it, else auto; `sink_logit` for the softmax rows, as a retrofitted sink logit trains)."""
    if name == "nanogpt":
        cfg = nanogpt_baseline.NanoGPTConfig(block_size=shape["T"], vocab_size=shape["vocab"], n_layer=shape["n_layer"],
                                             n_head=shape["n_head"], n_embd=shape["n_embd"])
        model = nanogpt_baseline.NanoGPT(cfg)
        n = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()  # wte counts as the head
        flops = 6 * n + 12 * cfg.n_layer * cfg.n_embd * shape["T"]  # the PaLM count, as model/flops.py
    else:
        kind, gate = name.split("/")
        cfg = GPTConfig(vocab_size=shape["vocab"], n_layer=shape["n_layer"], n_head=shape["n_head"],
                        n_embd=shape["n_embd"], block_size=shape["T"], attention=kind, gate=gate,
                        sink_logit=sink_logit if kind == "softmax" else "none",
                        backend=kernel_backend if kind != "softmax" and kernel_backend in backends.allowed(kind) else "auto")
        model, flops = GPT(cfg), training_flops_per_token(cfg, shape["T"])
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    return (torch.compile(model) if compile_ else model), opt, flops


def train_table(names, shape_for, lengths, device, warmup: int, reps: int, compile_: bool,
                interleave: bool = False, kernel_backend: str = "auto", sink_logit: str = "none") -> list[dict]:
    """Step time, tokens/s, MFU and peak memory per model name and T.

    interleave=True (the CPU suite): build every model first, then time them in turns, one
    step each per round, so that noise from other processes falls on all alike.
    """
    rows = []
    peak = peak_tflops(device)
    for t in lengths:
        shape = shape_for(t)
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randint(0, shape["vocab"], (shape["B"], t), generator=gen).to(device)
        y = torch.randint(0, shape["vocab"], (shape["B"], t), generator=gen).to(device)
        runs = {}
        order = names if interleave else []
        for name in names:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model, opt, flops = make_model(name, shape, device, compile_, kernel_backend, sink_logit)
            step = (lambda m=model, o=opt: training_step(m, o, x, y, device))
            label = f"{name}+sink_logit_{sink_logit}" if sink_logit != "none" and name.startswith("softmax/") else name
            row = {"T": t, "B": shape["B"], "model": label, "compiled": compile_, **{k: shape[k] for k in ("n_layer", "n_head", "n_embd", "vocab")}}
            try:
                for _ in range(warmup):
                    step()
                sync(device)
                if not interleave:
                    row["step_ms"] = time_ms(step, device, 0, reps)
                    if device.type == "cuda":
                        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            runs[name] = (step if interleave else None, row, flops)  # free GPU memory between models
            del model, opt, step
        if order:
            times = {name: [] for name in order}
            for _ in range(reps):
                for name in order:
                    t0 = time.perf_counter()
                    runs[name][0]()
                    sync(device)
                    times[name].append(1e3 * (time.perf_counter() - t0))
            ref = times.get("softmax/none")
            for name in order:
                row = runs[name][1]
                row["step_ms"], row["best_ms"] = statistics.median(times[name]), min(times[name])
                row["step_ms_all"] = [round(v, 2) for v in times[name]]
                if ref:  # paired by round: both ran within seconds of each other
                    row["vs_softmax"] = statistics.median(a / b for a, b in zip(times[name], ref))
        base = runs.get("softmax/none", (None, {}))[1]
        for name in names:
            _, row, flops = runs[name]
            if "step_ms" in row:
                row["tok_per_s"] = shape["B"] * t / (row["step_ms"] / 1e3)
                row["flops_per_token"] = flops
                if peak:
                    row["mfu"] = flops * row["tok_per_s"] / (peak * 1e12)
                if "step_ms" in base and "vs_softmax" not in row:
                    row["vs_softmax"] = row["step_ms"] / base["step_ms"]
            rows.append(row)
    return rows

