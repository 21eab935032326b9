"""Tiny random transformers models written as GGUF files with the `gguf` package's writer, as
llama.cpp's convert_hf_to_gguf.py writes them: llama.cpp's tensor names, Llama's q/k rows permuted
for its RoPE layout, matrices quantised, the byte-level tokenizer in the metadata."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hf_models import save_tiny

# name -> (tests/hf_models.py architecture, llama.cpp architecture, quantisation of the matrices)
GGUF_ARCHITECTURES = {"llama": ("llama", "llama", "Q8_0"), "qwen2": ("qwen2", "qwen2", "Q4_1")}
ROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}  # what GGUF metadata carries


def permute_for_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_tiny_gguf(name: str, path: Path, seed: int = 0, drop: tuple[str, ...] | bool = ()) -> Path:
    """The tiny `name` model of tests/hf_models.py (default RoPE), written to `path` as GGUF; `drop`: GGUF
    tensor names left out (True: every tensor), a damaged file."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, gguf_arch, quant = GGUF_ARCHITECTURES[name]
    # One token more than the byte tokenizer, <|endoftext|>: transformers' GGUF byte-level tokenizer adds it
    # when the file lacks it, and the model's vocabulary must cover it.
    folder = save_tiny(arch, path.parent / f"{path.stem}_transformers", seed=seed, vocab_size=259, **ROPE)
    model = AutoModelForCausalLM.from_pretrained(folder).float()
    tok = AutoTokenizer.from_pretrained(folder)  # (transformers' Qwen2 tokenizer adds <|endoftext|> itself)
    cfg = model.config
    qtype = gguf.GGMLQuantizationType[quant]

    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name(f"tiny {name}")
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{quant}"])
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(ROPE["rope_parameters"]["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    if "<|endoftext|>" not in tok.get_vocab():
        vocab.append(("<|endoftext|>", len(vocab)))
    assert [i for _, i in vocab] == list(range(cfg.vocab_size))
    specials = {*tok.all_special_tokens, "<|endoftext|>"}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t, _ in vocab])
    writer.add_token_scores([0.0] * len(vocab))  # no merges: every token is one byte (or a special)
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)

    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch),
                                     cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: GGUF stores the embedding once, and transformers ties when output.weight is absent
        base, suffix = hf_name.rsplit(".", 1)
        if drop is True or f"{names.get_name(base)}.{suffix}" in drop:
            continue
        data = t.numpy()
        if gguf_arch == "llama" and base.endswith(("q_proj", "k_proj")):
            heads = cfg.num_attention_heads if base.endswith("q_proj") else cfg.num_key_value_heads
            data = permute_for_llama_cpp(data, heads)
        if data.ndim == 2:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
