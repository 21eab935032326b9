"""What differs between training the decoder on text and the ViT on images, behind one interface.

    task = make_task(cfg)
    cfg = task.prepare(acc)            # load / prepare the data; returns the run config with what the data fills in
    task.save_artifacts(run_dir)       # files a run dir needs besides config.yaml (the tokenizer)
    task.data_fingerprint()            # what the training data depends on (None: nothing to check)
    model = task.build_model()         # and task.flops_per_token
    task.load_initial_weights(model)   # train.init_from's weights (a fresh run only)
    train, val = task.loaders(acc, grad_accum)
    task.batch_metrics(out, y)         # per-batch means, named by task.metric_names
    task.probe_inputs()                # fixed held-out inputs for the sink measurement
    task.final_report(metrics, run_dir)

prepare() raises ConfigError for data that does not fit the model, before the run dir is written. The
config it was given stays as it was validated; what the data decides (the vocabulary size, the classes, an
import's model and tokenizer) is in the config it returns, which the task uses from then on.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from configs import ConfigError
from data.images import load_images
from data.loader import TokenSplit, make_loader
from data.prepare import fingerprint, prepare
from model import GPT
from model.flops import training_flops_per_token
from model.interop.hf_import import init_model, locate
from model.interop.retrofit import FIXES, added_fields, complete_state
from model.vit import ViT
from model.vit import training_flops_per_token as vit_flops_per_token
from model.weights import load_state
from probes.sequences import held_out_sequences

from .checkpoint import RESUME_MAY_CHANGE

N_PROBE = 8  # held-out inputs for the in-training sink measurement


def run_model(path: str) -> tuple:
    """(model config, state dict, tokenizer spec) of a run dir or checkpoint dir for train.init_from: the
    newest checkpoint's weights and config; the tokenizer the run's data names when it still exists (an
    import's folder or GGUF file, whose EOS separates documents), else the checkpoint's tokenizer.json."""
    import yaml
    from safetensors.torch import load_file

    from configs import from_dict
    from model.weights import WEIGHTS

    from .rundir import newest_checkpoint

    ckpt = Path(path)
    ckpt = newest_checkpoint(ckpt / "checkpoints") or ckpt
    if not (ckpt / WEIGHTS).is_file() or not (ckpt / "config.yaml").is_file():
        raise FileNotFoundError(f"{path} holds no checkpoint ({WEIGHTS} and config.yaml); name a run dir or hf:<model>")
    saved = yaml.safe_load((ckpt / "config.yaml").read_text())
    if saved.get("task", "lm") != "lm":
        raise ValueError(f"{path} is a {saved['task']} run; train.init_from takes a language model")
    model = from_dict({"task": "lm", "model": saved["model"]}).model
    named = (saved.get("data") or {}).get("tokenizer")
    spec = named if named and Path(str(named)).expanduser().exists() else str(ckpt / "tokenizer.json")
    return model, load_file(str(ckpt / WEIGHTS)), spec


# What train.init_from takes from the run's model section besides a retrofit's FIXES: how kernels run, the
# sink logit's start, and a training window up to the import's context. Every other model.* field is the
# import's; a run that sets one to another value is refused (check_given_fields), never silently dropped.
INIT_FROM_APPLIES = ("backend", "linear_chunk_size", "sink_logit_init", "block_size", *FIXES)


def check_given_fields(cfg, imported) -> None:
    """Refuse, naming each one, the model.* fields the run sets (its config file or overrides) that the import
    fixes to another value, and a block_size past the import's context."""
    given = getattr(cfg, "model_fields_given", frozenset())
    conflicts = [f"model.{k}={getattr(cfg.model, k)!r} (the import has {getattr(imported, k)!r})"
                 for k in sorted(given) if k not in INIT_FROM_APPLIES and getattr(cfg.model, k) != getattr(imported, k)]
    if "block_size" in given and cfg.model.block_size > imported.block_size:
        conflicts.append(f"model.block_size={cfg.model.block_size} (past the import's context of "
                         f"{imported.block_size} tokens)")
    if conflicts:
        raise ConfigError(f"train.init_from={cfg.train.init_from}: the import fixes the model, but the run sets "
                          + "; ".join(conflicts) + ". Drop those settings; a run from an import may set only "
                          + ", ".join(f"model.{k}" for k in INIT_FROM_APPLIES) + " (block_size up to its context)")


class LMTask:
    """The decoder on tokenised text: next-token cross-entropy on random windows."""

    metric_names = ("val_loss",)

    def __init__(self, cfg):
        self.cfg = cfg
        self.initial_state = None  # train.init_from's state dict, until load_initial_weights
        self.sink_token_ids = []  # a retrofit's model.sink_tokens start as these tokens' embeddings

    def prepare(self, acc):
        resumed = None
        if self.cfg.train.init_from is not None:
            resumed = self.resumed_import(acc)
            if resumed is None:
                self.import_model(acc)
        cfg = self.cfg
        if resumed is not None and not Path(cfg.data.tokenizer).exists():
            self.data_dir = self.prepared_data_of(resumed)
        else:
            with acc.main_process_first():
                self.data_dir = prepare(cfg.data, progress=acc.is_main_process and cfg.logging.progress)
        self.meta = json.loads((self.data_dir / "meta.json").read_text())
        vocab = self.meta["vocab_size"]
        if cfg.model.vocab_size is None:
            self.cfg = cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab))
        elif cfg.model.vocab_size < vocab:
            raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({vocab}); set model.vocab_size={vocab} or leave it null")
        split, n = min(((s, self.meta[f"{s}_tokens"]) for s in ("train", "val")  # None: generated, no limit
                        if self.meta[f"{s}_tokens"] is not None), key=lambda t: t[1])
        if n < cfg.model.block_size + 1:
            raise ConfigError(f"the {split} split of {cfg.data.source} has {n} tokens, fewer than model.block_size "
                              f"+ 1 = {cfg.model.block_size + 1}; lower model.block_size or add data")
        return cfg

    def import_model(self, acc) -> None:
        """train.init_from=hf:...: the model config and weights of the import, and its tokenizer for the data.

        The run keeps its attention backend and may train on shorter windows than the import's context.
        data.tokenizer becomes the import's folder (or GGUF file), so data prep ends documents with the
        import's EOS."""
        cfg, ref = self.cfg, self.cfg.train.init_from
        try:
            if not ref.startswith("hf:"):  # a run dir that no training wrote (fixes/): its model, weights, tokenizer
                imported, self.initial_state, tokenizer_spec = run_model(ref)
                fixes = added_fields(cfg.model, imported)
                if fixes.get("sink_tokens"):
                    raise ValueError("model.sink_tokens on a run dir: start the run from the hf: import instead")
            else:
                imported, self.initial_state = init_model(ref)
                fixes = added_fields(cfg.model, imported)
                source = locate(ref)
                tokenizer_spec = source.tokenizer_spec  # the folder, or the GGUF file
                if fixes.get("sink_tokens"):  # they start as the import's BOS (else EOS) embedding
                    tok = source.tokenizer()
                    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
                    self.sink_token_ids = [start] * fixes["sink_tokens"]
        except FileNotFoundError as e:
            raise ConfigError(f"train.init_from: {e}") from None
        except ValueError as e:
            raise ConfigError(f"train.init_from={ref!r}: {e}") from None
        check_given_fields(cfg, imported)
        imported.backend = cfg.model.backend
        if cfg.model.block_size < imported.block_size:
            imported.block_size = cfg.model.block_size
        for name, value in fixes.items():  # a retrofit: model/interop/retrofit.py starts them as the identity
            setattr(imported, name, value)
        imported.sink_logit_init = cfg.model.sink_logit_init
        imported.validate()
        added = ", ".join(f"model.{k}={v}" for k, v in fixes.items())
        acc.print(f"init_from {ref}: model config and tokenizer from the import, block_size {imported.block_size}"
                  + (f"; retrofit {added}" if added else ""))
        # The data is tokenised by the import's tokenizer: its folder, or the GGUF file (a run dir: its data's).
        self.cfg = replace(cfg, model=imported, data=replace(cfg.data, tokenizer=tokenizer_spec))

    def resumed_import(self, acc) -> Path | None:
        """Resuming a train.init_from run: its checkpoint holds the model config, weights and tokenizer, so the
        import is not read again (its folder may be gone). Returns that checkpoint, or None for a fresh start."""
        import yaml

        from configs import from_dict
        from trainer.checkpoint import resume_candidate

        cfg = self.cfg
        ckpt = resume_candidate(cfg)
        if ckpt is None or not (ckpt / "config.yaml").is_file():
            return None  # a fresh run, or a checkpoint find_resume_checkpoint refuses with its own message
        saved = yaml.safe_load((ckpt / "config.yaml").read_text())
        model = from_dict({"task": "lm", "model": saved["model"]}).model
        changed = [f"model.{k}: {getattr(model, k)!r} -> {getattr(cfg.model, k)!r}"
                   for k in sorted(getattr(cfg, "model_fields_given", ())) if k not in RESUME_MAY_CHANGE
                   and getattr(cfg.model, k) != getattr(model, k)]
        if changed:  # what a plain run's resume refuses too (trainer/checkpoint.py)
            raise ConfigError(f"cannot resume {cfg.run_dir} (train.init_from) with a different model config ("
                              + "; ".join(changed) + "). Use name=<new name> for a new run, or drop those overrides.")
        for k in RESUME_MAY_CHANGE:  # same math, other kernels
            if hasattr(model, k):
                setattr(model, k, getattr(cfg.model, k))
        self.cfg = replace(cfg, model=model, data=replace(cfg.data, tokenizer=saved["data"]["tokenizer"]))
        acc.print(f"init_from {cfg.train.init_from}: resuming, model config and tokenizer from {ckpt}")
        return ckpt

    def prepared_data_of(self, ckpt: Path) -> Path:
        """The prepared data a resumed init_from run trained on, found by the dataset key its checkpoint
        recorded, when the import's tokenizer folder is gone (data prep would need it to compute the key)."""
        from data.prepare import validate_prepared
        from trainer.checkpoint import TrainerState

        saved = TrainerState.read(ckpt).data_fingerprint or {}
        data_dir = Path(self.cfg.data.cache_dir).expanduser() / str(saved.get("dataset_key"))
        try:
            validate_prepared(data_dir)
        except ValueError as e:
            raise ConfigError(f"data.tokenizer={self.cfg.data.tokenizer} (the init_from folder) is gone and the data "
                              f"prepared with it is not in {data_dir} ({e}); restore the folder or "
                              f"data.cache_dir to resume") from None
        return data_dir

    def load_initial_weights(self, model: torch.nn.Module) -> None:
        """Copy train.init_from's weights into the freshly built model (then drop them), with a
        retrofit's new parameters started as the identity (model/interop/retrofit.py)."""
        if self.initial_state is not None:
            state = complete_state(self.initial_state, self.cfg.model, self.sink_token_ids)
            load_state(model, state, self.cfg.train.init_from)
            self.initial_state = None

    def save_artifacts(self, run_dir: Path) -> None:
        shutil.copyfile(self.data_dir / "tokenizer.json", run_dir / "tokenizer.json")

    def data_fingerprint(self) -> dict:
        """What the training tokens depend on, stored with each checkpoint and compared on resume."""
        return fingerprint(self.data_dir)

    def build_model(self) -> torch.nn.Module:
        self.flops_per_token = training_flops_per_token(self.cfg.model, self.cfg.model.block_size)
        return GPT(self.cfg.model)

    def loaders(self, acc, grad_accum: int):
        cfg = self.cfg
        mb, T = cfg.train.micro_batch_size, cfg.model.block_size
        train = make_loader(self.data_dir, "train", mb, T, cfg.seed, acc.process_index, acc.num_processes, grad_accum)
        return train, make_loader(self.data_dir, "val", mb, T, cfg.seed)

    def batch_metrics(self, out, y) -> list[torch.Tensor]:
        return [out.loss.float()]

    def probe_inputs(self) -> torch.Tensor:
        """N_PROBE fixed windows of block_size tokens from the start of the val split, as the evals take them
        (BOS first when the data puts BOS at document starts)."""
        bos_id = self.meta.get("bos_id") if getattr(self.cfg.data, "bos", False) else None
        return held_out_sequences(TokenSplit(self.data_dir, "val").tokens, N_PROBE, self.cfg.model.block_size, bos_id)

    def final_report(self, metrics: dict, run_dir: Path) -> str:
        val, uni = metrics["val_loss"], self.meta["unigram_val_nll"]
        than = f"{uni - val:.2f} nats better" if val <= uni else f"{val - uni:.2f} nats worse"
        return (f"final val loss {val:.4f} nats/token  |  unigram baseline {uni:.4f}  |  "
                f"{than} than the baseline  ({run_dir})")


