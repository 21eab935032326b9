"""Checkpoints: write them atomically, check them, find the one to resume from, load it.

A checkpoint is out/<run>/checkpoints/step_XXXXXXX/ holding accelerate/ (Accelerate or
DeepSpeed state, every rank's RNG), trainer_state.json (TrainerState), a consolidated
model.safetensors (ZeRO-3 shards gathered), config.yaml and, for text runs, tokenizer.json.
`latest` is a symlink to the newest one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from configs import ConfigError, to_dict

CHECKPOINT_FMT = "step_{:07d}"
RESUME_MAY_CHANGE = ("backend", "linear_chunk_size", "cache_dir")  # same math, other kernels / paths


@dataclass
class TrainerState:
    """What the loop needs besides weights, optimizer and RNG to continue exactly (trainer_state.json)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens (or image tokens) seen
    bad_in_row: int = 0  # non-finite steps in a row, towards train.max_bad_steps
    skipped_steps: int = 0  # non-finite steps skipped in total
    world_size: int = 1  # processes that wrote it (informational: resume may change it)

    @classmethod
    def read(cls, ckpt: Path) -> TrainerState:
        """Raises ValueError saying what is wrong when the file is missing, unreadable or lacks a counter."""
        try:
            saved = json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"trainer_state.json is missing or unreadable ({e})") from None
        names = [f.name for f in dataclasses.fields(cls)]
        needed = [n for n in names if n != "world_size"]
        if not isinstance(saved, dict) or not set(needed) <= set(saved):
            raise ValueError(f"trainer_state.json lacks {'/'.join(needed)}")
        return cls(**{k: v for k, v in saved.items() if k in names})

    def write(self, ckpt: Path) -> None:
        (ckpt / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(self), indent=1))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_checkpoint(ckpt: Path) -> None:
    """Refuse, before anything is written, to resume from a checkpoint with missing or damaged files."""
    from safetensors import SafetensorError, safe_open

    problem = None
    if not ckpt.is_dir():
        problem = "no such directory"
    else:
        try:
            TrainerState.read(ckpt)
        except ValueError as e:
            problem = str(e)
        if problem is None:
            try:
                with safe_open(str(ckpt / "model.safetensors"), "pt"):  # checks the header covers the whole file
                    pass
            except (OSError, SafetensorError) as e:
                problem = f"model.safetensors is missing or damaged ({e})"
        if problem is None and not any((ckpt / "accelerate").glob("*")):
            problem = "the accelerate/ state dir is missing or empty"
    if problem:
        raise ConfigError(f"cannot resume from {ckpt}: {problem}. Nothing was overwritten; resume from an earlier "
                          "checkpoint with train.resume=<its dir> (or repoint checkpoints/latest), or start a new "
                          "run with name=<new name>")


def find_resume_checkpoint(cfg) -> Path | None:
    """The checkpoint train.resume asks for (None: a fresh run), checked and compatible with `cfg`.

    Everything here raises ConfigError before the run dir is touched."""
    latest = cfg.run_dir / "checkpoints" / "latest"
    resume = cfg.train.resume
    if resume == "none":
        if latest.exists():
            raise ConfigError(f"{cfg.run_dir} already holds checkpoints; continue it with train.resume=auto "
                              "or start a new run with name=<new name> (nothing was overwritten)")
        return None
    if resume == "auto":
        if latest.is_symlink() and not latest.exists():
            raise ConfigError(f"{latest} points at a missing checkpoint; point it at an existing step_* dir "
                              "or pass train.resume=<checkpoint dir>")
        if not latest.exists():
            return None
        ckpt = latest.resolve()
    else:
        ckpt = Path(resume)
    check_checkpoint(ckpt)
    try:
        saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot resume from {ckpt}: its config.yaml is unreadable ({e})") from None
    # What fixes the weights' shapes and the data order must match; how kernels run may change.
    ours, saved = to_dict(cfg), saved if isinstance(saved, dict) else {}
    changed = [f"seed: {saved.get('seed')!r} -> {cfg.seed!r}"] if saved.get("seed") != cfg.seed else []
    changed += [f"{section}.{k}: {(saved.get(section) or {}).get(k)!r} -> {v!r}"
                for section in ("model", "data") for k, v in ours[section].items()
                if (saved.get(section) or {}).get(k) != v and k not in RESUME_MAY_CHANGE]
    if changed:
        raise ConfigError(f"cannot resume {cfg.run_dir} with a different model or data config ("
                          + "; ".join(changed) + "). Use name=<new name> for a new run, or restore those values.")
    return ckpt


def save_checkpoint(acc, model, run_dir: Path, state: TrainerState, tied: bool) -> Path:
    """Accelerate state + trainer state + consolidated weights, written to a temp dir, renamed, then
    `latest` switched. Every process calls this (ZeRO-3 gathers the weights collectively)."""
    from model.weights import save_weights

    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / CHECKPOINT_FMT.format(state.step)
    tmp = ckpt_root / f".tmp_{final.name}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "accelerate").mkdir(parents=True)  # before any rank writes its random states there
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
    acc.wait_for_everyone()  # every rank's files are in tmp before the main process renames it
    state_dict = acc.get_state_dict(model)  # gathers ZeRO-3 shards on the main process
    # torch.compile wraps the model: store the plain names so the weights load anywhere.
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in (state_dict or {}).items()}
    if acc.is_main_process:
        save_weights(state_dict, tmp / "model.safetensors", tied)
        for name in ("config.yaml", "tokenizer.json"):
            if (run_dir / name).exists():
                shutil.copyfile(run_dir / name, tmp / name)
        dataclasses.replace(state, world_size=acc.num_processes).write(tmp)
        if final.exists():  # same step saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        link = ckpt_root / ".latest.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(final.name)
        os.replace(link, ckpt_root / "latest")
    acc.wait_for_everyone()
    return final


def load_checkpoint(acc, ckpt: Path) -> TrainerState:
    """Restore weights, optimizer and every rank's RNG into the prepared objects; return the counters."""
    acc.load_state(str(ckpt / "accelerate"))
    return TrainerState.read(ckpt)
