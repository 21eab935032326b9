"""Generate text from a trained run, printing tokens as they come.

    python sample.py --ckpt out/default --prompt "ROMEO:"
    python sample.py --ckpt out/default --prompt-file prompt.txt --num-samples 3 --top-p 0.9
    python sample.py --ckpt out/default --sink-cache 4 --window 252 --max-new-tokens 5000   # no length limit
    python sample.py --ckpt hf:HuggingFaceTB/SmolLM2-135M --dtype bf16 --prompt "The sink"  # a pretrained model
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from runs.load import load_run
from util import DTYPES, pick_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir (uses its latest checkpoint), a checkpoint dir, or "
                                                 "hf:<hub id, transformers folder or GGUF file>")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--sink-cache", type=int, default=None, metavar="S",
                   help="keep S first tokens + --window recent ones (StreamingLLM): generate past the context")
    p.add_argument("--window", type=int, default=None, help="recent tokens kept with --sink-cache")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="cast the weights (default fp32)")
    return p.parse_args(argv)


def check_flags(args):
    """Flags that are wrong whatever the model: said before anything is loaded."""
    if args.max_new_tokens < 0:
        raise ValueError("--max-new-tokens must be >= 0")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (leave it out to sample from the whole vocabulary), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # (NaN fails this too)
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.num_samples < 1:
        raise ValueError("--num-samples must be >= 1")
    if (args.sink_cache is None) != (args.window is None):
        raise ValueError("--sink-cache S and --window W go together")


def check_args(args, block_size: int, n_prompt: int):
    """User errors that depend on the model and the prompt, said before any generation starts."""
    check_flags(args)
    if n_prompt == 0:
        raise ValueError("the prompt is empty; pass --prompt with some text")
    if args.sink_cache is not None:
        if args.sink_cache < 0 or args.window < 1 or args.sink_cache + args.window > block_size:
            raise ValueError(f"need --sink-cache >= 0, --window >= 1 and their sum <= the context ({block_size})")
    elif n_prompt + args.max_new_tokens > block_size:
        raise ValueError(f"prompt ({n_prompt} tokens) + --max-new-tokens ({args.max_new_tokens}) exceed the model's "
                         f"context of {block_size} tokens; shorten them, or generate without a limit with "
                         f"--sink-cache 4 --window {block_size - 4}")


class TextStream:
    """The text of generated tokens as they come: after the prompt's text, the pieces add up to
    decoding prompt and generation at once.

    Each new token is decoded together with a few tokens before it, and the text those gave
    is cut off: decoders that drop a word's leading space at the start of a sequence
    (SentencePiece's Metaspace in Llama 2, Mistral) keep it, and a multi-byte character split
    over tokens waits until it is whole.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tok, self.ids = tokenizer, list(prompt_ids)
        self.done = len(self.ids)  # the text of ids[:done] is out already
        self.start = max(0, self.done - 4)  # decode from here: context for the next token's text

    def push(self, token: int) -> str:
        self.ids.append(token)
        shown = self.tok.decode(self.ids[self.start : self.done])
        text = self.tok.decode(self.ids[self.start :])
        if text.endswith("\ufffd") or len(text) <= len(shown):
            return ""
        self.start, self.done = self.done, len(self.ids)
        return text[len(shown):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        text = self.tok.decode(self.ids[self.start :])[len(self.tok.decode(self.ids[self.start : self.done])):]
        self.start = self.done = len(self.ids)
        return text


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_flags(args)
        args.device = pick_device(args.device)
        prompt = args.prompt_file.read_text() if args.prompt_file else args.prompt
        run = load_run(args.ckpt, device=args.device, task="lm", dtype=args.dtype)
        ids = run.tokenizer.encode(prompt).ids
        check_args(args, run.model.config.block_size, len(ids))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = run.tokenizer
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for i in range(args.num_samples):
        idx = torch.tensor([ids], device=args.device)
        cache = None if args.sink_cache is None else run.model.make_cache(args.sink_cache, args.window)
        stream = TextStream(tok, ids)

        def show(token):
            sys.stdout.write(stream.push(int(token[0])))
            sys.stdout.flush()

        sys.stdout.write(prompt)
        run.model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, cache=cache, generator=generator, on_token=show)
        sys.stdout.write(stream.flush() + "\n")
        if i + 1 < args.num_samples:
            sys.stdout.write("-" * 40 + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
