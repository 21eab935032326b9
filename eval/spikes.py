"""Loss and gradient-norm spikes, as OLMo-core's StabilityMonitor / OLMo 2 define them.

A step is a spike when its value > mean + k * std of the previous `window` values (population
std, current value excluded). Defaults W=128, k=6 follow OLMo-core; OLMo 2 reports spikes as
values at least k = 7 standard deviations from the mean of the previous W = 1000 in either
direction (`--two-sided`). Two scores:

* `spike_score` per metric: % of that metric's eligible steps (those with a full window
  before them) that are spikes;
* `olmo_core_spike_score`: OLMo-core's "SpikeScore (total)": steps where the loss *or* the
  grad norm spikes (a step counted once), over *all* logged steps, reported once there are at
  least W of them.

    python -m eval.spikes --run out/<run> [--window 128] [--k 6] [--two-sided]
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import (HelpFormatter, add_tag_argument, eval_dir, fail, flags_of, keep_other_result, positive_float, positive_int, with_flags,
               write_json)
from .result import EvalResult

METRICS = ("loss", "grad_norm")
_CHUNK = 4096  # rows of the sliding window processed at once: bounded memory at any length


def _finite(values) -> tuple[np.ndarray, np.ndarray]:
    """(finite values, their indices in `values`); None counts as non-finite."""
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    idx = np.flatnonzero(np.isfinite(v))
    return v[idx], idx


def detect_spikes(values, window: int = 128, k: float = 6.0, two_sided: bool = False) -> list[int]:
    """Indices i with values[i] > mean + k*std of the `window` previous finite values
    (two_sided: |values[i] - mean| >= k*std, OLMo 2's rule).

    Eligible steps: finite values with at least `window` finite values before them, as in
    OLMo-core, which checks nothing until its window is full. NaN/inf never enter the
    statistics and are never spikes (they are divergence, see `divergence`). A window with
    std < 1e-10 flags nothing (OLMo-core's guard against a flat history).
    """
    f, idx = _finite(values)
    if len(f) <= window:
        return []
    hist = sliding_window_view(f[:-1], window)  # row j = the window before f[j + window]
    spikes = []
    for start in range(0, len(hist), _CHUNK):
        rows = hist[start : start + _CHUNK]
        mean, std = rows.mean(axis=1), rows.std(axis=1)
        cur = f[start + window : start + window + len(rows)]
        hit = (np.abs(cur - mean) >= k * std) if two_sided else (cur > mean + k * std)
        hit &= std >= 1e-10
        spikes.extend(idx[np.flatnonzero(hit) + start + window].tolist())
    return spikes


def n_eligible(values, window: int = 128) -> int:
    """How many steps `detect_spikes` can judge: the spike score's denominator."""
    return max(0, len(_finite(values)[0]) - window)


def merge_events(spike_steps, max_gap: int = 1) -> list[tuple[int, int]]:
    """Merge flagged steps into (start, end) events; steps at most `max_gap` apart (1 =
    consecutive) join one event, so a burst counts once and an isolated spike is (s, s)."""
    events: list[tuple[int, int]] = []
    for s in sorted(spike_steps):
        if events and s - events[-1][1] <= max_gap:
            events[-1] = (events[-1][0], s)
        else:
            events.append((s, s))
    return events


def divergence(values) -> int | None:
    """Index of the first NaN/inf (or None value), or None if the series stays finite."""
    for i, x in enumerate(values):
        if x is None or not math.isfinite(x):
            return i
    return None


def spike_report(steps, values, window: int = 128, k: float = 6.0, two_sided: bool = False) -> dict:
    """Spike score, spike steps, merged events and divergence of one series, in step numbers."""
    steps = list(steps)
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    flagged = detect_spikes(values, window, k, two_sided)
    eligible = n_eligible(values, window)
    # merge on positions in the series (consecutive logged rows), then report step numbers
    events = [(steps[a], steps[b]) for a, b in merge_events(flagged)]
    div = divergence(values)
    return {
        "spike_score": 100.0 * len(flagged) / eligible if eligible else None,
        "n_spikes": len(flagged),
        "n_eligible": eligible,
        "n_values": len(values),
        "spikes": [steps[i] for i in flagged],
        "events": [list(e) for e in events],
        "n_events": len(events),
        "divergence": None if div is None else steps[div],
        "window": window,
        "k": k,
    }


def olmo_core_score(reports: dict, n_steps: int, window: int = 128) -> float | None:
    """OLMo-core's cumulative SpikeScore in %: steps where any metric spikes (counted once) over
    all `n_steps` logged steps; None until there are `window` steps, as OLMo-core reports it."""
    if n_steps < window:
        return None
    flagged = set().union(*(r["spikes"] for r in reports.values()))
    return 100.0 * len(flagged) / n_steps


def read_metrics(path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` from training rows of metrics.jsonl.

    Rows without the metric, and eval rows (a "split" other than "train"), are skipped.
    A step logged twice (a resumed run) keeps its last value; rows come back sorted by step.
    """
    from trainer.metrics import read_rows

    by_step: dict[int, float] = {}
    for row in read_rows(Path(path)):  # a torn last line (a killed run) is dropped with a warning
        if metric not in row or row.get("split", "train") != "train" or "step" not in row:
            continue
        v = row[metric]
        by_step[int(row["step"])] = float("nan") if v is None else float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot(series: dict, reports: dict, path) -> None:
    """One panel per metric: the curve, spikes as red dots, divergence as a dashed line."""
    from .plots import save, subplots

    names = list(series)
    fig, axes = subplots(len(names), 1, width=9, height=3.2)
    for ax, name in zip(axes[:, 0], names):
        steps, values = series[name]
        rep = reports[name]
        ax.plot(steps, values, lw=0.8, label=name)
        pos = {s: i for i, s in enumerate(steps)}
        if rep["spikes"]:
            ax.scatter(rep["spikes"], [values[pos[s]] for s in rep["spikes"]], color="red", s=14,
                       zorder=3, label=f"spikes ({rep['n_spikes']}, {rep['n_events']} events)")
        if rep["divergence"] is not None:
            ax.axvline(rep["divergence"], color="black", ls="--", label=f"non-finite at {rep['divergence']}")
        finite = [v for v in values if math.isfinite(v)]
        if name == "grad_norm" and finite and min(finite) > 0:
            ax.set_yscale("log")
        score = "n/a" if rep["spike_score"] is None else f"{rep['spike_score']:.3f}%"
        ax.set_title(f"{name}: spike score {score} (W={rep['window']}, k={rep['k']})")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    save(fig, path)


@dataclass
class SpikesResult(EvalResult):
    metrics: dict  # metric name -> spike_report
    olmo_core_spike_score: float | None
    n_steps: int
    window: int
    k: float
    two_sided: bool
    source: str
    _series: dict = field(default_factory=dict, repr=False)  # metric -> (steps, values), for the plot

    def definitions(self) -> dict:
        rule = "|value - mean| >= k*std" if self.two_sided else "value > mean + k*std"
        return {
            "spike": f"{rule} (population std) of the previous {self.window} finite values of that metric",
            "spike_score": "per metric: percentage of eligible steps that are spikes; eligible = finite value with "
                           "a full window of finite values before it",
            "olmo_core_spike_score": "OLMo-core's SpikeScore (total): % of all logged steps where loss or grad norm "
                                     "spikes (a step counted once); null while fewer than window steps are logged",
            "n_steps": "training steps logged (rows with loss or grad_norm)",
            "spikes": "step numbers flagged as spikes",
            "events": "[start, end] steps of runs of spikes on consecutive logged rows",
            "divergence": "first step whose value is NaN/inf (null = none)",
        }


def evaluate(metrics_path, window: int = 128, k: float = 6.0, two_sided: bool = False) -> SpikesResult:
    """Spike reports of loss and grad norm from a run's metrics.jsonl."""
    series = {m: read_metrics(metrics_path, m) for m in METRICS}
    series = {m: sv for m, sv in series.items() if sv[0]}
    if not series:
        raise ValueError(f"{metrics_path} has no training rows with any of {list(METRICS)}")
    reports = {m: spike_report(steps, values, window, k, two_sided) for m, (steps, values) in series.items()}
    n_steps = len(set().union(*(steps for steps, _ in series.values())))
    return SpikesResult(metrics=reports, olmo_core_spike_score=olmo_core_score(reports, n_steps, window),
                        n_steps=n_steps, window=window, k=k, two_sided=two_sided, source=str(metrics_path),
                        _series=series)


def metrics_info(run_dir) -> dict:
    """What a metrics.jsonl eval covers, in the shape of the checkpoint record: the run, its last
    logged step and tokens, and the git commit."""
    from .cli import git_commit

    from trainer.metrics import read_rows

    last = {}
    for row in read_rows(Path(run_dir) / "metrics.jsonl"):
        if "step" in row and row.get("split", "train") == "train":
            last = row
    return {"path": str(run_dir), "step": last.get("step"), "tokens": last.get("tokens"), "git_commit": git_commit()}


def main(argv=None) -> list[SpikesResult]:
    from .cli import expand

    ap = argparse.ArgumentParser(prog="python -m eval.spikes", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--run", "--ckpt", dest="run", nargs="+", required=True,
                    help="run directories (or globs such as 'out/ablate/*') with metrics.jsonl")
    ap.add_argument("--window", type=positive_int, default=128, help="128 = OLMo-core, 1000 = OLMo 2")
    ap.add_argument("--k", type=positive_float, default=6.0, help="6 = OLMo-core, 7 = OLMo 2")
    ap.add_argument("--two-sided", action="store_true", help="OLMo 2's rule: |value - mean| >= k std")
    add_tag_argument(ap)
    args = ap.parse_args(argv)
    flags = flags_of(args, paths=("run",))

    runs = [Path(r) for r in expand(args.run)]
    for run_dir in runs:  # every run is checked before anything is written
        if not (run_dir / "metrics.jsonl").exists():
            fail(f"{run_dir / 'metrics.jsonl'} not found: --run must be a training run directory")
        keep_other_result(run_dir / "eval" / (args.tag or "") / "spikes.json", flags)
    results = []
    for run_dir in runs:
        try:
            result = evaluate(run_dir / "metrics.jsonl", args.window, args.k, args.two_sided)
            result.checkpoint = metrics_info(run_dir)
        except (OSError, ValueError) as e:
            fail(str(e))
        out = eval_dir(run_dir, args.tag)
        write_json(out / "spikes.json", with_flags(result.to_json(), flags))
        plot(result._series, result.metrics, out / "spikes.png")
        for m, r in result.metrics.items():
            score = "n/a" if r["spike_score"] is None else f"{r['spike_score']:.3f}%"
            print(f"{run_dir.name} {m}: spike score {score} ({r['n_spikes']}/{r['n_eligible']}), "
                  f"{r['n_events']} events, divergence {r['divergence']}")
        score = result.olmo_core_spike_score
        print(f"{run_dir.name} OLMo-core spike score (any metric, all {result.n_steps} steps): "
              + ("n/a" if score is None else f"{score:.3f}%"))
        results.append(result)
    return results


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
