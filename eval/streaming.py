"""Streaming perplexity with KV-sink windows, the StreamingLLM protocol (Xiao et al., ICLR 2024)
as its reference code (mit-han-lab/streaming-llm, examples/eval_long_ppl.py) runs it.

Token-by-token decoding over a long held-out text (default: the run's held-out split,
documents concatenated, first 20k tokens; `--bos` puts the BOS token first, as a Llama
tokenizer does for each text there); the NLL of every next token is recorded. Modes, all at
the same total cache of S+W tokens:

* `window`    window attention: the S+W most recent tokens only (cache 0+(S+W));
* `sinks`     StreamingLLM: the S first tokens + the W most recent (cache S+W), keys re-rotated
              at their cache positions ("pos shift");
* `recompute` sliding window with recomputation, the quality reference: each token is predicted
              by a fresh forward over as many recent tokens as a streaming query sees, placed
              at positions 0..n-1. Windows are batched; `--recompute-stride k` scores every k-th
              position only.

Order (`--order`): the reference feeds a token with the cache as it is and trims the cache to
S+W after the forward, so each query sees S+W+1 keys (`reference`, the default). `evict-first`
trims before the forward: S+W keys per query, the cache never holds more than S+W.

`linear` attention has no window: it runs its exact recurrent state over the whole text (one
mode, `recurrent`). W defaults to the largest window whose queries stay inside the trained
context: block_size - S - 1 (reference order) or block_size - S (evict-first).

    python -m eval.streaming --ckpt out/<run> [--n-sink 4] [--window W] [--tokens 20000] [--bos]
"""
from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .result import EvalResult

MODES = ("window", "sinks", "recompute")
ORDERS = ("reference", "evict-first")


def cache_bytes(cache) -> int:
    """Bytes resident in a cache: K and V of every layer, or linear attention's state."""
    return cache.nbytes()


@torch.inference_mode()
def stream_nll(model, tokens: torch.Tensor, cache) -> dict:
    """Feed `tokens` (1-D) one at a time through `cache`; NLL of each next token (len N-1).

    Returns {"nll": np.ndarray, "seconds", "cache_tokens_peak", "cache_bytes_peak"}.
    """
    device = next(model.parameters()).device
    ids = tokens.to(device).long().view(-1, 1)
    n = ids.shape[0] - 1
    nll = torch.empty(n, device=device)
    peak = 0
    t0 = time.perf_counter()
    for t in range(n):
        logits = model(ids[t : t + 1], cache=cache).logits[0, -1]
        nll[t] = torch.logsumexp(logits, -1) - logits[ids[t + 1, 0]]
        peak = max(peak, len(cache))
    nll = nll.cpu().numpy()  # synchronises on GPU before the clock stops
    seconds = time.perf_counter() - t0
    if cache.is_recurrent:
        peak = None  # a fixed-size state, not tokens (len() counts tokens seen)
    return {"nll": nll, "seconds": seconds, "cache_tokens_peak": peak, "cache_bytes_peak": cache_bytes(cache)}


@torch.inference_mode()
def recompute_nll(model, tokens: torch.Tensor, context: int, stride: int = 1, batch_size: int = 16) -> dict:
    """Sliding window with recomputation: token t+1 is predicted from tokens[t-context+1 .. t]
    at positions 0..context-1 (fewer at the start). Positions not scored (stride > 1) are NaN.

    The first `context` predictions share one prefix forward; later ones are batched windows.
    """
    device = next(model.parameters()).device
    tokens = tokens.to(device).long()
    n = tokens.shape[0] - 1
    nll = torch.full((n,), float("nan"), device=device)
    t0 = time.perf_counter()
    head = min(context, n)  # predictions t = 0..head-1 see the prefix tokens[0..t]
    logits = model(tokens[None, :head]).logits[0]
    nll[:head] = F.cross_entropy(logits, tokens[1 : head + 1], reduction="none")
    ends = torch.arange(head, n, stride, device=device)  # t: last context token of each window
    for chunk in ends.split(batch_size) if len(ends) else ():
        windows = torch.stack([tokens[t - context + 1 : t + 1] for t in chunk.tolist()])
        last = model(windows).logits[:, -1]
        nll[chunk] = F.cross_entropy(last, tokens[chunk + 1], reduction="none")
    out = nll.cpu().numpy()
    seconds = time.perf_counter() - t0
    return {"nll": out, "seconds": seconds, "cache_tokens_peak": context, "cache_bytes_peak": None}


