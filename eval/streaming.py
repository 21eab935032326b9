"""Streaming perplexity with KV-sink windows, the StreamingLLM protocol (Xiao et al., ICLR 2024)
as its reference code (mit-han-lab/streaming-llm, examples/eval_long_ppl.py) runs it.

Over a long held-out text (default: the run's held-out split, documents concatenated, first
`--tokens` = 20,000 tokens; longer streams start the split again from its first token; `--bos`
puts the BOS token first, as a Llama tokenizer does for each text there) the NLL of every next
token is recorded. Modes, all at the same total cache of S+W tokens:

* `window`    window attention: the S+W most recent tokens only (cache 0+(S+W));
* `sinks`     StreamingLLM: the S first tokens + the W most recent (cache S+W), keys re-rotated
              at their cache positions ("pos shift");
* `recompute` sliding window with recomputation, the quality reference: each token is predicted
              by a fresh forward over as many recent tokens as a streaming query sees, placed
              at positions 0..n-1. Windows are batched; `--recompute-stride k` scores every k-th
              position only. The default, auto, picks k for about 1,000 windows (k = 20 at the
              default 20,000 tokens), so the default run takes minutes on a CPU rather than half
              an hour; every mode's JSON then also has its ppl on the positions recompute scored.
              `--recompute-stride 1` scores every position.

Order (`--order`): the reference feeds a token with the cache as it is and trims the cache to
S+W after the forward, so each query sees S+W+1 keys (`reference`, the default). `evict-first`
trims before the forward: S+W keys per query, the cache never holds more than S+W.

window and sinks run in the sink cache's exact parallel form by default (model/cache.py's
BandKVCache: chunks of `--chunk` queries, each seeing what the token-by-token cache held when it
was decoded); `--exact-decode` feeds one token at a time instead, the reference the parallel form
is tested against. `linear` attention has no window: it runs its exact recurrent state over the
whole text (one mode, `recurrent`), fed in chunks (one token at a time with --exact-decode). W
defaults to the largest window whose queries stay inside the trained context: block_size - S - 1
(reference order) or block_size - S (evict-first); a larger one needs --beyond-context.

Each mode is printed as it finishes, and while others remain the finished ones are saved to
`streaming.partial.json` (marked `partial`), so Ctrl-C keeps them; the whole result replaces it.
The parallel form and --exact-decode agree up to float rounding: 1e-5 nats of mean NLL in fp32,
5e-3 in bf16 / fp16 (up to 3.3e-3 measured); the JSON states it as `parallel_tolerance_nats`.

    python -m eval.streaming --ckpt out/<run> [--n-sink 4] [--window W] [--tokens 20000] [--bos]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from . import HelpFormatter, fail, flags_of, keep_other_result, nonnegative_int, positive_int, with_flags, write_json
from .cli import add_lm_arguments, bos_id, checkpoint_info, for_each_checkpoint
from .progress import progress
from .result import EvalResult

MODES = ("window", "sinks", "recompute")
# How far the parallel form's mean NLL may sit from --exact-decode's, per weights dtype: float rounding
# only (the two sum the same terms in another order). Measured: fp32 1.4e-6 nats at most over 324
# cases; bf16 / fp16 up to 3.3e-3. A ppl difference inside exp(tolerance) is no result.
PARALLEL_TOLERANCE = {"float32": 1e-5, "float64": 1e-9, "bfloat16": 5e-3, "float16": 5e-3}
RECOMPUTE_WINDOWS = 1000  # --recompute-stride auto: about this many recomputed windows
ORDERS = ("reference", "evict-first")


def cache_bytes(cache) -> int:
    """Bytes resident in a cache: K and V of every layer, or linear attention's state."""
    return cache.nbytes()


