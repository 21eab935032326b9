"""Score functions of the attention kinds, as plain tensor math: the `math` reference and the linear forms.

With s = q.k / sqrt(d) over the (masked) keys of each query:

    softmax   w_ij = exp(s_ij) / sum_j exp(s_ij)
    sigmoid   w_ij = sigmoid(s_ij + b)            (b = sigmoid_bias, default -log(block_size))
    elu1      w_ij = elu(s_ij) + 1                (Gu et al. 2025)
    linear    w_ij = phi(q_i).phi(k_j) / sum_j phi(q_i).phi(k_j),  phi = elu + 1
              (Katharopoulos et al. 2020; computed in linear time, never as a T x T matrix)
    softpick  w_ij = relu(e^{s_ij} - 1) / (sum_j |e^{s_ij} - 1| + eps)   (Zuhri et al. 2025, eps = 1e-8)
              rows sum to at most 1; a key with s_ij <= 0 gets exactly 0, and a row with every
              s_ij <= 0 attends to nothing (its output is 0)

`attn_normalize` divides sigmoid / elu1 rows by their sum. `sink_logit` (softmax only) adds a
virtual key with logit b_h per head to the denominator, w_ij = exp(s_ij) / (exp(b_h) + sum_j exp(s_ij)):
rows sum to 1 - sigmoid(b_h - lse_i), and that virtual slot takes the rest (gpt-oss's sinks). Every fast path (model/backends/) is
tested against `math_attention`, which materialises the weights.

A leaf module: it imports nothing else of the model, so kernels, caches and the block can all use it.
`cfg` is anything with the attention fields of model/config.py's AttentionConfig.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_KINDS = ("softmax", "sigmoid", "elu1", "linear", "softpick")
SOFTPICK_EPS = 1e-8  # Zuhri et al.'s eps: only matters when every |e^s - 1| of a row is ~0


def row_normalised(cfg) -> bool:
    """Whether the weights applied to the values sum to 1 in every row."""
    return (cfg.attention == "softmax" and cfg.sink_logit == "none") or cfg.attention == "linear" or cfg.attn_normalize


def sink_rescale(y, lse, sink, value=None):
    """Softmax output y (B,H,Tq,Dv) with row log-sum-exp lse (B,H,Tq) -> the output with sink logits
    sink (H,) in the denominator: y * sum_j exp(s_ij) / (exp(b_h) + sum_j exp(s_ij)) = y * sigmoid(lse - b_h).
    With the slot's value (H,Dv) (model.sink_value), plus value * sigmoid(b_h - lse), the slot's weight."""
    lse = at_least_fp32(lse)
    logit = sink.to(lse.dtype)[:, None]
    out = y * torch.sigmoid(lse - logit).unsqueeze(-1).to(y.dtype)
    if value is not None:
        out = out + torch.sigmoid(logit - lse).unsqueeze(-1).to(y.dtype) * value.to(y.dtype)[:, None, :]
    return out.to(y.dtype)


def add_slot_value(y, slot, value):
    """y (B,H,Tq,Dv) plus the sink slot's value (H,Dv) at its weight slot (B,H,Tq)."""
    return y + slot.unsqueeze(-1).to(y.dtype) * value.to(y.dtype)[:, None, :]


