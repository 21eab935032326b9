"""What every LM eval CLI shares: its --ckpt/--data/--dtype/--device flags, loading each
checkpoint, recording where the numbers came from, and where the outputs go.

`--ckpt` takes run dirs, checkpoint dirs, globs (`out/run/checkpoints/step_*`) or `hf:` ids.
A run dir is evaluated at its latest checkpoint and writes under `<run>/eval/`; a checkpoint
dir `<run>/checkpoints/step_X` writes under `<run>/eval/step_X/`, so no checkpoint's results
overwrite another's. With several checkpoints the CLI also writes `<run>/eval/<name>_over_steps`
(.json, .md, .png): the headline numbers against the training step.
"""
from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

from safetensors import SafetensorError

from configs import from_dict
from data.prepare import prepare

from util import DTYPES, pick_device

from . import (add_tag_argument, fail, flags_of, keep_other_result, make_dir, with_flags, write_json,
               write_text)

ROOT = Path(__file__).resolve().parents[1]


def add_lm_arguments(ap, data: bool = True) -> None:
    """The flags every LM eval takes, in one place (`data=False`: an eval that reads no held-out text)."""
    ap.add_argument("--ckpt", nargs="+", required=True,
                    help="run dir(s), checkpoint dir(s), a glob such as 'out/<run>/checkpoints/step_*', "
                         "or hf:<hub id, transformers folder or GGUF file>")
    if data:
        ap.add_argument("--data", default=None, help="text source for the held-out tokens (default: the run's own data)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights dtype (default: as saved, fp32)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    add_tag_argument(ap)


def expand(patterns) -> list[str]:
    """Globs expanded (sorted), everything else as given; a glob that matches nothing is an error."""
    out = []
    for p in patterns:
        if not p.startswith("hf:") and any(c in p for c in "*?["):
            hits = sorted(glob.glob(p))
            if not hits:
                fail(f"--ckpt {p} matches nothing; check the path (quote globs so the shell passes them through)")
            out += hits
        else:
            out.append(p)
    return out


def check_paths(paths) -> None:
    """Every local path resolves to a checkpoint before any of them is evaluated."""
    from runs.load import resolve_checkpoint

    for p in paths:
        if p.startswith("hf:"):
            continue
        try:
            resolve_checkpoint(p)
        except FileNotFoundError as e:
            fail(str(e))


def load(path: str, args, task: str = "lm"):
    """load_run with --device/--dtype/--data; a bad path or a run of the other kind is one clear error."""
    from runs.load import load_run

    dtype = DTYPES.get(getattr(args, "dtype", None))
    try:
        run = load_run(path, pick_device(args.device), task=task, dtype=dtype, data=getattr(args, "data", None),
                       image_size=getattr(args, "image_size", None))  # image_size: an hf: ViT's input size
    except Exception as e:  # noqa: BLE001 - every failure to read a checkpoint is one line, never a traceback
        if not path.startswith("hf:") and not Path(path).exists():
            vanished(path)
        if isinstance(e, (OSError, ValueError, SafetensorError)):
            fail(str(e))
        raise
    if run.eval_block_size < run.model.config.block_size:
        print(f"note: {path} has a context of {run.model.config.block_size} tokens; the evals default to "
              f"{run.eval_block_size} (the flags for sequence length and window go up to the context)", file=sys.stderr)
    return run


def vanished(path) -> None:
    """A checkpoint that was there when the flags were checked and is gone now: pruned by a training
    run that keeps its last few (train.keep_last), or moved. A run dir never ends here: load_run
    follows it to the newest checkpoint again when the one it resolved is pruned."""
    fail(f"{path} disappeared before the eval could read it (pruned by a training run with train.keep_last, or "
         "moved); evaluate the run dir, which follows its newest checkpoint, or a copy of this checkpoint")


def bos_id(run) -> int | None:
    """The BOS token id when the run's data starts documents with BOS (`data.bos`), else None.

    Read from the prepared data's meta.json (`bos_id`), where data preparation records it."""
    data = run.config.get("data", {}) or {}
    if not data.get("bos", False):
        return None
    if getattr(run, "bos_id", None) is not None:
        return run.bos_id
    meta = json.loads((prepare(from_dict({"data": data}).data, progress=False) / "meta.json").read_text())
    if meta.get("bos_id") is None:
        fail(f"{run.run_dir} trained with data.bos but its prepared data records no bos_id; prepare the data again")
    return int(meta["bos_id"])


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def checkpoint_info(run) -> dict:
    """Path, step and tokens seen (from trainer_state.json, as loaded) of the loaded checkpoint, the git commit, and
    the weights' quantisation (a GGUF import's, eval/result.py CHECKPOINT_DEFINITION); an import also
    names its hf: ref and model_type."""
    state = run.trainer_state or {}  # read when the checkpoint was loaded: it may be pruned by now
    hf = run.config.get("hf")
    info = {"path": str(run.checkpoint), "step": state.get("step"), "tokens": state.get("tokens"),
            "quantization": (hf or {}).get("quantization"), "git_commit": git_commit()}
    if hf:
        info.update(ref=hf["ref"], model_type=hf["model_type"], format=hf.get("format"))
    return info


def output_dir(run, requested: str, tag: str | None = None) -> Path:
    """`<run>/eval/` for a run dir, `<run>/eval/<checkpoint name>/` for one checkpoint of it; with --tag,
    `<tag>/` below that."""
    req = Path(requested)
    whole_run = (req / "checkpoints").is_dir() or (req / "latest").exists() or requested.startswith("hf:")
    path = Path(run.run_dir) / "eval"
    if not whole_run:
        path = path / Path(run.checkpoint).name
    return make_dir(path / (tag or ""))


def for_each_checkpoint(args, name: str, evaluate_one, headline: tuple[str, ...], task: str = "lm") -> list:
    """Evaluate every --ckpt: `evaluate_one(run, out_dir)` returns an EvalResult (and draws its
    plots); this writes `<out_dir>/<name>.json` with the checkpoint recorded. Several
    checkpoints also get `<name>_over_steps` with the `headline` fields per step."""
    paths = expand(args.ckpt)
    check_paths(paths)
    flags, tag = flags_of(args), getattr(args, "tag", None)
    done = []
    for p in paths:
        run = load(p, args, task)
        if task == "lm":
            try:
                run.val_tokens()  # the held-out data is there (its source may have moved) before anything is written
            except ValueError as e:
                fail(str(e))
        out = output_dir(run, p, tag)
        keep_other_result(out / f"{name}.json", flags)
        try:
            result = evaluate_one(run, out)
        except ValueError as e:  # no held-out data (the source moved), too few tokens for the flags
            fail(str(e))
        result.checkpoint = checkpoint_info(run)
        write_json(out / f"{name}.json", with_flags(result.to_json(), flags))
        print(f"-> {out / (name + '.json')}")
        done.append((Path(run.run_dir), result))  # not the run: one model in memory at a time
        del run
    if len(done) > 1:
        over_steps(done, name, headline, tag)
    return [r for _, r in done]


def over_steps(done, name: str, headline: tuple[str, ...], tag: str | None = None) -> Path:
    """One table (JSON + markdown) and one plot of the `headline` fields against the step, in
    the first run's eval dir; `done` is [(run dir, result)]."""
    from .plots import save, subplots

    rows = sorted(({"step": r.checkpoint["step"], "tokens": r.checkpoint["tokens"], "checkpoint": r.checkpoint["path"],
                    **{k: getattr(r, k) for k in headline}} for _, r in done),
                  key=lambda row: (row["step"] is None, row["step"] or 0))
    out = make_dir(done[0][0] / "eval" / (tag or ""))
    defs = done[0][1].definitions()
    write_json(out / f"{name}_over_steps.json", {"rows": rows, "definitions": {k: defs.get(k, "") for k in headline}})
    lines = ["| step | tokens | " + " | ".join(headline) + " |", "|---" * (len(headline) + 2) + "|"]
    lines += ["| " + " | ".join(str(v) if not isinstance(v, float) else f"{v:.4g}"
                                for v in [row["step"], row["tokens"], *(row[k] for k in headline)]) + " |" for row in rows]
    write_text(out / f"{name}_over_steps.md", "\n".join(lines) + "\n")
    fig, axes = subplots(1, len(headline), width=4.5, height=3.5)
    for ax, key in zip(axes[0], headline):
        pts = [(row["step"], row[key]) for row in rows if row["step"] is not None and row[key] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o")
            if min(v for _, v in pts) >= 0:
                ax.set_ylim(bottom=0)  # rates, %, ppl: never a negative axis (a constant 0 would get one)
        ax.set_xlabel("training step")
        ax.set_ylabel(done[0][1].AXES.get(key, key))
        ax.set_title(key)
    save(fig, out / f"{name}_over_steps.png")
    print(f"-> {out / (name + '_over_steps.md')}")
    return out