@torch.inference_mode()
def stream_nll(model, tokens: torch.Tensor, cache, chunk: int = 1, desc: str = "streaming") -> dict:
    """Feed `tokens` (1-D) through `cache`, `chunk` tokens per call; NLL of each next token (len N-1).
    chunk > 1 needs a cache that takes many tokens per call as if fed one at a time: the sink
    cache's band form, a full cache or linear attention's state (a plain sink cache would let a
    chunk's queries see more than its capacity).

    Returns {"nll": np.ndarray, "seconds", "cache_tokens_peak", "cache_bytes_peak"}.
    """
    if chunk > 1 and cache.capacity is not None and not cache.is_band:
        raise ValueError("a sink cache fed chunk > 1 tokens per call is not token-by-token streaming; "
                         "use make_cache(n_sink, window, band=True)")
    device = next(model.parameters()).device
    ids = tokens.to(device).long()
    n = ids.shape[0] - 1
    nll = torch.empty(n, device=device)
    peak = 0
    t0 = time.perf_counter()
    with progress(n, desc) as bar:
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = model(ids[None, start:end], cache=cache).logits[0]
            nll[start:end] = F.cross_entropy(logits.float(), ids[start + 1 : end + 1], reduction="none")
            # tokens a query attends to: the band form keeps the next query's context, itself not yet in
            peak = max(peak, min(len(cache) + 1, cache.seen) if cache.is_band else len(cache))
            bar.update(end - start)
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
    with progress(head + len(ends), "streaming recompute") as bar:
        bar.update(head)
        for chunk in ends.split(batch_size) if len(ends) else ():
            windows = torch.stack([tokens[t - context + 1 : t + 1] for t in chunk.tolist()])
            last = model(windows).logits[:, -1]
            nll[chunk] = F.cross_entropy(last, tokens[chunk + 1], reduction="none")
            bar.update(len(chunk))
    out = nll.cpu().numpy()
    seconds = time.perf_counter() - t0
    return {"nll": out, "seconds": seconds, "cache_tokens_peak": context, "cache_bytes_peak": None}


def _summary(res: dict, cache: str, method: str) -> dict:
    nll = res["nll"]
    scored = np.isfinite(nll)
    mean = float(nll[scored].mean())
    return {
        "cache": cache,
        "method": method,
        "ppl": float(np.exp(mean)),
        "mean_nll": mean,
        "n_scored": int(scored.sum()),
        "tokens_per_s": int(scored.sum()) / res["seconds"],
        "seconds": res["seconds"],
        "cache_tokens_peak": res["cache_tokens_peak"],
        "cache_bytes_peak": res["cache_bytes_peak"],
    }


MAX_BINS = 1000  # per-position NLL in the JSON: at most this many bins per mode
LOG_SCALE_FROM = 50  # streams longer than this many times the keys per query get log-spaced bins


def position_bins(n: int, keys_per_query: int) -> tuple[np.ndarray, str]:
    """Bin edges over predictions 0..n: equal widths, or log-spaced for long streams (where
    eviction would sit in the first percent of a linear axis). Returns (edges, scale)."""
    if n > LOG_SCALE_FROM * keys_per_query:
        edges = np.unique(np.round(np.geomspace(1, n, MAX_BINS)).astype(np.int64))
        return np.concatenate(([0], edges)), "log"
    return np.unique(np.linspace(0, n, min(n, MAX_BINS) + 1).round().astype(np.int64)), "linear"


