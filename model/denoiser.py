"""The denoiser of Denoising ViTs (Yang et al. 2024): one transformer block with a learned position
embedding that maps a ViT's raw patch features (B, N, C) to clean ones, and its files. Trained by
fixes/vit_denoise.py; eval/dense.py reads features through it (`--denoiser`)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .block import Block, init_weights
from .vit import ViTConfig

DENOISER_FILE, DENOISER_CONFIG = "denoiser.safetensors", "denoiser.json"


def denoiser_block_config(width: int, grid: int, n_blocks: int = 1):
    """DVT's denoiser as a config of the lab's block: timm's Block(dim, dim // 64 heads, mlp_ratio 4,
    qkv bias, LayerNorm eps 1e-6, GELU) over the grid x grid patch tokens."""
    return ViTConfig(image_size=grid, patch_size=1, n_embd=width, n_head=max(1, width // 64), n_layer=n_blocks,
                     intermediate_size=4 * width, norm="layernorm", norm_eps=1e-6, mlp="gelu", mlp_bias=True,
                     o_proj_bias=True, attention_bias=True, attention="softmax", head="none")


class Denoiser(nn.Module):
    """raw patch features (B, N, C) -> clean ones: + a learned position embedding, then the blocks."""

    def __init__(self, width: int, grid: int, n_blocks: int = 1):
        super().__init__()
        self.cfg = denoiser_block_config(width, grid, n_blocks)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, grid * grid, width))
        self.blocks = nn.ModuleList(Block(self.cfg, causal=False) for _ in range(n_blocks))
        init_weights(self.blocks, n_blocks, 0.02)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = feats + self.pos_embed.to(feats.dtype)
        for block in self.blocks:
            x, _ = block(x)
        return x


def save_denoiser(den: Denoiser, folder: Path, info: dict) -> Path:
    """denoiser.safetensors + denoiser.json (width, grid, blocks and where it came from), atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"width": den.cfg.n_embd, "grid": den.cfg.grid, "n_blocks": den.cfg.n_layer, **info}
    for name, write in ((DENOISER_FILE, lambda p: save_file({k: v.contiguous() for k, v in den.state_dict().items()},
                                                              p)),
                        (DENOISER_CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        os.close(fd)
        write(tmp)
        os.replace(tmp, folder / name)
    return folder


def load_denoiser(folder) -> Denoiser:
    """A denoiser written by `save_denoiser` (a folder holding denoiser.json and denoiser.safetensors)."""
    folder = Path(folder)
    if not (folder / DENOISER_CONFIG).is_file() or not (folder / DENOISER_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no {DENOISER_CONFIG} + {DENOISER_FILE}; write one with "
                                "python -m fixes.vit_denoise --ckpt RUN")
    meta = json.loads((folder / DENOISER_CONFIG).read_text())
    den = Denoiser(meta["width"], meta["grid"], meta["n_blocks"])
    den.load_state_dict(load_file(str(folder / DENOISER_FILE)))
    return den.eval()
