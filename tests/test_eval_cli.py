"""Every eval CLI end to end on one tiny checkpoint trained here: each writes its JSON and PNG
under <run>/eval/ with values that mean what their definitions say; bad input is one clear error."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ablate
import train
from eval import activations, sink, spikes, streaming
from eval.progress import progress
from runs.load import load_run

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
TEXT = ("ROMEO. But soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
        "JULIET. O Romeo, Romeo, wherefore art thou Romeo?\nDeny thy father and refuse thy name.\n")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """One tiny softmax run shared by every CLI test: 12 steps on a small text corpus."""
    tmp = tmp_path_factory.mktemp("eval_cli")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"play{i}.txt").write_text(f"Play {i}.\n" + TEXT * (6 + i))
    os.environ["WANDB_MODE"] = "disabled"
    assert train.main([
        "name=tiny", f"out_dir={tmp / 'out'}", f"data.source={corpus}", f"data.cache_dir={tmp / 'cache'}",
        "data.vocab_size=300", "data.val_fraction=0.25", "model.n_layer=2", "model.n_head=2", "model.n_embd=32",
        "model.block_size=32", "train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=12",
        "train.warmup_steps=2", "train.eval_interval=6", "train.eval_windows=8", "train.ckpt_interval=12",
        "logging.progress=false",
    ]) == 0
    return tmp / "out" / "tiny"


def outputs(run_dir: Path, json_name: str, png_name: str) -> dict:
    png = run_dir / "eval" / png_name
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 1000
    return json.loads((run_dir / "eval" / json_name).read_text())


def test_sink_cli(run_dir):
    sink.main(["--ckpt", str(run_dir), "--n-seqs", "4", "--lengths", "16", "block"])
    r = outputs(run_dir, "sink.json", "sink_heatmap.png")
    assert r["lengths"] == [16, 32]
    alpha = r["by_length"]["16"]["alpha_1"]
    assert len(alpha) == 2 and len(alpha[0]) == 2  # [layer][head]
    flat = [a for row in alpha for a in row]
    assert r["sink_1_pooled"] == pytest.approx(100 * sum(a > 0.3 for a in flat) / len(flat))
    assert 0 < r["f_attn"] < 1
    assert len(r["sink_rate_by_position"]) == 10 and r["sink_rate_by_position"][0] == r["sink_1"]
    assert set(r["definitions"]) >= {"sink_1", "sink_1_pooled", "sink_any", "top_keys", "f_attn_uniform", "checkpoint"}
    classes = r["by_length"]["16"]["attention_by_token_class"]
    assert sum(c["attention"] for c in classes.values()) == pytest.approx(1.0)
    assert r["checkpoint"]["step"] == 12 and r["checkpoint"]["tokens"] > 0


def test_spikes_cli(run_dir, tmp_path):
    """On the run's real loss curve with one planted spike: exactly that step is flagged."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    spike_step = [r["step"] for r in rows if "loss" in r][-2]
    for r in rows:
        if r.get("step") == spike_step and "loss" in r:
            r["loss"] = 1e3
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spikes.main(["--run", str(tmp_path), "--window", "4", "--k", "6"])
    r = outputs(tmp_path, "spikes.json", "spikes.png")
    loss = r["metrics"]["loss"]
    assert loss["n_values"] == 12 and loss["n_eligible"] == 8 and loss["divergence"] is None
    assert loss["spikes"] == [spike_step]
    assert loss["spike_score"] == pytest.approx(100 / 8)
    flagged = set(loss["spikes"]) | set(r["metrics"]["grad_norm"]["spikes"])
    assert r["n_steps"] == 12 and r["olmo_core_spike_score"] == pytest.approx(100 * len(flagged) / 12)
    assert r["checkpoint"]["step"] == 12


def test_activations_cli(run_dir):
    activations.main(["--ckpt", str(run_dir), "--n-seqs", "2"])
    r = outputs(run_dir, "activations.json", "activations.png")
    assert len(r["layers"]) == 2 and r["T"] == 32
    assert r["max_abs"] == max(l["top"][0]["value"] for l in r["layers"]) > 0
    assert r["max_top1"] == max(l["top_per_seq"][0] for l in r["layers"]) <= r["max_abs"]
    assert all("token_id" in t and "text" in t for l in r["layers"] for t in l["top"])
    activations.main(["--ckpt", str(run_dir), "--n-seqs", "2", "--dtype", "bf16", "--tag", "bf16"])
    half = outputs(run_dir, "bf16/activations.json", "bf16/activations.png")  # other flags: its own folder
    assert half["max_top1"] == pytest.approx(r["max_top1"], rel=0.05)  # same model in bf16


