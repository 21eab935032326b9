"""Fused sigmoid / elu+1 attention in Triton, forward and backward (FlashSigmoid-style).

Unnormalised kinds need no row statistics: out_i = sum_j f(s_ij) v_j with s = q.k / sqrt(d), so
each query block streams over the key blocks with no running max and no rescaling
(Ramapuram et al. 2025). The backward recomputes f from q and k block by block:

    dV_j = sum_i f_ij dO_i,   dF_ij = dO_i . v_j,   dS = dF * f'(s),
    dQ_i = scale * sum_j dS_ij k_j,   dK_j = scale * sum_i dS_ij q_i.

`attn_normalize` keeps the row sums l_i = sum_j f_ij: out = (sum_j f v) / l, and then
dF_ij = (dO_i . v_j - dO_i . out_i) / l_i. Nothing T x T is stored.

Block sizes, warps and pipeline stages are autotuned per (T, kind) on the GPU (the first call of
each shape times every config); `python -m bench` times the result against flash softmax.
Runs on the CPU under TRITON_INTERPRET=1 (tests/test_kernels.py) with one small config, since
the interpreter has no GPU driver to time configs with.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .packages import TRITON_INTERPRET

SIGMOID, ELU1 = 0, 1
_KEY = ["T", "D", "KIND", "CAUSAL", "NORMALIZE"]


def _configs(blocks: list[tuple[int, int, int, int]], query_block_larger: bool) -> list:
    """(BM, BN, warps, stages) on the GPU; one 16 x 16 block in the interpreter. The causal split
    below needs BM a multiple of BN (forward, dQ) or BN a multiple of BM (dK, dV)."""
    for m, n, _, _ in blocks:
        assert (m % n if query_block_larger else n % m) == 0, f"block sizes {m} x {n} break the causal split"
    if TRITON_INTERPRET:
        return [triton.Config({"BM": 16, "BN": 16}, num_warps=4)]
    return [triton.Config({"BM": m, "BN": n}, num_warps=w, num_stages=s) for m, n, w, s in blocks]


# Triton's interpreter multiplies bf16 blocks wrongly. Tensor cores multiply bf16 exactly and add
# in fp32, so on the CPU `_dot` widens the operands first: same numbers, and the bf16 path can be
# checked there. Compiled for the GPU this is a plain tl.dot.
_WIDEN = tl.constexpr(TRITON_INTERPRET)


@triton.jit
def _dot(a, b):
    if _WIDEN:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b)


@triton.jit
def _weights(s, bias, KIND: tl.constexpr):
    """f(s) and f'(s) in fp32."""
    if KIND == 0:
        f = tl.sigmoid(s + bias)
        df = f * (1.0 - f)
    else:
        e = tl.exp(tl.minimum(s, 0.0))
        f = tl.where(s > 0, s + 1.0, e)
        df = tl.where(s > 0, 1.0, e)
    return f, df