def binned_nll(curves: dict, n: int, keys_per_query: int) -> dict:
    """Mean NLL per position bin and mode, and each mode minus a baseline (recompute when it ran,
    else sinks) on the positions the baseline scored. NaN (unscored) -> null in the JSON."""
    edges, scale = position_bins(n, keys_per_query)

    def per_bin(values):
        out = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            part = values[lo:hi]
            part = part[np.isfinite(part)]
            out.append(float(part.mean()) if len(part) else None)
        return out

    binned = {"scale": scale, "bin_start": edges[:-1].tolist(), "bin_end": edges[1:].tolist(),
              "nll": {mode: per_bin(nll) for mode, nll in curves.items()}}
    baseline = next((m for m in ("recompute", "sinks") if m in curves), None)
    if baseline is not None and len(curves) > 1:
        binned["baseline"] = baseline
        binned["minus_baseline"] = {mode: per_bin(nll - curves[baseline])
                                    for mode, nll in curves.items() if mode != baseline}
    return binned


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
    nll_by_position: dict
    chunk: int | None = None
    notes: str | None = None
    text: str | None = None
    process_peak_rss_mb: float | None = None
    dtype: str | None = None
    parallel_tolerance_nats: float | None = None
    _curves: dict = field(default_factory=dict, repr=False)  # mode -> per-token NLL array

    AXES = {"ppl_window": "window-only perplexity", "ppl_sinks": "sinks perplexity"}

    DEFINITIONS = {
        "ppl": "exp(mean NLL of each next token) over the scored positions",
        "window": "window attention, cache = the S+W most recent tokens (0+(S+W)): the same total cache as sinks",
        "sinks": "StreamingLLM: S first tokens + W most recent, keys re-rotated at cache positions",
        "recompute": "sliding window with recomputation over the last keys_per_query tokens (quality reference)",
        "recurrent": "linear attention: exact recurrent state over the whole text (no window)",
        "method": "parallel: the sink cache's exact parallel form, chunk queries per forward, each seeing what "
                  "the token-by-token cache held when it was decoded (equal to exact-decode up to float rounding); "
                  "exact-decode: one token per forward (the reference); chunked state: linear attention's "
                  "recurrent state fed chunk tokens at a time; batched windows: recompute",
        "chunk": "queries per forward in the parallel form (null with --exact-decode)",
        "order": "reference: the cache is trimmed to S+W after each forward (StreamingLLM's eval_long_ppl.py), "
                 "so a query sees S+W+1 keys; evict-first: trimmed before, S+W keys",
        "keys_per_query": "keys a query attends to once the cache is full",
        "first_eviction": "index of the first prediction (0 = predicting token 1) whose query misses a token",
        "bos_first": "the stream starts with the BOS token",
        "tokens_per_s": "scored tokens / wall seconds of the mode",
        "cache_tokens_peak": "largest number of tokens a query attends to (the token-by-token cache during a "
                             "forward; context for recompute)",
        "cache_bytes_peak": "bytes of K/V (or linear state) resident at the end, where the cache is largest",
        "nll_by_position": "mean NLL per bin of predictions [bin_start, bin_end) and mode (scale: linear bins, or "
                           f"log-spaced past {LOG_SCALE_FROM}x keys_per_query predictions; at most {MAX_BINS} bins); "
                           "minus_baseline: each mode's NLL minus the baseline's (recompute when run, else sinks) "
                           "on the positions the baseline scored",
        "dtype": "the weights' dtype the modes ran in",
        "parallel_tolerance_nats": "how far the parallel form's mean NLL may differ from --exact-decode's at this "
                                   "dtype (float rounding: 1e-5 nats in fp32, 5e-3 in bf16 / fp16, where up to "
                                   "3.3e-3 was measured); ppl ratios inside exp(this) between modes or runs are noise",
        "recompute_stride": "recompute scores every k-th prediction (the first keys_per_query all); the CLI's "
                            f"default (auto) picks k for about {RECOMPUTE_WINDOWS} windows, 1 scores every one",
        "partial": "only in <name>.partial.json: the modes finished before the eval stopped, of those asked for",
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
             bos_id: int | None = None, exact_decode: bool = False, chunk: int = 256,
             on_mode=None) -> StreamingResult:
    """Run each mode over `tokens` (1-D ids, BOS prepended when `bos_id` is given); the
    per-token NLL curves are in `result._curves`. window and sinks run in the parallel form,
    `chunk` queries per forward, unless `exact_decode`. `on_mode(result so far, mode)` is called
    as each mode finishes (the CLI prints and saves it there, so an interrupt keeps it)."""
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
    step = 1 if exact_decode else chunk
    if cfg.attention == "linear":
        modes = ("recurrent",)
    result_of = _result(model, tokens, n_sink, window, order, keys, bos_id, recompute_stride, exact_decode, chunk)
    results, curves = {}, {}
    for mode in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        method = "exact-decode" if exact_decode else "parallel"
        if mode == "recurrent":
            method = "exact-decode" if exact_decode else "chunked state"
            res, cache = stream_nll(model, tokens, model.make_cache(), step, desc=mode), "exact recurrent state"
        elif mode == "window":
            res = stream_nll(model, tokens, model.make_cache(0, n_sink + window + extra, band=not exact_decode),
                             step, desc=mode)
            cache = f"0+{n_sink + window}"
        elif mode == "sinks":
            res = stream_nll(model, tokens, model.make_cache(n_sink, window + extra, band=not exact_decode),
                             step, desc=mode)
            cache = f"{n_sink}+{window}"
        elif mode == "recompute":
            res, cache = recompute_nll(model, tokens, keys, recompute_stride, batch_size), f"recompute last {keys}"
            method = "batched windows"
        else:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        results[mode] = _summary(res, cache, method)
        if device.type == "cuda":
            results[mode]["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        curves[mode] = res["nll"]
        if on_mode is not None:
            on_mode(result_of(dict(results), dict(curves)), mode)
    return result_of(results, curves)


def _result(model, tokens, n_sink, window, order, keys, bos_id, recompute_stride, exact_decode, chunk):
    """Builds the StreamingResult of the modes run so far: `(results, curves) -> StreamingResult`."""
    cfg = model.config
    n = int(tokens.shape[0]) - 1
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def result_of(results: dict, curves: dict) -> StreamingResult:
        if "recompute" in curves and recompute_stride > 1:  # every mode on the positions recompute scored
            scored = np.isfinite(curves["recompute"])
            for mode, nll in curves.items():
                results[mode]["ppl_on_recompute_positions"] = float(np.exp(nll[scored].mean()))
        return StreamingResult(
            n_tokens=n + 1, n_predictions=n, n_sink=n_sink, window=window,
            order=order, keys_per_query=keys, first_eviction=keys, bos_first=bos_id is not None,
            block_size=cfg.block_size, recompute_stride=recompute_stride,
            attention={"kind": cfg.attention, "attn_normalize": cfg.attn_normalize, "gate": cfg.gate},
            modes=results, nll_by_position=binned_nll(curves, n, keys), chunk=None if exact_decode else chunk,
            _curves=curves, dtype=dtype, parallel_tolerance_nats=PARALLEL_TOLERANCE[dtype],
            notes="linear attention runs its exact recurrent state: no eviction, one mode" if cfg.attention == "linear" else None)

    return result_of


def plot(result: StreamingResult, path) -> None:
    """NLL over position per mode (bin means, log x for long streams), eviction start marked, and
    a panel of each mode's NLL minus the baseline's (recompute, else sinks), where curves that
    overlap in the first panel come apart."""
    from .plots import save, subplots

    binned = result.nll_by_position
    start, end = np.array(binned["bin_start"]), np.array(binned["bin_end"])
    x = (start + end - 1) / 2 if binned["scale"] == "linear" else np.sqrt(np.maximum(start, 1) * np.maximum(end - 1, 1))
    panels = [("nll", "NLL (nats), mean per bin")]
    if "minus_baseline" in binned:
        panels.append(("minus_baseline", f"NLL minus {binned['baseline']}'s (nats)"))
    fig, axes = subplots(len(panels), 1, width=8, height=3.6)
    for ax, (key, ylabel) in zip(axes[:, 0], panels):
        for mode, values in binned[key].items():
            y = np.array([np.nan if v is None else v for v in values], dtype=float)
            r, scored = result.modes[mode], np.isfinite(y)  # bins a strided recompute skipped: joined over
            ax.plot(x[scored], y[scored], lw=1, label=f"{mode} ({r['cache']}): ppl {r['ppl']:.2f}")
        if key == "minus_baseline":
            ax.axhline(0, color="black", lw=0.6)
        if result.attention["kind"] != "linear":
            ax.axvline(result.first_eviction, color="gray", ls="--", lw=0.8,
                       label=f"eviction starts (prediction {result.first_eviction})")
        if binned["scale"] == "log":
            ax.set_xscale("log")
        ax.set_xlabel("position in the stream (tokens)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(f"streaming NLL, {result.attention['kind']} (gate {result.attention['gate']}), "
                         f"{len(start)} bins")
    save(fig, path)


def long_stream(val, n_tokens: int, keys_per_query: int) -> tuple[torch.Tensor, str]:
    """The first n_tokens of the held-out split (documents concatenated); past its end the split
    starts again from its first token, as many times as needed. A query's context then never holds
    two copies of the same text as long as the split is longer than the keys a query sees.
    Returns (tokens, a sentence saying what was streamed)."""
    val = np.asarray(val)
    passes = -(-n_tokens // len(val))
    if passes > 1 and len(val) <= keys_per_query:
        raise ValueError(f"--tokens {n_tokens} needs the held-out split ({len(val)} tokens) repeated, but a query "
                         f"sees {keys_per_query} keys and would see the repeat: lower --tokens to {len(val)} or "
                         "pass a larger --data")
    tokens = np.concatenate([val] * passes)[:n_tokens] if passes > 1 else val[:n_tokens]
    text = f"first {len(tokens)} tokens of the held-out split (documents concatenated), of {len(val)} available"
    if passes > 1:
        text = (f"{len(tokens)} tokens: the held-out split (documents concatenated, {len(val)} tokens) streamed "
                f"{n_tokens / len(val):.2f} times in a row; queries never see a repeat (split > {keys_per_query} "
                "keys), but each later pass's first tokens can copy the sinks")
    return torch.from_numpy(tokens.astype(np.int64)), text


def stride_arg(text: str) -> str | int:
    return text if text == "auto" else positive_int(text)


def auto_stride(n_predictions: int, keys: int) -> int:
    """The recompute stride for about RECOMPUTE_WINDOWS windows past the first `keys` predictions."""
    return max(1, -(-(n_predictions - keys) // RECOMPUTE_WINDOWS))


def main(argv=None) -> list[StreamingResult]:
    ap = argparse.ArgumentParser(prog="python -m eval.streaming", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add_lm_arguments(ap)
    ap.add_argument("--n-sink", type=nonnegative_int, default=4, help="S: first tokens kept (sinks mode)")
    ap.add_argument("--window", type=positive_int, default=None,
                    help="W: recent tokens kept (default: block_size - S - 1, or block_size - S with evict-first; "
                         "for an hf: import its context capped at 256 in place of block_size)")
    ap.add_argument("--beyond-context", action="store_true",
                    help="allow a window whose queries see more keys than block_size (positions never trained on)")
    ap.add_argument("--order", choices=ORDERS, default="reference",
                    help="reference: trim after the forward, a query sees S+W+1 keys; evict-first: S+W")
    ap.add_argument("--bos", action="store_true", help="start the stream with the BOS token (runs trained with data.bos)")
    ap.add_argument("--tokens", type=positive_int, default=20000,
                    help="tokens to stream (default 20000); past the held-out split's end it starts again")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--exact-decode", action="store_true",
                    help="window / sinks token by token (the reference) instead of the exact parallel form")
    ap.add_argument("--chunk", type=positive_int, default=256, help="queries per forward in the parallel form")
    ap.add_argument("--recompute-stride", type=stride_arg, default="auto",
                    help=f"score every k-th position in recompute; auto (the default): k for about {RECOMPUTE_WINDOWS} windows "
                         "(20 at the default --tokens), so the default run takes minutes on a CPU; 1: every position")
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
        linear = cfg.attention == "linear"
        if keys > cfg.block_size and not linear and not args.beyond_context:
            fail(f"--window {window}: a query would see {keys} keys, more than the model's context of "
                 f"{cfg.block_size} (positions it never trained on); use --window <= "
                 f"{default_window(cfg.block_size, args.n_sink, args.order)} or pass --beyond-context")
        if "recompute" in args.modes and keys > cfg.block_size and not linear:
            fail(f"recompute needs the {keys} keys a query sees <= block_size {cfg.block_size}; "
                 "lower --window or drop recompute from --modes")
        bos = bos_id(run) if args.bos else None
        if args.bos and bos is None:
            fail(f"--bos needs a run trained with data.bos (a BOS token); {run.run_dir} has none")
        val = run.val_tokens()
        if len(val) < 2:
            fail(f"the held-out split of {run.run_dir} has {len(val)} tokens; nothing to stream")
        tokens, text = long_stream(val, args.tokens, keys)
        stride = args.recompute_stride
        if stride == "auto":
            stride = auto_stride(len(tokens) - 1 + (bos is not None), keys)
            if "recompute" in args.modes and stride > 1 and not linear:
                print(f"recompute scores one prediction in {stride} (--recompute-stride auto); "
                      "--recompute-stride 1 scores all of them, about that many times slower", flush=True)
        partial, wrote = out / "streaming.partial.json", []
        keep_other_result(partial, flags_of(args))  # an interrupted run's modes, made with other flags

        def finished(result, mode):
            """Print the mode and save what has finished, so an interrupt keeps it."""
            r = result.modes[mode]
            print(f"{mode:>10} [{r['cache']}, {r['method']}]: ppl {r['ppl']:.3f}  {r['tokens_per_s']:.0f} tok/s  "
                  f"peak cache {r['cache_tokens_peak']} tokens", flush=True)
            if len(result.modes) < len(modes):
                result.text, result.checkpoint = text, checkpoint_info(run)
                write_json(partial, with_flags({**result.to_json(), "partial": {"modes_done": list(result.modes),
                                                                                "modes_asked": list(modes)}},
                                               flags_of(args)))
                wrote.append(partial)

        modes = ("recurrent",) if linear else tuple(args.modes)
        try:
            result = evaluate(run.model, tokens, args.n_sink, window, args.modes, stride, args.batch_size,
                              args.order, bos, args.exact_decode, args.chunk, on_mode=finished)
        except KeyboardInterrupt:
            kept = f"the finished modes are in {partial}" if partial.is_file() else "no mode had finished"
            print(f"interrupted: {kept}", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        result.text = text
        result.process_peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if not args.exact_decode and not linear and {"window", "sinks"} & set(result.modes):
            print(f"the parallel form is within {result.parallel_tolerance_nats:g} nats of mean NLL of --exact-decode "
                  f"in {result.dtype} (float rounding); smaller ppl differences are noise", flush=True)
        plot(result, out / "streaming.png")
        for p in wrote[-1:]:  # this run's own partial file: the whole result follows
            p.unlink(missing_ok=True)
        return result

    return for_each_checkpoint(args, "streaming", one, headline=("ppl_window", "ppl_sinks"))


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
