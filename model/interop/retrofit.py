"""Sink fixes added to a pretrained model (`train.init_from=hf:...` with `model.sink_logit`,
`model.sink_tokens` or `model.gate`): the imported state dict completed with the new parameters,
started so that the model computes the import's function at step 0.

    gate (headwise / elementwise)  g_proj = 0, so sigmoid(x W_g) = 1/2 exactly, and o_proj doubled:
                                   o_proj(2W) (y * 1/2) = o_proj(W) y, bit for bit (scaling by 2 is
                                   exact). The gate is Qiu et al.'s sigmoid gate from then on; only
                                   o_proj's parametrisation is doubled (weight decay sees 2W).
    sink_logit: learned            b_h = model.sink_logit_init for every head. Each row's output is
                                   scaled by sigmoid(lse_i - b_h) (lse_i: the row's log-sum-exp):
                                   at b = -30 the change is below fp32 resolution whenever lse_i > -13,
                                   so the function is the import's; at gpt-oss's 0 a row keeps
                                   1 - sigmoid(-lse_i) of its mass. The gradient on b_h is about that
                                   mass, so a very negative start barely moves (Adam's eps included).
    sink_tokens: N                 the N sink embeddings start as the embeddings of `token_ids`
                                   (the import's BOS, else its EOS): the retrofit computes exactly
                                   what the import computes on those N tokens followed by the text
                                   (RoPE is relative: the text's scores do not depend on the shift).
                                   On the text alone this differs from the import, which had no
                                   such first tokens.
    sink_value: true               v_h = 0 per KV head: with sink_logit: learned, the slot adds its logit's
                                   share of the denominator and nothing to the numerator until trained
                                   (fixes/calibrate_sink.py fits b_h and v_h instead, with no training).
    sink_logit: zero               no parameter: softmax + 1 from step 0 (rows keep 1 - sigmoid(-lse_i)).
"""
from __future__ import annotations

import torch

FIXES = ("sink_logit", "sink_value", "sink_tokens", "gate")  # the model fields a retrofit may add to an import


def added_fields(run_model, imported) -> dict:
    """The fixes the run's model config asks for on top of the import's config: {field: value}.
    A field the import already has (Qwen3-Next's gate) is kept; asking for another value of it is a
    ValueError."""
    out = {}
    for name in FIXES:
        wanted, has = getattr(run_model, name), getattr(imported, name)
        if wanted in ("none", 0, False) or wanted == has:
            continue
        if has not in ("none", 0, False):
            raise ValueError(f"the import already has model.{name}={has!r}; drop model.{name}={wanted!r} "
                             f"or set it to {has!r}")
        out[name] = wanted
    return out


def complete_state(state: dict[str, torch.Tensor], cfg, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """The imported state dict (sinklab names) plus the parameters of cfg's fixes, started as the
    module docstring says; `token_ids`: the N tokens whose embeddings start the sink tokens."""
    state = dict(state)
    layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
    for i in layers:
        prefix = f"layers.{i}.self_attn."
        o_proj = state[prefix + "o_proj.weight"]
        if cfg.gate != "none" and prefix + "g_proj.weight" not in state:
            rows = cfg.n_head if cfg.gate == "headwise" else cfg.n_head * cfg.head_dim
            state[prefix + "g_proj.weight"] = o_proj.new_zeros(rows, cfg.n_embd)
            state[prefix + "o_proj.weight"] = o_proj * 2
        if cfg.sink_logit == "learned" and prefix + "sinks" not in state:
            state[prefix + "sinks"] = torch.full((cfg.n_head,), float(cfg.sink_logit_init), dtype=torch.float32)
        if cfg.sink_value and prefix + "sink_values" not in state:
            state[prefix + "sink_values"] = o_proj.new_zeros(cfg.kv_heads, cfg.head_dim)
    if cfg.sink_tokens and "sink_tokens" not in state:
        if len(token_ids) != cfg.sink_tokens:
            raise ValueError(f"model.sink_tokens={cfg.sink_tokens} needs {cfg.sink_tokens} token ids to start from, "
                             f"got {token_ids}")
        state["sink_tokens"] = state["embed_tokens.weight"][torch.tensor(token_ids)].clone()[None]
    return state
