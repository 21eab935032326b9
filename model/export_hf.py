"""Export a trained softmax run as a `transformers` LlamaForCausalLM folder.

    python -m model.export_hf --ckpt out/default --out hf/default

The decoder already uses HF Llama's names, layout and rotate-half RoPE, so export is a rename
("model." prefix) plus a LlamaConfig; the folder then works with lm-eval-harness, vLLM and
`AutoModelForCausalLM.from_pretrained`. Variants Llama has no counterpart for (sigmoid, elu1,
linear attention, output gates, qk-norm) are refused: the exported model would compute a
different function.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .load import load_run


def unsupported(model_cfg: dict) -> list[str]:
    """Why this model cannot be a LlamaForCausalLM (empty = it can)."""
    reasons = []
    if model_cfg.get("attention") != "softmax":
        reasons.append(f"attention={model_cfg.get('attention')!r} (Llama computes softmax attention)")
    if model_cfg.get("gate", "none") != "none":
        reasons.append(f"gate={model_cfg['gate']!r} (Llama has no attention output gate)")
    if model_cfg.get("qk_norm"):
        reasons.append("qk_norm=true (Llama has no q/k RMSNorm)")
    if not model_cfg.get("rope", True):
        reasons.append("rope=false (Llama always applies RoPE)")
    return reasons


def llama_config(cfg, eot_id: int | None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eot_id, eos_token_id=eot_id,
    )


def export(ckpt: str | Path, out: str | Path) -> Path:
    """Write config.json, model.safetensors and the tokenizer files to `out`; return it."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from data.tokenizer import EOT

    run = load_run(ckpt)
    if run.config.get("task", "lm") != "lm":
        raise ValueError(f"{run.checkpoint} is a {run.config['task']!r} run; only language models export to Llama")
    reasons = unsupported(run.config["model"])
    if reasons:
        raise ValueError(f"{run.checkpoint} cannot be exported as LlamaForCausalLM: " + "; ".join(reasons)
                         + ". Only softmax models without gate and qk_norm have an exact Llama equivalent.")
    cfg = run.model.config
    hf = LlamaForCausalLM(llama_config(cfg, run.tokenizer.token_to_id(EOT))).to(torch.float32)
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v
             for k, v in run.model.state_dict().items()}
    hf.load_state_dict(state, strict=True)  # every name and shape must line up
    out = Path(out)
    hf.save_pretrained(out, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=run.tokenizer, eos_token=EOT, bos_token=EOT, unk_token=None)
    tok.save_pretrained(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir (its latest checkpoint) or a checkpoint dir")
    p.add_argument("--out", required=True, help="folder to write the transformers model to")
    args = p.parse_args(argv)
    try:
        out = export(args.ckpt, args.out)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (LlamaForCausalLM); load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
