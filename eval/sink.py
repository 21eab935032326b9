"""Attention-sink metrics.

* Gu et al. 2025 ("When Attention Sink Emerges in Language Models", ICLR): importance score
  alpha_k^{l,h} = 1/(T-k+1) * sum_{i=k..T} A^{l,h}_{i,k} (1-indexed) and
  Sink_k^eps = percentage of (layer, head) pairs with alpha_k^{l,h} > eps (eps = 0.3, k = 1).
* Qiu et al. 2025 ("Gated Attention", Table 4): F-Attn = mean attention probability that
  queries put on the first token.

For kinds without row normalisation (sigmoid, elu1) the model returns Gu et al.'s proxy
weights w_ij / sum_j w_ij, so both metrics mean the same thing for every attention kind.

    python -m eval.sink --ckpt out/<run> [--eps 0.3] [--n-seqs 32] [--lengths 64 block]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from .result import EvalResult

PROXY_NOTE = ("attention weights are row-normalised; for unnormalised kinds (sigmoid, elu1 without "
              "attn_normalize) they are Gu et al.'s proxy weights w/sum(w)")

N_SEQS = 32  # held-out sequences per length
LENGTHS = (64, "block")  # Gu et al. measure at T = 64; "block" = the model's context


def _stack(attn) -> torch.Tensor:
    """Accept (L,H,T,T), (L,B,H,T,T) or a per-layer list of (B,H,T,T); return (L,B,H,T,T) float."""
    if isinstance(attn, (list, tuple)):
        attn = torch.stack([a.detach().float() for a in attn])
    attn = attn.detach().float()
    if attn.dim() == 4:
        attn = attn.unsqueeze(1)
    if attn.dim() != 5 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"expected (L,H,T,T), (L,B,H,T,T) or a list of (B,H,T,T); got {tuple(attn.shape)}")
    return attn


def importance(attn, k: int = 1) -> torch.Tensor:
    """Gu et al.'s importance score alpha_k per (layer, head), shape (L, H), batch-averaged.

    alpha_k = 1/(T-k+1) * sum_{i=k..T} A_{i,k} with 1-indexed k: the average attention that the
    queries able to see token k (i >= k under the causal mask) put on it.
    """
    a = _stack(attn)
    T = a.shape[-1]
    if not 1 <= k <= T:
        raise ValueError(f"k must be in 1..T={T}, got {k}")
    column = a[..., k - 1 :, k - 1]  # (L,B,H,T-k+1): queries i = k..T on key k
    return (column.sum(-1) / (T - k + 1)).mean(1)


def sink_rate(alpha: torch.Tensor, eps: float = 0.3) -> float:
    """Sink_k^eps in percent: share of (layer, head) pairs whose importance exceeds eps."""
    return float((torch.as_tensor(alpha) > eps).float().mean() * 100)


def first_token_attention(attn) -> tuple[list[float], float]:
    """Qiu et al.'s F-Attn: mean attention probability on the first token.

    Averaged over heads, batch and *all* query positions 0..T-1, as Qiu et al. average over the
    sequence. Query 0 is included even though causally it can only attend to itself (weight 1);
    it adds at most 1/T. With this convention F-Attn of a layer = mean over heads of alpha_1.
    Returns (per-layer list, overall mean over layers).
    """
    a = _stack(attn)
    per_layer = a[..., :, 0].mean(dim=(1, 2, 3))  # (L,)
    return per_layer.tolist(), float(per_layer.mean())


def resolve_lengths(lengths, block_size: int) -> list[int]:
    """Turn e.g. (64, "block") into distinct ints, clipped to the model's context."""
    out = []
    for length in lengths:
        T = block_size if length in (None, "block") else int(length)
        T = min(T, block_size)
        if T not in out:
            out.append(T)
    return out


def _as_sequences(sequences) -> torch.Tensor:
    """(N, T) ids from a tensor/array or from an iterable of (B, T) batches."""
    if isinstance(sequences, torch.Tensor):
        return sequences.long()
    if hasattr(sequences, "shape"):  # numpy
        return torch.as_tensor(sequences).long()
    return torch.cat([torch.as_tensor(b).long() for b in sequences])


@dataclass
class SinkResult(EvalResult):
    """Sink metrics of one model; the headline numbers are at the first length (T=64 by default)."""

    sink_1: float
    f_attn: float
    headline_T: int
    eps: float
    k: int
    n_seqs: int
    lengths: list
    attention: dict
    by_length: dict
    notes: str = f"proxy weights w/sum(w) for unnormalised kinds; {PROXY_NOTE}"

    def definitions(self) -> dict:
        k = self.k
        return {
            "sink_1": f"Gu et al. Sink_{k}^eps: % of (layer, head) pairs with alpha_{k} > eps",
            f"alpha_{k}": f"Gu et al. importance of token {k} (1-indexed): mean over queries i >= {k} of "
                          f"A[i, {k}], averaged over sequences; list [layer][head]",
            "f_attn": "Qiu et al. F-Attn: mean attention on the first token over heads, sequences and all "
                      "query positions (query 0 included); per layer and mean over layers",
            "row_mass_per_layer": "mean raw row mass sum_j w_ij before normalisation (1 for softmax)",
        }


