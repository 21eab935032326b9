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
    embeddings only, never on norms (nanoGPT)."""
    freeze_all_but(model, cfg.train_only)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
