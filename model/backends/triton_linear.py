"""Causal linear attention (elu+1 kernel) in Triton: chunked, forward and backward, memory linear in T.

    y_i = phi(q_i) . S_i / phi(q_i) . z_i,   S_i = sum_{j<=i} phi(k_j) v_j^T,   z_i = sum_{j<=i} phi(k_j)

With Q, K the features phi(q), phi(k), the numerator is o = tril(Q K^T) V. The kernels compute it
in chunks of C tokens (as model/scores.py's `linear_attention_chunked` does in PyTorch, but
without the C x C and D x Dv intermediates of every chunk in memory):

  1. `_scan`: one program per (batch * head, block of value columns) walks the chunks in order
     and writes each chunk's incoming state S_n = sum over earlier chunks m of K_m^T V_m. This
     is the only sequential part: T / C steps of a (D x C) @ (C x Dv) product.
  2. `_chunk_fwd`: all chunks in parallel, o_n = tril(Q_n K_n^T) V_n + Q_n S_n.

Backward mirrors it: `_scan` run in reverse over (Q, dO) gives dS_n = sum over later chunks of
Q_m^T dO_m, then per chunk, with A = tril(Q K^T) and dA = tril(dO V^T):

    dQ = dA K + dO S^T,   dK = dA^T Q + V dS^T,   dV = A^T dO + K dS.

The denominator phi(q_i) . z_i = phi(q_i) . cumsum(phi(k))_i is O(T D) PyTorch left to autograd.
Stored per sequence: the chunk states S (and dS in backward), T / C matrices of D x Dv in fp32.

Precision: the features and every product are fp32 (tf32 on the tensor cores), whatever the
input dtype. Normalising by phi(q).z cancels much of the numerator's gradient, so bf16 features
would cost a 2x larger error in dq (about 8e-3 against the 1e-2 bound, measured by emulating
the roundings on the CPU); the products here are linear in T, so the slower tf32 rate costs little.
Runs on the CPU under TRITON_INTERPRET=1 (tests/test_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..scores import feature_map
from .packages import TRITON_INTERPRET

# Value-column blocks of the scan: more blocks, more programs for the sequential walk. The
# chunk kernels hold a dozen C x D fp32 tiles, so they try 8 warps as well as 4. The
# interpreter cannot time configs: it gets one.
_SCAN_CONFIGS = [triton.Config({"BV": 16}, num_warps=2)] if TRITON_INTERPRET else [
    triton.Config({"BV": bv}, num_warps=w) for bv, w in ((16, 2), (32, 4), (64, 4))]
_CHUNK_CONFIGS = [triton.Config({}, num_warps=w) for w in ((4,) if TRITON_INTERPRET else (4, 8))]
_CHUNK_KEY = ["T", "D", "DV", "C"]


@triton.autotune(configs=_SCAN_CONFIGS, key=["T", "D", "DV", "C", "REVERSE"])
@triton.jit
def _scan(K, V, S, T, N, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
          REVERSE: tl.constexpr):
    """S[bh, n] = sum of K_m^T V_m over chunks m < n (m > n when REVERSE); S is fp32."""
    bh = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, C)
    offs_d = tl.arange(0, D)
    offs_v = tl.program_id(0) * BV + tl.arange(0, BV)
    columns = offs_v[None, :] < DV  # a value block wider than DV (autotuning tries them all) stops at DV
    acc = tl.zeros((D, BV), dtype=tl.float32)
    for i in range(0, N):
        if REVERSE:
            n = N - 1 - i
        else:
            n = i
        tl.store(S + (bh * N + n) * D * DV + offs_d[:, None] * DV + offs_v[None, :], acc, mask=columns)
        rows = n * C + offs_c
        k = tl.load(K + bh * T * D + rows[:, None] * D + offs_d[None, :], mask=rows[:, None] < T, other=0.0)
        v = tl.load(V + bh * T * DV + rows[:, None] * DV + offs_v[None, :], mask=(rows[:, None] < T) & columns,
                    other=0.0)
        acc += tl.dot(tl.trans(k.to(tl.float32)), v.to(tl.float32))


@triton.jit
def _chunk_offsets(T, N, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr):
    """This program's chunk: which rows exist, and the offsets of its (C, D) query / key block,
    its (C, DV) value block and its (D, DV) state."""
    n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = n * C + tl.arange(0, C)
    offs_d = tl.arange(0, D)
    offs_v = tl.arange(0, DV)
    qk = bh * T * D + rows[:, None] * D + offs_d[None, :]
    v = bh * T * DV + rows[:, None] * DV + offs_v[None, :]
    s = (bh * N + n) * D * DV + offs_d[:, None] * DV + offs_v[None, :]
    return rows[:, None] < T, qk, v, s


@triton.jit
def _lower(C: tl.constexpr):
    """(C, C) causal mask within a chunk."""
    return tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]


@triton.autotune(configs=_CHUNK_CONFIGS, key=_CHUNK_KEY)
@triton.jit
def _chunk_fwd(Q, K, V, S, O, T, N, D: tl.constexpr, DV: tl.constexpr, C: tl.constexpr):
    inside, qk_ptrs, v_ptrs, s_ptrs = _chunk_offsets(T, N, D, DV, C)
    q = tl.load(Q + qk_ptrs, mask=inside, other=0.0)
    k = tl.load(K + qk_ptrs, mask=inside, other=0.0)
    v = tl.load(V + v_ptrs, mask=inside, other=0.0).to(tl.float32)
    s = tl.load(S + s_ptrs)
    a = tl.where(_lower(C), tl.dot(q, tl.trans(k)), 0.0)
    tl.store(O + v_ptrs, tl.dot(a, v) + tl.dot(q, s), mask=inside)


@triton.autotune(configs=_CHUNK_CONFIGS, key=_CHUNK_KEY)
@triton.jit
def _chunk_bwd(Q, K, V, S, DO, DS, GRAD_Q, GRAD_K, GRAD_V, T, N, D: tl.constexpr, DV: tl.constexpr,
               C: tl.constexpr):
    inside, qk_ptrs, v_ptrs, s_ptrs = _chunk_offsets(T, N, D, DV, C)
    q = tl.load(Q + qk_ptrs, mask=inside, other=0.0)
    k = tl.load(K + qk_ptrs, mask=inside, other=0.0)
    v = tl.load(V + v_ptrs, mask=inside, other=0.0).to(tl.float32)
    do = tl.load(DO + v_ptrs, mask=inside, other=0.0)
    s = tl.load(S + s_ptrs)
    ds = tl.load(DS + s_ptrs)
    a = tl.where(_lower(C), tl.dot(q, tl.trans(k)), 0.0)
    da = tl.where(_lower(C), tl.dot(do, tl.trans(v)), 0.0)
    dq = tl.dot(da, k) + tl.dot(do, tl.trans(s))
    dk = tl.dot(tl.trans(da), q) + tl.dot(v, tl.trans(ds))
    dv = tl.dot(tl.trans(a), do) + tl.dot(k, ds)
    tl.store(GRAD_Q + qk_ptrs, dq, mask=inside)
    tl.store(GRAD_K + qk_ptrs, dk, mask=inside)
    tl.store(GRAD_V + v_ptrs, dv.to(GRAD_V.dtype.element_ty), mask=inside)


def _chunk_states(k, v, chunk: int, reverse: bool) -> torch.Tensor:
    B, H, T, D = k.shape
    DV = v.shape[-1]
    N = triton.cdiv(T, chunk)
    S = torch.empty((B * H, N, D, DV), device=k.device, dtype=torch.float32)
    _scan[lambda meta: (triton.cdiv(DV, meta["BV"]), B * H)](k, v, S, T, N, D=D, DV=DV, C=chunk, REVERSE=reverse)
    return S


class _CausalLinearNumerator(torch.autograd.Function):
    """o = tril(Q K^T) V for positive fp32 features Q, K (B, H, T, D) and values V (B, H, T, Dv); o fp32."""

    @staticmethod
    def forward(ctx, q, k, v, chunk: int):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        B, H, T, D = q.shape
        DV = v.shape[-1]
        S = _chunk_states(k, v, chunk, reverse=False)
        o = torch.empty((B, H, T, DV), device=q.device, dtype=torch.float32)
        _chunk_fwd[(S.shape[1], B * H)](q, k, v, S, o, T, S.shape[1], D=D, DV=DV, C=chunk)
        ctx.save_for_backward(q, k, v, S)
        ctx.chunk = chunk
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, S = ctx.saved_tensors
        do = do.contiguous()
        B, H, T, D = q.shape
        dS = _chunk_states(q, do, ctx.chunk, reverse=True)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _chunk_bwd[(S.shape[1], B * H)](q, k, v, S, do, dS, dq, dk, dv, T, S.shape[1], D=D, DV=v.shape[-1],
                                        C=ctx.chunk)
        return dq, dk, dv, None


def linear_attention_triton(q, k, v, chunk_size: int):
    """Causal linear attention of rotated q, k (B, H, T, D) and v (B, H, T, Dv); returns v's dtype.
    D, Dv and chunk_size are powers of two from 16 to 64 (triton.py's `untileable` checks when the model is built)."""
    phi_q, phi_k = feature_map(q.float()), feature_map(k.float())
    num = _CausalLinearNumerator.apply(phi_q, phi_k, v, chunk_size)
    den = (phi_q * phi_k.cumsum(-2)).sum(-1, keepdim=True)
    return (num / den.clamp_min(torch.finfo(torch.float32).tiny)).to(v.dtype)
