"""The fused attention paths (model/backends/: flex, flash, triton with triton_sigmoid.py and
triton_linear.py) against the `math` backend, which tests/test_attention.py checks against the independent reference.

On the CPU: backend selection and its errors; FlexAttention's forward (PyTorch has no CPU
backward for it); the Triton kernels (sigmoid / elu1, chunked linear), forward and backward,
under TRITON_INTERPRET=1 in fp32 and in bf16 (the GPU check's bound); and every Triton kernel
config through the real compiler for sm_90 (bench/compile_kernels.py). Tests marked `gpu` run
every fast path in bf16 on CUDA and are skipped without it.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from configs import ConfigError, load_config
from model import GPT, GPTConfig, backends
from model.attention import Attention
from model.backends import packages
from model.backends import resolve as resolve_backend
from model.config import AttentionConfig
from model.scores import math_attention

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")

ELEMENTWISE = [("sigmoid", False), ("sigmoid", True), ("elu1", False), ("elu1", True)]


def cfg_for(kind="softmax", normalize=False, backend="auto", **kw) -> AttentionConfig:
    return AttentionConfig(n_embd=64, n_head=4, attention=kind, attn_normalize=normalize, backend=backend,
                           block_size=64, **kw)


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------------------------
# choosing a backend, and the errors for the combinations that cannot run
# --------------------------------------------------------------------------------------------
@pytest.fixture
def h100_shared_memory(monkeypatch):
    """resolve_backend asks the GPU for its shared memory; answer as an H100 would."""
    monkeypatch.setattr("model.backends.triton.shared_memory_kib", lambda device: 227.0)
    return monkeypatch


def test_auto_without_triton_falls_back_to_flex_and_chunked(h100_shared_memory):
    h100_shared_memory.setitem(backends.REGISTRY, "triton", replace(backends.get("triton"), missing="no triton here"))
    cuda = torch.device("cuda")
    assert [resolve_backend(cfg_for(k), cuda, torch.bfloat16) for k in ("sigmoid", "elu1", "linear")] == \
        ["flex", "flex", "chunked"]


@pytest.mark.skipif(not packages.TRITON_AVAILABLE, reason="triton is not installed")
def test_auto_keeps_linear_off_triton_where_its_shared_memory_does_not_fit(monkeypatch):
    monkeypatch.setattr("model.backends.triton.shared_memory_kib", lambda device: 99.0)  # an RTX 4090
    cuda = torch.device("cuda")
    assert [resolve_backend(cfg_for(k), cuda, torch.bfloat16) for k in ("sigmoid", "linear")] == ["triton", "chunked"]


def test_auto_picks_per_kind_and_device(h100_shared_memory):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # resolve_backend needs no GPU to answer
    assert [resolve_backend(cfg_for(k), cpu) for k in ("softmax", "sigmoid", "elu1", "linear")] == \
        ["sdpa", "math", "math", "chunked"]
    fused = ["triton"] * 3 if packages.TRITON_AVAILABLE else ["flex", "flex", "chunked"]
    assert [resolve_backend(cfg_for(k), cuda, torch.bfloat16) for k in ("sigmoid", "elu1", "linear")] == fused
    untileable = [replace(cfg_for(k), n_embd=48) for k in ("sigmoid", "linear")]  # head_dim 12
    assert [resolve_backend(c, cuda, torch.bfloat16) for c in untileable] == ["flex", "chunked"]
    head_dim_128 = [replace(cfg_for(k), n_embd=512) for k in ("sigmoid", "linear")]  # linear's tiles stop at 64
    assert [resolve_backend(c, cuda, torch.bfloat16) for c in head_dim_128] == \
        (["triton", "chunked"] if packages.TRITON_AVAILABLE else ["flex", "chunked"])
    assert resolve_backend(cfg_for(), cuda, torch.bfloat16) == ("flash" if packages.FLASH_AVAILABLE else "sdpa")
    assert resolve_backend(cfg_for(), cuda, torch.float32) == "sdpa"  # flash-attn takes fp16/bf16 only
    assert resolve_backend(cfg_for("sigmoid", backend="math"), cuda) == "math"


@pytest.mark.skipif(packages.FLASH_AVAILABLE, reason="flash-attn is installed here")
def test_flash_without_the_package_fails_at_construction():
    with pytest.raises(ValueError, match="pip install flash-attn"):
        Attention(cfg_for(backend="flash"))


@pytest.mark.skipif(packages.TRITON_AVAILABLE, reason="triton is installed here")
def test_triton_without_the_package_fails_at_construction():
    with pytest.raises(ValueError, match="pip install triton"):
        Attention(cfg_for("sigmoid", backend="triton"))


@pytest.mark.skipif(not packages.TRITON_AVAILABLE, reason="triton is not installed")
def test_triton_shapes_it_cannot_tile_fail_at_construction():
    with pytest.raises(ValueError, match=r"powers of two.*linear_chunk_size.*backend=chunked"):
        Attention(cfg_for("linear", backend="triton", linear_chunk_size=24))
    with pytest.raises(ValueError, match=r"from 16 to 64.*linear_chunk_size': 128"):
        Attention(cfg_for("linear", backend="triton", linear_chunk_size=128))
    with pytest.raises(ValueError, match=r"powers of two.*head_dim.*backend=flex"):
        Attention(replace(cfg_for("elu1", backend="triton"), n_embd=48))  # head_dim 12
    Attention(cfg_for("linear", backend="triton", linear_chunk_size=32))  # fine


def test_kernel_backends_refuse_kinds_they_cannot_run():
    with pytest.raises(ValueError, match="allowed"):
        Attention(cfg_for("sigmoid", backend="flash"))
    with pytest.raises(ValueError, match="allowed"):
        Attention(cfg_for("linear", backend="flex"))
    with pytest.raises(ConfigError, match=r"model.backend='flash' cannot run attention='sigmoid'; allowed"):
        load_config(None, ["model.attention=sigmoid", "model.backend=flash"])


def test_flex_training_on_cpu_is_a_clear_error():
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_embd=32, n_head=2, block_size=16, attention="sigmoid",
                          backend="flex"))
    idx = torch.randint(0, 50, (2, 16))
    with pytest.raises(ValueError, match="no backward on cpu.*backend=auto"):
        model(idx, targets=idx)


# --------------------------------------------------------------------------------------------
# FlexAttention forward on the CPU
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("kind,normalize", [("softmax", False), *ELEMENTWISE])
def test_flex_forward_matches_math(kind, normalize, causal):
    cfg = cfg_for(kind, normalize, sigmoid_bias=-1.5 if kind == "sigmoid" else None)
    q, k, v = (3 * torch.randn(2, 4, 40, 16) for _ in range(3))  # peaked weights, T not a block multiple
    with torch.no_grad():
        y = backends.get("flex")(q, k, v, cfg, causal)
        ref = math_attention(q, k, v, cfg, causal)[0]
    assert rel(y, ref) < 1e-5


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_flex_and_sdpa_with_sink_logits_match_math(causal):
    """Softmax with sink logits: out * sigmoid(lse - b_h) from flex's lse, and from SDPA's output."""
    cfg = cfg_for("softmax", sink_logit="learned")
    q, k, v = (torch.randn(2, 4, 40, 16) for _ in range(3))
    sink = torch.tensor([0.0, 2.0, 3.0, 5.0])
    with torch.no_grad():
        ref = math_attention(q, k, v, cfg, causal, sink)[0]
        for name in ("flex", "sdpa"):
            assert rel(backends.get(name)(q, k, v, cfg, causal, sink), ref) < 1e-5, name
        assert rel(math_attention(q, k, v, cfg_for("softmax"), causal)[0], ref) > 1e-2  # the sinks change it


def test_flex_model_decodes_like_its_full_forward():
    """Prefill runs flex (Tq == Tk); cached decoding steps fall back to math (Tq != Tk)."""
    cfg = GPTConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_size=16,
                    attention="elu1", backend="flex")
    model = GPT(cfg).eval()
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(idx).logits
        ref = GPT(replace(cfg, backend="math")).eval()
        ref.load_state_dict(model.state_dict())
        assert rel(full, ref(idx).logits) < 1e-5
        cache = model.make_cache()
        step = [model(idx[:, :8], cache=cache).logits]
        step += [model(idx[:, t : t + 1], cache=cache).logits for t in range(8, 12)]
    assert rel(torch.cat(step, 1), full) < 1e-5


# --------------------------------------------------------------------------------------------
# the Triton kernels, in Triton's CPU interpreter
# --------------------------------------------------------------------------------------------
INTERPRETED = textwrap.dedent("""
    from dataclasses import replace
    import torch
    from bench.kernels import check
    from model import GPT, GPTConfig
    from model.backends import get
    from model.backends.triton_linear import _scan, linear_attention_triton
    from model.backends.triton_sigmoid import sigmoid_family_attention
    from model.config import AttentionConfig
    from model.scores import math_attention
    attend = lambda name, *args: get(name)(*args)
    torch.manual_seed(0)
    errors = []

    def rel(a, b):
        errors.append(((a.float() - b.float()).norm() / b.float().norm()).item())

    def compare(fast, cfg, causal, q, k, v):  # output and d(q, k, v) against math
        g = torch.randn_like(q)
        outs = []
        for fn in (fast, lambda *a: math_attention(*a)[0]):
            y = fn(q, k, v, cfg, causal)
            outs.append([y, *torch.autograd.grad(y, (q, k, v), g)])
        for a, b in zip(*outs):
            rel(a, b)

    for kind in ("sigmoid", "elu1"):
        for normalize in (False, True):
            for causal in (True, False):
                cfg = AttentionConfig(n_embd=32, n_head=2, attention=kind, attn_normalize=normalize,
                                      sigmoid_bias=-1.0 if kind == "sigmoid" else None, block_size=64)
                compare(sigmoid_family_attention, cfg, causal,
                        *((2 * torch.randn(1, 2, 40, 16)).requires_grad_() for _ in range(3)))
    for t in (40, 7):  # linear: chunks of 16, a ragged last chunk, and one shorter than a chunk
        cfg = AttentionConfig(n_embd=32, n_head=2, attention="linear", linear_chunk_size=16, block_size=64)
        compare(lambda *a: linear_attention_triton(*a[:3], 16), cfg, True,
                *(torch.randn(2, 2, t, 16, requires_grad=True) for _ in range(3)))
    for kind in ("sigmoid", "linear"):  # a whole model: dispatch through Attention, GQA, loss and grads
        cfg = GPTConfig(vocab_size=50, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, block_size=24,
                        attention=kind, gate="elementwise", linear_chunk_size=16, backend="triton")
        idx = torch.randint(0, 50, (2, 24))
        weights, grads = GPT(cfg).state_dict(), []
        for backend in ("triton", "math"):
            model = GPT(replace(cfg, backend=backend))
            model.load_state_dict(weights)
            model(idx, targets=idx).loss.backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        rel(*grads)
    # qk_norm under autocast hands fp32 q, k and bf16 v to the kernels: one dtype is chosen for them
    cfg = AttentionConfig(n_embd=32, n_head=2, attention="sigmoid", block_size=64)
    q, k = (torch.randn(1, 2, 40, 16) for _ in range(2))
    v = torch.randn(1, 2, 40, 16).bfloat16()
    mixed = attend("triton", q, k, v, cfg, True)
    assert mixed.dtype == torch.float32  # no autocast: the widest
    rel(mixed, math_attention(q, k, v.float(), cfg, True)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attend("triton", q, k, v, cfg, True).dtype == torch.bfloat16
    # the scan's value blocks may be wider than the values (autotuning tries every width): no
    # write may land outside the states
    kf, vf = torch.rand(2, 40, 16), torch.randn(2, 40, 16)
    states = torch.zeros(2 * 3 * 16 * 16 + 64)
    _scan.fn[(1, 2)](kf, vf, states, 40, 3, D=16, DV=16, C=16, BV=32, REVERSE=False)
    kv = kf[:, :32].reshape(2, 2, 16, 16).transpose(-1, -2) @ vf[:, :32].reshape(2, 2, 16, 16)
    rel(states[:-64].view(2, 3, 16, 16), torch.stack([torch.zeros(2, 16, 16), kv[:, 0], kv[:, 0] + kv[:, 1]], 1))
    assert not states[-64:].any(), "the scan wrote past the end of its states"
    print("WORST", max(errors))
    # bf16 inputs against fp32 math under the GPU check's bound (pessimistic here: the
    # interpreter rounds fp32 -> bf16 by truncation, doubling the rounding error)
    rows, ok = check(["sigmoid", "elu1", "linear"], torch.device("cpu"), torch.bfloat16, 1e-2, t=64, batch=1)
    assert {r["backend"] for r in rows} >= {"triton", "chunked"}
    print("BF16", ok, max(r.get(key, 0) for r in rows for key in ("out", "dq", "dk", "dv")))
""")


def _triton_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(p) for p in version("triton").split(".")[:2])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.skipif(importlib.util.find_spec("triton") is not None and _triton_version() < (3, 9),
                    reason="Triton's interpreter before 3.9 cannot loop to a bound computed from program_id")
def test_triton_kernel_matches_math_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.split("WORST")[-1].split()[0])
    assert worst < 1e-4, f"triton vs math relative error {worst:.3g} (forward or a gradient)"
    bf16_ok, bf16_worst = proc.stdout.split("BF16")[-1].split()
    assert bf16_ok == "True", f"linear attention in bf16: relative error {bf16_worst} over the 1e-2 bound"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_triton_kernel_config_compiles_for_the_h100():
    """The interpreter runs kernels as Python; this runs Triton's real compiler (front end, LLVM,
    ptxas) for sm_90 on the CPU, over every autotune config and flag set."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "bench.compile_kernels", "--arch", "90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| _")]
    assert {r[1].strip() for r in rows} == {"_fwd", "_bwd_dkdv", "_bwd_dq", "_scan", "_chunk_fwd", "_chunk_bwd"}
    assert len(rows) == 8 * 3 * 3 + 2 * 3 + 2 * 2  # every (kind, causal, normalize) and config
    assert all(r[8].strip() == "ok" for r in rows), [r for r in rows if r[8].strip() != "ok"]
    assert all(0 < int(r[5]) <= 255 for r in rows)  # ptxas reported the registers of every kernel
    # other head dims (linear only up to 64), the first config that fits
    proc = subprocess.run([sys.executable, "-m", "bench.compile_kernels", "--quick", "--head-dims", "16", "32", "128"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| _")]
    assert sum("D=128" in r[2] for r in rows) == 8 * 3 and sum("D=16" in r[2] for r in rows) == 8 * 3 + 4


# --------------------------------------------------------------------------------------------
# on a GPU: every fast path in bf16, forward and gradients
# --------------------------------------------------------------------------------------------
def bf16_step(cfg: GPTConfig, compiled: bool = False):
    """Loss and flat gradients of one bf16-autocast step of a fresh model (seed 0) on a fixed batch."""
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = (torch.compile(model) if compiled else model)(idx, targets=idx).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@gpu
@needs_cuda
def test_every_fast_path_matches_math_in_bf16():
    from bench.kernels import check

    rows, ok = check(["softmax", "sigmoid", "elu1", "linear"], torch.device("cuda"), torch.bfloat16, 1e-2, t=300)
    assert {r["backend"] for r in rows} >= {"sdpa", "flex", "chunked"}
    assert all(r["grads"] for r in rows)
    assert ok, [r for r in rows if not r["pass"]]


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "elu1", "linear"])
def test_auto_model_step_on_gpu_matches_math(kind):
    """A whole model under bf16 autocast: auto's loss and gradients agree with math's. qk_norm (as in
    the ablation configs) hands the kernels fp32 q, k and bf16 v."""
    cfg = GPTConfig(vocab_size=256, n_layer=2, n_embd=128, n_head=2, block_size=256, attention=kind, gate="elementwise",
                    qk_norm=True)
    (loss_a, grad_a), (loss_m, grad_m) = (bf16_step(replace(cfg, backend=b)) for b in ("auto", "math"))
    assert abs(loss_a - loss_m).item() < 1e-2 * loss_m.item()
    assert rel(grad_a, grad_m) < 2e-2


