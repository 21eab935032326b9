"""Train a sinklab model: the command line around trainer/loop.py's Trainer (one loop for every config).

    python train.py                                   # default config, embedded Shakespeare
    python train.py --config configs/ablate/sigmoid.yaml train.max_steps=200
    accelerate launch --config_file configs/accelerate/ddp.yaml train.py --config ...

Outputs go to out/<name>/: config.yaml, tokenizer.json, metrics.jsonl and
checkpoints/step_XXXXXXX/ (Accelerate state + trainer_state.json + model.safetensors),
with `latest` pointing at the newest. See docs/design.md, "Training".
"""
from __future__ import annotations

import argparse
import signal
import sys

import yaml

from configs import ConfigError, load_config, saved_run_config, to_dict
from trainer.loop import Trainer
from trainer.signals import exit_during_setup


def parse_args(argv=None):
    from configs.describe import config_help

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=config_help())
    p.add_argument("--config", default=None, help="YAML run config (default: configs/default.yaml, or the run's "
                                                   "own config.yaml when out_dir/name already holds one)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue RUN_DIR (e.g. out/default) with its saved config.yaml plus the overrides given")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML, as the run's config.yaml holds it) and exit without running")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.attention=sigmoid train.max_steps=200")
    return p.parse_intermixed_args(argv)  # overrides may come before and after the flags


def main(argv=None) -> int:
    args = parse_args(argv)
    handlers = exit_during_setup()  # a preemption before the first step requeues too; the loop's StopFlag takes over
    try:
        try:
            saved, overrides = saved_run_config(args.config, args.overrides, args.resume)
            if saved is not None and not args.print_config:
                print(f"continuing {saved.parent} with its config.yaml"
                      + (f" and {' '.join(args.overrides)}" if args.overrides else ""), flush=True)
            cfg = load_config(saved or args.config, overrides)
            if args.print_config:
                print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
                return 0
            trainer = Trainer(cfg)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return trainer.fit()
    finally:
        for sig, handler in handlers.items():  # in-process callers (tests, notebooks) get theirs back
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