def test_streaming_cli(run_dir):
    """As a real subprocess: `python -m eval.streaming` is the documented entry point."""
    cmd = [sys.executable, "-m", "eval.streaming", "--ckpt", str(run_dir), "--tokens", "90", "--n-sink", "2",
           "--window", "10", "--recompute-stride", "2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    r = outputs(run_dir, "streaming.json", "streaming.png")
    assert r["n_tokens"] == 90 and set(r["modes"]) == {"window", "sinks", "recompute"}
    # the reference order: a query sees S+W+1 = 13 keys, window-only at the same total cache 0+12
    assert r["keys_per_query"] == 13 and r["modes"]["window"]["cache"] == "0+12"
    assert r["modes"]["sinks"]["cache_tokens_peak"] == 13 and r["modes"]["window"]["cache_tokens_peak"] == 13
    assert r["modes"]["recompute"]["n_scored"] == 13 + len(range(13, 89, 2))
    for m in r["modes"].values():
        assert math.isfinite(m["ppl"]) and m["ppl"] > 1 and m["tokens_per_s"] > 0


def test_streaming_long_stream_beyond_context(run_dir, capsys):
    """A window past the model's context is refused in one line unless --beyond-context; a stream
    longer than the held-out split starts it again; the JSON keeps per-position NLL in bins."""
    with pytest.raises(SystemExit) as e:
        streaming.main(["--ckpt", str(run_dir), "--n-sink", "2", "--window", "40", "--modes", "window", "sinks",
                        "--tag", "long"])
    assert e.value.code == 2 and "--beyond-context" in capsys.readouterr().err
    n_val = len(load_run(str(run_dir)).val_tokens())
    result, = streaming.main(["--ckpt", str(run_dir), "--n-sink", "2", "--window", "40", "--modes", "window", "sinks",
                              "--beyond-context", "--tokens", str(3 * n_val), "--tag", "long"])
    r = outputs(run_dir, "long/streaming.json", "long/streaming.png")
    assert r["n_tokens"] == 3 * n_val and "3.00 times" in r["text"] and r["keys_per_query"] == 43
    assert r["modes"]["sinks"]["method"] == "parallel" and r["chunk"] == 256
    bins = r["nll_by_position"]
    assert bins["bin_end"][-1] == 3 * n_val - 1 and len(bins["nll"]["sinks"]) == len(bins["bin_start"])
    assert np.nanmean(np.array(bins["nll"]["sinks"], dtype=float)) == pytest.approx(r["modes"]["sinks"]["mean_nll"], rel=0.05)
    exact, = streaming.main(["--ckpt", str(run_dir), "--n-sink", "2", "--window", "8", "--modes", "sinks", "--exact-decode",
                             "--tokens", "120", "--tag", "exact"])
    assert exact.modes["sinks"]["method"] == "exact-decode" and exact.chunk is None


def test_streaming_bad_input_is_one_clear_error(run_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "eval.streaming", "--ckpt", str(tmp_path / "nope")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(SystemExit) as e:
        streaming.main(["--ckpt", str(run_dir), "--n-sink", "4", "--window", "40"])  # 45 keys > block 32
    assert e.value.code == 2


def test_ablate_collects_runs(run_dir, tmp_path):
    out = tmp_path / "ablate"
    rows = ablate.main(["--runs", str(run_dir), "--out", str(out), "--stream-tokens", "60",
                        "--recompute-stride", "3"])
    assert (out / "ablation.png").read_bytes()[:8] == PNG
    md = (out / "ablation.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("|")]
    assert len(table) == 3 and table[2].startswith("| tiny | softmax | none |")
    header = [c.strip() for c in table[0].strip("|").split("|")]
    # what was run comes first; every column shown is defined; all-n/a columns are left out
    assert md.startswith("# Ablation") and f"--runs {run_dir}" in md and "- commit: " in md
    assert all(f"- **{name}**: " in md for name in header)
    assert "BOS att. non-trigger" not in header and "stream ppl recurrent" not in header  # n/a on plain text
    assert "n/a" not in table[2]
    assert "OLMo-core spike score %" not in header  # 12 steps: OLMo-core reports no score below its window
    assert "Sink_1 % raw" in header and "F-Attn raw" in header
    data = json.loads((out / "ablation.json").read_text())
    row = data["rows"][0]
    val = [json.loads(l)["val_loss"] for l in (run_dir / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
    assert row["val_loss"] == pytest.approx(val[-1]) and row["steps"] == 12
    assert row["sink_1"] == rows[0]["sink_1"] == json.loads((run_dir / "eval" / "ablate" / "sink.json").read_text())["sink_1"]
    # the unigram baseline: held-out tokens under the training split's add-one-smoothed counts
    from collections import Counter

    from data.loader import TokenSplit

    train_ids = TokenSplit(next((run_dir.parent.parent / "cache").glob("*/train.bin")).parent, "train").tokens.tolist()
    counts, vocab = Counter(train_ids), load_run(str(run_dir)).model.config.vocab_size
    held = load_run(str(run_dir)).val_tokens().tolist()
    expected = -sum(math.log((counts[t] + 1) / (len(train_ids) + vocab)) for t in held) / len(held)
    assert row["unigram_loss"] == pytest.approx(expected, rel=1e-9) and "unigram loss" in header
    assert set(row["stream_ppl"]) == {"window", "sinks", "recompute"}
    with pytest.raises(SystemExit):
        ablate.main(["--runs", str(tmp_path / "missing"), "--out", str(out / "x")])
    assert not (out / "x").exists()


def test_checkpoints_write_their_own_dirs_and_a_table_over_steps(run_dir, tmp_path):
    """Two checkpoints of one run: each writes under <run>/eval/<step>/, plus one table over steps."""
    import shutil

    from trainer.checkpoint import write_manifest

    run = tmp_path / "two"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    ckpts = run / "checkpoints"
    first = ckpts / "step_0000006"
    shutil.copytree(ckpts / "latest", first)
    (first / "trainer_state.json").write_text(json.dumps(
        {**json.loads((first / "trainer_state.json").read_text()), "step": 6, "tokens": 6 * 128}))
    write_manifest(first)  # as a save writes it: loading checks every file it reads against the manifest
    results = sink.main(["--ckpt", str(ckpts / "step_*"), "--n-seqs", "2", "--lengths", "16"])
    assert [r.checkpoint["step"] for r in results] == [6, 12]
    for name in ("step_0000006", "step_0000012"):
        assert json.loads((run / "eval" / name / "sink.json").read_text())["checkpoint"]["path"].endswith(name)
    table = json.loads((run / "eval" / "sink_over_steps.json").read_text())
    assert [row["step"] for row in table["rows"]] == [6, 12]
    assert (run / "eval" / "sink_over_steps.png").read_bytes()[:8] == PNG


# --- results never half-written, flags that cannot mislead -----------------------------------

def one_line_error(capsys, e) -> str:
    """The one error line on stderr (argparse puts its usage lines before it), exit code 2."""
    err = capsys.readouterr().err.strip()
    errors = [l for l in err.splitlines() if l.startswith("error:") or ": error: " in l]
    assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_every_metrics_reader_drops_a_torn_last_line(run_dir, tmp_path):
    """The trainer killed mid-row: eval.sink --run, ablate.py --runs and eval.spikes read the rest."""
    import shutil

    run = tmp_path / "torn"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    whole = ablate.read_run_metrics(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "tokens": 8')
    with pytest.warns(UserWarning, match="torn last line"):
        assert ablate.read_run_metrics(run) == whole
    with pytest.warns(UserWarning, match="torn last line"):
        assert spikes.metrics_info(run)["step"] == 12
    with pytest.warns(UserWarning, match="torn last line"):
        (result,) = spikes.main(["--run", str(run), "--window", "4"])
    assert result.n_steps == 12
    with pytest.warns(UserWarning, match="torn last line"):
        assert sink.emergence(run)["sink_1"][-1][0] == 12  # the sink row logged at the end


@pytest.mark.parametrize("argv, says", [
    (["--k", "70", "--lengths", "64"], "--k 70 is beyond the sequence length T=64"),
    (["--lengths", "1"], "at T=1 uniform attention already gives alpha_1 = 1.00 > eps 0.3"),
    (["--lengths", "8"], "use --lengths >= 10"),
    (["--k", "2", "--lengths", "3"], "uniform attention already gives alpha_2 = 0.42"),
])
def test_sink_refuses_lengths_where_the_metric_says_nothing(argv, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:  # refused before any checkpoint is even looked at
        sink.main(["--ckpt", str(tmp_path / "not-read"), *argv])
    assert says in one_line_error(capsys, e)


def test_sink_refuses_k_beyond_the_models_block(run_dir, capsys):
    with pytest.raises(SystemExit) as e:  # "block" = 32 here: known once the model is loaded
        sink.main(["--ckpt", str(run_dir), "--k", "33", "--lengths", "block", "--n-seqs", "2", "--tag", "k33"])
    assert "--k 33 is beyond the sequence length T=32" in one_line_error(capsys, e)


@pytest.mark.parametrize("argv, says", [
    (["--length", "0"], "--length"), (["--length", "1"], "--length"), (["--n-seqs", "0"], "--n-seqs"),
    (["--eps", "0"], "--eps"),
])
def test_backcopy_refuses_degenerate_flags(argv, says, capsys, run_dir):
    from eval import backcopy

    with pytest.raises(SystemExit) as e:
        backcopy.main(["--ckpt", str(run_dir), *argv])
    assert says in one_line_error(capsys, e)


def test_backcopy_refuses_an_hf_import_and_a_run_without_bos(run_dir, capsys):
    from eval import backcopy

    with pytest.raises(SystemExit) as e:
        backcopy.main(["--ckpt", "hf:HuggingFaceTB/SmolLM2-135M"])
    assert "an hf: import has neither" in one_line_error(capsys, e)
    with pytest.raises(SystemExit) as e:
        backcopy.main(["--ckpt", str(run_dir)])
    assert "needs BOS-first sequences" in one_line_error(capsys, e)


def test_globs_work_in_every_eval(run_dir, capsys):
    from eval import backcopy

    pattern = str(run_dir.parent / "tin*")
    (result,) = spikes.main(["--run", pattern, "--window", "4"])
    assert result.checkpoint["path"] == str(run_dir)
    assert sink.main(["--run", pattern])[0]["run"] == str(run_dir)
    with pytest.raises(SystemExit) as e:  # expanded, then refused for its data, not for the pattern
        backcopy.main(["--ckpt", pattern])
    assert "needs BOS-first" in one_line_error(capsys, e)
    with pytest.raises(SystemExit) as e:
        spikes.main(["--run", str(run_dir.parent / "nothing*")])
    assert "matches nothing" in one_line_error(capsys, e)


def test_a_checkpoint_pruned_while_the_eval_runs_is_one_line(run_dir, tmp_path, monkeypatch, capsys):
    """A glob over two step dirs; training prunes the second (train.keep_last) while the first is
    evaluated: the eval stops with one line naming what happened, after writing the first's JSON."""
    import shutil

    import runs.load

    run = tmp_path / "pruned"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "latest", ckpts / "step_0000006")
    load_run = runs.load.load_run

    def load_then_prune(path, *a, **kw):
        loaded = load_run(path, *a, **kw)
        shutil.rmtree(ckpts / "step_0000012", ignore_errors=True)
        return loaded

    monkeypatch.setattr(runs.load, "load_run", load_then_prune)
    with pytest.raises(SystemExit) as e:
        activations.main(["--ckpt", str(ckpts / "step_*"), "--n-seqs", "2"])
    err = one_line_error(capsys, e)
    assert "step_0000012 disappeared before the eval could read it" in err and "keep_last" in err
    assert json.loads((run / "eval" / "step_0000006" / "activations.json").read_text())["n_seqs"] == 2


def test_activations_default_is_plain_windows_as_sun_et_al(run_dir, capsys):
    (result,) = activations.main(["--ckpt", str(run_dir), "--n-seqs", "2"])
    saved = json.loads((run_dir / "eval" / "activations.json").read_text())
    assert saved["bos_first"] is False and "Sun et al." in saved["definitions"]["bos_first"]
    with pytest.raises(SystemExit) as e:
        activations.main(["--ckpt", str(run_dir), "--bos", "--tag", "bos"])
    assert "--bos but" in one_line_error(capsys, e)


def test_progress_off_a_terminal_is_whole_lines(capsys):
    """In a log (stderr not a terminal) each redraw of the bar is its own line, with the rate."""
    bar = progress(total=3, desc="sinks")
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("sinks:") and "\r" not in line for line in lines)
    assert "3.00/3.00" in lines[-1] and "tok/s" in lines[-1]
