"""Consolidated weights on disk and loading a trained run for sampling and evaluation.

A checkpoint dir holds `model.safetensors` (full weights, whatever parallelism wrote them),
`config.yaml` (the run's resolved config) and `tokenizer.json`, so it loads without
Accelerate or DeepSpeed. A run dir's `latest` points at its newest checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

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
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == TIED_KEY and getattr(model.config, "tie_embeddings", False))]
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         "was it written by a run with a different model config?")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir (-> checkpoints/latest), a checkpoints dir (-> latest), or a checkpoint dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run dir like out/default or a checkpoint dir")
    if (path / "checkpoints" / "latest").exists():
        path = path / "checkpoints" / "latest"
    elif (path / "latest").exists():
        path = path / "latest"
    path = path.resolve()
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} holds no {WEIGHTS}: not a finished checkpoint or run dir "
                                "(train first with `python train.py`)")
    return path


@dataclass
class LoadedRun:
    model: torch.nn.Module
    tokenizer: object  # tokenizers.Tokenizer (None for a ViT run)
    config: dict  # the run's resolved config.yaml
    checkpoint: Path

    @property
    def run_dir(self) -> Path:
        """out/<run>: checkpoints live in out/<run>/checkpoints/step_*/."""
        return self.checkpoint.parent.parent if self.checkpoint.parent.name == "checkpoints" else self.checkpoint

    def val_tokens(self):
        """The held-out split of the run's data (prepared again if the cache is gone)."""
        from configs import from_dict
        from data.loader import TokenShards
        from data.prepare import prepare

        if self.config.get("task", "lm") != "lm":
            raise ValueError(f"{self.run_dir} is a {self.config['task']} run, not a language model; "
                             "analyse it with python -m eval.vit_artifacts")
        data_dir = prepare(from_dict({"data": self.config["data"]}).data, progress=False)
        if (data_dir / "tokenizer.json").read_bytes() != (self.checkpoint / "tokenizer.json").read_bytes():
            raise ValueError(f"the data prepared for {self.run_dir} ({data_dir}) has another tokenizer than the "
                             "checkpoint (the source changed since training?); the held-out tokens would not match")
        return TokenShards(data_dir, "val").tokens


def load_run(path: str | Path, device: str | torch.device = "cpu", task: str | None = None) -> LoadedRun:
    """Model (eval mode), tokenizer and config of a run or checkpoint. `task` ("lm" or "vit"):
    refuse, with a message, a run of the other kind (an LM eval pointed at a ViT run)."""
    from configs import from_dict
    from data.tokenizer import load_tokenizer

    from .gpt import GPT
    from .vit import ViT

    ckpt = resolve_checkpoint(path)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    kind = config.get("task", "lm")
    if task is not None and kind != task:
        tool = "python -m eval.vit_artifacts" if kind == "vit" else "sample.py and the LM evals"
        raise ValueError(f"{ckpt} holds a {kind} run, not a {task} run; analyse it with {tool}")
    task = kind
    model_cfg = from_dict({"task": task, "model": config["model"]}).model
    model = ViT(model_cfg) if task == "vit" else GPT(model_cfg)
    load_weights(model, ckpt / WEIGHTS)
    model.to(device).eval()
    tokenizer = None if task == "vit" else load_tokenizer(ckpt / "tokenizer.json")  # a ViT run has none
    return LoadedRun(model=model, tokenizer=tokenizer, config=config, checkpoint=ckpt)
