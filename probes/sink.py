"""The sink probe the trainer runs every train.sink_interval steps, and the definitions it shares with eval.sink.

* Gu et al. 2025 ("When Attention Sink Emerges in Language Models", ICLR), as their code
  (eval_sink_open_source.py) computes it: per sequence, the importance score
  alpha_k^{l,h} = 1/(T-k+1) * sum_{i=k..T} A^{l,h}_{i,k} (1-indexed), and Sink_k^eps, the share
  of (layer, head) pairs with alpha_k > eps, averaged over sequences, in %.
* Qiu et al. 2025 ("Gated Attention", Table 4): F-Attn = mean attention probability that
  queries put on the first token.
* `measure`: Sink_1, F-Attn and the largest max |h| / median |h| of the residual stream from one
  forward, logged as a `"split": "sink"` row of metrics.jsonl.
"""
from __future__ import annotations

import torch

MAX_K = 10  # importance_per_sequence covers k = 1..MAX_K (eval.sink's sink_rate_by_position)
TRACKED = ("sink_1", "f_attn", "max_h_ratio")  # the keys `measure` returns


def stack_attention(attn) -> torch.Tensor:
    """Accept (L,H,T,T), (L,B,H,T,T) or a per-layer list of (B,H,T,T); return (L,B,H,T,T) float."""
    if isinstance(attn, (list, tuple)):
        attn = torch.stack([a.detach().float() for a in attn])
    attn = attn.detach().float()
    if attn.dim() == 4:
        attn = attn.unsqueeze(1)
    if attn.dim() != 5 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected (L,H,T,T), (L,B,H,T,T) or a list of (B,H,T,T); got {tuple(attn.shape)}")
    return attn


def text_attention(out, raw: bool = False) -> torch.Tensor:
    """(L,B,H,T,T) weights among the text tokens of a forward with return_attn. model.sink_tokens'
    learned tokens come first and are left out, so key 0 is the first text token.

    renormalised (default): each row divided by its sum over the text keys, so rows sum to 1
    whatever the fix: Gu et al.'s proxy w / sum w for sigmoid / elu1 / softpick, the sink logit's slot and
    the sink tokens' columns left out. raw: the weight the model actually applies to each text
    key's value (w for sigmoid, 1 - slot mass shared out for the sink logit, the sink tokens'
    columns cut without renormalising), what transformers' output_attentions returns."""
    n = out.sink_tokens
    weights = stack_attention(out.attn) * stack_mass(out.attn_mass).unsqueeze(-1)  # probs * row mass = applied weights
    weights = weights[..., n:, n:]
    if raw:
        return weights
    return weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def stack_mass(mass) -> torch.Tensor:
    """Per-layer (B,H,T) row masses as (L,B,H,T) float."""
    return torch.stack([m.detach().float() for m in mass])


def importance_per_sequence(attn, max_k: int = MAX_K) -> torch.Tensor:
    """alpha_k per (layer, sequence, head) for k = 1..max_k (capped at T): shape (K, L, B, H)."""
    a = stack_attention(attn)
    T = a.shape[-1]
    return torch.stack([a[..., k - 1 :, k - 1].sum(-1) / (T - k + 1) for k in range(1, min(max_k, T) + 1)])


def sink_rate(alpha: torch.Tensor, eps: float = 0.3) -> float:
    """Sink_k^eps in percent: share of (layer, head) pairs whose importance exceeds eps.

    On alpha of shape (L, B, H) (one per sequence) this is Gu et al.'s figure: per sequence the
    share of pairs above eps, averaged over sequences (every sequence has the same L*H pairs)."""
    return float((torch.as_tensor(alpha) > eps).float().mean() * 100)


def first_token_attention(attn) -> tuple[list[float], float]:
    """Qiu et al.'s F-Attn: mean attention probability on the first token.

    Averaged over heads, batch and *all* query positions 0..T-1, as Qiu et al. average over the
    sequence. Query 0 is included even though causally it can only attend to itself (weight 1);
    it adds at most 1/T. With this convention F-Attn of a layer = mean over heads of alpha_1.
    Returns (per-layer list, overall mean over layers).
    """
    a = stack_attention(attn)
    per_layer = a[..., :, 0].mean(dim=(1, 2, 3))  # (L,)
    return per_layer.tolist(), float(per_layer.mean())


@torch.no_grad()
def measure(model, sequences, eps: float = 0.3) -> dict:
    """The in-training tracker: one forward of `sequences` (B, T) with attention and hidden states.

    Returns {"sink_1": Gu et al.'s per-sequence Sink_1 in %, "f_attn": Qiu et al.'s F-Attn,
    "max_h_ratio": largest over layers of max |h| / median |h| of the residual stream, "probe_T": the
    sequence length they were measured at (block_size: both depend on T, so eval.sink's T=64
    headline differs from them)}. The
    caller logs these as a metrics.jsonl row; `python -m eval.sink --run RUN` plots them.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(sequences.to(next(model.parameters()).device), return_attn=True, return_hidden=True)
    finally:
        model.train(was_training)
    a = text_attention(out)
    ratios = []
    for h in out.hidden:
        h = h.detach().float().abs()
        median = h.median()
        ratios.append(float(h.max() / median) if median > 0 else float("inf"))
    return {"sink_1": sink_rate(importance_per_sequence(a, 1)[0], eps),
            "f_attn": first_token_attention(a)[1], "max_h_ratio": max(ratios),
            "probe_T": int(sequences.shape[1])}  # the T of these numbers: eval.sink's headline is at T=64
