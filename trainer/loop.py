"""The Trainer: one training loop for every config (LM and ViT) on HF Accelerate (DDP / DeepSpeed when launched
so). `Trainer(cfg)` refuses a bad config and sets the run up (run dir, lock, model, optimizer, loaders, resume);
`fit()` is the loop: optimizer steps, metrics rows, evals, the sink probe, checkpoints, stop signals.

What differs between the LM and the ViT is trainer/tasks.py; checkpoints, the optimizer, metrics.jsonl and the
run-dir layout are the other modules of trainer/; the sink measurement is probes.sink.measure.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import sys
import time

import torch
import yaml
from tqdm import tqdm

from configs import ConfigError, RunConfig, to_dict
from model import backends
from model.flops import peak_tflops
from probes.sink import measure
from util import write_atomic

from .checkpoint import (TrainerState, clean_leftovers, find_resume_checkpoint, load_checkpoint, save_checkpoint,
                         settle_run_dir)
from .diskfull import WriteFailed, describe_failure
from .launch import check_backend, make_accelerator
from .metrics import MetricsLog, wandb_run_id
from .optim import lr_at, make_optimizer, schedule_notes
from .progress import progress_line
from .rundir import check_out_dir, newest_checkpoint, take_run_lock
from .signals import UNDO_SETUP, StopFlag, requeue_if_slurm
from .tasks import make_task

# Accelerate warns at every save that the tied lm_head is stored once; that is what we want.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)

SETUP_FILES = (".lock", "config.yaml", "tokenizer.json")  # what set-up writes into the run dir


class Trainer:
    def __init__(self, cfg: RunConfig):
        """Everything that can refuse the config does so before the run dir is written (the run lock
        creates it and its .lock first; a run dir this run created is removed again if set-up fails)."""
        self.acc, micro, self.grad_accum = make_accelerator(cfg)
        # The run config as this run resolves it, built beside the validated one: the micro batch that fits
        # the processes, then what the data decides (trainer/tasks.py). config.yaml records this one.
        given = getattr(cfg, "model_fields_given", frozenset())  # load_config's record: not a field, so carried over
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=micro))
        cfg.model_fields_given = given
        self.task = make_task(cfg)
        acc, task = self.acc, self.task
        check_out_dir(cfg)
        self.cfg = cfg = task.prepare(acc)
        self.attention_backend = check_backend(cfg, acc)
        acc.print(f"attention backend: {self.attention_backend}")
        # Folders this run creates (the lock makes the run dir): removed again if writing it fails.
        self.created = [p for p in (cfg.run_dir, *cfg.run_dir.parents) if not p.exists()]
        # In a run dir that was there: the files set-up writes that it did not hold yet.
        self.created_files = [cfg.run_dir / n for n in SETUP_FILES if not (cfg.run_dir / n).exists()]
        self.lock = take_run_lock(cfg, acc)
        UNDO_SETUP.append(self.undo_setup)  # a SIGTERM during set-up removes them too
        try:
            self._setup()
        except BaseException:
            self.release_lock()
            self.undo_setup()
            raise
        finally:
            UNDO_SETUP.remove(self.undo_setup)

    def undo_setup(self) -> None:
        """Remove what set-up made and nothing else: the run dir when this run created it, else the files
        it added to an existing one (a resumed run's config.yaml and checkpoints stay)."""
        if not self.acc.is_main_process:
            return
        if self.created:
            shutil.rmtree(self.created[-1], ignore_errors=True)
            return
        for p in self.created_files:
            p.unlink(missing_ok=True)

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _setup(self) -> None:
        cfg, acc, task = self.cfg, self.acc, self.task
        if acc.is_main_process:
            for p in clean_leftovers(cfg.run_dir / "checkpoints"):
                print(f"removed {p.name}, left by an interrupted checkpoint write", flush=True)
        fingerprint = task.data_fingerprint()
        resume_from = find_resume_checkpoint(cfg, fingerprint)
        if acc.is_main_process:
            try:
                cfg.run_dir.mkdir(parents=True, exist_ok=True)
                saved = {**to_dict(cfg), "attention_backend": self.attention_backend}  # a record: loaders ignore it
                write_atomic(cfg.run_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
                task.save_artifacts(cfg.run_dir)
            except OSError as e:  # disk full, read-only file system, permissions (__init__ removes a run dir it created)
                raise ConfigError(f"cannot write the run dir {cfg.run_dir}: {e.strerror or e}; free disk space or "
                                  "set out_dir to a writable folder") from None

        torch.manual_seed(cfg.seed)  # same initial weights on every process
        model = task.build_model()
        if resume_from is None:
            task.load_initial_weights(model)
        model.set_backend(acc.device, backends.compute_dtype(acc.mixed_precision))  # pinned across acc.prepare's moves
        if cfg.train.compile:
            model = torch.compile(model)
        self.model, self.optimizer = acc.prepare(model, make_optimizer(model, cfg.train, acc.device))
        self.train_loader, self.val_loader = task.loaders(acc, self.grad_accum)
        self.probe = task.probe_inputs() if cfg.train.effective_sink_interval else None
        self.peak = peak_tflops(acc.device)

        self.log = MetricsLog(acc, cfg.run_dir, cfg.logging.tracker_name)
        self.state = TrainerState(lr_horizon=cfg.train.max_steps)
        self.last_good = resume_from  # the newest checkpoint written after a finite step
        if resume_from is not None:
            self.state = load_checkpoint(acc, resume_from, self.grad_accum)
            if acc.is_main_process:
                settle_run_dir(cfg, resume_from, self.state)
        self.state.data_fingerprint = fingerprint
        # The LR schedule keeps the horizon of the run that started it: raising train.max_steps on
        # resume continues at min_lr past it (nanoGPT's lr_decay_iters < max_iters) instead of
        # re-stretching the cosine and jumping the lr back up.
        self.schedule = dataclasses.replace(cfg.train, max_steps=self.state.lr_horizon)
        for note in schedule_notes(cfg.train, self.state.lr_horizon):
            acc.print(note, flush=True)
        self.log.drop_after(self.state.step)  # rows a crashed or abandoned run logged after this checkpoint
        if cfg.logging.tracker_name is not None:
            acc.init_trackers(cfg.logging.wandb_project, config=to_dict(cfg), init_kwargs=self.tracker_kwargs())

    def tracker_kwargs(self) -> dict:
        """W&B: the run's name, its id kept in the run dir (a resumed or requeued run continues the same W&B run)
        and its files under the run dir (unless WANDB_DIR says otherwise). Other trackers write under the run dir
        through Accelerate's project_dir."""
        cfg, acc = self.cfg, self.acc
        if cfg.logging.tracker_name != "wandb":
            return {}
        wandb_id = wandb_run_id(cfg.run_dir) if acc.is_main_process else None
        kwargs = {"name": cfg.name, "id": wandb_id, "resume": "allow"}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(cfg.run_dir)
        return {"wandb": kwargs}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The task's metrics (val_loss, ...) averaged over fixed held-out batches, shared out across processes."""
        acc, model, names = self.acc, self.model, self.task.metric_names
        model.eval()
        total = torch.zeros(len(names) + 1, device=acc.device)  # metric x examples, and examples
        batches = list(self.val_loader.eval_windows(self.cfg.train.eval_windows))
        world = acc.num_processes
        # Every rank runs the same number of forwards (ZeRO-3 gathers weights in each one);
        # when the batches do not divide evenly, the extra forwards are weighted 0.
        for i in range(acc.process_index, -(-len(batches) // world) * world, world):
            x, y = batches[i % len(batches)]
            x, y = x.to(acc.device), y.to(acc.device)
            with acc.autocast():
                out = model(x, y)
            n = torch.tensor(float(x.shape[0]) if i < len(batches) else 0.0, device=acc.device)
            total += torch.stack((*self.task.batch_metrics(out, y), torch.ones_like(n))) * n
        total = acc.reduce(total, reduction="sum")
        model.train()
        return {name: (total[j] / total[-1]).item() for j, name in enumerate(names)}

    @torch.no_grad()
    def measure_sinks(self, step: int) -> None:
        """Sink_1, F-Attn and the max |h| ratio on the fixed probe inputs, as a metrics row with its time.

        Every process runs it (a ZeRO-3 forward needs all of them); the main one writes the row."""
        t0 = time.perf_counter()
        model = self.acc.unwrap_model(self.model, keep_torch_compile=False)  # no DDP hooks, no recompiling
        with self.acc.autocast():
            row = measure(model, self.probe)
        self.log.write({"step": step, "split": "sink", **row, "sink_time_s": round(time.perf_counter() - t0, 4)})

    def train_step(self, step: int):
        """One optimizer step over grad_accum micro-batches. Returns (loss, grad_norm, finite, lr).

        A non-finite loss on any process, or a non-finite gradient norm, skips the whole update
        (every process agrees); the weights and optimizer state stay as they were.
        """
        acc, model, cfg = self.acc, self.model, self.cfg.train
        lr = lr_at(step, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # train.lr_scale
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

    def save(self) -> None:
        save_checkpoint(self.acc, self.model, self.cfg.run_dir, self.state,
                        getattr(self.cfg.model, "tie_embeddings", False), self.cfg.train.keep_last)
        self.last_good = newest_checkpoint(self.cfg.run_dir / "checkpoints")

    def fit(self) -> int:
        """The training loop: train to max_steps or a stop signal. Returns the exit code: 0 done or stopped
        with a checkpoint, 1 after too many non-finite steps in a row or a write that did not reach the disk."""
        cfg, tcfg, acc, state = self.cfg, self.cfg.train, self.acc, self.state
        show_bar = acc.is_main_process and cfg.logging.progress and sys.stderr.isatty()
        plain = acc.is_main_process and not show_bar  # progress lines instead of a bar
        bar = tqdm(total=tcfg.max_steps, initial=state.step, desc=cfg.name, dynamic_ncols=True, disable=not show_bar)
        code = 0
        try:
            stop = StopFlag()
            tokens_per_step = tcfg.batch_size * cfg.model.block_size
            # Non-finite steps in a row. Checkpoints are written only after a finite step, so a resume
            # always starts outside a streak; the total (state.skipped_steps) carries over.
            bad_in_row = 0
            self.model.train()
            if state.step >= tcfg.max_steps and acc.is_main_process:
                print(f"{cfg.run_dir} is already at step {state.step} >= train.max_steps={tcfg.max_steps}; "
                      "raise train.max_steps to train further", flush=True)
            start, t0 = state.step, time.perf_counter()
            metrics = None  # the last step's eval, reused for the final report
            run_t0 = t0
            while state.step < tcfg.max_steps:
                loss, grad_norm, finite, lr = self.train_step(state.step)
                tok_s = tokens_per_step / (time.perf_counter() - t0)
                mfu = self.task.flops_per_token * tok_s / (acc.num_processes * self.peak * 1e12) if self.peak else None
                state.step, state.tokens = state.step + 1, state.tokens + tokens_per_step
                bad_in_row = 0 if finite else bad_in_row + 1
                state.skipped_steps += 0 if finite else 1
                step, last = state.step, state.step == tcfg.max_steps
                first = {"attention_backend": self.attention_backend} if step == start + 1 else {}
                self.log.write({"step": step, "tokens": state.tokens, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                                "tok_per_s": round(tok_s, 1), "mfu": mfu, "skipped_steps": state.skipped_steps,
                                **first})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}",
                                mfu="n/a" if mfu is None else f"{100 * mfu:.1f}%")
                if plain and (step % cfg.logging.log_interval == 0 or last):
                    per_step = (time.perf_counter() - run_t0) / (step - start)
                    print(progress_line(step, tcfg.max_steps, loss, lr, tok_s, per_step), flush=True)
                if bad_in_row >= tcfg.max_bad_steps:
                    bar.close()
                    good = f"is {self.last_good}" if self.last_good else "does not exist (none was written yet)"
                    acc.print(f"stopping: the loss or gradient norm was not finite for {bad_in_row} steps in a "
                              f"row (step {step}). Lower train.lr, raise train.warmup_steps or check the data; the "
                              f"last good checkpoint {good}.")
                    code = 1
                    break
                # One collective per step carries both reasons to stop: a signal, and a metrics append that failed.
                stops = torch.tensor([float(stop.signal_name is not None), float(self.log.failure is not None)],
                                     device=acc.device)
                signalled, log_failed = (acc.reduce(stops, reduction="sum") > 0).tolist()
                if log_failed:
                    raise WriteFailed(describe_failure("a row of metrics.jsonl", self.log.path, self.log.failure,
                                                       self.last_good) if self.log.failure else
                                      "the main process could not append to metrics.jsonl")
                stopping = signalled
                if step % tcfg.eval_interval == 0 or last:
                    metrics = self.evaluate()
                    self.log.write({"step": step, "split": "val", **metrics})
                    if acc.is_main_process:
                        bar.write(f"step {step}: "
                                  + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in metrics.items()))
                sink_interval = tcfg.effective_sink_interval
                if sink_interval and (step % sink_interval == 0 or last):
                    self.measure_sinks(step)
                if (step % tcfg.ckpt_interval == 0 or last or stopping) and bad_in_row == 0:
                    self.save()
                if stopping:
                    bar.close()
                    saved = (f"checkpoint saved at step {step}" if bad_in_row == 0 else
                             f"no checkpoint at step {step} (not finite); the last good one is {self.last_good}")
                    acc.print(f"received {stop.signal_name or 'a stop signal'}: {saved} in {cfg.run_dir}; continue "
                              "with train.resume=auto", flush=True)
                    if acc.is_main_process and (requeued := requeue_if_slurm(stop.signal_name)):
                        print(requeued, flush=True)
                    break
                t0 = time.perf_counter()  # exclude eval, sink and checkpoint time from tok/s
            else:  # max_steps reached
                bar.close()
                if metrics is None:  # nothing trained: the run was already at max_steps
                    metrics = self.evaluate()
                if acc.is_main_process:
                    print(self.task.final_report(metrics, cfg.run_dir), flush=True)
        except WriteFailed as e:  # a checkpoint or metrics write did not reach the disk
            bar.close()
            acc.print(f"error: {e}", file=sys.stderr, flush=True)
            code = 1
        except BaseException:
            self.release_lock()
            raise
        try:
            # Every process leaves together: a rank that tears down gloo while another is still in
            # a collective aborts the whole job.
            acc.wait_for_everyone()
            acc.end_training()  # finishes trackers, destroys the process group
        finally:
            self.release_lock()
        return code
