"""Generate text from a trained run, printing tokens as they come.

    python sample.py --ckpt out/default --prompt "ROMEO:"
    python sample.py --ckpt out/default --prompt-file prompt.txt --num-samples 3 --top-p 0.9
    python sample.py --ckpt out/default --n-sink 4 --window 252 --max-new-tokens 5000   # streaming, no length limit
    python sample.py --ckpt hf:HuggingFaceTB/SmolLM2-135M --dtype bf16 --prompt "The sink"  # a pretrained model

Past the context (prompt plus new tokens longer than block_size) without --n-sink, each token is
predicted from the last block_size tokens, recomputed (nanoGPT's crop); --n-sink S --window W
streams with a sink cache instead, one token per step.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from eval import HelpFormatter
from model.gpt import sample_next
from runs.load import load_run
from util import DTYPES, pick_device


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)  # every flag's default shown
    p.add_argument("--ckpt", required=True, help="run dir (uses its latest checkpoint), a checkpoint dir, or "
                                                 "hf:<hub id, transformers folder or GGUF file>")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (none: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (none: off)")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw")
    # --n-sink as eval.streaming names S; --sink-cache is its older name here
    p.add_argument("--n-sink", "--sink-cache", dest="n_sink", type=int, default=None, metavar="S",
                   help="keep S first tokens + --window recent ones (StreamingLLM's sink cache); none: crop "
                        "to the last block_size tokens past the context")
    p.add_argument("--window", type=int, default=None, help="recent tokens kept with --n-sink")
    p.add_argument("--device", default=None, help="cpu or cuda (none: cuda when available)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="cast the weights (none: fp32)")
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
    if (args.n_sink is None) != (args.window is None):
        raise ValueError("--n-sink S and --window W go together")


def check_args(args, block_size: int, n_prompt: int):
    """User errors that depend on the model and the prompt, said before any generation starts."""
    check_flags(args)
    if n_prompt == 0:
        raise ValueError("the prompt is empty; pass --prompt with some text")
    if args.n_sink is not None:
        if args.n_sink < 0 or args.window < 1 or args.n_sink + args.window > block_size:
            raise ValueError(f"need --n-sink >= 0, --window >= 1 and their sum <= the context ({block_size})")


def generate_cropped(model, idx, max_new_tokens: int, block: int, generator, on_token, **sampling):
    """nanoGPT's generation past the context: each token from a full forward over the last `block`
    tokens (no cache: cropping shifts every position, so cached keys would be at the wrong ones)."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block:]).logits[:, -1]
        nxt = sample_next(logits, generator=generator, **sampling)
        idx = torch.cat((idx, nxt), dim=1)
        on_token(nxt[:, 0])
    return idx


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
    block = run.model.config.block_size
    crop = args.n_sink is None and len(ids) + args.max_new_tokens > block
    if crop:
        print(f"note: prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceed the context of "
              f"{block}; each token is predicted from the last {block} (cropped, as nanoGPT), or stream with "
              f"--n-sink 4 --window {block - 4}", file=sys.stderr)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    for i in range(args.num_samples):
        idx = torch.tensor([ids], device=args.device)
        cache = None if args.n_sink is None else run.model.make_cache(args.n_sink, args.window)
        stream = TextStream(tok, ids)

        def show(token):
            sys.stdout.write(stream.push(int(token[0])))
            sys.stdout.flush()

        sys.stdout.write(prompt)
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if cache is None and crop:
            generate_cropped(run.model, idx, args.max_new_tokens, block, generator, show, **sampling)
        else:
            run.model.generate(idx, args.max_new_tokens, cache=cache, generator=generator, on_token=show, **sampling)
        sys.stdout.write(stream.flush() + "\n")
        if i + 1 < args.num_samples:
            sys.stdout.write("-" * 40 + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
