"""Guo et al. 2024's sink measure: how much queries attend to BOS, split by query kind.

On Bigram-Backcopy a query right after a trigger character must look back (copy the token
before the trigger); every other query has nothing to find and, once the sink forms, parks
its attention on BOS (Guo et al.: 0.02 at init -> 0.51 by step 260 -> 0.78 by step 1k for
non-trigger queries of their 1-layer model). For text sources with a BOS token there are no
triggers and every query counts as non-trigger.

With model.sink_tokens the learned tokens' rows and columns are left out (BOS is the first text
key) and the weight on them is reported as `extra_sink_mass_*`, as is the weight of
model.sink_logit's virtual key.

Next to it, Sink_1 as Gu et al. compute it per sequence: the share of (layer, head) pairs whose
mean attention from every query on key 0 exceeds eps, averaged over sequences (in %; eval.sink's).

    python -m eval.backcopy --ckpt out/<run> [out/<run>/checkpoints/step_0000100 ...] [--n-seqs 64]
"""
from __future__ import annotations

import argparse

import torch

from probes.sink import importance_per_sequence, sink_rate

from . import fail


def _probs(layer) -> torch.Tensor:
    """A layer's (B, H, T, T) weights, from a tensor or an object with `.probs`."""
    return (layer.probs if hasattr(layer, "probs") else layer).detach().float()


QUERY_KINDS = ("non_trigger", "trigger")
N_SEQS = 64  # held-out sequences of block_size tokens


def query_kind_sums(per_query: torch.Tensor, tokens: torch.Tensor, trigger_ids) -> dict[str, tuple[torch.Tensor, int]]:
    """Per query kind: (sum over queries i >= 1 of `per_query`, per (layer, head) as an (L, H)
    tensor; number of such queries). per_query: (L, B, H, T-1) values of queries 1..T-1; the query
    *at* a trigger is the one that must copy; tokens: the (B, T) input ids."""
    queries = tokens[:, 1:]
    is_trigger = torch.isin(queries, torch.as_tensor(list(trigger_ids), dtype=queries.dtype, device=queries.device))
    out = {}
    for kind, mask in zip(QUERY_KINDS, (~is_trigger, is_trigger)):
        w = mask.unsqueeze(1).to(per_query.dtype)  # (B, 1, T-1)
        out[kind] = ((per_query * w).sum((1, 3)).cpu(), int(mask.sum()))
    return out


def bos_attention_sums(attn, tokens: torch.Tensor, trigger_ids) -> dict[str, tuple[torch.Tensor, int]]:
    """query_kind_sums of the attention on key 0; attn: per layer (B, H, T, T) weights."""
    return query_kind_sums(torch.stack([_probs(layer)[:, :, 1:, 0] for layer in attn]), tokens, trigger_ids)


def extra_sink_mass(out) -> torch.Tensor | None:
    """(L, B, H, T-1): the weight text queries 1..T-1 put outside the text, on model.sink_tokens'
    learned tokens or on model.sink_logit's virtual key; None when the model has neither."""
    n = out.sink_tokens
    if n:
        return torch.stack([_probs(a)[:, :, n + 1 :, :n].sum(-1) for a in out.attn])
    if out.attn_sink_slot and out.attn_sink_slot[0] is not None:
        return torch.stack([s.detach().float()[:, :, 1:] for s in out.attn_sink_slot])
    return None


def bos_attention(attn, tokens: torch.Tensor, trigger_ids) -> dict[str, torch.Tensor]:
    """Guo et al.'s measure: mean attention on BOS per (layer, head), by query kind (NaN where
    no query of that kind occurs)."""
    return {kind: s / n if n else torch.full_like(s, float("nan"))
            for kind, (s, n) in bos_attention_sums(attn, tokens, trigger_ids).items()}


