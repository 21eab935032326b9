"""Shared helpers for the model tests: an independent reference implementation of the
attention block and of the Llama-style decoder, written from the formulas in docs/design.md
("The decoder", "The attention block") with plain tensor math: the reference calls no model/ code.

The reference is exposed through the `ref` fixture (a namespace of functions) so the test
modules do not import conftest directly. Below it are the fixtures several test modules share;
`shapes_run`, the one that builds a model, imports the project inside its function.
"""
from __future__ import annotations

import math
import random
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so plain `pytest` works as well as `python -m pytest`
    sys.path.insert(0, str(ROOT))

NORMALISED_KINDS = ("softmax", "linear")  # always row-normalised


# --------------------------------------------------------------------------------------------
# primitives
# --------------------------------------------------------------------------------------------
def ref_rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) * weight."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def ref_sigmoid(z: torch.Tensor) -> torch.Tensor:
    return 1.0 / (1.0 + torch.exp(-z))


def ref_elu1(z: torch.Tensor) -> torch.Tensor:
    """elu(z) + 1 = z + 1 for z > 0, exp(z) otherwise."""
    return torch.where(z > 0, z + 1.0, torch.exp(z.clamp(max=0.0)))


def ref_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x: (B, T, H, D). HF Llama rotate-half convention: pair i is (x_i, x_{i+D/2}) and is
    rotated by angle pos * theta^(-2i/D). Done as a complex multiplication per pair.

    The angles and their cos / sin are computed in float32, as HF Llama does, so the float64
    tests can use tight tolerances; the rotation itself is done in float64.
    """
    D = x.shape[-1]
    half = D // 2
    i = torch.arange(half, dtype=torch.float32)
    inv_freq = 1.0 / (torch.tensor(theta, dtype=torch.float32) ** (2.0 * i / D))
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    rot = torch.complex(torch.cos(ang).to(torch.float64), torch.sin(ang).to(torch.float64))
    rot = rot[None, :, None, :]  # (1, T, 1, D/2): e^{i * angle} per pair
    z = torch.complex(x[..., :half].to(torch.float64), x[..., half:].to(torch.float64)) * rot
    return torch.cat((z.real, z.imag), dim=-1).to(x.dtype)


def attn_params(module_or_sd, prefix: str = "") -> dict:
    """The attention block's parameter tensors (the very same tensors, so gradients flow)."""
    if isinstance(module_or_sd, torch.nn.Module):
        sd = dict(module_or_sd.named_parameters())
    else:
        sd = module_or_sd
    names = {"q": "q_proj.weight", "k": "k_proj.weight", "v": "v_proj.weight", "o": "o_proj.weight",
             "g": "g_proj.weight", "qn": "q_norm.weight", "kn": "k_norm.weight", "sink": "sinks",
             "sink_v": "sink_values"}
    return {key: sd[prefix + name] for key, name in names.items() if prefix + name in sd}


def ref_sink_logits(cfg, P):
    """b_h as (1, H, 1, 1), or None without `sink_logit`."""
    kind = getattr(cfg, "sink_logit", "none")
    if kind == "none":
        return None
    b = P["sink"] if kind == "learned" else torch.zeros(cfg.n_head, dtype=torch.float64)
    return b.view(1, -1, 1, 1)


