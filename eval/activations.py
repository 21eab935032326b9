"""Massive activations in the residual stream (Sun et al. 2024, "Massive Activations in Large
Language Models"): a few activations per layer orders of magnitude above the median, usually
at the first token in fixed channels, which act as an attention sink's bias.

Per layer (hidden state after each block), as Sun et al.'s code (locuslab/massive-activations,
main_llm.py exp2) computes it: per sequence the top-3 |h| and the median |h| (torch.median,
the lower middle value), averaged over sequences; the headline ratio is the averaged top-1 over
the averaged median. Pooled over all sequences, as extras: the top-3 |h| with their
(sequence, position, channel, token id), the median, their ratio, the count of "massive" values,
and the first token's hidden-state norm over the mean norm of the other tokens.

Value states (Gu et al. 2025, "When Attention Sink Emerges": the sink token's values are small,
so the attention it absorbs adds little to the output): per layer the L2 norm of v = v_proj(x)
per key/value head at the first text token, against the mean over the other text tokens.

The compression valley (Queipo-de-Llano et al. 2025, "Attention sinks and compression valleys in
LLMs are two sides of the same coin"): per layer and sequence, the matrix-based (von Neumann /
Shannon, alpha = 1) entropy of the token representations X (T x C, uncentred, the hidden state
after the block): H = -sum_i p_i log p_i with p_i the eigenvalues of K / tr(K), K = X X^T, i.e.
p_i = sigma_i^2 / ||X||_F^2 for the singular values of X; averaged over sequences, in nats and
divided by log min(T, C), its largest value. Uncentred, as in their bound: a BOS row of norm M
takes at least M^2 / ||X||_F^2 of the spectrum, so a massive activation forces the entropy down.

Sequences are plain windows of the held-out text, as Sun et al.'s (no BOS; `--bos` puts the
run's BOS first); model.sink_tokens' learned tokens are left out of every statistic.

    python -m eval.activations --ckpt out/<run> [--n-seqs 10] [--bos]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

from probes.sequences import held_out_sequences

from . import HelpFormatter, positive_int
from .cli import add_lm_arguments, bos_id, for_each_checkpoint
from .progress import progress
from .result import EvalResult

# Sun et al.'s working definition: |h| > 100 and about 1000x the median of its hidden state.
MASSIVE_ABS = 100.0
MASSIVE_REL = 1000.0

N_SEQS = 10  # held-out sequences of block_size tokens, as Sun et al.


def massive_activations(hidden, top: int = 3, tokens=None) -> list[dict]:
    """Per-layer statistics of `hidden` (a list of (B, T, C) tensors): per sequence, averaged
    (`top_per_seq`, `median_per_seq`, `ratio_per_seq`) and pooled over the batch (the rest).
    `tokens` (B, T) names the token id at each pooled top position."""
    stats = []
    for h in hidden:
        a = h.detach().float().abs()
        B, T, C = a.shape
        per_seq_top = a.reshape(B, -1).topk(min(top, T * C), dim=1).values.mean(0)  # (top,)
        per_seq_median = float(a.reshape(B, -1).median(dim=1).values.mean())
        vals, flat = a.reshape(-1).topk(min(top, a.numel()))
        median = float(np.median(a.cpu().numpy()))  # interpolated median, as numpy defines it
        top_list = []
        for v, f in zip(vals.tolist(), flat.tolist()):
            seq, rest = divmod(f, T * C)
            pos, ch = divmod(rest, C)
            entry = {"value": v, "seq": seq, "position": pos, "channel": ch}
            if tokens is not None:
                entry["token_id"] = int(tokens[seq, pos])
            top_list.append(entry)
        norms = h.detach().float().norm(dim=-1)  # (B, T)
        rest_norm = float(norms[:, 1:].mean()) if T > 1 else float("nan")
        first_norm = float(norms[:, 0].mean())
        stats.append({
            "top_per_seq": per_seq_top.tolist(),
            "median_per_seq": per_seq_median,
            "ratio_per_seq": per_seq_top[0].item() / per_seq_median if per_seq_median > 0 else float("inf"),
            "top": top_list,
            "median_abs": median,
            "ratio_top1_median": vals[0].item() / median if median > 0 else float("inf"),
            "n_massive": int(((a > MASSIVE_ABS) & (a > MASSIVE_REL * median)).sum()),
            "first_token_norm": first_norm,
            "other_tokens_mean_norm": rest_norm,
            "first_token_norm_ratio": first_norm / rest_norm if rest_norm > 0 else float("nan"),
            "matrix_entropy": float(matrix_entropy(h).mean()),
        })
        stats[-1]["matrix_entropy_normalised"] = stats[-1]["matrix_entropy"] / np.log(min(T, C)) if min(T, C) > 1 else 0.0
    return stats


def matrix_entropy(h: torch.Tensor) -> torch.Tensor:
    """Per sequence of h (B, T, C): the Shannon entropy (nats) of the eigenvalues of K / tr(K),
    K = X X^T of the uncentred token representations X (T, C). A zero X has entropy 0."""
    x = h.detach().double()
    gram = x @ x.transpose(-2, -1) if x.shape[-2] <= x.shape[-1] else x.transpose(-2, -1) @ x  # same nonzero spectrum
    lam = torch.linalg.eigvalsh(gram).clamp_min(0.0)
    p = lam / lam.sum(-1, keepdim=True).clamp_min(torch.finfo(lam.dtype).tiny)
    return -(p * torch.log(torch.where(p > 0, p, 1.0))).sum(-1)


@torch.no_grad()
def value_norms(model, sequences, batch_size: int = 8) -> list[dict]:
    """Per layer, the L2 norm of the value state v = v_proj(normed block input), per key/value
    head, at the first text token and averaged over the other text tokens of `sequences` (N, T),
    then over sequences. With model.sink_tokens the learned tokens (which come first) are reported
    apart, as `sink_tokens_value_norm`, and the first text token is the one after them."""
    device = next(model.parameters()).device
    layers = [block.self_attn for block in model.layers]
    captured = [None] * len(layers)

    def keep(i):
        def hook(module, inputs, output):
            captured[i] = output.detach().float()
        return hook

    handles = [attn.v_proj.register_forward_hook(keep(i)) for i, attn in enumerate(layers)]
    n = model.config.sink_tokens
    sums = None
    count = 0
    try:
        for batch in torch.as_tensor(sequences).long().split(batch_size):
            model(batch.to(device))
            per_layer = []
            for attn, v in zip(layers, captured):
                norms = v.view(*v.shape[:2], attn.cfg.kv_heads, attn.cfg.head_dim).norm(dim=-1)  # (B, T', Hkv)
                per_layer.append(torch.stack([norms[:, n:n + 1].mean(1).sum(0), norms[:, n + 1:].mean(1).sum(0),
                                              norms[:, :n].mean(1).sum(0) if n else torch.zeros_like(norms[0, 0])]))
            step = torch.stack(per_layer).cpu()  # (L, 3, Hkv): first, others, sink tokens; summed over the batch
            sums = step if sums is None else sums + step
            count += batch.shape[0]
    finally:
        for h in handles:
            h.remove()
    out = []
    for first, others, learned in sums / count:
        row = {"first_token_value_norm": float(first.mean()), "other_tokens_value_norm": float(others.mean()),
               "first_token_value_norm_ratio": float(first.mean() / others.mean()),
               "first_token_value_norm_per_head": first.tolist(), "other_tokens_value_norm_per_head": others.tolist()}
        if n:
            row["sink_tokens_value_norm"] = float(learned.mean())
        out.append(row)
    return out


@dataclass
class ActivationsResult(EvalResult):
    layers: list
    max_top1: float
    max_ratio: float
    max_abs: float
    max_ratio_top1_median: float
    n_seqs: int
    T: int
    bos_first: bool
    sink_tokens: int
    attention: dict
    value_norms: list
    min_value_norm_ratio: float
    entropy_valley_layer: int
    min_matrix_entropy_normalised: float
    massive_activation_layer: int

    AXES = {"max_top1": "largest |h| (mean over sequences)", "max_ratio": "max |h| / median |h|"}

    DEFINITIONS = {
        "layers": "one entry per block, hidden state (residual stream) after that block",
        "top_per_seq": "per sequence the 3 largest |h| over positions and channels, averaged over sequences",
        "median_per_seq": "per sequence the median |h| (lower middle value, torch.median), averaged over sequences",
        "ratio_per_seq": "top_per_seq[0] / median_per_seq (Sun et al.'s layerwise figure)",
        "max_top1": "largest top_per_seq[0] over layers (headline)",
        "max_ratio": "largest ratio_per_seq over layers (headline)",
        "top": "pooled: 3 largest |h| over all sequences, positions and channels, with their location "
               "(seq = sequence index, position = token index from 0, token_id and text = the token there)",
        "median_abs": "pooled: median |h| over all sequences, positions and channels (interpolated, numpy)",
        "ratio_top1_median": "pooled: largest |h| / median |h|",
        "max_abs": "pooled: largest |h| over layers",
        "max_ratio_top1_median": "pooled: largest ratio_top1_median over layers",
        "n_massive": f"activations with |h| > {MASSIVE_ABS:g} and > {MASSIVE_REL:g} x median "
                     "(Sun et al.'s working definition)",
        "first_token_norm_ratio": "mean L2 norm of the first token's hidden state / mean L2 norm "
                                  "of the other tokens' hidden states",
        "value_norms": "one entry per block: L2 norm of the value state v_proj(x) per key/value head "
                       "(Gu et al. 2025: sink tokens carry small values), at the first text token and the "
                       "mean over the other text tokens, averaged over heads and sequences; _per_head: per head",
        "first_token_value_norm_ratio": "first token's value norm / mean value norm of the other tokens",
        "sink_tokens_value_norm": "mean value norm of the learned sink tokens (model.sink_tokens only)",
        "min_value_norm_ratio": "smallest first_token_value_norm_ratio over layers (headline)",
        "matrix_entropy": "per block: Queipo-de-Llano et al.'s matrix-based entropy of the hidden states, per "
                          "sequence -sum_i p_i log p_i (nats), p_i the eigenvalues of K / tr(K), K = X X^T of the "
                          "uncentred (T x C) token representations X; averaged over sequences",
        "matrix_entropy_normalised": "matrix_entropy / log min(T, C): 1 = a flat spectrum, 0 = rank one",
        "entropy_valley_layer": "the block (1-indexed) with the lowest matrix_entropy_normalised: the compression "
                                "valley's bottom",
        "min_matrix_entropy_normalised": "matrix_entropy_normalised at entropy_valley_layer",
        "massive_activation_layer": "the block (1-indexed) with the largest top_per_seq[0]: where the massive "
                                    "activation is largest, to set beside entropy_valley_layer",
        "bos_first": "sequences start with BOS (--bos); the default, as Sun et al., is plain windows of the "
                     "held-out text without BOS",
        "sink_tokens": "model.sink_tokens' learned tokens in front of every sequence: left out of every number "
                       "here (positions, token ids and the first token are the text's)",
    }


@torch.no_grad()
def evaluate(model, sequences, batch_size: int = 8, tokenizer=None, bos_id: int | None = None) -> ActivationsResult:
    """Run `model` on (N, T) held-out ids and report `massive_activations` of the residual stream
    at the text tokens (model.sink_tokens' learned tokens are left out); with `tokenizer` the
    pooled top positions also carry their token's text. `bos_id` is recorded as `bos_first`
    when every sequence starts with it."""
    device = next(model.parameters()).device
    model.eval()
    sequences = torch.as_tensor(sequences).long()
    per_layer, n_sink = None, 0
    bar = progress(sequences.numel(), "eval.activations")
    for batch in sequences.split(batch_size):
        out = model(batch.to(device), return_hidden=True)
        n_sink = out.sink_tokens
        hidden = [h[:, n_sink:].cpu() for h in out.hidden]
        per_layer = hidden if per_layer is None else [torch.cat(p) for p in zip(per_layer, hidden)]
        bar.update(batch.numel())
    bar.close()
    layers = massive_activations(per_layer, tokens=sequences)
    if tokenizer is not None:
        for layer in layers:
            for entry in layer["top"]:
                entry["text"] = tokenizer.decode([entry["token_id"]], skip_special_tokens=False)
    values = value_norms(model, sequences, batch_size)
    cfg = model.config
    return ActivationsResult(
        layers=layers,
        max_top1=max(l["top_per_seq"][0] for l in layers),
        max_ratio=max(l["ratio_per_seq"] for l in layers),
        max_abs=max(l["top"][0]["value"] for l in layers),
        max_ratio_top1_median=max(l["ratio_top1_median"] for l in layers),
        n_seqs=int(per_layer[0].shape[0]), T=int(per_layer[0].shape[1]),
        bos_first=bos_id is not None and bool((sequences[:, 0] == bos_id).all()), sink_tokens=n_sink,
        attention={"kind": cfg.attention, "attn_normalize": cfg.attn_normalize, "gate": cfg.gate},
        value_norms=values, min_value_norm_ratio=min(v["first_token_value_norm_ratio"] for v in values),
        entropy_valley_layer=1 + int(np.argmin([l["matrix_entropy_normalised"] for l in layers])),
        min_matrix_entropy_normalised=min(l["matrix_entropy_normalised"] for l in layers),
        massive_activation_layer=1 + int(np.argmax([l["top_per_seq"][0] for l in layers])))


LAYER_AXIS = "layer (0-indexed, as layers.N)"


def plot(result: ActivationsResult, path) -> None:
    """Sun et al.-style: top-1/2/3 and median |h| per layer (log scale), the first-token
    norm ratio per layer, and the first token's value norm next to the other tokens'."""
    from .plots import save, subplots

    layers = result.layers
    x = list(range(len(layers)))  # 0-indexed, as the JSON's lists, layers.N and eval.sink's heatmap
    fig, axes = subplots(1, 4, width=5.5, height=3.8)
    ax = axes[0, 0]
    for r in range(len(layers[0]["top_per_seq"])):
        ax.plot(x, [l["top_per_seq"][r] for l in layers], marker="o", label=f"top {r + 1}")
    ax.plot(x, [l["median_per_seq"] for l in layers], marker="o", color="gray", label="median")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("|h|")
    ax.set_title("largest |h| per sequence, mean over sequences")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.bar(x, [l["first_token_norm_ratio"] for l in layers])
    ax.axhline(1.0, color="gray", ls="--")
    ax.set_xticks(x)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_title("first-token norm / mean norm of other tokens")
    ax = axes[0, 2]
    ax.plot(x, [v["first_token_value_norm"] for v in result.value_norms], marker="o", label="first token")
    ax.plot(x, [v["other_tokens_value_norm"] for v in result.value_norms], marker="o", label="other tokens (mean)")
    ax.set_xticks(x)
    ax.set_xlabel(LAYER_AXIS)
    ax.set_ylabel("|v| per head")
    ax.set_title("value-state norm")
    ax.legend(fontsize=8)
    ax = axes[0, 3]
    ax.plot(x, [l["matrix_entropy_normalised"] for l in layers], marker="o")
    ax.set_xticks(x)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_title("matrix entropy / log min(T, C)")
    save(fig, path)


def main(argv=None) -> list[ActivationsResult]:
    ap = argparse.ArgumentParser(prog="python -m eval.activations", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add_lm_arguments(ap)
    ap.add_argument("--n-seqs", type=positive_int, default=N_SEQS)
    ap.add_argument("--length", type=positive_int, default=None,
                    help="tokens per sequence (default: the block size; an hf: import's context capped at 256)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--bos", action="store_true", help="start every sequence with the run's BOS token "
                    "(default: plain held-out windows, as Sun et al.; needs data.bos)")
    args = ap.parse_args(argv)

    def one(run, out):
        cfg = run.model.config
        T = min(args.length or run.eval_block_size, cfg.block_size)
        bos = bos_id(run) if args.bos else None
        if args.bos and bos is None:
            raise ValueError(f"--bos but {run.run_dir} has no BOS token (its data has no data.bos); drop --bos")
        seqs = held_out_sequences(run.val_tokens(), args.n_seqs, T, bos_id=bos)
        result = evaluate(run.model, seqs, args.batch_size, tokenizer=run.tokenizer, bos_id=bos)
        plot(result, out / "activations.png")
        print(f"max |h| {result.max_top1:.1f} (per sequence, averaged), max top1/median {result.max_ratio:.0f}x, "
              f"first-token value norm / others: min over layers {result.min_value_norm_ratio:.2f}; "
              f"matrix entropy valley at block {result.entropy_valley_layer} "
              f"({result.min_matrix_entropy_normalised:.3f} of its maximum), largest |h| at block "
              f"{result.massive_activation_layer}")
        return result

    return for_each_checkpoint(args, "activations", one, headline=("max_top1", "max_ratio"))


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
