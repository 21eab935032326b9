"""Pretrained `transformers` decoders as sinklab GPTs, with the same logits.

    from runs.load import load_run
    run = load_run("hf:HuggingFaceTB/SmolLM2-135M")      # a hub id, or hf:/path/to/a/saved/folder
    run = load_run("hf:/models/SmolLM2-135M-Instruct.Q4_1.gguf")   # a GGUF file (model/interop/gguf_file.py)

Only architectures the decoder computes exactly are imported; anything else is refused with
the feature the decoder lacks. Weights and tokenizer come from the same folder (or GGUF file).

| model_type | what it maps to |
|---|---|
| llama (Llama 2/3, TinyLlama, SmolLM) | softmax; RoPE scaling `linear` or `llama3` (Llama 3.1+) |
| mistral | softmax; block_size capped at `sliding_window` (below) |
| qwen2 (Qwen2, Qwen2.5) | softmax + `attention_bias` (q/k/v biases) |
| qwen3 | softmax + `qk_norm` + explicit `head_size` |
| qwen3_next, full attention, dense MLP | softmax + qk_norm + `gate: elementwise` (sinklab's gated export) |

sinklab's qk_norm is Qwen3's q_norm / k_norm: a learnable RMSNorm over each head's channels,
before RoPE, with the model's norm eps (Qwen3-Next stores its weight as w - 1).

Sliding windows (Mistral 7B v0.1, Qwen with use_sliding_window): sinklab has no sliding-window
mask, so the import's block_size stops at the window; up to it the two models agree exactly.
Past it, generate with a sink cache (StreamingLLM: keys re-positioned inside the cache), which
is a different function from the original's window over absolute positions.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from . import gguf_file
from ..config import GPTConfig
from ..gpt import GPT
from .hf_folder import (CONFIG, HUB_METADATA, WEIGHT_NAMES, check_shapes, check_vocab, first_line, load_config,
                        load_tokenizer, read_json, read_weights, shard_names)
from ..weights import load_state

PREFIX = "hf:"
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "qwen3_next")
# What the decoder lacks for some common architectures it cannot represent (the one-line refusal).
GAPS = {
    "gpt2": "learned absolute positions, LayerNorm with biases and a GELU MLP",
    "gpt_neox": "LayerNorm with biases, parallel attention/MLP residuals and partial RoPE",
    "phi": "LayerNorm, parallel attention/MLP residuals, partial RoPE and a GELU MLP",
    "phi3": "a mapping for its fused qkv_proj / gate_up_proj weights and longrope scaling",
    "gemma": "a GeGLU MLP and sqrt(d)-scaled embeddings",
    "gemma2": "logit soft-capping, alternating sliding windows and sandwich norms",
    "gemma3": "alternating local/global attention, sandwich norms and a GeGLU MLP",
    "olmo2": "RMSNorm after attention and MLP (not before) and QK-norm over all heads",
    "mixtral": "a mixture-of-experts MLP",
    "qwen2_moe": "a mixture-of-experts MLP",
    "qwen3_moe": "a mixture-of-experts MLP",
    "gpt_oss": "a mixture-of-experts MLP, attention sinks with biases and alternating sliding windows",
}
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight")


def is_hf(ref) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIX)


@dataclass(frozen=True)
class Pretrained:
    """Where an `hf:` model lives: a transformers folder (local, or downloaded from the hub) or a
    GGUF file. Config, tokenizer and weights are read from there in transformers' names."""

    ref: str
    folder: Path  # the transformers folder, or the folder holding the GGUF file
    gguf: Path | None = None
    hub_id: str | None = None

    @property
    def name(self) -> str:
        """A readable name that no other model shares: the hub id ('/' -> '--'), or a local folder's or
        GGUF file's name plus a hash of its resolved path (two folders both called `hf` stay apart)."""
        if self.hub_id is not None:
            return self.hub_id.replace("/", "--")
        local = self.gguf or self.folder
        return f"{local.stem if self.gguf else local.name}-{hashlib.sha256(str(local).encode()).hexdigest()[:8]}"

    @property
    def path(self) -> Path:
        """The GGUF file, or the transformers folder."""
        return self.gguf or self.folder

    @property
    def config_file(self) -> Path:
        """Where the model's sizes are written: config.json, or the GGUF file's metadata."""
        return self.gguf or self.folder / CONFIG

    @property
    def tokenizer_spec(self) -> str:
        """What data.tokenizer takes to tokenise a run's data as this model does."""
        return str(self.path)

    def config(self):
        if self.gguf is not None:
            return gguf_file.read_config(self.gguf)
        return load_config(self.folder)  # a missing or damaged config.json named in one line

    def tokenizer(self):
        """The tokenizer as transformers loads it (BOS added when the model's tokenizer adds one)."""
        if self.gguf is None:
            return load_tokenizer(self.folder)  # a missing or damaged tokenizer file named in one line
        tok = gguf_file.read_tokenizer(self.gguf)
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{self.path}: the tokenizer has no fast (tokenizers) version; save a tokenizer.json with it")
        return tok

    def weights(self) -> dict[str, torch.Tensor]:
        return gguf_file.read_weights(self.gguf) if self.gguf is not None else read_weights(self.folder)

    def quantization(self) -> dict | None:
        """A GGUF file's quantisation (gguf_file.quantization); None for transformers weights."""
        return gguf_file.quantization(self.gguf) if self.gguf is not None else None