def _summary(res: dict, cache: str) -> dict:
    nll = res["nll"]
    scored = np.isfinite(nll)
    mean = float(nll[scored].mean())
    return {
        "cache": cache,
        "ppl": float(np.exp(mean)),
        "mean_nll": mean,
        "n_scored": int(scored.sum()),
        "tokens_per_s": int(scored.sum()) / res["seconds"],
        "seconds": res["seconds"],
        "cache_tokens_peak": res["cache_tokens_peak"],
        "cache_bytes_peak": res["cache_bytes_peak"],
    }


@dataclass
class StreamingResult(EvalResult):
    n_tokens: int
    n_predictions: int
    n_sink: int
    window: int
    order: str
    keys_per_query: int
    first_eviction: int
    bos_first: bool
    block_size: int
    recompute_stride: int
    attention: dict
    modes: dict
    notes: str | None = None
    text: str | None = None
    process_peak_rss_mb: float | None = None
    _curves: dict = field(default_factory=dict, repr=False)  # mode -> per-token NLL array

    DEFINITIONS = {
        "ppl": "exp(mean NLL of each next token) over the scored positions, decoding token by token",
        "window": "window attention, cache = the S+W most recent tokens (0+(S+W)): the same total cache as sinks",
        "sinks": "StreamingLLM: S first tokens + W most recent, keys re-rotated at cache positions",
        "recompute": "sliding window with recomputation over the last keys_per_query tokens (quality reference)",
        "recurrent": "linear attention: exact recurrent state over the whole text (no window)",
        "order": "reference: the cache is trimmed to S+W after each forward (StreamingLLM's eval_long_ppl.py), "
                 "so a query sees S+W+1 keys; evict-first: trimmed before, S+W keys",
        "keys_per_query": "keys a query attends to once the cache is full",
        "first_eviction": "index of the first prediction (0 = predicting token 1) whose query misses a token",
        "bos_first": "the stream starts with the BOS token",
        "tokens_per_s": "scored tokens / wall seconds of the mode",
        "cache_tokens_peak": "largest number of tokens held in the cache during a forward (context for recompute)",
        "cache_bytes_peak": "bytes of K/V (or linear state) resident at the end, where the cache is largest",
        "ppl_window": "ppl of the window mode (null when not run)",
        "ppl_sinks": "ppl of the sinks mode (null when not run)",
    }

    @property
    def ppl_window(self) -> float | None:
        return self.modes.get("window", {}).get("ppl")

    @property
    def ppl_sinks(self) -> float | None:
        return self.modes.get("sinks", {}).get("ppl")


def default_window(block_size: int, n_sink: int, order: str = "reference") -> int:
    """The largest W whose queries stay within the trained context."""
    return block_size - n_sink - (order == "reference")


