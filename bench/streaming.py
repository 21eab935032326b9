"""The streaming row of `python -m bench`: tokens/s of eval.streaming's exact parallel form, of
token-by-token decoding through the sink cache, and of transformers' own token-by-token decoding
with its KV cache (DynamicCache: it keeps every token, transformers has no sink cache), for one
transformers model imported into the GPT. The stream is random token ids (speed does not depend
on the text); the NLL differences say the three compute the same thing:
parallel vs token-by-token over the whole stream, ours vs transformers' before the first eviction.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from eval.streaming import evaluate
from model.gpt import GPT
from model.interop.hf_import import init_model
from model.weights import load_state


def random_llama(folder: Path, n_layer: int, n_head: int, n_embd: int, vocab: int, context: int) -> Path:
    """A randomly initialised LlamaForCausalLM saved to `folder`, with a word-level tokenizer of its
    `vocab` ids (the stream is random ids; an import reads a folder's tokenizer with its weights)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=n_embd, intermediate_size=4 * n_embd, num_hidden_layers=n_layer,
                      num_attention_heads=n_head, num_key_value_heads=n_head, max_position_embeddings=context,
                      tie_word_embeddings=True, initializer_range=0.2)  # not near-uniform: NLL diffs mean something
    LlamaForCausalLM(cfg).save_pretrained(folder)
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0").save_pretrained(folder)
    return folder


@torch.inference_mode()
def hf_decode_nll(hf_model, tokens: torch.Tensor) -> tuple[torch.Tensor, float]:
    """transformers' own decoding: one token per forward with a DynamicCache; (NLL per next token, seconds)."""
    from transformers import DynamicCache

    cache, nll = DynamicCache(), torch.empty(len(tokens) - 1)
    t0 = time.perf_counter()
    for t in range(len(tokens) - 1):
        out = hf_model(tokens[None, t : t + 1], cache=cache, use_cache=True)
        nll[t] = F.cross_entropy(out.logits[0, -1:].float(), tokens[t + 1 : t + 2])
    return nll, time.perf_counter() - t0


def streaming_row(folder: str | Path | None, n_tokens: int, n_sink: int, window: int, chunk: int,
                  shape: dict | None = None) -> dict:
    """One row: the model in `folder` (a transformers folder), or a random Llama of `shape`
    (n_layer, n_head, n_embd, vocab) when folder is None. Sinks mode, reference order (S+W+1 keys)."""
    from transformers import AutoModelForCausalLM

    name = "random llama" if folder is None else Path(folder).name
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            folder = random_llama(Path(tmp) / "llama", context=n_tokens + 1, **shape)
        cfg, state = init_model(f"hf:{folder}")
        model = GPT(cfg).eval()
        load_state(model, state, str(folder))
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    if n_tokens > cfg.block_size:
        raise ValueError(f"--stream-tokens {n_tokens} is past the model's context of {cfg.block_size}, where "
                         "transformers' own decoding (no eviction) would run out of positions; lower it")
    tokens = torch.randint(0, cfg.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(0))
    runs = {name: evaluate(model, tokens, n_sink, window, ("sinks",), exact_decode=exact, chunk=chunk)
            for name, exact in (("parallel", False), ("token_by_token", True))}
    hf_nll, hf_seconds = hf_decode_nll(hf_model, tokens)
    first_eviction = runs["parallel"].first_eviction
    speed = {name: r.modes["sinks"]["tokens_per_s"] for name, r in runs.items()}
    speed["hf_decode"] = (n_tokens - 1) / hf_seconds
    curves = {name: torch.from_numpy(r._curves["sinks"]) for name, r in runs.items()}
    return {
        "model": name,
        "layers": cfg.n_layer, "width": cfg.n_embd, "tokens": n_tokens, "cache": f"{n_sink}+{window}",
        "chunk": chunk, "threads": torch.get_num_threads(),
        "parallel_tok_s": speed["parallel"], "token_by_token_tok_s": speed["token_by_token"],
        "hf_decode_tok_s": speed["hf_decode"],
        "parallel_vs_token_by_token": speed["parallel"] / speed["token_by_token"],
        "parallel_vs_hf_decode": speed["parallel"] / speed["hf_decode"],
        "token_by_token_vs_hf_decode": speed["token_by_token"] / speed["hf_decode"],
        "max_nll_diff_parallel_vs_token_by_token": float((curves["parallel"] - curves["token_by_token"]).abs().max()),
        "max_nll_diff_vs_hf_before_eviction": float(
            (curves["token_by_token"][:first_eviction] - hf_nll[:first_eviction]).abs().max()),
    }
