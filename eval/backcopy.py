"""Guo et al. 2024's sink measure: how much queries attend to BOS, split by query kind.

On Bigram-Backcopy a query right after a trigger character must look back (copy the token
before the trigger); every other query has nothing to find and, once the sink forms, parks
its attention on BOS (Guo et al.: 0.02 at init -> 0.51 by step 260 -> 0.78 by step 1k for
non-trigger queries of their 1-layer model). For text sources with a BOS token there are no
triggers and every query counts as non-trigger.

Every query counts, the BOS query itself included, as in Guo et al.'s measure. With
model.sink_tokens the learned tokens' rows and columns are left out (BOS is the first text key)
and the weight on them is reported as `extra_sink_mass_*`, as is the weight of
model.sink_logit's virtual key. Each number comes on two scales: renormalised over the text
keys (rows sum to 1 for every fix) and raw (`*_raw`: the weight the model actually puts on BOS).

Next to it, Sink_1 as Gu et al. compute it per sequence: the share of (layer, head) pairs whose
mean attention from every query on key 0 exceeds eps, averaged over sequences (in %; eval.sink's).

    python -m eval.backcopy --ckpt out/<run> [out/<run>/checkpoints/step_0000100 ...] [--n-seqs 64]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from configs import from_dict
from data.bigram_backcopy import generate
from data.loader import make_loader
from data.prepare import prepare
from probes.sink import importance_per_sequence, sink_rate, text_attention

from . import (HelpFormatter, add_tag_argument, eval_dir, fail, flags_of, keep_other_result, nonnegative_int, positive_float,
               positive_int, with_flags, write_json)
from .cli import check_paths, checkpoint_info, expand, load
from .progress import progress
from .result import PROXY_NOTE, EvalResult


def _probs(layer) -> torch.Tensor:
    """A layer's (B, H, T, T) weights, from a tensor or an object with `.probs`."""
    return (layer.probs if hasattr(layer, "probs") else layer).detach().float()


QUERY_KINDS = ("non_trigger", "trigger")
SCALES = ("", "_raw")  # renormalised over the text keys, and raw (probes.sink.text_attention)
N_SEQS = 64  # held-out sequences of block_size tokens


def query_kind_sums(per_query: torch.Tensor, tokens: torch.Tensor, trigger_ids) -> dict[str, tuple[torch.Tensor, int]]:
    """Per query kind: (sum over queries of `per_query`, per (layer, head) as an (L, H) tensor;
    number of such queries). per_query: (L, B, H, T) values of queries 0..T-1; the query *at* a
    trigger is the one that must copy, every other one (BOS at query 0 included) is non-trigger;
    tokens: the (B, T) input ids."""
    is_trigger = torch.isin(tokens, torch.as_tensor(list(trigger_ids), dtype=tokens.dtype, device=tokens.device))
    out = {}
    for kind, mask in zip(QUERY_KINDS, (~is_trigger, is_trigger)):
        w = mask.unsqueeze(1).to(per_query.dtype)  # (B, 1, T)
        out[kind] = ((per_query * w).sum((1, 3)).cpu(), int(mask.sum()))
    return out


def bos_attention_sums(attn, tokens: torch.Tensor, trigger_ids) -> dict[str, tuple[torch.Tensor, int]]:
    """query_kind_sums of the attention on key 0 of every query, the BOS query itself included
    (Guo et al.'s measure); attn: per layer (B, H, T, T) weights."""
    return query_kind_sums(torch.stack([_probs(layer)[:, :, :, 0] for layer in attn]), tokens, trigger_ids)


def extra_sink_mass(out) -> torch.Tensor | None:
    """(L, B, H, T): the raw weight text queries put outside the text, on model.sink_tokens'
    learned tokens or on model.sink_logit's virtual key; None when the model has neither."""
    n = out.sink_tokens
    if n:
        return torch.stack([_probs(a)[:, :, n:, :n].sum(-1) for a in out.attn])
    if out.attn_sink_slot and out.attn_sink_slot[0] is not None:
        return torch.stack([s.detach().float() for s in out.attn_sink_slot])
    return None


def bos_attention(attn, tokens: torch.Tensor, trigger_ids) -> dict[str, torch.Tensor]:
    """Guo et al.'s measure: mean attention on BOS per (layer, head), by query kind (NaN where
    no query of that kind occurs)."""
    return {kind: s / n if n else torch.full_like(s, float("nan"))
            for kind, (s, n) in bos_attention_sums(attn, tokens, trigger_ids).items()}


