"""The result every eval returns: a dataclass whose `to_json()` is what lands in its JSON file.

Subclasses declare their fields and a `DEFINITIONS` dict (field name -> what it means); fields
whose name starts with "_" (per-token curves, raw tensors) stay out of the JSON, and so do the
fields named in `OPTIONAL` while they are None (numbers only some models or flags have). `checkpoint`
is filled in by the CLI with where the numbers came from (see eval/cli.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar


@dataclass
class EvalResult:
    DEFINITIONS: ClassVar[dict] = {}
    AXES: ClassVar[dict] = {}  # headline field -> its axis label with the unit (the over-steps plot)
    OPTIONAL: ClassVar[tuple] = ()  # fields left out of the JSON while None
    checkpoint: dict | None = field(default=None, kw_only=True)

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")
               and not (f.name in self.OPTIONAL and getattr(self, f.name) is None)}
        out["definitions"] = {**self.definitions(), "checkpoint": CHECKPOINT_DEFINITION}
        return out

    def definitions(self) -> dict:
        """`DEFINITIONS`; a subclass whose wording depends on its parameters overrides this."""
        return dict(self.DEFINITIONS)


CHECKPOINT_DEFINITION = ("path: the checkpoint evaluated (an hf: import's transformers folder or GGUF file); step and "
                         "tokens: training step and tokens seen when it was written (trainer_state.json; null when "
                         "unknown); quantization: a GGUF file's quantisation, type (general.file_type, e.g. Q4_1: "
                         "the weights were dequantised from it, so this is not the original model) and "
                         "tensor_types (tensors per GGML type), null for unquantised weights; ref, model_type, "
                         "format: an import's hf: reference, transformers model_type and gguf / transformers; "
                         "git_commit: HEAD of the code that ran the eval (null outside a git checkout)")

# The attention weights that sink and backcopy report, in their definitions.
PROXY_NOTE = ("renormalised weights: each row divided by its sum over the text keys (Gu et al.'s proxy w/sum(w) "
              "for sigmoid / elu1 without attn_normalize and softpick, a zero-mass softpick row as 0; the sink "
              "logit's slot and the learned sink tokens left out); raw weights (*_raw): what the model applies to each text key's value, as transformers' "
              "output_attentions returns them")
