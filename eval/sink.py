"""Attention-sink metrics.

* Gu et al. 2025 ("When Attention Sink Emerges in Language Models", ICLR), as their code
  (eval_sink_open_source.py) computes it: per sequence, the importance score
  alpha_k^{l,h} = 1/(T-k+1) * sum_{i=k..T} A^{l,h}_{i,k} (1-indexed); per sequence the share of
  (layer, head) pairs with alpha_k > eps (eps = 0.3); then the mean over sequences, in %. That is
  `sink_1`; thresholding the sequence-averaged alpha instead (`sink_1_pooled`) undercounts a
  head that sinks on some sequences only. `sink_rate_by_position` is Sink_k for k = 1..10.
* Sinks at any position (eval/sink_positions.py): per head the most-attended key (position,
  token, mass), attention per token class, the most-attended token ids.
* Qiu et al. 2025 ("Gated Attention", Table 4): F-Attn = mean attention probability that
  queries put on the first token, next to the uniform-attention value H_T / T.

For kinds without row normalisation (sigmoid, elu1, softpick) the model returns Gu et al.'s proxy
weights w_ij / sum_j w_ij, so the metrics mean the same thing for every attention kind; a softpick
row whose scores are all <= 0 has no weight at all and counts as attending to nothing (proxy 0).
When the run's data starts documents with BOS, every sequence starts with BOS here too.
The definitions shared with the in-training probe (probes/sink.py) are imported from there.

    python -m eval.sink --ckpt out/<run> [--eps 0.3] [--n-seqs 100] [--lengths 64 block]
    python -m eval.sink --run out/<run>       # Sink_1, F-Attn, max |h| ratio logged during training, over steps
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from probes.sequences import held_out_sequences
from probes.sink import (MAX_K, TRACKED, first_token_attention, importance_per_sequence, sink_rate, stack_attention,
                         text_attention)
from trainer.metrics import read_rows

from . import HelpFormatter, add_tag_argument, eval_dir, fail, positive_float, positive_int, write_json
from .cli import add_lm_arguments, bos_id, expand, for_each_checkpoint
from .progress import progress
from .backcopy import held_out_rows
from .result import PROXY_NOTE, EvalResult
from .sink_positions import PositionStats, classify_vocab

N_SEQS = 100  # held-out sequences per length, as Gu et al.
LENGTHS = (64, "block")  # Gu et al. measure at T = 64; "block" = the model's context


def extra_sink_mass(out) -> torch.Tensor | None:
    """Per layer, the mean weight that the text queries put outside the text (L,): on the learned
    tokens of model.sink_tokens (summed) and on the virtual key of model.sink_logit. None for a
    model with neither: then all of it is on the text."""
    n, slots = out.sink_tokens, out.attn_sink_slot
    if not n and slots is None:
        return None
    per_layer = []
    for l, probs in enumerate(out.attn):
        w = probs.detach().float()
        extra = torch.zeros_like(w[:, :, n:, 0])  # (B, H, text queries)
        if slots is not None:  # the slot's weight; the keys' weights are probs * (1 - slot)
            slot = slots[l][:, :, n:].detach().float()
            extra = extra + slot
            w = w * (1 - slots[l].detach().float()).unsqueeze(-1)
        if n:
            extra = extra + w[:, :, n:, :n].sum(-1)
        per_layer.append(extra.mean())
    return torch.stack(per_layer)


def importance(attn, k: int = 1) -> torch.Tensor:
    """Gu et al.'s importance score alpha_k per (layer, head), shape (L, H), batch-averaged.

    alpha_k = 1/(T-k+1) * sum_{i=k..T} A_{i,k} with 1-indexed k: the average attention that the
    queries able to see token k (i >= k under the causal mask) put on it.
    """
    a = stack_attention(attn)
    T = a.shape[-1]
    if not 1 <= k <= T:
        raise ValueError(f"k must be in 1..T={T}, got {k}")
    column = a[..., k - 1 :, k - 1]  # (L,B,H,T-k+1): queries i = k..T on key k
    return (column.sum(-1) / (T - k + 1)).mean(1)


def uniform_f_attn(T: int) -> float:
    """F-Attn of causal attention spread evenly over the visible keys: (1/T) sum_i 1/i = H_T / T."""
    return uniform_alpha(T, 1)


def uniform_alpha(T: int, k: int = 1) -> float:
    """alpha_k of causal attention spread evenly over the visible keys: 1/(T-k+1) sum_{i=k..T} 1/i."""
    return sum(1 / i for i in range(k, T + 1)) / (T - k + 1)


def check_length(T: int, k: int, eps: float) -> None:
    """Refuse a (T, k, eps) at which Sink_k says nothing: k past the sequence, or so short a
    sequence that uniform attention (an untrained model) already puts more than eps on token k."""
    if k > T:
        raise ValueError(f"--k {k} is beyond the sequence length T={T}; use --k <= {T} or longer --lengths")
    if uniform_alpha(T, k) > eps:
        shortest = next(t for t in range(T + 1, 10 * T + 10_000) if uniform_alpha(t, k) <= eps)
        raise ValueError(f"at T={T} uniform attention already gives alpha_{k} = {uniform_alpha(T, k):.2f} > eps "
                         f"{eps:g}, so every head would count as a sink; use --lengths >= {shortest} or a larger --eps")


def resolve_lengths(lengths, block_size: int, block: int | None = None) -> list[int]:
    """Turn e.g. (64, "block") into distinct ints, clipped to the model's context; "block" is
    `block` (an import's evaluation context, LoadedRun.eval_block_size), else block_size."""
    out = []
    for length in lengths:
        T = (block or block_size) if length in (None, "block") else int(length)
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
    sink_1_raw: float
    sink_1_pooled: float
    f_attn: float
    f_attn_raw: float
    f_attn_uniform: float
    sink_rate_by_position: list
    sink_any: float
    headline_T: int
    eps: float
    k: int
    n_seqs: int
    bos_first: bool
    lengths: list
    attention: dict
    by_length: dict
    notes: str = PROXY_NOTE
    AXES = {"sink_1": "Sink_1^0.3 at headline_T (% of heads)", "sink_any": "Sink^0.3 at any position (% of heads)",
            "f_attn": "F-Attn at headline_T (weight on token 1)"}

    def definitions(self) -> dict:
        k = self.k
        return {
            "sink_1": f"Gu et al. Sink_{k}^eps as their code computes it: per sequence, % of (layer, head) pairs "
                      f"with alpha_{k} > eps; mean over sequences (at headline_T); renormalised weights",
            "sink_1_raw": f"the same on the raw weights (what the model puts on token {k}: below the renormalised "
                          "value when a sink logit's slot or a learned sink token takes weight)",
            "sink_1_pooled": f"% of (layer, head) pairs whose alpha_{k} averaged over sequences exceeds eps",
            f"alpha_{k}": f"Gu et al. importance of token {k} (1-indexed): mean over queries i >= {k} of "
                          f"A[i, {k}], averaged over sequences; list [layer][head]",
            "sink_rate_by_position": f"Sink_k^eps (per-sequence rule) for k = 1..{MAX_K}: list index k-1",
            "sink_any": "% of (sequence, layer, head) whose most-attended key receives a share > eps of the "
                        "sequence's attention, wherever that key is (share_j = 1/T sum_i A_ij)",
            "top_keys": "per [layer][head] over sequences: the most frequent most-attended key position and token "
                        "id, how often each is the most-attended one, and the mean share of that key",
            "attention_by_token_class": "per token class (bos/end-of-text, newline, punctuation, other): share of "
                                        "all attention received (mean over layers and heads) and share of positions",
            "most_attended_tokens": "token ids receiving the most attention in total (share of all attention)",
            "f_attn": "Qiu et al. F-Attn: mean attention on the first token over heads, sequences and all "
                      "query positions (query 0 included); per layer and mean over layers; renormalised weights",
            "f_attn_raw": "the same on the raw weights",
            "weights": PROXY_NOTE,
            "f_attn_uniform": "F-Attn of uniform causal attention at the same T: H_T / T",
            "row_mass_per_layer": "mean raw row mass sum_j w_ij before normalisation (1 for softmax)",
            "extra_sink_mass_per_layer": "mean weight of the text queries outside the text: on model.sink_tokens' "
                                         "learned tokens (summed) plus model.sink_logit's virtual key; per layer "
                                         "(null without either fix). Sink_1 and F-Attn are read on the text keys: "
                                         "renormalised over them for a sink logit, the text's share for sink tokens",
            "extra_sink_mass": "extra_sink_mass_per_layer averaged over layers",
            "bos_first": "every sequence starts with the BOS token: the default when the run's data starts "
                         "documents with BOS, so sequences look like training windows (Gu et al. evaluate on "
                         "windows of their training text, which has no BOS); --no-bos feeds plain windows",
        }


@torch.no_grad()
def evaluate(model, token_batches, lengths=LENGTHS, eps: float = 0.3, k: int = 1,
             batch_size: int = 4, tokenizer=None, bos_id: int | None = None) -> SinkResult:
    """Sink_k^eps (per sequence, then averaged), Sink_1..10, sinks at any position and F-Attn of
    `model` on held-out sequences.

    `token_batches`: (N, T_max) token ids (or an iterable of (B, T) batches); each length T in
    `lengths` ("block" = the model's block size) uses the first T tokens of every sequence.
    The headline numbers are at the first length: T = 64 is Gu et al.'s protocol. `sink_1`
    holds Sink_k for the `k` asked for. `tokenizer` names the tokens (classes, texts); `bos_id`
    counts as end-of-text and is recorded as `bos_first` when every sequence starts with it.
    """
    seqs = _as_sequences(token_batches)
    cfg = model.config
    device = next(model.parameters()).device
    Ts = [T for T in resolve_lengths(lengths, cfg.block_size) if T <= seqs.shape[1]]
    if not Ts:
        raise ValueError(f"sequences of {seqs.shape[1]} tokens are shorter than every length in {lengths}")
    if k > min(Ts):
        raise ValueError(f"--k {k} is beyond the sequence length T={min(Ts)}; use --k <= {min(Ts)} or longer --lengths")
    classes, texts = classify_vocab(tokenizer, cfg.vocab_size, [] if bos_id is None else [bos_id])
    model.eval()
    by_length = {}
    bar = progress(sum(seqs.shape[0] * T for T in Ts), "eval.sink")
    for T in Ts:
        alphas, alphas_raw, f_sum, f_raw_sum, mass_sum, extra_sum, n = [], [], 0.0, 0.0, 0.0, None, 0
        positions = PositionStats(cfg.vocab_size, eps)
        for batch in seqs[:, :T].split(batch_size):
            out = model(batch.to(device), return_attn=True)
            a, a_raw = text_attention(out), text_attention(out, raw=True)
            b = batch.shape[0]
            alphas.append(importance_per_sequence(a, max(MAX_K, k)).cpu())
            alphas_raw.append(importance_per_sequence(a_raw, k)[k - 1 :].cpu())
            f_sum = f_sum + torch.tensor(first_token_attention(a)[0]) * b
            f_raw_sum = f_raw_sum + torch.tensor(first_token_attention(a_raw)[0]) * b
            mass_sum = mass_sum + torch.stack([m[:, :, out.sink_tokens :].float().mean() for m in out.attn_mass]).cpu() * b
            extra = extra_sink_mass(out)
            if extra is not None:
                extra_sum = (0.0 if extra_sum is None else extra_sum) + extra.cpu() * b
            positions.add(a, batch)
            n += b
            bar.update(b * T)
        alpha = torch.cat(alphas, dim=2)  # (K, L, N, H)
        alpha_raw = torch.cat(alphas_raw, dim=2)[0]  # (L, N, H), k only
        f_layers, f_raw_layers = f_sum / n, f_raw_sum / n
        by_length[str(T)] = {
            "T": T,
            f"sink_{k}": sink_rate(alpha[k - 1], eps),
            f"sink_{k}_raw": sink_rate(alpha_raw, eps),
            f"sink_{k}_pooled": sink_rate(alpha[k - 1].mean(1), eps),
            f"alpha_{k}": alpha[k - 1].mean(1).tolist(),
            f"alpha_{k}_raw": alpha_raw.mean(1).tolist(),
            "sink_rate_by_position": [sink_rate(a_k, eps) for a_k in alpha[:MAX_K]],
            "sink_any": positions.sink_any(),
            "top_keys": positions.top_keys(),
            "attention_by_token_class": positions.by_class(classes),
            "most_attended_tokens": positions.top_tokens(texts),
            "f_attn_per_layer": f_layers.tolist(),
            "f_attn": float(f_layers.mean()),
            "f_attn_raw_per_layer": f_raw_layers.tolist(),
            "f_attn_raw": float(f_raw_layers.mean()),
            "f_attn_uniform": uniform_f_attn(T),
            "row_mass_per_layer": (mass_sum / n).tolist(),
            "extra_sink_mass_per_layer": None if extra_sum is None else (extra_sum / n).tolist(),
            "extra_sink_mass": None if extra_sum is None else float((extra_sum / n).mean()),
        }
    bar.close()
    head = by_length[str(Ts[0])]
    return SinkResult(
        sink_1=head[f"sink_{k}"], sink_1_raw=head[f"sink_{k}_raw"], sink_1_pooled=head[f"sink_{k}_pooled"],
        f_attn=head["f_attn"], f_attn_raw=head["f_attn_raw"],
        f_attn_uniform=head["f_attn_uniform"], sink_rate_by_position=head["sink_rate_by_position"],
        sink_any=head["sink_any"], headline_T=Ts[0], eps=eps, k=k, n_seqs=int(seqs.shape[0]),
        bos_first=bos_id is not None and bool((seqs[:, 0] == bos_id).all()), lengths=Ts,
        attention={"kind": cfg.attention, "attn_normalize": cfg.attn_normalize, "gate": cfg.gate},
        by_length=by_length)


def emergence(run_dir) -> dict:
    """The rows of <run>/metrics.jsonl that carry `measure`'s keys, as {key: [(step, value)]}."""
    from pathlib import Path

    curves = {k: [] for k in TRACKED}
    for row in read_rows(Path(run_dir) / "metrics.jsonl"):  # a torn last line (a killed run) is dropped
        for k in TRACKED:
            if row.get(k) is not None and "step" in row:
                curves[k].append((int(row["step"]), float(row[k])))
    return curves


def probe_lengths(run_dir) -> list[int]:
    """The sequence lengths the training probe measured at (its rows' probe_T; none in older runs)."""
    from pathlib import Path

    return sorted({int(r["probe_T"]) for r in read_rows(Path(run_dir) / "metrics.jsonl") if r.get("probe_T")})


EMERGENCE_AXES = {"sink_1": "Sink_1^0.3 (%)", "f_attn": "F-Attn (mean weight on the first token)",
                  "max_h_ratio": "max |h| / median |h|"}


def plot_emergence(curves: dict, path, run_name: str = "", probe_T: list[int] | None = None) -> None:
    """One panel per tracked quantity over the training step; Sink_1 in % from 0 to 100, F-Attn from
    0, the |h| ratio on a log axis only when it spans more than two decades."""
    from .plots import save, subplots

    fig, axes = subplots(1, len(TRACKED), width=4.5, height=3.5)
    for ax, key in zip(axes[0], TRACKED):
        if curves[key]:
            ax.plot(*zip(*curves[key]), marker=".")
        ax.set_xlabel("training step")
        ax.set_ylabel(EMERGENCE_AXES[key])
        ax.set_title(key + (f" (training probe, T={', '.join(map(str, probe_T))})" if probe_T else ""))
    axes[0, 0].set_ylim(0, 100)
    axes[0, 1].set_ylim(bottom=0)
    ratios = [v for _, v in curves["max_h_ratio"] if v > 0 and v != float("inf")]
    if ratios and max(ratios) / min(ratios) > 100:
        axes[0, 2].set_yscale("log")
    else:
        axes[0, 2].set_ylim(bottom=0)
    if run_name:
        fig.suptitle(f"{run_name}: sink rows logged during training")
    save(fig, path)


def plot_heatmap(result: SinkResult, path) -> None:
    """Layer x head heatmap of alpha_k, one panel per sequence length, and Sink_k against k."""
    from .plots import save, subplots

    k = result.k
    panels = list(result.by_length.values())
    L = len(panels[0][f"alpha_{k}"])
    H = len(panels[0][f"alpha_{k}"][0])
    fig, axes = subplots(1, len(panels) + 1, width=max(3.5, 0.5 * H + 2), height=max(3.0, 0.4 * L + 1.5))
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
        ax.set_xlabel("head (0-indexed)")
        ax.set_ylabel("layer (0-indexed, as layers.N)")
        fig.colorbar(im, ax=ax)
    ax = axes[0, -1]
    for p in panels:
        ks = range(1, len(p["sink_rate_by_position"]) + 1)
        ax.plot(ks, p["sink_rate_by_position"], marker="o", label=f"T={p['T']}")
    ax.set_xlabel("k (token position, 1-indexed)")
    ax.set_ylabel(f"Sink_k^{result.eps} (%)")
    ax.set_title("sink rate by position")
    ax.legend(fontsize=8)
    save(fig, path)


def length_arg(text: str) -> str:
    """A --lengths value: "block" or a positive integer (kept as text; resolved per model)."""
    return text if text == "block" else str(positive_int(text))


def main(argv=None) -> list[SinkResult]:
    if argv is None:
        argv = sys.argv[1:]
    if any(a == "--run" or a.startswith("--run=") for a in argv):  # the emergence curve from the rows logged in training
        return main_emergence(argv)
    ap = argparse.ArgumentParser(prog="python -m eval.sink", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter, epilog="python -m eval.sink --run RUN plots the sink rows logged during training "
                                        "(the emergence curve) to RUN/eval/sink_emergence.png")
    add_lm_arguments(ap)
    ap.add_argument("--eps", type=positive_float, default=0.3)
    ap.add_argument("--k", type=positive_int, default=1, help="token whose importance is measured (1-indexed)")
    ap.add_argument("--n-seqs", type=positive_int, default=N_SEQS)
    ap.add_argument("--lengths", nargs="+", type=length_arg, default=[str(x) for x in LENGTHS],
                    help='ints or "block" (the block size; an hf: import\'s context capped at 256)')
    ap.add_argument("--batch-size", type=positive_int, default=4)
    ap.add_argument("--no-bos", action="store_true",
                    help="plain held-out windows even when the run's data starts documents with BOS")
    args = ap.parse_args(argv)
    for x in args.lengths:  # "block" is checked once the model's context is known
        if x != "block":
            try:
                check_length(int(x), args.k, args.eps)
            except ValueError as e:
                fail(str(e))

    def one(run, out):
        model = run.model
        Ts = resolve_lengths([x if x == "block" else int(x) for x in args.lengths], model.config.block_size,
                             run.eval_block_size)
        for T in Ts:
            check_length(T, args.k, args.eps)  # ValueError: one line, before any forward
        bos = None if args.no_bos else bos_id(run)
        if run.config.get("data", {}).get("source") == "bigram_backcopy" and bos is not None:
            seqs = held_out_rows(run, args.n_seqs, max(Ts))[0]
        else:
            seqs = held_out_sequences(run.val_tokens(), args.n_seqs, max(Ts), bos_id=bos)
        result = evaluate(model, seqs, Ts, eps=args.eps, k=args.k, batch_size=args.batch_size,
                          tokenizer=run.tokenizer, bos_id=bos)
        plot_heatmap(result, out / "sink_heatmap.png")
        print(f"Sink_{args.k}^{args.eps} at T={result.headline_T}: {result.sink_1:.2f}% (raw weights {result.sink_1_raw:.2f}%, "
              f"pooled {result.sink_1_pooled:.2f}%, any position {result.sink_any:.2f}%)  F-Attn: {result.f_attn:.3f} "
              f"(raw {result.f_attn_raw:.3f}, uniform {result.f_attn_uniform:.3f})")
        extra = result.by_length[str(result.headline_T)]["extra_sink_mass"]
        if extra is not None:
            print(f"attention outside the text (sink tokens / sink logit): {extra:.3f} of every text query's weight")
        return result

    return for_each_checkpoint(args, "sink", one, headline=("sink_1", "sink_any", "f_attn"))


def main_emergence(argv) -> list[dict]:
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m eval.sink --run", description="Sink_1, F-Attn and max |h| ratio "
                                 "logged during training (metrics.jsonl), plotted over steps")
    ap.add_argument("--run", nargs="+", required=True, help="run directories (or globs) with metrics.jsonl")
    add_tag_argument(ap)
    args = ap.parse_args(argv)
    runs = expand(args.run)
    for run in runs:  # every run is checked before anything is written
        if not (Path(run) / "metrics.jsonl").is_file():
            fail(f"{Path(run) / 'metrics.jsonl'} not found: --run must be a training run directory")
    results = []
    for run in runs:
        metrics = Path(run) / "metrics.jsonl"
        try:
            curves = emergence(run)
        except (OSError, ValueError) as e:
            fail(f"{metrics}: {e}")
        if not any(curves.values()):
            fail(f"{metrics} has no rows with {', '.join(TRACKED)}; they are logged when training tracks sinks")
        out = eval_dir(run, args.tag)
        result = {"run": str(run), "curves": {k: [list(p) for p in v] for k, v in curves.items()},
                  "probe_T": probe_lengths(run),
                  "definitions": {"probe_T": "the sequence lengths the training probe measured at (block_size); "
                                             "eval.sink's sink_1 / f_attn headline is at T=64, so they differ",
                                  "sink_1": "Gu et al. Sink_1^0.3 in %, per sequence then averaged (probes.sink.measure)",
                                  "f_attn": "Qiu et al. F-Attn: mean attention on the first token",
                                  "max_h_ratio": "largest over layers of max |h| / median |h| of the residual stream",
                                  "curves": "per key, [step, value] rows from metrics.jsonl"}}
        write_json(out / "sink_emergence.json", result)
        plot_emergence(curves, out / "sink_emergence.png", Path(run).resolve().name, result["probe_T"])
        print(f"-> {out / 'sink_emergence.png'}")
        results.append(result)
    return results


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
