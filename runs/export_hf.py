"""Export a trained run as a `transformers` folder of the architecture that computes it exactly.

    python -m runs.export_hf --ckpt out/default --out hf/default

| sinklab variant (attention: softmax) | transformers architecture |
|---|---|
| plain (optionally RoPE scaling, explicit head_size) | LlamaForCausalLM |
| attention_bias (q/k/v biases) | Qwen2ForCausalLM |
| qk_norm | Qwen3ForCausalLM |
| qk_norm + gate elementwise or headwise | Qwen3NextForCausalLM, every layer full attention, dense MLP |

Qwen3-Next's gated attention is Qiu et al.'s G1 gate: sigmoid of a projection of the block's
normed input, per head and channel, before o_proj; its gate weights sit interleaved with the
queries in q_proj, and a headwise gate is the elementwise one with each head's row repeated.
Everything else is refused with the reason: sigmoid / elu1 / linear attention (no transformers
architecture computes them), a gate without qk_norm (Qwen3-Next always normalises q and k),
biases together with qk_norm or a gate (Qwen3 / Qwen3-Next would bias o_proj as well), rope=false.
The folder then works with lm-eval-harness, vLLM, `AutoModelForCausalLM.from_pretrained` and
sinklab's own `hf:` import (model/interop/hf_import.py), all with the same logits.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from data.tokenizer import EOT
from model.interop.hf_import import to_hf_weights

from .load import load_run


def unsupported(model_cfg: dict) -> list[str]:
    """Why this model has no exact transformers architecture (empty = it has one)."""
    reasons = []
    attention, gate, qk_norm = model_cfg.get("attention"), model_cfg.get("gate", "none"), model_cfg.get("qk_norm")
    if attention != "softmax":
        reasons.append(f"attention={attention!r} (transformers' decoders compute softmax attention)")
    if gate != "none" and not qk_norm:
        reasons.append(f"gate={gate!r} without qk_norm (Qwen3-Next, the gated architecture, always normalises q and k)")
    if model_cfg.get("attention_bias") and (qk_norm or gate != "none"):
        reasons.append("attention_bias with qk_norm or a gate (Qwen3 and Qwen3-Next would bias o_proj as well)")
    if not model_cfg.get("rope", True):
        reasons.append("rope=false (every exported architecture applies RoPE)")
    if model_cfg.get("sink_logit", "none") != "none":
        reasons.append(f"sink_logit={model_cfg['sink_logit']!r} (no dense transformers decoder has a sink logit)")
    if model_cfg.get("sink_value", False):
        reasons.append("sink_value (no transformers decoder has a key-value sink slot)")
    if model_cfg.get("sink_tokens", 0):
        reasons.append("sink_tokens (no transformers decoder prepends learned embeddings)")
    return reasons


def architecture(model_cfg: dict) -> str:
    """The transformers model_type an exportable model becomes."""
    if model_cfg.get("gate", "none") != "none":
        return "qwen3_next"
    if model_cfg.get("qk_norm"):
        return "qwen3"
    return "qwen2" if model_cfg.get("attention_bias") else "llama"


def hf_config(cfg, arch: str, eot_id: int | None):
    """The transformers config of `arch` with the GPTConfig's sizes, norms and RoPE."""
    from transformers import AutoConfig

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        rope.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_context)
    extra = {}
    if arch == "qwen3_next":  # no Gated DeltaNet layers, no experts, RoPE over the whole head
        rope["partial_rotary_factor"] = 1.0
        extra = {"layer_types": ["full_attention"] * cfg.n_layer, "num_experts": 0}
    if arch == "llama":
        extra = {"attention_bias": False, "mlp_bias": False}
    return AutoConfig.for_model(
        arch, vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_parameters=rope, hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eot_id, eos_token_id=eot_id, **extra,
    )


def export_model(model, tokenizer, out: str | Path, eot: str) -> Path:
    """Write `model` (a sinklab GPT) and its tokenizers.Tokenizer as a transformers folder."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = model.config
    reasons = unsupported(dataclasses.asdict(cfg))
    if reasons:
        raise ValueError("no transformers architecture computes this model: " + "; ".join(reasons))
    arch = architecture(dataclasses.asdict(cfg))
    hf = AutoModelForCausalLM.from_config(hf_config(cfg, arch, tokenizer.token_to_id(eot))).to(torch.float32)
    state = to_hf_weights({k: v.float() for k, v in model.state_dict().items()}, cfg, arch)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    hf.load_state_dict(state, strict=not cfg.tie_embeddings)  # every name and shape must line up
    out = Path(out)
    hf.save_pretrained(out, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eot, bos_token=eot, unk_token=None)
    tok.save_pretrained(out)
    return out


def check_out(out: Path) -> None:
    """--out must be (or become) a folder: transformers' save_pretrained only logs, and writes
    nothing, when it is a file."""
    for p in (out, *out.parents):  # the nearest existing ancestor
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"--out {out}: {p} is a file, not a folder; pass a folder path for the export")
            return


def export(ckpt: str | Path, out: str | Path) -> tuple[Path, str]:
    """Export a run or checkpoint; returns the folder and the architecture's class name."""
    check_out(Path(out))
    run = load_run(ckpt)
    if run.config.get("task", "lm") != "lm":
        raise ValueError(f"{run.checkpoint} is a {run.config['task']!r} run; only language models export")
    reasons = unsupported(run.config["model"])
    if reasons:
        raise ValueError(f"{run.checkpoint} has no exact transformers architecture: " + "; ".join(reasons))
    folder = export_model(run.model, run.tokenizer, out, EOT)
    from transformers import AutoConfig

    return folder, AutoConfig.from_pretrained(folder).architectures[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("--out", required=True, help="folder to write the transformers model to")
    args = p.parse_args(argv)
    try:
        out, arch = export(args.ckpt, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({arch}); load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
