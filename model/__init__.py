"""sinklab models: the decoder (GPT) and the ViT share one attention block."""
from .attention import Attention
from .cache import make_cache
from .config import AttentionConfig, GPTConfig
from .gpt import GPT, ModelOutput

__all__ = ["Attention", "AttentionConfig", "GPT", "GPTConfig", "ModelOutput", "make_cache"]
