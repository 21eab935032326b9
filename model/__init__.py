"""sinklab models: the decoder (GPT) and the ViT share one attention block."""
import os

import torch

# DeepSpeed (imported by accelerate and transformers when they need it) warns "Setting accelerator to CPU" in
# every process of a machine without a GPU; naming the accelerator it would fall back to keeps logs quiet.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"

from .attention import Attention
from .cache import make_cache
from .config import AttentionConfig, GPTConfig
from .block import ModelOutput
from .gpt import GPT

__all__ = ["Attention", "AttentionConfig", "GPT", "GPTConfig", "ModelOutput", "make_cache"]
