"""The Accelerator for a run: mixed precision, the process group, and the DeepSpeed batch fields."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from configs import ConfigError
from model import backends

# DeepSpeed (imported by accelerate and transformers when they need it) warns "Setting accelerator to CPU" in
# every process of a machine without a GPU; naming the accelerator it would fall back to keeps logs quiet.
if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"


def make_accelerator(cfg):
    """Returns (accelerator, micro batch, gradient accumulation steps); the global batch is fixed by the config,
    the micro batch is train.micro_batch_size or, when that does not fit the processes, the one that does."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mp = cfg.train.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mp == "fp16" and not torch.cuda.is_available():  # Accelerate would silently train in fp32
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU; on CPU use train.mixed_precision=bf16 or no")
    tracker = cfg.logging.tracker_name
    if tracker is not None:
        check_tracker(tracker)
    if tracker == "wandb" and not os.environ.get("WANDB_API_KEY") and not Path.home().joinpath(".netrc").exists():
        os.environ.setdefault("WANDB_MODE", "offline")
    # gloo works for CPU processes (tests, laptops); NCCL is Accelerate's default on GPUs.
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu_procs = distributed and not torch.cuda.is_available()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu_procs else []
    # Plain torchrun on CPU: without cpu=True Accelerate sees no device and does not sync
    # the processes at all. DeepSpeed runs on CPU by itself (cpu=True would switch it off).
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    # project_dir: trackers that write files (tensorboard, ...) write them under the run dir.
    acc = Accelerator(mixed_precision=mp, log_with=tracker, project_dir=str(cfg.run_dir),
                      kwargs_handlers=handlers, cpu=cpu_procs and not use_deepspeed)
    tcfg = cfg.train
    micro = fit_micro_batch(tcfg.batch_size, tcfg.micro_batch_size, acc.num_processes, acc.print)
    grad_accum = tcfg.batch_size // (micro * acc.num_processes)  # makes up for fewer processes
    acc.gradient_accumulation_steps = grad_accum
    if acc.state.deepspeed_plugin is not None:
        fill_deepspeed_config(acc.state.deepspeed_plugin.deepspeed_config, tcfg, micro, grad_accum)
    return acc, micro, grad_accum


def check_tracker(name: str) -> None:
    """Accelerate drops a tracker whose package is missing without a word; refuse it before any work instead."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    if name in LoggerType.list() and name not in {str(t) for t in get_available_trackers()}:
        raise ConfigError(f"logging.tracker={name} needs its package, which is not installed here; "
                          f"pip install {name} (or choose another logging.tracker, or null)")


def fit_micro_batch(batch_size: int, micro: int, world: int, say=print) -> int:
    """The micro batch each process runs: the configured one, or, when micro x processes does not
    divide the global batch, the largest divisor of batch_size / processes below it (said once)."""
    if batch_size % world:
        raise ConfigError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world}); "
                          f"set train.batch_size to a multiple of {world}")
    per_process = batch_size // world
    if per_process % micro == 0:
        return micro
    fitted = max(d for d in range(1, min(micro, per_process) + 1) if per_process % d == 0)
    say(f"train.micro_batch_size={micro} x {world} processes does not divide train.batch_size={batch_size}; "
        f"running micro batches of {fitted}")
    return fitted


def fill_deepspeed_config(ds: dict, tcfg, micro: int, grad_accum: int) -> None:
    """Put the run config's batch, accumulation and clipping into the DeepSpeed config `ds`.

    The shipped JSONs say "auto" for these; Accelerate would otherwise take accumulation
    from the JSON (silently overriding ours) and clip at 1.0. Explicit values must agree.
    """
    ours = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": tcfg.batch_size, "gradient_clipping": tcfg.grad_clip}
    for key, value in ours.items():
        theirs = ds.get(key, "auto")
        if theirs == "auto":
            ds[key] = value
        elif float(theirs) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}={theirs} but this run needs {value} (from "
                              "train.batch_size, train.micro_batch_size, train.grad_clip and the number of "
                              f'processes); set "{key}": "auto" in the DeepSpeed JSON (see configs/deepspeed/)')


def check_backend(cfg, acc) -> str:
    """A backend that cannot train here (GPU-only kernels, flash without bf16) fails before any work;
    returns what will run the attention, e.g. 'sdpa (softmax, fp32, cpu)'."""
    try:
        backends.check(cfg.model, acc.device, acc.mixed_precision)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return backends.describe(cfg.model, acc.device, backends.compute_dtype(acc.mixed_precision))
