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
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer file {path} does not exist; set data.tokenizer to 'bpe' or a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception on a malformed file
        raise ValueError(f"{path} is not a valid tokenizer.json ({e}); set data.tokenizer to 'bpe' or a "
                         "tokenizer.json saved by HF tokenizers") from None


# --- pretrained tokenizers (data.tokenizer other than "bpe") -------------------------------

# Document separators tried, in order, when a bare tokenizer.json names no EOS token.
EOS_CANDIDATES = (EOT, "</s>", "<|end_of_text|>")


def load_pretrained(spec: str) -> tuple[Tokenizer, str]:
    """(tokenizer, end-of-document token) for data.tokenizer = `spec`.

    `spec` is a tokenizer.json file, a folder holding one (a transformers `save_pretrained`
    folder), a GGUF file (its tokenizer, as transformers reads it), or an HF hub id such as `gpt2` or `meta-llama/Llama-3.2-1B` (loaded through
    transformers' AutoTokenizer, so gated models need `huggingface-cli login`). `~` is expanded.

    BOS/EOS: every document is encoded as plain text (add_special_tokens=False, so a template
    such as Llama's automatic `<s>` is not applied) and followed by the end-of-document token:
    the folder's or hub model's `eos_token` (tokenizer_config.json), else the first of
    EOS_CANDIDATES the vocabulary has. A BOS token, if wanted, is added by the data.bos option.
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":  # llama.cpp's file: the tokenizer is in its metadata
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return _with_eos(hf.backend_tokenizer, hf.eos_token, spec)
    if path.is_file():
        return _with_eos(load_tokenizer(path), None, spec)
    if path.is_dir() and not (path / "tokenizer_config.json").is_file():
        return _with_eos(load_tokenizer(path), None, spec)
    from transformers import AutoTokenizer  # only here: a heavy import most runs never need

    try:
        hf = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else spec, use_fast=True)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"data.tokenizer={spec!r}: not a tokenizer.json, a folder with one, or a loadable hub id "
                         f"({first_line}); set data.tokenizer to 'bpe' or fix the name") from None
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"data.tokenizer={spec!r} has no fast (tokenizers) version; use a tokenizer.json instead")
    return _with_eos(hf.backend_tokenizer, hf.eos_token, spec)


def _with_eos(tok: Tokenizer, eos: str | None, spec: str) -> tuple[Tokenizer, str]:
    candidates = (eos,) if eos else EOS_CANDIDATES
    for token in candidates:
        if tok.token_to_id(token) is not None:
            return tok, token
    raise ValueError(f"data.tokenizer={spec!r} has no end-of-document token (tried {list(candidates)}) to separate "
                     "documents; use a tokenizer that defines eos_token")
