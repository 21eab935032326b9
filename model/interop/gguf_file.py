"""GGUF files (llama.cpp's format) read through transformers' GGUF loader, dequantised.

    hf:/models/SmolLM2-135M-Instruct.Q4_1.gguf      a .gguf file
    hf:/models/smollm2/                              a folder holding exactly one .gguf (and no config.json)

transformers reads the config and the tokenizer from the file's metadata and dequantises every
tensor (`from_pretrained(folder, gguf_file=name)`, with the `gguf` package); the weights then go
through the same mapping as a transformers folder (model/interop/hf_import.py). A quantised file is not
the original model: `quantization` says which types its tensors have, and every eval records it.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

SUFFIX = ".gguf"


def find_gguf(path: Path) -> Path | None:
    """The GGUF file that `path` names: the file itself, or the one .gguf in a folder without a
    config.json (a transformers folder is not a GGUF). None when `path` is neither."""
    if path.is_file():
        return path.resolve() if path.suffix == SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob(f"*{SUFFIX}"))
    if len(files) > 1:
        raise FileNotFoundError(f"{path} holds {len(files)} .gguf files ({', '.join(f.name for f in files[:4])}); "
                                "name one: hf:<folder>/<file>.gguf")
    return files[0].resolve() if files else None


def architecture(path: Path) -> str:
    """general.architecture of a GGUF file (llama.cpp's name: llama, qwen2, qwen3, gemma2, ...)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e or type(e).__name__})") from None
    return field.contents()


def quantization(path: Path) -> dict:
    """{"type": the file's quantisation (general.file_type, e.g. Q4_1; else the most common type of its
    matrices), "tensor_types": {type: number of tensors}} from the gguf reader."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(path))
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    kind = None
    if "general.file_type" in reader.fields:
        try:
            kind = LlamaFileType(int(reader.fields["general.file_type"].contents())).name.removeprefix("MOSTLY_")
        except ValueError:
            kind = None
    if kind is None:
        matrices = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
        kind = (matrices or counts).most_common(1)[0][0]
    return {"type": kind, "tensor_types": dict(sorted(counts.items()))}


def _where(path: Path) -> dict:
    return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}


def read_config(path: Path):
    """transformers' config of the file; an architecture transformers cannot load is one ValueError."""
    from transformers import AutoConfig

    arch = architecture(path)
    try:
        return AutoConfig.from_pretrained(**_where(path))
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot import GGUF architecture {arch!r} from {path.name}: transformers' GGUF loader "
                         f"refuses it ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None


def read_tokenizer(path: Path):
    """The tokenizer stored in the file, as transformers builds it (a fast tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(**_where(path))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor, dequantised to fp32, in transformers' names (what the folder import reads)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(**_where(path), dtype=torch.float32).state_dict()
