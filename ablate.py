"""Ablation report: train (or collect) a grid of variants on the same data, steps and seed, run
the evals on each and write one markdown table plus JSON and plots (docs/design.md, "Evals").

    python ablate.py --configs configs/ablate/*.yaml --steps 300 [--out out/ablate]
    python ablate.py --runs out/a out/b [--out out/ablate]

Training goes through `python train.py` in a subprocess per variant (so each run is exactly
what a user gets from the command line); a variant already trained to `--steps` is reused
(train.resume=auto), so an interrupted ablation continues where it stopped. Each run's checkpoint
and held-out tokens are loaded once and every eval's library function runs on them. Per run: final
val loss, Sink_1 and F-Attn (eval.sink, T=64), max |h| (eval.activations), loss spike score
(eval.spikes, OLMo-core W=128, k=6), streaming perplexity window-only vs sinks (eval.streaming)
and training tokens/s. On Bigram-Backcopy (data.source=bigram_backcopy) the sink evals use the
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

from eval import fail

ROOT = Path(__file__).resolve().parent
BIGRAM_BACKCOPY = "bigram_backcopy"  # data.source of Guo et al.'s task: eval.backcopy's measures join the table


def plan_runs(configs, steps, out_dir, overrides) -> list[tuple[Path, list[str]]]:
    """(run dir, train.py argv) per config; every config is validated before any training."""
    from configs import ConfigError, load_config

    plans = []
    for c in configs:
        ov = [f"out_dir={out_dir}", *([f"train.max_steps={steps}"] if steps else []), *overrides]
        try:
            cfg = load_config(c, ov)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            fail(f"{c}: {e}")
        plans.append((Path(cfg.out_dir) / cfg.name, ["--config", str(c), *ov]))
    names = [p[0] for p in plans]
    if len(set(names)) != len(names):
        fail(f"two configs write the same run dir ({names}); give each config a distinct `name:`")
    return plans


def train(run_dir: Path, argv: list[str], threads: int | None = None) -> None:
    print(f"== training {run_dir.name}: python train.py {' '.join(argv)}", flush=True)
    env = dict(os.environ)
    if threads:  # on a shared CPU, oversubscribed threads spin: 1 thread was ~15x faster here
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    rc = subprocess.call([sys.executable, str(ROOT / "train.py"), *argv, "logging.progress=false"], cwd=ROOT, env=env)
    if rc != 0:
        fail(f"training {run_dir} failed with exit code {rc}; see its output above")


def read_run_metrics(run_dir: Path) -> dict:
    """Final val loss, val-loss curve, train-loss curve and median training tok/s from metrics.jsonl."""
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
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
    and plot go under <run>/eval/ as its CLI writes them."""
    import numpy as np
    import torch

    from data.bigram_backcopy import load_chain
    from runs.load import load_run

    from probes.sequences import held_out_sequences

    from eval import activations, backcopy, eval_dir, pick_device, sink, spikes, streaming, write_json
    from eval.cli import bos_id, checkpoint_info

    print(f"== evaluating {run_dir.name}", flush=True)
    try:
        run = load_run(run_dir, pick_device(), task="lm")
        val = run.val_tokens()
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    model, out, info = run.model, eval_dir(run_dir), checkpoint_info(run)
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
        act_rows = sink_rows[: activations.N_SEQS, : cfg.block_size]
        stream = backcopy.long_stream(load_chain(backcopy.data_dir(run)), stream_tokens)
        # the same rows as `python -m eval.backcopy` (its default count), so the numbers agree
        guo = backcopy.evaluate(model, backcopy.held_out_rows(run, backcopy.N_SEQS, cfg.block_size)[0], trigger_ids)
        guo["checkpoint"] = info
        write_json(out / "backcopy.json", guo)
    else:
        sink_rows = held_out_sequences(val, sink.N_SEQS, max(Ts), bos_id=bos)
        act_rows = held_out_sequences(val, activations.N_SEQS, cfg.block_size)
        stream = torch.from_numpy(np.asarray(val[:stream_tokens]).astype(np.int64))
    s = save("sink", sink.evaluate(model, sink_rows, Ts, tokenizer=run.tokenizer, bos_id=bos))
    sink.plot_heatmap(s, out / "sink_heatmap.png")
    act = save("activations", activations.evaluate(model, act_rows))
    activations.plot(act, out / "activations.png")
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
        "sink_1": s.sink_1,
        "f_attn": s.f_attn,
        "sink_T": s.headline_T,
        "bos_attention_non_trigger": guo and guo["bos_attention_non_trigger_mean"],
        "extra_sink_mass_non_trigger": guo and guo.get("extra_sink_mass_non_trigger_mean"),
        "max_abs_activation": act.max_top1,
        "max_h_ratio": act.max_ratio,
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


def _fmt(v, spec=".3f"):
    return "n/a" if v is None else format(v, spec)