class ViTTask:
    """The ViT on labelled images: classification cross-entropy and accuracy."""

    metric_names = ("val_loss", "val_accuracy")

    def __init__(self, cfg):
        self.cfg = cfg

    def prepare(self, acc):
        """Load the image splits and check them against the model (n_classes null = from the data)."""
        cfg = self.cfg
        self.images = load_images(cfg.data)
        want = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
        if self.images.shape != want:
            raise ConfigError(f"data.source={cfg.data.source!r} has images of shape {self.images.shape} (C, H, W) but "
                              f"the model takes {want}; set model.in_channels and model.image_size to match")
        if cfg.model.n_classes is None:
            self.cfg = cfg = replace(cfg, model=replace(cfg.model, n_classes=self.images.n_classes))
        elif cfg.model.n_classes < self.images.n_classes:
            raise ConfigError(f"model.n_classes={cfg.model.n_classes} is below the data's {self.images.n_classes} "
                              "classes; raise it or leave it null")
        return cfg

    def save_artifacts(self, run_dir: Path) -> None:
        pass  # images need no tokenizer

    def load_initial_weights(self, model: torch.nn.Module) -> None:
        pass  # train.init_from is for language models (refused for a ViT by the config)

    def data_fingerprint(self) -> None:
        return None  # the images are loaded whole each run; nothing prepared to drift

    def build_model(self) -> torch.nn.Module:
        self.flops_per_token = vit_flops_per_token(self.cfg.model)
        return ViT(self.cfg.model)

    def loaders(self, acc, grad_accum: int):
        cfg = self.cfg
        mb = cfg.train.micro_batch_size
        train = self.images.loader("train", mb, cfg.seed, acc.process_index, acc.num_processes, grad_accum, cfg.data)
        return train, self.images.loader("val", mb, cfg.seed)

    def batch_metrics(self, out, y) -> list[torch.Tensor]:
        return [out.loss.float(), (out.logits.argmax(-1) == y).float().mean()]

    def probe_inputs(self) -> torch.Tensor:
        """The first N_PROBE held-out images (unaugmented)."""
        return next(self.images.loader("val", N_PROBE, self.cfg.seed).eval_windows(N_PROBE))[0]

    def final_report(self, metrics: dict, run_dir: Path) -> str:
        return (f"final val loss {metrics['val_loss']:.4f}  |  val accuracy {metrics['val_accuracy']:.4f}  |  "
                f"chance {1 / self.cfg.model.n_classes:.4f}  ({run_dir})")


def make_task(cfg) -> LMTask | ViTTask:
    return {"lm": LMTask, "vit": ViTTask}[cfg.task](cfg)