def locate(ref: str) -> Pretrained:
    """`hf:<GGUF file>` or `hf:<folder holding one .gguf>`, `hf:<transformers folder>`, or `hf:<owner/name>`
    downloaded (cached) from the hub."""
    name = ref[len(PREFIX):] if is_hf(ref) else ref
    local = Path(name).expanduser()
    found = gguf_file.find_gguf(local)
    if found is not None:
        return Pretrained(ref, found.parent, gguf=found)
    if local.is_file():
        raise FileNotFoundError(f"{ref}: a file that is not {gguf_file.SUFFIX}; pass a GGUF file, a transformers "
                                "folder or a hub id")
    if local.is_dir():
        return Pretrained(ref, local.resolve())
    return Pretrained(ref, hf_folder(ref), hub_id=name)


def hf_folder(ref: str) -> Path:
    """`hf:<local folder>` as it is; `hf:<owner/name>` downloaded (cached) from the hub."""
    name = ref[len(PREFIX):] if is_hf(ref) else ref
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser().resolve()
    if name.endswith(gguf_file.SUFFIX):
        raise FileNotFoundError(f"{ref}: no such GGUF file")
    if Path(name).is_absolute() or name.startswith(".") or name.count("/") != 1:
        raise FileNotFoundError(f"{ref}: no such file or folder, and not a hub id like hf:HuggingFaceTB/SmolLM2-135M")
    try:
        return download(name)
    except Exception as e:  # offline, no such repo, gated, network: all one message
        raise FileNotFoundError(f"{ref}: could not get it from the hub ({first_line(e)}); check the id, "
                                "your login (huggingface-cli login) and network, or pass a local folder") from None


def download(name: str) -> Path:
    """The hub repo's config, tokenizer and exactly the weight files transformers loads (a single
    file, or the shards its index lists), cached by huggingface_hub."""
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(name, allow_patterns=HUB_METADATA + [WEIGHT_NAMES[0][0]]))
    for single, index in WEIGHT_NAMES:
        if (folder / single).is_file():
            break
        if (folder / index).is_file():
            folder = Path(snapshot_download(name, allow_patterns=HUB_METADATA + shard_names(read_json(folder / index))))
            break
        if single == WEIGHT_NAMES[0][0]:  # no safetensors at all: an older repo with PyTorch pickles
            folder = Path(snapshot_download(name, allow_patterns=HUB_METADATA + [WEIGHT_NAMES[1][0]]))
    return folder