def evaluate(model, tokens: torch.Tensor, n_sink: int = 4, window: int | None = None, modes=MODES,
             recompute_stride: int = 1, batch_size: int = 16, order: str = "reference",
             bos_id: int | None = None) -> StreamingResult:
    """Run each mode over `tokens` (1-D ids, BOS prepended when `bos_id` is given); the
    per-token NLL curves are in `result._curves`."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose from {ORDERS}")
    cfg = model.config
    window = default_window(cfg.block_size, n_sink, order) if window is None else window
    if bos_id is not None:
        tokens = torch.cat([torch.tensor([bos_id], dtype=tokens.dtype), tokens])
    device = next(model.parameters()).device
    keys = n_sink + window + (order == "reference")
    # the reference's trim-after-forward is an evict-first cache one slot larger: same keys per query
    extra = int(order == "reference")
    if cfg.attention == "linear":
        modes = ("recurrent",)
    results, curves = {}, {}
    for mode in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if mode == "recurrent":
            res, cache = stream_nll(model, tokens, model.make_cache()), "exact recurrent state"
        elif mode == "window":
            res = stream_nll(model, tokens, model.make_cache(0, n_sink + window + extra))
            cache = f"0+{n_sink + window}"
        elif mode == "sinks":
            res, cache = stream_nll(model, tokens, model.make_cache(n_sink, window + extra)), f"{n_sink}+{window}"
        elif mode == "recompute":
            res, cache = recompute_nll(model, tokens, keys, recompute_stride, batch_size), f"recompute last {keys}"
        else:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        results[mode] = _summary(res, cache)
        if device.type == "cuda":
            results[mode]["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        curves[mode] = res["nll"]
    if "recompute" in curves and recompute_stride > 1:  # every mode on the positions recompute scored
        scored = np.isfinite(curves["recompute"])
        for mode, nll in curves.items():
            results[mode]["ppl_on_recompute_positions"] = float(np.exp(nll[scored].mean()))
    return StreamingResult(
        n_tokens=int(tokens.shape[0]), n_predictions=int(tokens.shape[0]) - 1, n_sink=n_sink, window=window,
        order=order, keys_per_query=keys, first_eviction=keys, bos_first=bos_id is not None,
        block_size=cfg.block_size, recompute_stride=recompute_stride,
        attention={"kind": cfg.attention, "attn_normalize": cfg.attn_normalize, "gate": cfg.gate},
        modes=results, _curves=curves,
        notes="linear attention runs its exact recurrent state: no eviction, one mode" if cfg.attention == "linear" else None)


def plot(result: StreamingResult, path) -> None:
    """NLL vs position, moving average, one line per mode; dashed line where eviction starts."""
    from .plots import save, subplots

    n, curves = result.n_predictions, result._curves
    smooth = max(1, n // 100)
    fig, axes = subplots(1, 1, width=8, height=4)
    ax = axes[0, 0]
    for mode, nll in curves.items():
        pos = np.flatnonzero(np.isfinite(nll))
        vals = nll[pos]
        k = min(smooth, len(vals))
        avg = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(pos[k - 1 :], avg, lw=1, label=f"{mode} ({result.modes[mode]['cache']}): "
                                                f"ppl {result.modes[mode]['ppl']:.2f}")
    if result.attention["kind"] != "linear":
        ax.axvline(result.first_eviction, color="gray", ls="--", lw=0.8,
                   label=f"first eviction (prediction {result.first_eviction})")
    ax.set_xlabel("position in the text (tokens)")
    ax.set_ylabel(f"NLL (nats), moving average over {smooth}")
    ax.set_title(f"streaming NLL, {result.attention['kind']} (gate {result.attention['gate']})")
    ax.legend(fontsize=8)
    save(fig, path)


def main(argv=None) -> list[StreamingResult]:
    from . import fail, nonnegative_int, positive_int
    from .checkpoints import add_lm_arguments, bos_id, for_each_checkpoint

    ap = argparse.ArgumentParser(prog="python -m eval.streaming", description=__doc__.split("\n\n")[0])
    add_lm_arguments(ap)
    ap.add_argument("--n-sink", type=nonnegative_int, default=4, help="S: first tokens kept (sinks mode)")
    ap.add_argument("--window", type=positive_int, default=None,
                    help="W: recent tokens kept (default: block_size - S - 1, or block_size - S with evict-first; "
                         "for an hf: import its context capped at 256 in place of block_size)")
    ap.add_argument("--order", choices=ORDERS, default="reference",
                    help="reference: trim after the forward, a query sees S+W+1 keys; evict-first: S+W")
    ap.add_argument("--bos", action="store_true", help="start the stream with the BOS token (runs trained with data.bos)")
    ap.add_argument("--tokens", type=int, default=20000, help="held-out tokens to stream (at most)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--recompute-stride", type=positive_int, default=1, help="score every k-th position in recompute")
    ap.add_argument("--batch-size", type=positive_int, default=16, help="windows per forward in recompute")
    args = ap.parse_args(argv)

    if args.tokens < 2:
        fail(f"--tokens must be >= 2 (one prediction needs two tokens), got {args.tokens}")

    def one(run, out):
        cfg = run.model.config
        window = default_window(run.eval_block_size, args.n_sink, args.order) if args.window is None else args.window
        if window < 1:
            fail(f"--window must be >= 1 (got {window}); with --n-sink {args.n_sink} near block_size "
                 f"{cfg.block_size} pass --window explicitly")
        keys = args.n_sink + window + (args.order == "reference")
        if "recompute" in args.modes and keys > cfg.block_size and cfg.attention != "linear":
            fail(f"recompute needs the {keys} keys a query sees <= block_size {cfg.block_size}; "
                 "lower --window or drop recompute from --modes")
        bos = bos_id(run) if args.bos else None
        if args.bos and bos is None:
            fail(f"--bos needs a run trained with data.bos (a BOS token); {run.run_dir} has none")
        val = run.val_tokens()
        tokens = torch.from_numpy(np.asarray(val[: args.tokens]).astype(np.int64))
        if tokens.shape[0] < 2:
            fail(f"the held-out split of {run.run_dir} has {tokens.shape[0]} tokens; nothing to stream")
        result = evaluate(run.model, tokens, args.n_sink, window, args.modes, args.recompute_stride, args.batch_size,
                          args.order, bos)
        result.text = (f"first {tokens.shape[0]} tokens of the held-out split (documents concatenated), "
                       f"of {len(val)} available")
        result.process_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        plot(result, out / "streaming.png")
        for mode, r in result.modes.items():
            print(f"{mode:>10} [{r['cache']}]: ppl {r['ppl']:.3f}  {r['tokens_per_s']:.0f} tok/s  "
                  f"peak cache {r['cache_tokens_peak']} tokens")
        return result

    return for_each_checkpoint(args, "streaming", one, headline=("ppl_window", "ppl_sinks"))


if __name__ == "__main__":
    main()
