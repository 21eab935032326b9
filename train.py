"""Train a sinklab model. One loop for every config, on Accelerate (DDP / DeepSpeed when launched so).

    python train.py                                   # default config, embedded Shakespeare
    python train.py --config configs/ablate/sigmoid.yaml train.max_steps=200
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config ...

Outputs go to out/<name>/: config.yaml, tokenizer.json, metrics.jsonl and
checkpoints/step_XXXXXXX/ (Accelerate state + trainer_state.json + model.safetensors),
with `latest` pointing at the newest. See DESIGN.md, "Training".
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from configs import ConfigError, RunConfig, load_config, to_dict
from model.flops import peak_tflops, training_flops_per_token

# Accelerate warns at every save that the tied lm_head is stored once; that is what we want.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)

CHECKPOINT_FMT = "step_{:07d}"
RESUME_MAY_CHANGE = ("backend", "linear_chunk_size", "cache_dir")  # same math, other kernels / paths


def lr_at(step: int, cfg) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps (as nanoGPT)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only, never on norms (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


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
            state = json.loads((ckpt / "trainer_state.json").read_text())
            if not {"step", "tokens", "bad_in_row", "skipped_steps"} <= set(state):
                problem = "trainer_state.json lacks step/tokens/bad_in_row/skipped_steps"
        except (OSError, ValueError) as e:
            problem = f"trainer_state.json is missing or unreadable ({e})"
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


class StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and exit at the end of the current step."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C aborts at once
        self.signal_name = signal.Signals(signum).name


class Trainer:
    def __init__(self, cfg: RunConfig):
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        self.cfg = cfg
        self.run_dir = cfg.run_dir
        mp = cfg.train.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        use_wandb = cfg.logging.wandb
        if use_wandb and not os.environ.get("WANDB_API_KEY") and not Path.home().joinpath(".netrc").exists():
            os.environ.setdefault("WANDB_MODE", "offline")
        # gloo works for CPU processes (tests, laptops); NCCL is Accelerate's default on GPUs.
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        cpu_procs = distributed and not torch.cuda.is_available()
        handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu_procs else []
        # Plain torchrun on CPU: without cpu=True Accelerate sees no device and does not sync
        # the processes at all. DeepSpeed runs on CPU by itself (cpu=True would switch it off).
        use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
        self.acc = Accelerator(mixed_precision=mp, log_with="wandb" if use_wandb else None,
                               kwargs_handlers=handlers, cpu=cpu_procs and not use_deepspeed)
        world = self.acc.num_processes
        per_step = cfg.train.micro_batch_size * world
        if cfg.train.batch_size % per_step:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be a multiple of "
                              f"train.micro_batch_size x processes = {cfg.train.micro_batch_size} x {world}")
        # The global batch is fixed by the config; accumulation makes up for fewer processes.
        self.grad_accum = cfg.train.batch_size // per_step
        self.acc.gradient_accumulation_steps = self.grad_accum
        if self.acc.state.deepspeed_plugin is not None:
            self.fill_deepspeed_config()

    def fill_deepspeed_config(self):
        """Put the run config's batch, accumulation and clipping into the DeepSpeed config.

        The shipped JSONs say "auto" for these; Accelerate would otherwise take accumulation
        from the JSON (silently overriding ours) and clip at 1.0. Explicit values must agree.
        """
        tcfg, ds = self.cfg.train, self.acc.state.deepspeed_plugin.deepspeed_config
        ours = {"train_micro_batch_size_per_gpu": tcfg.micro_batch_size, "gradient_accumulation_steps": self.grad_accum,
                "train_batch_size": tcfg.batch_size, "gradient_clipping": tcfg.grad_clip}
        for key, value in ours.items():
            theirs = ds.get(key, "auto")
            if theirs == "auto":
                ds[key] = value
            elif float(theirs) != float(value):
                raise ConfigError(f"the DeepSpeed config sets {key}={theirs} but this run needs {value} (from "
                                  "train.batch_size, train.micro_batch_size, train.grad_clip and the number of "
                                  f'processes); set "{key}": "auto" in the DeepSpeed JSON (see configs/deepspeed/)')

    # ---------------------------------------------------------------- set-up
    def setup(self):
        from data.loader import make_loader
        from data.prepare import prepare
        from data.tokenizer import load_tokenizer
        from model import GPT

        cfg, acc = self.cfg, self.acc
        if cfg.task == "vit":
            self.setup_images()
        else:
            with acc.main_process_first():
                self.data_dir = prepare(cfg.data, progress=acc.is_main_process and cfg.logging.progress)
            self.meta = json.loads((self.data_dir / "meta.json").read_text())
            vocab = self.meta["vocab_size"]
            if cfg.model.vocab_size is None:
                cfg.model.vocab_size = vocab
            elif cfg.model.vocab_size < vocab:
                raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                                  f"vocabulary ({vocab}); set model.vocab_size={vocab} or leave it null")
            split, n = min(((s, self.meta[f"{s}_tokens"]) for s in ("train", "val")  # None: generated, no limit
                            if self.meta[f"{s}_tokens"] is not None), key=lambda t: t[1])
            if n < cfg.model.block_size + 1:  # said here, before the run dir is written
                raise ConfigError(f"the {split} split of {cfg.data.source} has {n} tokens, fewer than model.block_size "
                                  f"+ 1 = {cfg.model.block_size + 1}; lower model.block_size or add data")
            self.tokenizer = load_tokenizer(self.data_dir / "tokenizer.json")
        self.check_backend()
        self.start_step, self.tokens_seen, self.bad_in_row, self.skipped = 0, 0, 0, 0
        resume_from = self.find_resume_checkpoint()  # checks config compatibility before writing
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
            if cfg.task == "lm":
                shutil.copyfile(self.data_dir / "tokenizer.json", self.run_dir / "tokenizer.json")

        torch.manual_seed(cfg.seed)  # same initial weights on every process
        if cfg.task == "vit":
            from model.vit import ViT, training_flops_per_token as vit_flops

            model = ViT(cfg.model)
            self.flops_per_token = vit_flops(cfg.model)
        else:
            model = GPT(cfg.model)
            self.flops_per_token = training_flops_per_token(cfg.model, cfg.model.block_size)
        self.peak = peak_tflops(acc.device)
        if cfg.train.compile:
            model = torch.compile(model)
        optimizer = make_optimizer(model, cfg.train, acc.device)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        if cfg.task == "vit":
            self.train_loader = self.images.loader("train", cfg.train.micro_batch_size, cfg.seed, acc.process_index,
                                                   acc.num_processes, self.grad_accum, cfg.data)
            self.val_loader = self.images.loader("val", cfg.train.micro_batch_size, cfg.seed)
        else:
            self.train_loader = make_loader(self.data_dir, "train", cfg.train.micro_batch_size, cfg.model.block_size,
                                            cfg.seed, acc.process_index, acc.num_processes, self.grad_accum)
            self.val_loader = make_loader(self.data_dir, "val", cfg.train.micro_batch_size, cfg.model.block_size,
                                          cfg.seed, 0, 1)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif acc.is_main_process:
            self.truncate_metrics(0)  # a fresh start after a run that died before its first checkpoint
        if cfg.logging.wandb:
            acc.init_trackers(cfg.logging.wandb_project, config=to_dict(cfg), init_kwargs={"wandb": {"name": cfg.name}})

    def setup_images(self):
        """ViT: load the image splits and check them against the model (n_classes null = from the data)."""
        from data.images import load_images

        cfg = self.cfg
        self.images, self.tokenizer = load_images(cfg.data), None
        want = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
        if self.images.shape != want:
            raise ConfigError(f"data.source={cfg.data.source!r} has images of shape {self.images.shape} (C, H, W) but "
                              f"the model takes {want}; set model.in_channels and model.image_size to match")
        if cfg.model.n_classes is None:
            cfg.model.n_classes = self.images.n_classes
        elif cfg.model.n_classes < self.images.n_classes:
            raise ConfigError(f"model.n_classes={cfg.model.n_classes} is below the data's {self.images.n_classes} "
                              "classes; raise it or leave it null")

    def check_backend(self):
        """GPU-only kernels fail here, before any work, rather than at the first step."""
        backend, device = self.cfg.model.backend, self.acc.device
        if backend in ("flex", "flash", "triton") and device.type != "cuda":
            raise ConfigError(f"model.backend={backend} trains on CUDA GPUs only (this run is on {device.type}); "
                              "use model.backend=auto (math / sdpa / chunked here) or math")
        if backend == "flash" and self.acc.mixed_precision not in ("bf16", "fp16"):
            raise ConfigError("model.backend=flash needs bf16 or fp16; set train.mixed_precision=bf16 (or auto)")

    def find_resume_checkpoint(self) -> Path | None:
        cfg = self.cfg
        latest = self.run_dir / "checkpoints" / "latest"
        resume = cfg.train.resume
        if resume == "none":
            if latest.exists():
                raise ConfigError(f"{self.run_dir} already holds checkpoints; continue it with train.resume=auto "
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
            raise ConfigError(f"cannot resume {self.run_dir} with a different model or data config ("
                              + "; ".join(changed) + "). Use name=<new name> for a new run, or restore those values.")
        return ckpt

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int):
        """Accelerate state + trainer state + consolidated weights, written to a temp dir then renamed."""
        from model.load import save_weights

        acc = self.acc
        ckpt_root = self.run_dir / "checkpoints"
        final = ckpt_root / CHECKPOINT_FMT.format(step)
        tmp = ckpt_root / f".tmp_{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "accelerate").mkdir(parents=True)  # before any rank writes its random states there
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "accelerate"), safe_serialization=True)
        acc.wait_for_everyone()  # every rank's files are in tmp before the main process renames it
        state_dict = acc.get_state_dict(self.model)  # gathers ZeRO-3 shards on the main process
        # torch.compile wraps the model: store the plain names so the weights load anywhere.
        state_dict = {k.removeprefix("_orig_mod."): v for k, v in (state_dict or {}).items()}
        if acc.is_main_process:
            save_weights(state_dict, tmp / "model.safetensors", getattr(self.cfg.model, "tie_embeddings", False))
            shutil.copyfile(self.run_dir / "config.yaml", tmp / "config.yaml")
            if self.tokenizer is not None:
                shutil.copyfile(self.run_dir / "tokenizer.json", tmp / "tokenizer.json")
            state = {"step": step, "tokens": self.tokens_seen, "bad_in_row": self.bad_in_row,
                     "skipped_steps": self.skipped, "world_size": acc.num_processes}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
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

    def load_checkpoint(self, ckpt: Path):
        self.acc.load_state(str(ckpt / "accelerate"))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        self.start_step, self.tokens_seen = state["step"], state["tokens"]
        self.bad_in_row, self.skipped = state["bad_in_row"], state["skipped_steps"]
        if self.acc.is_main_process:
            self.truncate_metrics(self.start_step)
            print(f"resumed from {ckpt} at step {self.start_step}", flush=True)

    def truncate_metrics(self, step: int):
        """Drop metric rows logged after the checkpoint we resume from (they will be redone)."""
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            rows = [line for line in path.read_text().splitlines() if line.strip()]
            keep = [r for r in rows if json.loads(r).get("step", 0) <= step]
            write_atomic(path, "".join(r + "\n" for r in keep))

    # ---------------------------------------------------------------- loop
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over fixed held-out batches, shared out across processes.

        For a ViT the accuracy on the same batches goes to self.val_metrics (logged with the loss)."""
        acc, model = self.acc, self.model
        model.eval()
        total = torch.zeros(3, device=acc.device)
        batches = list(self.val_loader.eval_batches(self.cfg.train.eval_batches))
        world = acc.num_processes
        # Every rank runs the same number of forwards (ZeRO-3 gathers weights in each one);
        # when the batches do not divide evenly, the extra forwards are weighted 0.
        for i in range(acc.process_index, -(-len(batches) // world) * world, world):
            x, y = batches[i % len(batches)]
            x, y = x.to(acc.device), y.to(acc.device)
            with acc.autocast():
                out = model(x, y)
            n = torch.tensor(float(x.shape[0]) if i < len(batches) else 0.0, device=acc.device)
            correct = (out.logits.argmax(-1) == y).sum().float() * (n > 0) if self.cfg.task == "vit" else torch.zeros_like(n)
            total += torch.stack((out.loss.float() * n, n, correct))
        total = acc.reduce(total, reduction="sum")
        model.train()
        self.val_metrics = {"val_accuracy": (total[2] / total[1]).item()} if self.cfg.task == "vit" else {}
        return (total[0] / total[1]).item()

    def log(self, row: dict):
        if self.acc.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None
                                    for k, v in row.items()}) + "\n")
        if self.cfg.logging.wandb:
            self.acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def train_step(self, step: int):
        """One optimizer step over grad_accum micro-batches. Returns (loss, grad_norm, finite, lr).

        A non-finite loss on any process, or a non-finite gradient norm, skips the whole update
        (every process agrees); the weights and optimizer state stay as they were.
        """
        acc, model, cfg = self.acc, self.model, self.cfg.train
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=acc.device)
        finite, loss_ok, grad_norm = True, True, float("nan")
        for micro in range(self.grad_accum):
            x, y = self.train_loader.get_batch(step, micro)
            with acc.accumulate(model):  # syncs gradients on the last micro-batch only
                with acc.autocast():
                    loss = model(x.to(acc.device), y.to(acc.device)).loss
                ok = acc.reduce(torch.isfinite(loss.detach()).float(), reduction="sum").item() == acc.num_processes
                if not ok:
                    finite = loss_ok = False
                    # Backward a zero that touches every parameter: keeps DDP/DeepSpeed in step.
                    loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
                acc.backward(loss)
                loss_sum += loss.detach().float()
                if acc.sync_gradients and finite:
                    # max_norm=inf measures without clipping. The gradients are already reduced, so
                    # every process sees the same norm and takes the same decision.
                    norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                    grad_norm = float("nan") if norm is None else float(norm)
                    if norm is not None and not math.isfinite(grad_norm):
                        finite = False  # overflowing gradients: skip the update like a non-finite loss
                    else:
                        self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        mean_loss = acc.reduce(loss_sum / self.grad_accum, reduction="mean").item() if loss_ok else float("nan")
        return mean_loss, grad_norm, finite, lr

    def fit(self) -> int:
        """Train to max_steps (or a stop signal); returns the exit code."""
        code = self.train_loop()
        # Every process leaves together: a rank that tears down gloo while another is still in
        # a collective aborts the whole job.
        self.acc.wait_for_everyone()
        self.acc.end_training()  # finishes trackers, destroys the process group
        return code

    def train_loop(self) -> int:
        cfg, acc = self.cfg, self.acc
        stop = StopFlag()
        tcfg = cfg.train
        tokens_per_step = tcfg.batch_size * cfg.model.block_size
        self.model.train()
        bar = None
        if acc.is_main_process and cfg.logging.progress:
            from tqdm import tqdm

            bar = tqdm(total=tcfg.max_steps, initial=self.start_step, desc=cfg.name, dynamic_ncols=True)
        if self.start_step >= tcfg.max_steps and acc.is_main_process:
            print(f"{self.run_dir} is already at step {self.start_step} >= train.max_steps={tcfg.max_steps}; "
                  "raise train.max_steps to train further", flush=True)
        step = self.start_step
        t0 = time.perf_counter()
        while step < tcfg.max_steps:
            loss, grad_norm, finite, lr = self.train_step(step)
            step += 1
            self.tokens_seen += tokens_per_step
            dt = time.perf_counter() - t0
            t0 = time.perf_counter()
            tok_s = tokens_per_step / dt
            mfu = None
            if self.peak:
                mfu = self.flops_per_token * tok_s / (acc.num_processes * self.peak * 1e12)  # per device
            if finite:
                self.bad_in_row = 0
            else:
                self.bad_in_row += 1
                self.skipped += 1
            self.log({"step": step, "tokens": self.tokens_seen, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                      "tok_per_s": round(tok_s, 1), "mfu": mfu, "skipped_steps": self.skipped})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}",
                                mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%")
            if self.bad_in_row >= tcfg.max_bad_steps:
                if bar is not None:
                    bar.close()
                acc.print(f"stopping: the loss or gradient norm was not finite for {self.bad_in_row} steps in a row (step {step}). "
                          "Lower train.lr, raise train.warmup_steps or check the data; the last good checkpoint "
                          f"is in {self.run_dir / 'checkpoints'}.")
                return 1
            stopping = acc.reduce(torch.tensor(float(stop.signal_name is not None), device=acc.device),
                                  reduction="sum").item() > 0
            if step % tcfg.eval_interval == 0 or step == tcfg.max_steps:
                val = self.evaluate()
                self.log({"step": step, "split": "val", "val_loss": val, **self.val_metrics})
                if bar is not None:
                    bar.write(f"step {step}: val loss {val:.4f}"
                              + "".join(f", {k} {v:.4f}" for k, v in self.val_metrics.items()))
            if step % tcfg.ckpt_interval == 0 or step == tcfg.max_steps or stopping:
                self.save_checkpoint(step)
            if stopping:
                if bar is not None:
                    bar.close()
                acc.print(f"received {stop.signal_name or 'a stop signal'}: checkpoint saved at step {step} in "
                          f"{self.run_dir}; continue with train.resume=auto", flush=True)
                return 0
            t0 = time.perf_counter()  # exclude eval and checkpoint time from tok/s
        if bar is not None:
            bar.close()
        val = self.evaluate()
        if acc.is_main_process and self.cfg.task == "vit":
            print(f"final val loss {val:.4f}  |  val accuracy {self.val_metrics['val_accuracy']:.4f}  |  chance "
                  f"{1 / self.cfg.model.n_classes:.4f}  ({self.run_dir})", flush=True)
        elif acc.is_main_process:
            uni = self.meta["unigram_val_nll"]
            print(f"final val loss {val:.4f} nats/token  |  unigram baseline {uni:.4f}  |  "
                  f"{uni - val:.2f} nats better  ({self.run_dir})", flush=True)
        return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML run config (default: configs/default.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.attention=sigmoid train.max_steps=200")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
        trainer.setup()
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return trainer.fit()


if __name__ == "__main__":
    sys.exit(main())
