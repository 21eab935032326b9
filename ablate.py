"""Ablation report: train (or collect) a grid of variants on the same data, steps and seed, run
the evals on each and write one markdown table plus JSON and plots (docs/design.md, "Evals").

    python ablate.py --configs configs/ablate/*.yaml --steps 300 [--out out/ablate]
    python ablate.py --runs out/a out/b [--out out/ablate]
    python ablate.py --configs configs/ablate/*.yaml --lrs 1e-3 3e-3 1e-2   # each variant at its best lr
    python ablate.py --configs configs/sinks/*.yaml --seeds 1 2 3 --threads 1 2   # mean and spread

A grid (`--lrs`, `--seeds`, several `--threads`) trains every config at every combination, as
`<name>_lr<lr>_s<seed>_t<threads>` (only the parts given); with --lrs the schedule is scaled with
the peak (min_lr / lr kept). The table then shows each variant at the lr whose mean held-out loss
over its seeds and thread counts is lowest, names that lr and lists the others' losses; with
several seeds or thread counts, a second table gives each variant's mean, standard deviation and
range over them.

Training goes through `python train.py` in a subprocess per variant (so each run is exactly
what a user gets from the command line); a variant already trained to `--steps` is reused
(train.resume=auto), so an interrupted ablation continues where it stopped. `--steps` shorter than
10x a config's warmup scales the warmup to a tenth of the steps (said; `--set train.warmup_steps=N`
chooses). The table has a no-context baseline beside val loss: the unigram loss of the held-out
tokens under the training split's token counts. Each run's checkpoint
and held-out tokens are loaded once and every eval's library function runs on them. Per run: final
val loss, Sink_1 and F-Attn on renormalised and raw weights (eval.sink, T=64), max |h|
(eval.activations, plain held-out windows as its CLI), OLMo-core's total spike score (eval.spikes,
W=128, k=6), streaming perplexity window-only vs sinks (eval.streaming) and training tokens/s.
ablation.md starts with what was run and defines every column. On Bigram-Backcopy (data.source=bigram_backcopy) the sink evals use the
task's BOS-first held-out sequences, Guo et al.'s BOS attention and the mass on sink tokens or
the sink logit's slot join the table (eval.backcopy), and streaming runs over one long sequence
of the process with BOS only at its start (eval.backcopy.long_stream).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from configs import ConfigError, from_dict, load_config
from data.bigram_backcopy import load_chain
from data.loader import TokenSplit
from data.prepare import prepare
from eval import (HelpFormatter, activations, backcopy, eval_dir, fail, make_dir, nonnegative_int, positive_float,
                  positive_int, quantize, sink, spikes, streaming, write_json, write_text)
from eval.cli import bos_id, checkpoint_info, expand, git_commit
from eval.plots import save, subplots
from eval.progress import progress
from probes.sequences import held_out_sequences
from runs.load import load_run, resolve_checkpoint
from trainer.metrics import read_rows
from util import pick_device

ROOT = Path(__file__).resolve().parent
BIGRAM_BACKCOPY = "bigram_backcopy"  # data.source of Guo et al.'s task: eval.backcopy's measures join the table


def scaled_warmup(warmup: int, steps: int) -> int:
    """--steps shorter than 10x the config's warmup: warm up over a tenth of them (at least one step), so
    a short ablation is not all warmup (50 warmup steps of 20 never reach the peak lr)."""
    return min(warmup, max(1, steps // 10))


def grid(lrs=None, seeds=None, threads=None) -> list[dict]:
    """Every combination of the given lrs, seeds and thread counts, as {"lr", "seed", "threads"}
    (None where that axis is not given); one empty point without a grid."""
    return [{"lr": lr, "seed": seed, "threads": t}
            for lr in (lrs or [None]) for seed in (seeds or [None]) for t in (threads or [None])]


def point_overrides(cfg, point: dict, several_threads: bool) -> list[str]:
    """train.py overrides and the run name of one grid point: lr with min_lr scaled alike (the
    schedule's shape kept), seed, and a name suffix per axis given."""
    ov, name = [], cfg.name
    if point["lr"] is not None:
        ov += [f"train.lr={point['lr']:g}", f"train.min_lr={cfg.train.min_lr * point['lr'] / cfg.train.lr:g}"]
        name += f"_lr{point['lr']:g}"
    if point["seed"] is not None:
        ov.append(f"seed={point['seed']}")
        name += f"_s{point['seed']}"
    if several_threads:
        name += f"_t{point['threads']}"
    return [*ov, f"name={name}"] if name != cfg.name else ov


def plan_runs(configs, steps, out_dir, overrides, points=None, several_threads=False) -> list[tuple[Path, list[str], dict]]:
    """(run dir, train.py argv, grid point with the config's own name as "base") per config and grid
    point; every config is validated before any training."""
    plans = []
    for c in configs:
        ov = [f"out_dir={out_dir}", *([f"train.max_steps={steps}"] if steps else []), *overrides]
        try:
            cfg = load_config(c, ov)
            warmup = scaled_warmup(cfg.train.warmup_steps, steps) if steps else cfg.train.warmup_steps
            if warmup != cfg.train.warmup_steps and not any(o.startswith("train.warmup_steps=") for o in overrides):
                print(f"{c}: train.warmup_steps={warmup} (the config's {cfg.train.warmup_steps}, scaled to --steps "
                      f"{steps}; --set train.warmup_steps=N to choose)", flush=True)
                ov.insert(2, f"train.warmup_steps={warmup}")
                cfg = load_config(c, ov)
            for point in points or grid():
                pov = [*ov, *point_overrides(cfg, point, several_threads)]
                run_cfg = load_config(c, pov)
                plans.append((Path(run_cfg.out_dir) / run_cfg.name, ["--config", str(c), *pov],
                              {**point, "base": cfg.name, "max_steps": run_cfg.train.max_steps}))
        except (ConfigError, FileNotFoundError, ValueError) as e:
            fail(f"{c}: {e}")
    names = [p[0] for p in plans]
    if len(set(names)) != len(names):
        fail(f"two configs write the same run dir ({names}); give each config a distinct `name:`")
    return plans


def train(run_dir: Path, argv: list[str], threads: int | None = None, max_steps: int | None = None) -> None:
    print(f"== training {run_dir.name}: python train.py {' '.join(argv)}", flush=True)
    env = dict(os.environ)
    if threads:  # on a shared CPU, oversubscribed threads spin: 1 thread was ~15x faster here
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    rc = subprocess.call([sys.executable, str(ROOT / "train.py"), *argv, "logging.progress=false"], cwd=ROOT, env=env)
    if rc != 0:
        fail(f"training {run_dir} failed with exit code {rc}; see its output above")
    if max_steps is not None and (reached := trained_steps(run_dir)) < max_steps:  # stopped by a signal: exit 0, unfinished
        fail(f"training {run_dir} stopped at step {reached} of {max_steps} (interrupted); "
             "run the same command again to continue it")


def trained_steps(run_dir: Path) -> int:
    """The step of the run's newest checkpoint (trainer_state.json), 0 when it has none."""
    try:
        state = Path(resolve_checkpoint(run_dir)) / "trainer_state.json"
        return int(json.loads(state.read_text()).get("step") or 0)
    except (FileNotFoundError, ValueError):
        return 0


def read_run_metrics(run_dir: Path) -> dict:
    """Final val loss, val-loss curve, train-loss curve and median training tok/s from metrics.jsonl."""
    try:
        rows = read_rows(run_dir / "metrics.jsonl")  # a torn last line (a killed run) is dropped
    except (OSError, ValueError) as e:
        fail(f"{run_dir}: {e}")
    train_rows = {r["step"]: r for r in rows if "loss" in r and r.get("split", "train") == "train"}
    val_rows = {r["step"]: r["val_loss"] for r in rows if r.get("split") == "val"}
    tok_s = [r["tok_per_s"] for s, r in sorted(train_rows.items()) if r.get("tok_per_s")]
    tok_s = tok_s[len(tok_s) // 10 :]  # skip the first 10%: warm-up of allocator and threads
    return {
        "val_loss": val_rows[max(val_rows)] if val_rows else None,
        "val_curve": sorted(val_rows.items()),
        "train_curve": [(s, r["loss"]) for s, r in sorted(train_rows.items())],
        "train_tok_per_s": statistics.median(tok_s) if tok_s else None,
        "steps": max(train_rows) if train_rows else 0,
    }


def evaluate_run(run_dir: Path, stream_tokens: int, stream_modes: list[str], recompute_stride: int) -> dict:
    """Every eval on one run, loading its checkpoint and held-out tokens once; each eval's JSON
    and plot go under <run>/eval/ablate/ as its CLI writes them with --tag ablate."""
    print(f"== evaluating {run_dir.name}", flush=True)
    try:
        run = load_run(run_dir, pick_device(), task="lm")
        val = run.val_tokens()
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    # its own folder (as --tag ablate): the CLIs' results of other flags in <run>/eval/ stay as they are
    model, out, info = run.model, eval_dir(run_dir, "ablate"), checkpoint_info(run)
    cfg = model.config

    def save(name, result):
        result.checkpoint = info
        write_json(out / f"{name}.json", result.to_json())
        return result

    Ts = sink.resolve_lengths(sink.LENGTHS, cfg.block_size)
    bos = bos_id(run)
    guo = None
    if run.config["data"].get("source") == BIGRAM_BACKCOPY:
        # Guo et al.'s task: BOS-first sequences of the process (eval.backcopy's rows), and for
        # streaming one long sequence with BOS only at its start.
        sink_rows, trigger_ids = backcopy.held_out_rows(run, sink.N_SEQS, max(Ts))
        stream = backcopy.long_stream(load_chain(backcopy.data_dir(run)), stream_tokens)
        # the same rows as `python -m eval.backcopy` (its default count), so the numbers agree
        guo_rows = backcopy.held_out_rows(run, backcopy.N_SEQS, cfg.block_size)[0]
        guo = save("backcopy", backcopy.evaluate(model, guo_rows, trigger_ids))
    else:
        sink_rows = held_out_sequences(val, sink.N_SEQS, max(Ts), bos_id=bos)
        stream = torch.from_numpy(np.asarray(val[:stream_tokens]).astype(np.int64))
    # as `python -m eval.activations` (Sun et al.): plain held-out windows, no BOS put in front
    act_rows = held_out_sequences(val, activations.N_SEQS, cfg.block_size)
    s = save("sink", sink.evaluate(model, sink_rows, Ts, tokenizer=run.tokenizer, bos_id=bos))
    sink.plot_heatmap(s, out / "sink_heatmap.png")
    act = save("activations", activations.evaluate(model, act_rows, tokenizer=run.tokenizer))
    activations.plot(act, out / "activations.png")
    quant = save("quantize", quantize.evaluate(model, act_rows))
    st = save("streaming", streaming.evaluate(model, stream, modes=stream_modes, recompute_stride=recompute_stride))
    streaming.plot(st, out / "streaming.png")
    sp = spikes.evaluate(run_dir / "metrics.jsonl")
    sp.checkpoint = spikes.metrics_info(run_dir)
    write_json(out / "spikes.json", sp.to_json())
    spikes.plot(sp._series, sp.metrics, out / "spikes.png")

    ppl = {name: r["ppl"] for name, r in st.modes.items()}
    return {
        "run": str(run_dir),
        "variant": run_dir.name,
        "attention": st.attention,
        **read_run_metrics(run_dir),
        "unigram_loss": unigram_loss(run, val),
        "sink_1": s.sink_1,
        "sink_1_raw": s.sink_1_raw,
        "f_attn": s.f_attn,
        "f_attn_raw": s.f_attn_raw,
        "sink_T": s.headline_T,
        "bos_attention_non_trigger": guo and guo.bos_attention_non_trigger_mean,
        "bos_attention_non_trigger_raw": guo and guo.bos_attention_non_trigger_raw_mean,
        "extra_sink_mass_non_trigger": guo and guo.extra_sink_mass_non_trigger_mean,
        "max_abs_activation": act.max_top1,
        "max_h_ratio": act.max_ratio,
        "min_matrix_entropy": act.min_matrix_entropy_normalised,
        "entropy_valley_layer": act.entropy_valley_layer,
        "quant_ppl_ratio": {m: quant.modes[m]["ppl_ratio"] for m in quantize.MODES},
        "spike_score_loss": sp.metrics.get("loss", {}).get("spike_score"),
        "spike_score_grad_norm": sp.metrics.get("grad_norm", {}).get("spike_score"),
        "spike_score_olmo_core": sp.olmo_core_spike_score,
        "stream_ppl": ppl,
        # with --recompute-stride > 1 recompute scores a subset: compare sinks on that same subset
        "stream_ppl_sinks_on_recompute_positions": st.modes.get("sinks", {}).get("ppl_on_recompute_positions"),
        "stream_tok_per_s": {name: r["tokens_per_s"] for name, r in st.modes.items()},
        "stream_tokens": st.n_tokens,
        "stream_cache": f"{st.n_sink}+{st.window}",
    }


def unigram_loss(run, val) -> float | None:
    """Cross-entropy (nats/token) of the held-out tokens under the training split's token frequencies,
    add-one smoothed over the vocabulary: the loss of a model that ignores the context. None for an
    import (no training split)."""
    if "hf" in run.config:
        return None
    try:
        train_tokens = TokenSplit(prepare(from_dict({"data": run.config["data"]}).data, progress=False), "train").tokens
    except (OSError, ValueError):
        return None  # the data source moved: the column says n/a
    vocab = run.model.config.vocab_size
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab).astype(np.float64) + 1.0
    return float(-np.log(counts[np.asarray(val, dtype=np.int64)] / counts.sum()).mean())


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def _ppl(mode):
    return lambda r: r["stream_ppl"].get(mode)


# (header, value of a row, format, definition): one entry per column of ablation.md
COLUMNS = [
    ("variant", lambda r: r["variant"], None, "the run's name"),
    ("attention", lambda r: r["attention"]["kind"], None, "model.attention"),
    ("gate", lambda r: r["attention"]["gate"], None, "model.gate"),
    ("lr", lambda r: r.get("lr"), ".0e", "--lrs: train.lr of this run, the lr whose mean held-out loss over the "
     "variant's seeds and thread counts was lowest (min_lr scaled alike)"),
    ("val loss by lr", lambda r: r.get("val_loss_by_lr"), None,
     "--lrs: the variant's mean held-out loss at every lr tried (lr: loss)"),
    ("seed", lambda r: r.get("seed"), None, "--seeds: the run's seed"),
    ("threads", lambda r: r.get("threads"), None, "--threads with several values: the run's OMP_NUM_THREADS"),
    ("val loss", lambda r: r["val_loss"], ".3f", "last val_loss row of metrics.jsonl (nats/token)"),
    ("unigram loss", lambda r: r.get("unigram_loss"), ".3f",
     "baseline: cross-entropy of the held-out tokens under the training split's token frequencies (add-one "
     "smoothed), a model that ignores the context; a val loss above it learned less than the token counts"),
    ("Sink_1 %", lambda r: r["sink_1"], ".1f",
     "Gu et al. Sink_1^0.3 in % at T=64, per sequence then averaged (eval.sink), on the renormalised weights "
     "(rows over the text keys sum to 1: sigmoid's proxy w/sum w, the sink logit's slot and sink tokens left out)"),
    ("Sink_1 % raw", lambda r: r.get("sink_1_raw"), ".1f",
     "the same on the raw weights: what the model puts on the first token (transformers' output_attentions)"),
    ("BOS att. non-trigger", lambda r: r.get("bos_attention_non_trigger"), ".3f",
     "Bigram-Backcopy only: Guo et al.'s mean attention on BOS of every query whose token is not a trigger "
     "(the BOS query included), mean over layers and heads, renormalised weights (eval.backcopy)"),
    ("BOS att. raw", lambda r: r.get("bos_attention_non_trigger_raw"), ".3f", "the same on the raw weights"),
    ("sink slot/token mass", lambda r: r.get("extra_sink_mass_non_trigger"), ".3f",
     "Bigram-Backcopy only: the same queries' raw weight on the learned sink tokens or the sink logit's slot"),
    ("F-Attn", lambda r: r["f_attn"], ".3f",
     "Qiu et al. F-Attn at T=64: mean attention on the first token over layers, heads and queries, renormalised"),
    ("F-Attn raw", lambda r: r.get("f_attn_raw"), ".3f", "the same on the raw weights"),
    ("max abs h", lambda r: r["max_abs_activation"], ".1f",
     "largest |h| of the residual stream, per sequence, averaged over 10 plain held-out windows of block size "
     "(eval.activations max_top1, Sun et al.); learned sink tokens left out"),
    ("max h / median", lambda r: r.get("max_h_ratio"), ".0f",
     "largest over layers of max |h| / median |h| per sequence, averaged (eval.activations max_ratio)"),
    ("entropy valley", lambda r: r.get("min_matrix_entropy"), ".3f",
     "Queipo-de-Llano et al.'s matrix-based entropy of the hidden states (eigenvalues of X X^T / tr, uncentred), "
     "divided by log min(T, C), at the block where it is lowest (eval.activations, the same windows)"),
    ("W4 ppl / fp32", lambda r: (r.get("quant_ppl_ratio") or {}).get("w4"), ".3f",
     "eval.quantize: held-out perplexity with every block linear's weights int4 (per output channel, symmetric "
     "round-to-nearest) over the fp32 perplexity, on the same windows"),
    ("W8A8 ppl / fp32", lambda r: (r.get("quant_ppl_ratio") or {}).get("w8a8"), ".3f",
     "the same with int8 weights and int8 inputs at every block linear (dynamic per-tensor absmax scale): "
     "where massive activations hurt"),
    ("OLMo-core spike score %", lambda r: r.get("spike_score_olmo_core"), ".2f",
     "OLMo-core's SpikeScore (total): % of all logged steps where loss or grad norm exceeds mean + 6 std of its "
     "previous 128 values (eval.spikes); n/a below 128 steps"),
    ("stream ppl window-only", _ppl("window"), ".2f",
     "eval.streaming perplexity with a window-only cache of 0+(S+W) tokens"),
    ("stream ppl sinks", _ppl("sinks"), ".2f", "the same with S sink tokens + W recent ones (StreamingLLM)"),
    ("stream ppl recompute", _ppl("recompute"), ".2f",
     "a fresh forward over the last keys a streaming query sees, scored at every --recompute-stride-th position "
     "(the lab's quality reference, not a StreamingLLM mode)"),
    ("stream ppl sinks, recompute's positions", lambda r: r.get("stream_ppl_sinks_on_recompute_positions"), ".2f",
     "sinks-mode ppl on the positions recompute scored: the fair comparison with the recompute column"),
    ("stream ppl recurrent", _ppl("recurrent"), ".2f", "linear attention: its exact recurrent state over the stream"),
    ("train tok/s", lambda r: r["train_tok_per_s"], ".0f", "median training tokens/s over steps after the first 10%"),
]


def best_lr(rows: list[dict]) -> list[dict]:
    """The rows of each variant (row["base"]) at the lr whose mean val loss over the variant's runs
    at that lr is lowest; each kept row gets "val_loss_by_lr". Rows without an lr pass through."""
    by_base: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if r.get("lr") is not None and r["val_loss"] is not None:
            by_base.setdefault(r["base"], {}).setdefault(r["lr"], []).append(r["val_loss"])
    kept = []
    for r in rows:
        losses = by_base.get(r.get("base"))
        if r.get("lr") is None or not losses:
            kept.append(r)
            continue
        means = {lr: statistics.mean(v) for lr, v in losses.items()}
        if r["lr"] == min(means, key=means.get):
            kept.append({**r, "val_loss_by_lr": ", ".join(f"{lr:g}: {m:.3f}" for lr, m in sorted(means.items()))})
    return kept


SPREAD = [  # (key, header, format): what the spread table summarises over seeds and thread counts
    ("sink_1", "Sink_1 %", ".1f"),
    ("bos_attention_non_trigger", "BOS att. non-trigger", ".3f"),
    ("f_attn", "F-Attn", ".3f"),
    ("val_loss", "val loss", ".3f"),
]
SINK_AIM = 20.0  # Sink_1 % a run must reach to count as "formed a sink" in the spread table


def spread(rows: list[dict]) -> list[dict]:
    """Per variant (row["base"]): how many runs, and mean, sample standard deviation, min and max
    of each SPREAD quantity over them; runs with Sink_1 >= SINK_AIM counted."""
    out = []
    for base in dict.fromkeys(r["base"] for r in rows):
        group = [r for r in rows if r["base"] == base]
        entry = {"variant": base, "runs": len(group), "sink_ge_aim": sum(r["sink_1"] >= SINK_AIM for r in group),
                 "seeds": sorted({r.get("seed") for r in group} - {None}),
                 "threads": sorted({r.get("threads") for r in group} - {None})}
        for key, _, _ in SPREAD:
            vals = [r[key] for r in group if r.get(key) is not None]
            if vals:
                entry[key] = {"mean": statistics.mean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                              "min": min(vals), "max": max(vals)}
        out.append(entry)
    return out


def spread_markdown(entries: list[dict]) -> list[str]:
    keys = [k for k in SPREAD if any(k[0] in e for e in entries)]
    lines = ["", "Over seeds and thread counts (mean ± sample sd [min, max]):", "",
             "| variant | runs | seeds | threads | " + " | ".join(h for _, h, _ in keys) + f" | runs with Sink_1 >= {SINK_AIM:g}% |",
             "|" + "|".join(["---"] * (5 + len(keys))) + "|"]
    for e in entries:
        cells = []
        for key, _, f in keys:
            v = e.get(key)
            cells.append("n/a" if v is None else
                         f"{v['mean']:{f}} ± {v['sd']:{f}} [{v['min']:{f}}, {v['max']:{f}}]")
        lines.append(f"| {e['variant']} | {e['runs']} | {' '.join(map(str, e['seeds'])) or '-'} | "
                     f"{' '.join(map(str, e['threads'])) or '-'} | " + " | ".join(cells) + f" | {e['sink_ge_aim']} / {e['runs']} |")
    return lines


def markdown(rows: list[dict], settings: dict | None = None, spread_entries: list[dict] | None = None) -> str:
    """ablation.md: what was run, one table (columns that are n/a for every row left out), and the
    definition of every column shown."""
    cols = [c for c in COLUMNS if any(c[1](r) is not None for r in rows)]
    lines = []
    if settings:
        lines += ["# Ablation", "", f"Command: `{settings['command']}`", ""]
        lines += [f"- configs: {', '.join(settings['configs']) or 'none (collected runs)'}",
                  f"- runs: {', '.join(settings['run_dirs'])}",
                  f"- steps: {settings['steps'] or 'as each config sets'}",
                  f"- overrides: {' '.join(settings['overrides']) or 'none'}",
                  f"- streaming: {settings['stream_tokens']} tokens, modes {', '.join(settings['stream_modes'])}, "
                  f"recompute stride {settings['recompute_stride']}",
                  *([f"- grid: lrs {settings.get('lrs')}, seeds {settings.get('seeds')}, threads {settings.get('threads')}"]
                    if settings.get("lrs") or settings.get("seeds") or len(settings.get("threads") or []) > 1 else []),
                  f"- commit: {settings['git_commit'] or 'unknown'}", ""]
    lines += ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c[1](r)) if c[2] is None else _fmt(c[1](r), c[2]) for c in cols) + " |")
    if spread_entries:
        lines += spread_markdown(spread_entries)
    if settings:
        lines += ["", "Columns:", ""] + [f"- **{c[0]}**: {c[3]}" for c in cols]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    """Loss curves, then one panel per sink quantity (Sink_1 %, F-Attn) with each bar's value
    written on it, so a 0% bar still reads as a measured zero."""
    fig, axes = subplots(1, 3, width=5.5, height=4)
    ax = axes[0, 0]
    for r in rows:
        (line,) = ax.plot(*zip(*r["train_curve"]), lw=0.7, alpha=0.6, label=f"{r['variant']} train")
        if r["val_curve"]:
            ax.plot(*zip(*r["val_curve"]), marker="o", color=line.get_color(), label=f"{r['variant']} val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("training and validation loss")
    ax.legend(fontsize=6)
    names = [r["variant"] for r in rows]
    x = range(len(rows))
    for ax, key, label, top in ((axes[0, 1], "sink_1", "Sink_1^0.3 (%)", 100.0), (axes[0, 2], "f_attn", "F-Attn", 1.0)):
        width = 0.4
        for offset, suffix, name in ((-width / 2, "", "renormalised"), (width / 2, "_raw", "raw")):
            values = [r.get(key + suffix) for r in rows]
            bars = ax.bar([i + offset for i in x], [v or 0.0 for v in values], width, label=f"{name} weights")
            ax.bar_label(bars, labels=[_fmt(v, ".1f" if top == 100 else ".2f") for v in values], fontsize=6)
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.set_ylim(0, top)
        ax.legend(fontsize=7)
    axes[0, 1].set_title("Gu et al. Sink_1 at T=64")
    axes[0, 2].set_title("Qiu et al. first-token attention at T=64")
    save(fig, out / "ablation.png")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python ablate.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--configs", nargs="+", default=[], help="YAML configs to train, e.g. configs/ablate/*.yaml")
    ap.add_argument("--runs", nargs="+", default=[], help="already-trained run dirs to collect instead")
    ap.add_argument("--steps", type=positive_int, default=None, help="train.max_steps for every config (default: the config's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra dotted overrides applied to every config, e.g. train.batch_size=8")
    ap.add_argument("--threads", type=positive_int, nargs="+", default=None,
                    help="torch threads for training (OMP_NUM_THREADS) and evals (default: torch's); 1 on a busy CPU. "
                         "Several values train every config at each (a grid axis); the evals use the first")
    ap.add_argument("--lrs", type=positive_float, nargs="+", default=None,
                    help="train every config at each peak lr (min_lr scaled alike); the table keeps each variant "
                         "at its best mean held-out loss and says which lr won")
    ap.add_argument("--seeds", type=nonnegative_int, nargs="+", default=None,
                    help="train every config at each seed; a second table gives mean and spread over them")
    ap.add_argument("--out", default="out/ablate", help="out_dir of the trained runs and the report")
    # The eval flags are checked here, when parsing, not after hours of training.
    ap.add_argument("--stream-tokens", type=positive_int, default=2000, help="held-out tokens for eval.streaming")
    ap.add_argument("--stream-modes", nargs="+", choices=streaming.MODES, default=["window", "sinks", "recompute"])
    ap.add_argument("--recompute-stride", type=positive_int, default=4, help="eval.streaming --recompute-stride")
    args = ap.parse_args(argv)

    if not args.configs and not args.runs:
        fail("nothing to do: pass --configs configs/ablate/*.yaml to train, or --runs out/a out/b to collect")
    if args.stream_tokens < 2:
        fail(f"--stream-tokens must be >= 2 (one prediction needs two tokens), got {args.stream_tokens}")
    args.configs, args.runs = expand(args.configs), expand(args.runs)
    if args.runs and (args.lrs or args.seeds or len(args.threads or []) > 1):
        fail("--lrs, --seeds and several --threads train a grid of --configs; collected --runs are not part of one")
    for flag, values in (("--lrs", args.lrs), ("--seeds", args.seeds), ("--threads", args.threads)):
        if values and len(set(values)) != len(values):
            fail(f"{flag} {' '.join(map(str, values))} repeats a value; give each once")
    for r in args.runs:
        try:
            resolve_checkpoint(r)
        except FileNotFoundError as e:
            fail(f"--runs {r}: {e}")
        if not (Path(r) / "metrics.jsonl").is_file():
            fail(f"--runs {r}: no metrics.jsonl; pass run dirs (out/<run>), not checkpoint dirs")
    out = Path(args.out)
    several_threads = len(args.threads or []) > 1
    plans = plan_runs(args.configs, args.steps, out, args.set, grid(args.lrs, args.seeds, args.threads),
                      several_threads)
    for run_dir, train_argv, point in plans:
        train(run_dir, train_argv, point["threads"], point["max_steps"])
    run_dirs = [Path(r) for r in args.runs] + [p[0] for p in plans]
    points = [{"base": Path(r).name} for r in args.runs] + [p[2] for p in plans]
    if args.threads:
        torch.set_num_threads(args.threads[0])

    rows = []
    bar = progress(len(run_dirs), "ablate", unit="run")
    for r, point in zip(run_dirs, points):
        rows.append({**evaluate_run(r, args.stream_tokens, args.stream_modes, args.recompute_stride), **point})
        bar.update(1)
    bar.close()
    all_rows = rows
    spread_entries = spread(best_lr(rows)) if args.seeds or several_threads else None
    rows = best_lr(rows)
    make_dir(out)
    settings = {"command": " ".join(["python ablate.py", *(argv if argv is not None else sys.argv[1:])]),
                "steps": args.steps, "overrides": args.set, "configs": args.configs, "runs": args.runs,
                "run_dirs": [str(r) for r in run_dirs], "stream_tokens": args.stream_tokens,
                "stream_modes": args.stream_modes, "recompute_stride": args.recompute_stride,
                "lrs": args.lrs, "seeds": args.seeds, "threads": args.threads, "git_commit": git_commit()}
    table = markdown(rows, settings, spread_entries)
    write_text(out / "ablation.md", table)
    write_json(out / "ablation.json", {
        "rows": rows,
        "all_rows": all_rows,
        "spread": spread_entries,
        "settings": settings,
        "definitions": {
            "val_loss": "last val_loss row of metrics.jsonl (nats/token)",
            "unigram_loss": "cross-entropy of the held-out tokens under the training split's token frequencies, "
                            "add-one smoothed (nats/token): the no-context baseline for val_loss",
            "sink_1": "Gu et al. Sink_1^0.3 at T=64 in %, per sequence then averaged (eval.sink), renormalised weights",
            "sink_1_raw": "the same on the raw weights (what the model puts on the first token)",
            "f_attn": "Qiu et al. first-token attention at T=64 (eval.sink), renormalised weights",
            "f_attn_raw": "the same on the raw weights",
            "bos_attention_non_trigger": "Bigram-Backcopy only: Guo et al.'s mean attention on BOS of queries whose "
                                         "token is not a trigger (BOS query included), mean over layers and heads, "
                                         "renormalised weights (eval.backcopy)",
            "bos_attention_non_trigger_raw": "the same on the raw weights",
            "extra_sink_mass_non_trigger": "Bigram-Backcopy only: the same queries' raw weight on the learned sink "
                                           "tokens or on the sink logit's virtual key (eval.backcopy)",
            "max_h_ratio": "largest over layers of max |h| / median |h| per sequence, averaged (eval.activations "
                           "max_ratio, plain held-out windows without BOS as Sun et al.)",
            "max_abs_activation": "largest |h| of the residual stream over layers, per sequence averaged over "
                                  "sequences (eval.activations max_top1)",
            "spike_score_loss": "per-metric rate: % of the loss's eligible steps that spike, W=128, k=6 (eval.spikes)",
            "spike_score_grad_norm": "the same for the gradient norm",
            "spike_score_olmo_core": "OLMo-core SpikeScore (total): % of all steps where loss or grad norm spikes, "
                                     "W=128, k=6 (eval.spikes); the table's spike column",
            "stream_ppl": "eval.streaming perplexity per mode (window = 0+(S+W), sinks = S+W, recompute = the lab's "
                          "sliding window with recomputation; recurrent = linear attention's exact state)",
            "stream_ppl_sinks_on_recompute_positions": "sinks-mode ppl on the positions recompute scored "
                                                       "(recompute_stride > 1 scores every k-th one)",
            "train_tok_per_s": "median training tokens/s over steps after the first 10%",
            "settings": "what was run: the command, configs, collected runs, steps, overrides, streaming "
                        "settings, the grid (lrs, seeds, threads) and the git commit",
            "rows": "one per variant; with --lrs only each variant's runs at its best lr (lowest mean val_loss over "
                    "its seeds and thread counts), with val_loss_by_lr",
            "all_rows": "every run evaluated, every lr included",
            "spread": "with several seeds or thread counts: per variant (at its best lr) the number of runs and the "
                      "mean, sample standard deviation, min and max of sink_1, bos_attention_non_trigger, f_attn and "
                      f"val_loss; sink_ge_aim = runs with Sink_1 >= {SINK_AIM:g}%",
            "min_matrix_entropy": "eval.activations min_matrix_entropy_normalised: the compression valley's bottom",
            "entropy_valley_layer": "the block (1-indexed) where it is",
            "quant_ppl_ratio": "eval.quantize: perplexity per mode (fp32, w8, w4, w8a8) over the fp32 perplexity",
            "lr": "--lrs: the run's train.lr", "seed": "--seeds: the run's seed",
            "threads": "the run's OMP_NUM_THREADS (a grid axis with several --threads)",
            "base": "the config's own name (the variant a grid point belongs to)",
            "max_steps": "train.max_steps the run was trained to (checked against its newest checkpoint)",
        },
    })
    plot(rows, out)
    print(table)
    print(f"-> {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    return rows


if __name__ == "__main__":
    main()
