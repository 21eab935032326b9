"""sinklab models: the decoder (GPT) and the ViT share one attention block."""
from .attention import Attention
from .block import ModelOutput
from .cache import make_cache
from .config import AttentionConfig, GPTConfig
from .gpt import GPT

__all__ = ["Attention", "AttentionConfig", "GPT", "GPTConfig", "ModelOutput", "make_cache"]