@torch.no_grad()
def evaluate(model, token_batches, lengths=LENGTHS, eps: float = 0.3, k: int = 1,
             batch_size: int = 4) -> SinkResult:
    """Sink_k^eps, alpha_k per (layer, head) and F-Attn of `model` on held-out sequences.

    `token_batches`: (N, T_max) token ids (or an iterable of (B, T) batches); each length T in
    `lengths` ("block" = the model's block size) uses the first T tokens of every sequence.
    The headline numbers (`sink_1`, `f_attn`) are at the first length: T = 64 is Gu et al.'s
    protocol. `sink_1` holds Sink_k for the `k` asked for.
    """
    seqs = _as_sequences(token_batches)
    cfg = model.config
    device = next(model.parameters()).device
    Ts = [T for T in resolve_lengths(lengths, cfg.block_size) if T <= seqs.shape[1]]
    if not Ts:
        raise ValueError(f"sequences of {seqs.shape[1]} tokens are shorter than every length in {lengths}")
    model.eval()
    by_length = {}
    for T in Ts:
        alpha_sum, f_sum, mass_sum, n = 0.0, 0.0, 0.0, 0
        for batch in seqs[:, :T].split(batch_size):
            out = model(batch.to(device), return_attn=True)
            b = batch.shape[0]
            alpha_sum = alpha_sum + importance(out.attn, k).cpu() * b
            f_sum = f_sum + torch.tensor(first_token_attention(out.attn)[0]) * b
            mass_sum = mass_sum + torch.stack([m.float().mean() for m in out.attn_mass]).cpu() * b
            n += b
        alpha, f_layers = alpha_sum / n, f_sum / n
        by_length[str(T)] = {
            "T": T,
            f"sink_{k}": sink_rate(alpha, eps),
            f"alpha_{k}": alpha.tolist(),
            "f_attn_per_layer": f_layers.tolist(),
            "f_attn": float(f_layers.mean()),
            "row_mass_per_layer": (mass_sum / n).tolist(),
        }
    head = by_length[str(Ts[0])]
    return SinkResult(
        sink_1=head[f"sink_{k}"], f_attn=head["f_attn"], headline_T=Ts[0], eps=eps, k=k,
        n_seqs=int(seqs.shape[0]), lengths=Ts,
        attention={"kind": cfg.attention, "attn_normalize": cfg.attn_normalize, "gate": cfg.gate},
        by_length=by_length)


def plot_heatmap(result: SinkResult, path) -> None:
    """Layer x head heatmap of alpha_k, one panel per sequence length."""
    from .plots import save, subplots

    k = result.k
    panels = list(result.by_length.values())
    L = len(panels[0][f"alpha_{k}"])
    H = len(panels[0][f"alpha_{k}"][0])
    fig, axes = subplots(1, len(panels), width=max(3.5, 0.5 * H + 2), height=max(3.0, 0.4 * L + 1.5))
    for ax, p in zip(axes[0], panels):
        im = ax.imshow(p[f"alpha_{k}"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        if L * H <= 256:
            for l, row in enumerate(p[f"alpha_{k}"]):
                for h, v in enumerate(row):
                    ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.5 else "white")
        ax.set_title(f"alpha_{k}, T={p['T']}: Sink_{k}^{result.eps} = {p[f'sink_{k}']:.1f}%")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    save(fig, path)


def main(argv=None) -> list[SinkResult]:
    from . import held_out_sequences
    from .checkpoints import add_lm_arguments, for_each_checkpoint

    ap = argparse.ArgumentParser(prog="python -m eval.sink", description=__doc__.split("\n\n")[0])
    add_lm_arguments(ap)
    ap.add_argument("--eps", type=float, default=0.3)
    ap.add_argument("--k", type=int, default=1, help="token whose importance is measured (1-indexed)")
    ap.add_argument("--n-seqs", type=int, default=N_SEQS)
    ap.add_argument("--lengths", nargs="+", default=[str(x) for x in LENGTHS], help='ints or "block"')
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args(argv)

    def one(run, out):
        model = run.model
        Ts = resolve_lengths([x if x == "block" else int(x) for x in args.lengths], model.config.block_size)
        seqs = held_out_sequences(run.val_tokens(), args.n_seqs, max(Ts))
        result = evaluate(model, seqs, Ts, eps=args.eps, k=args.k, batch_size=args.batch_size)
        plot_heatmap(result, out / "sink_heatmap.png")
        print(f"Sink_{args.k}^{args.eps} at T={result.headline_T}: {result.sink_1:.2f}%  F-Attn: {result.f_attn:.3f}")
        return result

    return for_each_checkpoint(args, "sink", one, headline=("sink_1", "f_attn"))


if __name__ == "__main__":
    main()
