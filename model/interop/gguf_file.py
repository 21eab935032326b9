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
        return field.contents()
    except Exception as e:  # noqa: BLE001 - a cut or damaged header fails anywhere in numpy's reads (IndexError, ...)
        raise ValueError(f"{path} is not a readable GGUF file (truncated or damaged: {type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); download or "
                         "convert it again") from None


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


def gguf_name(hf_name: str, arch: str, n_layer: int) -> str:
    """llama.cpp's name of a transformers tensor name (model.layers.1.self_attn.q_proj.weight ->
    blk.1.attn_q.weight), or the name itself when gguf's table lacks it."""
    import gguf

    kind = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    base, _, suffix = hf_name.rpartition(".")
    found = gguf.get_tensor_name_map(kind, n_layer).get_name(base) if kind is not None else None
    return f"{found}.{suffix}" if found else hf_name


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor, dequantised to fp32, in transformers' names (what the folder import reads). A tensor the
    architecture needs and the file lacks is a ValueError naming it: transformers would start it at random."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(**_where(path), dtype=torch.float32, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        names = [gguf_name(k, architecture(path), model.config.num_hidden_layers) for k in missing]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"{path} lacks the tensor {names[0]} ({missing[0]}){more} that its "
                         f"{model.config.model_type} architecture needs; convert the model to GGUF again")
    return model.state_dict()
