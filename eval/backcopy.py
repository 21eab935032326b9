"""Guo et al. 2024's sink measure: how much queries attend to BOS, split by query kind.

On Bigram-Backcopy a query right after a trigger character must look back (copy the token
before the trigger); every other query has nothing to find and, once the sink forms, parks
its attention on BOS (Guo et al.: 0.02 at init -> 0.51 by step 260 -> 0.78 by step 1k for
non-trigger queries of their 1-layer model). For text sources with a BOS token there are no
triggers and every query counts as non-trigger.

Next to it, Sink_1 as Gu et al. compute it per sequence: the share of (layer, head) pairs whose
mean attention from queries i >= 1 on key 0 exceeds eps, averaged over sequences (in %).

    python -m eval.backcopy --ckpt out/<run> [out/<run>/checkpoints/step_0000100 ...] [--n-seqs 64]
"""
from __future__ import annotations

import argparse

import torch

from . import fail


def _probs(layer) -> torch.Tensor:
    """A layer's (B, H, T, T) weights, from a tensor or an object with `.probs`."""
    return (layer.probs if hasattr(layer, "probs") else layer).detach().float()


QUERY_KINDS = ("non_trigger", "trigger")


def bos_attention_sums(attn, tokens: torch.Tensor, trigger_ids) -> dict[str, tuple[torch.Tensor, int]]:
    """Per query kind: (sum over queries i >= 1 of their attention on key 0, per (layer, head)
    as an (L, H) tensor; number of such queries). The query *at* a trigger is the one that
    must copy; attn: per layer (B, H, T, T) weights; tokens: the (B, T) input ids."""
    queries = tokens[:, 1:]
    is_trigger = torch.isin(queries, torch.as_tensor(list(trigger_ids), dtype=queries.dtype, device=queries.device))
    on_bos = torch.stack([_probs(layer)[:, :, 1:, 0] for layer in attn])  # (L, B, H, T-1)
    out = {}
    for kind, mask in zip(QUERY_KINDS, (~is_trigger, is_trigger)):
        w = mask.unsqueeze(1).to(on_bos.dtype)  # (B, 1, T-1)
        out[kind] = ((on_bos * w).sum((1, 3)).cpu(), int(mask.sum()))
    return out


def bos_attention(attn, tokens: torch.Tensor, trigger_ids) -> dict[str, torch.Tensor]:
    """Guo et al.'s measure: mean attention on BOS per (layer, head), by query kind (NaN where
    no query of that kind occurs)."""
    return {kind: s / n if n else torch.full_like(s, float("nan"))
            for kind, (s, n) in bos_attention_sums(attn, tokens, trigger_ids).items()}


def sink_1(attn, eps: float = 0.3) -> float:
    """Gu et al.'s Sink_1^eps in %: per sequence, the share of (layer, head) pairs whose mean
    attention of queries i >= 1 on key 0 exceeds eps; then the mean over sequences."""
    alpha = torch.stack([_probs(layer)[:, :, 1:, 0].mean(-1) for layer in attn], 1)  # (B, L, H)
    return float((alpha > eps).float().mean((1, 2)).mean() * 100)


@torch.no_grad()
def evaluate(model, tokens: torch.Tensor, trigger_ids, eps: float = 0.3, batch_size: int = 16) -> dict:
    """BOS attention by query kind and Sink_1 of `model` on (N, T) BOS-first sequences."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"need (N, T >= 2) token ids, got shape {tuple(tokens.shape)}")
    device = next(model.parameters()).device
    model.eval()
    sums, counts, sink_sum = {k: 0.0 for k in QUERY_KINDS}, {k: 0 for k in QUERY_KINDS}, 0.0
    for batch in tokens.split(batch_size):
        attn = model(batch.to(device), return_attn=True).attn
        for kind, (s, n) in bos_attention_sums(attn, batch.to(device), trigger_ids).items():
            sums[kind], counts[kind] = sums[kind] + s, counts[kind] + n
        sink_sum += sink_1(attn, eps) * batch.shape[0]
    result = {"sink_1": sink_sum / tokens.shape[0], "eps": eps, "n_seqs": int(tokens.shape[0]),
              "T": int(tokens.shape[1]), "trigger_ids": list(trigger_ids)}
    for kind in QUERY_KINDS:
        mean = sums[kind] / counts[kind] if counts[kind] else torch.full_like(sums["non_trigger"], float("nan"))
        result[f"bos_attention_{kind}"] = mean.tolist()
        result[f"bos_attention_{kind}_mean"] = float(mean.mean())
        result[f"n_queries_{kind}"] = counts[kind]
    result["definitions"] = {
        "bos_attention_non_trigger": "Guo et al.: mean attention on key 0 (BOS) of queries i >= 1 whose token is "
                                     "not a trigger; list [layer][head]",
        "bos_attention_trigger": "the same for queries whose token is a trigger (they must copy)",
        "sink_1": "Gu et al. Sink_1^eps per sequence: % of (layer, head) pairs with mean attention of queries "
                  "i >= 1 on key 0 above eps, averaged over sequences",
    }
    return result


def main(argv=None) -> list[dict]:
    import json

    from configs import from_dict
    from data.loader import make_loader
    from data.prepare import prepare
    from model.load import load_run

    from . import eval_dir, pick_device, write_json

    ap = argparse.ArgumentParser(prog="python -m eval.backcopy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", nargs="+", required=True, help="run dirs or checkpoint dirs (e.g. for dynamics)")
    ap.add_argument("--n-seqs", type=int, default=64)
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
        data_cfg = from_dict({"data": run.config["data"]}).data
        data_dir = prepare(data_cfg, progress=False)
        meta = json.loads((data_dir / "meta.json").read_text())
        if meta.get("bos_id") is None:
            fail(f"{path} was trained without a BOS token; this measure needs BOS-first sequences (data.bos=true)")
        model = run.model.to(pick_device(args.device))
        T = model.config.block_size if args.length == "block" else min(int(args.length), model.config.block_size)
        # BOS-first held-out rows, the same for every checkpoint of a run.
        x, _ = next(make_loader(data_dir, "val", args.n_seqs, T, run.config["seed"]).eval_windows(args.n_seqs))
        result = evaluate(model, x, meta.get("trigger_ids", []), eps=args.eps)
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