# The causal kernels visit the blocks below the diagonal without masks and mask only the
# diagonal ones, so a query block must be a whole number of key blocks (forward, dQ) or the
# reverse (dK, dV): `_configs` checks. Rows past the end of the sequence load as zeros, which add nothing to any
# sum but the forward's row sums, which the masked ragged block takes care of.
@triton.jit
def _fwd_range(acc, l, q, K, V, offs_m, offs_d, lo, hi, T, scale, bias, D: tl.constexpr, BN: tl.constexpr,
               KIND: tl.constexpr, CAUSAL: tl.constexpr, MASK: tl.constexpr):
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        k = tl.load(K + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        v = tl.load(V + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        f, _ = _weights(_dot(q, tl.trans(k)) * scale, bias, KIND)
        if MASK:
            keep = offs_n[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            f = tl.where(keep, f, 0.0)
        l += tl.sum(f, 1)
        acc += _dot(f.to(v.dtype), v)
    return acc, l


@triton.autotune(configs=_configs([(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)], True), key=_KEY)
@triton.jit
def _fwd(Q, K, V, O, L, T, scale, bias, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
         KIND: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr):
    start_m = tl.program_id(0) * BM
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, O = Q + bh * T * D, K + bh * T * D, V + bh * T * D, O + bh * T * D
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    l = tl.zeros((BM,), dtype=tl.float32)
    args = (q, K, V, offs_m, offs_d)
    if CAUSAL:  # below the diagonal, then the diagonal block
        acc, l = _fwd_range(acc, l, *args, 0, start_m, T, scale, bias, D, BN, KIND, CAUSAL, False)
        acc, l = _fwd_range(acc, l, *args, start_m, tl.minimum(start_m + BM, T), T, scale, bias, D, BN, KIND,
                            CAUSAL, True)
    else:  # whole key blocks, then the ragged end (if any)
        whole = (T // BN) * BN
        acc, l = _fwd_range(acc, l, *args, 0, whole, T, scale, bias, D, BN, KIND, CAUSAL, False)
        acc, l = _fwd_range(acc, l, *args, whole, T, T, scale, bias, D, BN, KIND, CAUSAL, True)
    if NORMALIZE:
        acc = acc / l[:, None]
        tl.store(L + bh * T + offs_m, l, mask=offs_m < T)
    tl.store(O + offs_m[:, None] * D + offs_d[None, :], acc.to(O.dtype.element_ty), mask=offs_m[:, None] < T)


@triton.jit
def _dkdv_range(dk, dv, k, v, Q, DO, L, DELTA, offs_n, offs_d, lo, hi, T, scale, bias, D: tl.constexpr,
                BM: tl.constexpr, KIND: tl.constexpr, NORMALIZE: tl.constexpr, MASK: tl.constexpr):
    for start_m in range(lo, hi, BM):
        offs_m = start_m + tl.arange(0, BM)
        q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
        do = tl.load(DO + offs_m[:, None] * D + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
        f, fprime = _weights(_dot(q, tl.trans(k)) * scale, bias, KIND)  # (BM, BN)
        dfw = _dot(do, tl.trans(v))  # dO_i . v_j
        if NORMALIZE:
            l = tl.load(L + offs_m, mask=offs_m < T, other=1.0)
            delta = tl.load(DELTA + offs_m, mask=offs_m < T, other=0.0)
            f = f / l[:, None]
            dfw = (dfw - delta[:, None]) / l[:, None]
        ds = dfw * fprime
        if MASK:
            causal = offs_m[:, None] >= offs_n[None, :]
            f = tl.where(causal, f, 0.0)
            ds = tl.where(causal, ds, 0.0)
        dv += _dot(tl.trans(f.to(do.dtype)), do)
        dk += _dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv


# dK and dV keep two BN x D fp32 accumulators per program. On sm_90 the configs (64, 64) with 4
# warps and (64, 128) with 8 spilled registers (python -m bench.compile_kernels); these do not.
@triton.autotune(configs=_configs([(32, 64, 4, 3), (64, 64, 8, 3), (32, 128, 8, 3)], False), key=_KEY)
@triton.jit
def _bwd_dkdv(Q, K, V, DO, L, DELTA, DK, DV, T, scale, bias, D: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, KIND: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr):
    start_n = tl.program_id(0) * BN
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO = Q + bh * T * D, K + bh * T * D, V + bh * T * D, DO + bh * T * D
    DK, DV = DK + bh * T * D, DV + bh * T * D
    L, DELTA = L + bh * T, DELTA + bh * T
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    kv_mask = offs_n[:, None] < T
    k = tl.load(K + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros((BN, D), dtype=tl.float32)
    dv = tl.zeros((BN, D), dtype=tl.float32)
    args = (k, v, Q, DO, L, DELTA, offs_n, offs_d)
    if CAUSAL:  # the query blocks on the diagonal, then those below it (earlier ones cannot see k)
        diagonal_end = tl.minimum(start_n + BN, T)
        dk, dv = _dkdv_range(dk, dv, *args, start_n, diagonal_end, T, scale, bias, D, BM, KIND, NORMALIZE, True)
        dk, dv = _dkdv_range(dk, dv, *args, diagonal_end, T, T, scale, bias, D, BM, KIND, NORMALIZE, False)
    else:
        dk, dv = _dkdv_range(dk, dv, *args, 0, T, T, scale, bias, D, BM, KIND, NORMALIZE, False)
    tl.store(DK + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_range(dq, q, do, l, delta, K, V, offs_m, offs_d, lo, hi, T, scale, bias, D: tl.constexpr,
              BN: tl.constexpr, KIND: tl.constexpr, NORMALIZE: tl.constexpr, MASK: tl.constexpr):
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        k = tl.load(K + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        v = tl.load(V + offs_n[:, None] * D + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
        _, fprime = _weights(_dot(q, tl.trans(k)) * scale, bias, KIND)
        dfw = _dot(do, tl.trans(v))
        if NORMALIZE:
            dfw = (dfw - delta[:, None]) / l[:, None]
        ds = dfw * fprime
        if MASK:
            ds = tl.where(offs_m[:, None] >= offs_n[None, :], ds, 0.0)
        dq += _dot(ds.to(k.dtype), k)
    return dq


@triton.autotune(configs=_configs([(64, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)], True), key=_KEY)
@triton.jit
def _bwd_dq(Q, K, V, DO, L, DELTA, DQ, T, scale, bias, D: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, KIND: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr):
    start_m = tl.program_id(0) * BM
    bh = tl.program_id(1).to(tl.int64)
    Q, K, V, DO, DQ = Q + bh * T * D, K + bh * T * D, V + bh * T * D, DO + bh * T * D, DQ + bh * T * D
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    q_mask = offs_m[:, None] < T
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
    if NORMALIZE:
        l = tl.load(L + bh * T + offs_m, mask=offs_m < T, other=1.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    else:  # unused
        l = tl.full((BM,), 1.0, tl.float32)
        delta = tl.zeros((BM,), dtype=tl.float32)
    dq = tl.zeros((BM, D), dtype=tl.float32)
    args = (q, do, l, delta, K, V, offs_m, offs_d)
    if CAUSAL:  # below the diagonal, then the diagonal block
        dq = _dq_range(dq, *args, 0, start_m, T, scale, bias, D, BN, KIND, NORMALIZE, False)
        dq = _dq_range(dq, *args, start_m, tl.minimum(start_m + BM, T), T, scale, bias, D, BN, KIND, NORMALIZE, True)
    else:
        dq = _dq_range(dq, *args, 0, T, T, scale, bias, D, BN, KIND, NORMALIZE, False)
    tl.store(DQ + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


class _SigmoidFamilyAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kind: int, bias: float, causal: bool, normalize: bool):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        o = torch.empty_like(q)
        l = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
        scale = D ** -0.5
        _fwd[lambda meta: (triton.cdiv(T, meta["BM"]), B * H)](q, k, v, o, l, T, scale, bias, D=D, KIND=kind,
                                                             CAUSAL=causal, NORMALIZE=normalize)
        ctx.save_for_backward(q, k, v, o, l)
        ctx.args = (kind, bias, causal, normalize)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, l = ctx.saved_tensors
        kind, bias, causal, normalize = ctx.args
        do = do.contiguous()
        B, H, T, D = q.shape
        scale = D ** -0.5
        # delta_i = dO_i . out_i, read only with normalize (any fp32 tensor stands in otherwise)
        delta = (do.float() * o.float()).sum(-1) if normalize else l
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        flags = dict(D=D, KIND=kind, CAUSAL=causal, NORMALIZE=normalize)
        _bwd_dkdv[lambda meta: (triton.cdiv(T, meta["BN"]), B * H)](q, k, v, do, l, delta, dk, dv, T, scale, bias,
                                                                    **flags)
        _bwd_dq[lambda meta: (triton.cdiv(T, meta["BM"]), B * H)](q, k, v, do, l, delta, dq, T, scale, bias, **flags)
        return dq, dk, dv, None, None, None, None


def sigmoid_family_attention(q, k, v, cfg, causal: bool):
    """q, k, v (B, H, T, D) with equal query and key lengths; D a power of two >= 16 (checked when
    the model is built: triton.py's `untileable`)."""
    kind = SIGMOID if cfg.attention == "sigmoid" else ELU1
    return _SigmoidFamilyAttention.apply(q, k, v, kind, float(cfg.resolved_sigmoid_bias), causal, cfg.attn_normalize)
