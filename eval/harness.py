"""lm-evaluation-harness tasks on any sinklab variant or imported model.

    python -m eval.harness --ckpt out/<run> --tasks hellaswag,arc_easy --limit 200
    python -m eval.harness --ckpt hf:HuggingFaceTB/SmolLM2-135M --tasks lambada_openai --dtype bf16
    python -m eval.harness --ckpt out/<run> --tasks my_task --include-path tasks/   # local task YAMLs

`SinklabLM` is an lm-eval model class around the GPT: loglikelihood (batched, right-padded:
causal attention keeps padding out of every scored position), loglikelihood_rolling (lm-eval's
disjoint windows of block_size tokens, each starting from the prefix token) and generate_until
(greedy or sampled with a KV cache, batched over prompts of equal token length, cut at the
first stop string or end-of-text). Text is encoded without special tokens; an empty context,
and the first rolling window, start from the prefix token: BOS when the tokenizer adds one
(Llama, Mistral), else end-of-text (sinklab's `<|endoftext|>`, Qwen's EOS), as lm-eval's own
HF model does. Results go to harness.json where every eval writes (eval/cli.py:
<run>/eval/, <run>/eval/step_X/ for one checkpoint, out/hf/<name>/eval/ for an hf: import), with
the checkpoint, step, tokens seen and git commit.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from data.tokenizer import EOT

from . import HelpFormatter, fail, make_dir, nonnegative_int, positive_int, write_json
from .cli import add_lm_arguments, bos_id, check_paths, checkpoint_info, expand, load, output_dir
from .progress import progress
from .result import EvalResult


class SinklabLM(TemplateLM):
    """lm-eval's LM interface over a `LoadedRun` (runs/load.py)."""

    def __init__(self, run, batch_size: int = 8, max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer = run.model.eval(), run.tokenizer
        self._device = next(self.model.parameters()).device  # lm-eval reads it as .device
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        self.max_length = self.model.config.block_size
        hf = run.config.get("hf")
        self._eot = hf["eos_token_id"] if hf else self.tokenizer.token_to_id(EOT)
        if hf:  # BOS only when the tokenizer puts one in front of text by itself (Llama yes, Qwen no)
            bos = hf["bos_token_id"]
            bos = bos if bos is not None and self.tokenizer.encode("a").ids[:1] == [bos] else None
        else:  # a run trained with data.bos: documents start with its BOS
            bos = bos_id(run)
        self._prefix = self._eot if bos is None else bos

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None, **kwargs):
        """[(key, context ids, continuation ids)] -> [(sum log p(continuation), is greedy)]."""
        # Longest first, so each batch pads little; results go back in the original order.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results = [None] * len(requests)
        bs = override_bs or self.batch_size
        bar = progress(len(requests), "eval.harness loglikelihood", unit="req")
        for start in range(0, len(order), bs):
            batch = [requests[i] for i in order[start:start + bs]]
            # The last max_length tokens of context + continuation feed the model (all but the last).
            seqs = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in batch]
            width = max(len(s) - 1 for s in seqs)
            idx = torch.full((len(batch), width), self._eot, dtype=torch.long)
            for row, s in enumerate(seqs):
                idx[row, : len(s) - 1] = torch.tensor(s[:-1])
            logprobs = F.log_softmax(self.model(idx.to(self.device)).logits.float(), dim=-1).cpu()
            for row, (s, (_, _, cont)) in enumerate(zip(seqs, batch)):
                n = len(cont)
                scored = logprobs[row, len(s) - 1 - n : len(s) - 1]  # positions predicting the continuation
                target = torch.tensor(cont)
                results[order[start + row]] = (float(scored.gather(-1, target[:, None]).sum()),
                                               bool((scored.argmax(-1) == target).all()))
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole text, over disjoint windows of up to block_size tokens."""
        windows, owners = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string (`until`), end-of-text or max_gen_toks."""
        encoded = [(self.tok_encode(ctx), dict(kwargs)) for ctx, kwargs in (r.args for r in requests)]
        # Equal-length prompts with equal settings share a batch: no padding, no attention mask.
        key = lambda i: (len(encoded[i][0]), json.dumps(encoded[i][1], sort_keys=True, default=str))
        order = sorted(range(len(requests)), key=key)
        results = [None] * len(requests)
        bar = progress(len(requests), "eval.harness generate_until", unit="req")
        start = 0
        while start < len(order):
            end = start + 1
            while end < len(order) and end - start < self.batch_size and key(order[end]) == key(order[start]):
                end += 1
            group = order[start:end]
            texts = self._generate([encoded[i][0] for i in group], dict(encoded[group[0]][1]))
            for i, text in zip(group, texts):
                results[i] = text
            bar.update(len(group))
            start = end
        bar.close()
        return results

    def _generate(self, prompts: list[list[int]], kwargs: dict) -> list[str]:
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1)
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        keep = self.max_length - max_new  # the prompt's last tokens that fit with the generation
        idx = torch.tensor([p[-keep:] for p in prompts], device=self.device)
        out = self.model.generate(idx, max_new, temperature=temperature, top_p=kwargs.pop("top_p", None))
        texts = []
        for row in out[:, idx.shape[1]:].tolist():
            row = row[: row.index(self._eot)] if self._eot in row else row
            text = self.tok_decode(row)
            cuts = [text.index(s) for s in until if s and s in text]
            texts.append(text[: min(cuts)] if cuts else text)
        return texts