def rope_fields(hf_cfg) -> tuple[dict, list[str]]:
    """GPTConfig rope fields from transformers' rope parameters (5.x) or rope_theta + rope_scaling (4.x)."""
    params = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    if not params:
        params = {**(getattr(hf_cfg, "rope_scaling", None) or {}), "rope_theta": getattr(hf_cfg, "rope_theta", 1e4)}
    kind = params.get("rope_type", params.get("type", "default"))
    fields, gaps = {"rope_theta": float(params.get("rope_theta", 1e4))}, []
    partial = params.get("partial_rotary_factor", getattr(hf_cfg, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        gaps.append(f"partial RoPE (partial_rotary_factor={partial}; sinklab rotates the whole head)")
    if kind == "linear":
        fields.update(rope_scaling="linear", rope_scaling_factor=float(params["factor"]))
    elif kind == "llama3":
        fields.update(rope_scaling="llama3", rope_scaling_factor=float(params["factor"]),
                      rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]),
                      rope_original_context=int(params["original_max_position_embeddings"]))
    elif kind != "default":
        gaps.append(f"RoPE scaling {kind!r} (sinklab has default, linear and llama3)")
    return fields, gaps


def gpt_config(hf_cfg) -> GPTConfig:
    """The GPTConfig that computes what this transformers config computes, or ValueError naming
    what the decoder lacks."""
    arch = hf_cfg.model_type
    if arch not in SUPPORTED:
        lacks = GAPS.get(arch, "an implementation of this architecture")
        raise ValueError(f"cannot import model_type {arch!r}: sinklab's decoder lacks {lacks}; "
                         f"it imports {', '.join(SUPPORTED)}")
    fields, gaps = rope_fields(hf_cfg)
    if getattr(hf_cfg, "hidden_act", "silu") != "silu":
        gaps.append(f"hidden_act={hf_cfg.hidden_act!r} (sinklab's MLP is SwiGLU with silu)")
    if getattr(hf_cfg, "mlp_bias", False):
        gaps.append("MLP biases (mlp_bias=true)")
    # Qwen2 always has q/k/v biases; elsewhere attention_bias=true also puts one on o_proj.
    if arch != "qwen2" and getattr(hf_cfg, "attention_bias", False):
        gaps.append("an o_proj bias (attention_bias=true; sinklab biases q/k/v only)")
    layer_types = getattr(hf_cfg, "layer_types", None) or []
    if arch == "qwen3_next":
        if any(t != "full_attention" for t in layer_types):
            gaps.append("Gated DeltaNet (linear_attention) layers; only all-full_attention Qwen3-Next imports")
        if hf_cfg.num_experts > 0 and any(i not in hf_cfg.mlp_only_layers for i in range(hf_cfg.num_hidden_layers)):
            gaps.append("a mixture-of-experts MLP (num_experts > 0)")
    if gaps:
        raise ValueError(f"cannot import this {arch} model: sinklab's decoder lacks " + "; ".join(gaps))

    heads, width = hf_cfg.num_attention_heads, hf_cfg.hidden_size
    head_dim = getattr(hf_cfg, "head_dim", None) or width // heads
    context = hf_cfg.max_position_embeddings
    window = getattr(hf_cfg, "sliding_window", None)
    if window and (arch == "mistral" or "sliding_attention" in layer_types):
        context = min(context, window)  # no sliding-window mask in sinklab: stop where it would start
    return GPTConfig(
        vocab_size=hf_cfg.vocab_size, n_layer=hf_cfg.num_hidden_layers, n_embd=width, n_head=heads,
        n_kv_head=getattr(hf_cfg, "num_key_value_heads", None) or heads,
        head_size=None if head_dim * heads == width else head_dim,
        intermediate_size=hf_cfg.intermediate_size, norm_eps=hf_cfg.rms_norm_eps, block_size=context,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
        attention="softmax", attention_bias=arch == "qwen2", qk_norm=arch in ("qwen3", "qwen3_next"),
        gate="elementwise" if arch == "qwen3_next" else "none", **fields,
    )


def to_sinklab_weights(hf_state: dict, cfg: GPTConfig, arch: str) -> dict[str, torch.Tensor]:
    """transformers names -> sinklab names (they differ by the `model.` prefix, and for Qwen3-Next
    by its (1 + w) norms and its gate stored interleaved with the queries in q_proj)."""
    state = {}
    for name, t in hf_state.items():
        if name.endswith("rotary_emb.inv_freq") or name.startswith("mtp."):
            continue  # recomputed buffers; Qwen3-Next's multi-token-prediction head
        name = name.removeprefix("model.")
        if arch == "qwen3_next" and (name.endswith(NORMS) or name == "norm.weight"):
            t = t.float() + 1
        if arch == "qwen3_next" and name.endswith("q_proj.weight"):
            q, g = t.view(cfg.n_head, 2, cfg.head_dim, -1).unbind(1)  # per head: [query | gate]
            state[name] = q.reshape(-1, t.shape[-1])
            name, t = name.replace("q_proj", "g_proj"), g.reshape(-1, t.shape[-1])
        state[name] = t
    return state