def sink_1(attn, eps: float = 0.3) -> float:
    """Gu et al.'s Sink_1^eps in %, exactly as eval.sink computes it (per sequence, then the mean)."""
    return sink_rate(importance_per_sequence([_probs(layer) for layer in attn], max_k=1)[0], eps)


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, trigger_ids, eps: float = 0.3, batch_size: int = 16) -> dict:
    """BOS attention by query kind and Sink_1 of `model` on (N, T) BOS-first sequences."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"need (N, T >= 2) token ids, got shape {tuple(tokens.shape)}")
    device = next(model.parameters()).device
    model.eval()
    sums, counts, sink_sum = {k: 0.0 for k in QUERY_KINDS}, {k: 0 for k in QUERY_KINDS}, 0.0
    extra_sums = {k: 0.0 for k in QUERY_KINDS}
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        out = model(batch, return_attn=True)
        n = out.sink_tokens  # learned sink tokens come first: BOS is key n
        attn = [a[:, :, n:, n:] for a in out.attn]
        for kind, (s, c) in bos_attention_sums(attn, batch, trigger_ids).items():
            sums[kind], counts[kind] = sums[kind] + s, counts[kind] + c
        extra = extra_sink_mass(out)
        if extra is not None:
            for kind, (s, _) in query_kind_sums(extra, batch, trigger_ids).items():
                extra_sums[kind] = extra_sums[kind] + s
        sink_sum += sink_1(attn, eps) * batch.shape[0]
    result = {"sink_1": sink_sum / tokens.shape[0], "eps": eps, "n_seqs": int(tokens.shape[0]),
              "T": int(tokens.shape[1]), "trigger_ids": list(trigger_ids)}
    for kind in QUERY_KINDS:
        mean = sums[kind] / counts[kind] if counts[kind] else torch.full_like(sums["non_trigger"], float("nan"))
        result[f"bos_attention_{kind}"] = mean.tolist()
        result[f"bos_attention_{kind}_mean"] = float(mean.mean())
        result[f"n_queries_{kind}"] = counts[kind]
        if torch.is_tensor(extra_sums[kind]):
            extra = extra_sums[kind] / counts[kind] if counts[kind] else torch.full_like(mean, float("nan"))
            result[f"extra_sink_mass_{kind}"] = extra.tolist()
            result[f"extra_sink_mass_{kind}_mean"] = float(extra.mean())
    result["definitions"] = {
        "bos_attention_non_trigger": "Guo et al.: mean attention on key 0 (BOS) of queries i >= 1 whose token is "
                                     "not a trigger; list [layer][head]",
        "bos_attention_trigger": "the same for queries whose token is a trigger (they must copy)",
        "extra_sink_mass_non_trigger": "mean weight of the same queries on model.sink_tokens' learned tokens "
                                       "(summed) or on model.sink_logit's virtual key; list [layer][head]",
        "sink_1": "Gu et al. Sink_1^eps per sequence: % of (layer, head) pairs with mean attention of all "
                  "queries on key 0 above eps, averaged over sequences (eval.sink's definition)",
    }
    return result


def data_dir(run):
    """The run's prepared data dir (prepared again if the cache is gone)."""
    from configs import from_dict
    from data.prepare import prepare

    return prepare(from_dict({"data": run.config["data"]}).data, progress=False)


def held_out_rows(run, n_seqs: int, T: int) -> tuple[torch.Tensor, list[int]]:
    """(n_seqs, T) BOS-first held-out rows of a run's data (the loader's fixed eval windows, the same
    for every checkpoint and every variant on that data) and the trigger ids ([] for text)."""
    import json

    from data.loader import make_loader

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
    from data.bigram_backcopy import generate

    return generate(chain, 1, n_tokens, torch.Generator().manual_seed(STREAM_SEED))[0]

def main(argv=None) -> list[dict]:
    import json

    from runs.load import load_run

    from . import eval_dir, pick_device, write_json

    ap = argparse.ArgumentParser(prog="python -m eval.backcopy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", nargs="+", required=True, help="run dirs or checkpoint dirs (e.g. for dynamics)")
    ap.add_argument("--n-seqs", type=int, default=N_SEQS)
    ap.add_argument("--length", default="block", help='sequence length T, or "block" for the model\'s block size')
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    results = []
    for path in args.ckpt:
        try:
            run = load_run(path, task="lm")
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
        model = run.model.to(pick_device(args.device))
        T = model.config.block_size if args.length == "block" else min(int(args.length), model.config.block_size)
        try:
            x, trigger_ids = held_out_rows(run, args.n_seqs, T)
        except ValueError as e:
            fail(f"{path}: {e}")
        result = evaluate(model, x, trigger_ids, eps=args.eps)
        step = json.loads((run.checkpoint / "trainer_state.json").read_text())["step"]
        result.update(checkpoint=str(run.checkpoint), step=step)
        write_json(eval_dir(run.run_dir) / f"backcopy_step_{step}.json", result)
        print(f"{run.run_dir.name} step {step}: Sink_1^{args.eps} {result['sink_1']:.1f}%  BOS attention: "
              f"non-trigger {result['bos_attention_non_trigger_mean']:.3f}, "
              f"trigger {result['bos_attention_trigger_mean']:.3f} (mean over layers and heads)")
        results.append(result)
    return results


if __name__ == "__main__":
    main()