@dataclass
class HarnessResult(EvalResult):
    """lm-eval's results on one model. The JSON has lm-eval's keys at its top level, as lm-eval writes them
    (some, such as n-shot, are not Python names, so they stay in `lm_eval`)."""

    tasks: list
    lm_eval: dict  # results, versions, n-shot, higher_is_better, n-samples; groups and samples when lm-eval has them
    seed: int | None

    DEFINITIONS = {
        "results": "lm-eval's metrics per task (acc, acc_norm, word_perplexity, ...) as lm-eval defines them",
        "prefix token": "empty contexts and rolling windows start from BOS when the tokenizer adds one "
                        "or the run's data starts documents with it, else from end-of-text",
        "seed": "lm-eval's python / numpy / torch / few-shot seed (null: lm-eval's defaults 0/1234/1234/1234)",
        "samples": "with --log-samples: every request lm-eval made and the model's response, per task",
    }

    def to_json(self) -> dict:
        out = super().to_json()
        return {**out.pop("lm_eval"), **out}


def evaluate(run, tasks: list[str], num_fewshot: int | None = None, limit: float | None = None,
             batch_size: int = 8, include_path: str | None = None, log_samples: bool = False,
             manager=None, seed: int | None = None) -> HarnessResult:
    """Run lm-eval tasks on a LoadedRun; lm-eval's result dict (its JSON-safe parts) is the result's `lm_eval`.
    `manager`: a `task_manager(tasks, include_path)` to reuse (building one can take 20 s).
    `seed`: lm-eval's python, numpy, torch and few-shot seeds all set to it (None: lm-eval's
    defaults, 0 / 1234 / 1234 / 1234). A task whose dataset cannot be loaded (offline, missing
    files) raises DatasetUnavailable."""
    from lm_eval import simple_evaluate

    manager = manager or task_manager(tasks, include_path)
    seeds = {} if seed is None else {"random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed,
                                     "fewshot_random_seed": seed}
    try:
        out = simple_evaluate(model=SinklabLM(run, batch_size=batch_size), tasks=tasks, num_fewshot=num_fewshot,
                              limit=limit, task_manager=manager, log_samples=log_samples, bootstrap_iters=0, **seeds)
    except Exception as e:  # noqa: BLE001 - only dataset failures are translated, the rest re-raised
        cause = dataset_failure(e)
        if cause is None:
            raise
        raise DatasetUnavailable(f"lm-eval could not load the data of {', '.join(tasks)} ({cause}); with no "
                                 "network, run once where the hub is reachable so the datasets are cached "
                                 "(HF_DATASETS_CACHE), or give a task YAML whose dataset_path is local via "
                                 "--include-path") from e
    keep = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples", "samples")
    kept = json.loads(json.dumps({k: out[k] for k in keep if k in out}, default=str))
    return HarnessResult(tasks=tasks, lm_eval=kept, seed=seed)