def masked_scores(q, k, causal: bool):
    """s = q.k / sqrt(d) (B,H,Tq,Tk) at least in fp32, -inf where a causal query cannot see the key."""
    s = (at_least_fp32(q) @ at_least_fp32(k).transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return s


def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """Bool (Tq, Tk): query i sits at key position t_k - t_q + i and sees keys up to it."""
    offset = t_k - t_q
    q_pos = torch.arange(t_q, device=device)[:, None] + offset
    return torch.arange(t_k, device=device)[None, :] <= q_pos


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, the kernel feature map of linear attention."""
    return F.elu(x) + 1


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 -> fp32; fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def expand_kv(k, v, n_head: int):
    """Grouped-query attention: repeat each of the Hkv key/value heads for its n_head/Hkv query heads."""
    rep = n_head // k.shape[1]
    return (k, v) if rep == 1 else (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))


def unnormalised_weights(scores: torch.Tensor, kind: str, sigmoid_bias: float) -> torch.Tensor:
    """f(s) for the kinds whose weights need no row statistics."""
    if kind == "sigmoid":
        return torch.sigmoid(scores + sigmoid_bias)
    if kind == "elu1":
        return F.elu(scores) + 1
    raise ValueError(f"no elementwise weight function for attention kind {kind!r}")


def math_attention(q, k, v, cfg, causal: bool, sink=None, sink_value=None):
    """Reference: materialise the weights. q: (B,H,Tq,D), k, v: (B,H,Tk,D); sink: the sink logits
    b_h (H,) or None; sink_value: the slot's value (H,D) or None. Returns (y, w); with sink logits the
    rows of w sum to less than 1 (the slot takes the rest)."""
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device) if causal else None
    if cfg.attention == "linear":
        w = feature_map(q) @ feature_map(k).transpose(-2, -1)
    else:
        w = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if sink_value is None:
        w = weights_from_scores(w, mask, cfg, sink)
        return w @ v, w
    w, slot = weights_from_scores(w, mask, cfg, sink, with_slot=True)
    return add_slot_value(w @ v, slot, sink_value), w


def weights_from_scores(s, mask, cfg, sink=None, with_slot: bool = False):
    """The attention weights from raw scores s (B,H,Tq,Tk): s_ij = q_i.k_j / sqrt(d), or
    phi(q_i).phi(k_j) for linear. mask: bool (Tq,Tk) or (B,H,Tq,Tk), True = visible; None = all.
    The one place each kind's score function, normalisation and sink logit is applied.
    with_slot (sink logits only): also return the slot's weight (B,H,Tq)."""
    if cfg.attention == "softmax":
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        if sink is not None:  # the virtual key: one more column in the softmax, then dropped
            s = torch.cat((s, sink.to(s.dtype)[:, None, None].expand(*s.shape[:-1], 1)), dim=-1)
        w = torch.softmax(s, dim=-1, dtype=torch.promote_types(s.dtype, torch.float32)).to(s.dtype)
        if sink is None:
            return w
        return (w[..., :-1], w[..., -1]) if with_slot else w[..., :-1]
    if cfg.attention == "softpick":
        return softpick(s, mask).to(s.dtype)
    w = s if cfg.attention == "linear" else unnormalised_weights(s, cfg.attention, cfg.resolved_sigmoid_bias)
    if mask is not None:
        w = w.masked_fill(~mask, 0.0)
    if row_normalised(cfg):
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def softpick(s, mask=None, eps: float = SOFTPICK_EPS):
    """Softpick weights (Zuhri et al. 2025) of scores s (..., Tq, Tk); mask: bool, True = visible.

    relu(e^s - 1) / (sum_j |e^s - 1| + eps), with m = max(0, max_j s_ij) factored out of the
    numerator and the denominator as their code does, (e^{s-m} - e^{-m}) / (sum_j |e^{s-m} - e^{-m}| +
    eps e^{-m}): nothing overflows. Their code adds eps after the rescaling (eps e^m in the formula's
    terms); here eps stays where the formula puts it, so the online and flex forms, which never see m,
    compute the same thing. m >= 0 also keeps e^{-m} finite in a row whose scores are all very
    negative (its weights are 0 either way). m is a constant of the formula, so it carries no gradient."""
    s = at_least_fp32(s)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True).clamp_min(0.0)
    e_m = torch.exp(-m)
    x = torch.exp(s - m) - e_m  # a masked key: -e^{-m}, dropped from both sums below
    num = F.relu(x)
    den = torch.where(torch.isfinite(s), x.abs(), 0.0).sum(dim=-1, keepdim=True) + eps * e_m
    return num / den


# --------------------------------------------------------------------------------------------
# linear attention in linear time: chunked (causal, with a recurrent state) and global (bidirectional)
# --------------------------------------------------------------------------------------------
def linear_attention_chunked(q, k, v, chunk_size: int, state=None):
    """Causal linear attention in O(T) memory, with an optional recurrent state carried in.

    q, k: (B,H,T,D); v: (B,H,T,Dv). state = (S, z) with S = sum_j phi(k_j) v_j^T (B,H,D,Dv) and
    z = sum_j phi(k_j) (B,H,D) over earlier tokens, fp32. Within a chunk the weights are
    materialised (C x C); across chunks only S and z travel. Returns (y in v's dtype, new_state).
    chunk_size=1 is exactly the recurrent (RNN) form.

    Computed in fp32 whatever the input dtype: the division by phi(q).z cancels much of the
    numerator's gradient, and bf16 features and states put dq and dk over 1e-2 relative error.
    """
    out_dtype = v.dtype
    phi_q, phi_k, v = feature_map(at_least_fp32(q)), feature_map(at_least_fp32(k)), at_least_fp32(v)
    B, H, T, D = phi_q.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    pad = (-T) % C
    if pad:  # zero features at the end: they add nothing to any real query
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    N = (T + pad) // C
    q_c = phi_q.view(B, H, N, C, D)
    k_c = phi_k.view(B, H, N, C, D)
    v_c = v.view(B, H, N, C, Dv)

    intra = (q_c @ k_c.transpose(-2, -1)).tril()  # (B,H,N,C,C), causal within the chunk
    num = intra @ v_c
    den = intra.sum(-1)

    kv = k_c.transpose(-2, -1) @ v_c  # (B,H,N,D,Dv): each chunk's contribution to S
    ksum = k_c.sum(-2)  # (B,H,N,D)
    S_prev = kv.cumsum(2) - kv  # exclusive prefix sums: what earlier chunks left behind
    z_prev = ksum.cumsum(2) - ksum
    if state is not None:
        S_prev = S_prev + state[0].unsqueeze(2)
        z_prev = z_prev + state[1].unsqueeze(2)
    num = num + q_c @ S_prev
    den = den + (q_c * z_prev.unsqueeze(-2)).sum(-1)
    y = (num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)).reshape(B, H, N * C, Dv)[:, :, :T]
    y = y.to(out_dtype)
    new_state = (S_prev[:, :, -1] + kv[:, :, -1], z_prev[:, :, -1] + ksum[:, :, -1])
    return y, new_state


def linear_attention_global(q, k, v):
    """Non-causal linear attention (ViT): every query sees every key, O(T); fp32 inside as above."""
    phi_q, phi_k = feature_map(at_least_fp32(q)), feature_map(at_least_fp32(k))
    S = phi_k.transpose(-2, -1) @ at_least_fp32(v)  # (B,H,D,Dv)
    z = phi_k.sum(-2)  # (B,H,D)
    return ((phi_q @ S) / (phi_q * z.unsqueeze(-2)).sum(-1, keepdim=True)).to(v.dtype)
