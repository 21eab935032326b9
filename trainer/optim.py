"""AdamW and the learning-rate schedules (train.lr_schedule, one of configs.LR_SCHEDULES)."""
from __future__ import annotations

import math

import torch

from configs import ConfigError


def lr_at(step: int, cfg) -> float:
    """The learning rate of optimizer step `step` (0-based) under `cfg` (a TrainConfig).

    Every schedule warms up linearly to cfg.lr over warmup_steps, then:
      cosine    decays to min_lr at max_steps along half a cosine (nanoGPT);
      constant  stays at lr;
      wsd       warmup-stable-decay: stays at lr, then falls linearly to min_lr at max_steps over
                the last decay_fraction of the steps (Hu et al. 2024, MiniCPM).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        decay_steps = cfg.decay_fraction * cfg.max_steps
        progress = (step - (cfg.max_steps - decay_steps)) / decay_steps
        return cfg.lr - min(1.0, max(0.0, progress)) * (cfg.lr - cfg.min_lr)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def schedule_notes(cfg, horizon: int) -> list[str]:
    """What the run's lr will do that a user may not expect, in the lr values `lr_at` gives: a warmup that
    does not end before the last step, and a train.max_steps (cfg) other than the schedule's horizon (a
    resumed run keeps the horizon it started with). Metrics rows count steps from 1: row s has lr_at(s - 1)."""
    import dataclasses

    schedule = dataclasses.replace(cfg, max_steps=horizon)
    last = cfg.max_steps
    notes = []
    if cfg.warmup_steps >= last:
        peak = max(lr_at(s, schedule) for s in range(last))
        notes.append(f"warning: train.warmup_steps={cfg.warmup_steps} >= train.max_steps={last}: the lr is still "
                     f"warming up at the last step and peaks at {peak:.3g} (train.lr={cfg.lr:.3g}); lower "
                     "train.warmup_steps to reach train.lr")
    if last > horizon:
        extra = [lr_at(s - 1, schedule) for s in range(horizon + 1, last + 1)]
        steps = f"step {last}" if len(extra) == 1 else f"steps {horizon + 1}-{last}"
        values = f"at lr {extra[0]:.2e}" if max(extra) == min(extra) else f"from lr {extra[0]:.2e} to {extra[-1]:.2e}"
        floor = " (train.min_lr)" if cfg.lr_schedule != "constant" and extra[0] == cfg.min_lr else ""
        notes.append(f"train.max_steps={last} is past the {horizon} steps the LR schedule was set up for; it keeps "
                     f"that horizon, so {steps} run {values}{floor}. Start a new run for a new schedule.")
    elif last < horizon:
        notes.append(f"train.max_steps={last} stops before the end of the {horizon}-step LR schedule: the last step "
                     f"runs at lr {lr_at(last - 1, schedule):.2e}, not the schedule's end "
                     f"{lr_at(horizon - 1, schedule):.2e}. Start a new run for a shorter schedule.")
    return notes


def freeze_all_but(model: torch.nn.Module, train_only: str | None) -> None:
    """train.train_only: only parameters whose name contains one of the comma-separated parts train;
    the others are frozen (requires_grad False). None: all train."""
    if train_only is None:
        return
    parts = [p.strip() for p in train_only.split(",") if p.strip()]
    named = dict(model.named_parameters())
    keep = {n for n in named if any(p in n for p in parts)}
    if not keep:
        raise ConfigError(f"train.train_only={train_only!r} matches no parameter of this model (names look like "
                          f"{', '.join(list(named)[:3])}, ...)")
    for name, p in named.items():
        p.requires_grad_(name in keep)


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the parameters that train (train.train_only); weight decay on matrices and
    embeddings only, never on norms (nanoGPT). Each group's `lr_scale` (train.lr_scale, the first
    matching part; 1 otherwise) multiplies the schedule's lr."""
    from configs import parse_lr_scale

    freeze_all_but(model, cfg.train_only)
    scales = parse_lr_scale(cfg.lr_scale)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = next((f for part, f in scales.items() if part in name), 1.0)
        groups.setdefault((p.dim() >= 2, scale), []).append(p)  # (decays, lr scale): 2 groups without lr_scale
    unmatched = [part for part in scales if not any(part in name for name, p in model.named_parameters() if p.requires_grad)]
    if unmatched:
        raise ConfigError(f"train.lr_scale part {unmatched[0]!r} matches no trained parameter of this model, so its "
                          f"factor would be ignored (names look like {', '.join(n for n, _ in list(model.named_parameters())[:3])}, "
                          "...; train.train_only freezes the others); fix the part or remove it")
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0, "lr_scale": scale}
                    for (decays, scale), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
