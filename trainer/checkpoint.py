"""Checkpoints: write them atomically, check them, find the one to resume from, load it.

A checkpoint is out/<run>/checkpoints/step_XXXXXXX/ holding accelerate/ (Accelerate or
DeepSpeed state, every rank's RNG), trainer_state.json (TrainerState), a consolidated
model.safetensors (ZeRO-3 shards gathered), config.yaml, for text runs tokenizer.json, and
manifest.json (every file's size and xxh3-64 content hash, checked before a resume writes anything:
a truncated file or damaged bytes are refused naming the file).
`latest` is a symlink to the newest one, but resume trusts the step_* dirs on disk: when `latest`
is missing, dangling or a copied real dir (rsync without -l, cp -rL, cloud sync), the newest
step_* is used and `latest` becomes a link to it again. A step_* dir only ever appears complete
(it is renamed in), and a fresh start never writes over one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from configs import ConfigError, from_dict, to_dict
from data.prepare import check_fingerprint
from model import weights

from .diskfull import WriteFailed, describe_failure, is_write_failure
from .rundir import CHECKPOINT_FMT, newest_checkpoint, step_dirs

LEFTOVER_GLOBS = (".tmp_step_*", ".old_step_*", ".latest.tmp", ".latest.old")  # from saves a kill interrupted
RESUME_MAY_CHANGE = ("backend", "linear_chunk_size", "cache_dir")  # same math, other kernels / paths


@dataclass
class TrainerState:
    """What the loop needs besides weights, optimizer and RNG to continue exactly (trainer_state.json)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens (or image tokens) seen
    skipped_steps: int = 0  # non-finite steps skipped in total (a checkpoint never ends in a non-finite streak)
    world_size: int = 1  # processes that wrote it (informational: resume may change it)
    lr_horizon: int | None = None  # the max_steps the LR schedule is fitted to; kept when a resume raises it
    data_fingerprint: dict | None = None  # data.prepare.fingerprint of the training tokens (text runs)

    @classmethod
    def read(cls, ckpt: Path) -> TrainerState:
        """Raises ValueError saying what is wrong when the file is missing, unreadable or lacks a counter."""
        try:
            saved = json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"trainer_state.json is missing or unreadable ({e})") from None
        names = [f.name for f in dataclasses.fields(cls)]
        needed = ("step", "tokens", "skipped_steps")  # the rest came later: older checkpoints lack them
        if not isinstance(saved, dict) or not set(needed) <= set(saved):
            raise ValueError(f"trainer_state.json lacks {'/'.join(needed)}")
        return cls(**{k: v for k, v in saved.items() if k in names})

    def write(self, ckpt: Path) -> None:
        (ckpt / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(self), indent=1))