def to_hf_weights(state: dict, cfg: GPTConfig, arch: str) -> dict[str, torch.Tensor]:
    """The inverse of `to_sinklab_weights` (what the exporter writes). A headwise gate becomes
    an elementwise one whose rows repeat per head, which computes the same gate."""
    out = {}
    for name, t in state.items():
        if name.endswith("g_proj.weight"):
            continue  # folded into q_proj below
        if arch == "qwen3_next" and (name.endswith(NORMS) or name == "norm.weight"):
            t = t - 1
        if arch == "qwen3_next" and name.endswith("q_proj.weight"):
            g = state[name.replace("q_proj", "g_proj")]
            if cfg.gate == "headwise":
                g = g.repeat_interleave(cfg.head_dim, dim=0)
            t = torch.stack((t.view(cfg.n_head, cfg.head_dim, -1), g.view(cfg.n_head, cfg.head_dim, -1)), 1)
            t = t.reshape(-1, t.shape[-1])
        out[name if name == "lm_head.weight" else f"model.{name}"] = t
    return out


def write_tokenizer(ref: str, path: str | Path) -> Path:
    """Save the pretrained model's tokenizer as a tokenizer.json (what data.tokenizer names)."""
    path = Path(path)
    locate(ref).tokenizer().backend_tokenizer.save(str(path))
    return path


def read_source(ref: str):
    """(Pretrained, transformers config, GPTConfig, tokenizer, state dict in sinklab's names) of an import,
    with the checks every path shares: a damaged folder is one ValueError naming the file (model/interop/hf_folder.py),
    and the vocabulary must cover the tokenizer's, for a folder and a GGUF file alike."""
    source = locate(ref)
    hf_cfg = source.config()
    try:
        cfg = gpt_config(hf_cfg)
    except (AttributeError, TypeError) as e:  # a field the architecture needs is missing or of the wrong type
        raise ValueError(f"{source.config_file} is incomplete for a {hf_cfg.model_type} model ({first_line(e)})") from None
    tok = source.tokenizer()  # before the weights: a missing tokenizer fails fast
    check_vocab(tok, cfg.vocab_size, source.config_file)
    return source, hf_cfg, cfg, tok, to_sinklab_weights(source.weights(), cfg, hf_cfg.model_type)


def init_model(ref: str) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of a pretrained model in sinklab's names: what `train.init_from: hf:...`
    builds its GPT from (`load_state(GPT(cfg), state, ref)`, model/weights.py); train on text
    tokenised by the same model's tokenizer (`Pretrained.tokenizer_spec`). The state dict is in the
    checkpoint's dtype (fp32 for a dequantised GGUF); its shapes are checked against the config."""
    from ..gpt import GPT

    source, _, cfg, _, state = read_source(ref)
    with torch.device("meta"):  # shapes only, no memory
        check_shapes(GPT(cfg), state, source.config_file)
    return cfg, state


def load_pretrained(ref: str, dtype: torch.dtype | None = None):
    """(GPT, tokenizers.Tokenizer, config dict, path) for `load_run("hf:...")`; path is the
    transformers folder or the GGUF file. The GPT is built in `dtype` (None: fp32), so a bf16
    import never holds an fp32 copy. config["hf"] records where the model came from, its output
    name (`Pretrained.name`) and a GGUF file's quantisation."""
    import dataclasses

    source, hf_cfg, cfg, tok, state = read_source(ref)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        model = GPT(cfg)
    finally:
        torch.set_default_dtype(default)
    check_shapes(model, state, source.config_file)
    load_state(model, state, str(source.path))
    info = {"ref": ref, "name": source.name, "folder": str(source.folder), "path": str(source.path),
            "format": "gguf" if source.gguf else "transformers", "quantization": source.quantization(),
            "model_type": hf_cfg.model_type, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    config = {"task": "lm", "model": dataclasses.asdict(cfg), "hf": info}
    return model, tok.backend_tokenizer, config, source.path
