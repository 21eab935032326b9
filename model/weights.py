"""Full model weights on disk as one safetensors file, whatever parallelism trained them.

A leaf of the model package: checkpoints (trainer/), run loading (runs/load.py) and HF import
(model/interop/hf_import.py) all read and write weights through these functions.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from util import DTYPES

WEIGHTS = "model.safetensors"
TIED_KEY = "lm_head.weight"  # shares storage with embed_tokens.weight when tied


def save_weights(state_dict: dict, path: Path, tied: bool) -> None:
    """Write a full state dict as safetensors (tied head stored once, as in HF)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if not (tied and k == TIED_KEY)}
    save_file(tensors, str(path), metadata={"format": "pt"})




def load_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors import SafetensorError

    try:
        state = load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is damaged ({e}); use another checkpoint of the run") from None
    load_state(model, state, str(path))


def load_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """Copy a full state dict into `model`; every name must match (a tied head may be absent)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == TIED_KEY and getattr(model.config, "tie_embeddings", False))]
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         "was it written by a run with a different model config?")


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch dtype, or one of fp32 / bf16 / fp16 (float32 / bfloat16 / float16 too)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {**DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype={dtype!r} is not one of {list(DTYPES)}")
    return names[dtype]