def file_hash(path: Path) -> str:
    """xxh3-64 of the file's bytes: the fastest hash measured (`python -m bench.hashes`: 0.10 s for a
    135M-parameter fp32 file, 2x faster than zlib.crc32, 5x sha256, 10x blake2b). It catches damage, not
    tampering. xxhash comes with `datasets`."""
    import xxhash

    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Record every file's size and content hash, so a truncated, missing or damaged file is caught before a
    resume writes anything."""
    files = {str(f.relative_to(ckpt)): {"size": f.stat().st_size, "xxh3_64": file_hash(f)}
             for f in sorted(ckpt.rglob("*")) if f.is_file() and f.name != "manifest.json"}
    (ckpt / "manifest.json").write_text(json.dumps(files, indent=1))


def manifest_mismatch(ckpt: Path, only=None) -> tuple[str, str] | None:
    """(file name, what differs) for the first file (of `only`, default all) whose size or content hash
    differs from manifest.json; None when they match or the checkpoint has no manifest (older ones; sizes
    only in some). Sizes first: a cut file costs no hashing."""
    manifest = ckpt / "manifest.json"
    if not manifest.exists():
        return None
    try:
        sizes = json.loads(manifest.read_text())
    except (OSError, ValueError) as e:
        return "manifest.json", f"unreadable: {e}"
    if not isinstance(sizes, dict):
        return "manifest.json", "not a JSON object"
    entries = [(name, saved) for name, saved in sizes.items() if only is None or name in only]
    for name, saved in entries:
        f = ckpt / name
        size = saved if isinstance(saved, int) else saved.get("size")
        if not f.is_file():
            return name, "no such file"
        if f.stat().st_size != size:
            return name, f"{f.stat().st_size} bytes, {size} when it was saved"
    for name, saved in entries:
        digest = None if isinstance(saved, int) else saved.get("xxh3_64")
        if digest is not None and (now := file_hash(ckpt / name)) != digest:
            return name, f"its bytes changed since it was saved: xxh3_64 {now}, manifest.json {digest}"
    return None


def manifest_problem(ckpt: Path) -> str | None:
    """manifest_mismatch as a sentence naming the file."""
    found = manifest_mismatch(ckpt)
    if found is None:
        return None
    name, detail = found
    if name == "manifest.json":
        return f"manifest.json is {detail}"
    return f"{name} is {'damaged' if detail.startswith('its bytes') else 'missing or damaged'} ({detail})"


def _damaged_file(ckpt: Path) -> str | None:
    """The first problem with the checkpoint's files: sizes and content hashes against manifest.json (when it
    has one; older checkpoints have none, or sizes only), then the safetensors headers and torch.save zip
    directories."""
    from safetensors import SafetensorError, safe_open

    problem = manifest_problem(ckpt)
    if problem:
        return problem
    if not (ckpt / "model.safetensors").is_file():
        return "model.safetensors is missing or damaged (no such file)"
    for f in sorted(ckpt.rglob("*")):
        name = str(f.relative_to(ckpt))
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), "pt"):  # checks the header covers the whole file
                    pass
            except (OSError, SafetensorError) as e:
                return f"{name} is missing or damaged ({e})"
        elif f.suffix in (".bin", ".pt", ".pkl") and not zipfile.is_zipfile(f):  # torch.save writes a zip
            return f"{name} is missing or damaged (not a complete torch.save file)"
    return None


def check_checkpoint(ckpt: Path) -> None:
    """Refuse, before anything is written, to resume from a checkpoint with missing or damaged files."""
    problem = None
    if not ckpt.is_dir():
        problem = "no such directory"
    else:
        try:
            TrainerState.read(ckpt)
        except ValueError as e:
            problem = str(e)
        if problem is None:
            problem = _damaged_file(ckpt)
        if problem is None and not any((ckpt / "accelerate").glob("*")):
            problem = "the accelerate/ state dir is missing or empty"
    if problem:
        raise ConfigError(f"cannot resume from {ckpt}: {problem}. Nothing was overwritten; resume from an earlier "
                          "checkpoint with train.resume=<its dir> (or repoint checkpoints/latest), or start a new "
                          "run with name=<new name>")


def resume_candidate(cfg) -> Path | None:
    """The checkpoint train.resume names before any check: `auto`'s newest on disk, a given dir, or None."""
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        return newest_checkpoint(cfg.run_dir / "checkpoints")
    return Path(cfg.train.resume)


def find_resume_checkpoint(cfg, data_fingerprint: dict | None = None) -> Path | None:
    """The checkpoint train.resume asks for (None: a fresh run), checked and compatible with `cfg` and,
    when given, with the fingerprint of the prepared training data.

    Everything here raises ConfigError before the run dir is touched."""
    ckpt_root = cfg.run_dir / "checkpoints"
    resume = cfg.train.resume
    on_disk = newest_checkpoint(ckpt_root)
    if resume == "none":
        if on_disk is not None or (ckpt_root / "latest").exists():
            raise ConfigError(f"{cfg.run_dir} already holds checkpoints; continue it with train.resume=auto "
                              "or start a new run with name=<new name> (nothing was overwritten)")
        return None
    if resume == "auto":
        if on_disk is None:
            return None
        ckpt = on_disk
    else:
        ckpt = Path(resume)
        if on_disk is not None and ckpt.resolve().parent != ckpt_root.resolve():  # its saves would overwrite them
            raise ConfigError(f"{cfg.run_dir} already holds checkpoints of its own; continue it with train.resume=auto "
                              f"(or one of its step dirs), or start from {ckpt} under name=<new name> (nothing was "
                              "overwritten)")
    check_checkpoint(ckpt)
    try:
        saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot resume from {ckpt}: its config.yaml is unreadable ({e})") from None
    # What fixes the weights' shapes and the data order must match; how kernels run may change. The saved
    # config is read in today's terms first: a key added since it was written takes its default.
    ours, saved = to_dict(cfg), saved if isinstance(saved, dict) else {}
    try:
        saved = to_dict(from_dict(saved))
    except (ConfigError, ValueError, TypeError):
        pass  # compared as written: the differences are named below
    changed = [f"seed: {saved.get('seed')!r} -> {cfg.seed!r}"] if saved.get("seed") != cfg.seed else []
    changed += [f"{section}.{k}: {(saved.get(section) or {}).get(k)!r} -> {v!r}"
                for section in ("model", "data") for k, v in ours[section].items()
                if (saved.get(section) or {}).get(k) != v and k not in RESUME_MAY_CHANGE]
    if changed:
        raise ConfigError(f"cannot resume {cfg.run_dir} with a different model or data config ("
                          + "; ".join(changed) + "). Use name=<new name> for a new run, or restore those values.")
    saved_fingerprint = TrainerState.read(ckpt).data_fingerprint
    if saved_fingerprint is not None and data_fingerprint is not None:  # checkpoints from before it lack one
        try:
            check_fingerprint(saved_fingerprint, data_fingerprint)
        except ValueError as e:
            raise ConfigError(f"cannot resume from {ckpt}: {e}") from None
    return ckpt