def ref_attention(x, P, cfg, causal: bool = True, drop_key0: int = 0):
    """Reference attention block. x: (B, T, C) normed input; P from `attn_params`. `drop_key0` = f > 0:
    queries f.. may not see key 0 (the key-0 knockout; True = 1).

    Returns (y (B,T,C), w (B,H,T,T) raw masked weights f(s) before any row normalisation,
    applied (B,H,T,T) the weights actually multiplied into v).
    """
    B, T, C = x.shape
    H = cfg.n_head
    Hkv = cfg.n_kv_head or cfg.n_head
    D = C // H
    q = (x @ P["q"].T).view(B, T, H, D)
    k = (x @ P["k"].T).view(B, T, Hkv, D)
    v = (x @ P["v"].T).view(B, T, Hkv, D)
    if cfg.qk_norm:
        q = ref_rms(q, P["qn"], cfg.norm_eps)
        k = ref_rms(k, P["kn"], cfg.norm_eps)
    pos = torch.arange(T)
    q, k = ref_rope(q, pos, cfg.rope_theta), ref_rope(k, pos, cfg.rope_theta)
    # grouped-query attention: query head h reads kv head h // (H / Hkv)
    kv_of = torch.tensor([h // (H // Hkv) for h in range(H)])
    k, v = k[:, :, kv_of], v[:, :, kv_of]

    allowed = torch.ones(T, T, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    if drop_key0:
        allowed[int(drop_key0):, 0] = False
    if cfg.attention == "linear":
        s = torch.einsum("bihd,bjhd->bhij", ref_elu1(q), ref_elu1(k))  # phi(q).phi(k), no 1/sqrt(d)
        w = s * allowed
    else:
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D)
        if cfg.attention == "softmax":
            # sink_logit: w_ij = exp(s_ij) / (exp(b_h) + sum_j exp(s_ij)), b_h = 0 (zero) or learned
            b = ref_sink_logits(cfg, P)
            s = s.masked_fill(~allowed, float("-inf"))
            m = s.max(-1, keepdim=True).values if b is None else torch.maximum(s.max(-1, keepdim=True).values, b)
            e = torch.exp(s - m)
            denominator = e.sum(-1, keepdim=True) + (0.0 if b is None else torch.exp(b - m))
            w = e / denominator
            if "sink_v" in P:  # sink_value: the slot's value v_h of query head h's kv head, at weight exp(b) / denominator
                slot_value = (torch.exp(b - m) / denominator) * P["sink_v"][kv_of].view(1, H, 1, D)  # (B,H,T,D)
        elif cfg.attention == "sigmoid":
            b = -math.log(cfg.block_size) if cfg.sigmoid_bias is None else cfg.sigmoid_bias
            w = ref_sigmoid(s + b) * allowed
        elif cfg.attention == "elu1":
            w = ref_elu1(s) * allowed
        elif cfg.attention == "softpick":  # Zuhri et al.'s formula as written, no max subtracted
            e = torch.expm1(s) * allowed
            w = e.clamp_min(0) / (e.abs().sum(-1, keepdim=True) + 1e-8)
        else:
            raise AssertionError(cfg.attention)
    applied = w
    if cfg.attention == "linear" or cfg.attn_normalize:
        applied = w / w.sum(-1, keepdim=True)
    y = torch.einsum("bhij,bjhd->bihd", applied, v)  # (B, T, H, D)
    if "sink_v" in P and cfg.attention == "softmax":
        y = y + slot_value.transpose(1, 2)
    if cfg.gate == "headwise":
        y = y * ref_sigmoid(x @ P["g"].T)[..., None]
    elif cfg.gate == "elementwise":
        y = y * ref_sigmoid(x @ P["g"].T).view(B, T, H, D)
    return y.reshape(B, T, H * D) @ P["o"].T, w, applied


def ref_gpt(idx, sd, cfg, drop_key0_layers=(), drop_from: int = 1):
    """Reference decoder forward from a state_dict (HF Llama names); key 0 knocked out in
    `drop_key0_layers`.

    Returns (logits, hidden list (residual after each block), per-layer raw weights w,
    per-layer applied weights); with sink tokens, hidden and weights include their positions first.
    """
    emb = sd["embed_tokens.weight"]
    x = emb[idx]
    n_sink = getattr(cfg, "sink_tokens", 0)  # learned embeddings in front; no logits for them
    if n_sink:
        x = torch.cat((sd["sink_tokens"].expand(len(idx), -1, -1), x), dim=1)
    hidden, ws, applied = [], [], []
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        h = ref_rms(x, sd[p + "input_layernorm.weight"], cfg.norm_eps)
        a, w, ap = ref_attention(h, attn_params(sd, p + "self_attn."), cfg, drop_key0=drop_from if i in drop_key0_layers else 0)
        x = x + a
        h = ref_rms(x, sd[p + "post_attention_layernorm.weight"], cfg.norm_eps)
        g = h @ sd[p + "mlp.gate_proj.weight"].T
        u = h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (g * ref_sigmoid(g) * u) @ sd[p + "mlp.down_proj.weight"].T
        hidden.append(x)
        ws.append(w)
        applied.append(ap)
    logits = ref_rms(x[:, n_sink:], sd["norm.weight"], cfg.norm_eps) @ emb.T  # lm_head tied to the embedding
    return logits, hidden, ws, applied


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the (tiny, near-uniform-attention) init with O(1) random weights so that the
    attention patterns are peaked and norm weights are not all ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:  # norm weights
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
            else:
                p.copy_(1.3 * torch.randn(p.shape, generator=g, dtype=p.dtype) / math.sqrt(p.shape[1]))
    return module


def assert_close(actual, expected, tol: float = 1e-6, what: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max |expected|).

    Scaled to the tensor's magnitude: the model forms RoPE angles in the module's dtype
    (float64 after .double()) while the reference forms them in float32 like HF Llama, and the
    unnormalised kinds (elu1) produce outputs and gradients of size ~100; both give relative
    differences ~1e-8, far below any real bug (relative differences of order 1).
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item())
    err = (actual.to(expected.dtype) - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


@pytest.fixture
def ref():
    return types.SimpleNamespace(
        rms=ref_rms, rope=ref_rope, sigmoid=ref_sigmoid, elu1=ref_elu1, attention=ref_attention,
        attn_params=attn_params, gpt=ref_gpt, close=assert_close, randomize_=randomize_, normalised_kinds=NORMALISED_KINDS,
    )


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add overhead (and OpenMP spin-waiting makes a
    loaded 2-core machine ~5x slower), so the model tests run single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="module")
def word_corpus(tmp_path_factory) -> Path:
    """A fresh folder with corpus/: six 600-word documents over a 24-word vocabulary, enough for a
    300-token BPE and a few training steps of a tiny model."""
    root = tmp_path_factory.mktemp("words")
    words = "the quick brown fox jumps over a lazy dog and cat sat on mat while bird sings of night day sun moon"
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for d in range(6):
        (corpus / f"doc{d}.txt").write_text(" ".join(rng.choice(words.split()) for _ in range(600)) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_run_args(word_corpus):
    """steps -> train.py overrides for a 1-layer model on word_corpus, a checkpoint at every step."""
    def args(steps: int) -> list[str]:
        return [f"data.cache_dir={word_corpus / 'cache'}", f"data.source={word_corpus / 'corpus'}", "data.vocab_size=300",
                "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
                "train.batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1", f"train.max_steps={steps}",
                "train.ckpt_interval=1", "train.eval_interval=100", "train.eval_windows=2", "logging.progress=false"]
    return args


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """An untrained small ViT on the shapes images, written as a loadable run dir."""
    from data.images import ImageDataConfig
    from fixes.vit_distill_registers import save_vit_run
    from model.vit import ViT, ViTConfig

    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    vit = ViT(ViTConfig(image_size=32, patch_size=4, in_channels=3, n_layer=2, n_head=2, n_embd=32, n_classes=7))
    data = {**ImageDataConfig(source="shapes", shapes_train=24, shapes_val=12).__dict__}
    save_vit_run(vit, root / "tiny", {"task": "vit", "data": data}, 0)
    return root / "tiny"