@gpu
@needs_cuda
def test_triton_linear_memory_is_linear_in_t():
    """At a fixed number of tokens B * T, the kernel's extra memory does not grow with T."""
    from model.backends.triton_linear import linear_attention_triton

    extra = []
    for t in (2048, 8192):
        q, k, v = (torch.randn(16384 // t, 12, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn_like(q)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        linear_attention_triton(q, k, v, 64).backward(g)
        torch.cuda.synchronize()
        extra.append(torch.cuda.max_memory_allocated() - held)
    assert extra[1] < 1.2 * extra[0], \
        f"extra memory {extra[0] / 2**20:.0f} MiB at T=2048, {extra[1] / 2**20:.0f} at 8192"


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["sigmoid", "linear"])
def test_compiled_model_with_triton_kernels_matches_eager(kind):
    """torch.compile traces through the autotuned Triton kernels (or breaks the graph around them)
    and computes the same loss and gradients."""
    cfg = GPTConfig(vocab_size=256, n_layer=2, n_embd=128, n_head=2, block_size=256, attention=kind, backend="triton")
    (loss_e, grad_e), (loss_c, grad_c) = (bf16_step(cfg, compiled) for compiled in (False, True))
    assert abs(loss_c - loss_e).item() < 1e-2 * loss_e.item()
    assert rel(grad_c, grad_e) < 2e-2