def clean_leftovers(ckpt_root: Path) -> list[Path]:
    """Remove what interrupted saves left behind (temp dirs after a kill or a full disk; a step dir moved
    aside for a re-save goes back if its replacement never arrived); returns them.
    Call from the main process while holding the run lock, before the first save."""
    gone = [p for pattern in LEFTOVER_GLOBS for p in ckpt_root.glob(pattern)]
    for p in gone:
        restored = ckpt_root / p.name.removeprefix(".old_")
        if p.name.startswith(".old_") and not restored.exists():  # killed between the two renames of a re-save
            os.replace(p, restored)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return gone


def abandon_newer(ckpt: Path) -> list[Path]:
    """Resuming a run from one of its own older checkpoints: point `latest` at it now and move the newer
    step dirs into checkpoints/abandoned/, so a later train.resume=auto cannot continue the abandoned branch.
    Moved, not deleted: they are the user's only copy of those steps. Returns the moved dirs."""
    ckpt_root = ckpt.parent
    newer = [p for p in step_dirs(ckpt_root) if p.name > ckpt.name]
    if newer:
        (ckpt_root / "abandoned").mkdir(exist_ok=True)
    for p in newer:
        target = ckpt_root / "abandoned" / p.name
        if target.exists():  # abandoned twice at the same step: keep the later copy
            shutil.rmtree(target)
        os.replace(p, target)
    point_latest(ckpt_root, ckpt.name)
    return newer


def point_latest(ckpt_root: Path, name: str) -> None:
    """Make `latest` a symlink to `name`, atomically; a real dir in its place (a synced copy) is renamed
    aside first and removed once the link is in."""
    latest, link, old = ckpt_root / "latest", ckpt_root / ".latest.tmp", ckpt_root / ".latest.old"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(name)
    copied = latest.is_dir() and not latest.is_symlink()
    if copied:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(latest, old)
    os.replace(link, latest)
    if copied:
        shutil.rmtree(old)


def prune(ckpt_root: Path, keep_last: int | None) -> list[Path]:
    """Keep the newest `keep_last` step dirs (None: all) and always the one `latest` points at."""
    if keep_last is None:
        return []
    keep = newest_checkpoint(ckpt_root)
    gone = [p for p in step_dirs(ckpt_root)[:-keep_last] if p != keep]
    for p in gone:
        shutil.rmtree(p)
    return gone


