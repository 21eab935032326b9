"""Speed of every attention kind: kernel timings against flash softmax (bench/kernels.py),
training throughput, MFU and peak memory (bench/training.py), and the CPU comparison with
nanoGPT's model. This module is the command line; it prints markdown and writes JSON to --out.

    python -m bench --check                       # verify fast paths against math, then time them
    python -m bench --lengths 1024 4096 --kinds softmax sigmoid
    python -m bench --suite cpu                   # CPU: sinklab vs nanoGPT, every kind (no streaming row)
    python -m bench --skip kernels train nanogpt --stream-model /path/to/hf_folder   # the streaming row
    python -m bench --suite cpu --streaming       # the cpu suite with the streaming row (20+ minutes)

`--check` runs every fast backend against the `math` backend (forward and gradients, relative
error ||fast - ref|| / ||ref|| with the reference in fp32 on the same inputs) and exits non-zero
when one is over the bound (1e-2 for bf16 on the GPU, 1e-4 for fp32 on the CPU). The speed
targets the rows are read against are in docs/gpu.md. The streaming row (bench/streaming.py)
compares eval.streaming's parallel form with token-by-token decoding and with transformers' own
decoding of the same imported model.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from model import backends
from eval import HelpFormatter
from model.config import ATTENTION_KINDS, GATE_KINDS

from .kernels import HEADS, HEAD_DIM, TOKENS, check, kernel_table
from .streaming import streaming_row
from .training import train_table


def markdown(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def model_names(kinds, gates) -> list[str]:
    """softmax/none first (the baseline), then every kind with gate none, then the other gates."""
    names = [f"{k}/none" for k in ["softmax", *[k for k in kinds if k != "softmax"]]]
    names += [f"{k}/{g}" for g in gates if g != "none" for k in kinds]
    return names


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--suite", choices=["gpu", "cpu"], default=None,
                   help="gpu: kernels + GPT-2-124M training (default with CUDA); cpu: sinklab vs nanoGPT")
    p.add_argument("--cpu-nanogpt", action="store_true", help="same as --suite cpu")
    p.add_argument("--check", action="store_true", help="verify fast paths against math first; exit 1 on failure")
    p.add_argument("--check-only", action="store_true", help="run the check and stop")
    p.add_argument("--kinds", nargs="+", choices=ATTENTION_KINDS, default=list(ATTENTION_KINDS))
    p.add_argument("--gates", nargs="+", choices=GATE_KINDS, default=None,
                   help="gates for the training rows (default: none elementwise on GPU, all on CPU)")
    p.add_argument("--lengths", nargs="+", type=int, default=None, help="T values (gpu: 1024 4096 8192, cpu: 256)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--skip", nargs="*", choices=["kernels", "train", "nanogpt", "streaming"], default=[],
                   help="parts to leave out")
    p.add_argument("--streaming", action="store_true",
                   help="run the streaming row in the cpu suite too (it decodes token by token: 20+ minutes at the "
                        "default shapes on a CPU); the gpu suite always runs it unless --skip streaming")
    p.add_argument("--stream-model", default=None,
                   help="streaming row: a transformers folder (default: a random Llama of --n-layer/--n-head/--n-embd/--vocab)")
    p.add_argument("--stream-tokens", type=int, default=4096, help="streaming row: tokens streamed (default 4096)")
    p.add_argument("--stream-window", type=int, default=252, help="streaming row: W of the 4+W sink cache (default 252)")
    p.add_argument("--stream-chunk", type=int, default=256, help="streaming row: queries per forward of the parallel form")
    p.add_argument("--compile", action="store_true", help="torch.compile the models in the training rows")
    p.add_argument("--backends", nargs="+", default=None, help="check and kernel rows: only these backends (the "
                   "kernel table's baseline, SDPA softmax, always runs), e.g. sdpa flash triton chunked math")
    p.add_argument("--train-backend", choices=["auto", "math", "flex", "chunked", "triton"], default="auto",
                   help="backend of the sigmoid / elu1 / linear training rows where the kind allows it "
                        "(e.g. triton: both Triton kernels); other rows use auto")
    p.add_argument("--sink-logit", choices=["none", "zero", "learned"], default="none",
                   help="training rows: model.sink_logit of the softmax rows (the retrofit's step)")
    p.add_argument("--n-layer", type=int, default=None)
    p.add_argument("--n-head", type=int, default=None)
    p.add_argument("--n-embd", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (gpu default 16384 // T, cpu 16)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default="out/bench", help="directory for the JSON (default out/bench)")
    args = p.parse_args(argv)
    if args.cpu_nanogpt:
        args.suite = "cpu"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and args.suite != "cpu" else "cpu"
    if args.suite is None:
        args.suite = "gpu" if args.device.startswith("cuda") else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible (torch.cuda.is_available() is False); "
                "use --suite cpu or run on a GPU machine")
    if args.train_backend == "triton":
        if reason := backends.get("triton").why_not():
            p.error(reason)
    if args.suite == "cpu" and args.device != "cpu":
        p.error("--suite cpu runs on the CPU; drop --device or pass --device cpu")
    if args.stream_model is not None and not (Path(args.stream_model).expanduser() / "config.json").is_file():
        p.error(f"--stream-model {args.stream_model}: not a transformers folder (no config.json); "
                "save one with save_pretrained, or leave the flag out for a random Llama")
    for name in ("lengths", "n_layer", "n_head", "n_embd", "vocab", "batch", "warmup", "reps",
                 "stream_tokens", "stream_window", "stream_chunk"):
        v = getattr(args, name)
        if v is not None and any(x <= 0 for x in (v if isinstance(v, list) else [v])):
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    gpu = args.suite == "gpu"
    if not gpu and not (args.streaming or args.stream_model) and "streaming" not in args.skip:
        args.skip.append("streaming")  # the cpu suite's rows take minutes; the streaming row is asked for
        print("note: the cpu suite leaves out the streaming row (token-by-token decoding, 20+ minutes here); "
              "add --streaming to run it", file=sys.stderr)
    defaults = dict(lengths=[1024, 4096, 8192] if gpu else [256], n_layer=12 if gpu else 4,
                    n_head=12 if gpu else 4, n_embd=768 if gpu else 256, vocab=50304 if gpu else 4096,
                    warmup=3 if gpu else 1, reps=10 if gpu else 5,
                    gates=["none", "elementwise"] if gpu else ["none", "headwise", "elementwise"])
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} must be divisible by --n-head {args.n_head}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch._dynamo.config.cache_size_limit = 64  # one compiled flex kernel per (kind, T, grad mode)
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")  # CPU forward
    out_dir = Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"suite": args.suite, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    out_path = out_dir / f"bench-{args.suite}-{stamp}.json"

    def save():
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    print(f"# bench ({args.suite}) on {result['device']}, torch {torch.__version__}, {result['threads']} threads\n")
    failed = False
    if args.check or args.check_only:
        gpu = device.type == "cuda"
        dtype, tol = (torch.bfloat16, 1e-2) if gpu else (torch.float32, 1e-4)
        rows, ok = check(args.kinds, device, dtype, tol, backends=args.backends)
        result["check"] = {"dtype": str(dtype), "tol": tol, "rows": rows, "pass": ok}
        print(f"## check: fast path vs math, relative error ({dtype}, bound {tol:g})\n")
        print(markdown(rows, ["variant", "backend", "out", "dq", "dk", "dv", "pass"]) + "\n")
        save()
        failed = not ok
        if failed:
            print("CHECK FAILED: a fast path disagrees with the math backend (rows with pass=False)", file=sys.stderr)
        if failed or args.check_only:
            print(f"wrote {out_path}")
            return int(failed)

    if args.suite == "gpu":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if "kernels" not in args.skip:
            rows = kernel_table(args.kinds, args.lengths, device, dtype, args.warmup, args.reps, args.backends)
            result["kernels"] = rows
            save()
            print(f"## attention kernels, causal, H={HEADS} D={HEAD_DIM} B=16384/T, {dtype}; x = ratio to SDPA softmax\n")
            print(markdown(rows, ["T", "B", "variant", "backend", "fwd_ms", "fwd_x", "fwd_bwd_ms", "fwd_bwd_x",
                                  "extra_mem_mb", "error"]) + "\n")
    if "train" not in args.skip or "nanogpt" not in args.skip:
        def shape_for(t):
            b = args.batch or (max(1, TOKENS // t) if args.suite == "gpu" else 16)
            return dict(T=t, B=b, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab=args.vocab)

        names = ["softmax/none"]
        if "nanogpt" not in args.skip:
            names.append("nanogpt")
        if "train" not in args.skip:
            names += [n for n in model_names(args.kinds, args.gates) if n not in names]
        rows = train_table(names, shape_for, args.lengths, device, args.warmup, args.reps, args.compile,
                           interleave=args.suite == "cpu", kernel_backend=args.train_backend,
                           sink_logit=args.sink_logit)
        result["train"] = rows
        save()
        s = shape_for(args.lengths[0])
        print(f"## training step (fwd+bwd+AdamW), {s['n_layer']} layers, {s['n_head']} heads, {s['n_embd']} wide, "
              f"vocab {s['vocab']}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}"
              f"{', compiled' if args.compile else ''}; vs_softmax = step time / sinklab softmax step time\n")
        cols = ["T", "B", "model", "step_ms", "best_ms", "tok_per_s", "mfu", "peak_mem_gb", "vs_softmax", "error"]
        print(("vs_softmax on the CPU: median over rounds of the paired ratio; best_ms: fastest step\n\n"
               if args.suite == "cpu" else "") + markdown([r for r in rows], cols) + "\n")
    if "streaming" not in args.skip and (args.suite == "gpu" or args.streaming or args.stream_model is not None):
        shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab=args.vocab)
        folder = None if args.stream_model is None else Path(args.stream_model).expanduser()
        try:
            row = streaming_row(folder, args.stream_tokens, 4, args.stream_window, args.stream_chunk, shape)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        result["streaming"] = [row]
        save()
        print(f"## streaming, sinks mode ({row['cache']}, a query sees S+W+1 keys), {row['tokens']} random tokens, "
              f"{row['layers']} layers x {row['width']}, fp32, {row['threads']} threads; transformers decodes with "
              "its full DynamicCache\n")
        print(markdown([row], ["model", "tokens", "cache", "parallel_tok_s", "token_by_token_tok_s", "hf_decode_tok_s",
                               "parallel_vs_token_by_token", "parallel_vs_hf_decode", "token_by_token_vs_hf_decode",
                               "max_nll_diff_parallel_vs_token_by_token", "max_nll_diff_vs_hf_before_eviction"]) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
