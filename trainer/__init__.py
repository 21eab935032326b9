"""The training loop and its pieces, one concern per module.

    loop.py        the Trainer: set-up, then one loop (steps, evals, sink probe, checkpoints, stop signals)
    launch.py      the Accelerator: mixed precision, process group, DeepSpeed batch fields
    tasks.py       what differs between the LM and the ViT: data, model, eval metrics, report
    optim.py       AdamW and the learning-rate schedules
    checkpoint.py  writing, checking, finding and loading checkpoints (TrainerState)
    metrics.py     metrics.jsonl (and wandb) rows
    rundir.py      the run dir: checkpoint layout (step dirs, latest), writable before any work, one
                   training process at a time (lock)
    signals.py     SIGTERM / SIGINT: save and exit; requeue under SLURM
    progress.py    plain progress lines when there is no progress bar
"""
