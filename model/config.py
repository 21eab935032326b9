"""Model configuration: one dataclass for the decoder, shared fields reused by the ViT."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .scores import ATTENTION_KINDS

GATE_KINDS = ("none", "headwise", "elementwise")
ROPE_SCALINGS = ("none", "linear", "llama3")  # transformers' rope_type names (model/rope.py)
SINK_LOGITS = ("none", "zero", "learned")


def swiglu_hidden(n_embd: int, intermediate_size: int | None) -> int:
    """SwiGLU width: given, or 8/3 n_embd (same parameters as a 4x GELU MLP) rounded up to 64."""
    return intermediate_size or 64 * math.ceil(8 * n_embd / 3 / 64)


NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu", "gelu_tanh", "quick_gelu")  # swiglu is gated; the others are fc -> act -> fc
# Block options that only ViTConfig has (what pretrained ViTs need); a decoder config has none of
# them and builds the Llama block with these values.
BLOCK_DEFAULTS = {"norm": "rmsnorm", "mlp": "swiglu", "mlp_bias": False, "o_proj_bias": False, "layer_scale": None}


def block_option(cfg, name: str):
    return getattr(cfg, name, BLOCK_DEFAULTS[name])


def mlp_hidden(cfg) -> int:
    """The MLP width of a block: intermediate_size, or by default 8/3 n_embd (SwiGLU) / 4 n_embd (GELU)."""
    if block_option(cfg, "mlp") == "swiglu":
        return swiglu_hidden(cfg.n_embd, cfg.intermediate_size)
    return cfg.intermediate_size or 4 * cfg.n_embd


@dataclass
class AttentionConfig:
    """Fields of the attention block (see docs/design.md, "The attention block")."""

    n_embd: int = 256  # residual stream width
    n_head: int = 4  # query heads
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    head_size: int | None = None  # width of one head; None = n_embd // n_head (Qwen3 sets it apart)
    attention_bias: bool = False  # biases on q_proj, k_proj, v_proj (Qwen2's layout; o_proj never has one)
    attention: str = "softmax"  # softmax | sigmoid | elu1 | linear (docs/design.md, "The attention block")
    attn_normalize: bool = False  # sigmoid / elu1: divide each row by its sum
    sigmoid_bias: float | None = None  # None = -log(block_size)
    gate: str = "none"  # none | headwise | elementwise: sigmoid output gate per head (Qiu et al. 2025, G1)
    # softmax only: a per-head logit b_h in the denominator, w_ij = exp(s_ij) / (exp(b_h) + sum_j exp(s_ij)).
    # zero: b_h = 0 (softmax + 1); learned: gpt-oss's per-head sinks, a parameter initialised at 0.0.
    sink_logit: str = "none"  # none | zero | learned
    sink_logit_init: float = 0.0  # learned: the value every b_h starts at (gpt-oss: 0; a retrofit: model/interop/retrofit.py)
    # learned logit only: the slot also carries a value v_h (head_dim) per KV head, shared by its query heads,
    # y_i = (sum_j exp(s_ij) v_j + exp(b_h) v_h) / (exp(b_h) + sum_j exp(s_ij)): a KV sink with no position that is
    # never evicted. Starts at 0 (then it is sink_logit alone); fixes/calibrate_sink.py fits it with no training.
    sink_value: bool = False
    qk_norm: bool = False  # RMSNorm on q and k per head (recommended for sigmoid)
    backend: str = "auto"  # model/backends/: auto resolves once, when the model is built or moved
    linear_chunk_size: int = 64  # attention=linear: tokens per chunk of the chunked (linear-time) kernel
    rope: bool = True  # RoPE over the sequence index; the ViT turns it off (absolute 2-D position embeddings)
    rope_theta: float = 10000.0  # RoPE base frequency
    # RoPE frequency scaling for contexts past the pretraining one, as transformers computes it:
    # linear divides every frequency by the factor; llama3 (Llama 3.1+) divides the low
    # frequencies, keeps the high ones and blends between, with the fields below.
    rope_scaling: str = "none"  # none | linear | llama3
    rope_scaling_factor: float = 1.0  # linear / llama3: how much longer the new context is
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_context: int = 8192  # llama3 only: the pretraining context
    norm_eps: float = 1e-5  # RMSNorm epsilon
    block_size: int = 256  # context length (training window)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def resolved_sigmoid_bias(self) -> float:
        return -math.log(self.block_size) if self.sigmoid_bias is None else self.sigmoid_bias

    def validate(self) -> None:
        """Raise ValueError naming the field and the allowed values."""
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"model.attention={self.attention!r} is not one of {list(ATTENTION_KINDS)}")
        if self.gate not in GATE_KINDS:
            raise ValueError(f"model.gate={self.gate!r} is not one of {list(GATE_KINDS)}")
        if self.sink_logit not in SINK_LOGITS:
            raise ValueError(f"model.sink_logit={self.sink_logit!r} is not one of {list(SINK_LOGITS)}")
        if self.sink_logit != "none" and self.attention != "softmax":
            raise ValueError(f"model.sink_logit={self.sink_logit} adds a logit to softmax's denominator and applies "
                             f"to attention=softmax only, got attention={self.attention!r}; set model.sink_logit=none")
        if self.sink_value and self.sink_logit != "learned":
            raise ValueError(f"model.sink_value=true gives the learned sink slot a value and needs model.sink_logit=learned, "
                             f"got model.sink_logit={self.sink_logit!r}")
        if self.attn_normalize and self.attention not in ("sigmoid", "elu1"):
            raise ValueError(
                "model.attn_normalize=true only applies to attention=sigmoid or elu1 "
                f"(softmax and linear are always row-normalised); got attention={self.attention!r}"
            )
        for name in ("n_embd", "n_head", "block_size", "linear_chunk_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.head_size is not None and self.head_size <= 0:
            raise ValueError(f"model.head_size must be null (= n_embd / n_head) or a positive integer, "
                             f"got {self.head_size}")
        if self.head_size is None and self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head} "
                             "(or set model.head_size)")
        if self.rope and self.head_dim % 2:
            raise ValueError(f"the head width {self.head_dim} must be even for RoPE")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"model.rope_scaling={self.rope_scaling!r} is not one of {list(ROPE_SCALINGS)}")
        if self.rope_scaling_factor <= 0 or self.rope_original_context <= 0:
            raise ValueError("model.rope_scaling_factor and model.rope_original_context must be > 0, got "
                             f"{self.rope_scaling_factor}, {self.rope_original_context}")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError("model.rope_scaling=llama3 needs 0 < rope_low_freq_factor < rope_high_freq_factor, got "
                             f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}")
        self.refuse_ignored()
        if self.n_kv_head is not None and self.n_kv_head <= 0:
            raise ValueError(f"model.n_kv_head must be null (= n_head) or a positive integer, got {self.n_kv_head}")
        if not math.isfinite(self.sink_logit_init):
            raise ValueError(f"model.sink_logit_init must be a finite number, got {self.sink_logit_init}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(f"model.rope_theta and model.norm_eps must be > 0, got {self.rope_theta}, {self.norm_eps}")
        if self.n_head % self.kv_heads:
            raise ValueError(f"model.n_head={self.n_head} must be divisible by model.n_kv_head={self.kv_heads}")


    def refuse_ignored(self) -> None:
        """A field that the chosen variant never reads, set away from its default, would train as if unset:
        refused. Defaults always pass, so every saved config.yaml (which lists them all) still loads."""
        defaults = AttentionConfig()
        ignored = {"sigmoid_bias": ("attention=sigmoid", self.attention != "sigmoid"),
                   "rope_scaling_factor": ("rope_scaling=linear or llama3", self.rope_scaling == "none"),
                   **{name: ("rope_scaling=llama3", self.rope_scaling != "llama3")
                      for name in ("rope_low_freq_factor", "rope_high_freq_factor", "rope_original_context")}}
        for name, (needs, unused) in ignored.items():
            if unused and getattr(self, name) != getattr(defaults, name):
                raise ValueError(f"model.{name}={getattr(self, name)} applies to {needs} only and would be ignored "
                                 f"here (attention={self.attention}, rope_scaling={self.rope_scaling}); remove it "
                                 f"or set it back to {getattr(defaults, name)}")


def check_mlp_and_init(cfg) -> None:
    """The MLP width and the init scale a GPT or ViT config shares."""
    if cfg.intermediate_size is not None and cfg.intermediate_size <= 0:
        raise ValueError(f"model.intermediate_size must be null (= 8/3 x n_embd) or a positive integer, "
                         f"got {cfg.intermediate_size}")
    if cfg.init_std <= 0:
        raise ValueError(f"model.init_std must be > 0, got {cfg.init_std}")


@dataclass
class GPTConfig(AttentionConfig):
    """Llama-style decoder. vocab_size None = take it from the tokenizer."""

    vocab_size: int | None = None  # None = the tokenizer's vocabulary
    n_layer: int = 4  # transformer blocks
    intermediate_size: int | None = None  # SwiGLU hidden width; None = 8/3 * n_embd rounded to 64
    tie_embeddings: bool = True  # the LM head shares the token embedding matrix
    init_std: float = 0.02  # std of the normal init of the weight matrices
    sink_tokens: int = 0  # learned embeddings prepended to every sequence (StreamingLLM 3.3), never predicted

    @property
    def mlp_hidden(self) -> int:
        return swiglu_hidden(self.n_embd, self.intermediate_size)

    def validate(self) -> None:
        super().validate()
        if self.vocab_size is not None and self.vocab_size <= 0:  # None: filled from the tokenizer
            raise ValueError(f"model.vocab_size must be a positive integer, got {self.vocab_size}")
        if self.n_layer <= 0:
            raise ValueError(f"model.n_layer must be a positive integer, got {self.n_layer}")
        if self.sink_tokens < 0:
            raise ValueError(f"model.sink_tokens must be >= 0 (0 = none), got {self.sink_tokens}")
        check_mlp_and_init(self)

