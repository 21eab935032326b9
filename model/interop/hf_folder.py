"""A transformers model folder read the way transformers reads it, and refused in one line when damaged.

Every import path (evals, sample.py, `train.init_from`, the hub download) reads a folder through
these functions, so a truncated weight file, a config.json that is cut off or disagrees with the
weights, a missing tokenizer or a config vocabulary smaller than the tokenizer's is a ValueError
naming the file and what is wrong, never a traceback from deep inside a library.

Weight files are exactly the ones `from_pretrained` would load: `model.safetensors`, or the shards
that `model.safetensors.index.json` lists, else `pytorch_model.bin` or its index's shards. Other
files beside them (a `model_fp16.safetensors`, Mistral's `consolidated.safetensors`) are ignored.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG = "config.json"
# transformers' weight files, in the order from_pretrained looks for them: (single file, index of shards).
WEIGHT_NAMES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))
# Tokenizer files: one of them must be there (tokenizer.json; SentencePiece's; GPT-2-style BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# What a hub download fetches besides the weight files: config, index and tokenizer in every format.
HUB_METADATA = ["*.json", "tokenizer*", "*.model", "*.txt"]


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_json(path: Path) -> dict:
    """A JSON file of the folder, or ValueError naming it (missing, cut off, not an object)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path} is damaged, not valid JSON ({first_line(e)}); download or save it again") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is damaged: it holds {type(value).__name__}, not a JSON object")
    return value


def load_config(folder: Path):
    """transformers' config of the folder; a missing, cut-off or unreadable config.json is named."""
    from transformers import AutoConfig

    path = folder / CONFIG
    read_json(path)
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} cannot be read as a transformers config ({first_line(e)})") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files from_pretrained would load (see the module doc); [] when there are none."""
    for single, index in WEIGHT_NAMES:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{folder / index} is damaged: it has no weight_map of tensor names to shard files")
            shards = [folder / name for name in sorted(set(weight_map.values()))]
            for shard in shards:
                if not shard.is_file():
                    raise ValueError(f"{shard} is missing ({index} lists it); download the folder again")
            return shards
    return []


def shard_names(index: dict) -> list[str]:
    """The shard files a weight index lists (what a hub download fetches after the index)."""
    return sorted(set((index.get("weight_map") or {}).values()))


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files; a truncated or damaged file is named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = weight_files(folder)
    if not files:
        raise ValueError(f"{folder} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                         "weights")
    state = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                state.update(load_file(str(f)))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as e:
            raise ValueError(f"{f} is truncated or damaged ({first_line(e)}); download or save it again") from None
    return state


def check_shapes(model: torch.nn.Module, state: dict, config_file: Path) -> None:
    """Every tensor has the shape the config gives it, else ValueError naming the config."""
    expected = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        name, got, want = wrong[0]
        raise ValueError(f"{config_file} disagrees with the weights: {name} is {got} in the weight files but "
                         f"{want} by the config ({len(wrong)} tensor(s) differ); the config and weights do not belong "
                         "together")


def load_tokenizer(folder: Path):
    """The folder's fast tokenizer as transformers loads it; a missing or damaged tokenizer file is named."""
    from transformers import AutoTokenizer

    present = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not present:
        raise ValueError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
                         "there with tokenizer.save_pretrained")
    if (folder / "tokenizer.json").is_file():
        read_json(folder / "tokenizer.json")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # tokenizers and sentencepiece raise bare Exceptions for damaged files
        names = ", ".join(p.name for p in present)
        raise ValueError(f"{folder}: the tokenizer ({names}) cannot be loaded ({first_line(e)}); "
                         "save it again with tokenizer.save_pretrained") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{folder}: the tokenizer has no fast (tokenizers) version; save a tokenizer.json with it")
    return tok


def check_vocab(tokenizer, vocab_size: int, source: Path) -> None:
    """The model's embedding covers the tokenizer's base vocabulary and its BOS / EOS (what any text and
    every document boundary encode to). Added tokens past it are allowed: transformers adds some on load
    (Qwen2's tokenizer class adds <|endoftext|>) that plain text never produces."""
    ids = [tokenizer.vocab_size - 1, tokenizer.bos_token_id, tokenizer.eos_token_id]
    n = max(i for i in ids if i is not None) + 1
    if n > vocab_size:
        raise ValueError(f"{source}: vocab_size={vocab_size} is smaller than the tokenizer's {n} tokens; token ids "
                         f">= {vocab_size} have no embedding (the config and tokenizer do not belong together)")