def sink_1(attn, eps: float = 0.3) -> float:
    """Gu et al.'s Sink_1^eps in %, exactly as eval.sink computes it (per sequence, then the mean)."""
    return sink_rate(importance_per_sequence([_probs(layer) for layer in attn], max_k=1)[0], eps)


@dataclass
class BackcopyResult(EvalResult):
    """Guo et al.'s BOS attention by query kind and Sink_1 of one model; lists are [layer][head]."""

    sink_1: float
    sink_1_raw: float
    eps: float
    n_seqs: int
    T: int
    trigger_ids: list
    bos_attention_non_trigger: list
    bos_attention_non_trigger_mean: float
    bos_attention_non_trigger_raw: list
    bos_attention_non_trigger_raw_mean: float
    n_queries_non_trigger: int
    bos_attention_trigger: list
    bos_attention_trigger_mean: float
    bos_attention_trigger_raw: list
    bos_attention_trigger_raw_mean: float
    n_queries_trigger: int
    # only with model.sink_tokens or model.sink_logit
    extra_sink_mass_non_trigger: list | None = None
    extra_sink_mass_non_trigger_mean: float | None = None
    extra_sink_mass_trigger: list | None = None
    extra_sink_mass_trigger_mean: float | None = None
    step: int | None = None  # the checkpoint's training step, set by the CLI beside `checkpoint`
    OPTIONAL = ("extra_sink_mass_non_trigger", "extra_sink_mass_non_trigger_mean", "extra_sink_mass_trigger",
                "extra_sink_mass_trigger_mean", "step")

    DEFINITIONS = {
        "bos_attention_non_trigger": "Guo et al.: mean attention on key 0 (BOS) of every query whose token is not a "
                                     "trigger, the BOS query itself included; renormalised weights; list [layer][head]",
        "bos_attention_non_trigger_raw": "the same on the raw weights (what the model puts on BOS)",
        "bos_attention_trigger": "the same for queries whose token is a trigger (they must copy)",
        "extra_sink_mass_non_trigger": "raw weight of the same queries on model.sink_tokens' learned tokens "
                                       "(summed) or on model.sink_logit's virtual key; list [layer][head]",
        "sink_1": "Gu et al. Sink_1^eps per sequence: % of (layer, head) pairs with mean attention of all "
                  "queries on key 0 above eps, averaged over sequences (eval.sink's definition); renormalised weights",
        "sink_1_raw": "the same on the raw weights",
        "weights": PROXY_NOTE,
    }


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, trigger_ids, eps: float = 0.3, batch_size: int = 16) -> BackcopyResult:
    """BOS attention by query kind and Sink_1 of `model` on (N, T) BOS-first sequences, each on the
    renormalised and on the raw weights (probes.sink.text_attention)."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"need (N, T >= 2) token ids, got shape {tuple(tokens.shape)}")
    device = next(model.parameters()).device
    model.eval()
    sums = {(kind, sc): 0.0 for kind in QUERY_KINDS for sc in SCALES}
    counts, sink_sum = {k: 0 for k in QUERY_KINDS}, {sc: 0.0 for sc in SCALES}
    extra_sums = {k: 0.0 for k in QUERY_KINDS}
    bar = progress(tokens.numel(), "eval.backcopy")
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        out = model(batch, return_attn=True)
        for sc in SCALES:
            attn = text_attention(out, raw=sc == "_raw")  # (L, B, H, T, T): BOS is key 0
            for kind, (s, c) in query_kind_sums(attn[..., :, 0], batch, trigger_ids).items():
                sums[kind, sc] = sums[kind, sc] + s
                if not sc:  # the same queries on both scales
                    counts[kind] += c
            sink_sum[sc] += sink_rate(importance_per_sequence(attn, max_k=1)[0], eps) * batch.shape[0]
        extra = extra_sink_mass(out)
        if extra is not None:
            for kind, (s, _) in query_kind_sums(extra, batch, trigger_ids).items():
                extra_sums[kind] = extra_sums[kind] + s
        bar.update(batch.numel())
    bar.close()
    values = {"sink_1": sink_sum[""] / tokens.shape[0], "sink_1_raw": sink_sum["_raw"] / tokens.shape[0], "eps": eps,
              "n_seqs": int(tokens.shape[0]), "T": int(tokens.shape[1]), "trigger_ids": list(trigger_ids)}
    nan = torch.full_like(sums["non_trigger", ""], float("nan"))
    for kind in QUERY_KINDS:
        for sc in SCALES:
            mean = sums[kind, sc] / counts[kind] if counts[kind] else nan
            values[f"bos_attention_{kind}{sc}"] = mean.tolist()
            values[f"bos_attention_{kind}{sc}_mean"] = float(mean.mean())
        values[f"n_queries_{kind}"] = counts[kind]
        if torch.is_tensor(extra_sums[kind]):
            extra = extra_sums[kind] / counts[kind] if counts[kind] else nan
            values[f"extra_sink_mass_{kind}"] = extra.tolist()
            values[f"extra_sink_mass_{kind}_mean"] = float(extra.mean())
    return BackcopyResult(**values)


def data_dir(run):
    """The run's prepared data dir (prepared again if the cache is gone)."""
    return prepare(from_dict({"data": run.config["data"]}).data, progress=False)