class DatasetUnavailable(RuntimeError):
    """A task's dataset could not be loaded: no network, not on the hub, or missing local files."""


def dataset_failure(e: BaseException) -> str | None:
    """One line naming why a dataset failed to load, when `e` (or what caused it) is such a failure."""
    import datasets
    import requests
    from huggingface_hub import errors as hub_errors

    kinds = (ConnectionError, TimeoutError, FileNotFoundError, requests.exceptions.ConnectionError,
             datasets.exceptions.DatasetNotFoundError, hub_errors.OfflineModeIsEnabled,
             hub_errors.LocalEntryNotFoundError)
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, kinds):
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        e = e.__cause__ or e.__context__
    return None


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's task index; indexing its thousands of built-in tasks takes tens of seconds,
    so tasks found under include_path alone skip it."""
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {unknown}; list them with `lm-eval ls tasks`, or pass the "
                         "folder of your task YAMLs with --include-path")
    return manager


def output_path(requested: str | None, run, path: str, several: bool, tag: str | None = None) -> Path:
    """harness.json where every eval writes, or under --output-path: a .json file (one checkpoint)
    or a folder (harness.json, or harness_<run>_<checkpoint>.json with several checkpoints)."""
    if requested is None:
        return output_dir(run, path, tag) / "harness.json"
    req = Path(requested)
    if req.suffix == ".json":
        return make_dir(req.parent) / req.name
    name = f"harness_{Path(run.run_dir).name}_{Path(run.checkpoint).name}.json" if several else "harness.json"
    return make_dir(req) / name


def main(argv=None) -> list[HarnessResult]:
    ap = argparse.ArgumentParser(prog="python -m eval.harness", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    add_lm_arguments(ap, data=False)  # the tasks bring their own data
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ap.add_argument("--num-fewshot", type=nonnegative_int, default=None)
    ap.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    ap.add_argument("--batch-size", type=positive_int, default=8)
    ap.add_argument("--include-path", default=None, help="folder of extra task YAMLs")
    ap.add_argument("--output-path", default=None,
                    help="a .json file or a folder for the results (default: <run>/eval/harness.json)")
    ap.add_argument("--seed", type=nonnegative_int, default=None,
                    help="lm-eval's python, numpy, torch and few-shot seeds (default: lm-eval's 0/1234/1234/1234)")
    ap.add_argument("--log-samples", action="store_true", help="keep every request and response in the JSON")
    args = ap.parse_args(argv)
    if args.limit is not None and not args.limit > 0:
        fail(f"--limit must be > 0 (documents, or a fraction if < 1), got {args.limit}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        fail("--tasks is empty; name at least one lm-eval task")
    paths = expand(args.ckpt)
    check_paths(paths)
    if args.output_path and args.output_path.endswith(".json") and len(paths) > 1:
        fail(f"--output-path {args.output_path} is one file but {len(paths)} checkpoints were given; pass a folder")
    try:
        manager = task_manager(tasks, args.include_path)  # unknown task names fail before any model loads
    except ValueError as e:
        fail(str(e))
    written = []
    for path in paths:
        run = load(path, args)
        try:
            result = evaluate(run, tasks, args.num_fewshot, args.limit, args.batch_size, args.include_path,
                              log_samples=args.log_samples, manager=manager, seed=args.seed)
        except DatasetUnavailable as e:
            fail(str(e))
        result.checkpoint = checkpoint_info(run)
        out = output_path(args.output_path, run, path, len(paths) > 1, args.tag)
        write_json(out, result.to_json())
        for task, metrics in result.lm_eval["results"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{task}: {shown}")
        print(f"-> {out}")
        written.append(result)
        del run  # one model in memory at a time
    return written


if __name__ == "__main__":
    from eval import run_main  # Ctrl-C: one line, exit 130

    run_main(main)