def save_checkpoint(acc, model, run_dir: Path, state: TrainerState, tied: bool, keep_last: int | None = None) -> Path:
    """Accelerate state + trainer state + consolidated weights, written to a temp dir, renamed, then
    `latest` switched and old step dirs pruned to train.keep_last. Every process calls this (ZeRO-3
    gathers the weights collectively). A write that fails on any process (disk full) removes the temp dir
    and raises WriteFailed on every process; the previous checkpoints and `latest` stay as they were."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / CHECKPOINT_FMT.format(state.step)
    tmp = ckpt_root / f".tmp_{final.name}"
    last_good = newest_checkpoint(ckpt_root) if acc.is_main_process else None
    failure = None
    try:
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "accelerate").mkdir(parents=True)  # before any rank writes its random states there
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
    except Exception as e:
        if not is_write_failure(e):
            raise
        failure = e
    acc.wait_for_everyone()  # every rank's files are in tmp before the main process renames it
    state_dict = acc.get_state_dict(model)  # gathers ZeRO-3 shards on the main process
    # torch.compile wraps the model: store the plain names so the weights load anywhere.
    state_dict = {k.removeprefix("_orig_mod."): v for k, v in (state_dict or {}).items()}
    if acc.is_main_process and failure is None:
        try:
            weights.save_weights(state_dict, tmp / "model.safetensors", tied)
            for name in ("config.yaml", "tokenizer.json"):
                if (run_dir / name).exists():
                    shutil.copyfile(run_dir / name, tmp / name)
            dataclasses.replace(state, world_size=acc.num_processes).write(tmp)
            write_manifest(tmp)
            # Same step saved again (e.g. SIGTERM right after a periodic save): the old dir goes aside
            # first and is removed last, so a kill at any point leaves a complete step dir under this name.
            old = ckpt_root / f".old_{final.name}"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            point_latest(ckpt_root, final.name)
            shutil.rmtree(old, ignore_errors=True)
            prune(ckpt_root, keep_last)
        except Exception as e:
            if not is_write_failure(e):
                raise
            failure = e
    if failure is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial write took
    failed = failure is not None
    if acc.num_processes > 1:
        failed = acc.reduce(torch.tensor(float(failed), device=acc.device), reduction="sum").item() > 0
    acc.wait_for_everyone()
    if failed:
        raise WriteFailed(describe_failure(f"the checkpoint of step {state.step}", tmp, failure, last_good)
                          if failure is not None else "another process could not write its part of the checkpoint")
    return final


def load_checkpoint(acc, ckpt: Path, grad_accum: int) -> TrainerState:
    """Restore weights, optimizer and every rank's RNG into the prepared objects; return the counters."""
    acc.load_state(str(ckpt / "accelerate"))
    state = TrainerState.read(ckpt)
    # Accelerate restores its micro-step counter, which counted the saving run's accumulation windows;
    # with another micro batch or process count it would straddle ours and sync gradients mid-window.
    acc.step = state.step * grad_accum
    if state.lr_horizon is None:  # saved before the horizon was stored: the saving run's max_steps
        state.lr_horizon = yaml.safe_load((ckpt / "config.yaml").read_text())["train"]["max_steps"]
    return state


def settle_run_dir(cfg, ckpt: Path, state: TrainerState) -> None:
    """Point `latest` at the checkpoint the run continues from (resuming one of its own older checkpoints
    abandons the newer ones) and say what was done."""
    print(f"resumed from {ckpt} at step {state.step}", flush=True)
    ckpt_root = cfg.run_dir / "checkpoints"
    latest = ckpt_root / "latest"
    if latest.exists() and not latest.is_symlink():
        print(f"{latest} is a copied dir, not a link; resumed from the newest step dir instead and made "
              "latest a link to it", flush=True)
    if ckpt.parent.resolve() == ckpt_root.resolve():  # also repoints latest (a link again if it was a copy)
        moved = abandon_newer(ckpt.resolve())
        if moved:
            print(f"moved the newer checkpoints {', '.join(p.name for p in moved)} to {ckpt_root / 'abandoned'} "
                  "(delete them when no longer needed); latest now points at " + ckpt.name, flush=True)
    # The schedule's notes (warmup, a changed max_steps) are said by the trainer for every start.


def write_model_run(run_dir: Path, model, config: dict, tokenizer=None, files: dict[str, str] | None = None,
                    step: int = 0) -> Path:
    """A model that no training loop wrote (a post-hoc fix) as a run dir every eval, sample.py and
    train.init_from read: run_dir/{config.yaml, tokenizer.json, *files} and checkpoints/step_XXXXXXX/ with the
    weights, config, tokenizer, trainer_state.json and manifest.json, `latest` pointing at it.

    Built in a hidden temp dir beside run_dir and renamed into place, so a kill leaves no half run; an
    existing run_dir is refused (FileExistsError), never replaced. `tokenizer` is a tokenizers.Tokenizer
    (None for a ViT); `files` maps extra file names in the run dir to their text."""
    import tempfile

    from model.weights import WEIGHTS, save_weights

    from .rundir import CHECKPOINT_FMT

    run_dir = Path(run_dir)
    if run_dir.exists() or run_dir.is_symlink():
        raise FileExistsError(f"{run_dir} exists; choose another name (a fix never overwrites a run)")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.tmp-", dir=run_dir.parent))
    try:
        ckpt = tmp / "checkpoints" / CHECKPOINT_FMT.format(step)
        ckpt.mkdir(parents=True)
        text = yaml.safe_dump(config, sort_keys=False)
        save_weights(model.state_dict(), ckpt / WEIGHTS, tied=getattr(model.config, "tie_embeddings", False))
        for where in (tmp, ckpt):
            (where / "config.yaml").write_text(text)
            if tokenizer is not None:
                tokenizer.save(str(where / "tokenizer.json"))
        TrainerState(step=step).write(ckpt)
        for name, body in (files or {}).items():
            (tmp / name).write_text(body)
        write_manifest(ckpt)
        point_latest(tmp / "checkpoints", ckpt.name)
        os.rename(tmp, run_dir)  # fails rather than replace a run dir that appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir
