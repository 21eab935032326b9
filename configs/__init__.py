"""Run configs: YAML files + dotted command-line overrides -> validated dataclasses.

    cfg = load_config("configs/default.yaml", ["model.attention=sigmoid", "train.max_steps=200"])

A YAML file may name a `base:` file (relative to itself) whose values it overrides. Every key
is checked against the dataclasses before any work starts: an unknown key or a value of the
wrong type is a ConfigError that names the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from data.config import DataConfig
from data.images import ImageDataConfig
from model import backends
from model.config import GPTConfig
from model.vit import ViTConfig

CONFIG_DIR = Path(__file__).parent
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
# `task` picks the classes of the model and data sections.
TASKS = {"lm": (GPTConfig, DataConfig), "vit": (ViTConfig, ImageDataConfig)}
# What train.py records at the top of a run's config.yaml next to the config; reading it back ignores them.
RECORDS = ("attention_backend", "eos_token_id", "eval_context", "calibrated_from")  # what ran and where it came from
LR_SCHEDULES = ("cosine", "constant", "wsd")  # train.lr_schedule; trainer/optim.py computes them


# YAML 1.1's boolean words, which an override keeps as text until a boolean key takes them.
YAML_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}


class ConfigError(ValueError):
    """A user error in a config file or override; the message says how to fix it."""


def parse_lr_scale(text: str | None) -> dict[str, float]:
    """train.lr_scale "part=factor,part=factor" -> {part: factor}; a malformed entry is a ConfigError."""
    out = {}
    for entry in (text or "").split(","):
        if not entry.strip():
            continue
        part, _, factor = entry.partition("=")
        try:
            value = float(factor)
        except ValueError:
            value = math.nan
        if not part.strip() or not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"train.lr_scale entry {entry.strip()!r} must look like part=factor with a factor >= 0 "
                              "(e.g. train.lr_scale=sinks=100)")
        out[part.strip()] = value
    return out


@dataclass
class TrainConfig:
    batch_size: int = 16  # global batch: sequences per optimizer step, over all processes
    micro_batch_size: int = 16  # sequences per forward pass per process; shrunk to fit batch_size / processes
    max_steps: int = 600  # optimizer steps to train; the LR schedule ends here
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-4  # cosine / wsd: the learning rate at max_steps
    warmup_steps: int = 50  # linear warmup from lr / warmup_steps to lr
    lr_schedule: str = "cosine"  # cosine | constant | wsd (warmup-stable-decay), see trainer/optim.py
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays linearly to min_lr
    weight_decay: float = 0.1  # AdamW's, on matrices and embeddings (never norms)
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 100  # steps between held-out loss measurements (and at the end)
    eval_windows: int = 256  # held-out sequences per eval, the same set whatever the micro batch and processes
    sink_interval: int | None = None  # steps between sink_1 / f_attn / max_h_ratio rows; null = eval_interval, 0 = off
    ckpt_interval: int = 200  # a checkpoint is also written at the end and on SIGTERM/SIGINT
    keep_last: int | None = None  # keep this many newest step_* checkpoints (and always `latest`); null = all
    resume: str = "auto"  # auto: continue from out/<name>/checkpoints/latest (or the newest step_* when latest is missing); none: fresh run; or a checkpoint dir
    compile: bool = False  # torch.compile the model
    mixed_precision: str = "auto"  # auto = bf16 on CUDA, fp32 elsewhere; no | bf16 | fp16
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row
    # hf:<hub id, transformers folder or GGUF file>, or a run dir a post-hoc fix wrote: start from that model and
    # its tokenizer
    init_from: str | None = None
    # Comma-separated parts of parameter names: only parameters whose name contains one train (e.g.
    # "sinks,g_proj,sink_tokens": a retrofit's new parameters); null = every parameter.
    train_only: str | None = None
    # Comma-separated part=factor: parameters whose name contains part train at factor x the lr of the
    # schedule (e.g. "sinks=100": a retrofit's sink logits move 100x faster); null = every one at 1x.
    lr_scale: str | None = None

    def validate(self):
        for name in ("batch_size", "micro_batch_size", "max_steps", "eval_interval", "eval_windows", "ckpt_interval",
                     "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be a positive integer, got {getattr(self, name)}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision={self.mixed_precision!r} is not one of "
                              "['auto', 'no', 'bf16', 'fp16']")
        for name in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule={self.lr_schedule!r} is not one of {list(LR_SCHEDULES)}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.lr_schedule != "wsd" and self.decay_fraction != TrainConfig.decay_fraction:
            raise ConfigError(f"train.decay_fraction={self.decay_fraction} applies to lr_schedule=wsd only and would "
                              f"be ignored with lr_schedule={self.lr_schedule}; remove it or set train.lr_schedule=wsd")
        if self.lr_schedule == "wsd" and self.warmup_steps > self.max_steps * (1 - self.decay_fraction):
            raise ConfigError(f"train.warmup_steps={self.warmup_steps} runs into the wsd decay, which starts at step "
                              f"{self.max_steps * (1 - self.decay_fraction):g} (max_steps x (1 - decay_fraction)); "
                              "lower train.warmup_steps or train.decay_fraction")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("train.init_from is empty; give hf:<hub id, transformers folder or GGUF file>, a run dir "
                              "that a post-hoc fix wrote, or null")
        if self.train_only is not None and not [p for p in self.train_only.split(",") if p.strip()]:
            raise ConfigError(f"train.train_only={self.train_only!r} names no parameter; give comma-separated parts of "
                              "parameter names (e.g. sinks,g_proj) or null to train every parameter")
        if self.lr_scale is not None:
            parse_lr_scale(self.lr_scale)
        if self.keep_last is not None and self.keep_last < 1:
            raise ConfigError(f"train.keep_last must be >= 1 (checkpoints to keep) or null (keep all), got {self.keep_last}")
        if self.sink_interval is not None and self.sink_interval < 0:
            raise ConfigError(f"train.sink_interval must be >= 0 (0 = off) or null (= train.eval_interval), "
                              f"got {self.sink_interval}")

    @property
    def effective_sink_interval(self) -> int:
        """train.sink_interval with null resolved: steps between in-training sink measurements; 0 = never."""
        return self.eval_interval if self.sink_interval is None else self.sink_interval


@dataclass
class LoggingConfig:
    # An Accelerate tracker the metrics rows also go to, namespaced train/ val/ sink/: wandb, tensorboard, trackio,
    # aim, comet_ml, mlflow, clearml, dvclive or swanlab (its package installed); null = metrics.jsonl only.
    tracker: str | None = None
    wandb: bool = False  # shorthand for tracker=wandb (offline when no API key is configured)
    wandb_project: str = "sinklab"  # the tracker's project name
    progress: bool = True  # progress bar with loss, tok/s, MFU and ETA (plain lines when off or not a terminal)
    log_interval: int = 10  # steps between the plain progress lines

    def validate(self):
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        if self.log_interval <= 0:
            raise ConfigError(f"logging.log_interval must be a positive integer, got {self.log_interval}")
        if self.tracker is not None and self.tracker not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(f"logging.tracker={self.tracker!r} is not one of {sorted(LOGGER_TYPE_TO_CLASS)} "
                              "(Accelerate's trackers) or null")
        if self.wandb and self.tracker not in (None, "wandb"):
            raise ConfigError(f"logging.wandb=true is logging.tracker=wandb, but logging.tracker={self.tracker!r}; "
                              "set one of them")

    @property
    def tracker_name(self) -> str | None:
        """The tracker the run logs to (logging.wandb=true is wandb), or None."""
        return "wandb" if self.wandb else self.tracker


@dataclass
class RunConfig:
    name: str = "default"  # outputs go to <out_dir>/<name>/
    out_dir: str = "out"  # parent folder of the run dirs
    seed: int = 1337  # initial weights and the order of the training batches
    task: str = "lm"  # "lm": decoder on text; "vit": image classifier (model: ViTConfig, data: ImageDataConfig)
    model: GPTConfig | ViTConfig = field(default_factory=GPTConfig)  # the task's model section
    data: DataConfig | ImageDataConfig = field(default_factory=DataConfig)  # the task's data section
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def validate(self):
        if self.name in ("", ".", "..") or any(sep in self.name for sep in ("/", "\\")):
            raise ConfigError(f"name={self.name!r} must be a plain folder name inside out_dir (no '/', '\\', '.' "
                              "or '..'); put the location in out_dir instead")
        if self.task != "lm" and self.train.init_from is not None:
            raise ConfigError(f"train.init_from imports a language model; a {self.task} run cannot start from it "
                              "(remove train.init_from)")
        for section in ("model", "data", "train", "logging"):
            try:
                getattr(self, section).validate()
            except ConfigError:
                raise
            except ValueError as e:
                raise ConfigError(str(e)) from None
        try:
            backends.check_name(self.model)  # model/ validates fields; the backend registry is checked here
        except ValueError as e:
            raise ConfigError(str(e)) from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _allowed_types(tp) -> tuple:
    """The concrete types a field accepts (unwrapping `X | None`)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(a for a in typing.get_args(tp))
    return (tp,)


def _coerce(key: str, value, tp):
    allowed = _allowed_types(tp)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} cannot be null")
    for t in allowed:
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in YAML_BOOLS:  # an override's no / off / yes / on
                return YAML_BOOLS[value.lower()]
        elif t is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif t is float:
            number = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                number = float(value)
            elif isinstance(value, str):  # YAML 1.1 reads "3e-3" (no dot) as a string
                try:
                    number = float(value)
                except ValueError:
                    pass
            if number is not None:
                if not math.isfinite(number):
                    raise ConfigError(f"{key}={value!r} is not a finite number; give a finite value")
                return number
        elif t is str:
            if isinstance(value, str):
                return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    hint = f" (YAML reads no/off/yes/on as booleans: quote the text, {key.rsplit('.', 1)[-1]}: 'no')" \
        if isinstance(value, bool) and str in allowed else ""
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {names}{hint}")


def upgrade_saved(values: dict) -> dict:
    """A run config as older code wrote it (a run dir's config.yaml), in today's terms. The one place that
    knows what older run dirs lack or hold besides the config: runs from before `task` existed are
    language models; RECORDS keys say what ran, for the reader, and are not config (kept here, skipped
    when the config is built). Keys a later version adds need nothing here: a missing key takes its default."""
    return {"task": "lm", **values}


def _build(cls, values: dict, prefix: str):
    """Instantiate dataclass `cls` from a dict, recursing into nested dataclasses."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    if cls is RunConfig:
        values = {k: v for k, v in upgrade_saved(values).items() if k not in RECORDS}
        task = values["task"]
        if task not in TASKS:
            raise ConfigError(f"task={task!r} is not one of {list(TASKS)}")
        hints["model"], hints["data"] = TASKS[task]
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint} (valid keys: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, value, tp)
    if cls is RunConfig:  # sections left out get the task's defaults
        kwargs.setdefault("model", hints["model"]())
        kwargs.setdefault("data", hints["data"]())
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"key {key!r} appears twice in one mapping (again at line "
                                  f"{key_node.start_mark.line + 1}); keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (see configs/ for the shipped ones)")
    if path.resolve() in chain:
        raise ConfigError(f"config file {path} is its own base ({' -> '.join(str(p) for p in (*chain, path.resolve()))}); "
                          "remove the `base:` that closes the cycle")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not a text file; pass a YAML config") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    base = values.pop("base", None)
    if base is not None:
        values = _merge(_read_yaml(path.parent / base, (*chain, path.resolve())), values)
    return values


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """'model.attention=sigmoid' -> {'model': {'attention': 'sigmoid'}} (values parsed as YAML, except that
    no / off / yes / on stay the text typed: `model.gate=no` is refused listing the gates, not read as false;
    a boolean key takes them as booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. model.attention=sigmoid)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def saved_run_config(path: str | Path | None, overrides: list[str], resume: str | None = None):
    """The config a command line continues from: (the run's own config.yaml or None, overrides to apply).

    `--resume RUN_DIR` names the run; without --config, `name=X` (and `out_dir=`) name it when that run dir
    holds a config.yaml: a run continues with its saved config plus only the new overrides, as nanoGPT's
    `init_from=resume` does. Either way the run continues where it lies: out_dir and name are the run dir's
    own, not the ones its config.yaml saved (a run copied or moved there keeps training there). With
    --config the file and the overrides are the whole config, as always."""
    if resume is not None:
        if path is not None:
            raise ConfigError("--resume continues a run with its own config.yaml; leave out --config")
        run_dir = Path(resume).expanduser()
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; pass a run dir like out/default")
        here = [f"out_dir={run_dir.parent}", f"name={run_dir.name}"]
        values = {"out_dir": str(run_dir.parent), "name": run_dir.name}
        for o in overrides:
            values = _merge(values, parse_override(o))
        named = Path(str(values["out_dir"])).expanduser() / str(values["name"])
        if named.resolve() != run_dir.resolve():
            raise ConfigError(f"--resume {resume} continues that run in place, but the overrides name {named}; leave "
                              "out name= and out_dir=, or branch it into a new run with python train.py --config "
                              f"{run_dir / 'config.yaml'} train.resume={run_dir / 'checkpoints'}/step_<N> "
                              f"name=<new name>")
        return run_dir / "config.yaml", [*here, *overrides]
    if path is not None:
        return None, list(overrides)
    values = _read_yaml(DEFAULT_CONFIG)
    for o in overrides:
        values = _merge(values, parse_override(o))
    run_dir = Path(str(values.get("out_dir", "out"))).expanduser() / str(values.get("name", "default"))
    if not (run_dir / "config.yaml").is_file():
        return None, list(overrides)
    return run_dir / "config.yaml", [f"out_dir={run_dir.parent}", f"name={run_dir.name}", *overrides]


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """The run config of a YAML file (default: configs/default.yaml) and dotted overrides. It also records
    `model_fields_given`: the model.* fields the file (when one is named) or an override sets, which
    `train.init_from` must apply or refuse (trainer/tasks.py), never drop."""
    values = _read_yaml(Path(path)) if path else _read_yaml(DEFAULT_CONFIG)
    given = set(values.get("model") or {}) if path and isinstance(values.get("model"), dict) else set()
    for o in overrides:
        over = parse_override(o)
        values = _merge(values, over)
        given |= set(over["model"]) if isinstance(over.get("model"), dict) else set()
    cfg = _build(RunConfig, values, "")
    cfg.model_fields_given = frozenset(given)
    cfg.validate()
    return cfg


def from_dict(values: dict) -> RunConfig:
    """Rebuild a RunConfig from a saved config.yaml (a run's resolved config)."""
    return _build(RunConfig, values, "")