def held_out_rows(run, n_seqs: int, T: int) -> tuple[torch.Tensor, list[int]]:
    """(n_seqs, T) BOS-first held-out rows of a run's data (the loader's fixed eval windows, the same
    for every checkpoint and every variant on that data) and the trigger ids ([] for text)."""
    import json

    prepared = data_dir(run)
    meta = json.loads((prepared / "meta.json").read_text())
    if meta.get("bos_id") is None:
        raise ValueError("the run was trained without a BOS token; this measure needs BOS-first sequences (data.bos=true)")
    x, _ = next(make_loader(prepared, "val", n_seqs, T, run.config["seed"]).eval_windows(n_seqs))
    return x, meta.get("trigger_ids", [])


STREAM_SEED = 20240101  # the long streaming sequence: fixed, and apart from the loader's (seed, split, step) keys


def long_stream(chain, n_tokens: int) -> torch.Tensor:
    """One Bigram-Backcopy sequence of `n_tokens` ids from `chain` (data.bigram_backcopy.Chain),
    BOS only at its start (the process continues past any block size): eval.streaming's
    held-out stream for this data. Deterministic: torch.Generator seeded with STREAM_SEED."""
    return generate(chain, 1, n_tokens, torch.Generator().manual_seed(STREAM_SEED))[0]

def length_arg(text: str) -> str:
    """--length: "block" or an integer >= 2 (one query after BOS at least)."""
    if text == "block":
        return text
    value = nonnegative_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (BOS and one query) or \"block\", got {text}")
    return text


def main(argv=None) -> list[BackcopyResult]:
    ap = argparse.ArgumentParser(prog="python -m eval.backcopy", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--ckpt", nargs="+", required=True,
                    help="run dirs, checkpoint dirs or globs such as 'out/<run>/checkpoints/step_*' (for dynamics)")
    ap.add_argument("--n-seqs", type=positive_int, default=N_SEQS)
    ap.add_argument("--length", type=length_arg, default="block",
                    help='sequence length T >= 2, or "block" for the model\'s block size')
    ap.add_argument("--eps", type=positive_float, default=0.3)
    ap.add_argument("--device", default=None)
    add_tag_argument(ap)
    args = ap.parse_args(argv)
    flags = flags_of(args)
    paths = expand(args.ckpt)
    for path in paths:
        if path.startswith("hf:"):
            fail(f"--ckpt {path}: eval.backcopy needs a run trained on BOS-first data (data.source=bigram_backcopy "
                 "or data.bos=true) and reads its prepared data; an hf: import has neither. Use eval.sink on it")
    check_paths(paths)

    results = []
    for path in paths:
        run = load(path, args)
        model = run.model
        T = model.config.block_size if args.length == "block" else min(int(args.length), model.config.block_size)
        try:
            x, trigger_ids = held_out_rows(run, args.n_seqs, T)
        except ValueError as e:
            fail(f"{path}: {e}")
        info = checkpoint_info(run)
        target = eval_dir(run.run_dir, args.tag) / f"backcopy_step_{info['step']}.json"
        keep_other_result(target, flags)
        result = evaluate(model, x, trigger_ids, eps=args.eps)
        result.checkpoint, result.step = info, info["step"]
        out = write_json(target, with_flags(result.to_json(), flags))
        print(f"{run.run_dir.name} step {info['step']}: Sink_1^{args.eps} {result.sink_1:.1f}% "
              f"(raw {result.sink_1_raw:.1f}%)  BOS attention: non-trigger "
              f"{result.bos_attention_non_trigger_mean:.3f} (raw {result.bos_attention_non_trigger_raw_mean:.3f}), "
              f"trigger {result.bos_attention_trigger_mean:.3f} (mean over layers and heads)\n-> {out}")
        results.append(result)
        del run  # one model in memory at a time
    return results


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
