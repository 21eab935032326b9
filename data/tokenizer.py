"""Byte-level BPE: every string encodes (no unknown tokens) and decodes back exactly."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"  # id 0; ends every document in the token shards
BOS = "<|bos|>"  # id 1 when data.bos is set; starts every document


def train_tokenizer(texts: Iterable[str], vocab_size: int, bos: bool = False) -> Tokenizer:
    """Train a GPT-2 style byte-level BPE with `<|endoftext|>` as id 0 (and `<|bos|>` as id 1)."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False and no normalizer keep decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, BOS] if bos else [EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (a prepared dataset dir's, or any pretrained one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer file {path} does not exist; set data.tokenizer to 'bpe' or a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception on a malformed file
        raise ValueError(f"{path} is not a valid tokenizer.json ({e}); set data.tokenizer to 'bpe' or a "
                         "tokenizer.json saved by HF tokenizers") from None