def markdown(rows: list[dict]) -> str:
    head = ("| variant | attention | gate | val loss | Sink_1 % (T=64) | BOS att. non-trigger | sink slot/token mass "
            "| F-Attn | max abs h | max h / median | loss spike score % "
            "| stream ppl window-only | stream ppl sinks | stream ppl recompute | train tok/s |")
    lines = [head, "|" + "|".join(["---"] * 15) + "|"]
    for r in rows:
        p = r["stream_ppl"]
        linear = "recurrent" in p
        lines.append("| " + " | ".join([
            r["variant"], r["attention"]["kind"], r["attention"]["gate"], _fmt(r["val_loss"]),
            _fmt(r["sink_1"], ".1f"), _fmt(r.get("bos_attention_non_trigger")),
            _fmt(r.get("extra_sink_mass_non_trigger")), _fmt(r["f_attn"]), _fmt(r["max_abs_activation"], ".1f"),
            _fmt(r.get("max_h_ratio"), ".0f"),
            _fmt(r["spike_score_loss"], ".2f"),
            f"{_fmt(p['recurrent'], '.2f')} (exact state)" if linear else _fmt(p.get("window"), ".2f"),
            "same" if linear else _fmt(p.get("sinks"), ".2f"),
            "same" if linear else _fmt(p.get("recompute"), ".2f") + (
                f" (sinks {r['stream_ppl_sinks_on_recompute_positions']:.2f} on the same positions)"
                if r.get("stream_ppl_sinks_on_recompute_positions") is not None else ""),
            _fmt(r["train_tok_per_s"], ".0f"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> None:
    from eval.plots import save, subplots

    fig, axes = subplots(1, 2, width=6, height=4)
    for r in rows:
        (line,) = axes[0, 0].plot(*zip(*r["train_curve"]), lw=0.7, alpha=0.6, label=f"{r['variant']} train")
        if r["val_curve"]:
            axes[0, 0].plot(*zip(*r["val_curve"]), marker="o", color=line.get_color(), label=f"{r['variant']} val")
    axes[0, 0].set_xlabel("step")
    axes[0, 0].set_ylabel("loss (nats/token)")
    axes[0, 0].set_title("training and validation loss")
    axes[0, 0].legend(fontsize=6)
    names = [r["variant"] for r in rows]
    axes[0, 1].bar(range(len(rows)), [r["sink_1"] for r in rows], color="tab:blue", label="Sink_1 (%)")
    axes[0, 1].set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=7)
    axes[0, 1].set_ylabel("Sink_1^0.3 (%)")
    axes[0, 1].set_ylim(0, 100)
    ax2 = axes[0, 1].twinx()
    ax2.plot(range(len(rows)), [r["f_attn"] for r in rows], "o", color="tab:red", label="F-Attn")
    ax2.set_ylabel("F-Attn", color="tab:red")
    ax2.set_ylim(0, 1)
    axes[0, 1].set_title("first-token sink (Gu et al. Sink_1, Qiu et al. F-Attn)")
    save(fig, out / "ablation.png")


def main(argv=None) -> list[dict]:
    from eval import positive_int, streaming

    ap = argparse.ArgumentParser(prog="python ablate.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=[], help="YAML configs to train, e.g. configs/ablate/*.yaml")
    ap.add_argument("--runs", nargs="+", default=[], help="already-trained run dirs to collect instead")
    ap.add_argument("--steps", type=positive_int, default=None, help="train.max_steps for every config (default: the config's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra dotted overrides applied to every config, e.g. train.batch_size=8")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="torch threads for training (OMP_NUM_THREADS) and evals (default: torch's); 1 on a busy CPU")
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
    from runs.load import resolve_checkpoint

    for r in args.runs:
        try:
            resolve_checkpoint(r)
        except FileNotFoundError as e:
            fail(f"--runs {r}: {e}")
        if not (Path(r) / "metrics.jsonl").is_file():
            fail(f"--runs {r}: no metrics.jsonl; pass run dirs (out/<run>), not checkpoint dirs")
    out = Path(args.out)
    plans = plan_runs(args.configs, args.steps, out, args.set)
    for run_dir, train_argv in plans:
        train(run_dir, train_argv, args.threads)
    run_dirs = [Path(r) for r in args.runs] + [p[0] for p in plans]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    rows = [evaluate_run(r, args.stream_tokens, args.stream_modes, args.recompute_stride) for r in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    from eval import write_json

    table = markdown(rows)
    (out / "ablation.md").write_text(table)
    write_json(out / "ablation.json", {
        "rows": rows,
        "settings": {"steps": args.steps, "overrides": args.set, "configs": args.configs, "runs": args.runs,
                     "stream_tokens": args.stream_tokens, "stream_modes": args.stream_modes,
                     "recompute_stride": args.recompute_stride},
        "definitions": {
            "val_loss": "last val_loss row of metrics.jsonl (nats/token)",
            "sink_1": "Gu et al. Sink_1^0.3 at T=64 in %, per sequence then averaged (eval.sink)",
            "f_attn": "Qiu et al. first-token attention at T=64 (eval.sink)",
            "bos_attention_non_trigger": "Bigram-Backcopy only: Guo et al.'s mean attention on BOS of queries whose "
                                         "token is not a trigger, mean over layers and heads (eval.backcopy)",
            "extra_sink_mass_non_trigger": "Bigram-Backcopy only: the same queries' weight on the learned sink "
                                           "tokens or on the sink logit's virtual key (eval.backcopy)",
            "max_h_ratio": "largest over layers of max |h| / median |h| per sequence, averaged (eval.activations "
                           "max_ratio)",
            "max_abs_activation": "largest |h| of the residual stream over layers, per sequence averaged over "
                                  "sequences (eval.activations max_top1)",
            "spike_score_loss": "OLMo-core loss spike score, W=128, k=6, % of eligible steps (eval.spikes)",
            "spike_score_olmo_core": "OLMo-core SpikeScore (total): % of all steps where loss or grad norm spikes, "
                                     "W=128, k=6 (eval.spikes)",
            "stream_ppl": "eval.streaming perplexity per mode (window = 0+(S+W), sinks = S+W, recompute = "
                          "sliding window with recomputation; recurrent = linear attention's exact state)",
            "stream_ppl_sinks_on_recompute_positions": "sinks-mode ppl on the positions recompute scored "
                                                       "(recompute_stride > 1 scores every k-th one)",
            "train_tok_per_s": "median training tokens/s over steps after the first 10%",
        },
    })
    plot(rows, out)
    print(table)
    print(f"-> {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    return rows


if __name__ == "__main__":
    main()
