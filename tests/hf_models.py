"""Tiny randomly initialised transformers models saved as folders, for the hf: import tests."""
from __future__ import annotations

from pathlib import Path

import torch

# model_type, config fields, whether the tokenizer prepends a BOS (as Llama's and Mistral's do)
ARCHITECTURES = {
    "llama": ("llama", {"tie_word_embeddings": True,
                        "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}}, True),
    "llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 16}}, True),
    "mistral": ("mistral", {"sliding_window": 16}, True),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}, False),
    "qwen3": ("qwen3", {"head_dim": 16}, False),  # explicit head width: 4 heads x 16 != hidden 32
    "qwen3_next": ("qwen3_next", {"layer_types": ["full_attention"] * 2, "num_experts": 0,
                                  "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                      "partial_rotary_factor": 1.0}}, False),
}
SPECIALS = ["<s>", "</s>"]


def byte_tokenizer(bos: bool):
    """A byte-level tokenizer (256 byte symbols, no merges) with <s> / </s>; BOS added when asked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_tiny(name: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Build the tiny `name` model (2 layers, width 32, 4 query / 2 key-value heads), give every
    parameter random values (norm weights around 1, biases non-zero) and save it with a tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, fields, bos = ARCHITECTURES[name]
    tok = byte_tokenizer(bos)
    cfg = AutoConfig.for_model(
        arch, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
        bos_token_id=0, eos_token_id=1, **{"vocab_size": len(tok), **fields, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:  # (1 + w) for Qwen3-Next's norms, w for the others: both vary around 1
                p.copy_((0.0 if arch == "qwen3_next" else 1.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 if pname.endswith("embed_tokens.weight") else 0.15)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
